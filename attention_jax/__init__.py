"""attention_jax: attention mechanisms for JAX/Flax, from Bahdanau to flash kernels.

Importing the package loads only the pure-function core; ``nn`` (Flax), ``viz`` (matplotlib), ``kernels``
(Pallas) and the efficient variants load on first attribute access.

The semantics every function shares (layout, masks, residual, dtypes) are in docs/DESIGN.md.
"""

import importlib as _importlib

from attention_jax import masks, scores
from attention_jax.core import attend, dot_product_attention, reference_attention
from attention_jax.multihead import init_multi_head, multi_head_attention

__version__ = "0.1.0"

_LAZY_MODULES = ("nn", "viz", "kernels", "blockwise", "sparse", "linear", "ring", "flex", "mods", "decode")
# Public functions that live in lazily imported modules: name -> module.
_LAZY_FUNCTIONS = {
    "linear_attention": "linear",
    "sparse_attention": "sparse",
    "ring_attention": "ring",
    "blockwise_attention": "blockwise",
    "flex_attention": "flex",
    "create_block_mask": "flex",
    "and_masks": "flex",
    "or_masks": "flex",
    "decode_attention": "decode",
    "paged_decode_attention": "decode",
}

__all__ = [
    "attend", "dot_product_attention", "reference_attention", "init_multi_head", "multi_head_attention",
    "masks", "scores", *_LAZY_MODULES, *_LAZY_FUNCTIONS,
]


def __getattr__(name):
  if name in _LAZY_MODULES:
    return _importlib.import_module(f"attention_jax.{name}")
  if name in _LAZY_FUNCTIONS:
    module = _importlib.import_module(f"attention_jax.{_LAZY_FUNCTIONS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module 'attention_jax' has no attribute {name!r}")
