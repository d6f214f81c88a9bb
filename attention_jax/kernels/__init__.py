"""Pallas kernels, each beside a ``*_reference`` of the same signature.

* ``flash_gpu``: Triton-lowered flash attention (GPU; interpret mode on CPU) — ``flash_attention``.
* ``flash_tpu``: Mosaic-lowered flash attention (TPU; interpreted on CPU) — ``flash_attention_tpu``, whose tile
  sizes are ``BlockSizesTPU`` (``flash_tpu.BlockSizes``).
* ``flash_mosaic_gpu``: Hopper flash attention on Pallas Mosaic GPU (GPU interpret mode on CPU) —
  ``flash_attention_mosaic``.

Names are re-exported lazily so that importing the package does not import Pallas.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

import importlib as _importlib

# public name -> (module, name in that module)
_EXPORTS = {name: ("flash_gpu", name) for name in ("flash_attention", "flash_attention_reference", "BlockSizes")}
_EXPORTS.update({name: ("flash_tpu", name) for name in ("flash_attention_tpu", "flash_attention_tpu_reference")})
_EXPORTS["BlockSizesTPU"] = ("flash_tpu", "BlockSizes")
_EXPORTS.update({name: ("flash_mosaic_gpu", name) for name in ("flash_attention_mosaic",
                                                                "flash_attention_mosaic_reference")})
__all__ = ["flash_gpu", "flash_tpu", "flash_mosaic_gpu", *_EXPORTS]


def __getattr__(name):
  if name in ("flash_gpu", "flash_tpu", "flash_mosaic_gpu"):
    return _importlib.import_module(f"attention_jax.kernels.{name}")
  if name in _EXPORTS:
    module, attr = _EXPORTS[name]
    return getattr(_importlib.import_module(f"attention_jax.kernels.{module}"), attr)
  raise AttributeError(f"module 'attention_jax.kernels' has no attribute {name!r}")
