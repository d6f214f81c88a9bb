"""One correctness suite for every memory-efficient implementation (style: jax's gpu_ops_test).

Subclasses set ``attention(q, k, v, **options)`` (returning ``(out, lse)``) and the case lists; every case is
checked forward, logsumexp and dq/dk/dv against ``attention_jax.reference_attention`` with the per-dtype
tolerances of tests/helpers.py. Not collected by pytest itself (no ``test_`` prefix).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import attention_jax as aj
from tests.helpers import assert_close, randn


def make_inputs(case: dict, dtype, seed: int = 0):
  """Random q/k/v and options for a case dict {B, T, S, N, K, H, options...}."""
  r = np.random.default_rng(seed)
  B, T, S, N, K, H = (case[k] for k in "BTSNKH")
  scale = case.get("input_scale", 1.0)
  q, k, v = randn(r, (B, T, N, H), dtype, scale), randn(r, (B, S, K, H), dtype, scale), randn(r, (B, S, K, H), dtype)
  opts = dict(case.get("options", {}))
  if case.get("segments"):
    # Packed sequences: sorted ids, the same packing for queries and keys when T == S.
    q_seg = np.sort(r.integers(0, case["segments"], (B, T)), axis=1)
    kv_seg = q_seg if T == S else np.sort(r.integers(0, case["segments"], (B, S)), axis=1)
    opts["q_segment_ids"], opts["kv_segment_ids"] = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)
  for name in ("query_seq_lengths", "key_value_seq_lengths"):
    if name in opts:
      opts[name] = jnp.asarray(opts[name], jnp.int32)
  if case.get("bias"):
    opts["bias"] = randn(r, (1, N, T, S), jnp.float32)
  if case.get("mask"):
    opts["mask"] = jnp.asarray(r.random((B, 1, T, S)) > 0.3)
  return q, k, v, opts


# name -> case. Shapes are small so that Pallas interpret mode stays quick on CPU.
CASES = {
    "t1": dict(B=2, T=1, S=17, N=2, K=2, H=32),
    "t17_causal": dict(B=1, T=17, S=17, N=2, K=1, H=32, options=dict(is_causal=True)),
    "t333_s200_causal_gqa": dict(B=1, T=333, S=200, N=8, K=2, H=32, options=dict(is_causal=True)),
    "t200_s333_gqa": dict(B=1, T=200, S=333, N=8, K=2, H=32),
    "t90_segments_causal": dict(B=2, T=90, S=90, N=2, K=1, H=32, segments=3, options=dict(is_causal=True)),
    "t70_s50_segments": dict(B=2, T=70, S=50, N=2, K=2, H=16, segments=2),
    "lengths": dict(B=2, T=64, S=100, N=2, K=1, H=32,
                    options=dict(key_value_seq_lengths=[37, 100], query_seq_lengths=[64, 41])),
    "window": dict(B=1, T=150, S=150, N=2, K=2, H=32, options=dict(local_window_size=(16, 8))),
    "window_causal": dict(B=1, T=150, S=120, N=2, K=1, H=32, options=dict(is_causal=True, local_window_size=(32, 0))),
    "soft_cap": dict(B=1, T=70, S=70, N=2, K=2, H=32, input_scale=3.0, options=dict(logits_soft_cap=5.0)),
    "masked_rows": dict(B=2, T=40, S=40, N=2, K=2, H=32,
                        options=dict(key_value_seq_lengths=[0, 30], local_window_size=(0, 3))),
    "mqa_scale": dict(B=2, T=48, S=48, N=4, K=1, H=32, options=dict(scale=0.3, is_causal=True)),
    "h80": dict(B=1, T=40, S=40, N=2, K=2, H=80, options=dict(is_causal=True)),
    "h256": dict(B=1, T=33, S=33, N=1, K=1, H=256),
}
LOW_PRECISION_CASES = ("t17_causal", "t333_s200_causal_gqa", "t90_segments_causal", "soft_cap", "masked_rows")
SLOW_CASES = {
    "t1000_causal_gqa": dict(B=1, T=1000, S=1000, N=8, K=2, H=64, options=dict(is_causal=True)),
    "t1000_s777_window_lengths": dict(B=2, T=1000, S=777, N=4, K=2, H=64,
                                      options=dict(local_window_size=(100, 50), key_value_seq_lengths=[600, 777])),
}


def _has_key_rows(q, k, v, opts):
  """[B, N, T] rows that see at least one key, from the reference's residual."""
  _, lse = aj.reference_attention(q, k, v, return_residual=True, **opts)
  return np.isfinite(np.asarray(lse))


class AttentionSuite(parameterized.TestCase):
  """Override ``attention``; subclasses pick which case names to run via parameterization helpers."""

  def attention(self, q, k, v, **options):
    raise NotImplementedError

  def check_case(self, case: dict, dtype, seed: int = 0):
    q, k, v, opts = make_inputs(case, dtype, seed)
    out, lse = self.attention(q, k, v, **opts)
    want_out, want_lse = aj.reference_attention(q, k, v, return_residual=True, **opts)
    chex.assert_shape(out, q.shape)
    self.assertEqual(out.dtype, q.dtype)
    self.assertEqual(lse.dtype, jnp.float32)
    assert_close(out, want_out, dtype, err_msg="output")
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse), err_msg="rows with no visible key")
    finite = np.isfinite(np.asarray(want_lse))
    assert_close(np.asarray(lse)[finite], np.asarray(want_lse)[finite], "float32" if dtype == jnp.float32
                 else dtype, err_msg="logsumexp")
    # Rows without keys: exact zeros.
    dead = ~_has_key_rows(q, k, v, opts)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)).transpose(0, 2, 1, 3)[dead], 0.0)

    ct = randn(np.random.default_rng(seed + 1), q.shape, dtype)
    diff = [n for n in ("bias",) if n in opts]
    arrays = {n: opts.pop(n) for n in diff}

    def loss(fn):
      return lambda q, k, v, arrays: (fn(q, k, v, **arrays, **opts)[0].astype(jnp.float32) *
                                      ct.astype(jnp.float32)).sum()
    ref = lambda q, k, v, **o: aj.reference_attention(q, k, v, return_residual=True, **o)
    got = jax.grad(loss(self.attention), argnums=(0, 1, 2, 3))(q, k, v, arrays)
    want = jax.grad(loss(ref), argnums=(0, 1, 2, 3))(q, k, v, arrays)
    chex.assert_tree_all_finite(got)
    for name, g, w in zip(("dq", "dk", "dv"), got[:3], want[:3]):
      self.assertEqual(g.dtype, q.dtype)
      assert_close(g, w, dtype, kind="grad", err_msg=name)
    for name in diff:
      assert_close(got[3][name], want[3][name], "float32", kind="grad", err_msg=f"d{name}")
