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
from tests.helpers import assert_close, randn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Groups of tests/ring_worker.py checks; each group is one subprocess (about 40 CPU-seconds each for CI).
GROUPS = {
    "causal": ["causal_gqa_float32", "causal_uneven_lengths_float32", "causal_bfloat16", "causal_contiguous_float32",
               "work_balance"],
    "cross_order_meshes": ["cross_lengths_float32", "noncausal_bfloat16", "zigzag_sequence_order",
                           "explicit_mesh_sharded_inputs", "set_mesh_context_jit", "auto_mesh_and_vmap",
                           "two_axis_mesh", "memory_analysis_is_per_device"],
}
SLOW_GROUPS = {
    "large_and_pallas": ["causal_t1000_gqa_default_chunks", "pallas_per_shard_interpret"],
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
    (dict(is_causal=True), ((1, 8, 2, 16), (1, 6, 2, 16)), "T == S"),
    (dict(implementation="cudnn"), None, "implementation"),
    (dict(sequence_order="striped"), None, "sequence_order"),
    (dict(sequence_order="zigzag"), ((1, 7, 2, 16), (1, 7, 2, 16)), "divisible by 2"),
    (dict(), ((1, 8, 3, 16), (1, 8, 2, 16)), "multiple of key/value heads"),
    (dict(), ((1, 8, 2, 16), (2, 8, 2, 16)), "batch sizes differ"),
    (dict(key_value_seq_lengths=jnp.ones((3,), jnp.int32)), None, "key_value_seq_lengths"),
    (dict(mesh="seq"), None, "jax.sharding.Mesh"),
])
def test_bad_input_raises_value_error(kwargs, shapes, match):
  q_shape, kv_shape = shapes or ((1, 8, 2, 16), (1, 8, 2, 16))
  q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
  call = dict(dict(mesh=_mesh1(), axis_name="seq"), **kwargs)
  with pytest.raises(ValueError, match=match):
    ring.ring_attention(q, k, k, **call)
