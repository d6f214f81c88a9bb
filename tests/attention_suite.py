"""One correctness suite for every memory-efficient implementation (style: jax's gpu_ops_test).

Subclasses set ``attention(q, k, v, **options)`` (returning ``(out, residual)`` with the public residual: jax.nn's
``[B, T, N]`` logsumexp in the input dtype) and the case lists; every case is checked forward, residual and
dq/dk/dv (and dbias) against ``attention_jax.reference_attention`` with the per-dtype tolerances of tests/helpers.py.
``check_nan_isolation`` checks that NaN/Inf at positions a query cannot see never reach it, forward or backward,
and that a non-finite value a query can see does reach it. Not collected by pytest itself (no ``test_`` prefix).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import attention_jax as aj
from tests.helpers import assert_close, enable_x64, np_mask, randn


def make_inputs(case: dict, dtype, seed: int = 0):
  """Random q/k/v and options for a case dict {B, T, S, N, K, H, [Hv], options...}."""
  r = np.random.default_rng(seed)
  B, T, S, N, K, H = (case[k] for k in "BTSNKH")
  Hv = case.get("Hv", H)
  scale = case.get("input_scale", 1.0)
  q, k, v = randn(r, (B, T, N, H), dtype, scale), randn(r, (B, S, K, H), dtype, scale), randn(r, (B, S, K, Hv), dtype)
  opts = dict(case.get("options", {}))
  if case.get("segments"):
    # Packed sequences: sorted ids, the same packing for queries and keys when T == S.
    q_seg = np.sort(r.integers(0, case["segments"], (B, T)), axis=1)
    kv_seg = q_seg if T == S else np.sort(r.integers(0, case["segments"], (B, S)), axis=1)
    opts["q_segment_ids"], opts["kv_segment_ids"] = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)
  for name in ("query_seq_lengths", "key_value_seq_lengths"):
    if name in opts:
      opts[name] = jnp.asarray(opts[name], jnp.int32)
  if case.get("bias"):
    opts["bias"] = randn(r, case.get("bias_shape", (1, N, T, S)), jnp.float32)
  if case.get("mask"):
    m = r.random(case.get("mask_shape", (B, 1, T, S))) > 0.3
    if case.get("mask_hides_keys"):   # whole key columns hidden from every query (a padding-style mask)
      m &= (np.arange(S) % 5 != 3)
    opts["mask"] = jnp.asarray(m)
  return q, k, v, opts


# name -> case. Shapes are small so that Pallas interpret mode stays quick on CPU.
CASES = {
    "t1": dict(B=2, T=1, S=17, N=2, K=2, H=32),
    "t17_causal": dict(B=1, T=17, S=17, N=2, K=1, H=32, options=dict(is_causal=True)),
    "t333_s200_causal_gqa": dict(B=1, T=333, S=200, N=8, K=2, H=32, options=dict(is_causal=True)),
    "t200_s333_gqa": dict(B=1, T=200, S=333, N=8, K=2, H=32),
    "t90_segments_causal": dict(B=2, T=90, S=90, N=2, K=1, H=32, segments=3, options=dict(is_causal=True)),
    "t70_s50_segments": dict(B=2, T=70, S=50, N=2, K=2, H=16, segments=2),
    "lengths": dict(B=2, T=64, S=100, N=2, K=1, H=32,
                    options=dict(key_value_seq_lengths=[37, 100], query_seq_lengths=[64, 41])),
    "window": dict(B=1, T=150, S=150, N=2, K=2, H=32, options=dict(local_window_size=(16, 8))),
    "window_causal": dict(B=1, T=150, S=120, N=2, K=1, H=32, options=dict(is_causal=True, local_window_size=(32, 0))),
    "soft_cap": dict(B=1, T=70, S=70, N=2, K=2, H=32, input_scale=3.0, options=dict(logits_soft_cap=5.0)),
    "masked_rows": dict(B=2, T=40, S=40, N=2, K=2, H=32,
                        options=dict(key_value_seq_lengths=[0, 30], local_window_size=(0, 3))),
    "mqa_scale": dict(B=2, T=48, S=48, N=4, K=1, H=32, options=dict(scale=0.3, is_causal=True)),
    "h80": dict(B=1, T=40, S=40, N=2, K=2, H=80, options=dict(is_causal=True)),
    "h256": dict(B=1, T=33, S=33, N=1, K=1, H=256),
}
LOW_PRECISION_CASES = ("t17_causal", "t333_s200_causal_gqa", "t90_segments_causal", "soft_cap", "masked_rows")
# The CI subset of CASES for the kernels that run every case (the rest are slow tests): between them they cover
# T = 1, odd T != S both ways round, causal, GQA/MQA, segments, kv and query lengths, windows, soft-cap, rows with no
# key and a padded head dim.
CI_CASES = ("t1", "t333_s200_causal_gqa", "t90_segments_causal", "lengths", "window_causal", "soft_cap",
            "masked_rows", "h80")
CI_LOW_PRECISION = ("t333_s200_causal_gqa", "masked_rows")
LOW_PRECISION = {n: CASES[n] for n in LOW_PRECISION_CASES}
SLOW_CASES = {
    "t1000_causal_gqa": dict(B=1, T=1000, S=1000, N=8, K=2, H=64, options=dict(is_causal=True)),
    "t1000_s777_window_lengths": dict(B=2, T=1000, S=777, N=4, K=2, H=64,
                                      options=dict(local_window_size=(100, 50), key_value_seq_lengths=[600, 777])),
}
# A value head dim different from the query/key head dim (MLA-style), with and without masking.
HV_CASES = {
    "hv48_h32_causal_gqa": dict(B=1, T=45, S=45, N=4, K=2, H=32, Hv=48, options=dict(is_causal=True)),
    "hv16_h40_lengths": dict(B=2, T=30, S=37, N=2, K=1, H=40, Hv=16,
                             options=dict(key_value_seq_lengths=[37, 20], query_seq_lengths=[30, 25])),
}
# Dense mask / bias arrays, full and with broadcast axes, alone and with structured masks.
DENSE_CASES = {
    "mask_B1TS": dict(B=2, T=30, S=50, N=4, K=2, H=16, mask=True),
    "mask_1NTS_causal": dict(B=2, T=33, S=33, N=2, K=1, H=16, mask=True, mask_shape=(1, 2, 33, 33),
                             options=dict(is_causal=True)),
    "mask_B11S_padding": dict(B=2, T=20, S=41, N=2, K=2, H=16, mask=True, mask_shape=(2, 1, 1, 41),
                              mask_hides_keys=True),
    "bias_1NTS": dict(B=2, T=29, S=29, N=2, K=1, H=16, bias=True, options=dict(is_causal=True)),
    "bias_BNTS_lengths": dict(B=2, T=24, S=35, N=2, K=2, H=16, bias=True, bias_shape=(2, 2, 24, 35),
                              options=dict(key_value_seq_lengths=[35, 12])),
    "bias_11TS_mask_B1T1": dict(B=2, T=20, S=20, N=4, K=1, H=16, bias=True, bias_shape=(1, 1, 20, 20), mask=True,
                                mask_shape=(2, 1, 20, 1), options=dict(local_window_size=(6, 2))),
}
# Options under which some positions are hidden from every query (garbage there must not leak) and, with the
# visible variant, positions visible to some queries only.
NAN_CASES = {
    "lengths": CASES["lengths"],
    "causal_gqa": dict(B=1, T=37, S=37, N=4, K=2, H=16, options=dict(is_causal=True)),
    "window_segments": dict(B=2, T=40, S=40, N=2, K=1, H=16, segments=3, options=dict(local_window_size=(5, 3))),
    "mask_padding": DENSE_CASES["mask_B11S_padding"],
}


def named(names, ci=None, slow=False):
  """``named_parameters`` arguments: the names in ``ci`` (or, with ``slow``, the others; all with ``ci=None``)."""
  return [(n, n) for n in names if ci is None or ((n in ci) != slow)]


def ci_and_slow(cases: dict, ci, method: str, *args):
  """Two parameterized test methods over ``cases``: the names in ``ci`` (CI) and the rest (marked slow). Each runs
  ``self.<method>(case, *args)``. In a class body: ``test_x, test_x_slow = ci_and_slow(
      CASES, CI, "check_case", dtype)``.
  """
  def fast(self, name):
    getattr(self, method)(cases[name], *args)

  def slow(self, name):
    getattr(self, method)(cases[name], *args)

  return (parameterized.named_parameters(*named(cases, ci))(fast),
          parameterized.named_parameters(*named(cases, ci, slow=True))(pytest.mark.slow(slow)))


def slow_only(cases: dict, method: str, *args):
  """One parameterized test method over every case of ``cases``, marked slow (``self.<method>(case, *args)``)."""
  def run(self, name):
    getattr(self, method)(cases[name], *args)

  return parameterized.named_parameters(*named(cases))(pytest.mark.slow(run))


def bias_inputs(case: dict, dtype, seed: int = 0):
  """q, k, v, options and a float32 bias of ``case["bias_shape"]`` with ``-inf`` at index ``case["neg_inf"]``."""
  q, k, v, opts = make_inputs(case, dtype, seed)
  bias = np.random.default_rng(seed + 7).standard_normal(case["bias_shape"]).astype(np.float32)
  if "neg_inf" in case:
    bias[case["neg_inf"]] = -np.inf
  return q, k, v, opts, jnp.asarray(bias)


def check_float32_under_x64(fn):
  """``fn(q, k, v, **options)`` (a kernel) with float32 inputs under ``jax_enable_x64``, common in scientific code:
  float32 out, and the reference's values and gradients. A Python float or int in an in-kernel select or index
  map turns float64 / int64 under x64 and breaks the kernel."""
  with enable_x64():
    r = np.random.default_rng(6)
    q = randn(r, (2, 40, 4, 16))
    k, v = randn(r, (2, 40, 2, 16)), randn(r, (2, 40, 2, 16))
    mask = jnp.asarray(r.random((2, 1, 40, 40)) > 0.2)
    opts = dict(mask=mask, is_causal=True, key_value_seq_lengths=jnp.asarray([40, 23]))
    f = lambda q, k, v: fn(q, k, v, **opts)
    ref = lambda q, k, v: aj.reference_attention(q, k, v, **opts)
    assert f(q, k, v).dtype == jnp.float32
    assert_close(f(q, k, v), ref(q, k, v))
    loss = lambda fn: lambda *a: (fn(*a) ** 2).sum()
    for g, w in zip(jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
      assert_close(g, w, kind="grad")


def check_float64_refused(fn, implementation: str):
  """A float32 kernel ``fn`` refuses float64 with an UnsupportedError naming the alternatives; a sequence of
  implementations (as "auto" is) moves on to blockwise and stays in float64."""
  with enable_x64():
    r = np.random.default_rng(5)
    q, k, v = (randn(r, (1, 12, 2, 8), jnp.float64) for _ in range(3))
    mask = jnp.asarray(r.random((1, 1, 12, 12)) > 0.3)
    with pytest.raises(aj.core.UnsupportedError, match="'blockwise' or 'reference'"):
      fn(q, k, v, mask=mask)
    with pytest.raises(NotImplementedError):
      aj.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    got = aj.dot_product_attention(q, k, v, mask=mask, implementation=(implementation, "blockwise"))
    assert got.dtype == jnp.float64
    assert_close(got, aj.reference_attention(q, k, v, mask=mask), jnp.float64)


def check_debug_infs_and_nans(fn, *, jit: bool = False, neg_inf_bias: bool = False):
  """Rows with no key are -inf internally; neither ``fn``'s outputs nor the residuals a (jitted) grad returns show
  it under ``jax.debug_infs`` / ``jax.debug_nans``. ``neg_inf_bias``: a -inf bias entry (valid input) too."""
  r = np.random.default_rng(6)
  q, k, v = randn(r, (2, 9, 4, 8)), randn(r, (2, 11, 2, 8)), randn(r, (2, 11, 2, 6))
  bias = jnp.asarray(r.standard_normal((1, 4, 9, 11)), jnp.float32)
  opts = dict(is_causal=True, key_value_seq_lengths=jnp.array([0, 6]), query_seq_lengths=jnp.array([9, 4]),
              mask=jnp.asarray(r.random((2, 1, 9, 11)) > 0.3),
              bias=bias.at[..., 2].set(-jnp.inf) if neg_inf_bias else bias)
  results = finite_under_debug_checks(lambda q, k, v: fn(q, k, v, return_residual=True, **opts), (q, k, v),
                                      jit=jit)
  np.testing.assert_array_equal(results[0][0][0], 0.0)     # batch 0 has no keys


def finite_under_debug_checks(f, args: tuple, *, jit: bool = False):
  """``(f(*args), grads of f(*args)[0].sum())`` computed under ``jax.debug_infs`` / ``jax.debug_nans`` (which
  raise on any non-finite intermediate outside jit, and on non-finite outputs of a jitted function), checked
  finite, and returned."""
  g = jax.grad(lambda *a: f(*a)[0].sum(), argnums=tuple(range(len(args))))
  if jit:
    f, g = jax.jit(f), jax.jit(g)
  with jax.debug_infs(True), jax.debug_nans(True):
    results = (f(*args), g(*args))
  chex.assert_tree_all_finite(results)
  return results


def check_reference_signature(fn, reference, **tiling):
  """``reference`` takes ``fn``'s arguments (tiling options included) and returns the same output and residual."""
  q, k, v, opts = make_inputs(DENSE_CASES["bias_11TS_mask_B1T1"], jnp.float32)
  a, ra = fn(q, k, v, return_residual=True, **tiling, **opts)
  b, rb = reference(q, k, v, return_residual=True, **tiling, **opts)
  assert_close(a, b)
  assert_close(ra, rb)
  assert (ra.shape, ra.dtype) == (rb.shape, rb.dtype)


def check_jitted_gradient_raises_clearly(fn):
  """Second-order autodiff the call cannot see (the first derivative taken inside a separately jitted function)
  raises NotImplementedError naming the alternatives; when it can see it, the reference formula runs."""
  q, k, v, opts = make_inputs(CASES["t17_causal"], jnp.float32)
  f = lambda q: fn(q, k, v, **opts).sum()
  inner = jax.jit(jax.grad(f))
  with pytest.raises(NotImplementedError, match="implementation='reference' or 'xla'"):
    jax.grad(lambda q: inner(q).sum())(q)
  with pytest.raises(NotImplementedError, match="implementation='reference' or 'xla'"):
    jax.jvp(inner, (q,), (q,))
  # The backward alone (the forward not differentiated again) is wrapped the same way.
  vjp = jax.jit(lambda ct: jax.vjp(f, q)[1](ct)[0])
  with pytest.raises(NotImplementedError, match="backward pass"):
    jax.grad(lambda ct: vjp(ct).sum())(jnp.float32(1.0))
  ref = lambda q: aj.reference_attention(q, k, v, **opts).sum()
  assert_close(jax.grad(lambda q: jax.grad(f)(q).sum())(q), jax.grad(lambda q: jax.grad(ref)(q).sum())(q),
               kind="grad")
  assert_close(jax.jvp(f, (q,), (q,))[1], jax.jvp(ref, (q,), (q,))[1])


def check_entry_point_errors(fn):
  """Shapes named in the message, a mask that does not broadcast, and a traced scale refused with
  ``UnsupportedError`` (so that dispatch moves on to an implementation that takes it)."""
  q, k, v, _ = make_inputs(CASES["t17_causal"], jnp.float32)
  with pytest.raises(ValueError, match=r"query.shape=\(1, 17, 2, 32\)"):
    fn(q, k[:, :, :, :16], v)
  with pytest.raises(ValueError, match="does not broadcast"):
    fn(q, k, v, mask=jnp.ones((1, 1, 17, 5), bool))
  with pytest.raises(aj.core.UnsupportedError, match="needs a concrete scale"):
    jax.jit(lambda s: fn(q, k, v, scale=s))(0.5)


def _visible(case: dict, opts: dict) -> np.ndarray:
  """[B, N, T, S] bool from first principles (tests/helpers.np_mask), for the options of a case."""
  B, T, S, N = case["B"], case["T"], case["S"], case["N"]
  lengths = lambda n: None if n not in opts else np.asarray(opts[n])
  return np_mask(B, N, T, S, causal=opts.get("is_causal", False), window=opts.get("local_window_size"),
                 q_lengths=lengths("query_seq_lengths"), kv_lengths=lengths("key_value_seq_lengths"),
                 q_seg=None if "q_segment_ids" not in opts else np.asarray(opts["q_segment_ids"]),
                 kv_seg=None if "kv_segment_ids" not in opts else np.asarray(opts["kv_segment_ids"]),
                 mask=None if "mask" not in opts else np.asarray(opts["mask"]))


def _as_f32(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x).astype(jnp.float32))


class AttentionSuite(parameterized.TestCase):
  """Override ``attention``; subclasses pick which case names to run via parameterization helpers."""

  def attention(self, q, k, v, **options):
    raise NotImplementedError

  def check_long(self, case: dict):
    """A long case in float32 and in bfloat16."""
    self.check_case(case, jnp.float32)
    self.check_case(case, jnp.bfloat16)

  def check_case(self, case: dict, dtype, seed: int = 0):
    q, k, v, opts = make_inputs(case, dtype, seed)
    B, T, N = q.shape[:3]
    out, res = self.attention(q, k, v, **opts)
    want_out, want_res = aj.reference_attention(q, k, v, return_residual=True, **opts)
    chex.assert_shape(out, q.shape[:-1] + v.shape[-1:])
    self.assertEqual(out.dtype, q.dtype)
    chex.assert_shape(res, (B, T, N))
    self.assertEqual(res.dtype, q.dtype)
    assert_close(out, want_out, dtype, err_msg="output")
    # Rows with no visible key: zeros, and the residual's "no key" value (the dtype's most negative number).
    dead = ~np.transpose(_visible(case, opts).any(-1), (0, 2, 1))     # [B, T, N]
    no_key = np.float32(jnp.finfo(dtype).min)
    np.testing.assert_array_equal(_as_f32(want_res)[dead], no_key, err_msg="reference residual of empty rows")
    np.testing.assert_array_equal(_as_f32(res)[dead], no_key, err_msg="residual of rows with no visible key")
    np.testing.assert_array_equal(_as_f32(out)[dead], 0.0, err_msg="rows with no visible key")
    assert_close(_as_f32(res)[~dead], _as_f32(want_res)[~dead], dtype, err_msg="residual (logsumexp)")

    ct = randn(np.random.default_rng(seed + 1), out.shape, dtype)
    diff = [n for n in ("bias",) if n in opts]
    arrays = {n: opts.pop(n) for n in diff}

    def loss(fn):
      return lambda q, k, v, arrays: (fn(q, k, v, **arrays, **opts)[0].astype(jnp.float32) *
                                      ct.astype(jnp.float32)).sum()
    ref = lambda q, k, v, **o: aj.reference_attention(q, k, v, return_residual=True, **o)
    got = jax.grad(loss(self.attention), argnums=(0, 1, 2, 3))(q, k, v, arrays)
    want = jax.grad(loss(ref), argnums=(0, 1, 2, 3))(q, k, v, arrays)
    chex.assert_tree_all_finite(got)
    for name, g, w in zip(("dq", "dk", "dv"), got[:3], want[:3]):
      self.assertEqual(g.dtype, q.dtype)
      assert_close(g, w, dtype, kind="grad", err_msg=name)
    for name in diff:
      self.assertEqual(got[3][name].shape, arrays[name].shape)
      assert_close(got[3][name], want[3][name], "float32", kind="grad", err_msg=f"d{name}")

  def _run_with_grads(self, q, k, v, opts, ct):
    def loss(q, k, v):
      out = self.attention(q, k, v, **opts)[0].astype(jnp.float32)
      return jnp.where(jnp.isfinite(out), out * ct, 0.0).sum(), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads

  def check_nan_isolation(self, case: dict, dtype, seed: int = 0):
    """NaN/Inf at positions no query sees (and at queries that see nothing) change nothing, forward or backward;
    a NaN at a key some queries see makes exactly those queries' outputs non-finite."""
    q, k, v, opts = make_inputs(case, dtype, seed)
    B, T, N = q.shape[:3]
    S, K = k.shape[1:3]
    G = N // K
    visible = _visible(case, opts)                                        # [B, N, T, S]
    seen_by_head = visible.reshape(B, K, G, T, S).any(axis=(2, 3))         # [B, K, S]: kv (b, head, s) used
    hidden_kv = np.transpose(~seen_by_head, (0, 2, 1))                     # [B, S, K]
    dead_q = np.transpose(~visible.any(-1), (0, 2, 1))                     # [B, T, N]
    self.assertFalse(visible.all(), "case hides nothing")
    garbage = lambda shape: np.where(np.arange(np.prod(shape)).reshape(shape) % 2, np.nan, np.inf)
    poison = lambda x, where: jnp.where(jnp.asarray(where)[..., None], jnp.asarray(garbage(x.shape), x.dtype), x)
    ct = randn(np.random.default_rng(seed + 1), q.shape[:-1] + v.shape[-1:], jnp.float32)
    out, grads = self._run_with_grads(q, k, v, opts, ct)
    out_p, grads_p = self._run_with_grads(poison(q, dead_q), poison(k, hidden_kv), poison(v, hidden_kv), opts, ct)
    assert_close(out_p, out, dtype, err_msg="output with garbage at hidden positions")
    for name, g, gp, hidden in zip(("dq", "dk", "dv"), grads, grads_p, (dead_q, hidden_kv, hidden_kv)):
      assert_close(gp, g, dtype, kind="grad", err_msg=f"{name} with garbage at hidden positions")
      np.testing.assert_array_equal(_as_f32(gp)[hidden], 0.0, err_msg=f"{name} at hidden positions")

    # A NaN query row that sees some keys but not others: only that row turns non-finite, and the gradients of
    # everything it cannot see (keys hidden from it, other rows) stay those of the clean run.
    b, i, n = map(int, np.argwhere(np.transpose(visible.any(-1) & ~visible.all(-1), (0, 2, 1)))[0])
    out_q, grads_q = self._run_with_grads(q.at[b, i, n].set(jnp.nan), k, v, opts, ct)
    row = np.zeros((B, T, N), bool)
    row[b, i, n] = True
    self.assertFalse(np.isfinite(_as_f32(out_q)[row]).any(), "a NaN query row must not be finite")
    assert_close(_as_f32(out_q)[~row], _as_f32(out)[~row], dtype, err_msg="rows other than the NaN query row")
    assert_close(_as_f32(grads_q[0])[~row], _as_f32(grads[0])[~row], dtype, kind="grad", err_msg="dq, other rows")
    unseen = ~visible[b, n, i]                                              # [S] keys hidden from the NaN row
    for name, g, gq in zip(("dk", "dv"), grads[1:], grads_q[1:]):
      assert_close(_as_f32(gq)[b, unseen, n // G], _as_f32(g)[b, unseen, n // G], dtype, kind="grad",
                   err_msg=f"{name} of keys hidden from the NaN query row")

    seen = np.argwhere(seen_by_head.any(0).any(0))[:, 0]
    # An Inf key entry that some queries see, placed so that q.k would be -inf for every query: it must not hide
    # the key silently; exactly the rows that see it become non-finite.
    j_inf = int(seen[len(seen) // 3])
    q_neg = q.at[..., 0].set(-jnp.abs(q[..., 0]) - 0.5)
    out_neg = _as_f32(self.attention(q_neg, k, v, **opts)[0])
    out_inf = _as_f32(self.attention(q_neg, k.at[:, j_inf, :, 0].set(jnp.inf), v, **opts)[0])
    sees_inf = np.transpose(visible[..., j_inf], (0, 2, 1))
    self.assertFalse(np.isfinite(out_inf[sees_inf]).any(), "rows that see an Inf key must not be finite")
    assert_close(out_inf[~sees_inf], out_neg[~sees_inf], dtype, err_msg="rows that do not see the Inf key")

    # A NaN value at one key that some queries see: exactly those rows become non-finite.
    j = int(seen[len(seen) // 2])
    v_nan = v.at[:, j].set(jnp.nan)
    out_nan = _as_f32(self.attention(q, k, v_nan, **opts)[0])
    sees_j = np.transpose(visible[..., j], (0, 2, 1))                      # [B, T, N]
    self.assertTrue(sees_j.any() and (~sees_j).any())
    self.assertFalse(np.isfinite(out_nan[sees_j]).any(), "rows that see a NaN value must not be finite")
    assert_close(out_nan[~sees_j], _as_f32(out)[~sees_j], dtype, err_msg="rows that do not see the NaN value")

  def _biased(self, attention):
    return attention or (lambda q, k, v, bias, mask=None, **o: self.attention(q, k, v, bias=bias, mask=mask, **o)[0])

  def check_bias_gradient(self, case: dict, attention=None):
    """Output and dq/dk/dv/dbias against the reference, dbias in the bias's own broadcast shape (summed over what it
    broadcasts over); ``-inf`` bias entries hide their pairs like a mask. ``attention(q, k, v, bias, **options)``
    defaults to ``self.attention``."""
    attention = self._biased(attention)
    q, k, v, opts, bias = bias_inputs(case, jnp.float32)
    ct = randn(np.random.default_rng(3), q.shape[:-1] + v.shape[-1:])
    out, vjp = jax.vjp(lambda *a: attention(*a, **opts), q, k, v, bias)
    want_out, want_vjp = jax.vjp(lambda *a: aj.reference_attention(*a, **opts), q, k, v, bias)
    assert_close(out, want_out)
    got, want = vjp(ct), want_vjp(ct)
    chex.assert_tree_all_finite(got)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
      self.assertEqual(g.shape, w.shape)
      assert_close(g, w, jnp.float32, kind="grad", err_msg=name)

  def check_bias_hides_garbage(self, attention=None):
    """A -inf bias hides its pair like a mask: NaN/Inf in the keys/values it hides, and NaN bias entries at pairs a
    mask hides, change nothing; hidden keys get zero dk/dv and hidden pairs zero dbias (Hv != H)."""
    attention = self._biased(attention)
    r = np.random.default_rng(4)
    q, k, v = randn(r, (1, 20, 2, 16)), randn(r, (1, 24, 1, 16)), randn(r, (1, 24, 1, 8))
    bias = r.standard_normal((1, 2, 20, 24)).astype(np.float32)
    bias[..., [3, 17]] = -np.inf                 # keys 3 and 17 hidden from every query by the bias
    bias[:, :, 4, :] = -np.inf                   # query 4 sees nothing
    mask = np.ones((1, 1, 20, 24), bool)
    mask[..., 20:] = False                       # keys 20..23 hidden by the mask ...
    bias_garbage = bias.copy()
    bias_garbage[..., 20:] = np.nan              # ... so the bias there may hold garbage
    hidden = np.zeros((1, 24, 1), bool)
    hidden[:, [3, 17, 20, 21, 22, 23]] = True
    poison = lambda x: jnp.where(jnp.asarray(hidden)[..., None], jnp.asarray(np.nan, x.dtype), x)
    ct = randn(r, (1, 20, 2, 8))

    def run(fn, q, k, v, b):
      def loss(q, k, v, b):
        out = fn(q, k, v, b, jnp.asarray(mask))
        return (out * ct).sum(), out
      (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, b)
      return out, grads

    out, grads = run(attention, q, k, v, jnp.asarray(bias))
    out_p, grads_p = run(attention, q, poison(k), poison(v).at[:, 3].set(jnp.inf), jnp.asarray(bias_garbage))
    want, want_grads = run(aj.reference_attention, q, k, v, jnp.asarray(bias))
    assert_close(out, want)
    np.testing.assert_array_equal(out[:, 4], 0.0)
    for g, gp, w in zip(grads, grads_p, want_grads):
      chex.assert_tree_all_finite((g, gp))
      assert_close(g, w, kind="grad")
      assert_close(gp, g, kind="grad")
    np.testing.assert_array_equal(out_p, out)
    for g in (grads_p[1], grads_p[2]):
      np.testing.assert_array_equal(np.asarray(g)[:, [3, 17, 20, 21, 22, 23]], 0.0)
    visible = mask & np.isfinite(bias)
    np.testing.assert_array_equal(np.asarray(grads_p[3])[~np.broadcast_to(visible, bias.shape)], 0.0)

  def check_batch_dims_and_zero_size(self):
    """Extra leading batch dims and rank-3 inputs (with Hv != H and the public residual) against the reference;
    zero-size inputs return zeros and the residual of rows with no key."""
    r = np.random.default_rng(7)
    q, k, v = randn(r, (2, 3, 9, 4, 8)), randn(r, (2, 3, 11, 2, 8)), randn(r, (2, 3, 11, 2, 6))
    lengths = jnp.asarray(r.integers(0, 12, (2, 3)), jnp.int32)
    opts = dict(is_causal=True, key_value_seq_lengths=lengths)
    out, res = self.attention(q, k, v, **opts)
    want, want_res = aj.reference_attention(q, k, v, return_residual=True, **opts)
    chex.assert_shape((out, res), ((2, 3, 9, 4, 6), (2, 3, 9, 4)))
    assert_close(out, want)
    assert_close(res, want_res)
    out3, res3 = self.attention(q[0, 0], k[0, 0], v[0, 0], is_causal=True)
    chex.assert_shape((out3, res3), ((9, 4, 6), (9, 4)))
    assert_close(out3, aj.reference_attention(q[0, 0], k[0, 0], v[0, 0], is_causal=True))
    for a, b, c in ((q[:, :, :0], k, v), (q, k[:, :, :0], v[:, :, :0]), (q, k, v[..., :0])):
      out, res = self.attention(a, b, c)
      chex.assert_shape((out, res), (a.shape[:-1] + c.shape[-1:], a.shape[:-1]))
      np.testing.assert_array_equal(out, 0.0)
      np.testing.assert_array_equal(res, jnp.finfo(jnp.float32).min)


class KernelSuite(AttentionSuite):
  """The tests every flash kernel runs, beyond the case tables a kernel module picks itself (subclasses define
  ``attention`` and add their own CI subsets)."""

  test_long = slow_only(SLOW_CASES, "check_long")
  test_value_head_dim, test_value_head_dim_slow = ci_and_slow(HV_CASES, ("hv16_h40_lengths",), "check_case",
                                                              jnp.float32)
  test_dense_mask_and_bias, test_dense_mask_and_bias_slow = ci_and_slow(
      DENSE_CASES, ("bias_11TS_mask_B1T1",), "check_case", jnp.float32)

  @pytest.mark.slow
  def test_bfloat16_nan_isolation(self):
    self.check_nan_isolation(NAN_CASES["causal_gqa"], jnp.bfloat16)

  @pytest.mark.slow
  def test_bias_minus_inf_hides_keys_and_garbage_there(self):
    self.check_bias_hides_garbage()

  def test_batch_dims_and_zero_size(self):
    self.check_batch_dims_and_zero_size()

  def test_vmap_and_jit(self):
    q, k, v, _ = make_inputs(CASES["t17_causal"], jnp.float32)
    f = jax.jit(lambda q, k, v: self.attention(q, k, v, is_causal=True)[0])
    batched = jax.vmap(f)(jnp.stack([q, 2 * q]), jnp.stack([k, k]), jnp.stack([v, -v]))
    assert_close(batched[1], aj.reference_attention(2 * q, k, -v, is_causal=True))
