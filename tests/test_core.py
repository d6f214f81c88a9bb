"""dot_product_attention ("reference", "xla", "cudnn" dispatch): oracle, peer, property and error tests."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

import attention_jax as aj
from tests.attention_suite import DENSE_CASES, HV_CASES, NAN_CASES, AttentionSuite, ci_and_slow
from tests.helpers import assert_close, enable_x64, np_mask, np_softmax_attention, qkv, randn

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)



def make_case(name, rng, dtype=jnp.float32):
  """Inputs for one option combination: (q, k, v, kwargs for dot_product_attention, NumPy oracle kwargs)."""
  B, T, S, N, K, H = 2, 7, 9, 4, 2, 16
  if name in ("causal_t_gt_s", "window_t_gt_s"):
    T, S = 11, 5
  if name == "mqa":
    K = 1
  q, k, v = qkv(rng, B, T, S, N, K, H, dtype)
  kw, mk, extra = {}, {}, {}
  if name in ("causal", "causal_t_gt_s", "everything"):
    kw["is_causal"] = mk["causal"] = True
  if name in ("window", "window_t_gt_s", "everything"):
    kw["local_window_size"] = mk["window"] = (2, 1)
  if name == "window_int":
    kw["local_window_size"] = mk["window"] = 1
  if name in ("lengths", "everything"):
    kw["query_seq_lengths"] = mk["q_lengths"] = jnp.array([5, T], jnp.int32)
    kw["key_value_seq_lengths"] = mk["kv_lengths"] = jnp.array([S, 4], jnp.int32)
  if name == "kv_lengths":
    kw["key_value_seq_lengths"] = mk["kv_lengths"] = jnp.array([3, 8], jnp.int32)
  if name in ("mask", "everything"):
    m = rng.random((B, N, T, S)) > 0.4
    m[..., 0] = True   # keep every row non-empty so jax.nn (which averages fully-masked rows) is comparable
    kw["mask"] = mk["mask"] = jnp.asarray(m)
  if name in ("bias", "everything"):
    kw["bias"] = extra["bias"] = randn(rng, (1, N, T, S))
  if name in ("segments", "everything"):
    q_seg = np.sort(rng.integers(0, 3, (B, T)), axis=1)
    kv_seg = np.sort(rng.integers(0, 3, (B, S)), axis=1)
    kw["q_segment_ids"], kw["kv_segment_ids"] = jnp.asarray(q_seg), jnp.asarray(kv_seg)
    mk["q_seg"], mk["kv_seg"] = q_seg, kv_seg
  if name in ("soft_cap", "everything"):
    kw["logits_soft_cap"] = extra["soft_cap"] = 1.5
  if name in ("scale", "soft_cap"):
    kw["scale"] = extra["scale"] = 0.9
  mask = np_mask(B, N, T, S, **mk) if mk else None
  return q, k, v, kw, dict(mask=mask, **extra)


CASES = ("plain", "causal", "causal_t_gt_s", "window", "window_int", "window_t_gt_s", "lengths", "kv_lengths",
         "mask", "bias", "segments", "soft_cap", "scale", "mqa", "everything")
# Options jax.nn.dot_product_attention shares with us.
JAX_NN_CASES = ("plain", "causal", "causal_t_gt_s", "window", "window_int", "window_t_gt_s", "lengths",
                "kv_lengths", "mask", "bias", "scale", "mqa")


class OracleTest(parameterized.TestCase):
  """Against the float64 NumPy oracle in tests/helpers.py."""

  @parameterized.product(case=CASES, implementation=("reference", "xla"))
  def test_forward_and_residual(self, case, implementation):
    q, k, v, kw, oracle = make_case(case, np.random.default_rng(hash(case) % 2**32))
    if implementation == "xla" and "logits_soft_cap" in kw:
      with self.assertRaisesRegex(ValueError, "logits_soft_cap"):
        aj.dot_product_attention(q, k, v, implementation="xla", **kw)
      return
    out, res = aj.dot_product_attention(q, k, v, implementation=implementation, return_residual=True, **kw)
    want_out, want_lse = np_softmax_attention(q, k, v, **oracle)
    want_res = np.transpose(want_lse, (0, 2, 1))     # jax.nn's layout [B, T, N]
    assert_close(out, want_out)
    self.assertEqual(res.dtype, jnp.float32)
    chex.assert_shape(res, want_res.shape)
    finite = np.isfinite(want_res)
    np.testing.assert_array_equal(np.asarray(res)[~finite], jnp.finfo(jnp.float32).min)
    assert_close(np.asarray(res)[finite], want_res[finite])

  @parameterized.product(case=("plain", "causal_t_gt_s", "everything", "mqa"), dtype=(jnp.bfloat16, jnp.float16),
                         implementation=("reference", "xla"))
  def test_low_precision(self, case, dtype, implementation):
    q, k, v, kw, oracle = make_case(case, np.random.default_rng(7), dtype)
    if implementation == "xla":
      kw.pop("logits_soft_cap", None)
      oracle.pop("soft_cap", None)
    out = aj.dot_product_attention(q, k, v, implementation=implementation, **kw)
    self.assertEqual(out.dtype, dtype)
    assert_close(out, np_softmax_attention(q, k, v, **oracle)[0], dtype)


class PeerTest(parameterized.TestCase):
  """Our reference against jax.nn.dot_product_attention on every option jax.nn shares."""

  @parameterized.parameters(*JAX_NN_CASES)
  def test_matches_jax_nn(self, case):
    q, k, v, kw, oracle = make_case(case, np.random.default_rng(11))
    ours = aj.dot_product_attention(q, k, v, implementation="reference", **kw)
    theirs = jax.nn.dot_product_attention(q, k, v, **kw)
    # jax.nn averages the values on rows with no visible key (we return zeros): compare rows that see a key.
    mask = oracle["mask"]
    has_key = np.ones(q.shape[:3], bool) if mask is None else np.transpose(mask.any(-1), (0, 2, 1))
    self.assertGreater(has_key.mean(), 0.5)
    assert_close(np.asarray(ours)[has_key], np.asarray(theirs)[has_key])
    np.testing.assert_array_equal(np.asarray(ours)[~has_key], 0.0)

  @parameterized.parameters("plain", "causal", "lengths", "mask", "mqa")
  def test_gradients_match_jax_nn(self, case):
    q, k, v, kw, _ = make_case(case, np.random.default_rng(12))
    ct = randn(np.random.default_rng(13), q.shape)
    loss = lambda f: lambda q, k, v: (f(q, k, v) * ct).sum()
    ours = jax.grad(loss(lambda q, k, v: aj.dot_product_attention(q, k, v, implementation="reference", **kw)),
                    argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs):
      assert_close(a, b, kind="grad")


class SemanticsTest(parameterized.TestCase):

  @parameterized.product(implementation=("reference", "xla"), dtype=DTYPES)
  def test_fully_masked_rows_are_zero_with_finite_grads(self, implementation, dtype):
    r = np.random.default_rng(3)
    q, k, v = qkv(r, B=2, T=6, S=5, dtype=dtype)
    mask = np.ones((2, 4, 6, 5), bool)
    mask[0, :, 2] = False          # user mask hides every key of row 2 (batch 0, all heads)
    mask[1, 1, 4] = False          # one head of one row
    lengths = jnp.array([5, 0], jnp.int32)   # batch 1: no key at all
    kw = dict(mask=jnp.asarray(mask), local_window_size=(0, 1), implementation=implementation)

    def f(q, k, v):
      return aj.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, return_residual=True, **kw)

    (out, lse) = f(q, k, v)
    out32 = np.asarray(out.astype(jnp.float32))
    np.testing.assert_array_equal(out32[0, 2], 0.0)
    np.testing.assert_array_equal(out32[1], 0.0)
    np.testing.assert_array_equal(out32[0, 5], 0.0)  # window (0, 1) at row 5 wants keys 5..6; S=5
    grads = jax.grad(lambda q, k, v: f(q, k, v)[0].astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(np.asarray(grads[0].astype(jnp.float32))[0, 2], 0.0)
    no_key = jnp.finfo(dtype).min      # the residual [B, T, N] of a row with no visible key
    self.assertTrue((lse[0, 2] == no_key).all() and (lse[1] == no_key).all())
    self.assertTrue((lse[0, :2] > no_key).all())
    self.assertEqual(lse.dtype, dtype)

  @parameterized.product(implementation=("reference", "xla"), dtype=(jnp.bfloat16, jnp.float16))
  def test_large_logits_stay_finite(self, implementation, dtype):
    q, k, v = qkv(np.random.default_rng(4), dtype=dtype, scale=1.0)
    q, k = q * 100, k * 100     # logits ~ 1e4 / sqrt(H): far beyond exp's range without max-subtraction
    f = lambda q, k, v: aj.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    out = f(q, k, v)
    self.assertEqual(out.dtype, dtype)
    chex.assert_tree_all_finite(out)
    chex.assert_tree_all_finite(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v))

  @parameterized.parameters("reference", "xla")
  def test_float32_accumulation_for_bf16(self, implementation):
    # Equal logits over S=4096 keys: the output is the mean of the values; bf16 accumulation would miss it by
    # many bf16 ulps, float32 accumulation only by the final rounding.
    r = np.random.default_rng(5)
    q = jnp.zeros((1, 1, 1, 8), jnp.bfloat16)
    k, v = randn(r, (1, 4096, 1, 8), jnp.bfloat16), randn(r, (1, 4096, 1, 8), jnp.bfloat16)
    out = aj.dot_product_attention(q, k, v, implementation=implementation)
    want = np.float64(v.astype(jnp.float32)).mean(1)
    np.testing.assert_allclose(np.float64(out.astype(jnp.float32))[:, 0], want, rtol=1e-2, atol=3e-4)

  @parameterized.product(implementation=("reference", "xla"), dtype=DTYPES)
  def test_output_dtype(self, implementation, dtype):
    q, k, v = qkv(np.random.default_rng(6), dtype=dtype)
    out, lse = aj.dot_product_attention(q, k, v, implementation=implementation, return_residual=True)
    self.assertEqual(out.dtype, dtype)
    self.assertEqual(lse.dtype, dtype)            # as jax.nn: the input dtype, [B, T, N]
    chex.assert_shape(lse, (2, 7, 4))

  @parameterized.product(implementation=("reference", "xla"), t_s=((6, 6), (6, 9), (9, 4)))
  def test_causality_by_gradients(self, implementation, t_s):
    T, S = t_s
    q, k, v = qkv(np.random.default_rng(8), T=T, S=S)
    for i in range(T):
      gk, gv = jax.grad(lambda k, v: aj.dot_product_attention(
          q, k, v, is_causal=True, implementation=implementation)[:, i].sum(), argnums=(0, 1))(k, v)
      np.testing.assert_array_equal(np.asarray(gk)[:, i + 1:], 0.0)
      np.testing.assert_array_equal(np.asarray(gv)[:, i + 1:], 0.0)
      self.assertTrue(np.all(np.abs(np.asarray(gv)[:, :min(i + 1, S)]).sum(axis=(2, 3)) > 0))

  def _check_grads_reference_float64(self, options: str):
    with enable_x64():
      q, k, v = qkv(np.random.default_rng(9), T=5, S=6, dtype=jnp.float64)
      mask = jnp.asarray(np.random.default_rng(10).random((2, 1, 5, 6)) > 0.3)
      bias = randn(np.random.default_rng(11), (2, 4, 5, 6), jnp.float64)
      kw = dict(plain=dict(), masks=dict(is_causal=True, mask=mask, bias=bias),
                structured=dict(logits_soft_cap=2.0, local_window_size=(1, 2),
                                key_value_seq_lengths=jnp.array([4, 6])))[options]
      f = lambda q, k, v: aj.dot_product_attention(q, k, v, implementation="reference", **kw)
      self.assertEqual(f(q, k, v).dtype, jnp.float64)
      check_grads(f, (q, k, v), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)

  def test_check_grads_reference_float64(self):
    self._check_grads_reference_float64("masks")

  @parameterized.parameters("plain", "structured")
  @pytest.mark.slow
  def test_check_grads_reference_float64_slow(self, options):
    self._check_grads_reference_float64(options)

  @parameterized.parameters("reference", "xla")
  def test_residual_is_logsumexp_without_gradient(self, implementation):
    q, k, v = qkv(np.random.default_rng(12))
    g = jax.grad(lambda q: aj.dot_product_attention(q, k, v, implementation=implementation,
                                                    return_residual=True)[1].sum())(q)
    np.testing.assert_array_equal(g, 0.0)


@settings(max_examples=max(4, settings.default.max_examples // 3))   # each example compiles anew
@given(B=st.integers(1, 2), T=st.integers(1, 9), S=st.integers(1, 9), extra=st.integers(1, 6),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), causal=st.booleans(),
       implementation=st.sampled_from(["reference", "xla"]), via=st.sampled_from(["lengths", "mask"]),
       seed=st.integers(0, 2**16))
def test_padding_invariance(B, T, S, extra, heads, causal, implementation, via, seed):
  """Appending masked (padding) keys changes nothing, forward or backward."""
  N, K = heads
  r = np.random.default_rng(seed)
  q, k, v = qkv(r, B, T, S, N, K, H=8)
  k_pad = jnp.concatenate([k, randn(r, (B, extra, K, 8), scale=10.0)], axis=1)
  v_pad = jnp.concatenate([v, randn(r, (B, extra, K, 8), scale=10.0)], axis=1)
  if via == "lengths":
    pad_kw = dict(key_value_seq_lengths=jnp.full((B,), S, jnp.int32))
  else:
    pad_kw = dict(mask=jnp.asarray(np.arange(S + extra) < S)[None, None, None, :])

  base = lambda q, k, v: aj.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  padded = lambda q, k, v: aj.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation,
                                                    **pad_kw)
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2)))
  assert_close(padded(q, k_pad, v_pad), base(q, k, v))
  _, g_base = value_and_grad(base)(q, k, v)
  _, g_pad = value_and_grad(padded)(q, k_pad, v_pad)
  assert_close(g_pad[0], g_base[0], kind="grad")
  assert_close(g_pad[1][:, :S], g_base[1], kind="grad")
  assert_close(g_pad[2][:, :S], g_base[2], kind="grad")
  np.testing.assert_array_equal(g_pad[1][:, S:], 0.0)
  np.testing.assert_array_equal(g_pad[2][:, S:], 0.0)


class TransformsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit(self):
    q, k, v, kw, oracle = make_case("everything", np.random.default_rng(14))
    kw.pop("logits_soft_cap")
    oracle.pop("soft_cap")
    want = np_softmax_attention(q, k, v, **oracle)[0]
    arrays = {n: x for n, x in kw.items() if isinstance(x, jax.Array)}
    static = {n: x for n, x in kw.items() if n not in arrays}
    for implementation in ("reference", "xla", None, "auto"):
      f = self.variant(lambda q, k, v, arrays: aj.dot_product_attention(
          q, k, v, implementation=implementation, **arrays, **static))
      assert_close(f(q, k, v, arrays), want)
    f = self.variant(lambda q, k, v: aj.reference_attention(q, k, v, return_weights=True))
    out, weights = f(q, k, v)
    chex.assert_shape(weights, (2, 4, 7, 9))
    assert_close(weights.sum(-1), np.ones((2, 4, 7)))

  def test_vmap_extra_batch_axis(self):
    r = np.random.default_rng(15)
    q, k, v = (randn(r, (3,) + s) for s in ((2, 5, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)))
    lengths = jnp.array([[6, 2], [1, 6], [3, 3]], jnp.int32)
    for implementation in ("reference", "xla"):
      f = lambda q, k, v, l: aj.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=l,
                                                      implementation=implementation)
      batched = jax.jit(jax.vmap(f))(q, k, v, lengths)
      for i in range(3):
        assert_close(batched[i], f(q[i], k[i], v[i], lengths[i]))
      gb = jax.jit(jax.vmap(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))))(q, k, v, lengths)
      g1 = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q[1], k[1], v[1], lengths[1])
      for a, b in zip(gb, g1):
        assert_close(a[1], b, kind="grad")


class ErrorsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.q, self.k, self.v = qkv(np.random.default_rng(16), B=2, T=3, S=5, N=4, K=2, H=8)

  def test_rank(self):
    with self.assertRaisesRegex(ValueError, r"same rank.*query.shape=\(4, 8\)"):
      aj.dot_product_attention(self.q[0, 0], self.k[0, 0], self.v[0, 0])
    with self.assertRaisesRegex(ValueError, r"same rank.*query.shape=\(3, 4, 8\) key.shape=\(2, 5, 2, 8\)"):
      aj.dot_product_attention(self.q[0], self.k, self.v)

  def test_mismatches(self):
    q, k, v = self.q, self.k, self.v
    with self.assertRaisesRegex(ValueError, r"batch.*query.shape=\(1, 3, 4, 8\)"):
      aj.dot_product_attention(q[:1], k, v)
    with self.assertRaisesRegex(ValueError, r"key and value.*value.shape=\(2, 4, 2, 8\)"):
      aj.dot_product_attention(q, k, v[:, :4])
    with self.assertRaisesRegex(ValueError, r"head dims.*query.shape=\(2, 3, 4, 4\)"):
      aj.dot_product_attention(q[..., :4], k, v)
    with self.assertRaisesRegex(ValueError, r"N=4.*K=3"):
      aj.dot_product_attention(q, jnp.zeros((2, 5, 3, 8)), jnp.zeros((2, 5, 3, 8)))
    with self.assertRaisesRegex(ValueError, "dtype"):
      aj.dot_product_attention(q.astype(jnp.bfloat16), k, v)

  def test_masks_and_options(self):
    q, k, v = self.q, self.k, self.v
    with self.assertRaisesRegex(ValueError, r"mask of shape \(2, 4, 3, 4\) does not broadcast.*\(2, 4, 3, 5\)"):
      aj.dot_product_attention(q, k, v, mask=jnp.ones((2, 4, 3, 4), bool))
    with self.assertRaisesRegex(ValueError, r"mask of shape \(2, 2, 3, 5\)"):   # kv heads are not query heads
      aj.dot_product_attention(q, k, v, mask=jnp.ones((2, 2, 3, 5), bool))
    with self.assertRaisesRegex(ValueError, "boolean"):
      aj.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 3, 5)))
    with self.assertRaisesRegex(ValueError, r"bias of shape \(1, 1, 4, 5\) does not broadcast"):
      aj.dot_product_attention(q, k, v, bias=jnp.ones((4, 5)))
    with self.assertRaisesRegex(ValueError, r"bias of shape \(1, 2, 1, 4, 3, 5\) has more dims"):
      aj.dot_product_attention(q, k, v, bias=jnp.ones((1, 2, 1, 4, 3, 5)))
    with self.assertRaisesRegex(ValueError, r"key_value_seq_lengths.*shape=\(3,\)"):
      aj.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.ones((3,), jnp.int32))
    with self.assertRaisesRegex(ValueError, r"kv_segment_ids.*\(2, 5\).*shape=\(2, 3\)"):
      aj.dot_product_attention(q, k, v, q_segment_ids=jnp.zeros((2, 3), jnp.int32),
                               kv_segment_ids=jnp.zeros((2, 3), jnp.int32))
    with self.assertRaisesRegex(ValueError, "T != S"):
      aj.dot_product_attention(q, k, v, q_segment_ids=jnp.zeros((2, 3), jnp.int32))
    with self.assertRaisesRegex(ValueError, "window"):
      aj.dot_product_attention(q, k, v, local_window_size=(1, 2, 3))
    with self.assertRaisesRegex(ValueError, "soft_cap"):
      aj.dot_product_attention(q, k, v, logits_soft_cap=-1.0)

  def test_implementations(self):
    q, k, v = self.q, self.k, self.v
    with self.assertRaisesRegex(ValueError, r"unknown implementation='flash'.*'reference'"):
      aj.dot_product_attention(q, k, v, implementation="flash")
    if jax.default_backend() != "gpu":
      with self.assertRaisesRegex(ValueError, "cudnn.*GPU"):
        aj.dot_product_attention(q, k, v, implementation="cudnn")

  def test_errors_under_jit(self):
    f = jax.jit(lambda q, k, v: aj.dot_product_attention(q, k, v, mask=jnp.ones((2, 4, 3, 4), bool)))
    with self.assertRaisesRegex(ValueError, "does not broadcast"):
      f(self.q, self.k, self.v)


# ----------------------------------------------------------------------------------------------------------
# Conformance with jax.nn's (and tokamax's) signature: ranks, batch dims, low-rank masks, residual, Hv != H
# ----------------------------------------------------------------------------------------------------------

IMPLS = ("reference", "xla", "blockwise")


class ConformanceTest(parameterized.TestCase):

  @parameterized.product(implementation=IMPLS, dtype=(jnp.float32, jnp.bfloat16))
  def test_rank3_and_residual_match_jax_nn(self, implementation, dtype):
    q, k, v = qkv(np.random.default_rng(20), B=1, T=6, S=9, N=4, K=2, H=16, dtype=dtype)
    q, k, v = q[0], k[0], v[0]                                   # [T, N, H]: no batch dim
    mask = jnp.asarray(np.random.default_rng(21).random((6, 9)) > 0.3).at[:, 0].set(True)   # rank-2 mask
    bias = randn(np.random.default_rng(22), (4, 6, 9))                                      # rank-3 bias
    ours, res = aj.dot_product_attention(q, k, v, bias, mask, implementation=implementation, return_residual=True)
    theirs, their_res = jax.nn.dot_product_attention(q, k, v, bias.astype(dtype), mask, return_residual=True)
    chex.assert_shape((ours, res), ((6, 4, 16), (6, 4)))
    self.assertEqual((ours.dtype, res.dtype), (dtype, their_res.dtype))
    assert_close(ours, theirs, dtype)
    assert_close(res, their_res, dtype)

  @parameterized.parameters(*IMPLS)
  def test_vjp_through_the_residual_like_jax_nn(self, implementation):
    q, k, v = qkv(np.random.default_rng(23))
    ct_out, ct_res = randn(np.random.default_rng(24), q.shape), randn(np.random.default_rng(25), q.shape[:-1])
    f = lambda impl: lambda q, k, v: (aj.dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                                               return_residual=True) if impl else
                                      jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True))
    (o, r), vjp = jax.vjp(f(implementation), q, k, v)
    (o2, r2), vjp2 = jax.vjp(f(None), q, k, v)
    assert_close(r, r2)
    for a, b in zip(vjp((ct_out, ct_res)), vjp2((ct_out, ct_res))):   # jax.nn's residual carries no gradient
      assert_close(a, b, kind="grad")

  @parameterized.parameters(*IMPLS)
  def test_extra_batch_dims(self, implementation):
    r = np.random.default_rng(26)
    q, k, v = randn(r, (2, 3, 5, 4, 8)), randn(r, (2, 3, 7, 2, 8)), randn(r, (2, 3, 7, 2, 8))
    lengths = jnp.asarray(r.integers(1, 8, (2, 3)), jnp.int32)
    mask = jnp.asarray(r.random((3, 1, 5, 7)) > 0.2)             # broadcast over the first batch dim
    bias = randn(r, (2, 1, 1, 1, 7))
    out, res = aj.dot_product_attention(q, k, v, bias, mask, key_value_seq_lengths=lengths, is_causal=True,
                                        implementation=implementation, return_residual=True)
    chex.assert_shape((out, res), ((2, 3, 5, 4, 8), (2, 3, 5, 4)))
    for i in range(2):
      for j in range(3):
        want_out, want_lse = np_softmax_attention(
            q[i, j][None], k[i, j][None], v[i, j][None], bias=bias[i, 0][None],
            mask=np_mask(1, 4, 5, 7, causal=True, kv_lengths=lengths[i, j][None], mask=mask[j][None]))
        assert_close(out[i, j], want_out[0])
        live = np.isfinite(want_lse[0].T)
        assert_close(np.asarray(res[i, j])[live], want_lse[0].T[live])

  @parameterized.parameters("reference", "blockwise")
  def test_value_head_dim_differs(self, implementation):
    r = np.random.default_rng(27)
    q, k, v = randn(r, (2, 9, 4, 12)), randn(r, (2, 11, 2, 12)), randn(r, (2, 11, 2, 20))
    opts = dict(is_causal=True, key_value_seq_lengths=jnp.array([11, 4], jnp.int32))
    out = aj.dot_product_attention(q, k, v, implementation=implementation, **opts)
    chex.assert_shape(out, (2, 9, 4, 20))
    mask = np_mask(2, 4, 9, 11, causal=True, kv_lengths=[11, 4])
    assert_close(out, np_softmax_attention(q, k, v, mask=mask)[0])
    g = jax.grad(lambda v: aj.dot_product_attention(q, k, v, implementation=implementation, **opts).sum())(v)
    gr = jax.grad(lambda v: aj.dot_product_attention(q, k, v, implementation="reference", **opts).sum())(v)
    assert_close(g, gr, kind="grad")

  def test_value_head_dim_in_xla_is_refused_or_falls_through(self):
    q, k, v = qkv(np.random.default_rng(28))
    v = jnp.concatenate([v, v], axis=-1)
    with self.assertRaisesRegex(ValueError, r"value head dim.*value.shape=\(2, 9, 2, 32\)"):
      aj.dot_product_attention(q, k, v, implementation="xla")
    got = aj.dot_product_attention(q, k, v, implementation=("xla", "reference"))
    assert_close(got, np_softmax_attention(q, k, v)[0])

  def test_implementation_sequences(self):
    q, k, v = qkv(np.random.default_rng(29))
    # jax.nn has no soft-cap: the sequence falls through to the next implementation that takes the call.
    got = aj.dot_product_attention(q, k, v, logits_soft_cap=2.0, implementation=("xla", "blockwise"))
    assert_close(got, np_softmax_attention(q, k, v, soft_cap=2.0)[0])
    with self.assertRaisesRegex(ValueError, "empty sequence"):
      aj.dot_product_attention(q, k, v, implementation=())
    with self.assertRaisesRegex(ValueError, "unknown implementation='flash'"):
      aj.dot_product_attention(q, k, v, implementation=("xla", "flash"))
    with self.assertRaisesRegex(ValueError, "no implementation takes this call.*xla.*soft_cap"):
      aj.dot_product_attention(q, k, v, logits_soft_cap=2.0, implementation=("xla", "cudnn"))

  @parameterized.parameters(*IMPLS)
  def test_float64_is_computed_in_float64(self, implementation):
    with enable_x64():
      q, k, v = qkv(np.random.default_rng(30), dtype=jnp.float64)
      mask = np_mask(2, 4, 7, 9, causal=True, kv_lengths=[9, 5])
      out = aj.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=jnp.array([9, 5]),
                                     implementation=implementation)
      self.assertEqual(out.dtype, jnp.float64)
      np.testing.assert_allclose(out, np_softmax_attention(q, k, v, mask=mask)[0], atol=1e-12, rtol=1e-12)

  def test_zero_size_inputs(self):
    q, k, v = qkv(np.random.default_rng(31))
    cases = {   # name: (q, k, v, expected output shape)
        "B=0": (q[:0], k[:0], v[:0], (0, 7, 4, 16)),
        "T=0": (q[:, :0], k, v, (2, 0, 4, 16)),
        "S=0": (q, k[:, :0], v[:, :0], (2, 7, 4, 16)),
        "N=K=0": (q[:, :, :0], k[:, :, :0], v[:, :, :0], None),
        "Hv=0": (q, k, v[..., :0], (2, 7, 4, 0)),
    }
    for name, (a, b, c, shape) in cases.items():
      for implementation in IMPLS + (None,):
        with self.subTest(name=name, implementation=implementation):
          if shape is None:
            with self.assertRaisesRegex(ValueError, "K=0"):
              aj.dot_product_attention(a, b, c, implementation=implementation)
            continue
          out, res = aj.dot_product_attention(a, b, c, implementation=implementation, return_residual=True)
          chex.assert_shape((out, res), (shape, shape[:-1]))
          np.testing.assert_array_equal(out, 0.0)
          np.testing.assert_array_equal(res, jnp.finfo(jnp.float32).min)
    with self.assertRaisesRegex(ValueError, "head dim must be positive"):
      aj.dot_product_attention(q[..., :0], k[..., :0], v)

  def test_lengths_out_of_range(self):
    q, k, v = qkv(np.random.default_rng(32))
    for bad in ([10, 3], [-1, 3]):
      with self.assertRaisesRegex(ValueError, r"key_value_seq_lengths must lie in \[0, 9\]"):
        aj.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array(bad))
    with self.assertRaisesRegex(ValueError, r"query_seq_lengths must lie in \[0, 7\]"):
      aj.dot_product_attention(q, k, v, query_seq_lengths=jnp.array([8, 1]))
    # Traced lengths cannot be checked; they are clamped to [0, S].
    f = jax.jit(lambda l: aj.dot_product_attention(q, k, v, key_value_seq_lengths=l, implementation="reference"))
    assert_close(f(jnp.array([50, -4])), aj.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([9, 0])))

  def test_huge_window_is_no_window(self):
    q, k, v = qkv(np.random.default_rng(33))
    for implementation in IMPLS:
      got = aj.dot_product_attention(q, k, v, local_window_size=2**31, implementation=implementation)
      assert_close(got, np_softmax_attention(q, k, v)[0])

  def test_refused_dtypes(self):
    q, k, v = qkv(np.random.default_rng(34))
    with self.assertRaisesRegex(ValueError, "complex.*real logits"):
      aj.dot_product_attention(q.astype(jnp.complex64), k.astype(jnp.complex64), v.astype(jnp.complex64))
    with self.assertRaisesRegex(ValueError, r"floating point.*query.dtype=int32"):
      aj.dot_product_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
    with self.assertRaisesRegex(ValueError, r"bias must be a real numeric array.*bool.*pass boolean masks as `mask`"):
      aj.dot_product_attention(q, k, v, bias=jnp.ones((7, 9), bool))
    with self.assertRaisesRegex(ValueError, "scale must be finite"):
      aj.dot_product_attention(q, k, v, scale=float("nan"))
    with self.assertRaisesRegex(ValueError, "is_causal must be a Python bool"):
      aj.dot_product_attention(q, k, v, is_causal="yes")
    with self.assertRaisesRegex(ValueError, "attend: value must be a real floating-point"):
      aj.attend(jnp.zeros((3, 4)), jnp.ones((4, 2), jnp.int32))


class XlaBiasTest(parameterized.TestCase):
  """A -inf bias hides its key like a mask, in every implementation (jax.nn alone would average or NaN)."""

  @parameterized.parameters(*IMPLS)
  def test_bias_minus_inf(self, implementation):
    q, k, v = qkv(np.random.default_rng(35), B=1, T=3, S=4, N=2, K=1)
    bias = np.zeros((1, 2, 3, 4), np.float32)
    bias[0, :, 0, :] = -np.inf                      # row 0: every key hidden by the bias
    bias[0, :, 1, 2] = -np.inf                      # row 1: the only key the mask leaves is hidden by the bias
    mask = np.ones((1, 1, 3, 4), bool)
    mask[0, 0, 1] = [True, True, True, False]
    mask[0, 0, 1, :2] = False
    f = lambda q, k, v: aj.dot_product_attention(q, k, v, jnp.asarray(bias), jnp.asarray(mask),
                                                 implementation=implementation)
    out = f(q, k, v)
    np.testing.assert_array_equal(out[0, :2], 0.0)
    visible = mask & np.isfinite(bias)
    assert_close(out[0, 2], np_softmax_attention(q, k, v, mask=visible)[0][0, 2])
    grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q, k, v)
    chex.assert_tree_all_finite(grads)


class _DispatchSuite(AttentionSuite):
  IMPLEMENTATION = "reference"

  def attention(self, q, k, v, **options):
    return aj.dot_product_attention(q, k, v, implementation=self.IMPLEMENTATION, return_residual=True, **options)


class ReferenceSuiteTest(_DispatchSuite):
  """The shared suite through dot_product_attention: Hv != H, dense masks, garbage at hidden positions."""

  test_case, test_case_slow = ci_and_slow({**HV_CASES, **DENSE_CASES}, (
      "hv48_h32_causal_gqa", "mask_1NTS_causal", "bias_BNTS_lengths"), "check_case", jnp.float32)
  test_nan_isolation, test_nan_isolation_slow = ci_and_slow(NAN_CASES, ("causal_gqa", "window_segments"),
                                                            "check_nan_isolation", jnp.float32)


class XlaSuiteTest(_DispatchSuite):
  IMPLEMENTATION = "xla"

  test_case, test_case_slow = ci_and_slow(DENSE_CASES, ("mask_B11S_padding", "bias_11TS_mask_B1T1"), "check_case",
                                          jnp.float32)
  test_nan_isolation, test_nan_isolation_slow = ci_and_slow(NAN_CASES, ("lengths", "mask_padding"),
                                                            "check_nan_isolation", jnp.float32)


class DebugChecksTest(parameterized.TestCase):
  """jax.debug_infs / jax.debug_nans stay silent on valid inputs, including rows with no visible key."""

  @parameterized.product(implementation=IMPLS, jit=(False, True))
  def test_silent(self, implementation, jit):
    q, k, v = qkv(np.random.default_rng(36))
    opts = dict(is_causal=True, key_value_seq_lengths=jnp.array([0, 6]), query_seq_lengths=jnp.array([7, 4]),
                mask=jnp.asarray(np.random.default_rng(37).random((2, 1, 7, 9)) > 0.3))
    f = lambda q, k, v: aj.dot_product_attention(q, k, v, implementation=implementation, return_residual=True,
                                                 **opts)
    g = jax.grad(lambda *a: f(*a)[0].sum(), argnums=(0, 1, 2))
    f, g = (jax.jit(f), jax.jit(g)) if jit else (f, g)
    with jax.debug_infs(True), jax.debug_nans(True):
      out, res = f(q, k, v)
      grads = g(q, k, v)
      aj.attend(jnp.ones((3, 4)), jnp.ones((4, 2)), jnp.asarray(np.tril(np.ones((3, 4), bool)) & (np.arange(4) > 0)))
      aj.reference_attention(q, k, v, return_weights=True, **opts)
    chex.assert_tree_all_finite((out, res, grads))


class ForwardModeTest(parameterized.TestCase):
  """Forward-mode and second-order derivatives through the custom-VJP paths (they use the reference formula)."""

  @parameterized.parameters("blockwise", None)
  def test_jvp_hessian_and_grad_of_grad(self, implementation):
    with enable_x64():
      q, k, v = qkv(np.random.default_rng(38), B=1, T=4, S=5, N=2, K=1, H=4, dtype=jnp.float64)
      f = lambda q, k, v: aj.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
      ref = lambda q, k, v: aj.dot_product_attention(q, k, v, is_causal=True, implementation="reference")
      check_grads(f, (q, k, v), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
      t = jax.jvp(f, (q, k, v), (v[:, :4, :, :].repeat(2, 2), k, v))[1]
      assert_close(t, jax.jvp(ref, (q, k, v), (v[:, :4, :, :].repeat(2, 2), k, v))[1], jnp.float64)
      loss = lambda q: f(q, k, v).sum() ** 2
      assert_close(jax.hessian(loss)(q), jax.hessian(lambda q: ref(q, k, v).sum() ** 2)(q), jnp.float64,
                   kind="grad")
      gg = jax.grad(lambda q: jax.grad(loss)(q).sum())(q)
      assert_close(gg, jax.grad(lambda q: jax.grad(lambda q: ref(q, k, v).sum() ** 2)(q).sum())(q), jnp.float64,
                   kind="grad")


def test_dispatch_table_resolves_every_name_and_lists_the_choices():
  """Each implementation name imports its module on first use and names a function of the inputs; an unknown name
  is a ValueError listing the choices."""
  import importlib
  import inspect
  for name, (module, function) in aj.core._DISPATCH.items():
    fn = getattr(importlib.import_module(module), function)
    assert list(inspect.signature(fn).parameters)[0] == "inp", name
  assert aj.core.IMPLEMENTATIONS == tuple(aj.core._DISPATCH)
  q = jnp.ones((1, 3, 2, 4))
  with pytest.raises(ValueError, match=r"unknown implementation='flash'.*'blockwise'.*'pallas_tpu'"):
    aj.dot_product_attention(q, q, q, implementation="flash")
  with pytest.raises(ValueError, match=r"unknown implementation='flash'"):
    aj.dot_product_attention(q, q, q, implementation=("blockwise", "flash"))


def test_entry_points_share_one_signature():
  """Every dot-product entry point has prepare_inputs' arguments, then its own options, then return_residual; its
  *_reference has exactly its signature; an unknown keyword is a TypeError naming the function."""
  import inspect

  from attention_jax import blockwise
  from attention_jax.kernels import flash_gpu, flash_tpu
  base = list(inspect.signature(aj.core.prepare_inputs).parameters)
  entries = {aj.dot_product_attention: ["implementation"], aj.reference_attention: ["return_weights"],
             blockwise.blockwise_attention: ["chunk_sizes"],
             flash_gpu.flash_attention: ["block_sizes", "interpret", "debug"],
             flash_tpu.flash_attention_tpu: ["block_sizes", "interpret", "debug"]}
  for fn, own in entries.items():
    assert list(inspect.signature(fn).parameters) == base + own + ["return_residual"], fn.__name__
    assert fn.__doc__ and fn.__module__.startswith("attention_jax")
  for fn, ref in ((blockwise.blockwise_attention, blockwise.blockwise_attention_reference),
                  (flash_gpu.flash_attention, flash_gpu.flash_attention_reference),
                  (flash_tpu.flash_attention_tpu, flash_tpu.flash_attention_tpu_reference)):
    assert inspect.signature(ref) == inspect.signature(fn)
    assert ref.__name__ == fn.__name__ + "_reference"
  q = jnp.ones((1, 3, 2, 4))
  with pytest.raises(TypeError, match=r"blockwise_attention\(\).*chunk_size"):
    blockwise.blockwise_attention(q, q, q, chunk_size=8)
  with pytest.raises(TypeError, match=r"dot_product_attention\(\).*positional"):
    aj.dot_product_attention(q, q, q, None, None, 0.5)
  with pytest.raises(ValueError, match="chunk_sizes"):       # the reference checks the options it ignores
    blockwise.blockwise_attention_reference(q, q, q, chunk_sizes=0)
