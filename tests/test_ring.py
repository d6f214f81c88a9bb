"""Ring attention: multi-device checks (8 virtual CPU devices, in a subprocess) and single-process checks.

The multi-device checks live in tests/ring_worker.py: the device count has to be set before jax initialises and
tests/conftest.py imports jax first, so each group below runs the worker in a fresh interpreter.
"""

import inspect
import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax as aj
from attention_jax import blockwise, ring
from tests.helpers import assert_close, np_mask, np_softmax_attention, randn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Groups of tests/ring_worker.py checks; each group is one subprocess. CI runs two (about 110 CPU-seconds together):
# the 32-cell mesh x placement x call matrix with the edge cases, and causal / cross attention with lengths. The
# rest (bfloat16, contiguous shards, work balance, the single-mesh checks the matrix also covers) run with -m slow.
GROUPS = {
    "causal_and_cross": ["causal_gqa_float32", "causal_uneven_lengths_float32", "cross_lengths_float32",
                         "two_axis_mesh"],
    # 32 mesh x placement x call cells, NaN tails, T = 1 / S = 1 / empty, a tuple axis.
    "matrix_and_edges": ["mesh_placement_matrix", "nan_beyond_lengths", "tiny_and_empty_sequences",
                         "tuple_axis_and_value_head_dim"],
}
SLOW_GROUPS = {
    "causal_more": ["causal_bfloat16", "causal_contiguous_float32", "work_balance"],
    "order_and_meshes": ["noncausal_bfloat16", "zigzag_sequence_order", "explicit_mesh_sharded_inputs",
                         "set_mesh_context_jit", "auto_mesh_and_vmap", "memory_analysis_is_per_device"],
    "large_and_pallas": ["causal_t1000_gqa_default_chunks", "pallas_per_shard_interpret"],
    "full_matrix": ["mesh_placement_matrix_full"],
}


def _run_checks(names: list[str], timeout_s: int = 900) -> None:
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                    " --xla_force_host_platform_device_count=8").strip(), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.ring_worker", *names], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout_s)
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  ran = [r["check"] for r in results]
  failures = [f"--- {r['check']}\n{r['error']}" for r in results if not r["ok"]]
  assert not failures, "\n".join(failures)
  assert proc.returncode == 0 and ran == names, (
      f"worker exit {proc.returncode}, ran {ran} of {names}\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_on_8_devices(group):
  _run_checks(GROUPS[group])


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(SLOW_GROUPS))
def test_on_8_devices_slow(group):
  _run_checks(SLOW_GROUPS[group], timeout_s=3600)


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


def test_every_worker_check_is_run():
  # Read, not imported: importing the worker would set XLA_FLAGS in this process's environment.
  with open(os.path.join(ROOT, "tests", "ring_worker.py")) as f:
    defined = re.findall(r"^@check\ndef (\w+)", f.read(), flags=re.M)
  grouped = [n for g in (GROUPS, SLOW_GROUPS) for names in g.values() for n in names]
  assert defined and sorted(grouped) == sorted(defined)


# ----------------------------------------------------------------------------------------------------------
# In this process (one CPU device): a one-device ring, zig-zag order, errors, the public surface
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
