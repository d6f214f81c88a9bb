"""A small pre-norm Transformer (Flax NNX) whose attention is chosen by name (experiments/variants.py).

``TransformerLM(vocab_size, d_model, num_heads, num_layers, max_len, attention="softmax", causal=True)`` maps
tokens ``[B, T]`` to next-token logits ``[B, T, vocab]``; with ``num_classes`` it mean-pools the final states
over non-padding tokens and returns class logits ``[B, num_classes]`` (ListOps). Learned absolute position
embeddings (``positions="learned"``, a ``[max_len, d_model]`` table) or none (``positions="none"``: ALiBi, NoPE;
the model then takes any length), by default as the variant says (``variants.learned_positions``);
pre-LayerNorm blocks with a GELU MLP, untied output head.

``model(tokens, return_attention=True)`` also returns each layer's attention weights ``[B, N, T, T]`` — only for
the softmax variants, which form them (the others raise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import attention_jax as aj
from experiments import variants

POSITIONS = ("learned", "none")


class SelfAttention(nnx.Module):
  """Multi-head (optionally grouped-query) self-attention with a pluggable attention function."""

  def __init__(self, d_model: int, num_heads: int, *, attention: str, causal: bool, num_kv_heads: int | None = None,
               rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    self.num_heads, self.head_dim = num_heads, d_model // num_heads
    self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    self.causal = causal
    self.attention = attention
    self.attention_fn = variants.make_attention(attention)
    self.q = nnx.Linear(d_model, num_heads * self.head_dim, rngs=rngs)
    self.kv = nnx.Linear(d_model, 2 * self.num_kv_heads * self.head_dim, rngs=rngs)
    self.out = nnx.Linear(num_heads * self.head_dim, d_model, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, return_attention: bool = False):
    B, T, _ = x_BTD.shape
    q = self.q(x_BTD).reshape(B, T, self.num_heads, self.head_dim)
    k, v = jnp.split(self.kv(x_BTD).reshape(B, T, 2 * self.num_kv_heads, self.head_dim), 2, axis=2)
    weights = None
    if return_attention:
      if variants.parse(self.attention)[0] not in variants.SOFTMAX_KINDS:
        raise ValueError(f"attention={self.attention!r} forms no softmax weights to return")
      o, weights = aj.reference_attention(q, k, v, is_causal=self.causal, return_weights=True)
    else:
      o = self.attention_fn(q, k, v, is_causal=self.causal)
    return self.out(o.reshape(B, T, -1)), weights


class Block(nnx.Module):

  def __init__(self, d_model: int, num_heads: int, *, attention: str, causal: bool, mlp_ratio: int,
               num_kv_heads: int | None, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = SelfAttention(d_model, num_heads, attention=attention, causal=causal, num_kv_heads=num_kv_heads,
                              rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp_in = nnx.Linear(d_model, mlp_ratio * d_model, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_ratio * d_model, d_model, rngs=rngs)

  def __call__(self, x: jax.Array, return_attention: bool = False):
    h, weights = self.attn(self.ln1(x), return_attention)
    x = x + h
    x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))
    return x, weights


class TransformerLM(nnx.Module):
  """Token model for the synthetic tasks; see the module docstring."""

  def __init__(self, vocab_size: int, d_model: int, num_heads: int, num_layers: int, max_len: int, *,
               attention: str = "softmax", causal: bool = True, mlp_ratio: int = 4, num_kv_heads: int | None = None,
               num_classes: int | None = None, pad_id: int = 0, positions: str | None = None, rngs: nnx.Rngs):
    if positions is None:
      positions = "learned" if variants.learned_positions(attention) else "none"
    if positions not in POSITIONS:
      raise ValueError(f"positions must be one of {POSITIONS} (or None: as the variant says); got {positions!r}")
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.positions = positions
    if positions == "learned":
      self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model)))
    else:
      self.pos = None
    self.blocks = nnx.List([Block(d_model, num_heads, attention=attention, causal=causal, mlp_ratio=mlp_ratio,
                                  num_kv_heads=num_kv_heads, rngs=rngs) for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, num_classes if num_classes else vocab_size, rngs=rngs)
    self.max_len, self.num_classes, self.pad_id = max_len, num_classes, pad_id

  def __call__(self, tokens_BT: jax.Array, *, return_attention: bool = False):
    B, T = tokens_BT.shape
    x = self.embed(tokens_BT)
    if self.positions == "learned":
      if T > self.max_len:
        raise ValueError(f"sequence length {T} exceeds max_len={self.max_len} (the learned position table); "
                         f"tokens.shape={tokens_BT.shape}")
      x = x + self.pos[...][None, :T]
    weights = []
    for block in self.blocks:
      x, w = block(x, return_attention)
      weights.append(w)
    x = self.ln_f(x)
    if self.num_classes:
      keep = (tokens_BT != self.pad_id).astype(x.dtype)[..., None]
      x = (x * keep).sum(axis=1) / jnp.maximum(keep.sum(axis=1), 1.0)
    logits = self.head(x)
    return (logits, weights) if return_attention else logits
