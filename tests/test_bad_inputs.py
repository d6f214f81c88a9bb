"""Hostile input across every public entry point, table-driven.

Every row ends in a correct result or a clear error. A correct result is checked against the float64 NumPy oracle
of tests/helpers.py. A clear error is a ``ValueError`` / ``TypeError`` whose message matches the row's pattern:
it names the argument or the shapes, not an XLA or Pallas internal. The attention table runs every case against
every entry point with ``dot_product_attention``'s calling convention. A new entry point gets the whole table by
adding one line to ``ATTENTION`` (with the options it takes); module-specific rows follow.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax as aj
from attention_jax import blockwise, flex, linear, masks, mods, multihead, nn, ring, scores, sparse, viz
from attention_jax.kernels import flash_gpu, flash_tpu
from tests.helpers import assert_close, np_mask, np_softmax_attention, randn

ALL = frozenset({"bias", "mask", "is_causal", "scale", "query_seq_lengths", "key_value_seq_lengths",
                 "local_window_size", "q_segment_ids", "kv_segment_ids", "logits_soft_cap"})


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))


def _adapter(implementation):
  fn = nn.make_attention_fn(implementation)
  return lambda q, k, v, bias=None, mask=None, **o: fn(q, k, v, bias, mask, **o)


def _flex(implementation):
  """flex_attention with is_causal as a causal mask_mod (its block mask built from the inputs' lengths)."""
  def fn(q, k, v, is_causal=False, scale=None):
    bm = None
    if is_causal and np.ndim(q) >= 3 and np.ndim(k) >= 3:
      bm = flex.create_block_mask(mods.causal(), None, None, np.shape(q)[-3], np.shape(k)[-3], block_size=8)
    return flex.flex_attention(q, k, v, None, bm, scale=scale, implementation=implementation)
  return fn


# name -> (callable(q, k, v, **options), the options it takes).
ATTENTION: dict[str, tuple[Callable, frozenset]] = {
    "dpa/reference": (functools.partial(aj.dot_product_attention, implementation="reference"), ALL),
    "dpa/xla": (functools.partial(aj.dot_product_attention, implementation="xla"), ALL - {"logits_soft_cap"}),
    "dpa/blockwise": (functools.partial(aj.dot_product_attention, implementation="blockwise"), ALL),
    "dpa/pallas": (functools.partial(aj.dot_product_attention, implementation="pallas"), ALL),
    "dpa/pallas_tpu": (functools.partial(aj.dot_product_attention, implementation="pallas_tpu"), ALL),
    "dpa/auto": (aj.dot_product_attention, ALL),
    "reference_attention": (aj.reference_attention, ALL),
    "blockwise_attention": (functools.partial(blockwise.blockwise_attention, chunk_sizes=8), ALL),
    "flash_attention": (functools.partial(flash_gpu.flash_attention, block_sizes=16), ALL),
    "flash_attention_tpu": (flash_tpu.flash_attention_tpu, ALL),
    "sparse_attention": (lambda q, k, v, **o: sparse.sparse_attention(q, k, v, sparse.LocalPattern(64), block_size=8,
                                                                      **o), frozenset({"is_causal", "scale"})),
    "ring_attention": (lambda q, k, v, **o: ring.ring_attention(q, k, v, mesh=_mesh(), axis_name="sp", **o),
                       frozenset({"is_causal", "scale", "query_seq_lengths", "key_value_seq_lengths",
                                  "logits_soft_cap"})),
    "flex/reference": (_flex("reference"), frozenset({"is_causal", "scale"})),
    "flex/blockwise": (_flex("blockwise"), frozenset({"is_causal", "scale"})),
    "flex/pallas": (_flex("pallas"), frozenset({"is_causal", "scale"})),
    "flex/pallas_tpu": (_flex("pallas_tpu"), frozenset({"is_causal", "scale"})),
    "attention_fn/reference": (_adapter("reference"), ALL),
    "attention_fn/blockwise": (_adapter("blockwise"), ALL),
}
# Entry points whose inputs may be of another rank or dtype by design (the Flax adapter casts and reshapes).
ADAPTERS = ("attention_fn/reference", "attention_fn/blockwise")


@dataclasses.dataclass(frozen=True)
class Error:
  """The call must raise one of ``types`` with a message matching ``pattern``."""
  pattern: str
  types: tuple = (ValueError, TypeError)


@dataclasses.dataclass(frozen=True)
class Ok:
  """The call must return the oracle's result (rows that see a non-finite entry must be non-finite)."""


@dataclasses.dataclass
class Inputs:
  q: Any
  k: Any
  v: Any
  options: dict
  oracle: dict = dataclasses.field(default_factory=dict)   # np_softmax_attention keywords (mask, scale, ...)
  nonfinite_rows: Any = None                               # [B, T, N] rows that must come out non-finite


def _qkv(B=2, T=7, S=9, N=4, K=2, H=16, Hv=None, dtype=jnp.float32, seed=0):
  r = np.random.default_rng(seed)
  return randn(r, (B, T, N, H), dtype), randn(r, (B, S, K, H), dtype), randn(r, (B, S, K, Hv or H), dtype)


def _case(options=None, **shape):
  q, k, v = _qkv(**shape)
  return Inputs(q, k, v, dict(options or {}))


def _nan_query_row():
  q, k, v = _qkv()
  bad = np.zeros((2, 7, 4), bool)
  bad[0, 3, 1] = True
  return Inputs(q.at[0, 3, 1, 5].set(jnp.nan), k, v, {}, oracle=dict(clean_q=q), nonfinite_rows=bad)


def _inf_value_causal():
  q, k, v = _qkv(T=9, S=9)
  bad = np.zeros((2, 9, 4), bool)
  bad[1, 4:, 2:] = True                       # batch 1, kv head 1 (query heads 2, 3), rows that see key 4
  return Inputs(q, k, v.at[1, 4, 1, 0].set(jnp.inf), {"is_causal": True},
                oracle=dict(mask=np_mask(2, 4, 9, 9, causal=True), clean_v=v), nonfinite_rows=bad)


# name -> (inputs factory, expected outcome). Error patterns name what a clear message must mention.
CASES: dict[str, tuple[Callable[[], Inputs], Any]] = {
    "rank2": (lambda: Inputs(*(x[0, 0] for x in _qkv()), {}), Error(r"(?i)query|rank")),
    "rank_mismatch": (lambda: Inputs(_qkv()[0], *(x[0] for x in _qkv()[1:]), {}), Error(r"(?i)rank|query|key")),
    "batch_mismatch": (lambda: Inputs(_qkv()[0][:1], *_qkv()[1:], {}), Error(r"(?i)batch")),
    "kv_length_mismatch": (lambda: Inputs(*_qkv()[:2], _qkv()[2][:, :8], {}), Error(r"(?i)key.*value|value.shape")),
    "head_dim_mismatch": (lambda: Inputs(_qkv()[0][..., :8], *_qkv()[1:], {}), Error(r"(?i)head dim")),
    "heads_not_divisible": (lambda: _case(K=3), Error(r"N=4.*K=3")),
    "mask_unbroadcastable": (lambda: _case({"mask": jnp.ones((2, 1, 7, 8), bool)}),
                             Error(r"mask.*\(2, 1, 7, 8\).*broadcast")),
    "mask_not_bool": (lambda: _case({"mask": jnp.ones((7, 9), jnp.float32)}), Error(r"(?i)mask.*bool")),
    "bias_bool": (lambda: _case({"bias": jnp.ones((7, 9), bool)}), Error(r"(?i)bias")),
    "bias_unbroadcastable": (lambda: _case({"bias": jnp.ones((3, 7, 9))}), Error(r"bias.*\(.*3, 7, 9\)")),
    "kv_lengths_shape": (lambda: _case({"key_value_seq_lengths": jnp.ones((3,), jnp.int32)}),
                         Error(r"key_value_seq_lengths.*\(3,\)")),
    "kv_lengths_too_long": (lambda: _case({"key_value_seq_lengths": jnp.array([10, 3])}),
                            Error(r"key_value_seq_lengths.*\[0, 9\]")),
    "q_lengths_negative": (lambda: _case({"query_seq_lengths": jnp.array([-1, 3])}),
                           Error(r"query_seq_lengths.*\[0, 7\]")),
    "lengths_float": (lambda: _case({"key_value_seq_lengths": jnp.array([3.0, 4.0])}),
                      Error(r"key_value_seq_lengths.*integer")),
    "window_negative": (lambda: _case({"local_window_size": (-1, 2)}), Error(r"(?i)window")),
    "window_string": (lambda: _case({"local_window_size": "12"}), Error(r"(?i)window")),
    "window_float": (lambda: _case({"local_window_size": 2.5}), Error(r"(?i)window")),
    "segments_shape": (lambda: _case({"q_segment_ids": jnp.zeros((2, 6), jnp.int32),
                                      "kv_segment_ids": jnp.zeros((2, 9), jnp.int32)}),
                       Error(r"q_segment_ids.*\(2, 7\)")),
    "soft_cap_negative": (lambda: _case({"logits_soft_cap": -1.0}), Error(r"logits_soft_cap")),
    "int_inputs": (lambda: Inputs(*(x.astype(jnp.int32) for x in _qkv()), {}), Error(r"(?i)float|dtype")),
    "bool_inputs": (lambda: Inputs(*(x > 0 for x in _qkv()), {}), Error(r"(?i)float|dtype")),
    "mixed_dtypes": (lambda: Inputs(_qkv()[0], *(x.astype(jnp.bfloat16) for x in _qkv()[1:]), {}),
                     Error(r"(?i)dtype")),
    "complex_inputs": (lambda: Inputs(*(x.astype(jnp.complex64) for x in _qkv()), {}), Error(r"(?i)complex")),
    "nan_query_row": (_nan_query_row, Ok()),
    "inf_value_causal": (_inf_value_causal, Ok()),
    "t1_s1": (lambda: _case(T=1, S=1), Ok()),
    "head_dim_40_gqa_causal": (lambda: _case({"is_causal": True}, H=40), Ok()),
    "head_dim_72_t_ne_s": (lambda: _case(T=5, S=11, H=72), Ok()),
    "head_dim_256": (lambda: _case(B=1, T=5, S=6, N=2, K=1, H=256), Ok()),
}
# Cases an adapter takes by design: the Flax convention casts float masks to bool and inputs to one dtype.
ADAPTER_OK = {"mask_not_bool", "mixed_dtypes"}
# Documented limits of one entry point: (entry, case) -> the clear error it gives instead.
LIMITS = {
    ("ring_attention", "head_dim_40_gqa_causal"): Error(r"causal ring attention needs T == S.*key.shape"),
}


def _pairs():
  for entry in ATTENTION:
    for name in CASES:
      yield pytest.param(entry, name, id=f"{entry}-{name}")


def _check_ok(fn, inputs: Inputs):
  out = fn(inputs.q, inputs.k, inputs.v, **inputs.options)
  oracle = dict(inputs.oracle)
  q = oracle.pop("clean_q", inputs.q)
  v = oracle.pop("clean_v", inputs.v)
  if "mask" not in oracle and inputs.options:
    opts = inputs.options
    B, T, N = q.shape[:3]
    get = lambda n: None if n not in opts else np.asarray(opts[n])
    oracle["mask"] = np_mask(B, N, T, inputs.k.shape[1], causal=opts.get("is_causal", False),
                             window=opts.get("local_window_size"), q_lengths=get("query_seq_lengths"),
                             kv_lengths=get("key_value_seq_lengths"), mask=get("mask"))
  want, _ = np_softmax_attention(q, inputs.k, v, **oracle)
  out = np.asarray(out, np.float64)
  assert out.shape == want.shape, f"output shape {out.shape} != {want.shape}"
  bad = np.zeros(out.shape[:3], bool) if inputs.nonfinite_rows is None else inputs.nonfinite_rows
  assert not np.isfinite(out[bad]).any(), "rows that see a non-finite entry must not be finite"
  assert_close(out[~bad], want[~bad])


@pytest.mark.parametrize("entry,case", list(_pairs()))
def test_attention_entry_points(entry, case):
  fn, takes = ATTENTION[entry]
  factory, expected = CASES[case]
  expected = LIMITS.get((entry, case), expected)
  inputs = factory()
  unsupported = set(inputs.options) - takes
  if unsupported:
    pytest.skip(f"{entry} takes no {sorted(unsupported)}")
  if entry in ADAPTERS and case in ADAPTER_OK:
    expected = Ok()
    inputs.q, inputs.k, inputs.v = (jnp.asarray(x, jnp.float32) for x in (inputs.q, inputs.k, inputs.v))
    if "mask" in inputs.options:
      inputs.oracle["mask"] = np.broadcast_to(np.asarray(inputs.options["mask"]) != 0, (2, 4, 7, 9))
  if isinstance(expected, Error):
    with pytest.raises(expected.types, match=expected.pattern):
      fn(inputs.q, inputs.k, inputs.v, **inputs.options)
  else:
    _check_ok(fn, inputs)


# ----------------------------------------------------------------------------------------------------------
# Module-specific rows: (name, thunk, expected). Ok() rows only need to run without error here; their results are
# checked against oracles in the module's own tests.
# ----------------------------------------------------------------------------------------------------------

_R = jax.random.key(0)
_Q, _K, _V = _qkv()
_W_TS = jax.nn.softmax(randn(np.random.default_rng(1), (7, 9)), axis=-1)

ROWS: list[tuple[str, Callable[[], Any], Any]] = [
    # masks
    ("causal_mask_float_length", lambda: masks.causal_mask(2.5, 4), Error(r"(?i)q_len|length|int")),
    ("causal_mask_negative_length", lambda: masks.causal_mask(-1, 5), Error(r"(?i)q_len|length|negative|>= 0")),
    ("local_mask_string_window", lambda: masks.local_mask(4, 4, "12"), Error(r"(?i)window")),
    ("local_mask_huge_window", lambda: masks.local_mask(5, 5, 2**31), Ok()),
    ("padding_mask_lengths_2d", lambda: masks.padding_mask(jnp.ones((2, 2), jnp.int32), None, 4, 4),
     Error(r"q_lengths")),
    ("combine_masks_float", lambda: masks.combine_masks(jnp.ones((1, 1, 2, 2))), Error(r"(?i)bool")),
    ("segment_mask_batch_mismatch", lambda: masks.segment_mask(jnp.zeros((2, 3), jnp.int32),
                                                               jnp.zeros((3, 3), jnp.int32)), Error(r"(?i)segment")),
    # scores
    ("dot_rank1", lambda: scores.dot(jnp.ones(4), jnp.ones((3, 4))), Error(r"(?i)q|rank")),
    ("dot_depth_mismatch", lambda: scores.dot(jnp.ones((2, 4)), jnp.ones((3, 5))), Error(r"(?i)depth|D|shape")),
    ("dot_int", lambda: scores.dot(jnp.ones((2, 4), jnp.int32), jnp.ones((3, 4), jnp.int32)), Error(r"(?i)float")),
    ("init_general_zero_dim", lambda: scores.init_general(_R, 0, 4), Error(r"dq")),
    ("init_additive_float_dim", lambda: scores.init_additive(_R, 4, 4, 2.5), Error(r"attn_dim")),
    # attend
    ("attend_int_value", lambda: aj.attend(jnp.zeros((3, 4)), jnp.ones((4, 2), jnp.int32)), Error(r"value")),
    ("attend_s_mismatch", lambda: aj.attend(jnp.zeros((3, 4)), jnp.ones((5, 2))), Error(r"S=4.*S=5")),
    ("attend_float_mask", lambda: aj.attend(jnp.zeros((3, 4)), jnp.ones((4, 2)), jnp.ones((3, 4))),
     Error(r"mask.*bool")),
    # multi-head
    ("init_multi_head_indivisible", lambda: multihead.init_multi_head(_R, 30, 4), Error(r"(?i)d_model|head")),
    ("init_multi_head_kv_heads", lambda: multihead.init_multi_head(_R, 32, 4, 3), Error(r"(?i)kv_heads|multiple")),
    ("multi_head_attention_rank", lambda: multihead.multi_head_attention(
        multihead.init_multi_head(_R, 32, 4), jnp.ones((5, 32)), num_heads=4), Error(r"(?i)x_q|rank|\[B, T")),
    ("multi_head_attention_d_model", lambda: multihead.multi_head_attention(
        multihead.init_multi_head(_R, 32, 4), jnp.ones((2, 5, 16)), num_heads=4), Error(r"(?i)d_model|32|16")),
    # blockwise / kernels / sparse sizes
    ("chunk_sizes_zero", lambda: blockwise.blockwise_attention(_Q, _K, _V, chunk_sizes=0), Error(r"(?i)chunk")),
    ("chunk_sizes_float", lambda: blockwise.blockwise_attention(_Q, _K, _V, chunk_sizes=2.5), Error(r"(?i)chunk")),
    ("chunk_sizes_int", lambda: blockwise.blockwise_attention(_Q, _K, _V, chunk_sizes=4), Ok()),
    ("block_sizes_zero", lambda: flash_gpu.flash_attention(_Q, _K, _V, block_sizes=0), Error(r"(?i)block")),
    ("block_sizes_not_pow2", lambda: flash_gpu.flash_attention(_Q, _K, _V, block_sizes=24), Error(r"(?i)block")),
    ("block_sizes_int", lambda: flash_gpu.flash_attention(_Q, _K, _V, block_sizes=16), Ok()),
    ("tpu_block_sizes_negative", lambda: flash_tpu.flash_attention_tpu(_Q, _K, _V, block_sizes=-128),
     Error(r"(?i)block")),
    ("sparse_block_size_zero", lambda: sparse.sparse_attention(_Q, _K, _V, sparse.LocalPattern(2), block_size=0),
     Error(r"(?i)block_size")),
    ("sparse_pattern_negative", lambda: sparse.LocalPattern(-1), Error(r"(?i)window")),
    ("sparse_pattern_float", lambda: sparse.StridedPattern(2.5), Error(r"(?i)stride")),
    ("sparse_not_a_pattern", lambda: sparse.sparse_attention(_Q, _K, _V, "local"), Error(r"(?i)pattern")),
    # linear
    ("favor_float_head_dim", lambda: linear.favor_feature_map(_R, 16.5, 64), Error(r"head_dim")),
    ("favor_zero_features", lambda: linear.favor_feature_map(_R, 16, 0), Error(r"num_features")),
    ("linear_chunk_zero", lambda: linear.linear_attention(_Q, _K, _V, is_causal=True, chunk_size=0),
     Error(r"chunk_size")),
    ("linear_int_inputs", lambda: linear.linear_attention(*(x.astype(jnp.int32) for x in (_Q, _K, _V))),
     Error(r"(?i)float|dtype")),
    ("linear_unknown_feature_map", lambda: linear.linear_attention(_Q, _K, _V, feature_map="softmax"),
     Error(r"(?i)feature_map")),
    ("linear_step_int_value", lambda: linear.linear_attention_step(
        linear.init_state(2, 2, 16), _Q[:, 0], _K[:, 0], _V[:, 0].astype(jnp.int32)), Error(r"(?i)float|dtype")),
    ("linear_step_state_mismatch", lambda: linear.linear_attention_step(
        linear.init_state(2, 3, 16), _Q[:, 0], _K[:, 0], _V[:, 0]), Error(r"(?i)state|K=|heads")),
    # linear recurrences (self-attention: key / value have query's length)
    ("decayed_log_decay_per_kv_head", lambda: linear.decayed_linear_attention(
        _Q, _K[:, :7], _V[:, :7], jnp.zeros(_K.shape[2])), Error(r"log_decay")),
    ("decayed_cross_attention", lambda: linear.decayed_linear_attention(_Q, _K, _V, jnp.zeros(_Q.shape[2])),
     Error(r"key\.shape=\(2, 9")),
    ("decayed_ok", lambda: linear.decayed_linear_attention(_Q, _K[:, :7], _V[:, :7], jnp.zeros(_Q.shape[2])),
     Ok()),
    ("delta_beta_per_channel", lambda: linear.delta_rule_attention(_Q, _K[:, :7], _V[:, :7], jnp.zeros(_Q.shape)),
     Error(r"beta")),
    ("delta_int_beta", lambda: linear.delta_rule_attention(_Q, _K[:, :7], _V[:, :7],
                                                           jnp.zeros(_Q.shape[:3], jnp.int32)), Error(r"beta\.dtype")),
    # ring
    ("ring_missing_axis", lambda: ring.ring_attention(_Q, _K, _V, mesh=_mesh(), axis_name="tp"),
     Error(r"(?i)axis")),
    # flax
    ("make_attention_fn_unknown_option", lambda: nn.make_attention_fn("reference", windw=3), Error(r"windw")),
    ("make_attention_fn_unknown_impl", lambda: nn.make_attention_fn("flash"), Error(r"flash")),
    ("attention_fn_dropout_rate", lambda: nn.make_attention_fn("reference")(
        _Q, _K, _V, dropout_rate=1.5, dropout_rng=_R), Error(r"dropout_rate")),
    # viz
    ("plot_attention_rank3", lambda: viz.plot_attention(jnp.ones((2, 3, 4)), None), Error(r"(?i)weights|rank|2")),
    ("plot_attention_token_count", lambda: viz.plot_attention(_W_TS, list("abc")), Error(r"(?i)token")),
    ("plot_heads_rank2", lambda: viz.plot_heads(_W_TS, None), Error(r"(?i)weights|rank|3")),
    ("attention_entropy_rank1", lambda: viz.attention_entropy(jnp.ones(3)), Error(r"(?i)weights|rank")),
]


@pytest.mark.parametrize("name,thunk,expected", ROWS, ids=[r[0] for r in ROWS])
def test_module_rows(name, thunk, expected):
  if isinstance(expected, Error):
    with pytest.raises(expected.types, match=expected.pattern):
      jax.block_until_ready(thunk())
  else:
    jax.block_until_ready(thunk())
