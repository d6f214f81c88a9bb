"""Linear attention: chunked/linear forms against the quadratic reference and a float64 NumPy oracle, recurrent
decoding, FAVOR+ statistics (unbiasedness, error against softmax falling with the number of features), edge cases."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax as aj
from attention_jax import linear
from tests.helpers import assert_close, np_mask, np_softmax_attention, qkv, randn, tol

FEATURE_MAPS = ("elu", "relu", "favor", "taylor")

# name -> shapes and key lengths. T and S are chosen so that the chunk sizes below rarely divide them.
CASES = {
    "t13": dict(B=2, T=13, S=13, N=2, K=2, H=8),
    "gqa_t20": dict(B=1, T=20, S=20, N=4, K=2, H=8),
    "mqa_t17_s11": dict(B=2, T=17, S=11, N=3, K=1, H=8),
    "t9_s23_lengths": dict(B=3, T=9, S=23, N=2, K=1, H=8, lengths=[23, 5, 0]),
    "gqa_t16_lengths": dict(B=2, T=16, S=16, N=4, K=2, H=8, lengths=[16, 7]),
}


def feature_map(name: str, H: int, num_features: int = 32, seed: int = 0):
  if name == "favor":
    return linear.favor_feature_map(jax.random.key(seed), H, num_features)
  return name


def make_inputs(case: dict, dtype=jnp.float32, seed: int = 0, scale: float = 1.0):
  r = np.random.default_rng(seed)
  B, T, S, N, K, H = (case[c] for c in "BTSNKH")
  q, k, v = qkv(r, B, T, S, N, K, H, dtype, scale)
  lengths = None if "lengths" not in case else jnp.asarray(case["lengths"], jnp.int32)
  return q, k, v, lengths


def np_features(name: str, x, projection=None):
  """Float64 feature maps written from the papers' formulas (FAVOR+ unstabilised: float64 has the range)."""
  x = np.asarray(x, np.float64)
  if name == "elu":
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
  if name == "relu":
    return np.maximum(x, 0.0)
  w = np.asarray(projection, np.float64)
  xs = x / x.shape[-1] ** 0.25
  return np.exp(xs @ w.T - 0.5 * np.sum(xs * xs, axis=-1, keepdims=True)) / np.sqrt(w.shape[0])


def np_linear_attention(q, k, v, name, projection=None, causal=False, kv_lengths=None):
  """Float64 oracle: weights φ(q_i)·φ(k_j) over visible keys, normalised; rows without weight give zeros."""
  B, T, N, H = q.shape
  S, K = k.shape[1:3]
  G = N // K
  v = np.repeat(np.asarray(v, np.float64), G, axis=2)
  if name == "taylor":   # the kernel itself, not its features: 1 + s + s^2/2 with s = q.k/sqrt(H)
    s = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), G, axis=2))
    s = s / np.sqrt(H)
    w = 1.0 + s + 0.5 * s * s
  else:
    phi_q = np_features(name, q, projection)
    phi_k = np.repeat(np_features(name, k, projection), G, axis=2)
    w = np.einsum("btnd,bsnd->bnts", phi_q, phi_k)
  w = np.where(np_mask(B, N, T, S, causal=causal, kv_lengths=kv_lengths), w, 0.0)
  num = np.einsum("bnts,bsnh->btnh", w, v)
  den = np.transpose(w.sum(-1), (0, 2, 1))[..., None]
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def grads(fn, q, k, v, ct, **kw):
  loss = lambda q, k, v: (fn(q, k, v, **kw).astype(jnp.float32) * ct.astype(jnp.float32)).sum()
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@functools.partial(jax.jit, static_argnames=("causal", "chunk_size"))
def outputs_and_grads(fmap, q, k, v, lengths, ct, *, causal, chunk_size):
  """(out, grads) of linear_attention and of the reference, in one compiled program (compiles dominate CI)."""
  kw = dict(feature_map=fmap, is_causal=causal, key_value_seq_lengths=lengths)
  results = []
  for fn in (functools.partial(linear.linear_attention, chunk_size=chunk_size), linear.linear_attention_reference):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    results.append((out, vjp(ct)))
  return results


def check_against_reference(case, fmap_name, causal, chunk_size, dtype=jnp.float32, seed=0):
  q, k, v, lengths = make_inputs(case, dtype, seed)
  fmap = linear.get_feature_map(feature_map(fmap_name, case["H"]), case["H"])
  ct = randn(np.random.default_rng(seed + 1), q.shape, dtype)
  (got, g_got), (want, g_want) = outputs_and_grads(fmap, q, k, v, lengths, ct, causal=causal, chunk_size=chunk_size)
  chex.assert_shape(got, q.shape)
  assert got.dtype == q.dtype
  assert_close(got, want, dtype, err_msg="output")
  chex.assert_tree_all_finite(g_got)
  for name, g, w in zip(("dq", "dk", "dv"), g_got, g_want):
    assert g.dtype == dtype
    assert_close(g, w, dtype, kind="grad", err_msg=name)


def slow_unless(condition: bool, *values):
  """A parameter set that runs in CI only when ``condition`` holds (the rest is marked slow)."""
  return pytest.param(*values, marks=() if condition else pytest.mark.slow)


# The CI subset runs every feature map, causal and not, on the case with GQA, padding and a ragged last chunk,
# and elu on T < S with an all-padded example; every other combination runs under -m slow.
@pytest.mark.parametrize("fmap,causal,case", [
    slow_unless(case == "gqa_t16_lengths" or (fmap, case) == ("elu", "t9_s23_lengths"), fmap, causal, case)
    for fmap in FEATURE_MAPS for causal in (False, True) for case in CASES])
def test_float32_matches_reference(fmap, causal, case):
  check_against_reference(CASES[case], fmap, causal, chunk_size=3)


@pytest.mark.parametrize("fmap,chunk_size", [
    slow_unless(fmap == "elu" and chunk_size in (7, 64), fmap, chunk_size)
    for fmap in ("elu", "favor") for chunk_size in (1, 2, 5, 7, 16, 64)])
def test_chunk_sizes(fmap, chunk_size):
  check_against_reference(CASES["gqa_t20"], fmap, True, chunk_size)     # 5 divides T = 20, the others do not
  check_against_reference(CASES["mqa_t17_s11"], fmap, True, chunk_size)


@pytest.mark.parametrize("fmap,causal", [
    slow_unless((fmap, causal) in (("elu", True), ("favor", False)), fmap, causal)
    for fmap in FEATURE_MAPS for causal in (False, True)])
def test_bfloat16_matches_reference(fmap, causal):
  check_against_reference(CASES["gqa_t16_lengths"], fmap, causal, chunk_size=5, dtype=jnp.bfloat16)


@pytest.mark.parametrize("fmap", FEATURE_MAPS)
@pytest.mark.parametrize("causal", (False, True))
def test_float64_oracle(fmap, causal):
  case = CASES["t9_s23_lengths"] if not causal else CASES["gqa_t16_lengths"]
  q, k, v, lengths = make_inputs(case, seed=3)
  fm = feature_map(fmap, case["H"])
  got = linear.linear_attention(q, k, v, feature_map=fm, is_causal=causal, key_value_seq_lengths=lengths,
                                chunk_size=6)
  want = np_linear_attention(q, k, v, fmap, getattr(fm, "projection", None), causal, np.asarray(lengths))
  assert_close(got, want, jnp.float32)


def test_default_chunk_and_public_name():
  q, k, v, _ = make_inputs(dict(B=1, T=300, S=300, N=2, K=1, H=8))   # several default chunks, a ragged one
  want = linear.linear_attention_reference(q, k, v, is_causal=True)
  assert_close(aj.linear_attention(q, k, v, is_causal=True), want)
  assert_close(linear.linear_attention(q, k, v, is_causal=True, chunk_size=None), want)


@pytest.mark.parametrize("fmap", FEATURE_MAPS)
def test_causality_via_gradients(fmap):
  q, k, v, _ = make_inputs(dict(B=1, T=12, S=12, N=2, K=1, H=8))
  fm = feature_map(fmap, 8)
  f = lambda k, v, i: linear.linear_attention(q, k, v, feature_map=fm, is_causal=True, chunk_size=4)[:, i].sum()
  for i in (0, 5, 11):
    dk, dv = jax.grad(f, argnums=(0, 1))(k, v, i)
    np.testing.assert_array_equal(np.asarray(dk)[:, i + 1:], 0.0)
    np.testing.assert_array_equal(np.asarray(dv)[:, i + 1:], 0.0)
    assert float(jnp.abs(dv[:, :i + 1]).sum()) > 0.0


@pytest.mark.parametrize("fmap,causal", [slow_unless(fmap == "favor", fmap, causal)
                                         for fmap in FEATURE_MAPS for causal in (False, True)])
def test_appending_padded_keys_changes_nothing(fmap, causal):
  q, k, v, _ = make_inputs(dict(B=2, T=10, S=10, N=2, K=2, H=8))
  junk = randn(np.random.default_rng(9), (2, 6, 2, 8), scale=50.0)   # large garbage in the padding
  fm = feature_map(fmap, 8)
  want = linear.linear_attention(q, k, v, feature_map=fm, is_causal=causal, chunk_size=4)
  got = linear.linear_attention(q, jnp.concatenate([k, junk], 1), jnp.concatenate([v, junk], 1), feature_map=fm,
                                is_causal=causal, key_value_seq_lengths=jnp.array([10, 10]), chunk_size=4)
  assert_close(got, want)


@pytest.mark.parametrize("fmap,causal", [slow_unless(causal and fmap == "favor", fmap, causal)
                                         for fmap in FEATURE_MAPS for causal in (False, True)])
def test_rows_without_keys_are_zero_with_finite_grads(fmap, causal):
  q, k, v, _ = make_inputs(dict(B=2, T=7, S=7, N=2, K=1, H=8))
  kw = dict(feature_map=feature_map(fmap, 8), is_causal=causal, key_value_seq_lengths=jnp.array([0, 4]),
            chunk_size=3)
  out = linear.linear_attention(q, k, v, **kw)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert float(jnp.abs(out[1]).sum()) > 0.0
  g = grads(linear.linear_attention, q, k, v, jnp.ones_like(q), **kw)
  chex.assert_tree_all_finite(g)
  for x in g:
    np.testing.assert_array_equal(np.asarray(x[0]), 0.0)


@pytest.mark.parametrize("causal", (False, True))
def test_relu_zero_denominator(causal):
  # relu features of an all-negative query are zero: the row has no weight -> zeros, zero gradient.
  q, k, v, _ = make_inputs(dict(B=1, T=6, S=6, N=1, K=1, H=8))
  q = q.at[0, 2].set(-jnp.abs(q[0, 2]) - 0.1)
  kw = dict(feature_map="relu", is_causal=causal)
  out = linear.linear_attention(q, k, v, chunk_size=4, **kw)
  np.testing.assert_array_equal(np.asarray(out[0, 2]), 0.0)
  assert_close(out, linear.linear_attention_reference(q, k, v, **kw))
  dq, dk, dv = grads(functools.partial(linear.linear_attention, chunk_size=4), q, k, v, jnp.ones_like(q), **kw)
  chex.assert_tree_all_finite((dq, dk, dv))
  np.testing.assert_array_equal(np.asarray(dq[0, 2]), 0.0)


@pytest.mark.parametrize("fmap,causal,scale", [slow_unless(causal and scale == 1000.0 and fmap == "favor", fmap, causal,
                                                           scale)
                                               for fmap in FEATURE_MAPS for causal in (False, True)
                                               for scale in (30.0, 1000.0)])
def test_large_bfloat16_inputs_stay_finite_and_bounded(fmap, causal, scale):
  q, k, v, lengths = make_inputs(CASES["gqa_t16_lengths"], jnp.bfloat16, seed=5, scale=scale)
  v = v / scale    # values of order 1; queries and keys of order `scale`
  kw = dict(feature_map=feature_map(fmap, 8), is_causal=causal, key_value_seq_lengths=lengths, chunk_size=5)
  out = linear.linear_attention(q, k, v, **kw)
  chex.assert_tree_all_finite(out)
  # Non-negative weights: every output is a convex combination of the values (or zero).
  bound = float(jnp.abs(v.astype(jnp.float32)).max()) * (1 + tol(jnp.bfloat16)["rtol"])
  assert float(jnp.abs(out.astype(jnp.float32)).max()) <= bound
  chex.assert_tree_all_finite(grads(linear.linear_attention, q, k, v, jnp.ones_like(q), **kw))


def test_favor_stabiliser_does_not_change_the_result():
  """Where every raw float32 FAVOR+ feature underflows, the stabilised map still matches a float64 oracle."""
  r = np.random.default_rng(0)
  H = 8
  fm = linear.favor_feature_map(jax.random.key(1), H, 64)
  direction = r.standard_normal(H)
  noise_q, noise_k = 0.5 * r.standard_normal((1, 9, 2, H)), 0.5 * r.standard_normal((1, 9, 1, H))
  # Queries and keys near one large vector; grow it until the largest raw exponent is far below float32's range
  # (< -110) but products of two features still fit float64 (> -300).
  for radius in np.arange(10.0, 40.0, 0.5):
    k_np = radius * direction + noise_k
    e_max = np.asarray(fm.exponents(jnp.asarray(k_np, jnp.float32))).max()
    if e_max < -110:
      break
  assert -300 < e_max < -110, e_max
  q = jnp.asarray(radius * direction + noise_q, jnp.float32)
  k = jnp.asarray(k_np, jnp.float32)
  v = randn(r, (1, 9, 1, H))
  np.testing.assert_array_equal(np.asarray(fm(k)), 0.0)        # raw features: nothing left in float32
  for causal in (False, True):
    want = np_linear_attention(q, k, v, "favor", fm.projection, causal=causal)
    assert_close(linear.linear_attention(q, k, v, feature_map=fm, is_causal=causal, chunk_size=4), want)


def test_custom_callable_feature_map():
  q, k, v, _ = make_inputs(CASES["gqa_t20"])
  fm = lambda x: jnp.concatenate([jax.nn.softplus(x), jnp.square(x)], axis=-1)   # D = 2H
  for causal in (False, True):
    got = linear.linear_attention(q, k, v, feature_map=fm, is_causal=causal, chunk_size=6)
    assert_close(got, linear.linear_attention_reference(q, k, v, feature_map=fm, is_causal=causal))


def test_jit_and_vmap():
  q, k, v, lengths = make_inputs(CASES["gqa_t16_lengths"])
  fm = linear.favor_feature_map(jax.random.key(0), 8, 16)

  @jax.jit
  def f(fm, q, k, v, lengths):   # the FAVOR+ map is a pytree: it can be a traced argument
    return linear.linear_attention(q, k, v, feature_map=fm, is_causal=True, key_value_seq_lengths=lengths,
                                   chunk_size=4)
  ref = functools.partial(linear.linear_attention_reference, feature_map=fm, is_causal=True,
                          key_value_seq_lengths=lengths)
  assert_close(f(fm, q, k, v, lengths), ref(q, k, v))
  batched = jax.vmap(f, in_axes=(None, 0, 0, 0, None))(fm, jnp.stack([q, -q]), jnp.stack([k, k]),
                                                       jnp.stack([v, 2 * v]), lengths)
  assert_close(batched[1], ref(-q, k, 2 * v))


def test_backward_memory_does_not_hold_per_chunk_states():
  """fwd+bwd temporaries stay far below one D x (H+1) state per chunk and grow linearly in T."""
  def temp_bytes(T, chunk):
    x = jax.ShapeDtypeStruct((1, T, 1, 64), jnp.float32)
    g = jax.jit(jax.grad(lambda q, k, v: linear.linear_attention(q, k, v, is_causal=True, chunk_size=chunk).sum(),
                         argnums=(0, 1, 2)))
    mem = g.lower(x, x, x).compile().memory_analysis()
    if mem is None:
      pytest.skip("this backend reports no compiled memory")
    return mem.temp_size_in_bytes
  states = 2048 * 64 * 65 * 4          # chunk 1: one state per position, 34 MB
  small = temp_bytes(2048, 1)
  assert small < states / 4, small
  assert temp_bytes(8192, 1) < 4 * small * 1.25


@pytest.mark.parametrize("fmap,dtype", [slow_unless(dtype == jnp.float32, fmap, dtype)
                                        for fmap in FEATURE_MAPS for dtype in (jnp.float32, jnp.bfloat16)])
def test_decoding_steps_equal_causal_linear_attention(fmap, dtype):
  q, k, v, _ = make_inputs(dict(B=2, T=11, S=11, N=4, K=2, H=8), dtype, seed=2)
  fm = feature_map(fmap, 8)

  def step(state, qkv_t):
    return linear.linear_attention_step(state, *qkv_t, feature_map=fm)
  _, outs = jax.lax.scan(step, linear.init_state(2, 2, 8, feature_map=fm),
                         (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0)))
  assert outs.dtype == dtype
  assert_close(jnp.moveaxis(outs, 0, 1), linear.linear_attention(q, k, v, feature_map=fm, is_causal=True,
                                                                 chunk_size=4), dtype)


def test_decoding_rescales_when_a_larger_key_arrives():
  # FAVOR+ decoding keeps a running stabiliser: a later, much larger key rescales the state.
  r = np.random.default_rng(4)
  q, k, v = randn(r, (1, 6, 1, 8)), randn(r, (1, 6, 1, 8)), randn(r, (1, 6, 1, 8))
  k = k.at[0, 4].multiply(6.0)
  fm = linear.favor_feature_map(jax.random.key(3), 8, 64)
  state, outs = linear.init_state(1, 1, 8, feature_map=fm), []
  for t in range(6):
    state, o = linear.linear_attention_step(state, q[:, t], k[:, t], v[:, t], feature_map=fm)
    outs.append(o)
  assert_close(jnp.stack(outs, 1), np_linear_attention(q, k, v, "favor", fm.projection, causal=True))


def test_favor_orthogonal_blocks_and_redraw():
  H, M = 8, 20
  w = np.asarray(linear.favor_feature_map(jax.random.key(0), H, M).projection, np.float64)
  assert w.shape == (M, H)
  for lo in range(0, M, H):
    gram = w[lo:lo + H] @ w[lo:lo + H].T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)   # rows orthogonal in a block
  np.testing.assert_array_equal(w, np.asarray(linear.favor_feature_map(jax.random.key(0), H, M).projection))
  assert not np.allclose(w, np.asarray(linear.favor_feature_map(jax.random.key(1), H, M).projection))
  iid = np.asarray(linear.favor_feature_map(jax.random.key(0), H, M, orthogonal=False).projection)
  gram = iid[:H] @ iid[:H].T
  assert np.abs(gram - np.diag(np.diag(gram))).max() > 0.1


@pytest.mark.parametrize("orthogonal", (True, False))
def test_favor_kernel_estimate_is_unbiased(orthogonal):
  """The mean of φ(q)·φ(k) over independent redraws is within 4 standard errors of exp(q·k/√H)."""
  H, M, R = 16, 16, 4000
  r = np.random.default_rng(0)
  projections = jax.vmap(lambda key: linear.favor_feature_map(key, H, M, orthogonal).projection)(
      jax.random.split(jax.random.key(42), R))
  estimate = jax.jit(jax.vmap(lambda p, q, k: jnp.dot(linear.FavorFeatureMap(p)(q), linear.FavorFeatureMap(p)(k)),
                              in_axes=(0, None, None)))
  for _ in range(3):
    q, k = r.standard_normal(H) * 0.5, r.standard_normal(H) * 0.5
    est = np.asarray(estimate(projections, q, k), np.float64)
    target = np.exp(q @ k / np.sqrt(H))
    se = est.std(ddof=1) / np.sqrt(R)
    assert se < 0.02 * target                  # the check has power: a 10% bias would fail it
    assert abs(est.mean() - target) < 4 * se, (est.mean(), target, se)


def favor_softmax_errors(num_features, redraws: int, causal: bool = False, seed: int = 0):
  """Mean over redraws of ||favor - softmax|| / ||softmax|| for each number of features, and the same error of
  plain averaging (uniform weights) as a baseline. Inputs of scale 0.5 in H = 16: FAVOR+'s variance grows like
  exp(|q|² + |k|²), so larger inputs need far more features."""
  r = np.random.default_rng(seed)
  B, T, N, H = 2, 48, 2, 16
  q, k, v = qkv(r, B=B, T=T, S=T, N=N, K=N, H=H, scale=0.5)
  mask = np_mask(B, N, T, T, causal=causal)
  want, _ = np_softmax_attention(q, k, v, mask=mask)
  uniform, _ = np_softmax_attention(q, k * 0, v, mask=mask)
  attend = jax.jit(lambda fm, q, k, v: linear.linear_attention(q, k, v, feature_map=fm, is_causal=causal))
  rel = lambda x: np.linalg.norm(np.asarray(x, np.float64) - want) / np.linalg.norm(want)
  errors = [np.mean([rel(attend(linear.favor_feature_map(jax.random.key(1000 * d + m), H, m), q, k, v))
                     for d in range(redraws)]) for m in num_features]
  return np.asarray(errors), rel(uniform)


@pytest.mark.parametrize("causal", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_favor_error_against_softmax_falls_with_features(causal):
  """FAVOR+ attention approaches softmax attention as M grows (error ~ M^-1/2), averaged over redraws."""
  Ms = (16, 64, 256, 1024)
  errors, uniform = favor_softmax_errors(Ms, redraws=6, causal=causal)
  assert np.all(errors[1:] / errors[:-1] < 0.9), errors          # falls at every step (about 0.6 measured)
  assert errors[-1] < 0.3 * errors[0], errors                      # 1/8 for M^-1/2 at 64x the features
  assert errors[-1] < 0.5 * uniform, (errors, uniform)             # far better than ignoring the keys
  slope = np.polyfit(np.log(Ms), np.log(errors), 1)[0]
  assert slope < -0.3, (errors, slope)


def test_bad_inputs_raise_value_errors_naming_shapes():
  q, k, v, _ = make_inputs(CASES["gqa_t20"])
  with pytest.raises(ValueError, match=r"query.shape=\(1, 20, 8\)"):
    linear.linear_attention(q[:, :, 0], k, v)
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    linear.linear_attention(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match="head dims differ"):
    linear.linear_attention(q, k[..., :4], v[..., :4])
  with pytest.raises(ValueError, match="key_value_seq_lengths"):
    linear.linear_attention(q, k, v, key_value_seq_lengths=jnp.array([3, 4]))
  with pytest.raises(ValueError, match=r"head_dim=4 .*H=8"):
    linear.linear_attention(q, k, v, feature_map=linear.favor_feature_map(jax.random.key(0), 4, 8))
  with pytest.raises(ValueError, match="unknown feature_map='softmax'"):
    linear.linear_attention(q, k, v, feature_map="softmax")
  with pytest.raises(ValueError, match=r"\[..., H\] -> \[..., D\]"):
    linear.linear_attention(q, k, v, feature_map=lambda x: x.sum(-1))
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match="chunk_size"):
      linear.linear_attention(q, k, v, is_causal=True, chunk_size=bad)
  with pytest.raises(ValueError, match="num_features"):
    linear.favor_feature_map(jax.random.key(0), 8, 0)


def test_bad_step_inputs():
  state = linear.init_state(2, 2, 8)
  q, k = jnp.ones((2, 4, 8)), jnp.ones((2, 2, 8))
  with pytest.raises(ValueError, match=r"q_t.shape=\(2, 4\)"):
    linear.linear_attention_step(state, q[..., 0], k, k)
  with pytest.raises(ValueError, match=r"N % K == 0.*q_t.shape=\(2, 3, 8\)"):
    linear.linear_attention_step(state, q[:, :3], k, k)
  with pytest.raises(ValueError, match=r"state does not match .*\(2, 2, 8, 8\)"):
    linear.linear_attention_step(linear.init_state(2, 1, 8), q, k, k)


def test_experiment_variants_run():
  from experiments import variants
  q, k, v, _ = make_inputs(dict(B=1, T=12, S=12, N=1, K=1, H=64))
  for spec in ("linear_elu@8", "favor:32"):
    out = variants.make_attention(spec)(q, k, v, is_causal=True)
    chex.assert_shape(out, q.shape)
    chex.assert_tree_all_finite(out)
