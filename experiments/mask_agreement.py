"""Dense mask arrays against the same mask given structurally, in the Pallas kernels: agreement and oracle error.

A causal mask with padded keys is given two ways: structurally (``is_causal=True`` and ``key_value_seq_lengths``)
and as one dense ``[B, 1, T, S]`` boolean array. For each kernel the script prints the largest difference between
the two outputs and between their gradients (dq, dk, dv of a weighted sum), and each one's largest error against
a float64 NumPy oracle. On CPU the kernels run interpreted, so this checks the kernel code, not its speed (speed:
``experiments.bench_kernels --mask_modes=structured,dense``).

  python -m experiments.mask_agreement                       # B=2, T=S=200, N=4, K=2, H=64, float32
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_integer("batch", 2, "B")
  flags.DEFINE_integer("seq_len", 200, "T = S")
  flags.DEFINE_integer("heads", 4, "N (query heads)")
  flags.DEFINE_integer("kv_heads", 2, "K (key/value heads)")
  flags.DEFINE_integer("head_dim", 64, "H")
  flags.DEFINE_float("padding", 0.25, "Fraction of the second sequence's keys that are padding.")
  flags.DEFINE_list("kernels", ["pallas", "pallas_tpu"], "Kernels to check.")


def oracle(q, k, v, mask) -> np.ndarray:
  """Float64 softmax attention with a boolean ``mask [B, 1, T, S]`` (every row here sees a key)."""
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask, s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", w / w.sum(-1, keepdims=True), v)


def run(batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, padding: float,
        kernels: list[str]) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from attention_jax.kernels import flash_gpu, flash_tpu

  fns = {"pallas": flash_gpu.flash_attention, "pallas_tpu": flash_tpu.flash_attention_tpu}
  r = np.random.default_rng(0)
  B, T, N, K, H = batch, seq_len, heads, kv_heads, head_dim
  q64, k64, v64 = (r.standard_normal(s) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q64, k64, v64))
  lengths = np.array([T] + [T - int(round(T * padding))] * (B - 1))
  mask = np.tril(np.ones((T, T), bool))[None, None] & (np.arange(T)[None, :] < lengths[:, None])[:, None, None]
  want = oracle(q64, k64, v64, mask)
  weights = jnp.cos(jnp.arange(H, dtype=jnp.float32)).reshape(1, 1, 1, H)
  rows = []
  for name in kernels:
    fn = fns[name]
    ways = {"structured": lambda q, k, v: fn(q, k, v, is_causal=True, key_value_seq_lengths=jnp.asarray(lengths)),
            "dense": lambda q, k, v: fn(q, k, v, mask=jnp.asarray(mask))}
    got = {}
    for way, f in ways.items():
      loss = lambda q, k, v, f=f: jnp.sum(f(q, k, v) * weights)
      grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
      got[way] = (np.asarray(f(q, k, v)), [np.asarray(g) for g in grads])
    (out_s, g_s), (out_d, g_d) = got["structured"], got["dense"]
    rows.append(dict(kernel=name, out_diff=float(np.abs(out_d - out_s).max()),
                     grad_diff=float(max(np.abs(a - b).max() for a, b in zip(g_d, g_s))),
                     dense_oracle=float(np.abs(out_d - want).max()),
                     structured_oracle=float(np.abs(out_s - want).max())))
  return rows


def main(argv) -> None:
  del argv
  rows = run(FLAGS.batch, FLAGS.seq_len, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.padding, FLAGS.kernels)
  print("| kernel | max |dense - structured| out | grads | max |dense - oracle| | max |structured - oracle| |")
  print("|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['kernel']} | {r['out_diff']:.1e} | {r['grad_diff']:.1e} | {r['dense_oracle']:.1e} | "
          f"{r['structured_oracle']:.1e} |")


if __name__ == "__main__":
  define_flags()
  app.run(main)
