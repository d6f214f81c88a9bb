"""A small pre-norm Transformer (Flax NNX) whose attention is chosen by name (experiments/variants.py).

``TransformerLM(vocab_size, d_model, num_heads, num_layers, max_len, attention="softmax", causal=True)`` maps
tokens ``[B, T]`` to next-token logits ``[B, T, vocab]``; with ``num_classes`` it mean-pools the final states
over non-padding tokens and returns class logits ``[B, num_classes]`` (ListOps). Learned absolute position
embeddings (``positions="learned"``, a ``[max_len, d_model]`` table) or none (``positions="none"``: ALiBi, NoPE;
the model then takes any length), by default as the variant says (``variants.learned_positions``);
pre-LayerNorm blocks with a GELU MLP, untied output head.

``model(tokens, return_attention=True)`` also returns each layer's attention weights ``[B, N, T, T]`` — only for
the softmax variants, which form them (the others raise).

The token mixer of each block is :class:`SelfAttention` (q / k / v projections, then the variant's
``fn(q, k, v, is_causal)``), or for the variants with parameters of their own (``variants.MIXER_KINDS``, causal
only) :class:`BasedMixer`, :class:`RetNetMixer`, :class:`GLAMixer` or :class:`DeltaNetMixer`; :func:`make_mixer`
picks it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import attention_jax as aj
from attention_jax import linear
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


def _heads(x_BTD: jax.Array, num_heads: int) -> jax.Array:
  B, T, D = x_BTD.shape
  return x_BTD.reshape(B, T, num_heads, D // num_heads)


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class HeadRMSNorm(nnx.Module):
  """RMS norm of each head's output ``[B, T, N, H]`` with a learned scale per channel (RetNet's per-head GroupNorm,
  simplified as in GLA / DeltaNet). The scale is stored flat, ``[N * H]``, so that train.py's optimizer treats it
  as a norm (no weight decay on 1-D parameters)."""

  def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((num_heads * head_dim,)))
    self.eps = eps

  def __call__(self, x_BTNH: jax.Array) -> jax.Array:
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x_BTNH), axis=-1, keepdims=True) + self.eps)
    return x_BTNH * inv_rms * self.scale[...].reshape(x_BTNH.shape[2:])[None, None]


class CausalShortConv(nnx.Module):
  """Causal depthwise convolution over time, ``y_t = sum_i w_i * x_(t-K+1+i)`` (zeros before the start); weights
  ``[K, C]`` drawn as PyTorch's Conv1d does (uniform, bound 1/sqrt(K))."""

  def __init__(self, channels: int, kernel_size: int, *, rngs: nnx.Rngs):
    bound = kernel_size ** -0.5
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (kernel_size, channels), minval=-bound, maxval=bound))

  def __call__(self, x_BTC: jax.Array) -> jax.Array:
    w_KC = self.kernel[...]
    K, T = w_KC.shape[0], x_BTC.shape[1]
    padded = jnp.pad(x_BTC, ((0, 0), (K - 1, 0), (0, 0)))
    return sum(padded[:, i:i + T] * w_KC[i][None, None] for i in range(K))


class _Mixer(nnx.Module):
  """Shared checks of the mixers with their own parameters (causal only, no GQA, no attention weights)."""

  def _setup(self, spec: str, d_model: int, num_heads: int, causal: bool, num_kv_heads: int | None) -> None:
    variants.check_causal(spec, causal)
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    if num_kv_heads not in (None, num_heads):
      raise ValueError(f"attention={spec!r} has one state per head and no grouped kv heads; got "
                       f"num_kv_heads={num_kv_heads} with num_heads={num_heads}")
    self.attention, self.num_heads, self.head_dim = spec, num_heads, d_model // num_heads

  def __call__(self, x_BTD: jax.Array, return_attention: bool = False):
    if return_attention:
      raise ValueError(f"attention={self.attention!r} forms no softmax weights to return")
    return self.out(self.mix(x_BTD).reshape(x_BTD.shape)), None


class BasedMixer(_Mixer):
  """Based, "combined": Taylor linear attention on 16-feature q / k per head plus causal sliding-window softmax
  attention (token i sees i-W+1..i), each on its own projections; the two head outputs are summed."""

  def __init__(self, d_model: int, num_heads: int, *, attention: str, causal: bool = True,
               num_kv_heads: int | None = None, rngs: nnx.Rngs):
    self._setup(attention, d_model, num_heads, causal, num_kv_heads)
    self.window = variants.based_window(attention)
    self.feature_qk = nnx.Linear(d_model, 2 * num_heads * variants.BASED_FEATURE_DIM, rngs=rngs)
    self.linear_v = nnx.Linear(d_model, d_model, rngs=rngs)
    self.window_qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
    self.out = nnx.Linear(d_model, d_model, rngs=rngs)

  def mix(self, x_BTD: jax.Array) -> jax.Array:
    N = self.num_heads
    qf_BTNF, kf_BTNF = jnp.split(_heads(self.feature_qk(x_BTD), 2 * N), 2, axis=2)
    o_lin = aj.linear_attention(qf_BTNF, kf_BTNF, _heads(self.linear_v(x_BTD), N), feature_map="taylor",
                                is_causal=True)
    q, k, v = jnp.split(_heads(self.window_qkv(x_BTD), 3 * N), 3, axis=2)
    o_win = aj.dot_product_attention(q, k, v, is_causal=True, local_window_size=(self.window - 1, 0),
                                     implementation="xla")
    return o_lin + o_win


class RetNetMixer(_Mixer):
  """RetNet retention: fixed per-head decay ``1 - 2^(-5-n)``, per-head RMS norm, swish output gate."""

  def __init__(self, d_model: int, num_heads: int, *, attention: str, causal: bool = True,
               num_kv_heads: int | None = None, rngs: nnx.Rngs):
    self._setup(attention, d_model, num_heads, causal, num_kv_heads)
    self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
    self.gate = nnx.Linear(d_model, d_model, rngs=rngs)
    self.norm = HeadRMSNorm(num_heads, self.head_dim)
    self.out = nnx.Linear(d_model, d_model, rngs=rngs)

  def mix(self, x_BTD: jax.Array) -> jax.Array:
    N = self.num_heads
    q, k, v = jnp.split(_heads(self.qkv(x_BTD), 3 * N), 3, axis=2)
    o = linear.decayed_linear_attention(q, k, v, variants.retnet_log_decay(N))
    return self.norm(o) * _heads(jax.nn.swish(self.gate(x_BTD)), N)


class GLAMixer(_Mixer):
  """Gated linear attention: decay ``logsigmoid(x W_g + b) / 16`` per key channel (W_g of rank 16), per-head RMS
  norm, swish output gate; ``gla:conv`` adds DeltaNet's causal short convolution on q / k / v (an ablation)."""

  def __init__(self, d_model: int, num_heads: int, *, attention: str, causal: bool = True,
               num_kv_heads: int | None = None, rngs: nnx.Rngs):
    self._setup(attention, d_model, num_heads, causal, num_kv_heads)
    self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
    self.conv = (CausalShortConv(3 * d_model, variants.SHORT_CONV, rngs=rngs) if variants.short_conv(attention)
                 else None)   # gla:conv, the short-convolution ablation
    self.decay_down = nnx.Linear(d_model, variants.GLA_GATE_RANK, use_bias=False, rngs=rngs)
    self.decay_up = nnx.Linear(variants.GLA_GATE_RANK, d_model, rngs=rngs)
    self.gate = nnx.Linear(d_model, d_model, rngs=rngs)
    self.norm = HeadRMSNorm(num_heads, self.head_dim)
    self.out = nnx.Linear(d_model, d_model, rngs=rngs)

  def mix(self, x_BTD: jax.Array) -> jax.Array:
    N = self.num_heads
    qkv = self.qkv(x_BTD)
    if self.conv is not None:
      qkv = self.conv(qkv)
    q, k, v = jnp.split(_heads(qkv, 3 * N), 3, axis=2)
    log_decay_BTNH = _heads(jax.nn.log_sigmoid(self.decay_up(self.decay_down(x_BTD))), N) / variants.GLA_GATE_NORMALIZER
    o = linear.decayed_linear_attention(q, k, v, log_decay_BTNH)
    return self.norm(o) * _heads(jax.nn.swish(self.gate(x_BTD)), N)


class DeltaNetMixer(_Mixer):
  """DeltaNet: causal short convolution + silu on q / k / v, L2-normalised q / k, ``beta = sigmoid(x W_beta)``,
  delta-rule recurrence, per-head RMS norm; ``deltanet:noconv`` drops the convolution (an ablation)."""

  def __init__(self, d_model: int, num_heads: int, *, attention: str, causal: bool = True,
               num_kv_heads: int | None = None, rngs: nnx.Rngs):
    self._setup(attention, d_model, num_heads, causal, num_kv_heads)
    self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
    self.conv = (CausalShortConv(3 * d_model, variants.SHORT_CONV, rngs=rngs) if variants.short_conv(attention)
                 else None)   # deltanet:noconv, the short-convolution ablation
    self.beta = nnx.Linear(d_model, num_heads, rngs=rngs)
    self.norm = HeadRMSNorm(num_heads, self.head_dim)
    self.out = nnx.Linear(d_model, d_model, rngs=rngs)

  def mix(self, x_BTD: jax.Array) -> jax.Array:
    N = self.num_heads
    qkv = self.qkv(x_BTD)
    if self.conv is not None:
      qkv = self.conv(qkv)
    q, k, v = jnp.split(_heads(jax.nn.silu(qkv), 3 * N), 3, axis=2)
    beta_BTN = jax.nn.sigmoid(self.beta(x_BTD))
    o = linear.delta_rule_attention(_l2_normalize(q), _l2_normalize(k), v, beta_BTN)
    return self.norm(o)


MIXERS = {"based": BasedMixer, "retnet": RetNetMixer, "gla": GLAMixer, "deltanet": DeltaNetMixer}


def make_mixer(d_model: int, num_heads: int, *, attention: str, causal: bool, num_kv_heads: int | None = None,
               rngs: nnx.Rngs) -> nnx.Module:
  """The token mixer of variant ``attention``: a mixer of ``MIXERS`` or :class:`SelfAttention`; called as
  ``mixer(x [B, T, D], return_attention) -> (y [B, T, D], weights or None)``."""
  cls = MIXERS.get(variants.parse(attention)[0], SelfAttention)
  return cls(d_model, num_heads, attention=attention, causal=causal, num_kv_heads=num_kv_heads, rngs=rngs)


class Block(nnx.Module):

  def __init__(self, d_model: int, num_heads: int, *, attention: str, causal: bool, mlp_ratio: int,
               num_kv_heads: int | None, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = make_mixer(d_model, num_heads, attention=attention, causal=causal, num_kv_heads=num_kv_heads,
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
