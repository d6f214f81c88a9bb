"""Autoregressive generation for :class:`experiments.models.TransformerLM`, one decode state per attention variant.

  cache = init_cache(model, batch_size, max_len)
  logits_BV, cache = decode_step(model, cache, tokens_B, position)        # feed the token at `position`
  logits_BTV, cache = prefill(model, prompt_BT, max_len)                  # the prompt at once, state at its end
  tokens = generate(model, prompt_BT, num_new_tokens, greedy=True)        # [B, T + num_new_tokens]
  cache_bytes(cache)                                                      # bytes of the decode state

The cache is a tuple with one dict of arrays per layer; what it holds is the state each variant decodes with:

  softmax kinds, nope, flex, ring    ``key`` / ``value`` ``[B, max_len, K, H]``: a KV cache, attended with
                                     ``aj.decode_attention`` (``kv_lengths = position + 1``)
  alibi                              the same KV cache; the ALiBi bias ``-m_n (position - j)`` is added per entry
  local:W, xla_local:W               ``key`` / ``value`` ``[B, R, K, H]``, a ring buffer of the last
                                     ``R = min(W + 1, max_len)`` entries (the causal window is ``i-W..i``):
                                     position ``p`` lives in slot ``p % R``; flat in the context length
  linear_elu / linear_relu / favor / taylor   ``linear``: an ``attention_jax.linear.LinearAttentionState``
                                     (``kv [B, K, D, H]``, ``z [B, K, D]``, ``log_scale [B, K, D]``), advanced by
                                     ``linear_attention_step``
  based:W                            ``linear`` (Taylor features of the 16-dim feature projections, D = 153) plus a
                                     ring buffer ``key`` / ``value`` ``[B, min(W, max_len), N, H]`` for the window
                                     ``i-W+1..i``; the two head outputs are summed as the mixer does
  retnet / gla                       ``state [B, N, H, H]``, ``decayed_linear_attention_step``
  deltanet                           ``state [B, N, H, H]`` (``delta_rule_attention_step``) and ``conv
                                     [B, kernel_size - 1, 3 D]``: the last inputs of the causal short convolution

Sparse patterns other than ``local`` (strided, fixed, bigbird: a future query may read any earlier key through
their global / strided parts, and their tiles follow the whole sequence length), non-causal models and
classifiers have no decode form here (``ValueError``).

``decode_step`` reproduces the full forward's logits at every position (tests/test_generate.py); learned position
embeddings are read at ``position``. ``prefill`` runs each layer's parallel (training) form and builds the state
at the end of the prompt from it: KV entries written at once, the linear states as closed-form sums, the
RetNet / GLA / DeltaNet states through ``return_state`` of the chunked forms.

``generate`` is one ``jax.jit``: the prefill, then a ``lax.scan`` of decode steps whose carry is the cache (updated
in place) and the last token. A loop of jitted steps driven from Python would share one compiled step across
prompt lengths and token counts, but pays a dispatch per token: measured on the CPU with a tiny model (d_model 32,
2 layers), 0.2-0.3 ms per step from :func:`make_decode_step` against about 50 us per token inside the scan. The
scan compiles once per (batch, prompt length, new tokens). :func:`decode_step` / :func:`make_decode_step` are the
single step; **the cache passed to a step is donated** (written in place): use the returned one, and copy it
first to keep it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import attention_jax as aj
from attention_jax import linear, mods
from experiments import models, variants

Cache = tuple[dict[str, Any], ...]

# Variants decoded with a full-length KV cache and plain causal softmax attention.
KV_KINDS = (*variants.SOFTMAX_KINDS, "nope", "flex", "ring")
# Sliding-window softmax variants decoded with a ring buffer.
WINDOW_KINDS = ("local", "xla_local")
LINEAR_FEATURES = {"linear_elu": "elu", "linear_relu": "relu", "taylor": "taylor"}
# The PRNG seed of the FAVOR+ features: variants.make_attention's default, which models.SelfAttention uses.
FAVOR_SEED = 0


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """How one layer decodes: ``kind`` in kv / alibi / window / linear / based / retnet / gla / deltanet."""
  kind: str
  window: int | None = None        # window / based: the keys a query sees, itself included
  feature_map: str | None = None   # linear: "elu", "relu", "taylor" or "favor"
  num_features: int | None = None  # favor


def decode_plan(model: models.TransformerLM) -> tuple[LayerPlan, ...]:
  """The decode form of each layer of ``model``; ``ValueError`` for models and variants without one."""
  if model.num_classes:
    raise ValueError(f"model has num_classes={model.num_classes}: a classifier pools the whole sequence and has no "
                     "autoregressive decode")
  return tuple(_layer_plan(block.attn) for block in model.blocks)


def _layer_plan(mixer: nnx.Module) -> LayerPlan:
  spec = mixer.attention
  name, arg = variants.parse(spec)
  if isinstance(mixer, models.SelfAttention) and not mixer.causal:
    raise ValueError(f"attention={spec!r} with causal=False: a non-causal model has no autoregressive decode")
  if name in ("gla", "deltanet") and arg is not None:
    raise ValueError(f"attention={spec!r}: the short-convolution ablations have no decode form here; decode "
                     f"{name!r} itself")
  if name in ("based", "retnet", "gla", "deltanet"):
    return LayerPlan(name, window=variants.based_window(spec) if name == "based" else None)
  if name in KV_KINDS:
    return LayerPlan("kv")
  if name == "alibi":
    return LayerPlan("alibi")
  if name in WINDOW_KINDS:
    # local:W is LocalPattern(W) (|i - j| <= W), xla_local:W local_window_size=W: causal, both see i-W..i.
    return LayerPlan("window", window=int(arg or 256) + 1)
  if name in LINEAR_FEATURES:
    return LayerPlan("linear", feature_map=LINEAR_FEATURES[name])
  if name == "favor":
    return LayerPlan("linear", feature_map="favor", num_features=int((arg or "").partition("@")[0] or 256))
  raise ValueError(f"attention={spec!r} has no decode form here: the strided / fixed / bigbird patterns are laid out "
                   "over the whole sequence (strides, global and random blocks chosen from its length and tiles); "
                   "decodable: "
                   f"{(*KV_KINDS, 'alibi', *WINDOW_KINDS, *LINEAR_FEATURES, 'favor', *variants.MIXER_KINDS)}")


def _feature_map(plan: LayerPlan, head_dim: int):
  if plan.feature_map != "favor":
    return plan.feature_map
  with jax.ensure_compile_time_eval():   # a constant, as variants.make_attention draws it
    return linear.favor_feature_map(jax.random.key(FAVOR_SEED), head_dim, num_features=plan.num_features,
                                    orthogonal=True)


def _ring_size(plan: LayerPlan, max_len: int) -> int:
  return max(1, min(plan.window, max_len))


# ----------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------


def _param_dtype(model: models.TransformerLM):
  return jnp.dtype(model.embed.embedding.dtype)   # also for an abstract model (nnx.eval_shape)


def _init_layer(plan: LayerPlan, mixer: nnx.Module, B: int, max_len: int, dtype) -> dict[str, Any]:
  if plan.kind in ("kv", "alibi", "window"):
    K, H = mixer.num_kv_heads, mixer.head_dim
    S = max_len if plan.kind != "window" else _ring_size(plan, max_len)
    return {"key": jnp.zeros((B, S, K, H), dtype), "value": jnp.zeros((B, S, K, H), dtype)}
  if plan.kind == "linear":
    K, H = mixer.num_kv_heads, mixer.head_dim
    return {"linear": linear.init_state(B, K, H, _feature_map(plan, H), dtype)}
  N, H = mixer.num_heads, mixer.head_dim
  if plan.kind == "based":
    R = _ring_size(plan, max_len)
    return {"linear": linear.init_state(B, N, variants.BASED_FEATURE_DIM, "taylor", dtype, value_head_dim=H),
            "key": jnp.zeros((B, R, N, H), dtype), "value": jnp.zeros((B, R, N, H), dtype)}
  cache = {"state": jnp.zeros((B, N, H, H), jnp.promote_types(dtype, jnp.float32))}
  if plan.kind == "deltanet":
    K, C = mixer.conv.kernel.shape
    cache["conv"] = jnp.zeros((B, K - 1, C), dtype)
  return cache


def init_cache(model: models.TransformerLM, batch_size: int, max_len: int) -> Cache:
  """The empty decode state of ``model`` for ``batch_size`` rows and up to ``max_len`` positions (a tuple with
  one dict of arrays per layer; see the module docstring). KV entries and convolution inputs have the model's
  parameter dtype; recurrent states are float32 (float64 for float64)."""
  plan = decode_plan(model)
  for name, value in (("batch_size", batch_size), ("max_len", max_len)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"init_cache: {name} must be a positive int; got {name}={value!r}")
  dtype = _param_dtype(model)
  return tuple(_init_layer(p, block.attn, batch_size, max_len, dtype) for p, block in zip(plan, model.blocks))


def cache_bytes(cache: Cache) -> int:
  """Bytes of the decode state (every array of ``cache``; ``jax.ShapeDtypeStruct`` leaves count too, so
  ``cache_bytes(jax.eval_shape(lambda: init_cache(...)))`` allocates nothing)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


# ----------------------------------------------------------------------------------------------------------
# One layer, one token: x [B, 1, D] (after ln1) -> the mixer's output [B, 1, D] and the new layer cache
# ----------------------------------------------------------------------------------------------------------


def _write(buffer_BSKH: jax.Array, x_B1KH: jax.Array, slot) -> jax.Array:
  return lax.dynamic_update_slice_in_dim(buffer_BSKH, x_B1KH.astype(buffer_BSKH.dtype), slot, axis=1)


def _lengths(B: int, n) -> jax.Array:
  return jnp.full((B,), n, jnp.int32)


def _ring_attend(cache: dict, q_B1NH, k_B1KH, v_B1KH, position) -> tuple[jax.Array, dict]:
  """Softmax over a ring buffer of the last R entries: position p in slot p % R. Softmax ignores the order of its
  keys, so the ring is read as a cache of ``min(p + 1, R)`` valid entries, all inside the window."""
  R = cache["key"].shape[1]
  slot = position % R
  cache = {**cache, "key": _write(cache["key"], k_B1KH, slot), "value": _write(cache["value"], v_B1KH, slot)}
  o = aj.decode_attention(q_B1NH, cache["key"], cache["value"], kv_lengths=_lengths(q_B1NH.shape[0],
                                                                                    jnp.minimum(position + 1, R)))
  return o, cache


def _alibi_attend(q_B1NH, key_BSKH, value_BSKH, position) -> jax.Array:
  """ALiBi at one query position over a KV cache: logits ``q·k/√H − m_n (position − j)`` for ``j <= position``."""
  S, N = key_BSKH.shape[1], q_B1NH.shape[2]
  slopes_N = jnp.asarray(mods.alibi_slopes(N))
  j_S = jnp.arange(S)
  bias_N1S = -slopes_N[:, None, None] * (position - j_S).astype(jnp.float32)[None, None, :]
  mask_11S = (j_S <= position)[None, None, :]
  return aj.dot_product_attention(q_B1NH, key_BSKH, value_BSKH, bias=bias_N1S, mask=mask_11S)


def _self_attention_qkv(mixer: models.SelfAttention, x_BTD: jax.Array):
  B, T, _ = x_BTD.shape
  q = mixer.q(x_BTD).reshape(B, T, mixer.num_heads, mixer.head_dim)
  k, v = jnp.split(mixer.kv(x_BTD).reshape(B, T, 2 * mixer.num_kv_heads, mixer.head_dim), 2, axis=2)
  return q, k, v


def _step_layer(plan: LayerPlan, mixer: nnx.Module, cache: dict, x_B1D: jax.Array, position
                ) -> tuple[jax.Array, dict]:
  B, _, D = x_B1D.shape
  heads = models._heads
  if plan.kind in ("kv", "alibi", "window", "linear"):
    q, k, v = _self_attention_qkv(mixer, x_B1D)
    if plan.kind == "window":
      o, cache = _ring_attend(cache, q, k, v, position)
    elif plan.kind == "linear":
      state, o = linear.linear_attention_step(cache["linear"], q[:, 0], k[:, 0], v[:, 0],
                                              _feature_map(plan, mixer.head_dim))
      o, cache = o[:, None], {**cache, "linear": state}
    else:
      cache = {**cache, "key": _write(cache["key"], k, position), "value": _write(cache["value"], v, position)}
      if plan.kind == "kv":
        o = aj.decode_attention(q, cache["key"], cache["value"], kv_lengths=_lengths(B, position + 1))
      else:
        o = _alibi_attend(q, cache["key"], cache["value"], position)
    return mixer.out(o.reshape(B, 1, -1)), cache
  N = mixer.num_heads
  if plan.kind == "based":
    qf, kf = jnp.split(heads(mixer.feature_qk(x_B1D), 2 * N), 2, axis=2)
    state, o_lin = linear.linear_attention_step(cache["linear"], qf[:, 0], kf[:, 0],
                                                heads(mixer.linear_v(x_B1D), N)[:, 0], "taylor")
    q, k, v = jnp.split(heads(mixer.window_qkv(x_B1D), 3 * N), 3, axis=2)
    o_win, cache = _ring_attend(cache, q, k, v, position)
    return mixer.out((o_lin[:, None] + o_win).reshape(B, 1, D)), {**cache, "linear": state}
  if plan.kind in ("retnet", "gla"):
    q, k, v = jnp.split(heads(mixer.qkv(x_B1D), 3 * N), 3, axis=2)
    if plan.kind == "retnet":
      log_decay = variants.retnet_log_decay(N)
    else:
      log_decay = heads(jax.nn.log_sigmoid(mixer.decay_up(mixer.decay_down(x_B1D))), N)[:, 0]
      log_decay = log_decay / variants.GLA_GATE_NORMALIZER
    state, o = linear.decayed_linear_attention_step(cache["state"], q[:, 0], k[:, 0], v[:, 0], log_decay)
    o = mixer.norm(o[:, None]) * heads(jax.nn.swish(mixer.gate(x_B1D)), N)
    return mixer.out(o.reshape(B, 1, D)), {**cache, "state": state}
  # deltanet: the short convolution over the last kernel_size inputs, then the delta rule.
  u_B1C = mixer.qkv(x_B1D)
  window_BKC = jnp.concatenate([cache["conv"], u_B1C.astype(cache["conv"].dtype)], axis=1)
  w_KC = mixer.conv.kernel[...]
  conv_B1C = sum(window_BKC[:, i:i + 1] * w_KC[i][None, None] for i in range(w_KC.shape[0]))   # as the forward
  q, k, v = jnp.split(heads(jax.nn.silu(conv_B1C), 3 * N), 3, axis=2)
  beta_BN = jax.nn.sigmoid(mixer.beta(x_B1D))[:, 0]
  state, o = linear.delta_rule_attention_step(cache["state"], models._l2_normalize(q)[:, 0],
                                              models._l2_normalize(k)[:, 0], v[:, 0], beta_BN)
  return mixer.out(mixer.norm(o[:, None]).reshape(B, 1, D)), {**cache, "state": state, "conv": window_BKC[:, 1:]}


# ----------------------------------------------------------------------------------------------------------
# One layer, the whole prompt: x [B, T, D] (after ln1) -> the mixer's output and the cache at the prompt's end
# ----------------------------------------------------------------------------------------------------------


def _ring_from(keys_BTKH: jax.Array, values_BTKH: jax.Array, R: int) -> tuple[jax.Array, jax.Array]:
  """The ring buffer of the last ``R`` of ``T`` entries (position p in slot p % R; empty slots zero)."""
  B, T, K, H = keys_BTKH.shape
  positions = jnp.arange(max(T - R, 0), T)
  slots = positions % R
  empty = jnp.zeros((B, R, K, H), keys_BTKH.dtype)
  return empty.at[:, slots].set(keys_BTKH[:, positions]), empty.at[:, slots].set(values_BTKH[:, positions])


def _linear_state(fmap, k_BTKH: jax.Array, v_BTKE: jax.Array) -> linear.LinearAttentionState:
  """The state ``linear_attention_step`` reaches after keys/values ``0..T-1``, as closed-form sums: ``kv = Σ_j
  φ(k_j) v_jᵀ``, ``z = Σ_j φ(k_j)``; FAVOR+ divides by ``exp(log_scale)``, ``log_scale`` the running (= overall)
  maximum of each feature's key exponent, as the step keeps it."""
  fmap = linear.get_feature_map(fmap, k_BTKH.shape[-1])
  if isinstance(fmap, linear.FavorFeatureMap):
    ek = fmap.exponents(k_BTKH)
    log_scale = jnp.max(ek, axis=1)
    kf = jnp.exp(ek - log_scale[:, None])
  else:
    kf = fmap(k_BTKH)
    log_scale = jnp.full(kf.shape[:1] + kf.shape[2:], -jnp.inf, kf.dtype)
  kv = jnp.einsum("btkd,btke->bkde", kf, v_BTKE.astype(kf.dtype), precision=lax.Precision.HIGHEST)
  return linear.LinearAttentionState(kv, jnp.sum(kf, axis=1), log_scale)


def _prefill_layer(plan: LayerPlan, mixer: nnx.Module, x_BTD: jax.Array, max_len: int, dtype
                   ) -> tuple[jax.Array, dict]:
  B, T, D = x_BTD.shape
  heads = models._heads
  if plan.kind in ("kv", "alibi", "window", "linear"):
    q, k, v = _self_attention_qkv(mixer, x_BTD)
    y = mixer.out(mixer.attention_fn(q, k, v, is_causal=True).reshape(B, T, -1))
    if plan.kind == "linear":
      return y, {"linear": _linear_state(_feature_map(plan, mixer.head_dim), k, v)}
    if plan.kind == "window":
      key, value = _ring_from(k.astype(dtype), v.astype(dtype), _ring_size(plan, max_len))
      return y, {"key": key, "value": value}
    empty = jnp.zeros((B, max_len) + k.shape[2:], dtype)
    return y, {"key": _write(empty, k, 0), "value": _write(empty, v, 0)}
  N = mixer.num_heads
  if plan.kind == "based":
    qf, kf = jnp.split(heads(mixer.feature_qk(x_BTD), 2 * N), 2, axis=2)
    v_lin = heads(mixer.linear_v(x_BTD), N)
    o_lin = aj.linear_attention(qf, kf, v_lin, feature_map="taylor", is_causal=True)
    q, k, v = jnp.split(heads(mixer.window_qkv(x_BTD), 3 * N), 3, axis=2)
    o_win = aj.dot_product_attention(q, k, v, is_causal=True, local_window_size=(mixer.window - 1, 0),
                                     implementation="xla")
    key, value = _ring_from(k.astype(dtype), v.astype(dtype), _ring_size(plan, max_len))
    cache = {"linear": _linear_state("taylor", kf, v_lin), "key": key, "value": value}
    return mixer.out((o_lin + o_win).reshape(B, T, D)), cache
  if plan.kind in ("retnet", "gla"):
    q, k, v = jnp.split(heads(mixer.qkv(x_BTD), 3 * N), 3, axis=2)
    if plan.kind == "retnet":
      log_decay = variants.retnet_log_decay(N)
    else:
      log_decay = heads(jax.nn.log_sigmoid(mixer.decay_up(mixer.decay_down(x_BTD))), N)
      log_decay = log_decay / variants.GLA_GATE_NORMALIZER
    o, state = linear.decayed_linear_attention(q, k, v, log_decay, return_state=True)
    o = mixer.norm(o) * heads(jax.nn.swish(mixer.gate(x_BTD)), N)
    return mixer.out(o.reshape(B, T, D)), {"state": state}
  u_BTC = mixer.qkv(x_BTD)
  q, k, v = jnp.split(heads(jax.nn.silu(mixer.conv(u_BTC)), 3 * N), 3, axis=2)
  beta_BTN = jax.nn.sigmoid(mixer.beta(x_BTD))
  o, state = linear.delta_rule_attention(models._l2_normalize(q), models._l2_normalize(k), v, beta_BTN,
                                         return_state=True)
  K = mixer.conv.kernel.shape[0]
  conv = jnp.pad(u_BTC, ((0, 0), (K - 1, 0), (0, 0)))[:, T:].astype(dtype)   # the last K - 1 inputs (zeros before 0)
  return mixer.out(mixer.norm(o).reshape(B, T, D)), {"state": state, "conv": conv}


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


def _embed(model: models.TransformerLM, tokens_BT: jax.Array, start) -> jax.Array:
  x = model.embed(tokens_BT)
  if model.positions == "learned":
    pos_TD = lax.dynamic_slice_in_dim(model.pos[...], start, tokens_BT.shape[1], axis=0)
    x = x + pos_TD[None]
  return x


def _residual_mlp(block: models.Block, x: jax.Array, h: jax.Array) -> jax.Array:
  x = x + h
  return x + block.mlp_out(jax.nn.gelu(block.mlp_in(block.ln2(x))))


def _decode_step(graphdef, params, plan, cache: Cache, tokens_B: jax.Array, position) -> tuple[jax.Array, Cache]:
  model = nnx.merge(graphdef, params)
  x = _embed(model, tokens_B[:, None], position)
  new_cache = []
  for p, block, layer_cache in zip(plan, model.blocks, cache):
    h, layer_cache = _step_layer(p, block.attn, layer_cache, block.ln1(x), position)
    x = _residual_mlp(block, x, h)
    new_cache.append(layer_cache)
  return model.head(model.ln_f(x))[:, 0], tuple(new_cache)


def _prefill(graphdef, params, plan, prompt_BT: jax.Array, max_len: int, dtype) -> tuple[jax.Array, Cache]:
  model = nnx.merge(graphdef, params)
  x = _embed(model, prompt_BT, 0)
  cache = []
  for p, block in zip(plan, model.blocks):
    h, layer_cache = _prefill_layer(p, block.attn, block.ln1(x), max_len, dtype)
    x = _residual_mlp(block, x, h)
    cache.append(layer_cache)
  return model.head(model.ln_f(x)), tuple(cache)


@functools.lru_cache(maxsize=64)
def _step_fn(graphdef, treedef, plan):
  """The jitted step of one model structure: ``f(param_leaves, cache, tokens_B, position)``. The structure is
  closed over, not a static argument: hashing an nnx GraphDef costs about half a millisecond, on every call of a
  jit that takes it as static. The cache is donated: each step writes its new entries in place (no copy of a KV
  cache per token)."""

  def step(leaves, cache, tokens_B, position):
    return _decode_step(graphdef, jax.tree.unflatten(treedef, leaves), plan, cache, tokens_B, position)
  return jax.jit(step, donate_argnums=(1,))


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 2, 4, 5))


def _check_tokens(fn: str, name: str, tokens, ndim: int) -> jax.Array:
  tokens = jnp.asarray(tokens)
  if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
    want = "[B]" if ndim == 1 else "[B, T]"
    raise ValueError(f"{fn}: {name} must be an integer array {want}; got shape={tokens.shape} dtype={tokens.dtype}")
  return tokens


def _position_limit(model: models.TransformerLM, plan, cache: Cache) -> int | None:
  """The first position the cache (or the learned position table) cannot take; None: unbounded."""
  limits = [model.max_len] if model.positions == "learned" else []
  for p, layer in zip(plan, cache):
    if p.kind in ("kv", "alibi"):
      limits.append(layer["key"].shape[1])
    elif p.kind in ("window", "based") and layer["key"].shape[1] < p.window:   # a ring cut to max_len
      limits.append(layer["key"].shape[1])
  return min(limits) if limits else None


def decode_step(model: models.TransformerLM, cache: Cache, tokens_B, position) -> tuple[jax.Array, Cache]:
  """Feeds ``tokens_B`` (int ``[B]``) at ``position`` (0-based, every row alike; the cache holds positions
  ``0..position-1``) and returns the next-token logits ``[B, vocab]`` and the cache holding ``0..position``.

  Jitted (one compilation per model structure and cache shape); ``position`` may be traced. ``cache`` is donated
  (its buffers are reused for the result: do not read it afterwards). A concrete ``position`` is checked against
  the cache length and the learned position table (a traced one is not)."""
  plan = decode_plan(model)
  tokens_B = _check_tokens("decode_step", "tokens_B", tokens_B, 1)
  if len(cache) != len(plan):
    raise ValueError(f"decode_step: cache has {len(cache)} layers, the model {len(plan)} (make it with init_cache)")
  batch = jax.tree.leaves(cache)[0].shape[0]
  if tokens_B.shape[0] != batch:
    raise ValueError(f"decode_step: tokens_B.shape={tokens_B.shape} does not match the cache's batch size {batch}")
  if not isinstance(position, jax.core.Tracer):
    limit = _position_limit(model, plan, cache)
    if int(position) < 0 or (limit is not None and int(position) >= limit):
      raise ValueError(f"decode_step: position must lie in [0, {limit}) (the cache / position table length); got "
                       f"position={int(position)}")
  graphdef, params = nnx.split(model)
  leaves, treedef = jax.tree.flatten(params)
  return _step_fn(graphdef, treedef, plan)(leaves, cache, tokens_B, jnp.asarray(position, jnp.int32))


def make_decode_step(model: models.TransformerLM):
  """``step(cache, tokens_B, position) -> (logits [B, vocab], cache)``: :func:`decode_step` with the model split
  and its parameters flattened once, and no argument checks (for loops driven from Python). The cache is donated.
  The model's parameters as they are now are bound: make a new step after changing them."""
  plan = decode_plan(model)
  graphdef, params = nnx.split(model)
  leaves, treedef = jax.tree.flatten(params)
  fn = _step_fn(graphdef, treedef, plan)
  return lambda cache, tokens_B, position: fn(leaves, cache, jnp.asarray(tokens_B), jnp.asarray(position, jnp.int32))


def _check_length(fn: str, model: models.TransformerLM, length: int, what: str) -> None:
  if model.positions == "learned" and length > model.max_len:
    raise ValueError(f"{fn}: {what} = {length} exceeds the model's max_len={model.max_len} (its learned position "
                     "table)")


def prefill(model: models.TransformerLM, prompt_BT, max_len: int) -> tuple[jax.Array, Cache]:
  """The prompt ``[B, T]`` through each layer's parallel form: its logits ``[B, T, vocab]`` (the full forward's)
  and the cache after position ``T - 1``, sized for ``max_len`` positions as :func:`init_cache`."""
  plan = decode_plan(model)
  prompt_BT = _check_tokens("prefill", "prompt_BT", prompt_BT, 2)
  T = prompt_BT.shape[1]
  if T < 1 or isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < T:
    raise ValueError(f"prefill: need a prompt of >= 1 token and an int max_len >= its length; got "
                     f"prompt_BT.shape={prompt_BT.shape} max_len={max_len!r}")
  _check_length("prefill", model, T, "the prompt length")
  graphdef, params = nnx.split(model)
  return _prefill_jit(graphdef, params, plan, prompt_BT, max_len, _param_dtype(model))


def _pick(logits_BV: jax.Array, rng, greedy: bool, temperature) -> jax.Array:
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits_BV.astype(jnp.float32) / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 2, 5, 6, 7))
def _generate(graphdef, params, plan, prompt_BT, rng, num_new: int, greedy: bool, dtype, temperature):
  T = prompt_BT.shape[1]
  logits_BTV, cache = _prefill(graphdef, params, plan, prompt_BT, T + num_new - 1, dtype)
  keys = jax.random.split(rng, num_new)
  first_B = _pick(logits_BTV[:, -1], keys[0], greedy, temperature)

  def step(carry, xs):
    cache, token_B = carry
    position, key = xs
    logits_BV, cache = _decode_step(graphdef, params, plan, cache, token_B, position)
    token_B = _pick(logits_BV, key, greedy, temperature)
    return (cache, token_B), token_B

  positions = jnp.arange(T, T + num_new - 1, dtype=jnp.int32)
  _, rest_NB = lax.scan(step, (cache, first_B), (positions, keys[1:]))
  return jnp.concatenate([prompt_BT.astype(jnp.int32), first_B[:, None], rest_NB.T], axis=1)


def generate(model: models.TransformerLM, prompt_BT, num_new_tokens: int, *, greedy: bool = True,
             rng: jax.Array | None = None, temperature: float = 1.0) -> jax.Array:
  """``prompt_BT`` (int ``[B, T]``, ``T >= 1``) followed by ``num_new_tokens`` tokens: ``[B, T + num_new_tokens]``
  int32. Greedy (argmax) by default; ``greedy=False`` samples from ``softmax(logits / temperature)`` with ``rng``.

  One jitted program: :func:`prefill` of the prompt, then a ``lax.scan`` of decode steps (the cache holds
  ``T + num_new_tokens - 1`` positions: the last token is never fed back). Compiled once per model structure,
  batch, prompt length and ``num_new_tokens``."""
  plan = decode_plan(model)
  prompt_BT = _check_tokens("generate", "prompt_BT", prompt_BT, 2)
  if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int) or num_new_tokens < 0:
    raise ValueError(f"generate: num_new_tokens must be an int >= 0; got {num_new_tokens!r}")
  T = prompt_BT.shape[1]
  if T < 1:
    raise ValueError(f"generate: the prompt needs at least one token; got prompt_BT.shape={prompt_BT.shape}")
  if num_new_tokens == 0:
    return prompt_BT.astype(jnp.int32)
  _check_length("generate", model, T + num_new_tokens - 1, "prompt length + num_new_tokens - 1 (positions fed)")
  if not greedy:
    if rng is None:
      raise ValueError("generate: greedy=False samples and needs rng (a jax.random key)")
    if not temperature > 0:
      raise ValueError(f"generate: temperature must be positive; got {temperature!r}")
  graphdef, params = nnx.split(model)
  return _generate(graphdef, params, plan, prompt_BT, jax.random.key(0) if rng is None else rng, num_new_tokens,
                   bool(greedy), _param_dtype(model), jnp.asarray(temperature, jnp.float32))
