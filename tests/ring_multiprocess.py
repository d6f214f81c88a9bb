"""One process of a multi-process ring-attention run on CPU (the docs/RING.md multi-host recipe, on one machine).

tests/test_ring.py starts two of these (4 virtual CPU devices each, gloo collectives), which together form one
8-device mesh, as two hosts would:

  python -m tests.ring_multiprocess PROCESS_ID NUM_PROCESSES PORT

Checks its local shards of the output and gradients against the reference (tests/helpers tolerances) and prints
one JSON line: the process index and the rows its devices hold.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import attention_jax as aj
from tests.helpers import assert_close


def main(process_id: int, num_processes: int, port: int) -> None:
  jax.config.update("jax_num_cpu_devices", 4)     # before anything starts a backend, as tests/conftest.py
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                             process_id=process_id)
  mesh = jax.make_mesh((jax.device_count(),), ("seq",))          # every device of every process
  B, T, N, K, H = 2, 64, 4, 2, 16
  r = np.random.default_rng(0)                                   # each process can make any rows
  full = {n: r.standard_normal((B, T, h, H)).astype(np.float32) for n, h in (("q", N), ("k", K), ("v", K))}
  sharding = NamedSharding(mesh, P(None, "seq"))
  # Each process materialises only the rows its own devices hold (the callback gets their global indices).
  q, k, v = (jax.make_array_from_callback(full[n].shape, sharding, lambda idx, n=n: full[n][idx]) for n in "qkv")
  attn = jax.jit(functools.partial(aj.ring_attention, mesh=mesh, axis_name="seq", is_causal=True))
  loss = lambda fn: (lambda q, k, v: (fn(q, k, v) * jnp.cos(q)).sum())
  out = attn(q, k, v)
  grads = jax.jit(jax.grad(loss(attn), argnums=(0, 1, 2)))(q, k, v)
  ref = functools.partial(aj.reference_attention, is_causal=True)
  args = [jnp.asarray(full[n]) for n in "qkv"]
  want, want_grads = ref(*args), jax.grad(loss(ref), argnums=(0, 1, 2))(*args)
  for got, expected, kind in [(out, want, "fwd")] + [(g, w, "grad") for g, w in zip(grads, want_grads)]:
    for shard in got.addressable_shards:       # this process's part of the global result
      assert_close(shard.data, np.asarray(expected)[shard.index], jnp.float32, kind)
  print(json.dumps(dict(
      process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
      local_rows=[[s.index[1].start, s.index[1].stop] for s in out.addressable_shards], ok=True)), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*(int(a) for a in sys.argv[1:4]))
