"""Decayed (RetNet / GLA) and delta-rule (DeltaNet) linear attention: the chunked, parallel and recurrent forms and
the decoding steps against float64 NumPy loops of the recurrences, gradients against the recurrent form and against
finite differences of the loops, stability, causality with non-finite input, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import linear
from attention_jax import linear_rnn
from tests.helpers import assert_close, enable_x64, randn

IMPLS = linear_rnn.IMPLEMENTATIONS
GATES = ("head", "token", "channel")   # log_decay [N], [B, T, N], [B, T, N, H]


# ----------------------------------------------------------------------------------------------------------
# Float64 oracles: the recurrences, one token at a time
# ----------------------------------------------------------------------------------------------------------


def np_recurrence(update, q, k, v, gate, scale=None, s0=None):
  """o_t = scale S_t^T q_t with S_t = update(S_{t-1}, k_t, v_t, gate, b, t, n), one token at a time per (b, n);
  query head n reads kv head n // (N // K). Float64 loops."""
  q, k, v, gate = (np.asarray(x, np.float64) for x in (q, k, v, gate))
  B, T, N, H = q.shape
  G, Hv = N // k.shape[2], v.shape[3]
  scale = H ** -0.5 if scale is None else scale
  out = np.zeros((B, T, N, Hv))
  S = np.zeros((B, N, H, Hv)) if s0 is None else np.array(s0, np.float64)
  for b in range(B):
    for n in range(N):
      for t in range(T):
        S[b, n] = update(S[b, n], k[b, t, n // G], v[b, t, n // G], gate, b, t, n)
        out[b, t, n] = scale * S[b, n].T @ q[b, t, n]
  return out, S


def _decayed_update(S, kt, vt, g, b, t, n):
  """S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T; g is [N], [B, T, N] or [B, T, N, H]."""
  g_t = g[n] if g.ndim == 1 else g[b, t, n]
  return np.reshape(np.exp(g_t), (-1, 1)) * S + np.outer(kt, vt)


def _delta_update(S, kt, vt, beta, b, t, n):
  """S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T."""
  return S + beta[b, t, n] * np.outer(kt, vt - S.T @ kt)


np_decayed = functools.partial(np_recurrence, _decayed_update)
np_delta = functools.partial(np_recurrence, _delta_update)


def make(B=2, T=37, N=4, K=2, H=8, Hv=5, gate="channel", dtype=jnp.float32, seed=0, strength=1.5):
  """Random inputs; the gate is log_decay (uniform in [-strength, -0.01]) or, for "beta", beta in (0, 1) with
  L2-normalised keys."""
  r = np.random.default_rng(seed)
  q, k, v = randn(r, (B, T, N, H), dtype), randn(r, (B, T, K, H), dtype), randn(r, (B, T, K, Hv), dtype)
  if gate == "beta":
    k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(dtype)
    return q, k, v, jnp.asarray(r.uniform(0.05, 1.0, (B, T, N)), dtype)
  shape = {"head": (N,), "token": (B, T, N), "channel": (B, T, N, H)}[gate]
  return q, k, v, jnp.asarray(-r.uniform(0.01, strength, shape), dtype)


def attend(kind):
  return linear.decayed_linear_attention if kind == "decayed" else linear.delta_rule_attention


def oracle(kind):
  return np_decayed if kind == "decayed" else np_delta


def slow_unless(condition, *values):
  return pytest.param(*values, marks=() if condition else pytest.mark.slow)


# ----------------------------------------------------------------------------------------------------------
# Forward: every form against the loops
# ----------------------------------------------------------------------------------------------------------


FORWARD = [("decayed", g) for g in GATES] + [("delta", "beta")]


@pytest.mark.parametrize("kind,gate,impl,chunk", [
    slow_unless((impl, chunk) == ("chunked", 16) or (impl, gate) in (("parallel", "channel"), ("parallel", "beta"),
                                                                     ("recurrent", "token")), kind, gate, impl, chunk)
    for kind, gate in FORWARD for impl in IMPLS for chunk in ((8, 16, 20, 64) if impl == "chunked" else (16,))])
def test_forms_match_the_recurrence(kind, gate, impl, chunk):
  """T = 37 (no chunk divides it), GQA 4 / 2, Hv != H; the output and the final state."""
  q, k, v, g = make(gate=gate)
  out, state = attend(kind)(q, k, v, g, chunk_size=chunk, implementation=impl, return_state=True)
  want, want_state = oracle(kind)(q, k, v, g)
  chex.assert_shape(out, (2, 37, 4, 5))
  assert out.dtype == jnp.float32 and state.dtype == jnp.float32
  assert_close(out, want, jnp.float32)
  assert_close(state, want_state, jnp.float32)


@pytest.mark.parametrize("kind,gate", [slow_unless(gate in ("channel", "beta"), kind, gate) for kind, gate in FORWARD])
def test_float64(kind, gate):
  with enable_x64():
    q, k, v, g = (x.astype(jnp.float64) for x in make(gate=gate, T=21, seed=1))
    for impl in IMPLS:
      out = attend(kind)(q, k, v, g, chunk_size=8, implementation=impl)
      assert out.dtype == jnp.float64
      assert_close(out, oracle(kind)(q, k, v, g)[0], jnp.float64, err_msg=impl)


@pytest.mark.parametrize("kind,gate", [slow_unless(gate in ("channel", "beta"), kind, gate) for kind, gate in FORWARD])
def test_bfloat16(kind, gate):
  q, k, v, g = make(gate=gate, T=29, dtype=jnp.bfloat16, strength=0.3)
  out = attend(kind)(q, k, v, g, chunk_size=8)
  assert out.dtype == jnp.bfloat16
  assert_close(out, oracle(kind)(q, k, v, g)[0], jnp.bfloat16)   # the oracle sees the same rounded inputs


def test_initial_state_and_handover():
  """Two calls handing the state over equal one call, and the oracle started from the same state."""
  for kind, gate in (("decayed", "channel"), ("delta", "beta")):
    q, k, v, g = make(gate=gate, T=30, seed=2)
    s0 = randn(np.random.default_rng(7), (2, 4, 8, 5))
    full = attend(kind)(q, k, v, g, initial_state=s0, chunk_size=8)
    assert_close(full, oracle(kind)(q, k, v, g, s0=np.asarray(s0))[0], err_msg=kind)
    g1, g2 = (g[:, :13], g[:, 13:])
    first, mid = attend(kind)(q[:, :13], k[:, :13], v[:, :13], g1, initial_state=s0, chunk_size=8,
                              return_state=True)
    second = attend(kind)(q[:, 13:], k[:, 13:], v[:, 13:], g2, initial_state=mid, chunk_size=8)
    assert_close(jnp.concatenate([first, second], axis=1), full, err_msg=kind)


def test_fixed_decay_per_head_is_retnet():
  """log_decay [N] equals the same decay spelled out per token, and a scale multiplies the output."""
  q, k, v, _ = make(gate="head", T=19)
  g = jnp.log(1 - 2.0 ** (-5.0 - jnp.arange(4)))    # RetNet's gamma per head
  per_token = jnp.broadcast_to(g, (2, 19, 4))
  a = linear.decayed_linear_attention(q, k, v, g, chunk_size=8, scale=0.5)
  assert_close(a, linear.decayed_linear_attention(q, k, v, per_token, chunk_size=8, scale=0.5))
  assert_close(a, np_decayed(q, k, v, np.asarray(g), scale=0.5)[0])


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("kind", "impl", "chunk"))
def _grads(q, k, v, g, s0, ct, *, kind, impl, chunk):
  def loss(q, k, v, g, s0):
    out, state = attend(kind)(q, k, v, g, initial_state=s0, chunk_size=chunk, implementation=impl, return_state=True)
    return (out * ct).sum() + (state * state).sum() * 0.1
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)


@pytest.mark.parametrize("kind,gate,impl", [
    slow_unless(impl == "chunked" and gate in ("channel", "beta"), kind, gate, impl)
    for kind, gate in FORWARD for impl in ("chunked", "parallel")])
def test_gradients_match_the_recurrent_form(kind, gate, impl):
  """d/d(q, k, v, log_decay or beta, initial_state) of the output and the final state."""
  q, k, v, g = make(gate=gate, T=27, seed=3)
  s0 = randn(np.random.default_rng(8), (2, 4, 8, 5))
  ct = randn(np.random.default_rng(9), (2, 27, 4, 5))
  got = _grads(q, k, v, g, s0, ct, kind=kind, impl=impl, chunk=8)
  want = _grads(q, k, v, g, s0, ct, kind=kind, impl="recurrent", chunk=8)
  chex.assert_tree_all_finite(got)
  for name, a, b in zip(("dq", "dk", "dv", "dgate", "dstate"), got, want):
    assert a.shape == b.shape, name
    assert_close(a, b, jnp.float32, kind="grad", err_msg=name)


@pytest.mark.parametrize("kind,gate", [("decayed", "channel"), ("delta", "beta")])
def test_gradient_against_finite_differences_of_the_loops(kind, gate):
  """The chunked form's derivative along a random direction of every input equals central differences of the
  float64 loops (an oracle independent of any JAX code)."""
  with enable_x64():
    q, k, v, g = (x.astype(jnp.float64) for x in make(B=1, T=11, N=2, K=1, H=4, Hv=3, gate=gate, seed=4))
    r = np.random.default_rng(5)
    ct = r.standard_normal((1, 11, 2, 3))
    dirs = [r.standard_normal(x.shape) for x in (q, k, v, g)]
    f = lambda q, k, v, g: (attend(kind)(q, k, v, g, chunk_size=4) * ct).sum()
    grads = jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, g)
    eps = 1e-6
    for i, (grad, d) in enumerate(zip(grads, dirs)):
      args = [np.asarray(x) for x in (q, k, v, g)]
      plus, minus = list(args), list(args)
      plus[i], minus[i] = args[i] + eps * d, args[i] - eps * d
      fd = ((oracle(kind)(*plus)[0] * ct).sum() - (oracle(kind)(*minus)[0] * ct).sum()) / (2 * eps)
      np.testing.assert_allclose(float((np.asarray(grad) * d).sum()), fd, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------
# Decoding steps
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,gate", [slow_unless(gate in ("channel", "beta"), kind, gate) for kind, gate in FORWARD])
def test_steps_equal_the_chunked_form(kind, gate):
  q, k, v, g = make(gate=gate, T=13, seed=6)
  step = linear.decayed_linear_attention_step if kind == "decayed" else linear.delta_rule_attention_step
  g_t = g if g.ndim == 1 else jnp.moveaxis(g, 1, 0)

  def body(state, xs):
    q_t, k_t, v_t, gt = xs
    return step(state, q_t, k_t, v_t, g if g.ndim == 1 else gt)
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v)) + (g_t if g.ndim > 1 else jnp.zeros(13),)
  state, outs = jax.lax.scan(body, jnp.zeros((2, 4, 8, 5)), xs)
  want, want_state = attend(kind)(q, k, v, g, chunk_size=4, return_state=True)
  assert_close(jnp.moveaxis(outs, 0, 1), want)
  assert_close(state, want_state)


# ----------------------------------------------------------------------------------------------------------
# Stability, causality, transformations
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", (pytest.param("token", marks=pytest.mark.slow), "channel"))
def test_strong_decay_is_stable(gate):
  """Per-step log decays down to -60 (about -1900 summed over a chunk of 64): exp of a prefix sum's negation would
  overflow float32, and differences of prefix sums would lose the small per-step sums to cancellation; the chunked
  form stays finite and equals the loops, gradients finite."""
  q, k, v, g = make(gate=gate, T=70, strength=60.0, seed=7)
  out = linear.decayed_linear_attention(q, k, v, g, chunk_size=64)
  assert_close(out, np_decayed(q, k, v, g)[0])
  ct = jnp.ones_like(out)
  chex.assert_tree_all_finite(jax.grad(lambda g: (linear.decayed_linear_attention(q, k, v, g) * ct).sum())(g))


NON_FINITE = (("decayed", "channel"), ("decayed", "head"), ("delta", "beta"))


@pytest.mark.parametrize("kind,gate,impl", [slow_unless(impl == "chunked" and gate != "head", kind, gate, impl)
                                            for kind, gate in NON_FINITE for impl in ("chunked", "parallel")])
def test_non_finite_input_never_reaches_earlier_positions(kind, gate, impl):
  """A NaN key and an Inf value at position 21 (mid-chunk): outputs before 21 are unchanged, those from 21 on are
  NaN; gradients of a loss on the earlier outputs stay finite."""
  q, k, v, g = make(gate=gate, T=30, seed=8)
  clean = attend(kind)(q, k, v, g, chunk_size=16, implementation=impl)
  k_bad, v_bad = k.at[0, 21, 0, 3].set(jnp.nan), v.at[1, 21, 1, 0].set(jnp.inf)
  out = attend(kind)(q, k_bad, v_bad, g, chunk_size=16, implementation=impl)
  np.testing.assert_array_equal(np.asarray(out[:, :21]), np.asarray(clean[:, :21]))
  assert bool(jnp.all(jnp.isnan(out[0, 21:, :2]))) and bool(jnp.all(jnp.isnan(out[1, 21:, 2:])))
  np.testing.assert_array_equal(np.asarray(out[0, 21:, 2:]), np.asarray(clean[0, 21:, 2:]))   # other heads
  early = lambda q, k, v: attend(kind)(q, k, v, g, chunk_size=16, implementation=impl)[:, :21].sum()
  chex.assert_tree_all_finite(jax.grad(early, argnums=(0, 1, 2))(q, k_bad, v_bad))


def test_causality_via_gradients():
  for kind, gate in (("decayed", "channel"), ("delta", "beta")):
    q, k, v, g = make(gate=gate, T=20, seed=9)
    for i in (9, 19):
      f = lambda k, v, g: attend(kind)(q, k, v, g, chunk_size=8)[:, i].sum()
      dk, dv, dg = jax.grad(f, argnums=(0, 1, 2))(k, v, g)
      for name, d in (("dk", dk), ("dv", dv), ("dg", dg)):
        np.testing.assert_array_equal(np.asarray(d)[:, i + 1:], 0.0, err_msg=f"{kind} {name} {i}")
      assert float(jnp.abs(dv[:, :i + 1]).sum()) > 0.0


def test_jit_vmap_and_empty():
  q, k, v, g = make(gate="channel", T=12)
  f = jax.jit(lambda q, k, v, g: linear.decayed_linear_attention(q, k, v, g, chunk_size=4))
  assert_close(f(q, k, v, g), np_decayed(q, k, v, g)[0])
  batched = jax.vmap(f)(jnp.stack([q, -q]), jnp.stack([k, k]), jnp.stack([v, v]), jnp.stack([g, g]))
  assert_close(batched[1], np_decayed(-q, k, v, g)[0])
  q, k, v, b = make(gate="beta", T=0)
  out, state = linear.delta_rule_attention(q, k, v, b, return_state=True)
  chex.assert_shape(out, (2, 0, 4, 5))
  np.testing.assert_array_equal(np.asarray(state), 0.0)


@pytest.mark.slow   # 12 s of compiles; CI keeps the forms' correctness, this checks their memory
def test_chunked_memory_grows_linearly():
  """The chunked forms keep O(T / C) states and chunk-local matrices: fwd+bwd temporaries grow linearly in T."""
  def temp_bytes(T, kind):
    x = jax.ShapeDtypeStruct((1, T, 1, 64), jnp.float32)
    gate = jax.ShapeDtypeStruct((1, T, 1, 64) if kind == "decayed" else (1, T, 1), jnp.float32)
    f = lambda q, k, v, g: attend(kind)(q, k, v, g).sum()
    mem = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))).lower(x, x, x, gate).compile().memory_analysis()
    if mem is None:
      pytest.skip("this backend reports no compiled memory")
    return mem.temp_size_in_bytes
  for kind in ("decayed", "delta"):
    small, large = temp_bytes(1024, kind), temp_bytes(4096, kind)
    assert large < 4 * small * 1.3, (kind, small, large)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_bad_input_names_the_shapes():
  q, k, v, g = make(gate="channel", T=6)
  _, _, _, beta = make(gate="beta", T=6)
  bad = [
      (lambda: linear.decayed_linear_attention(q, k, v, g[..., :3]), "log_decay"),
      (lambda: linear.decayed_linear_attention(q, k, v, jnp.zeros(3)), "log_decay"),
      (lambda: linear.delta_rule_attention(q, k, v, g), "beta"),
      (lambda: linear.decayed_linear_attention(q, k[:, :5], v[:, :5], g), "key.shape=(2, 5, 2, 8)"),
      (lambda: linear.decayed_linear_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), g),
       "multiple of the kv heads"),
      (lambda: linear.decayed_linear_attention(q[0], k[0], v[0], g[0]), "rank 4"),
      (lambda: linear.decayed_linear_attention(q.astype(jnp.int32), k, v, g), "query.dtype=int32"),
      (lambda: linear.decayed_linear_attention(q, k.astype(jnp.bfloat16), v, g), "share one dtype"),
      (lambda: linear.delta_rule_attention(q, k, v, beta, chunk_size=0), "chunk_size"),
      (lambda: linear.delta_rule_attention(q, k, v, beta, implementation="fast"), "implementation"),
      (lambda: linear.delta_rule_attention(q, k, v, beta, initial_state=jnp.zeros((2, 4, 8, 8))), "initial_state"),
      (lambda: linear.delta_rule_attention_step(jnp.zeros((2, 4, 8, 5)), q[:, 0], k[:, 0], v[:, 0], beta),
       "beta_t"),
      (lambda: linear.decayed_linear_attention_step(jnp.zeros((2, 4, 8, 4)), q[:, 0], k[:, 0], v[:, 0], g[:, 0]),
       "state must be"),
  ]
  for call, words in bad:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
      call()


def test_forward_mode_agrees():
  """Plain JAX autodiff: jvp of the chunked form equals jvp of the recurrence (no custom VJP in the way)."""
  with enable_x64():
    for kind, gate in (("decayed", "channel"), ("delta", "beta")):
      args = tuple(x.astype(jnp.float64) for x in make(B=1, T=10, N=2, K=1, H=4, Hv=3, gate=gate, seed=10))
      tangents = tuple(randn(np.random.default_rng(i), x.shape, jnp.float64) for i, x in enumerate(args))
      f = lambda impl: lambda *a: attend(kind)(*a, chunk_size=4, implementation=impl)
      assert_close(jax.jvp(f("chunked"), args, tangents)[1], jax.jvp(f("recurrent"), args, tangents)[1],
                   jnp.float64, err_msg=kind)
