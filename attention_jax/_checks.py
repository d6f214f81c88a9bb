"""Argument checks shared by the public entry points: messages name the argument and the offending value."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np


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
