"""Decayed (RetNet, GLA) and delta-rule (DeltaNet) linear attention: chunked, parallel and recurrent forms.

Both are causal linear recurrences over one matrix state ``S_t [H, Hv]`` per (batch, query head), unnormalised::

    decayed:    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ                     o_t = scale · S_tᵀ q_t
    delta rule: S_t = S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ k_t)ᵀ               o_t = scale · S_tᵀ q_t

``g = log_decay`` is ``[N]`` (one fixed decay per head, RetNet: ``log(1 − 2^(−5−n))``), ``[B, T, N]`` (a gate per
token and head) or ``[B, T, N, H]`` (one per key channel, GLA: ``logsigmoid(x W) / 16``). Decays are meant to be
``<= 1`` (``g <= 0``; finite: there is no hard reset); ``scale`` defaults to ``1/√H``. The delta rule's ``β``
(``[B, T, N]``, usually a sigmoid) is the write strength; its keys should be L2-normalised by the caller (then
``I − β k kᵀ`` is a contraction for ``0 <= β <= 2``). Every array is differentiable, ``log_decay`` and ``β``
included.

Forms (``implementation=``), equal up to rounding:

* ``"chunked"`` (default, training): the sequence is cut into chunks of ``C`` tokens. Inside a chunk a quadratic
  form, across chunks the state at chunk boundaries.

  - decayed: with ``g(j, i] = Σ_{j<t<=i} g_t`` (positions inside the chunk), ``o_i = (q_i ⊙ e^{g(0, i]})ᵀ S_0 +
    Σ_{j<=i} (Σ_h q_ih k_jh e^{g(j, i]_h}) v_j`` and ``S_C = e^{g(0, C]} ⊙ S_0 + Σ_j (k_j ⊙ e^{g(j, C]}) v_jᵀ``.
    Every exponent is a sum of log decays over a forward interval, so with decays ``<= 1`` no factor exceeds 1
    however strong the decay (the form is stable in log space), and each is summed directly, never as a
    difference of prefix sums (which cancellation would spoil); masked pairs become ``-inf`` before the ``exp``.
    A scalar decay gives a ``[C, C]`` decay matrix (RetNet's chunkwise form); a per-channel decay is split again
    into sub-chunks of 8: pairs in different sub-chunks factor through the key sub-chunk's last position (both
    factors ``<= 1``), pairs inside one sub-chunk use the full ``[8, 8, H]`` exponent. The state recurrence
    across chunks is elementwise (a scan over ``T / C`` steps); all matmuls run for every chunk at once.
  - delta rule: the WY / UT representation (Yang et al. 2024). Inside a chunk ``S_r = S_0 + Σ_{i<=r} k_i
    (u_i − S_0ᵀ w_i)ᵀ`` where ``W = (I + A)^{-1} diag(β) K`` and ``U = (I + A)^{-1} diag(β) V`` with
    ``A = strictly_lower(diag(β) K Kᵀ)`` (the unit-lower-triangular inverse by blocked matrix products, all
    chunks at once), so
    ``o = Q S_0 + tril(Q Kᵀ) (U − W S_0)`` and ``S_C = (I − Kᵀ W) S_0 + Kᵀ U``: the chunk transitions
    ``I − Kᵀ W`` and inputs ``Kᵀ U`` are formed for all chunks at once, the scan over ``T / C`` chunks carries one
    ``[H, H] x [H, Hv]`` product each (not a scan over T), and the outputs follow for all chunks at once.

  Plain JAX, differentiated by JAX (no custom VJP): the backward keeps the chunk-boundary states (``T / C`` of
  ``[H, Hv]``) and the chunk-local matrices, O(T·(C + H·Hv / C)) per head. ``T`` need not divide by ``C``.
* ``"parallel"``: the quadratic form over the whole sequence (decayed: the ``[T, T]`` or ``[T, T, H]`` decay
  exponents; delta rule: one chunk of T, i.e. a ``T x T`` triangular solve). O(T²) memory; for short sequences
  and as a check.
* ``"recurrent"``: the token-by-token recurrence above (a ``lax.scan`` over T of the ``*_step`` function); this is
  what ``*_reference`` computes.

GQA: ``key`` / ``value`` may have ``K`` heads with ``N % K == 0``; query head ``n`` reads kv head ``n // (N // K)``.
Decays and ``β`` are per query head, so the state is per query head (``[B, N, H, Hv]``). The value head dim
``Hv`` may differ from ``H``. States and sums run in float32 (float64 for float64 inputs); the output has the
input dtype. ``initial_state`` / ``return_state`` continue or hand over the recurrence (``[B, N, H, Hv]``);
:func:`decayed_linear_attention_step` / :func:`delta_rule_attention_step` decode one token.

**Non-finite input.** The recurrence is causal: a NaN or Inf in ``key``, ``value``, ``log_decay`` or ``β`` at
position ``t`` reaches every output ``>= t`` of its head (those come out NaN in the chunked and parallel forms)
and never an output before ``t``: those inputs are read through a select, so a later position's garbage never
meets a zero weight (``0 · NaN``) in a chunk's matmul. A non-finite query affects only its own output.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax import _numerics

# Chunk length of the chunked forms (a multiple of the per-channel sub-chunk).
DEFAULT_CHUNK_SIZE = 64
# Sub-chunk of the per-channel (GLA) decay: pairs inside one sub-chunk carry a [SUB, SUB, H] exponent. By
# measurement (GLA fwd+bwd, T = 16384, H = 64, chunk 64, 2-core CPU): sub-chunks of 4 / 8 / 16 / 32 -> 405 / 320-360 /
# 415 / 909 ms.
SUB_CHUNK = 8
IMPLEMENTATIONS = ("chunked", "parallel", "recurrent")


# ----------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------


class _Inputs(NamedTuple):
  q: jax.Array        # [X, T, H]   X = B * N, head-major, compute dtype
  k: jax.Array        # [X, T, H]   (kv heads repeated to the query heads)
  v: jax.Array        # [X, T, Hv]
  gate: jax.Array     # [X, T, E]   log_decay (E = 1 or H) or beta (E = 1)
  state: jax.Array    # [X, H, Hv]
  scale: jax.Array    # [] compute dtype


def _shapes(**arrays) -> str:
  return " ".join(f"{n}.shape={tuple(np.shape(x))}" for n, x in arrays.items() if x is not None)


def _check_chunk_size(fn: str, chunk_size) -> int:
  if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
    raise ValueError(f"{fn}: chunk_size must be a positive int; got chunk_size={chunk_size!r}")
  return int(chunk_size)


def _check_implementation(fn: str, implementation) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{fn}: implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
  return implementation


def _check_float(fn: str, described: str, **arrays) -> None:
  for name, x in arrays.items():
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{fn}: {name} must be a real floating-point array; got {name}.dtype={x.dtype} ({described})")


def _gate_BTNE(fn: str, gate, name: str, B: int, T: int, N: int, H: int, per_channel: bool, described: str):
  """``log_decay`` / ``beta`` as ``[B, T, N, E]`` (E = 1, or H for a per-channel decay)."""
  shape = gate.shape
  if name == "log_decay" and shape == (N,):
    return jnp.broadcast_to(gate[None, None, :, None], (B, T, N, 1))
  if shape == (B, T, N):
    return gate[..., None]
  if per_channel and shape == (B, T, N, H):
    return gate
  allowed = f"[N] = {(N,)}, [B, T, N] = {(B, T, N)} or [B, T, N, H] = {(B, T, N, H)}" if per_channel else \
      f"[B, T, N] = {(B, T, N)}"
  raise ValueError(f"{fn}: {name} must be {allowed}; got {described}")


def _prepare(fn: str, query, key, value, gate, gate_name: str, scale, initial_state) -> tuple[_Inputs, tuple]:
  query, key, value, gate = (jnp.asarray(x) for x in (query, key, value, gate))
  initial_state = None if initial_state is None else jnp.asarray(initial_state)
  described = _shapes(query=query, key=key, value=value, **{gate_name: gate}, initial_state=initial_state)
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(f"{fn}: query must be [B, T, N, H] and key / value [B, T, K, H] / [B, T, K, Hv] (rank 4; "
                     f"use jax.vmap for other ranks); got {described}")
  B, T, N, H = query.shape
  K, Hv = key.shape[2], value.shape[3]
  if key.shape[:2] != (B, T) or value.shape[:3] != key.shape[:3] or key.shape[3] != H:
    raise ValueError(f"{fn}: key and value must have query's B and T (self-attention recurrence), key query's "
                     f"head dim H, and value key's heads; got {described}")
  if K == 0 or N % K:
    raise ValueError(f"{fn}: the number of query heads N={N} must be a multiple of the kv heads K={K}; got "
                     f"{described}")
  _check_float(fn, described, query=query, key=key, value=value, **{gate_name: gate}, initial_state=initial_state)
  if len({query.dtype, key.dtype, value.dtype}) > 1:
    raise ValueError(f"{fn}: query, key and value must share one dtype; got query.dtype={query.dtype} "
                     f"key.dtype={key.dtype} value.dtype={value.dtype}")
  gate = _gate_BTNE(fn, gate, gate_name, B, T, N, H, gate_name == "log_decay", described)
  if initial_state is not None and initial_state.shape != (B, N, H, Hv):
    raise ValueError(f"{fn}: initial_state must be [B, N, H, Hv] = {(B, N, H, Hv)}; got {described}")
  cd = _numerics.compute_dtype(query.dtype)
  if scale is None:
    scale = H ** -0.5 if H else 1.0
  G = N // K

  def head_major(x, repeat):   # [B, T, heads, D] -> [B * N, T, D]
    x = x.astype(cd)
    if repeat > 1:
      x = jnp.repeat(x, repeat, axis=2)
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(B * N, T, x.shape[-1])

  state = (jnp.zeros((B * N, H, Hv), cd) if initial_state is None
           else initial_state.astype(cd).reshape(B * N, H, Hv))
  inputs = _Inputs(head_major(query, 1), head_major(key, G), head_major(value, G), head_major(gate, 1), state,
                   jnp.asarray(scale, cd))
  return inputs, (B, T, N, Hv, query.dtype)


def _finish(out_XTE, state_XHE, dims, return_state: bool):
  B, T, N, Hv, dtype = dims
  out = jnp.transpose(out_XTE.reshape(B, N, T, Hv), (0, 2, 1, 3)).astype(dtype)
  if return_state:
    return out, state_XHE.reshape(B, N, state_XHE.shape[-2], Hv)
  return out


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def _causal_clean(k, v, gate):
  """Non-finite keys, values and gates replaced by 0 with a select, and the flag of the positions at or after a
  head's first non-finite one (their outputs become NaN): a later position's garbage never meets a zero weight."""
  bad_XT = ~(_numerics.finite_rows(k) & _numerics.finite_rows(v) & _numerics.finite_rows(gate))
  after_bad_XT = jnp.cumsum(bad_XT.astype(jnp.int32), axis=1) > 0
  return _numerics.clean(k), _numerics.clean(v), _numerics.clean(gate), after_bad_XT


def _poison(out_XTE, after_bad_XT):
  return jnp.where(after_bad_XT[..., None], jnp.full_like(out_XTE, jnp.nan), out_XTE)


def _pad_time(x: jax.Array, size: int) -> jax.Array:
  return _numerics.pad_axis(x, 1, size)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """``[X, T, D] -> [X, T / C, C, D]``."""
  X, T, D = x.shape
  return x.reshape(X, T // chunk, chunk, D)


def _lower(n: int, strict: bool = False) -> jax.Array:
  """``[n, n]`` bool: ``j <= i`` (``j < i`` when strict)."""
  i = jnp.arange(n)
  return (i[None, :] < i[:, None]) if strict else (i[None, :] <= i[:, None])


def _mm(spec: str, a, b):
  cd = a.dtype
  return jnp.einsum(spec, a, b, precision=_numerics.matmul_precision(cd), preferred_element_type=cd)


# ----------------------------------------------------------------------------------------------------------
# Decayed linear attention (RetNet, GLA)
# ----------------------------------------------------------------------------------------------------------


def _segment_sums(g: jax.Array) -> jax.Array:
  """``g [..., L, E] -> [..., L(i), L(j), E]``: ``Σ_{j < t <= i} g_t`` where ``j <= i``, ``-inf`` elsewhere.

  Each entry is summed directly (a cumulative sum over a masked copy), never as a difference of two prefix sums,
  which would lose the small sums of strongly decaying sequences to cancellation."""
  L = g.shape[-2]
  t_after_j = _lower(L, strict=True)[:, :, None]                          # [t, j, 1]: t > j
  x = jnp.where(t_after_j, g[..., :, None, :], 0.0)                       # [..., t, j, E]
  return jnp.where(_lower(L)[:, :, None], jnp.cumsum(x, axis=-3), -jnp.inf)


def _sums_after(g: jax.Array, axis: int) -> jax.Array:
  """``Σ_{t > j} g_t`` along ``axis`` (the exclusive reverse cumulative sum, each a direct sum)."""
  inclusive = jnp.flip(jnp.cumsum(jnp.flip(g, axis), axis), axis)
  rest = lax.slice_in_dim(inclusive, 1, g.shape[axis], axis=axis)
  return jnp.concatenate([rest, jnp.zeros_like(lax.slice_in_dim(g, 0, 1, axis=axis))], axis=axis)


def _weighted_scores(q, k, e):
  """``a_ij = Σ_h q_ih k_jh exp(e_ijh)`` (``e [..., i, j, E]``, E = 1 or H)."""
  if e.shape[-1] == 1:
    return _mm("...ih,...jh->...ij", q, k) * jnp.exp(e[..., 0])
  return jnp.einsum("...ih,...jh,...ijh->...ij", q, k, jnp.exp(e), precision=_numerics.matmul_precision(q.dtype))


def _intra_scalar(q, k, v, g):
  """Inside each chunk, a scalar decay ``g [..., C, 1]``: ``((Q Kᵀ) ⊙ exp(Σ_{j<t<=i} g_t)[j <= i]) V``."""
  a = jnp.where(_lower(q.shape[-2]), _weighted_scores(q, k, _segment_sums(g)), 0.0)
  return _mm("...ij,...je->...ie", a, v)


def _intra_channel(q, k, v, g, sub: int):
  """Inside each chunk, a per-channel decay ``g [..., C, H]``, through sub-chunks of ``sub`` tokens."""
  *lead, C, H = q.shape
  m = C // sub
  qs, ks, gs = (x.reshape(*lead, m, sub, H) for x in (q, k, g))
  # Pairs inside one sub-chunk: the full exponent [sub, sub, H].
  diag = jnp.where(_lower(sub), _weighted_scores(qs, ks, _segment_sums(gs)), 0.0)   # [..., m, s, s]
  # Pairs in sub-chunks I > J factor through the end of J: exp(Σ_(end J, i] g) · exp(Σ_(j, end J] g), both <= 1.
  # Σ_(end J, i] = Σ over the whole sub-chunks between J and I + Σ_(start I, i] (direct sums).
  totals = jnp.sum(gs, axis=-2)                                                       # [..., m, H]
  between = _segment_sums(totals)                                                     # Σ_{J < L <= I}
  between = jnp.concatenate([jnp.full_like(between[..., :1, :, :], -jnp.inf), between[..., :-1, :, :]], axis=-3)
  later = _lower(m, strict=True)[:, :, None]                                          # I > J; Σ_{J < L < I}
  q_exp = jnp.where(later[:, None], jnp.cumsum(gs, axis=-2)[..., :, :, None, :] + between[..., :, None, :, :],
                    -jnp.inf)                                                         # [..., m(I), s, m(J), H]
  q_hat = qs[..., :, :, None, :] * jnp.exp(q_exp)
  k_hat = ks * jnp.exp(_sums_after(gs, axis=-2))                                      # [..., m(J), s, H]
  off = jnp.where(later[:, None], _mm("...isjh,...jth->...isjt", q_hat, k_hat), 0.0)  # [..., m, s, m, s]
  a = (off + jnp.einsum("...iab,ij->...iajb", diag, jnp.eye(m, dtype=diag.dtype))).reshape(*lead, C, C)
  return _mm("...ij,...je->...ie", a, v)


def _state_scan(decay_last, contrib, state0):
  """States at chunk starts for ``S_{c+1} = decay_c ⊙ S_c + contrib_c`` (elementwise; decay ``[X, n, E, 1]``)."""
  def step(s, xs):
    a, c = xs
    return a * s + c, s
  final, starts = lax.scan(step, state0, (jnp.swapaxes(decay_last, 0, 1), jnp.swapaxes(contrib, 0, 1)))
  return jnp.swapaxes(starts, 0, 1), final


@functools.partial(jax.jit, static_argnames=("chunk",))
def _decayed_chunked(inp: _Inputs, *, chunk: int):
  q, k, v, g, s0, scale = inp
  k, v, g, after_bad = _causal_clean(k, v, g)
  X, T, H = q.shape
  E = g.shape[-1]
  C = chunk if E == 1 else _numerics.round_up(chunk, min(SUB_CHUNK, chunk))
  Tp = _numerics.round_up(T, C)
  q, k, v, g = (_chunks(_pad_time(x, Tp), C) for x in (q, k, v, g))     # [X, n, C, D]; padding: no key, decay 1
  # Across chunks: S_{c+1} = e^{g(0, C]} ⊙ S_c + Σ_j (k_j ⊙ e^{g(j, C]}) v_jᵀ; o_i += (q_i ⊙ e^{g(0, i]}) S_c.
  contrib = _mm("xnch,xnce->xnhe", k * jnp.exp(_sums_after(g, axis=2)), v)
  decay_chunk = jnp.exp(jnp.sum(g, axis=2))[..., None]                   # [X, n, E, 1]
  starts, final = _state_scan(decay_chunk, contrib, s0)                  # [X, n, H, Hv]
  o = _mm("xnch,xnhe->xnce", q * jnp.exp(jnp.cumsum(g, axis=2)), starts)
  if E == 1:
    o = o + _intra_scalar(q, k, v, g)
  else:
    o = o + _intra_channel(q, k, v, g, min(SUB_CHUNK, C))
  o = o.reshape(X, Tp, -1)[:, :T] * scale
  return _poison(o, after_bad), final


@jax.jit
def _decayed_parallel(inp: _Inputs):
  q, k, v, g, s0, scale = inp
  k, v, g, after_bad = _causal_clean(k, v, g)
  a = jnp.where(_lower(q.shape[1]), _weighted_scores(q, k, _segment_sums(g)), 0.0)
  o = _mm("xij,xje->xie", a, v) + _mm("xth,xhe->xte", q * jnp.exp(jnp.cumsum(g, axis=1)), s0)
  final = (jnp.exp(jnp.sum(g, axis=1))[..., None] * s0
           + _mm("xth,xte->xhe", k * jnp.exp(_sums_after(g, axis=1)), v))
  return _poison(o * scale, after_bad), final


def _decayed_update(s, k_t, v_t, g_t):
  """``S = diag(exp(g)) S + k vᵀ``: s ``[X, H, Hv]``, k ``[X, H]``, v ``[X, Hv]``, g ``[X, E]``."""
  return jnp.exp(g_t)[:, :, None] * s + k_t[:, :, None] * v_t[:, None, :]


def _readout(s, q_t, scale):
  return _mm("xh,xhe->xe", q_t, s) * scale


def _token_scan(update, inp: _Inputs):
  """The recurrence one token at a time: ``S = update(S, k_t, v_t, gate_t)``, then ``o_t = scale · Sᵀ q_t``."""
  q, k, v, gate, s0, scale = inp

  def step(s, xs):
    q_t, k_t, v_t, gate_t = xs
    s = update(s, k_t, v_t, gate_t)
    return s, _readout(s, q_t, scale)
  final, o = lax.scan(step, s0, tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, gate)))
  return jnp.swapaxes(o, 0, 1), final


_decayed_recurrent = jax.jit(functools.partial(_token_scan, _decayed_update))


def decayed_linear_attention(query, key, value, log_decay, *, scale=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                             initial_state=None, return_state: bool = False, implementation: str = "chunked"):
  """Causal decayed linear attention (RetNet, GLA): ``S_t = diag(exp(g_t)) S_{t−1} + k_t v_tᵀ``,
  ``o_t = scale · S_tᵀ q_t`` (see the module docstring).

  Args:
    query: ``[B, T, N, H]``; key: ``[B, T, K, H]``; value: ``[B, T, K, Hv]`` (``N % K == 0``).
    log_decay: ``g``, the log of the decay (``<= 0``, finite): ``[N]`` fixed per head (RetNet), ``[B, T, N]`` per
      token and head, or ``[B, T, N, H]`` per key channel (GLA). Differentiable.
    scale: multiplies the output (default ``1/√H``).
    chunk_size: chunk length C of the chunked form (per-channel decays round it up to a multiple of 8).
    initial_state: ``[B, N, H, Hv]`` state before the first token (default zeros).
    return_state: also return the state after the last token, ``[B, N, H, Hv]`` (float32; float64 for float64).
    implementation: ``"chunked"``, ``"parallel"`` (O(T²)) or ``"recurrent"`` (the token recurrence).

  Returns:
    ``[B, T, N, Hv]`` in the input dtype, or ``(out, final_state)`` with ``return_state``.
  """
  fn = "decayed_linear_attention"
  impl = _check_implementation(fn, implementation)
  chunk = _check_chunk_size(fn, chunk_size)
  inp, dims = _prepare(fn, query, key, value, log_decay, "log_decay", scale, initial_state)
  if 0 in inp.q.shape or 0 in inp.v.shape:
    out, final = jnp.zeros(inp.q.shape[:2] + inp.v.shape[-1:], inp.q.dtype), inp.state
  elif impl == "chunked":
    out, final = _decayed_chunked(inp, chunk=chunk)
  elif impl == "parallel":
    out, final = _decayed_parallel(inp)
  else:
    out, final = _decayed_recurrent(inp)
  return _finish(out, final, dims, return_state)


def decayed_linear_attention_reference(query, key, value, log_decay, *, scale=None, chunk_size=None,
                                       initial_state=None, return_state: bool = False):
  """The token-by-token recurrence (``implementation="recurrent"``; ``chunk_size`` is ignored)."""
  del chunk_size
  return decayed_linear_attention(query, key, value, log_decay, scale=scale, initial_state=initial_state,
                                  return_state=return_state, implementation="recurrent")


# ----------------------------------------------------------------------------------------------------------
# Delta rule (DeltaNet)
# ----------------------------------------------------------------------------------------------------------


# Unit lower-triangular blocks up to this size are inverted by a product of matrix squares.
_NEUMANN_BLOCK = 16


@jax.custom_jvp
def _unit_lower_inverse(a: jax.Array) -> jax.Array:
  """``(I + a)^{-1}`` for strictly lower-triangular ``a [..., n, n]``, from batched matmuls only.

  Blocks of up to 16 use the finite Neumann series ``Σ_{j<n} (−a)^j = (I − a)(I + a²)(I + a⁴)...`` (``a`` is
  nilpotent); larger ones split in two, ``[[A, 0], [B, D]]^{-1} = [[A⁻¹, 0], [−D⁻¹ B A⁻¹, D⁻¹]]``. On CPU this is
  several times faster than XLA's batched triangular solve for the chunk sizes used here, and it differentiates
  as matmuls."""
  n = a.shape[-1]
  eye = jnp.eye(n, dtype=a.dtype).reshape((1,) * (a.ndim - 2) + (n, n))
  if n <= _NEUMANN_BLOCK:
    power, inverse, covered = -a, eye - a, 2
    while covered < n:
      power = _mm("...ij,...jk->...ik", power, power)
      inverse = inverse + _mm("...ij,...jk->...ik", inverse, power)
      covered *= 2
    return inverse
  h = n // 2
  top, bottom = _unit_lower_inverse(a[..., :h, :h]), _unit_lower_inverse(a[..., h:, h:])
  corner = -_mm("...ij,...jk->...ik", bottom, _mm("...ij,...jk->...ik", a[..., h:, :h], top))
  upper = jnp.concatenate([top, jnp.zeros(top.shape[:-1] + (n - h,), a.dtype)], axis=-1)
  return jnp.concatenate([upper, jnp.concatenate([corner, bottom], axis=-1)], axis=-2)


@_unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
  """``d(L⁻¹) = −L⁻¹ dL L⁻¹``: two matmuls (and, transposed by JAX, two in the backward) instead of
  differentiating every product of the blocked inverse."""
  (a,), (da,) = primals, tangents
  inverse = _unit_lower_inverse(a)
  return inverse, -_mm("...ij,...jk->...ik", inverse, _mm("...ij,...jk->...ik", da, inverse))


def _wy(k, v, beta):
  """Per chunk: ``W = (I + A)^{-1} diag(β) K`` and ``U = (I + A)^{-1} diag(β) V``, ``A = strictly_lower(diag(β) K Kᵀ)``.

  k ``[..., C, H]``, v ``[..., C, Hv]``, beta ``[..., C, 1]``.
  """
  C, H = k.shape[-2:]
  a = jnp.where(_lower(C, strict=True), beta * _mm("...ih,...jh->...ij", k, k), 0.0)
  wu = _mm("...ij,...je->...ie", _unit_lower_inverse(a), beta * jnp.concatenate([k, v], axis=-1))
  return wu[..., :H], wu[..., H:]


@functools.partial(jax.jit, static_argnames=("chunk",))
def _delta_chunked(inp: _Inputs, *, chunk: int):
  q, k, v, beta, s0, scale = inp
  k, v, beta, after_bad = _causal_clean(k, v, beta)
  X, T, H = q.shape
  C = min(chunk, T)
  Tp = _numerics.round_up(T, C)
  q, k, v, beta = (_chunks(_pad_time(x, Tp), C) for x in (q, k, v, beta))   # padding: β = 0, k = 0 (no update)
  w, u = _wy(k, v, beta)                                                      # [X, n, C, H], [X, n, C, Hv]
  # S_{c+1} = S_c + K_cᵀ (U_c − W_c S_c) = (I − K_cᵀ W_c) S_c + K_cᵀ U_c: the transition and the input of every
  # chunk are formed for all chunks at once, so the scan carries one [H, H] x [H, Hv] product per chunk.
  transition = jnp.eye(H, dtype=q.dtype)[None, None] - _mm("xnch,xncg->xnhg", k, w)   # [X, n, H, H]
  inputs = _mm("xnch,xnce->xnhe", k, u)                                       # [X, n, H, Hv]

  def step(s, xs):   # s [X, H, Hv]
    a, b = xs
    return _mm("xhg,xge->xhe", a, s) + b, s
  final, starts = lax.scan(step, s0, (jnp.swapaxes(transition, 0, 1), jnp.swapaxes(inputs, 0, 1)))
  starts = jnp.swapaxes(starts, 0, 1)                                         # [X, n, H, Hv]: S at chunk starts
  qk = jnp.where(_lower(C), _mm("xnih,xnjh->xnij", q, k), 0.0)
  u_new = u - _mm("xnch,xnhe->xnce", w, starts)                               # U − W S_0, per chunk
  o = _mm("xnch,xnhe->xnce", q, starts) + _mm("xnij,xnje->xnie", qk, u_new)
  o = o.reshape(X, Tp, -1)[:, :T] * scale
  return _poison(o, after_bad), final


def _delta_update(s, k_t, v_t, beta_t):
  """``S = S + β k (v − Sᵀ k)ᵀ``: s ``[X, H, Hv]``, k ``[X, H]``, v ``[X, Hv]``, beta ``[X, 1]``."""
  err = v_t - _mm("xh,xhe->xe", k_t, s)
  return s + (beta_t * k_t)[:, :, None] * err[:, None, :]


_delta_recurrent = jax.jit(functools.partial(_token_scan, _delta_update))


def delta_rule_attention(query, key, value, beta, *, scale=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         initial_state=None, return_state: bool = False, implementation: str = "chunked"):
  """Causal delta-rule attention (DeltaNet): ``S_t = S_{t−1} + β_t k_t (v_t − S_{t−1}ᵀ k_t)ᵀ``,
  ``o_t = scale · S_tᵀ q_t`` (see the module docstring).

  Args:
    query: ``[B, T, N, H]``; key: ``[B, T, K, H]`` (L2-normalise it first); value: ``[B, T, K, Hv]``.
    beta: ``[B, T, N]`` write strengths (usually a sigmoid, in ``[0, 1]``). Differentiable.
    scale, chunk_size, initial_state, return_state: as in :func:`decayed_linear_attention`.
    implementation: ``"chunked"`` (WY form), ``"parallel"`` (one chunk of T) or ``"recurrent"``.

  Returns:
    ``[B, T, N, Hv]`` in the input dtype, or ``(out, final_state)`` with ``return_state``.
  """
  fn = "delta_rule_attention"
  impl = _check_implementation(fn, implementation)
  chunk = _check_chunk_size(fn, chunk_size)
  inp, dims = _prepare(fn, query, key, value, beta, "beta", scale, initial_state)
  if 0 in inp.q.shape or 0 in inp.v.shape:
    out, final = jnp.zeros(inp.q.shape[:2] + inp.v.shape[-1:], inp.q.dtype), inp.state
  elif impl == "recurrent":
    out, final = _delta_recurrent(inp)
  else:
    out, final = _delta_chunked(inp, chunk=inp.q.shape[1] if impl == "parallel" else chunk)
  return _finish(out, final, dims, return_state)


def delta_rule_attention_reference(query, key, value, beta, *, scale=None, chunk_size=None, initial_state=None,
                                   return_state: bool = False):
  """The token-by-token recurrence (``implementation="recurrent"``; ``chunk_size`` is ignored)."""
  del chunk_size
  return delta_rule_attention(query, key, value, beta, scale=scale, initial_state=initial_state,
                              return_state=return_state, implementation="recurrent")


# ----------------------------------------------------------------------------------------------------------
# Decoding steps
# ----------------------------------------------------------------------------------------------------------


def _prepare_step(fn: str, state, q_t, k_t, v_t, gate_t, gate_name: str, scale):
  state, q_t, k_t, v_t, gate_t = (jnp.asarray(x) for x in (state, q_t, k_t, v_t, gate_t))
  described = _shapes(state=state, q_t=q_t, k_t=k_t, v_t=v_t, **{gate_name: gate_t})
  if q_t.ndim != 3 or k_t.ndim != 3 or v_t.ndim != 3 or k_t.shape[:2] != v_t.shape[:2]:
    raise ValueError(f"{fn}: need q_t [B, N, H], k_t [B, K, H] and v_t [B, K, Hv]; got {described}")
  B, N, H = q_t.shape
  K, Hv = k_t.shape[1], v_t.shape[2]
  if k_t.shape[0] != B or k_t.shape[2] != H or K == 0 or N % K:
    raise ValueError(f"{fn}: B and H must match and N % K == 0; got {described}")
  if state.shape != (B, N, H, Hv):
    raise ValueError(f"{fn}: state must be [B, N, H, Hv] = {(B, N, H, Hv)} (start from zeros); got {described}")
  _check_float(fn, described, state=state, q_t=q_t, k_t=k_t, v_t=v_t, **{gate_name: gate_t})
  if gate_name == "log_decay_t" and gate_t.shape == (N,):
    gate_t = jnp.broadcast_to(gate_t[None, :, None], (B, N, 1))
  elif gate_t.shape == (B, N):
    gate_t = gate_t[..., None]
  elif not (gate_name == "log_decay_t" and gate_t.shape == (B, N, H)):
    allowed = f"[N], [B, N] or [B, N, H] = {(B, N, H)}" if gate_name == "log_decay_t" else f"[B, N] = {(B, N)}"
    raise ValueError(f"{fn}: {gate_name} must be {allowed}; got {described}")
  cd = _numerics.compute_dtype(jnp.promote_types(q_t.dtype, state.dtype))
  G = N // K
  X = B * N
  flat = lambda x, r: jnp.repeat(x.astype(cd), r, axis=1).reshape(X, -1)
  scale = H ** -0.5 if scale is None else scale
  return (state.astype(cd).reshape(X, H, Hv), flat(q_t, 1), flat(k_t, G), flat(v_t, G), flat(gate_t, 1),
          jnp.asarray(scale, cd)), (B, N, H, Hv, q_t.dtype)


def decayed_linear_attention_step(state, q_t, k_t, v_t, log_decay_t, *, scale=None):
  """One decoding step: ``S = diag(exp(g_t)) S + k_t v_tᵀ``, then ``o_t = scale · Sᵀ q_t``.

  ``state [B, N, H, Hv]`` (start from zeros, or a ``return_state`` result), ``q_t [B, N, H]``, ``k_t [B, K, H]``,
  ``v_t [B, K, Hv]``, ``log_decay_t`` ``[N]``, ``[B, N]`` or ``[B, N, H]``. Returns ``(new_state, o_t [B, N, Hv])``;
  scanning it over T reproduces :func:`decayed_linear_attention`.
  """
  (s, q, k, v, g, scale), (B, N, H, Hv, dtype) = _prepare_step(
      "decayed_linear_attention_step", state, q_t, k_t, v_t, log_decay_t, "log_decay_t", scale)
  s = _decayed_update(s, k, v, g)
  return s.reshape(B, N, H, Hv), _readout(s, q, scale).reshape(B, N, Hv).astype(dtype)


def delta_rule_attention_step(state, q_t, k_t, v_t, beta_t, *, scale=None):
  """One decoding step: ``S = S + β_t k_t (v_t − Sᵀ k_t)ᵀ``, then ``o_t = scale · Sᵀ q_t`` (``beta_t [B, N]``;
  otherwise as :func:`decayed_linear_attention_step`)."""
  (s, q, k, v, b, scale), (B, N, H, Hv, dtype) = _prepare_step(
      "delta_rule_attention_step", state, q_t, k_t, v_t, beta_t, "beta_t", scale)
  s = _delta_update(s, k, v, b)
  return s.reshape(B, N, H, Hv), _readout(s, q, scale).reshape(B, N, Hv).astype(dtype)
