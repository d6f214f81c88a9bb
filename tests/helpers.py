"""Shared test utilities: the one per-dtype tolerance table, random inputs and a float64 NumPy oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The single per-dtype tolerance table: (atol, rtol) for outputs ("fwd") and gradients ("grad"), applied after
# upcasting both sides to float64. Low-precision entries allow for input/output rounding (bf16 has 8 bits of
# mantissa, f16 11), not for low-precision accumulation, which the library never does.
TOLERANCES = {
    "float64": {"fwd": (1e-10, 1e-10), "grad": (1e-9, 1e-9)},
    "float32": {"fwd": (2e-5, 2e-5), "grad": (1e-4, 1e-4)},
    "float16": {"fwd": (2e-3, 2e-3), "grad": (1e-2, 1e-2)},
    "bfloat16": {"fwd": (1.6e-2, 1.6e-2), "grad": (6e-2, 6e-2)},
}


def enable_x64():
  """A context in which float64 arrays are float64 (``jax.enable_x64`` on jax >= 0.12, the experimental one before)."""
  return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()


def tol(dtype, kind: str = "fwd") -> dict[str, float]:
  atol, rtol = TOLERANCES[jnp.dtype(dtype).name][kind]
  return {"atol": atol, "rtol": rtol}


def assert_close(actual, expected, dtype=None, kind: str = "fwd", err_msg: str = "") -> None:
  """Checks shape, then values within the dtype's tolerance (both upcast to float64)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} {err_msg}"
  np.testing.assert_allclose(actual, expected, err_msg=err_msg, **tol(dtype or "float32", kind))


def randn(rng: np.random.Generator, shape, dtype=jnp.float32, scale: float = 1.0) -> jnp.ndarray:
  return jnp.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


def assert_derivatives_match(f, ref, q, k, v, *, jacfwd_argnum: int = 1) -> None:
  """Forward mode and second order of ``f(q, k, v)`` equal those of ``ref`` (float64 inputs): jvp, jacfwd,
  a Hessian-vector product and a gradient of a gradient."""
  tangents = tuple(randn(np.random.default_rng(i), x.shape, jnp.float64) for i, x in enumerate((q, k, v)))
  assert_close(jax.jvp(f, (q, k, v), tangents)[1], jax.jvp(ref, (q, k, v), tangents)[1], jnp.float64)
  assert_close(jax.jacfwd(f, argnums=jacfwd_argnum)(q, k, v), jax.jacfwd(ref, argnums=jacfwd_argnum)(q, k, v),
               jnp.float64)
  loss = lambda fn: lambda q: (fn(q, k, v) ** 2).sum()
  hvp = lambda fn: jax.jvp(jax.grad(loss(fn)), (q,), (tangents[0],))[1]
  assert_close(hvp(f), hvp(ref), jnp.float64, kind="grad")
  gg = lambda fn: jax.grad(lambda q: jnp.sin(jax.grad(loss(fn))(q)).sum())(q)
  assert_close(gg(f), gg(ref), jnp.float64, kind="grad")


def qkv(rng, B=2, T=7, S=9, N=4, K=2, H=16, dtype=jnp.float32, scale=1.0):
  return (randn(rng, (B, T, N, H), dtype, scale), randn(rng, (B, S, K, H), dtype, scale),
          randn(rng, (B, S, K, H), dtype, scale))


def np_softmax_attention(q, k, v, *, mask=None, bias=None, scale=None, soft_cap=None):
  """Float64 NumPy attention, written independently of the library: (out [B,T,N,Hv], lse [B,N,T]).

  ``mask``: bool broadcastable to [B, N, T, S]. Rows without a visible key give zeros and lse = -inf.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1:3]
  G = N // K
  k_rep = np.repeat(k, G, axis=2)   # head n uses kv head n // G
  v_rep = np.repeat(v, G, axis=2)
  scale = 1.0 / np.sqrt(H) if scale is None else scale
  logits = np.einsum("btnh,bsnh->bnts", q, k_rep) * scale
  if soft_cap is not None:
    logits = soft_cap * np.tanh(logits / soft_cap)
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  visible = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), logits.shape)
  out = np.zeros((B, T, N, v.shape[-1]))
  lse = np.full((B, N, T), -np.inf)
  for b in range(B):
    for n in range(N):
      for t in range(T):
        sel = visible[b, n, t]
        if not sel.any():
          continue
        x = logits[b, n, t, sel]
        m = x.max()
        w = np.exp(x - m)
        lse[b, n, t] = m + np.log(w.sum())
        out[b, t, n] = (w / w.sum()) @ v_rep[b, sel, n]
  return out, lse


def np_mask(B, N, T, S, *, causal=False, window=None, q_lengths=None, kv_lengths=None, q_seg=None, kv_seg=None,
            mask=None):
  """Float64-test oracle for the combined mask, from first principles (loops over positions)."""
  out = np.ones((B, N, T, S), bool)
  if mask is not None:
    out &= np.broadcast_to(np.asarray(mask), out.shape)
  for b in range(B):
    for i in range(T):
      for j in range(S):
        ok = True
        if causal:
          ok &= j <= i
        if window is not None:
          left, right = (window, window) if isinstance(window, int) else window
          ok &= i - left <= j <= i + right
        if q_lengths is not None:
          ok &= i < int(q_lengths[b])
        if kv_lengths is not None:
          ok &= j < int(kv_lengths[b])
        if q_seg is not None:
          ok &= int(q_seg[b][i]) == int(kv_seg[b][j])
        out[b, :, i, j] &= ok
  return out
