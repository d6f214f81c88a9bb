"""Attention variants by name, for experiments (scaling.py, models.py, compare.py).

A spec is ``"name"`` or ``"name:arg"``; :func:`make_attention` returns ``fn(q, k, v, is_causal) -> out`` on
``[B, T, N, H]`` / ``[B, S, K, H]`` arrays.

  softmax / reference     attention_jax reference (dense, float32 softmax)
  xla, cudnn              jax.nn.dot_product_attention
  blockwise[@QxK]         pure-JAX memory-efficient path (optional chunk sizes)
  pallas                  Pallas flash kernel (GPU; interpret mode on CPU)
  xla_local:W             dense XLA with a local window mask of W each side (what sparse local is compared to)
  linear_elu[@C], linear_relu[@C]  linear attention, elu+1 / relu features (optional causal chunk C)
  favor[:M[@C]]           Performer FAVOR+ with M random features (default 256), drawn once per head size
  local:W, strided:S, fixed:L, bigbird:W[@B]  block-sparse patterns         (attention_jax.sparse);
                          strided:sqrt / fixed:sqrt use l = round(sqrt(T)) per call; bigbird:W@B uses blocks of B
                          (default: 128, or a quarter of a short sequence)
  ring[:IMPL]             ring attention, sequence sharded over every device (attention_jax.ring);
                          IMPL = per-shard compute, blockwise or pallas (default: by platform)
  flex[:IMPL]             softmax attention through attention_jax.flex.flex_attention (causal: mods.causal());
                          IMPL = flex_attention's implementation (default: the backend's kernel, then blockwise)
  alibi[:IMPL]            flex_attention with ALiBi (Press et al. 2022): score - m_n |i - j|, the paper's fixed
                          geometric slopes m_n = 2^(-8n/N) per head, causal mask_mod; no position embeddings
  nope                    softmax attention (reference) with no position embeddings at all (NoPE)

:func:`learned_positions` says whether a variant's model adds learned absolute position embeddings (every variant
but ``alibi`` and ``nope``). A document-masking variant is not offered: no task here packs documents into one
sequence (``mods.document`` is for that).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

import attention_jax as aj

AttentionFn = Callable[..., jax.Array]   # fn(q, k, v, is_causal) -> out

# Exact softmax attention through aj.dot_product_attention (implementation = the name; "softmax" = "reference"):
# the variants whose softmax weights models.py can return.
SOFTMAX_KINDS = ("softmax", "reference", "xla", "cudnn", "blockwise", "pallas")
# Variants that materialise the T x S logits (scaling.py skips them above --max_dense_gb).
DENSE_KINDS = tuple(k for k in SOFTMAX_KINDS if k not in ("blockwise", "pallas")) + ("xla_local",)
SPARSE_KINDS = ("local", "strided", "fixed", "bigbird")
ALL = ("softmax", "blockwise", "pallas", "linear_elu", "linear_relu", "favor", *SPARSE_KINDS)
# Variants whose model has no learned absolute position embeddings (ALiBi encodes distance in the logits).
NO_POSITION_KINDS = ("alibi", "nope")
FLEX_KINDS = ("flex", "alibi")
# Tile size of the flex variants (capped at the sequence lengths).
_FLEX_BLOCK = 128


def parse(spec: str) -> tuple[str, str | None]:
  name, _, arg = spec.partition(":")
  if "@" in name:
    name, _, arg = name.partition("@")
  return name, (arg or None)


def learned_positions(spec: str) -> bool:
  """Whether the model of variant ``spec`` adds learned absolute position embeddings to its tokens."""
  return parse(spec)[0] not in NO_POSITION_KINDS


def _flex_variant(name: str, implementation: str | None, block_size: int | None) -> AttentionFn:
  """``flex`` / ``alibi``: flex_attention with a causal block mask (built per call) and ALiBi's score_mod."""
  from attention_jax import flex, mods

  def flex_fn(q, k, v, is_causal=False):
    T, S, N = q.shape[1], k.shape[1], q.shape[2]
    score_mod = mods.alibi(jnp.asarray(mods.alibi_slopes(N))) if name == "alibi" else None
    block_mask = None
    if is_causal:
      size = block_size or _FLEX_BLOCK
      block_mask = flex.create_block_mask(mods.causal(), None, None, T, S, block_size=(min(size, T), min(size, S)))
    return flex.flex_attention(q, k, v, score_mod, block_mask, implementation=implementation)
  return flex_fn


def make_attention(spec: str, *, seed: int = 0, block_size: int | None = None) -> AttentionFn:
  """``fn(q, k, v, is_causal=False)`` for a variant spec (see the module docstring)."""
  name, arg = parse(spec)
  if name in SOFTMAX_KINDS:
    impl = "reference" if name == "softmax" else name
    if name == "blockwise" and arg:
      from attention_jax import blockwise
      cq, ck = (int(x) for x in arg.split("x"))
      sizes = blockwise.ChunkSizes(cq, ck)
      return lambda q, k, v, is_causal=False: blockwise.blockwise_attention(q, k, v, is_causal=is_causal,
                                                                            chunk_sizes=sizes)
    return lambda q, k, v, is_causal=False: aj.dot_product_attention(q, k, v, is_causal=is_causal,
                                                                      implementation=impl)
  if name in FLEX_KINDS:
    return _flex_variant(name, arg, block_size)
  if name == "nope":
    return lambda q, k, v, is_causal=False: aj.dot_product_attention(q, k, v, is_causal=is_causal,
                                                                      implementation="reference")
  if name == "xla_local":
    w = int(arg or 256)
    return lambda q, k, v, is_causal=False: aj.dot_product_attention(
        q, k, v, is_causal=is_causal, local_window_size=w, implementation="xla")
  if name in ("linear_elu", "linear_relu"):
    fmap = name.split("_")[1]
    chunk = int(arg) if arg else None
    return lambda q, k, v, is_causal=False: aj.linear_attention(q, k, v, feature_map=fmap, is_causal=is_causal,
                                                                chunk_size=chunk)
  if name == "favor":
    from attention_jax import linear
    features, _, chunk = (arg or "").partition("@")
    num_features, chunk = int(features or 256), int(chunk) if chunk else None
    maps = {}   # head_dim -> feature map, drawn once (concretely, also when first called under jit)

    def favor(q, k, v, is_causal=False):
      H = q.shape[-1]
      if H not in maps:
        with jax.ensure_compile_time_eval():
          maps[H] = linear.favor_feature_map(jax.random.key(seed), H, num_features=num_features, orthogonal=True)
      return aj.linear_attention(q, k, v, feature_map=maps[H], is_causal=is_causal, chunk_size=chunk)
    return favor
  if name in SPARSE_KINDS:
    from attention_jax import sparse
    if name == "bigbird" and arg and "@" in arg:
      arg, _, b = arg.partition("@")
      block_size = block_size or int(b)
    bs = block_size or 128
    if name == "local":
      pattern = sparse.LocalPattern(int(arg or 256))
    elif name in ("strided", "fixed") and arg == "sqrt":
      pattern = None   # stride / block round(sqrt(T)), chosen per call (the Sparse Transformer's l ~ sqrt(n))
    elif name == "strided":
      pattern = sparse.StridedPattern(int(arg or 128))
    elif name == "fixed":
      pattern = sparse.FixedPattern(int(arg or 128), 1)
    else:
      pattern = None   # BigBird: built per call, with blocks of the tile size
    def sparse_fn(q, k, v, is_causal=False):
      # Default block: 128, or a quarter of a short sequence (a power of two >= 16).
      size = bs if block_size else min(bs, max(16, 1 << max(q.shape[1] // 4, 1).bit_length() - 1))
      p = pattern
      if pattern is None and name in ("strided", "fixed"):
        l = max(round(q.shape[1] ** 0.5), 1)
        p = sparse.StridedPattern(l) if name == "strided" else sparse.FixedPattern(l, 1)
      if name == "bigbird":   # BigBird's pattern is made of blocks: use the same ones as the tiles
        p = sparse.BigBirdPattern(window_blocks=int(arg or 3), global_blocks=1, random_blocks=2, seed=seed,
                                  block=size)
      return aj.sparse_attention(q, k, v, p, is_causal=is_causal, block_size=size)
    return sparse_fn
  if name == "ring":
    from attention_jax import ring

    def ring_fn(q, k, v, is_causal=False):
      # A mesh over every device; unsharded inputs are fine: under jit the compiler shards them along T as
      # the ring's shard_map needs (memory_analysis then reports per-device arguments of 1/devices).
      mesh = jax.make_mesh((jax.device_count(),), ("seq",))
      return ring.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=is_causal, implementation=arg)
    return ring_fn
  raise ValueError(f"unknown attention variant {spec!r}")
