"""Pieces the Pallas flash kernels share (plain JAX; imports no Pallas backend)."""

from __future__ import annotations

import functools
from typing import Callable

import jax


def flash_custom_vjp(forward: Callable, backward: Callable) -> Callable:
  """``fn(cfg, q, k, v, aux) -> (out, lse)`` with a custom VJP that saves only q, k, v, aux, out and lse.

  ``forward(cfg, q, k, v, *aux) -> (out, lse)`` runs the forward kernel; ``backward(cfg, q, k, v, *aux, out, lse,
  d_out, d_lse) -> (dq, dk, dv)`` recomputes the probabilities from ``lse`` in the backward kernels. ``cfg`` is
  static (hashable); ``aux`` (lengths, segment ids) gets no gradient.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def flash(cfg, q, k, v, aux):
    return forward(cfg, q, k, v, *aux)

  def flash_fwd(cfg, q, k, v, aux):
    out, lse = forward(cfg, q, k, v, *aux)
    return (out, lse), (q, k, v, aux, out, lse)

  def flash_bwd(cfg, res, cts):
    q, k, v, aux, out, lse = res
    dq, dk, dv = backward(cfg, q, k, v, *aux, out, lse, *cts)
    return dq, dk, dv, None

  flash.defvjp(flash_fwd, flash_bwd)
  return flash
