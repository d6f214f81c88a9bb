"""Which kind of differentiation an array is under, so custom-VJP paths can step aside when they must.

The memory-efficient paths (blockwise, the Pallas kernels, sparse, causal linear, ring) define their reverse-mode
derivative with ``jax.custom_vjp``. JAX cannot apply forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``,
Hessian-vector products) to such functions, and their backward passes (loops with data-dependent bounds, Pallas
calls) are not themselves differentiable. The public entry points therefore look at the arrays they are given:
under forward-mode or second-order reverse-mode differentiation they compute through the plain reference formula,
which JAX differentiates to any order (at the reference's O(T x S) memory).

Only differentiation that is visible at the call is detected: when a ``jax.jit``-compiled function containing the
call is differentiated from outside, the arrays seen here are ordinary jit tracers, and JAX's own error (for
example "can't apply forward-mode autodiff (jvp) to a custom_vjp function") is what the user sees. The reference
implementations (``implementation="reference"`` or ``"xla"``) support every transformation in every case.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import jax

try:   # Tracer classes are not public API; without them nothing is detected (the custom-VJP path always runs).
  from jax._src.interpreters import ad as _ad
  from jax._src.interpreters import batching as _batching
  _JVP = getattr(_ad, "JVPTracer", None)
  _LINEARIZE = getattr(_ad, "LinearizeTracer", None)
  _BATCH = getattr(_batching, "BatchTracer", None)
except ImportError:  # pragma: no cover - depends on the jax version
  _JVP = _LINEARIZE = _BATCH = None


def _levels(x) -> tuple[int, int]:
  """(forward-mode, reverse-mode) differentiation levels of the tracer chain of ``x``."""
  forward = reverse = 0
  for _ in range(64):   # nesting depth is bounded by the number of active transformations
    if not isinstance(x, jax.core.Tracer):
      break
    if _JVP is not None and isinstance(x, _JVP):
      forward += 1
      x = x.primal
    elif _LINEARIZE is not None and isinstance(x, _LINEARIZE):
      # jax.linearize builds a trace for forward evaluation of the linear map; jax.grad / jax.vjp transpose it.
      if getattr(x._trace, "is_vjp", True):
        reverse += 1
      else:
        forward += 1
      x = x.primal
    elif _BATCH is not None and isinstance(x, _BATCH):
      x = x.val
    else:
      inner = getattr(x, "val", None)
      if not isinstance(inner, jax.core.Tracer):
        break
      x = inner
  return forward, reverse


def differentiation_levels(*arrays) -> tuple[int, int]:
  """The largest (forward-mode, reverse-mode) levels over ``arrays`` (None entries are skipped)."""
  forward = reverse = 0
  for leaf in jax.tree_util.tree_leaves(arrays):
    f, r = _levels(leaf)
    forward, reverse = max(forward, f), max(reverse, r)
  return forward, reverse


def needs_plain_path(*arrays) -> bool:
  """True under forward-mode or second-order differentiation, which custom-VJP paths cannot serve."""
  forward, reverse = differentiation_levels(*arrays)
  return forward > 0 or reverse > 1
