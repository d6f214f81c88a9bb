"""Dense mask arrays against the same mask given structurally, in the Pallas kernels: agreement and oracle error.

A causal mask with padded keys is given two ways: structurally (``is_causal=True`` and ``key_value_seq_lengths``)
and as one dense ``[B, 1, T, S]`` boolean array. For each kernel the script prints the largest difference between
the two outputs and between their gradients (dq, dk, dv of a weighted sum), and each one's largest error against
a float64 NumPy oracle. On CPU the kernels run interpreted, so this checks the kernel code, not its speed (speed:
``experiments.bench_kernels --mask_modes=structured,dense``).

  python -m experiments.mask_agreement                       # B=2, T=S=200, N=4, K=2, H=64, float32
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments import common
from experiments import config as config_lib
from experiments.config import setting

KERNELS = ("pallas", "pallas_tpu")


@dataclasses.dataclass(frozen=True)
class MaskAgreementConfig:
  batch: int = setting(2, "B")
  seq_len: int = setting(200, "T = S")
  heads: int = setting(4, "N (query heads)")
  kv_heads: int = setting(2, "K (key/value heads)")
  head_dim: int = setting(64, "H")
  padding: float = setting(0.25, "Fraction of the later sequences' keys that are padding.")
  implementations: tuple[str, ...] = setting(KERNELS, "Kernels to check.", choices=KERNELS, aliases=("kernels",))


def oracle(q, k, v, mask) -> np.ndarray:
  """Float64 softmax attention with a boolean ``mask [B, 1, T, S]`` (every row here sees a key)."""
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask, s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", w / w.sum(-1, keepdims=True), v)


def run(config: MaskAgreementConfig) -> list[dict]:
  """One row per kernel: largest dense - structured differences (output, gradients) and errors against the
  float64 oracle."""
  import jax
  import jax.numpy as jnp

  from attention_jax.kernels import flash_gpu, flash_tpu

  fns = {"pallas": flash_gpu.flash_attention, "pallas_tpu": flash_tpu.flash_attention_tpu}
  r = np.random.default_rng(0)
  B, T, N, K, H = config.batch, config.seq_len, config.heads, config.kv_heads, config.head_dim
  q64, k64, v64 = (r.standard_normal(s) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q64, k64, v64))
  lengths = np.array([T] + [T - int(round(T * config.padding))] * (B - 1))
  mask = np.tril(np.ones((T, T), bool))[None, None] & (np.arange(T)[None, :] < lengths[:, None])[:, None, None]
  want = oracle(q64, k64, v64, mask)
  weights = jnp.cos(jnp.arange(H, dtype=jnp.float32)).reshape(1, 1, 1, H)
  rows = []
  for name in config.implementations:
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


def main(config: MaskAgreementConfig) -> None:
  rows = [(r["kernel"], f"{r['out_diff']:.1e}", f"{r['grad_diff']:.1e}", f"{r['dense_oracle']:.1e}",
           f"{r['structured_oracle']:.1e}") for r in run(config)]
  print(common.markdown_table(("kernel", "max |dense - structured| out", "grads", "max |dense - oracle|",
                               "max |structured - oracle|"), rows, "lrrrr"))


if __name__ == "__main__":
  config_lib.run(main, MaskAgreementConfig)
