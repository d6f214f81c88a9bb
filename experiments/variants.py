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
  taylor[@C]              linear attention with Based's 2nd-order Taylor features of the model's own q / k
                          (D = 1 + H + H(H+1)/2 features per head of size H; optional causal chunk C; also runs
                          non-causally, as every linear_* variant)

Recurrent variants with their own projections (causal only; :func:`make_attention` refuses them, models.py builds
them as mixer modules in place of the attention layer, each with its own q / k / v and output projections):

  based[:W]               Based (Arora et al. 2024): Taylor linear attention on q / k projected to 16 features per
                          head (``BASED_FEATURE_DIM``) plus causal sliding-window softmax attention over the last W
                          tokens (token i sees i-W+1..i; default W = 64), both on their own projections. The paper
                          stacks separate linear-attention and sliding-window layers; here every layer is "combined":
                          the two outputs are summed before the output projection.
  retnet                  RetNet retention: decayed linear attention with a fixed decay per head,
                          gamma_n = 1 - 2^(-5-n), a per-head RMS norm of the output and a swish output gate (no
                          xPos: the model keeps its learned positions)
  gla                     Gated linear attention (Yang et al. 2024): a data-dependent decay per key channel,
                          logsigmoid(x W_g + b) / 16 with W_g of rank 16, per-head RMS norm and swish output gate
  deltanet                DeltaNet (delta rule, Yang et al. 2024): beta = sigmoid(x W_beta) per head, a causal
                          depthwise convolution of kernel 4 then silu on q / k / v (only this variant has the short
                          convolution), q and k L2-normalised per head, per-head RMS norm of the output

:func:`state_size` is the decoding state of one layer in floats (what Zoology's Figure 3 puts on its x axis).

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
# Variants with their own parameters beyond q / k / v / out: models.py builds a mixer module for them.
MIXER_KINDS = ("based", "retnet", "gla", "deltanet")
# Variants that decode with a fixed-size recurrent state (no KV cache growing with T).
RECURRENT_KINDS = ("linear_elu", "linear_relu", "favor", "taylor", *MIXER_KINDS)
# Variants that only exist in causal form.
CAUSAL_ONLY_KINDS = MIXER_KINDS
# Based: feature dimension of the projected q / k per head, default sliding window.
BASED_FEATURE_DIM = 16
BASED_WINDOW = 64
# GLA: rank of the decay gate's projection and the normaliser of its log-sigmoid.
GLA_GATE_RANK = 16
GLA_GATE_NORMALIZER = 16.0
# DeltaNet: kernel size of the causal depthwise convolution on q / k / v.
SHORT_CONV = 4


def parse(spec: str) -> tuple[str, str | None]:
  name, _, arg = spec.partition(":")
  if "@" in name:
    name, _, arg = name.partition("@")
  return name, (arg or None)


# Ablations of the short convolution: DeltaNet without it, GLA with it (the same CausalShortConv of width
# SHORT_CONV on the q / k / v projections).
CONV_OPTIONS = {"deltanet": ("noconv",), "gla": ("conv",)}


def short_conv(spec: str) -> bool:
  """Whether a mixer variant runs the causal short convolution on its q / k / v projections: DeltaNet does
  (``deltanet:noconv`` does not), GLA does not (``gla:conv`` does)."""
  name, arg = parse(spec)
  allowed = CONV_OPTIONS.get(name, ())
  if arg is not None and arg not in allowed:
    raise ValueError(f"unknown option {arg!r} in attention variant {spec!r}; {name} takes "
                     f"{' or '.join(repr(a) for a in allowed) or 'no option'}")
  return (name == "deltanet" and arg != "noconv") or (name == "gla" and arg == "conv")


def based_window(spec: str) -> int:
  """The sliding window W of a ``based[:W]`` spec."""
  name, arg = parse(spec)
  if name != "based":
    raise ValueError(f"not a based spec: {spec!r}")
  window = int(arg or BASED_WINDOW)
  if window < 1:
    raise ValueError(f"based's window must be >= 1; got {spec!r}")
  return window


def retnet_log_decay(num_heads: int) -> jax.Array:
  """RetNet's fixed log decays ``log(1 - 2^(-5-n))`` of heads ``n = 0..N-1``, ``[N]``."""
  n = jnp.arange(num_heads, dtype=jnp.float32)
  return jnp.log1p(-jnp.exp2(-5.0 - n))


def check_causal(spec: str, is_causal: bool) -> None:
  """ValueError when a causal-only variant (``CAUSAL_ONLY_KINDS``) is used without causal masking."""
  if not is_causal and parse(spec)[0] in CAUSAL_ONLY_KINDS:
    raise ValueError(f"attention={spec!r} is a causal recurrence and cannot run with is_causal=False (causal=False "
                     "models, e.g. classification tasks such as listops, need a variant of another kind)")


def state_size(spec: str, *, seq_len: int, d_model: int, num_heads: int) -> int:
  """Floats one layer keeps to decode the next token after ``seq_len`` tokens (Zoology's "state size").

  With ``H = d_model / num_heads``: exact attention keeps its KV cache, ``2 T d_model`` (also the sparse patterns
  with global or strided keys, which a future query may read anywhere); ``local:W`` / ``xla_local:W``, the
  window's cache ``2 min(W + 1, T) d_model`` (a causal query sees itself and the ``W`` keys before it);
  ``linear_elu`` / ``linear_relu``, ``N (H H + H)`` (sum of ``phi(k) v^T`` and normaliser ``z``); ``favor:M``,
  ``N (M H + M)``; ``taylor``, ``N (D H + D)`` with ``D = 1 + H + H(H+1)/2``; ``based:W``, the same with Based's
  16 features (D = 153) plus the window's cache ``2 min(W, T) d_model``; ``retnet`` / ``gla`` / ``deltanet``, the
  matrix state ``N H H``. Short-convolution buffers are not counted.
  """
  name, arg = parse(spec)
  if d_model % num_heads:
    raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
  N, H, T = num_heads, d_model // num_heads, seq_len
  taylor_dim = lambda h: 1 + h + h * (h + 1) // 2
  if name in ("linear_elu", "linear_relu"):
    return N * (H * H + H)
  if name == "favor":
    m = int((arg or "").partition("@")[0] or 256)
    return N * (m * H + m)
  if name == "taylor":
    D = taylor_dim(H)
    return N * (D * H + D)
  if name == "based":
    D = taylor_dim(BASED_FEATURE_DIM)
    return N * (D * H + D) + 2 * min(based_window(spec), T) * d_model
  if name in ("retnet", "gla", "deltanet"):
    return N * H * H
  if name in ("local", "xla_local"):
    return 2 * min(int(arg or 256) + 1, T) * d_model
  if name in (*SOFTMAX_KINDS, *FLEX_KINDS, "nope", "ring", "strided", "fixed", "bigbird"):
    return 2 * T * d_model
  raise ValueError(f"unknown attention variant {spec!r}")


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
  if name in MIXER_KINDS:
    raise ValueError(f"attention variant {spec!r} has its own projections and parameters: it is a mixer module "
                     "(models.make_mixer), not an fn(q, k, v) attention function")
  if name in ("linear_elu", "linear_relu", "taylor"):
    fmap = name.removeprefix("linear_")
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
