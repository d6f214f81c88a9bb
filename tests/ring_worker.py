"""Multi-device checks of attention_jax.ring, run by tests/test_ring.py in a subprocess with 8 virtual CPU devices.

The device count must be fixed before jax initialises, and tests/conftest.py imports jax for every test, so these
checks cannot run inside the pytest process. Usage (from the repository root):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.ring_worker CHECK [CHECK ...]

Prints one JSON line per check: ``{"check", "ok", "error" (traceback or ""), "seconds", "cpu_seconds"}``.
``RING_WORKER_VERBOSE=1`` also prints each mesh-matrix cell's result and CPU time to stderr.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import contextlib
import json
import sys
import time
import traceback

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
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
  assert got[1].dtype == dtype and got[1].shape == q.shape[:-1], (got[1].dtype, got[1].shape)   # as jax.nn
  assert_close(got[1], want[1], dtype, "fwd", "logsumexp")
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
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)           # kv length 0: zeros, lowest lse, finite grads
  np.testing.assert_array_equal(np.asarray(lse[0]), np.finfo(np.float32).min)
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
  """Inputs already in zig-zag order: no reordering, same function of the reordered sequence (key lengths are
  natural positions; NaN keys beyond them, scattered by the reordering, reach nothing)."""
  q, k, v, ct = _inputs(7, B=1, T=32, S=32, N=2, K=1, H=16, dtype=jnp.float32)
  kv_len = np.asarray([27], np.int32)
  k_bad = k.at[:, 27:].set(jnp.nan)
  mesh = _mesh()
  zz = lambda x: ring.to_zigzag(x, 8)
  got = ring.ring_attention(zz(q), zz(k_bad), zz(v), mesh=mesh, axis_name="seq", is_causal=True,
                            sequence_order="zigzag", key_value_seq_lengths=kv_len)
  mask = np_mask(1, 2, 32, 32, causal=True, kv_lengths=kv_len)
  assert_close(ring.from_zigzag(got, 8), np_softmax_attention(q, k, v, mask=mask)[0])
  ref = ring.ring_attention_reference(zz(q), zz(k), zz(v), mesh=mesh, axis_name="seq", is_causal=True,
                                      sequence_order="zigzag", key_value_seq_lengths=kv_len)
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
# Float64 oracles beyond tests/helpers: gradients, and a value head dim that differs from the query/key one
# ----------------------------------------------------------------------------------------------------------


def np_attention_grads(q, k, v, d_out, mask, scale=None):
  """Float64 NumPy ``(dq, dk, dv)`` of ``sum(attention(q, k, v) * d_out)`` from the softmax derivative:
  dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = scale dS K, dK = scale dS^T Q (GQA: kv head
  j serves query heads j*G .. j*G+G-1, so its gradient sums theirs). Rows with no visible key contribute 0."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  B, T, N, H = q.shape
  S, K = k.shape[1:3]
  G = N // K
  scale = 1.0 / np.sqrt(H) if scale is None else scale
  k_rep, v_rep = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  visible = np.broadcast_to(np.asarray(mask), (B, N, T, S))
  s = np.where(visible, np.einsum("btnh,bsnh->bnts", q, k_rep) * scale, -np.inf)
  m = s.max(axis=-1, keepdims=True)
  e = np.where(visible, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
  den = e.sum(axis=-1, keepdims=True)
  p = e / np.where(den > 0, den, 1.0)
  dv = np.einsum("bnts,btnh->bsnh", p, d_out)
  dp = np.einsum("btnh,bsnh->bnts", d_out, v_rep)
  ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
  dq = np.einsum("bnts,bsnh->btnh", ds, k_rep) * scale
  dk = np.einsum("bnts,btnh->bsnh", ds, q) * scale
  per_kv_head = lambda x: x.reshape(B, S, K, G, x.shape[-1]).sum(axis=3)
  return dq, per_kv_head(dk), per_kv_head(dv)


def np_attention(q, k, v, mask):
  """tests/helpers.np_softmax_attention's output, also for a value head dim Hv != H: attention is linear in each
  value column, so column j is the output for a value whose every column is column j."""
  H, Hv = q.shape[-1], v.shape[-1]
  if Hv == H:
    return np_softmax_attention(q, k, v, mask=mask)[0]
  v = np.asarray(v, np.float64)
  cols = [np_softmax_attention(q, k, np.repeat(v[..., j:j + 1], H, axis=-1), mask=mask)[0][..., 0]
          for j in range(Hv)]
  return np.stack(cols, axis=-1)


def _check_grads(got, q, k, v, ct, mask, err_msg=""):
  for name, g, w in zip(("dq", "dk", "dv"), got, np_attention_grads(q, k, v, ct, mask)):
    assert_close(g, w, jnp.float32, "grad", f"{name} {err_msg}")


# ----------------------------------------------------------------------------------------------------------
# Every mesh construction x input placement x direct / jitted call, against the float64 oracle
# ----------------------------------------------------------------------------------------------------------


def _mesh_kinds(shape, names) -> list:
  """``(label, mesh, context or None)``: Mesh(...) (Auto axes), jax.make_mesh (Explicit axes), each of them set
  with jax.set_mesh, and jax.sharding.use_mesh where this jax has it."""
  auto = Mesh(np.array(jax.devices()).reshape(shape), names)
  explicit = jax.make_mesh(shape, names)
  assert auto.axis_types == (AxisType.Auto,) * len(shape), auto.axis_types
  assert explicit.axis_types == (AxisType.Explicit,) * len(shape), explicit.axis_types
  kinds = [("Mesh", auto, None), ("make_mesh", explicit, None), ("set_mesh(make_mesh)", explicit, jax.set_mesh),
           ("set_mesh(Mesh)", auto, jax.set_mesh)]
  use_mesh = getattr(jax.sharding, "use_mesh", None)
  if use_mesh is not None:
    kinds.append(("use_mesh(make_mesh)", explicit, use_mesh))
  return kinds


# How the inputs arrive: uncommitted (jnp.asarray), committed to one device, sharded along T over "sp", sharded
# along B over "dp" and T over "sp" (on a ("dp", "sp") = (2, 4) mesh; the others use an ("sp",) = (8,) mesh).
PLACEMENTS = ("uncommitted", "committed", "seq", "batch_seq")


def _put(placement: str, mesh: Mesh, x):
  if placement == "uncommitted":
    x = jnp.asarray(x)
    assert not x.committed
    return x
  if placement == "committed":
    return jax.device_put(x, jax.devices()[5])
  if x.ndim == 1:   # lengths
    return jax.device_put(x, NamedSharding(mesh, P()))
  return jax.device_put(x, NamedSharding(mesh, P("dp", "sp") if placement == "batch_seq" else P(None, "sp")))


def _matrix_case():
  q, k, v, ct = _inputs(20, B=2, T=32, S=32, N=2, K=1, H=8, dtype=jnp.float32)
  return q, k, v, ct, np.asarray([32, 27], np.int32), np.asarray([29, 12], np.int32)


def _matrix_cell(case, label: str, mesh: Mesh, context, placement: str, call: str, causal: bool,
                 grads: bool) -> str:
  """One matrix entry: forward (and gradients) vs the float64 oracle, and the output's sharding."""
  q, k, v, ct, q_len, kv_len = case
  B, T, N, _ = q.shape
  err = f"{label} {placement} {call} causal={causal}"
  f = lambda q, k, v, q_len, kv_len: ring.ring_attention(q, k, v, mesh=mesh, axis_name="sp", is_causal=causal,
                                                         query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
  loss = lambda q, k, v, q_len, kv_len: (f(q, k, v, q_len, kv_len) * ct).sum()
  args = [_put(placement, mesh, x) for x in (q, k, v, q_len, kv_len)]
  wrap = jax.jit if call == "jit" else (lambda fn: fn)
  status, got_grads = "ok", None
  with context(mesh) if context else contextlib.nullcontext():
    try:
      out = wrap(f)(*args)
    except ValueError as e:
      # jax.jit refuses arguments committed to devices other than the computation's, before the ring sees them.
      if placement == "committed" and call == "jit" and "incompatible devices" in str(e):
        return "jit refuses committed"
      raise AssertionError(err) from e
    try:
      got_grads = wrap(jax.grad(loss, argnums=(0, 1, 2)))(*args) if grads else None
    except ValueError as e:
      # Eager jax.grad of explicitly sharded arrays needs a jax.set_mesh context (plain jnp code too).
      if not (call == "direct" and context is None and "mesh context" in str(e)):
        raise AssertionError(err) from e
      status = "eager grad of explicit arrays needs set_mesh"
  mask = np_mask(B, N, T, T, causal=causal, q_lengths=q_len, kv_lengths=kv_len)
  assert out.shape == q.shape and out.dtype == q.dtype, (err, out.shape, out.dtype)
  assert_close(out, np_softmax_attention(q, k, v, mask=mask)[0], jnp.float32, "fwd", err)
  ring_size = 4 if placement == "batch_seq" else 8
  shard = out.sharding.shard_shape(out.shape)
  assert shard[1] == T // ring_size, (err, "output not sharded along T", out.sharding)
  if placement == "batch_seq":
    assert shard[0] == B // 2, (err, "batch sharding lost", out.sharding)
  if got_grads is not None:
    _check_grads(got_grads, q, k, v, ct, mask, err)
  return status


# The fast matrix runs every cell non-causal, forward only, except these: gradients in one cell per mesh kind and
# per placement, causal in another such set (direct for committed inputs, which jax.jit refuses).
GRADIENT_CELLS = {("Mesh", "uncommitted", "jit"), ("make_mesh", "committed", "direct"),
                  ("set_mesh(make_mesh)", "seq", "jit"), ("set_mesh(Mesh)", "batch_seq", "jit")}
CAUSAL_CELLS = {("set_mesh(Mesh)", "uncommitted", "direct"), ("set_mesh(make_mesh)", "committed", "direct"),
                ("make_mesh", "seq", "jit"), ("Mesh", "batch_seq", "direct")}


def _mesh_matrix(full: bool) -> None:
  case = _matrix_case()
  results = {}
  old_jax = tuple(int(x) for x in jax.__version__.split(".")[:2]) < (0, 12)
  for placement in PLACEMENTS:
    shape, names = ((2, 4), ("dp", "sp")) if placement == "batch_seq" else ((8,), ("sp",))
    if full and old_jax and placement == "batch_seq":
      # jax 0.11: an eager (un-jitted) jax.grad on the (2, 4) Auto mesh after eager grads on the (8,) mesh reuses a
      # cached sharding of the latter (IndivisibleError ... mesh_shape={'sp': 8}); with fresh caches it passes.
      jax.clear_caches()
    for label, mesh, context in _mesh_kinds(shape, names):
      for call in ("direct", "jit"):
        key = (label, placement, call)
        for causal in (False, True) if full else (key in CAUSAL_CELLS,):
          grads = full or key in GRADIENT_CELLS
          c0 = time.process_time()
          cell = f"{label} {placement} {call} causal={causal} grads={grads}"
          results[cell] = _matrix_cell(case, label, mesh, context, placement, call, causal, grads)
          if os.environ.get("RING_WORKER_VERBOSE"):
            print(f"{cell}: {results[cell]} {time.process_time() - c0:.2f} cpu-s", file=sys.stderr)
  refused = {cell: r for cell, r in results.items() if r != "ok"}
  print(json.dumps(dict(matrix_cells=len(results), refused_by_jax=refused)), file=sys.stderr)


@check
def mesh_placement_matrix():
  """Mesh(...) / make_mesh / set_mesh x uncommitted / committed / T-sharded / (B, T)-sharded x direct / jit."""
  _mesh_matrix(full=False)


@check
def mesh_placement_matrix_full():
  """Every cell of mesh_placement_matrix, causal and not, gradients everywhere."""
  _mesh_matrix(full=True)


# ----------------------------------------------------------------------------------------------------------
# Hostile values, tiny and empty sequences, a tuple of ring axes, a value head dim of its own
# ----------------------------------------------------------------------------------------------------------


@check
def nan_beyond_lengths():
  """NaN / Inf in q beyond the query lengths and in k / v beyond the key lengths (T, S not multiples of the chunk
  count, so the ring pads too): outputs and gradients equal the clean run's, padded positions get zero gradients."""
  mesh = _mesh()
  for causal, T, S in ((True, 29, 29), (False, 19, 29)):
    q, k, v, ct = _inputs(21, B=2, T=T, S=S, N=2, K=1, H=8, dtype=jnp.float32)
    q_len, kv_len = np.asarray([T, T - 8], np.int32), np.asarray([S - 6, 10], np.int32)
    beyond = lambda x, n: (np.arange(x.shape[1])[None, :] >= n[:, None])[:, :, None, None]
    q_bad = jnp.where(beyond(q, q_len), jnp.nan, q)
    k_bad = jnp.where(beyond(k, kv_len), jnp.nan, k)
    v_bad = jnp.where(beyond(v, kv_len), jnp.inf, v)
    f = lambda q, k, v, **kw: ring.ring_attention(q, k, v, **kw, mesh=mesh, axis_name="seq", is_causal=causal,
                                            query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    run = jax.jit(lambda *a: _fwd_bwd(f, *a))
    clean, bad = run(q, k, v, ct), run(q_bad, k_bad, v_bad, ct)
    mask = np_mask(2, 2, T, S, causal=causal, q_lengths=q_len, kv_lengths=kv_len)
    err = f"causal={causal} T={T} S={S}"
    assert_close(bad[0], np_softmax_attention(q, k, v, mask=mask)[0], jnp.float32, "fwd", err)
    np.testing.assert_array_equal(np.asarray(bad[0]), np.asarray(clean[0]), err_msg=err)
    chex.assert_tree_all_finite(bad[2])
    for name, g_bad, g_clean, n in zip(("dq", "dk", "dv"), bad[2], clean[2], (q_len, kv_len, kv_len)):
      pad = np.broadcast_to(beyond(g_bad, n), g_bad.shape)
      np.testing.assert_array_equal(np.asarray(g_bad)[pad], 0.0, err_msg=f"{name} beyond lengths {err}")
      np.testing.assert_array_equal(np.asarray(g_bad), np.asarray(g_clean), err_msg=f"{name} {err}")
    _check_grads(bad[2], q, k, v, ct, mask, err)


@check
def tiny_and_empty_sequences():
  """T = 1 and / or S = 1 over 8 devices (padded to whole chunks), causal and not; zero-size B, T, S, N."""
  mesh = _mesh()
  for causal, T, S in ((True, 1, 1), (False, 1, 13), (False, 13, 1)):
    q, k, v, ct = _inputs(22, B=2, T=T, S=S, N=2, K=1, H=8, dtype=jnp.float32)
    f = lambda q, k, v, **kw: ring.ring_attention(q, k, v, **kw, mesh=mesh, axis_name="seq", is_causal=causal)
    out, _, grads = jax.jit(lambda *a: _fwd_bwd(f, *a))(q, k, v, ct)
    mask = np_mask(2, 2, T, S, causal=causal)
    assert_close(out, np_softmax_attention(q, k, v, mask=mask)[0], jnp.float32, "fwd", f"T={T} S={S}")
    _check_grads(grads, q, k, v, ct, mask, f"T={T} S={S}")
  for B, T, S, N in ((0, 8, 8, 2), (2, 0, 8, 2), (2, 8, 0, 2), (2, 8, 8, 0)):
    q, k, v = jnp.ones((B, T, N, 8)), jnp.ones((B, S, 1, 8)), jnp.ones((B, S, 1, 8))
    out, lse = ring.ring_attention(q, k, v, mesh=mesh, axis_name="seq", return_residual=True)
    assert out.shape == (B, T, N, 8) and lse.shape == (B, T, N), (out.shape, lse.shape)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    np.testing.assert_array_equal(np.asarray(lse), np.finfo(np.float32).min)


@check
def tuple_axis_and_value_head_dim():
  """axis_name=("dp", "sp") on a (2, 4) mesh: one ring over all 8 devices; value head dim 12 != query head dim 8."""
  mesh = jax.make_mesh((2, 4), ("dp", "sp"))
  r = np.random.default_rng(23)
  q, k, v = randn(r, (2, 32, 2, 8)), randn(r, (2, 32, 1, 8)), randn(r, (2, 32, 1, 12))
  ct = randn(r, (2, 32, 2, 12))
  kv_len = np.asarray([32, 21], np.int32)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, ("dp", "sp"))))
  f = lambda q, k, v, **kw: ring.ring_attention(q, k, v, **kw, mesh=mesh, axis_name=("dp", "sp"), is_causal=True,
                                          key_value_seq_lengths=kv_len)
  out, _, grads = jax.jit(lambda *a: _fwd_bwd(f, *a))(put(q), put(k), put(v), ct)
  assert out.shape == (2, 32, 2, 12), out.shape
  assert out.sharding.shard_shape(out.shape)[1] == 4, out.sharding     # 32 rows over 8 devices
  mask = np_mask(2, 2, 32, 32, causal=True, kv_lengths=kv_len)
  assert_close(out, np_attention(q, k, v, mask), jnp.float32, "fwd", "output")
  want = jax.grad(lambda q, k, v: (aj.reference_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_len)
                                   * ct).sum(), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip(("dq", "dk", "dv"), grads, want):
    assert_close(g, w, jnp.float32, "grad", name)


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
