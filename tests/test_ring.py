"""Ring attention: one-device checks, checks on 8 virtual CPU devices, and a ring of two processes.

tests/conftest.py asks jax for 8 CPU devices before any test runs; the 8-device tests skip where there are fewer.
Only the two-process ring runs in subprocesses (tests/ring_multiprocess.py, jax.distributed).
"""

import contextlib
import inspect
import json
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import attention_jax as aj
from attention_jax import blockwise, ring
from tests.helpers import assert_close, np_mask, np_softmax_attention, randn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------------
# One device: a one-device ring, zig-zag order, errors, the public surface
# ----------------------------------------------------------------------------------------------------------


def _mesh1():
  return jax.make_mesh((1,), ("seq",))


def test_one_device_ring_matches_reference():
  """P = 1: the zig-zag split of the local shard (2 chunks, odd length 7) and the causal local block alone."""
  r = np.random.default_rng(0)
  q, k, v = randn(r, (2, 14, 4, 16)), randn(r, (2, 14, 2, 16)), randn(r, (2, 14, 2, 16))
  kv_len = jnp.asarray([9, 14], jnp.int32)
  f = lambda q, k, v: ring.ring_attention(q, k, v, mesh=_mesh1(), axis_name="seq", is_causal=True,
                                          key_value_seq_lengths=kv_len, chunk_sizes=blockwise.ChunkSizes(4, 4))
  g = lambda q, k, v: aj.reference_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_len)
  assert_close(jax.jit(f)(q, k, v), g(q, k, v))
  loss = lambda fn: jax.grad(lambda q, k, v: (fn(q, k, v) * jnp.cos(q)).sum(), argnums=(0, 1, 2))
  for a, b in zip(jax.jit(loss(f))(q, k, v), loss(g)(q, k, v)):
    assert_close(a, b, kind="grad")
  assert aj.ring_attention is ring.ring_attention


def test_zigzag_order():
  # 2 shards -> 4 chunks of 2 positions; shard 0 holds chunks 0 and 3, shard 1 chunks 1 and 2.
  np.testing.assert_array_equal(ring.zigzag_indices(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3)
  np.testing.assert_array_equal(ring.from_zigzag(ring.to_zigzag(x, 3), 3), x)
  with pytest.raises(ValueError, match="divisible"):
    ring.zigzag_indices(10, 3)


def test_reference_has_the_same_signature():
  assert inspect.signature(ring.ring_attention) == inspect.signature(ring.ring_attention_reference)


@pytest.mark.parametrize("kwargs, shapes, match", [
    (dict(axis_name="model"), None, "axis_name='model' is not an axis"),
    (dict(axis_name=("seq", "model")), None, r"not an axis of the mesh \(\['model'\] missing\)"),
    (dict(axis_name=3), None, "axis_name must be a mesh axis name .* got 3 of type int"),
    (dict(axis_name=["seq"]), None, "axis_name must be a mesh axis name .* of type list"),
    (dict(axis_name=()), None, "non-empty tuple"),
    (dict(axis_name=("seq", "seq")), None, "repeats an axis"),
    (dict(is_causal=True), ((1, 8, 2, 16), (1, 6, 2, 16)), "T == S"),
    (dict(is_causal="yes"), None, "is_causal"),
    (dict(load_balance="yes"), None, "load_balance"),
    (dict(implementation="cudnn"), None, "implementation"),
    (dict(sequence_order="striped"), None, "sequence_order"),
    (dict(sequence_order="zigzag"), ((1, 7, 2, 16), (1, 7, 2, 16)), "divisible by 2"),
    (dict(), ((1, 8, 3, 16), (1, 8, 2, 16)), "multiple of key/value heads"),
    (dict(), ((1, 8, 2, 16), (2, 8, 2, 16)), "batch sizes differ"),
    (dict(), ((8, 16), (8, 16)), r"rank.*query.shape=\(8, 16\)"),
    (dict(), ((1, 8, 2, 16), (8, 2, 16)), r"same rank.*key.shape=\(8, 2, 16\)"),
    (dict(), ((1, 8, 2, 16), (1, 8, 2, 8)), "head dims differ"),
    (dict(), ((1, 8, 2, 16), (1, 8, 2, 16), (1, 9, 2, 16)), r"agree on \[S, K\].*value.shape=\(1, 9, 2, 16\)"),
    (dict(), ((1, 8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 16), jnp.int32), "floating point.*int32"),
    (dict(key_value_seq_lengths=jnp.ones((3,), jnp.int32)), None, "key_value_seq_lengths.*shape=\\(3,\\)"),
    (dict(query_seq_lengths=jnp.ones((1,), jnp.float32)), None, "query_seq_lengths must be an integer array"),
    (dict(key_value_seq_lengths=np.asarray([9])), None, r"key_value_seq_lengths must lie in \[0, 8\]"),
    (dict(scale=jnp.ones((2,))), None, "scale must be a scalar"),
    (dict(mesh="seq"), None, "jax.sharding.Mesh"),
])
def test_bad_input_raises_value_error(kwargs, shapes, match):
  q_shape, k_shape, v_shape, dtype = (tuple(shapes or ()) + (None, None, None, None))[:4]
  q_shape, k_shape = q_shape or (1, 8, 2, 16), k_shape or (1, 8, 2, 16)
  q, k, v = jnp.zeros(q_shape, dtype), jnp.zeros(k_shape, dtype), jnp.zeros(v_shape or k_shape, dtype)
  call = dict(dict(mesh=_mesh1(), axis_name="seq"), **kwargs)
  with pytest.raises(ValueError, match=match):
    ring.ring_attention(q, k, v, **call)


def test_mesh_mismatches_raise_value_error():
  q = jnp.zeros((1, 8, 2, 16))
  other = jax.make_mesh((1,), ("other",))     # Explicit axes
  with jax.set_mesh(other), pytest.raises(ValueError, match=r"context mesh \('other',\).*differs from mesh="):
    ring.ring_attention(q, q, q, mesh=_mesh1(), axis_name="seq")
  q_other = jax.device_put(q, jax.sharding.NamedSharding(other, jax.sharding.PartitionSpec()))
  with pytest.raises(ValueError, match=r"shape \(1, 8, 2, 16\) is explicitly sharded over mesh axes \('other',\)"):
    ring.ring_attention(q_other, q_other, q_other, mesh=_mesh1(), axis_name="seq")


# ----------------------------------------------------------------------------------------------------------
# Forward-mode and second-order differentiation, head dims, batch dims, empty inputs (one device)
# ----------------------------------------------------------------------------------------------------------


def _tiny(seed=0, T=6, S=6, Hv=8):
  r = np.random.default_rng(seed)
  return randn(r, (1, T, 2, 8)), randn(r, (1, S, 1, 8)), randn(r, (1, S, 1, Hv))


def test_forward_mode_and_second_order():
  """jvp, grad-of-grad and a Hessian-vector product go through the plain formula (custom-VJP rings
  cannot), and equal jax's derivatives of the reference."""
  q, k, v = _tiny()
  kv_len = jnp.asarray([5], jnp.int32)
  f = lambda q, k, v: ring.ring_attention(q, k, v, mesh=_mesh1(), axis_name="seq", is_causal=True,
                                          key_value_seq_lengths=kv_len)
  g = lambda q, k, v: aj.reference_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_len)
  tangents = tuple(jnp.cos(x) for x in (q, k, v))
  got, want = jax.jvp(f, (q, k, v), tangents), jax.jvp(g, (q, k, v), tangents)
  assert_close(got[0], want[0])
  assert_close(got[1], want[1], kind="grad")
  loss = lambda fn: (lambda q, k, v: (fn(q, k, v) * jnp.sin(q)).sum())
  grad_norm = lambda fn: (lambda q, k, v: sum((d ** 2).sum() for d in jax.grad(loss(fn), (0, 1, 2))(q, k, v)))
  for a, b in zip(jax.grad(grad_norm(f), (0, 1, 2))(q, k, v), jax.grad(grad_norm(g), (0, 1, 2))(q, k, v)):
    assert_close(a, b, kind="grad")
  hvp = lambda fn: jax.jvp(jax.grad(loss(fn)), (q, k, v), tangents)[1]
  assert_close(hvp(f), hvp(g), kind="grad")


def test_differentiating_a_jitted_backward_raises_not_implemented():
  """A second derivative taken outside a jit that holds the first one cannot be seen at the call: a clear error."""
  q, k, v = _tiny(1)
  f = lambda q: ring.ring_attention(q, k, v, mesh=_mesh1(), axis_name="seq").sum()
  with pytest.raises(NotImplementedError, match="backward pass is not differentiable.*ring_attention_reference"):
    jax.grad(lambda q: jax.jit(jax.grad(f))(q).sum())(q)


@pytest.mark.parametrize("Hv", [4, 12])
def test_value_head_dim_differs(Hv):
  q, k, v = _tiny(2, T=7, S=9, Hv=Hv)
  kv_len = jnp.asarray([8], jnp.int32)
  f = lambda q, k, v: ring.ring_attention(q, k, v, mesh=_mesh1(), axis_name="seq", key_value_seq_lengths=kv_len)
  g = lambda q, k, v: aj.reference_attention(q, k, v, key_value_seq_lengths=kv_len)
  out = jax.jit(f)(q, k, v)
  assert out.shape == (1, 7, 2, Hv), out.shape
  # Float64 oracle: attention is linear in each value column (column j = output for a value of all-column-j).
  mask = np_mask(1, 2, 7, 9, kv_lengths=kv_len)
  want = [np_softmax_attention(q, k, np.repeat(np.asarray(v)[..., j:j + 1], 8, -1), mask=mask)[0][..., 0]
          for j in range(Hv)]
  assert_close(out, np.stack(want, -1))
  loss = lambda fn: jax.grad(lambda q, k, v: (fn(q, k, v) * jnp.cos(fn(q, k, v))).sum(), argnums=(0, 1, 2))
  for a, b in zip(jax.jit(loss(f))(q, k, v), loss(g)(q, k, v)):
    assert_close(a, b, kind="grad")


def test_rank3_and_extra_batch_dims_and_public_residual():
  r = np.random.default_rng(3)
  for batch in ((), (2, 3)):
    q, k, v = randn(r, batch + (6, 2, 8), jnp.bfloat16), randn(r, batch + (6, 1, 8), jnp.bfloat16), randn(
        r, batch + (6, 1, 8), jnp.bfloat16)
    out, lse = ring.ring_attention(q, k, v, mesh=_mesh1(), axis_name="seq", is_causal=True, return_residual=True)
    want, want_lse = aj.reference_attention(q, k, v, is_causal=True, return_residual=True)
    assert out.shape == q.shape and lse.shape == q.shape[:-1] and lse.dtype == jnp.bfloat16, (out.shape, lse)
    assert_close(out, want, jnp.bfloat16)
    assert_close(lse, want_lse, jnp.bfloat16)


@pytest.mark.parametrize("B, T, S, N, Hv", [(0, 4, 4, 2, 8), (1, 0, 4, 2, 8), (1, 4, 0, 2, 8), (1, 4, 4, 0, 8),
                                            (1, 4, 4, 2, 0)])
def test_zero_size_inputs(B, T, S, N, Hv):
  """Empty calls return the empty / zero result (S = 0: no row has a key), with zero gradients."""
  q, k, v = jnp.ones((B, T, N, 8)), jnp.ones((B, S, 1, 8)), jnp.ones((B, S, 1, Hv))
  f = lambda q, k, v: ring.ring_attention(q, k, v, mesh=_mesh1(), axis_name="seq", is_causal=T == S,
                                          return_residual=True)
  out, lse = jax.jit(f)(q, k, v)
  assert out.shape == (B, T, N, Hv) and lse.shape == (B, T, N), (out.shape, lse.shape)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  np.testing.assert_array_equal(np.asarray(lse), np.finfo(np.float32).min)
  grads = jax.grad(lambda q, k, v: f(q, k, v)[0].sum(), argnums=(0, 1, 2))(q, k, v)
  for g, x in zip(grads, (q, k, v)):
    assert g.shape == x.shape
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ----------------------------------------------------------------------------------------------------------
# 8 CPU devices: helpers
# ----------------------------------------------------------------------------------------------------------

OLD_JAX = tuple(int(x) for x in jax.__version__.split(".")[:2]) < (0, 12)


@pytest.fixture
def cpu8():
  """8 CPU devices, the first of them the default device (also where the default backend is a GPU)."""
  cpus = jax.devices("cpu")
  if len(cpus) < 8:
    pytest.skip(f"needs 8 CPU devices, found {len(cpus)}: tests/conftest.py asks for 8 unless JAX_NUM_CPU_DEVICES "
                "or XLA_FLAGS sets a count, or a backend started before it")
  with jax.default_device(cpus[0]):
    yield cpus[:8]


def test_conftest_gives_8_cpu_devices():
  if "JAX_NUM_CPU_DEVICES" in os.environ or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    pytest.skip("the environment sets the CPU device count")
  assert len(jax.devices("cpu")) == 8, jax.devices("cpu")
  if jax.default_backend() == "cpu":
    assert len(jax.devices()) == 8 and jnp.zeros(3).devices() == {jax.devices()[0]}


def _mesh(devices, n: int = 8, name: str = "seq", axis_type=None):
  kw = {} if axis_type is None else dict(axis_types=(axis_type,))
  return jax.make_mesh((n,), (name,), devices=devices[:n], **kw)


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
# 8 CPU devices: causal (zig-zag load balancing by default)
# ----------------------------------------------------------------------------------------------------------


def test_causal_gqa_float32(cpu8):
  """T=48 over 8 devices: 16 zig-zag chunks of 3 rows (odd per-shard lengths), GQA 4:2; plus a float64 oracle."""
  q, k, v, ct = _inputs(0, B=2, T=48, S=48, N=4, K=2, H=16, dtype=jnp.float32)
  got, _ = _compare(q, k, v, ct, mesh=_mesh(cpu8), is_causal=True, chunk_sizes=blockwise.ChunkSizes(2, 2))
  want, _ = np_softmax_attention(q, k, v, mask=np_mask(2, 4, 48, 48, causal=True))
  assert_close(got[0], want, jnp.float32, "fwd", "float64 oracle")


def test_causal_uneven_lengths_float32(cpu8):
  """T=37 (not a multiple of 16: padded and masked), query/key lengths, a batch row with no visible key."""
  q, k, v, ct = _inputs(1, B=3, T=37, S=37, N=2, K=1, H=16, dtype=jnp.float32)
  q_len, kv_len = jnp.asarray([37, 20, 37], jnp.int32), jnp.asarray([0, 30, 11], jnp.int32)
  got, _ = _compare(q, k, v, ct, mesh=_mesh(cpu8), is_causal=True, query_seq_lengths=q_len,
                    key_value_seq_lengths=kv_len)
  out, lse, grads = got
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)           # kv length 0: zeros, lowest lse, finite grads
  np.testing.assert_array_equal(np.asarray(lse[0]), np.finfo(np.float32).min)
  np.testing.assert_array_equal(np.asarray(out[1, 20:]), 0.0)       # padded queries
  mask = np_mask(3, 2, 37, 37, causal=True, q_lengths=q_len, kv_lengths=kv_len)
  assert_close(out, np_softmax_attention(q, k, v, mask=mask)[0], jnp.float32, "fwd", "float64 oracle")


@pytest.mark.slow
def test_causal_bfloat16(cpu8):
  q, k, v, ct = _inputs(2, B=1, T=64, S=64, N=4, K=1, H=32, dtype=jnp.bfloat16)
  _compare(q, k, v, ct, mesh=_mesh(cpu8), is_causal=True)


@pytest.mark.slow
def test_causal_contiguous_float32(cpu8):
  """load_balance=False: contiguous shards of 5 rows, later key blocks skipped."""
  q, k, v, ct = _inputs(3, B=1, T=40, S=40, N=2, K=2, H=16, dtype=jnp.float32)
  _compare(q, k, v, ct, mesh=_mesh(cpu8), is_causal=True, load_balance=False,
           key_value_seq_lengths=jnp.asarray([33], jnp.int32))


@pytest.mark.slow
def test_work_balance(cpu8):
  """Chunk pairs each device computes, counted in the running ring: zig-zag within 10%, contiguous far apart."""
  q, k, v, _ = _inputs(4, B=1, T=64, S=64, N=1, K=1, H=8, dtype=jnp.float32)
  mesh, P_ = _mesh(cpu8), 8

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
# 8 CPU devices: non-causal, cross attention, sequence order
# ----------------------------------------------------------------------------------------------------------


def test_cross_lengths_float32(cpu8):
  """T=30, S=51 (neither a multiple of 8), MQA, key lengths, a logits soft-cap."""
  q, k, v, ct = _inputs(5, B=2, T=30, S=51, N=4, K=1, H=16, dtype=jnp.float32)
  kv_len = jnp.asarray([20, 51], jnp.int32)
  got, _ = _compare(q, k, v, ct, mesh=_mesh(cpu8), key_value_seq_lengths=kv_len, logits_soft_cap=2.0)
  mask = np_mask(2, 4, 30, 51, kv_lengths=kv_len)
  want = np_softmax_attention(q, k, v, mask=mask, soft_cap=2.0)[0]
  assert_close(got[0], want, jnp.float32, "fwd", "float64 oracle")


@pytest.mark.slow
def test_noncausal_bfloat16(cpu8):
  q, k, v, ct = _inputs(6, B=2, T=40, S=24, N=4, K=2, H=32, dtype=jnp.bfloat16)
  _compare(q, k, v, ct, mesh=_mesh(cpu8), scale=0.2)


@pytest.mark.slow
def test_zigzag_sequence_order(cpu8):
  """Inputs already in zig-zag order: no reordering, same function of the reordered sequence (key lengths are
  natural positions; NaN keys beyond them, scattered by the reordering, reach nothing)."""
  q, k, v, ct = _inputs(7, B=1, T=32, S=32, N=2, K=1, H=16, dtype=jnp.float32)
  kv_len = np.asarray([27], np.int32)
  k_bad = k.at[:, 27:].set(jnp.nan)
  mesh = _mesh(cpu8)
  zz = lambda x: ring.to_zigzag(x, 8)
  got = ring.ring_attention(zz(q), zz(k_bad), zz(v), mesh=mesh, axis_name="seq", is_causal=True,
                            sequence_order="zigzag", key_value_seq_lengths=kv_len)
  mask = np_mask(1, 2, 32, 32, causal=True, kv_lengths=kv_len)
  assert_close(ring.from_zigzag(got, 8), np_softmax_attention(q, k, v, mask=mask)[0])
  ref = ring.ring_attention_reference(zz(q), zz(k), zz(v), mesh=mesh, axis_name="seq", is_causal=True,
                                      sequence_order="zigzag", key_value_seq_lengths=kv_len)
  assert_close(got, ref)


# ----------------------------------------------------------------------------------------------------------
# 8 CPU devices: meshes and transformations
# ----------------------------------------------------------------------------------------------------------


def _small_case(seed=8):
  return _inputs(seed, B=2, T=32, S=32, N=2, K=1, H=16, dtype=jnp.float32)


@pytest.mark.slow
def test_explicit_mesh_sharded_inputs(cpu8):
  """jax.make_mesh's default Explicit axes, inputs sharded along T: output sharded along T, typed as such."""
  q, k, v, _ = _small_case()
  mesh = _mesh(cpu8)
  assert mesh.axis_types == (AxisType.Explicit,)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "seq")))
  out = ring.ring_attention(put(q), put(k), put(v), mesh=mesh, axis_name="seq", is_causal=True)
  assert jax.typeof(out).sharding.spec == P(None, "seq", None, None), jax.typeof(out)
  assert out.sharding.spec == P(None, "seq", None, None), out.sharding
  assert_close(out, aj.reference_attention(q, k, v, is_causal=True))
  ref = ring.ring_attention_reference(put(q), put(k), put(v), mesh=mesh, axis_name="seq", is_causal=True)
  assert_close(ref, out)


@pytest.mark.slow
def test_set_mesh_context_jit(cpu8):
  """Inside jax.set_mesh(explicit mesh), jitted, gradients included."""
  q, k, v, ct = _small_case(9)
  mesh = _mesh(cpu8)
  with jax.set_mesh(mesh):
    _compare(q, k, v, ct, mesh=mesh, is_causal=True)
    out = jax.jit(lambda q, k, v: ring.ring_attention(q, k, v, mesh=mesh, axis_name="seq"))(q, k, v)
  assert jax.typeof(out).sharding.spec == P(None, "seq", None, None), jax.typeof(out)


@pytest.mark.slow
def test_auto_mesh_and_vmap(cpu8):
  """An Auto-axis mesh; jax.vmap over an extra leading batch dim."""
  q, k, v, _ = _small_case(10)
  mesh = _mesh(cpu8, axis_type=AxisType.Auto)
  f = lambda q, k, v: ring.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)
  out = jax.jit(jax.vmap(f))(jnp.stack([q, -q]), jnp.stack([k, k]), jnp.stack([v, 2 * v]))
  assert_close(out[1], aj.reference_attention(-q, k, 2 * v, is_causal=True))


def test_two_axis_mesh(cpu8):
  """Mesh ("data", "seq") = (2, 4): batch sharded over "data" stays sharded; the ring runs over "seq"."""
  q, k, v, ct = _small_case(11)
  mesh = jax.make_mesh((2, 4), ("data", "seq"), devices=cpu8)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
  (out, _, grads), _ = _compare(q, k, v, ct, mesh=mesh, is_causal=True, put=put)
  assert jax.typeof(grads[1]).sharding.spec == P("data", "seq", None, None), jax.typeof(grads[1])
  assert jax.typeof(out).sharding.spec == P("data", "seq", None, None), jax.typeof(out)


@pytest.mark.slow
def test_memory_analysis_is_per_device(cpu8):
  """``Compiled.memory_analysis()`` of an SPMD program reports one device's sizes (experiments/scaling.py uses it).

  Known case: x of 8 MiB float32 sharded 8 ways along its second axis; y = 2 * x has the same sharding, so one
  device holds 1 MiB of argument and 1 MiB of output.
  """
  mesh = _mesh(cpu8, axis_type=AxisType.Auto)
  x = jax.device_put(jnp.ones((4, 2 ** 19), jnp.float32), NamedSharding(mesh, P(None, "seq")))
  mem = jax.jit(lambda x: 2 * x).lower(x).compile().memory_analysis()
  assert mem.argument_size_in_bytes == 2 ** 20, mem.argument_size_in_bytes
  assert mem.output_size_in_bytes == 2 ** 20, mem.output_size_in_bytes
  # The ring's per-device arguments are 1/8 of the global q/k/v even when they arrive unsharded (uncommitted).
  q, k, v, _ = _inputs(12, B=1, T=1024, S=1024, N=1, K=1, H=32, dtype=jnp.float32)
  f = jax.jit(lambda q, k, v: ring.ring_attention(q, k, v, mesh=_mesh(cpu8), axis_name="seq", is_causal=True))
  mem = f.lower(q, k, v).compile().memory_analysis()
  assert mem.argument_size_in_bytes == 3 * q.nbytes // 8, (mem.argument_size_in_bytes, q.nbytes)


# ----------------------------------------------------------------------------------------------------------
# 8 CPU devices: every mesh construction x input placement x direct / jitted call, against the float64 oracle
# ----------------------------------------------------------------------------------------------------------

# Mesh(...) (Auto axes), jax.make_mesh (Explicit axes), each of them set with jax.set_mesh, and
# jax.sharding.use_mesh where this jax has it.
MESH_KINDS = ("Mesh", "make_mesh", "set_mesh(make_mesh)", "set_mesh(Mesh)") + (
    ("use_mesh(make_mesh)",) if hasattr(jax.sharding, "use_mesh") else ())
# How the inputs arrive: uncommitted (jnp.asarray), committed to one device, sharded along T over "sp", sharded
# along B over "dp" and T over "sp" (on a ("dp", "sp") = (2, 4) mesh; the others use an ("sp",) = (8,) mesh).
PLACEMENTS = ("uncommitted", "committed", "seq", "batch_seq")
MATRIX = [(kind, placement, call) for placement in PLACEMENTS for kind in MESH_KINDS for call in ("direct", "jit")]
# The CI matrix runs every cell non-causal, forward only, except these: gradients in one cell per mesh kind and
# per placement, causal in another such set (direct for committed inputs, which jax.jit refuses).
GRADIENT_CELLS = {("Mesh", "uncommitted", "jit"), ("make_mesh", "committed", "direct"),
                  ("set_mesh(make_mesh)", "seq", "jit"), ("set_mesh(Mesh)", "batch_seq", "jit")}
CAUSAL_CELLS = {("set_mesh(Mesh)", "uncommitted", "direct"), ("set_mesh(make_mesh)", "committed", "direct"),
                ("make_mesh", "seq", "jit"), ("Mesh", "batch_seq", "direct")}


def _mesh_kind(kind: str, placement: str, devices) -> tuple:
  """``(mesh, context or None)`` for one MESH_KINDS entry, on the mesh shape the placement uses."""
  shape, names = ((2, 4), ("dp", "sp")) if placement == "batch_seq" else ((8,), ("sp",))
  if "make_mesh" in kind:
    mesh = jax.make_mesh(shape, names, devices=devices)
    assert mesh.axis_types == (AxisType.Explicit,) * len(shape), mesh.axis_types
  else:
    mesh = Mesh(np.array(devices).reshape(shape), names)
    assert mesh.axis_types == (AxisType.Auto,) * len(shape), mesh.axis_types
  context = {"set_mesh": jax.set_mesh, "use_mesh": getattr(jax.sharding, "use_mesh", None)}.get(kind.split("(")[0])
  return mesh, context


def _put(placement: str, mesh: Mesh, x):
  if placement == "uncommitted":
    x = jnp.asarray(x)
    assert not x.committed
    return x
  if placement == "committed":
    return jax.device_put(x, mesh.devices.flat[5])
  if x.ndim == 1:   # lengths
    return jax.device_put(x, NamedSharding(mesh, P()))
  return jax.device_put(x, NamedSharding(mesh, P("dp", "sp") if placement == "batch_seq" else P(None, "sp")))


def _matrix_cell(devices, kind: str, placement: str, call: str, causal: bool, grads: bool) -> None:
  """One matrix entry: forward (and gradients) vs the float64 oracle, and the output's sharding."""
  mesh, context = _mesh_kind(kind, placement, devices)
  q, k, v, ct = _inputs(20, B=2, T=32, S=32, N=2, K=1, H=8, dtype=jnp.float32)
  q_len, kv_len = np.asarray([32, 27], np.int32), np.asarray([29, 12], np.int32)
  B, T, N, _ = q.shape
  err = f"{kind} {placement} {call} causal={causal}"
  f = lambda q, k, v, q_len, kv_len: ring.ring_attention(q, k, v, mesh=mesh, axis_name="sp", is_causal=causal,
                                                         query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
  loss = lambda q, k, v, q_len, kv_len: (f(q, k, v, q_len, kv_len) * ct).sum()
  args = [_put(placement, mesh, x) for x in (q, k, v, q_len, kv_len)]
  wrap = jax.jit if call == "jit" else (lambda fn: fn)
  got_grads = None
  with context(mesh) if context else contextlib.nullcontext():
    try:
      out = wrap(f)(*args)
    except ValueError as e:
      # jax.jit refuses arguments committed to devices other than the computation's, before the ring sees them.
      if placement == "committed" and call == "jit" and "incompatible devices" in str(e):
        return
      raise AssertionError(err) from e
    try:
      got_grads = wrap(jax.grad(loss, argnums=(0, 1, 2)))(*args) if grads else None
    except ValueError as e:
      # Eager jax.grad of explicitly sharded arrays needs a jax.set_mesh context (plain jnp code too).
      if not (call == "direct" and context is None and "mesh context" in str(e)):
        raise AssertionError(err) from e
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


@pytest.mark.parametrize("kind, placement, call", MATRIX)
def test_mesh_placement_matrix(cpu8, kind, placement, call):
  """Mesh(...) / make_mesh / set_mesh x uncommitted / committed / T-sharded / (B, T)-sharded x direct / jit."""
  key = (kind, placement, call)
  _matrix_cell(cpu8, kind, placement, call, causal=key in CAUSAL_CELLS, grads=key in GRADIENT_CELLS)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind, placement, call", MATRIX)
def test_mesh_placement_matrix_full(cpu8, kind, placement, call, causal):
  """Every cell of test_mesh_placement_matrix, causal and not, gradients everywhere."""
  if OLD_JAX and placement == "batch_seq" and call == "direct":
    # jax 0.11: an eager (un-jitted) jax.grad on the (2, 4) Auto mesh after eager grads on the (8,) mesh reuses a
    # cached sharding of the latter (IndivisibleError ... mesh_shape={'sp': 8}); with fresh caches it passes.
    jax.clear_caches()
  _matrix_cell(cpu8, kind, placement, call, causal=causal, grads=True)


# ----------------------------------------------------------------------------------------------------------
# 8 CPU devices: hostile values, tiny and empty sequences, a tuple of ring axes, a value head dim of its own
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal, T, S", [(True, 29, 29), (False, 19, 29)])
def test_nan_beyond_lengths(cpu8, causal, T, S):
  """NaN / Inf in q beyond the query lengths and in k / v beyond the key lengths (T, S not multiples of the chunk
  count, so the ring pads too): outputs and gradients equal the clean run's, padded positions get zero gradients."""
  mesh = _mesh(cpu8)
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
  assert_close(bad[0], np_softmax_attention(q, k, v, mask=mask)[0], jnp.float32, "fwd")
  np.testing.assert_array_equal(np.asarray(bad[0]), np.asarray(clean[0]))
  chex.assert_tree_all_finite(bad[2])
  for name, g_bad, g_clean, n in zip(("dq", "dk", "dv"), bad[2], clean[2], (q_len, kv_len, kv_len)):
    pad = np.broadcast_to(beyond(g_bad, n), g_bad.shape)
    np.testing.assert_array_equal(np.asarray(g_bad)[pad], 0.0, err_msg=f"{name} beyond lengths")
    np.testing.assert_array_equal(np.asarray(g_bad), np.asarray(g_clean), err_msg=name)
  _check_grads(bad[2], q, k, v, ct, mask)


@pytest.mark.parametrize("causal, T, S", [(True, 1, 1), (False, 1, 13), (False, 13, 1)])
def test_tiny_sequences(cpu8, causal, T, S):
  """T = 1 and / or S = 1 over 8 devices (padded to whole chunks), causal and not."""
  mesh = _mesh(cpu8)
  q, k, v, ct = _inputs(22, B=2, T=T, S=S, N=2, K=1, H=8, dtype=jnp.float32)
  f = lambda q, k, v, **kw: ring.ring_attention(q, k, v, **kw, mesh=mesh, axis_name="seq", is_causal=causal)
  out, _, grads = jax.jit(lambda *a: _fwd_bwd(f, *a))(q, k, v, ct)
  mask = np_mask(2, 2, T, S, causal=causal)
  assert_close(out, np_softmax_attention(q, k, v, mask=mask)[0], jnp.float32, "fwd")
  _check_grads(grads, q, k, v, ct, mask)


@pytest.mark.parametrize("B, T, S, N", [(0, 8, 8, 2), (2, 0, 8, 2), (2, 8, 0, 2), (2, 8, 8, 0)])
def test_empty_sequences(cpu8, B, T, S, N):
  """Zero-size B, T, S or N over 8 devices: the empty / zero result (S = 0: no row has a key)."""
  q, k, v = jnp.ones((B, T, N, 8)), jnp.ones((B, S, 1, 8)), jnp.ones((B, S, 1, 8))
  out, lse = ring.ring_attention(q, k, v, mesh=_mesh(cpu8), axis_name="seq", return_residual=True)
  assert out.shape == (B, T, N, 8) and lse.shape == (B, T, N), (out.shape, lse.shape)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  np.testing.assert_array_equal(np.asarray(lse), np.finfo(np.float32).min)


def test_tuple_axis_and_value_head_dim(cpu8):
  """axis_name=("dp", "sp") on a (2, 4) mesh: one ring over all 8 devices; value head dim 12 != query head dim 8."""
  mesh = jax.make_mesh((2, 4), ("dp", "sp"), devices=cpu8)
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
# 8 CPU devices, slow: larger shapes, the Pallas kernel per shard (interpret mode on CPU)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_causal_t1000_gqa_default_chunks(cpu8):
  q, k, v, ct = _inputs(13, B=1, T=1000, S=1000, N=8, K=2, H=64, dtype=jnp.float32)
  _compare(q, k, v, ct, mesh=_mesh(cpu8), is_causal=True, key_value_seq_lengths=jnp.asarray([900], jnp.int32))


@pytest.mark.slow
def test_pallas_per_shard_interpret(cpu8):
  q, k, v, ct = _inputs(14, B=1, T=64, S=64, N=2, K=1, H=16, dtype=jnp.float32)
  _compare(q, k, v, ct, mesh=_mesh(cpu8, 2), is_causal=True, implementation="pallas",
           key_value_seq_lengths=jnp.asarray([50], jnp.int32))


# ----------------------------------------------------------------------------------------------------------
# Two processes (jax.distributed, gloo), each with 4 CPU devices: subprocesses, since a process joins only once
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_form_one_ring():
  """docs/RING.md's multi-host recipe on one machine: 2 processes x 4 CPU devices (gloo) run one 8-device ring."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.ring_multiprocess", str(i), "2", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(line) for out, _ in outputs for line in out.splitlines() if line.startswith("{")]
  assert sorted(r["process"] for r in results) == [0, 1] and all(r["ok"] and r["devices"] == 8 for r in results)
  rows = sorted(tuple(x) for r in results for x in r["local_rows"])
  assert rows == [(8 * i, 8 * i + 8) for i in range(8)], rows       # each device holds 8 of the 64 rows
