"""Multi-device checks of attention_jax.ring, run by tests/test_ring.py in a subprocess with 8 virtual CPU devices.

The device count must be fixed before jax initialises, and tests/conftest.py imports jax for every test, so these
checks cannot run inside the pytest process. Usage (from the repository root):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.ring_worker CHECK [CHECK ...]

Prints one JSON line per check: ``{"check", "ok", "error" (traceback or ""), "seconds", "cpu_seconds"}``.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json
import sys
import time
import traceback

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import attention_jax as aj
from attention_jax import blockwise, ring
from tests.helpers import assert_close, np_mask, np_softmax_attention, randn

jax.config.update("jax_numpy_rank_promotion", "raise")   # as tests/conftest.py

CHECKS = {}


def check(fn):
  CHECKS[fn.__name__] = fn
  return fn


def _mesh(n: int = 8, name: str = "seq", axis_type=None):
  kw = {} if axis_type is None else dict(axis_types=(axis_type,))
  return jax.make_mesh((n,), (name,), **kw)


def _inputs(seed, B, T, S, N, K, H, dtype):
  r = np.random.default_rng(seed)
  q, k, v = randn(r, (B, T, N, H), dtype), randn(r, (B, S, K, H), dtype), randn(r, (B, S, K, H), dtype)
  return q, k, v, randn(r, (B, T, N, H), dtype)


def _fwd_bwd(fn, q, k, v, ct):
  """``(out, lse, (dq, dk, dv))`` of ``fn(q, k, v, return_residual=True)`` for output cotangent ``ct``."""
  (out, lse), pull = jax.vjp(lambda q, k, v: fn(q, k, v, return_residual=True), q, k, v)
  return out, lse, pull((ct, jnp.zeros_like(lse)))


def _compare(q, k, v, ct, *, mesh, axis_name="seq", chunk_sizes=None, put=None, **options):
  """Ring (jitted; on ``put(x)`` inputs) vs the single-device reference: forward, logsumexp and gradients."""
  ring_fn = lambda q, k, v, **kw: ring.ring_attention(q, k, v, mesh=mesh, axis_name=axis_name,
                                                      chunk_sizes=chunk_sizes, **options, **kw)
  ref_options = {k_: v_ for k_, v_ in options.items() if k_ not in ("load_balance", "implementation")}
  ref_fn = lambda q, k, v, **kw: aj.reference_attention(q, k, v, **ref_options, **kw)
  got = jax.jit(lambda *a: _fwd_bwd(ring_fn, *a))(*((q, k, v, ct) if put is None else map(put, (q, k, v, ct))))
  want = jax.jit(lambda *a: _fwd_bwd(ref_fn, *a))(q, k, v, ct)
  dtype = q.dtype
  assert got[0].dtype == dtype and got[0].shape == q.shape, (got[0].dtype, got[0].shape)
  assert_close(got[0], want[0], dtype, "fwd", "output")
  assert_close(got[1], want[1], "float32", "fwd" if dtype == jnp.float32 else "grad", "logsumexp")
  for name, g, w in zip(("dq", "dk", "dv"), got[2], want[2]):
    assert g.dtype == dtype, (name, g.dtype)
    assert_close(g, w, dtype, "grad", name)
  chex.assert_tree_all_finite(got[2])
  return got, want


# ----------------------------------------------------------------------------------------------------------
# Causal (zig-zag load balancing by default)
# ----------------------------------------------------------------------------------------------------------


@check
def causal_gqa_float32():
  """T=48 over 8 devices: 16 zig-zag chunks of 3 rows (odd per-shard lengths), GQA 4:2; plus a float64 oracle."""
  q, k, v, ct = _inputs(0, B=2, T=48, S=48, N=4, K=2, H=16, dtype=jnp.float32)
  got, _ = _compare(q, k, v, ct, mesh=_mesh(), is_causal=True, chunk_sizes=blockwise.ChunkSizes(2, 2))
  want, _ = np_softmax_attention(q, k, v, mask=np_mask(2, 4, 48, 48, causal=True))
  assert_close(got[0], want, jnp.float32, "fwd", "float64 oracle")


@check
def causal_uneven_lengths_float32():
  """T=37 (not a multiple of 16: padded and masked), query/key lengths, a batch row with no visible key."""
  q, k, v, ct = _inputs(1, B=3, T=37, S=37, N=2, K=1, H=16, dtype=jnp.float32)
  q_len, kv_len = jnp.asarray([37, 20, 37], jnp.int32), jnp.asarray([0, 30, 11], jnp.int32)
  got, _ = _compare(q, k, v, ct, mesh=_mesh(), is_causal=True, query_seq_lengths=q_len,
                    key_value_seq_lengths=kv_len)
  out, lse, grads = got
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)           # kv length 0: zeros, lse -inf, finite grads
  assert np.all(np.isneginf(np.asarray(lse[0])))
  np.testing.assert_array_equal(np.asarray(out[1, 20:]), 0.0)       # padded queries
  mask = np_mask(3, 2, 37, 37, causal=True, q_lengths=q_len, kv_lengths=kv_len)
  assert_close(out, np_softmax_attention(q, k, v, mask=mask)[0], jnp.float32, "fwd", "float64 oracle")


@check
def causal_bfloat16():
  q, k, v, ct = _inputs(2, B=1, T=64, S=64, N=4, K=1, H=32, dtype=jnp.bfloat16)
  _compare(q, k, v, ct, mesh=_mesh(), is_causal=True)


@check
def causal_contiguous_float32():
  """load_balance=False: contiguous shards of 5 rows, later key blocks skipped."""
  q, k, v, ct = _inputs(3, B=1, T=40, S=40, N=2, K=2, H=16, dtype=jnp.float32)
  _compare(q, k, v, ct, mesh=_mesh(), is_causal=True, load_balance=False,
           key_value_seq_lengths=jnp.asarray([33], jnp.int32))


@check
def work_balance():
  """Chunk pairs each device computes, counted in the running ring: zig-zag within 10%, contiguous far apart."""
  q, k, v, _ = _inputs(4, B=1, T=64, S=64, N=1, K=1, H=8, dtype=jnp.float32)
  mesh, P_ = _mesh(), 8

  def per_device(**kw):
    counts = np.asarray(ring.ring_block_counts(q, k, v, mesh=mesh, axis_name="seq", **kw))
    assert counts.shape == (P_, 3), counts.shape
    return counts

  zz = per_device(is_causal=True)
  n = 2   # chunks per device in zig-zag order
  assert np.all(zz.sum(axis=1) == n * n * P_), zz
  blocks = zz[:, ring.FULL] + zz[:, ring.DIAGONAL]                  # non-skipped chunk pairs
  work = zz[:, ring.FULL] + 0.5 * zz[:, ring.DIAGONAL]              # a diagonal pair is half a full one
  for name, w in (("blocks", blocks), ("work", work)):
    assert (w.max() - w.min()) <= 0.1 * w.max(), (name, w.tolist())
  # Causal attention is n^2 P^2 / 2 chunk pairs of work in total, so skipping is real: about half is skipped.
  assert work.sum() == (n * P_) ** 2 / 2, work.sum()
  contiguous = per_device(is_causal=True, load_balance=False)
  c_blocks = contiguous[:, ring.FULL] + contiguous[:, ring.DIAGONAL]
  assert c_blocks.tolist() == list(range(1, P_ + 1)), c_blocks.tolist()   # device d: d earlier blocks + diagonal
  assert (c_blocks.max() - c_blocks.min()) > 0.1 * c_blocks.max()
  full = per_device(is_causal=False)
  assert np.all(full[:, ring.FULL] == P_) and np.all(full[:, ring.SKIP] == 0), full


# ----------------------------------------------------------------------------------------------------------
# Non-causal, cross attention, sequence order
# ----------------------------------------------------------------------------------------------------------


@check
def cross_lengths_float32():
  """T=30, S=51 (neither a multiple of 8), MQA, key lengths, a logits soft-cap."""
  q, k, v, ct = _inputs(5, B=2, T=30, S=51, N=4, K=1, H=16, dtype=jnp.float32)
  kv_len = jnp.asarray([20, 51], jnp.int32)
  got, _ = _compare(q, k, v, ct, mesh=_mesh(), key_value_seq_lengths=kv_len, logits_soft_cap=2.0)
  mask = np_mask(2, 4, 30, 51, kv_lengths=kv_len)
  want = np_softmax_attention(q, k, v, mask=mask, soft_cap=2.0)[0]
  assert_close(got[0], want, jnp.float32, "fwd", "float64 oracle")


@check
def noncausal_bfloat16():
  q, k, v, ct = _inputs(6, B=2, T=40, S=24, N=4, K=2, H=32, dtype=jnp.bfloat16)
  _compare(q, k, v, ct, mesh=_mesh(), scale=0.2)


@check
def zigzag_sequence_order():
  """Inputs already in zig-zag order: no reordering, same function of the reordered sequence."""
  q, k, v, ct = _inputs(7, B=1, T=32, S=32, N=2, K=1, H=16, dtype=jnp.float32)
  mesh = _mesh()
  zz = lambda x: ring.to_zigzag(x, 8)
  got = ring.ring_attention(zz(q), zz(k), zz(v), mesh=mesh, axis_name="seq", is_causal=True,
                            sequence_order="zigzag")
  assert_close(ring.from_zigzag(got, 8), aj.reference_attention(q, k, v, is_causal=True))
  ref = ring.ring_attention_reference(zz(q), zz(k), zz(v), mesh=mesh, axis_name="seq", is_causal=True,
                                      sequence_order="zigzag")
  assert_close(got, ref)


# ----------------------------------------------------------------------------------------------------------
# Meshes and transformations
# ----------------------------------------------------------------------------------------------------------


def _small_case(seed=8):
  return _inputs(seed, B=2, T=32, S=32, N=2, K=1, H=16, dtype=jnp.float32)


@check
def explicit_mesh_sharded_inputs():
  """jax.make_mesh's default Explicit axes, inputs sharded along T: output sharded along T, typed as such."""
  q, k, v, _ = _small_case()
  mesh = _mesh()
  assert mesh.axis_types == (AxisType.Explicit,)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "seq")))
  out = ring.ring_attention(put(q), put(k), put(v), mesh=mesh, axis_name="seq", is_causal=True)
  assert jax.typeof(out).sharding.spec == P(None, "seq", None, None), jax.typeof(out)
  assert out.sharding.spec == P(None, "seq", None, None), out.sharding
  assert_close(out, aj.reference_attention(q, k, v, is_causal=True))
  ref = ring.ring_attention_reference(put(q), put(k), put(v), mesh=mesh, axis_name="seq", is_causal=True)
  assert_close(ref, out)


@check
def set_mesh_context_jit():
  """Inside jax.set_mesh(explicit mesh), jitted, gradients included."""
  q, k, v, ct = _small_case(9)
  mesh = _mesh()
  with jax.set_mesh(mesh):
    _compare(q, k, v, ct, mesh=mesh, is_causal=True)
    out = jax.jit(lambda q, k, v: ring.ring_attention(q, k, v, mesh=mesh, axis_name="seq"))(q, k, v)
  assert jax.typeof(out).sharding.spec == P(None, "seq", None, None), jax.typeof(out)


@check
def auto_mesh_and_vmap():
  """An Auto-axis mesh; jax.vmap over an extra leading batch dim."""
  q, k, v, _ = _small_case(10)
  mesh = _mesh(axis_type=AxisType.Auto)
  f = lambda q, k, v: ring.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)
  out = jax.jit(jax.vmap(f))(jnp.stack([q, -q]), jnp.stack([k, k]), jnp.stack([v, 2 * v]))
  assert_close(out[1], aj.reference_attention(-q, k, 2 * v, is_causal=True))


@check
def two_axis_mesh():
  """Mesh ("data", "seq") = (2, 4): batch sharded over "data" stays sharded; the ring runs over "seq"."""
  q, k, v, ct = _small_case(11)
  mesh = jax.make_mesh((2, 4), ("data", "seq"))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
  (out, _, grads), _ = _compare(q, k, v, ct, mesh=mesh, is_causal=True, put=put)
  assert jax.typeof(grads[1]).sharding.spec == P("data", "seq", None, None), jax.typeof(grads[1])
  assert jax.typeof(out).sharding.spec == P("data", "seq", None, None), jax.typeof(out)


@check
def memory_analysis_is_per_device():
  """``Compiled.memory_analysis()`` of an SPMD program reports one device's sizes (experiments/scaling.py uses it).

  Known case: x of 8 MiB float32 sharded 8 ways along its second axis; y = 2 * x has the same sharding, so one
  device holds 1 MiB of argument and 1 MiB of output.
  """
  mesh = _mesh(axis_type=AxisType.Auto)
  x = jax.device_put(jnp.ones((4, 2 ** 19), jnp.float32), NamedSharding(mesh, P(None, "seq")))
  mem = jax.jit(lambda x: 2 * x).lower(x).compile().memory_analysis()
  assert mem.argument_size_in_bytes == 2 ** 20, mem.argument_size_in_bytes
  assert mem.output_size_in_bytes == 2 ** 20, mem.output_size_in_bytes
  # The ring's per-device arguments are 1/8 of the global q/k/v even when they arrive unsharded (uncommitted).
  q, k, v, _ = _inputs(12, B=1, T=1024, S=1024, N=1, K=1, H=32, dtype=jnp.float32)
  f = jax.jit(lambda q, k, v: ring.ring_attention(q, k, v, mesh=_mesh(), axis_name="seq", is_causal=True))
  mem = f.lower(q, k, v).compile().memory_analysis()
  assert mem.argument_size_in_bytes == 3 * q.nbytes // 8, (mem.argument_size_in_bytes, q.nbytes)


# ----------------------------------------------------------------------------------------------------------
# Slow: larger shapes, the Pallas kernel per shard (interpret mode on CPU)
# ----------------------------------------------------------------------------------------------------------


@check
def causal_t1000_gqa_default_chunks():
  q, k, v, ct = _inputs(13, B=1, T=1000, S=1000, N=8, K=2, H=64, dtype=jnp.float32)
  _compare(q, k, v, ct, mesh=_mesh(), is_causal=True, key_value_seq_lengths=jnp.asarray([900], jnp.int32))


@check
def pallas_per_shard_interpret():
  q, k, v, ct = _inputs(14, B=1, T=64, S=64, N=2, K=1, H=16, dtype=jnp.float32)
  _compare(q, k, v, ct, mesh=_mesh(2), is_causal=True, implementation="pallas",
           key_value_seq_lengths=jnp.asarray([50], jnp.int32))


def main(names: list[str]) -> None:
  unknown = [n for n in names if n not in CHECKS]
  if unknown:
    raise SystemExit(f"unknown checks {unknown}; known: {sorted(CHECKS)}")
  assert len(jax.devices()) == 8, jax.devices()
  for name in names:
    t0, c0 = time.perf_counter(), time.process_time()
    try:
      CHECKS[name]()
      ok, error = True, ""
    except Exception:  # noqa: BLE001 -- reported to the parent test
      ok, error = False, traceback.format_exc()
    print(json.dumps(dict(check=name, ok=ok, error=error, seconds=round(time.perf_counter() - t0, 2),
                          cpu_seconds=round(time.process_time() - c0, 2))), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
