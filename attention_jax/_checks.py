"""Argument checks shared by the public entry points: messages name the argument and the offending value.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class UnsupportedError(NotImplementedError, ValueError):
  """An implementation cannot take this call (dtype, shape or option); dispatch moves on to the next candidate.

  A ``ValueError`` for callers who asked for that implementation explicitly, and a ``NotImplementedError`` so that
  a sequence of implementations falls through to the next one. Public as ``attention_jax.core.UnsupportedError``.
  """


def positive_int(name: str, value: Any, *, context: str = "") -> int:
  """A positive static int (Python or NumPy int, not bool), else ``ValueError`` naming ``name`` and the value."""
  prefix = f"{context}: " if context else ""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{prefix}{name} must be a positive int, not bool; got {name}={value!r}")
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{prefix}{name} must be a positive int, not {type(value).__name__}; got {name}={value!r}"
                     ) from None
  if value <= 0:
    raise ValueError(f"{prefix}{name} must be a positive int; got {name}={value}")
  return value


def float_array(name: str, value: Any, *, context: str = "") -> jax.Array:
  """``value`` as an array of a real floating dtype; anything else is a ``TypeError`` naming ``name``."""
  prefix = f"{context}: " if context else ""
  try:
    x = jnp.asarray(value)
  except TypeError:
    raise TypeError(f"{prefix}{name} must be a real floating-point array; got {type(value).__name__}") from None
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{prefix}{name} must be a real floating-point array; got dtype={x.dtype} shape={x.shape}")
  return x


def float_dtype(name: str, dtype: Any, *, context: str = "") -> Any:
  """``dtype`` if it is a real floating dtype; anything else is a ``TypeError`` naming ``name``."""
  try:
    ok = jnp.issubdtype(dtype, jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    prefix = f"{context}: " if context else ""
    raise TypeError(f"{prefix}{name} must be a real floating dtype; got {name}={dtype!r}")
  return dtype
