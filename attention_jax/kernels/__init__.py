"""Pallas kernels, each beside a ``*_reference`` of the same signature.

* ``flash_gpu``: Triton-lowered flash attention (GPU; interpret mode on CPU) — ``flash_attention``.
* ``flash_tpu``: Mosaic-lowered flash attention (TPU; interpreted on CPU) — ``flash_attention_tpu``.

Names are re-exported lazily so that importing the package does not import Pallas.
"""

import importlib as _importlib

_EXPORTS = {
    "flash_attention": "flash_gpu", "flash_attention_reference": "flash_gpu", "BlockSizes": "flash_gpu",
    "flash_attention_tpu": "flash_tpu", "flash_attention_tpu_reference": "flash_tpu",
}
__all__ = ["flash_gpu", "flash_tpu", *_EXPORTS]


def __getattr__(name):
  if name in ("flash_gpu", "flash_tpu"):
    return _importlib.import_module(f"attention_jax.kernels.{name}")
  if name in _EXPORTS:
    return getattr(_importlib.import_module(f"attention_jax.kernels.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'attention_jax.kernels' has no attribute {name!r}")
