"""Pieces the Pallas flash kernels share (plain JAX; imports no Pallas backend).

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import _numerics

# float32 constants for in-kernel selects: Python floats in ``jnp.where(c, 1.0, 0.0)`` become float64 under
# ``jax_enable_x64`` and break the kernels' float32 loop carries.
F32_0 = np.float32(0.0)
F32_1 = np.float32(1.0)

_SECOND_ORDER = ("differentiating the Pallas flash kernel's {what} (second-order or forward-mode autodiff through "
                 "a custom VJP that was computed inside a separately jitted function) is not supported; use "
                 "implementation='reference' or 'xla' for that, or differentiate outside the jit so that the "
                 "library can switch to the reference formula itself")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static configuration of one flash-kernel call, the fields every kernel shares (hashable: it keys the
  compilation cache). A kernel module subclasses it for fields of its own."""
  scale: float
  soft_cap: float | None
  is_causal: bool
  window: tuple[int, int] | None
  T: int                 # true lengths; Tp / Sp are the padded ones
  S: int
  Tp: int
  Sp: int
  groups: int            # G = N // K
  has_q_len: bool
  has_kv_len: bool
  has_seg: bool
  mask: Any              # the kernel's description of a dense mask array (None: no mask)
  bias: Any              # the same for the bias (None: no bias)
  blocks: Any            # the kernel's BlockSizes
  interpret: Any
  debug: bool

  @classmethod
  def of(cls, inp, *, path: str, **fields):
    """The fields derived from validated inputs (``core.AttentionInputs``) the same way by every kernel, plus
    ``fields`` (padded lengths, masks, blocks, interpret mode, ...). ``path`` names the kernel in errors."""
    _, T, N, _ = inp.query.shape
    S, K = inp.key.shape[1:3]
    return cls(scale=_numerics.static_float("scale", inp.scale, path=path),
               soft_cap=_numerics.static_float("logits_soft_cap", inp.logits_soft_cap, path=path),
               is_causal=inp.is_causal, window=inp.window, T=T, S=S, groups=N // K,
               has_q_len=inp.q_lengths is not None, has_kv_len=inp.kv_lengths is not None,
               has_seg=inp.q_segment_ids is not None, **fields)


def masks_every_block(cfg) -> bool:
  """Options that can hide pairs inside any block (segment ids, query lengths, a dense mask or bias): no block is
  known to be fully visible. ``cfg`` is a kernel's static configuration (``has_seg``, ``has_q_len``, ``mask``,
  ``bias``; None where absent)."""
  return cfg.has_seg or cfg.has_q_len or cfg.mask is not None or cfg.bias is not None


def needs_mask(cfg) -> bool:
  """Whether any tile needs a mask: causal, a window, padded keys (``Sp != S``), per-example key lengths, or an
  option of :func:`masks_every_block`."""
  return cfg.is_causal or cfg.window is not None or cfg.Sp != cfg.S or cfg.has_kv_len or masks_every_block(cfg)


def compiled_on(target: str, path: str) -> bool:
  """For ``interpret=None``: False (compile) when the default backend is ``target`` ("gpu" or "tpu"), True
  (interpret) on CPU, ``UnsupportedError`` elsewhere -- so that dispatch moves on to the next implementation."""
  from attention_jax._checks import UnsupportedError
  backend = jax.default_backend()
  if backend == target:
    return False
  if backend == "cpu":
    return True
  other = "'pallas_tpu' on TPU" if target == "gpu" else "'pallas' on GPU"
  raise UnsupportedError(f"{path} runs on {target.upper()} (or interpreted on CPU); backend is {backend!r}. Use "
                         f"implementation={other} or 'blockwise' anywhere")


def not_differentiable(fn: Callable, what: str, message: str | None = None) -> Callable:
  """``fn(cfg, *arrays)`` that raises a clear ``NotImplementedError`` when differentiated (``cfg`` static).

  Pallas calls have no derivative of their own; without this, differentiating a kernel's forward or backward pass
  (e.g. ``jax.grad`` of a jitted ``jax.grad``) fails deep inside JAX with a bare ``AssertionError``. ``message``
  replaces the flash kernels' second-order message (e.g. for inference-only kernels).
  """

  @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
  def wrapped(cfg, *args):
    return fn(cfg, *args)

  @wrapped.defjvp
  def _jvp(cfg, primals, tangents):
    del cfg, primals, tangents
    raise NotImplementedError(message or _SECOND_ORDER.format(what=what))

  return wrapped


def flash_custom_vjp(forward: Callable, backward: Callable, *, with_bias: bool = False,
                     finite_residuals: bool = False) -> Callable:
  """``fn(cfg, q, k, v, aux) -> (out, lse)`` with a custom VJP that saves only q, k, v, aux, out and lse.

  ``forward(cfg, q, k, v, *aux) -> (out, lse)`` runs the forward kernel; ``backward(cfg, q, k, v, *aux, out, lse,
  d_out, d_lse) -> (dq, dk, dv)`` recomputes the probabilities from ``lse`` in the backward kernels. ``cfg`` is
  static (hashable); ``aux`` (lengths, segment ids, masks; entries may be None) gets no gradient.

  ``with_bias``: the function is ``fn(cfg, q, k, v, bias, aux)`` with a differentiable ``bias`` (or None), passed
  to ``forward(cfg, q, k, v, bias, *aux)`` and ``backward(cfg, q, k, v, bias, *aux, out, lse, d_out, d_lse) ->
  (dq, dk, dv, dbias)``.
  ``finite_residuals``: the saved ``lse`` has 0 instead of ``-inf`` on rows with no visible key (``backward`` must
  not need the ``-inf``: those rows' logits are all ``-inf``, so their probabilities are 0 either way), so that the
  residuals a jitted ``jax.grad`` returns stay finite and ``jax.debug_infs`` stays silent.

  The forward and backward passes are wrapped with :func:`not_differentiable`: differentiating them again (only
  possible when the first differentiation happened inside a separately jitted function) raises a clear
  ``NotImplementedError`` naming the reference implementations.
  """
  fwd_call = not_differentiable(forward, "forward pass")
  bwd_call = not_differentiable(backward, "backward pass")

  def residual_lse(lse):
    return jnp.where(jnp.isneginf(lse), jnp.zeros_like(lse), lse) if finite_residuals else lse

  if with_bias:
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def flash_b(cfg, q, k, v, bias, aux):
      return forward(cfg, q, k, v, bias, *aux)

    def flash_b_fwd(cfg, q, k, v, bias, aux):
      out, lse = fwd_call(cfg, q, k, v, bias, *aux)
      return (out, lse), (q, k, v, bias, aux, out, residual_lse(lse))

    def flash_b_bwd(cfg, res, cts):
      q, k, v, bias, aux, out, lse = res
      dq, dk, dv, dbias = bwd_call(cfg, q, k, v, bias, *aux, out, lse, *cts)
      return dq, dk, dv, dbias, None

    flash_b.defvjp(flash_b_fwd, flash_b_bwd)
    return flash_b

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def flash(cfg, q, k, v, aux):
    return forward(cfg, q, k, v, *aux)

  def flash_fwd(cfg, q, k, v, aux):
    out, lse = fwd_call(cfg, q, k, v, *aux)
    return (out, lse), (q, k, v, aux, out, residual_lse(lse))

  def flash_bwd(cfg, res, cts):
    q, k, v, aux, out, lse = res
    dq, dk, dv = bwd_call(cfg, q, k, v, *aux, out, lse, *cts)
    return dq, dk, dv, None

  flash.defvjp(flash_fwd, flash_bwd)
  return flash
