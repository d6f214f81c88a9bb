"""The pure-JAX blockwise path against the reference: forward, public residual and gradients (the shared suite),
garbage at hidden positions, float64, forward-mode / second-order autodiff, debug_infs / debug_nans, chunk sizes,
zero-size inputs, and the block_forward / block_backward pieces ring attention composes."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import attention_jax as aj
from attention_jax import blockwise, core
from tests.attention_suite import (CASES, CI_CASES, CI_LOW_PRECISION, DENSE_CASES, HV_CASES, LOW_PRECISION, NAN_CASES,
                                   SLOW_CASES, AttentionSuite, check_debug_infs_and_nans, ci_and_slow, make_inputs)
from tests.helpers import assert_close, assert_derivatives_match, enable_x64, np_mask, np_softmax_attention, randn

BLOCKWISE_CASES = {
    **CASES,
    "bias_causal": dict(B=2, T=45, S=45, N=2, K=1, H=16, bias=True, options=dict(is_causal=True)),
    "mask_gqa": dict(B=2, T=30, S=50, N=4, K=2, H=16, mask=True),
}
# Garbage isolation also through the soft-cap's tanh (its backward factor meets hidden logits).
NAN_SOFT_CAP = dict(B=2, T=30, S=37, N=2, K=1, H=16, input_scale=2.0,
                    options=dict(key_value_seq_lengths=[37, 20], query_seq_lengths=[30, 25], logits_soft_cap=3.0))
# bfloat16 subset of the dense suite (slow): masks only (the suite checks dbias at float32 tolerance, which a
# backward taking delta = rowsum(dO * O) from the bfloat16 output cannot meet).
BF16_DENSE = ("mask_B11S_padding", "mask_1NTS_causal")
NAN_ALL = {**NAN_CASES, "soft_cap_lengths": NAN_SOFT_CAP}
# The CI subsets (the rest run with -m slow). The Pallas kernels' CI runs other members of the dense and NaN suites.
CI_BLOCKWISE = CI_CASES + ("bias_causal", "mask_gqa")
CI_HV = ("hv48_h32_causal_gqa",)
CI_DENSE = ("mask_1NTS_causal", "mask_B11S_padding", "bias_BNTS_lengths")
CI_NAN = ("lengths", "window_segments", "soft_cap_lengths")



class BlockwiseTest(AttentionSuite):
  CHUNKS = blockwise.ChunkSizes(64, 32)   # several chunks per sequence, ragged last chunks
  SMALL = blockwise.ChunkSizes(16, 8)     # for the short suite cases (T, S <= 50): several chunks both ways

  def setUp(self):
    super().setUp()
    self.chunks = self.CHUNKS

  def attention(self, q, k, v, **options):
    return blockwise.blockwise_attention(q, k, v, chunk_sizes=self.chunks, return_residual=True, **options)

  def check_case_small(self, case, dtype):
    self.chunks = self.SMALL
    self.check_case(case, dtype)

  def check_nan_isolation_small(self, case, dtype):
    self.chunks = self.SMALL
    self.check_nan_isolation(case, dtype)

  test_float32, test_float32_slow = ci_and_slow(BLOCKWISE_CASES, CI_BLOCKWISE, "check_case", jnp.float32)

  @parameterized.named_parameters(*((n, n) for n in SLOW_CASES))
  @pytest.mark.slow
  def test_float32_long(self, name):
    self.check_case(SLOW_CASES[name], jnp.float32)

  test_value_head_dim, test_value_head_dim_slow = ci_and_slow(HV_CASES, CI_HV, "check_case_small", jnp.float32)
  test_dense_mask_and_bias, test_dense_mask_and_bias_slow = ci_and_slow(
      DENSE_CASES, CI_DENSE, "check_case_small", jnp.float32)
  test_nan_isolation, test_nan_isolation_slow = ci_and_slow(NAN_ALL, CI_NAN, "check_nan_isolation_small", jnp.float32)
  test_bfloat16, test_bfloat16_slow = ci_and_slow(LOW_PRECISION, CI_LOW_PRECISION, "check_case", jnp.bfloat16)

  def test_bfloat16_value_head_dim(self):
    self.chunks = self.SMALL
    self.check_case(HV_CASES["hv48_h32_causal_gqa"], jnp.bfloat16)

  @parameterized.named_parameters(*((n, n) for n in BF16_DENSE))
  @pytest.mark.slow
  def test_bfloat16_dense_mask(self, name):
    self.chunks = self.SMALL
    self.check_case(DENSE_CASES[name], jnp.bfloat16)

  def test_bfloat16_nan_isolation(self):
    self.chunks = self.SMALL
    self.check_nan_isolation(NAN_CASES["causal_gqa"], jnp.bfloat16)

  def test_float16(self):
    self.check_case(CASES["t90_segments_causal"], jnp.float16)

  def test_default_chunks_and_dispatch(self):
    q, k, v, opts = make_inputs(CASES["window_causal"], jnp.float32)
    want = aj.reference_attention(q, k, v, **opts)
    assert_close(aj.dot_product_attention(q, k, v, implementation="blockwise", **opts), want)
    if jax.default_backend() == "cpu":
      self.assertEqual(aj.core.resolve_implementation("auto", aj.core.prepare_inputs(q, k, v)), "blockwise")
    assert_close(aj.dot_product_attention(q, k, v, **opts), want)
    # The registered implementation keeps the internal (out, lse [B, N, T]) format for library code.
    inp = core.prepare_inputs(q, k, v, **opts)
    out, lse = core.attention_core(inp, "blockwise")
    want_out, want_lse = core.attention_core(inp, "reference")
    chex.assert_shape(lse, (q.shape[0], q.shape[2], q.shape[1]))
    self.assertEqual(lse.dtype, jnp.float32)
    assert_close(out, want_out)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))

  def test_jit_and_vmap(self):
    q, k, v, opts = make_inputs(CASES["t17_causal"], jnp.float32)
    f = jax.jit(lambda q, k, v: blockwise.blockwise_attention(q, k, v, is_causal=True,
                                                                chunk_sizes=blockwise.ChunkSizes(8, 8)))
    batched = jax.vmap(f)(jnp.stack([q, 2 * q]), jnp.stack([k, k]), jnp.stack([v, -v]))
    assert_close(batched[1], aj.reference_attention(2 * q, k, -v, is_causal=True))

  def test_batch_dims_and_zero_size(self):
    self.check_batch_dims_and_zero_size()

  def test_bias_minus_inf_hides_keys_and_garbage_there(self):
    self.check_bias_hides_garbage(lambda q, k, v, b, m: blockwise.blockwise_attention(q, k, v, b, m, chunk_sizes=4))

  def test_reference_has_the_same_signature(self):
    q, k, v, opts = make_inputs(CASES["soft_cap"], jnp.float32)
    a, ra = blockwise.blockwise_attention(q, k, v, return_residual=True, **opts)
    b, rb = blockwise.blockwise_attention_reference(q, k, v, chunk_sizes=self.CHUNKS, return_residual=True, **opts)
    assert_close(a, b)
    assert_close(ra, rb)
    self.assertEqual((ra.shape, ra.dtype), (rb.shape, rb.dtype))

  def test_traced_scale_is_refused(self):
    q, k, v, _ = make_inputs(CASES["t1"], jnp.float32)
    with self.assertRaisesRegex(ValueError, "needs a concrete scale"):
      jax.jit(lambda s: blockwise.blockwise_attention(q, k, v, scale=s))(0.5)
    with self.assertRaises(core.UnsupportedError):
      jax.jit(lambda s: aj.dot_product_attention(q, k, v, scale=s, implementation="blockwise"))(0.5)
    # "auto" falls back to the reference instead.
    jax.jit(lambda s: aj.dot_product_attention(q, k, v, scale=s))(0.5)


# ----------------------------------------------------------------------------------------------------------
# Chunk sizes, zero-size inputs, bias -inf with garbage
# ----------------------------------------------------------------------------------------------------------


def _small_inputs(seed=0, B=2, T=9, S=11, N=4, K=2, H=8, Hv=None, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  return randn(r, (B, T, N, H), dtype), randn(r, (B, S, K, H), dtype), randn(r, (B, S, K, Hv or H), dtype)


def test_int_chunk_sizes_mean_square_tiles():
  q, k, v = _small_inputs(1)
  opts = dict(is_causal=True, key_value_seq_lengths=jnp.array([11, 5]))
  a = blockwise.blockwise_attention(q, k, v, chunk_sizes=4, **opts)
  b = blockwise.blockwise_attention(q, k, v, chunk_sizes=blockwise.ChunkSizes(4, 4), **opts)
  np.testing.assert_array_equal(a, b)
  assert_close(a, aj.reference_attention(q, k, v, **opts))
  assert blockwise.ChunkSizes.resolve(256) == blockwise.ChunkSizes(256, 256)
  assert blockwise.ChunkSizes.resolve(np.int64(8)) == blockwise.ChunkSizes(8, 8)
  assert blockwise.ChunkSizes.resolve(None) == blockwise.ChunkSizes.get_default()


@pytest.mark.parametrize("bad", [0, -4, 2.5, "8", True, (4, 4), [4]])
def test_bad_chunk_sizes_raise(bad):
  q, k, v = _small_inputs(2)
  with pytest.raises(ValueError, match="chunk_sizes"):
    blockwise.blockwise_attention(q, k, v, chunk_sizes=bad)
  with pytest.raises(ValueError, match="chunk_sizes"):
    blockwise.blockwise_attention_reference(q, k, v, chunk_sizes=bad)


@pytest.mark.parametrize("query,key", [(0, 4), (4, -1), (4.0, 4), (4, None), (False, 4)])
def test_bad_chunk_size_fields_raise(query, key):
  with pytest.raises(ValueError, match=r"ChunkSizes\.(query|key) must be a positive int"):
    blockwise.ChunkSizes(query, key)


@pytest.mark.parametrize("name", ["B=0", "T=0", "S=0", "Hv=0", "rank3_T=0"])
def test_zero_size_inputs(name):
  q, k, v = _small_inputs(3)
  a, b, c = {"B=0": (q[:0], k[:0], v[:0]), "T=0": (q[:, :0], k, v), "S=0": (q, k[:, :0], v[:, :0]),
             "Hv=0": (q, k, v[..., :0]), "rank3_T=0": (q[0, :0], k[0], v[0])}[name]
  out, res = blockwise.blockwise_attention(a, b, c, is_causal=True, chunk_sizes=4, return_residual=True)
  chex.assert_shape((out, res), (a.shape[:-1] + c.shape[-1:], a.shape[:-1]))
  np.testing.assert_array_equal(out, 0.0)
  np.testing.assert_array_equal(res, jnp.finfo(jnp.float32).min)
  grads = jax.grad(lambda a, b, c: blockwise.blockwise_attention(a, b, c, chunk_sizes=4).sum(),
                   argnums=(0, 1, 2))(a, b, c)
  for g, x in zip(grads, (a, b, c)):
    chex.assert_shape(g, x.shape)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("is_causal", [False, True])
def test_visible_non_finite_query_or_key_propagates(is_causal):
  """An Inf in a key (or query) a row sees makes that row non-finite even where q.k would be a -inf logit (which
  alone would silently hide the key); rows that do not see it are unchanged. Unmasked and masked tiles."""
  q, k, v = _small_inputs(15, B=1, T=9, S=9, N=2, K=1, H=8)
  q = q.at[..., 0].set(-jnp.abs(q[..., 0]) - 0.1)          # q . k = -inf for a key whose first entry is +inf
  k_bad = k.at[:, 4, :, 0].set(jnp.inf)
  q_bad = q.at[:, 2, 1, 0].set(-jnp.inf)                   # query row 2 of head 1
  f = lambda q, k: np.asarray(blockwise.blockwise_attention(q, k, v, is_causal=is_causal, chunk_sizes=4))
  clean = f(q, k)
  out = f(q, k_bad)
  sees = np.arange(9) >= 4 if is_causal else np.ones(9, bool)
  assert not np.isfinite(out[:, sees]).any()
  assert_close(out[:, ~sees], clean[:, ~sees])
  out = f(q_bad, k)
  assert not np.isfinite(out[:, 2, 1]).any()
  mask = np.ones(out.shape, bool)
  mask[:, 2, 1] = False
  assert_close(out[mask], clean[mask])


# ----------------------------------------------------------------------------------------------------------
# float64, forward mode and second order
# ----------------------------------------------------------------------------------------------------------


def test_float64_matches_numpy_oracle():
  """float64 end to end: ~1e-12 against the float64 NumPy oracle (a float32 accumulator would miss by ~1e-7)."""
  with enable_x64():
    q, k, v = _small_inputs(6, B=2, T=21, S=17, N=4, K=2, H=8, dtype=jnp.float64)
    r = np.random.default_rng(7)
    bias = r.standard_normal((1, 4, 21, 17))
    mask = r.random((2, 1, 21, 17)) > 0.2
    opts = dict(is_causal=True, key_value_seq_lengths=jnp.array([17, 9]), logits_soft_cap=2.5, scale=0.7)
    out, res = blockwise.blockwise_attention(q, k, v, jnp.asarray(bias), jnp.asarray(mask), chunk_sizes=4,
                                             return_residual=True, **opts)
    self_mask = np_mask(2, 4, 21, 17, causal=True, kv_lengths=[17, 9], mask=mask)
    want, want_lse = np_softmax_attention(q, k, v, mask=self_mask, bias=bias, scale=0.7, soft_cap=2.5)
    assert out.dtype == res.dtype == jnp.float64
    np.testing.assert_allclose(out, want, atol=1e-12, rtol=1e-12)
    live = np.isfinite(want_lse.transpose(0, 2, 1))
    np.testing.assert_allclose(np.asarray(res)[live], want_lse.transpose(0, 2, 1)[live], atol=1e-12, rtol=1e-12)
    # Gradients in float64 against the (float64) reference formula.
    f = lambda fn: jax.grad(lambda q, k, v, b: (fn(q, k, v, b, jnp.asarray(mask), chunk_sizes=4, **opts) ** 2
                                                 ).sum(), argnums=(0, 1, 2, 3))
    got = f(blockwise.blockwise_attention)(q, k, v, jnp.asarray(bias))
    ref = f(blockwise.blockwise_attention_reference)(q, k, v, jnp.asarray(bias))
    for g, w in zip(got, ref):
      assert g.dtype == jnp.float64
      assert_close(g, w, jnp.float64, kind="grad")


def test_float64_block_forward_and_backward_compose():
  """block_forward over two key halves merged by the logsumexp rule, and block_backward with the global lse and
  delta summed over the halves, give the full attention and its gradient (float64, Hv != H)."""
  with enable_x64():
    q, k, v = _small_inputs(8, B=1, T=10, S=14, N=2, K=1, H=6, Hv=4, dtype=jnp.float64)
    kv_len = jnp.array([11])
    halves = [(0, 7, jnp.array([7])), (7, 14, kv_len - 7)]
    parts = []
    for lo, hi, length in halves:
      inp = core.prepare_inputs(q, k[:, lo:hi], v[:, lo:hi], key_value_seq_lengths=length)
      parts.append(blockwise.block_forward(inp, chunk_sizes=3))
    (o1, l1), (o2, l2) = parts
    lse = jnp.logaddexp(l1, l2)
    w = lambda l: jnp.transpose(jnp.exp(l - lse), (0, 2, 1))[..., None]
    out = w(l1) * o1 + w(l2) * o2
    assert out.dtype == jnp.float64
    full = lambda q, k, v: aj.reference_attention(q, k, v, key_value_seq_lengths=kv_len)
    want = full(q, k, v)
    assert_close(out, want, jnp.float64)
    ct = randn(np.random.default_rng(9), out.shape, jnp.float64)
    delta = jnp.einsum("btnh,btnh->bnt", ct, out)
    dq, dks, dvs = 0.0, [], []
    for lo, hi, length in halves:
      inp = core.prepare_inputs(q, k[:, lo:hi], v[:, lo:hi], key_value_seq_lengths=length)
      dq_i, dk_i, dv_i = blockwise.block_backward(inp, ct, lse, delta, chunk_sizes=3)
      dq, dks, dvs = dq + dq_i, dks + [dk_i], dvs + [dv_i]
    want_grads = jax.vjp(full, q, k, v)[1](ct)
    for g, w_ in zip((dq, jnp.concatenate(dks, 1), jnp.concatenate(dvs, 1)), want_grads):
      assert_close(g, w_, jnp.float64, kind="grad")


def _tiny_f64(seed):
  q, k, v = _small_inputs(seed, B=1, T=5, S=6, N=2, K=1, H=4, Hv=3, dtype=jnp.float64)
  opts = dict(is_causal=True, key_value_seq_lengths=jnp.array([5]),
              bias=jnp.asarray(np.random.default_rng(seed + 1).standard_normal((1, 2, 5, 6))))
  return q, k, v, opts


@pytest.mark.parametrize("entry", ["dot_product_attention", "blockwise_attention"])
def test_forward_mode_and_second_order_match_the_reference(entry):
  with enable_x64():
    q, k, v, opts = _tiny_f64(10)
    if entry == "dot_product_attention":
      f = lambda q, k, v: aj.dot_product_attention(q, k, v, implementation="blockwise", **opts)
    else:
      f = lambda q, k, v: blockwise.blockwise_attention(q, k, v, chunk_sizes=2, **opts)
    ref = lambda q, k, v: aj.reference_attention(q, k, v, **opts)
    check_grads(f, (q, k, v), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
    assert_derivatives_match(f, ref, q, k, v, jacfwd_argnum=2)


def test_differentiating_a_jitted_gradient_raises_clearly():
  """When the first derivative is taken inside a separately jitted function the call cannot see the second one:
  differentiating the blockwise backward then raises NotImplementedError naming the alternatives."""
  q, k, v = _small_inputs(12)
  inner = jax.jit(jax.grad(lambda q: blockwise.blockwise_attention(q, k, v, is_causal=True, chunk_sizes=4).sum()))
  with pytest.raises(NotImplementedError, match="implementation='reference' or 'xla'"):
    jax.grad(lambda q: inner(q).sum())(q)
  with pytest.raises(NotImplementedError, match="cannot be differentiated again"):
    jax.jvp(inner, (q,), (q,))
  # The same composition through the reference works.
  ref_inner = jax.jit(jax.grad(lambda q: blockwise.blockwise_attention_reference(q, k, v, is_causal=True).sum()))
  chex.assert_tree_all_finite(jax.grad(lambda q: ref_inner(q).sum())(q))


# ----------------------------------------------------------------------------------------------------------
# jax.debug_infs / jax.debug_nans: the internal -inf never reaches an output or a residual
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_debug_infs_and_nans_stay_silent(jit):
  check_debug_infs_and_nans(functools.partial(blockwise.blockwise_attention, chunk_sizes=4), jit=jit)
  check_debug_infs_and_nans(functools.partial(aj.dot_product_attention, implementation="blockwise"), jit=jit)
