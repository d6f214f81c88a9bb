"""Decode-time benchmark: one new token against a context of L entries, per attention implementation and variant.

For every context length it times one decoding step of one attention layer (``B`` rows, one query token each,
every cache entry valid) and records

* ``time_ms`` (median of ``--repeats`` timed runs after a compile/warm-up run, each of enough back-to-back calls
  to last ~20 ms) and ``tokens_per_s = B / time``;
* ``state_bytes``: the decode state the layer keeps between tokens, from the arrays themselves -- the KV cache for
  softmax attention (``2 · B · L · K · H`` values), the window's ring buffer for a sliding window, the recurrent
  state for linear attention (elu+1, RetNet's decayed and DeltaNet's delta-rule states);
* ``step_memory_mb``: XLA's accounting of the compiled step (arguments + outputs + temporaries);
* for softmax: ``bandwidth_gb_s`` = bytes of KV cache read / time (every implementation reads the whole cache
  once), and its fraction of ``--peak_gb_s`` when given.

Then whole experiment Transformers (``--model_variants``, experiments/generate.py) generate at positions
``--model_contexts``: milliseconds per token and the bytes of every layer's decode state.

Softmax implementations: ``jax_nn`` (``jax.nn.dot_product_attention`` with ``key_value_seq_lengths``: the plain
dense call a user would write), ours through ``aj.decode_attention`` ("xla", "blockwise", "pallas", "pallas_tpu",
"cudnn"), and
``jax_decode`` (jax's bundled Triton ``decode_attention.gqa``, GPU only). Recurrent variants: ``linear_elu``
(``linear_attention_step``), ``retnet`` (``decayed_linear_attention_step``), ``deltanet``
(``delta_rule_attention_step``); ``local:W`` is softmax decode over a W-entry window buffer. What cannot run here
is recorded with the reason. ``--num_splits`` sweeps the split count of the split-K implementations at
``--sweep_context``.

  python -m experiments.decode_bench --workdir=runs/decode_cpu                      # CPU: 1K..64K contexts
  python -m experiments.decode_bench --preset=gpu --workdir=runs/decode_gpu         # GPU: bandwidth, to 1M

Writes ``results.json``, ``results.md`` and ``decode_time.png`` / ``decode_state.png`` (time and state bytes
against context) in ``--workdir``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

from experiments import common
from experiments import config as config_lib
from experiments.config import setting

SOFTMAX_IMPLS = ("jax_nn", "xla", "blockwise", "pallas", "pallas_tpu", "cudnn", "jax_decode")
RECURRENT = ("linear_elu", "retnet", "deltanet")
WORKDIR = "runs/decode_bench"
MIN_REPEAT_S = 0.02
MAX_INNER = 200
# HBM bandwidth of the cards we run on (GB/s), for the fraction of peak when --peak_gb_s is not given.
PEAK_GB_S = {"H200": 4800.0, "H100": 3350.0}


@dataclasses.dataclass(frozen=True)
class DecodeBenchConfig:
  implementations: tuple[str, ...] = setting(("jax_nn", "xla", "blockwise", "linear_elu", "retnet", "deltanet",
                                              "local:4096"), "Softmax implementations and variants to time.")
  contexts: tuple[int, ...] = setting((1024, 2048, 4096, 8192, 16384, 32768, 65536), "Context lengths L.")
  batch: int = setting(1, "B")
  heads: int = setting(8, "N (query heads)")
  kv_heads: int = setting(1, "K (kv heads)")
  head_dim: int = setting(64, "H (= Hv)")
  dtype: str = setting("float32", "Input dtype.")
  num_splits: tuple[int, ...] = setting((1, 2, 4, 8, 16, 32), "Split counts swept at sweep_context.")
  sweep_impls: tuple[str, ...] = setting(("blockwise",), "Implementations in the num_splits sweep.")
  sweep_context: int = setting(32768, "Context of the num_splits sweep (0: no sweep).")
  repeats: int = setting(7, "Timed repeats (median).")
  peak_gb_s: float = setting(0.0, "Memory bandwidth peak for the fraction column (0: from the device kind).")
  budget_s: float = setting(0.0, "Start no new measurement after this many seconds (0: no limit).")
  model_variants: tuple[str, ...] = setting(("softmax", "local:256", "linear_elu", "deltanet"),
                                            "Experiment Transformers generating token by token (empty: none).")
  model_contexts: tuple[int, ...] = setting((1024, 4096, 16384, 65536), "Positions the model generates at.")
  model_d: int = setting(64, "The generating models' d_model (2 heads, 2 layers, vocabulary 128).")
  model_steps: int = setting(16, "Tokens generated per timed repeat.")


PRESETS = {
    "default": {},
    # Flash-decoding's setting on a GPU: a GQA model's cache in bf16; the bandwidth bar is read at L = 64K.
    "gpu": dict(implementations=("jax_nn", "xla", "cudnn", "blockwise", "pallas", "jax_decode", "linear_elu",
                                 "deltanet"),
                contexts=(65536, 4096, 16384, 262144, 1048576), batch=8, heads=32, kv_heads=8, head_dim=128,
                dtype="bfloat16", sweep_impls=("pallas", "blockwise"), sweep_context=65536,
                num_splits=(1, 2, 4, 8, 16, 32, 64)),
}


def _inputs(config: DecodeBenchConfig, L: int):
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(config.dtype)
  B, N, K, H = config.batch, config.heads, config.kv_heads, config.head_dim
  keys = jax.random.split(jax.random.key(L), 3)
  q = jax.random.normal(keys[0], (B, 1, N, H), dtype)
  k = jax.random.normal(keys[1], (B, L, K, H), dtype)
  v = jax.random.normal(keys[2], (B, L, K, H), dtype)
  return q, k, v, jnp.full((B,), L, jnp.int32)


def softmax_step(impl: str, num_splits: int | None = None):
  """``f(q, k, v, lengths) -> out`` for one softmax decoding step (raises NotImplementedError where it cannot
  run)."""
  import jax
  import attention_jax as aj
  if impl == "jax_nn":
    return lambda q, k, v, n: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=n)
  if impl == "jax_decode":
    if jax.default_backend() != "gpu":
      raise NotImplementedError("jax's bundled Triton decode op needs a GPU")
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode
    return lambda q, k, v, n: jax_decode.gqa(q[:, 0], k, v, kv_seq_len=n)[:, None]
  if impl in ("pallas", "cudnn") and jax.default_backend() != "gpu":
    raise NotImplementedError(f"{impl} needs a GPU here (the Pallas kernel only runs interpreted on CPU)")
  if impl == "pallas_tpu" and jax.default_backend() != "tpu":
    raise NotImplementedError("pallas_tpu needs a TPU here (the Pallas kernel only runs interpreted on CPU)")
  return lambda q, k, v, n: aj.decode_attention(q, k, v, kv_lengths=n, implementation=impl, num_splits=num_splits)


def recurrent_step(name: str, config: DecodeBenchConfig):
  """``(f(state, q, k, v) -> (state, out), state)`` for one recurrent decoding step."""
  import jax.numpy as jnp
  from attention_jax import linear
  B, N, K, H = config.batch, config.heads, config.kv_heads, config.head_dim
  dtype = jnp.dtype(config.dtype)
  if name == "linear_elu":
    state = linear.init_state(B, K, H, "elu", dtype)
    return (lambda s, q, k, v: linear.linear_attention_step(s, q, k, v, "elu")), state
  state = jnp.zeros((B, N, H, H), jnp.float32)
  if name == "retnet":
    decay = jnp.log1p(-jnp.exp2(-5.0 - jnp.arange(N, dtype=jnp.float32)))
    return (lambda s, q, k, v: linear.decayed_linear_attention_step(s, q, k, v, decay)), state
  if name == "deltanet":
    beta = jnp.full((B, N), 0.5, dtype)
    return (lambda s, q, k, v: linear.delta_rule_attention_step(s, q, k, v, beta)), state
  raise ValueError(f"unknown recurrent variant {name!r}; choose from {RECURRENT}")


def _nbytes(tree) -> int:
  import jax
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _time(fn, args, repeats: int) -> tuple[float, int, float | None]:
  """(median seconds per call, inner calls per repeat, step memory MiB) of the jitted ``fn(*args)``."""
  import jax
  jitted = jax.jit(fn)
  compiled = jitted.lower(*args).compile()
  memory = common.compiled_memory_mb(compiled)
  jax.block_until_ready(jitted(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(jitted(*args))
  one = max(time.perf_counter() - t0, 1e-6)
  inner = max(1, min(MAX_INNER, int(MIN_REPEAT_S / one)))
  times = common.time_calls(lambda: jitted(*args), repeats, inner)
  return statistics.median(times), inner, memory


def _peak(config: DecodeBenchConfig) -> float | None:
  if config.peak_gb_s:
    return config.peak_gb_s
  import jax
  kind = jax.devices()[0].device_kind
  return next((v for name, v in PEAK_GB_S.items() if name in kind), None)


def measure(config: DecodeBenchConfig, impl: str, L: int, num_splits: int | None = None) -> dict:
  """One row: ``impl`` at context ``L``."""
  row = dict(implementation=impl, context=L, num_splits=num_splits, batch=config.batch, heads=config.heads,
             kv_heads=config.kv_heads, head_dim=config.head_dim, dtype=config.dtype)
  name, _, arg = impl.partition(":")
  try:
    if name in RECURRENT:
      step, state = recurrent_step(name, config)
      q, k, v, _ = _inputs(config, 1)
      args = (state, q[:, 0], k[:, 0], v[:, 0])
      seconds, inner, memory = _time(step, args, config.repeats)
      row.update(state_bytes=_nbytes(state))
    else:
      window = int(arg) if name == "local" else None
      cache_len = min(L, window) if window else L   # a window keeps a ring buffer of its last W entries
      q, k, v, n = _inputs(config, cache_len)
      fn = softmax_step("blockwise" if name == "local" else impl, num_splits)
      seconds, inner, memory = _time(fn, (q, k, v, n), config.repeats)
      kv_bytes = _nbytes((k, v))
      row.update(state_bytes=kv_bytes, bandwidth_gb_s=kv_bytes / seconds / 1e9)
      peak = _peak(config)
      if peak:
        row["bandwidth_fraction"] = row["bandwidth_gb_s"] / peak
    row.update(status="ok", time_ms=seconds * 1e3, tokens_per_s=config.batch / seconds, inner=inner,
               step_memory_mb=memory)
  except NotImplementedError as e:
    row["status"] = f"skipped: {e}"
  return row


def measure_model(config: DecodeBenchConfig, spec: str, L: int) -> dict:
  """Whole-model generation at position ``L``: seconds per token of ``generate``'s decode step (``model_steps``
  back-to-back steps from Python, the cache donated and updated in place) and the bytes of the model's decode
  state (``generate.cache_bytes``: every layer's cache or recurrent state)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from experiments import generate, models
  row = dict(variant=spec, context=L, d_model=config.model_d, batch=config.batch)
  n = config.model_steps
  model = models.TransformerLM(128, config.model_d, 2, 2, L + n, attention=spec, rngs=nnx.Rngs(0))
  step = generate.make_decode_step(model)
  cache = generate.init_cache(model, config.batch, L + n)
  row["state_bytes"] = generate.cache_bytes(cache)
  tokens = jnp.zeros((config.batch,), jnp.int32)
  logits, cache = step(cache, tokens, L - 1)   # compile; the cache contents do not change the work
  jax.block_until_ready(logits)
  times = []
  for _ in range(config.repeats):
    t0 = time.perf_counter()
    for i in range(n):
      logits, cache = step(cache, tokens, L + i)
    jax.block_until_ready(logits)
    times.append((time.perf_counter() - t0) / n)
  seconds = statistics.median(times)
  row.update(status="ok", time_ms=seconds * 1e3, tokens_per_s=config.batch / seconds)
  return row


def run(config: DecodeBenchConfig) -> dict:
  start = time.time()
  rows, sweep = [], []

  def over_budget():
    return config.budget_s and time.time() - start > config.budget_s

  def do_sweep():
    for impl in config.sweep_impls:
      for n in config.num_splits:
        if over_budget():
          sweep.append(dict(implementation=impl, context=config.sweep_context, num_splits=n, status="skipped: budget"))
          continue
        r = measure(config, impl, config.sweep_context, num_splits=n)
        sweep.append(r)
        print(_line(r), flush=True)

  for L in config.contexts:   # in the order given: put the context that matters first when the budget is short
    for impl in config.implementations:
      if over_budget():
        rows.append(dict(implementation=impl, context=L, status="skipped: budget"))
        continue
      r = measure(config, impl, L)
      rows.append(r)
      print(_line(r), flush=True)
    if L == config.sweep_context:
      do_sweep()
  if config.sweep_context and config.sweep_context not in config.contexts:
    do_sweep()
  rows.sort(key=lambda r: r["context"])
  model_rows = []
  for L in config.model_contexts:
    for spec in config.model_variants:
      if over_budget():
        model_rows.append(dict(variant=spec, context=L, status="skipped: budget"))
        continue
      r = measure_model(config, spec, L)
      model_rows.append(r)
      print(f"model {spec:18s} L={L:8d} {r['time_ms']:9.3f} ms/token  state {r['state_bytes'] / 2**20:9.3f} MiB",
            flush=True)
  return dict(meta=common.run_metadata(), config=dataclasses.asdict(config), rows=rows, sweep=sweep,
              model_rows=model_rows, wall_s=time.time() - start)


def _line(r: dict) -> str:
  label = r["implementation"] + (f" splits={r['num_splits']}" if r.get("num_splits") else "")
  if r["status"] != "ok":
    return f"{label:24s} L={r['context']:8d} {r['status']}"
  bw = f" {r['bandwidth_gb_s']:8.1f} GB/s" if "bandwidth_gb_s" in r else ""
  return (f"{label:24s} L={r['context']:8d} {r['time_ms']:9.3f} ms {r['tokens_per_s']:10.0f} tok/s "
          f"state {r['state_bytes'] / 2**20:9.3f} MiB{bw}")


def _fmt(x, spec: str) -> str:
  return "" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
  header = ["implementation", "context", "splits", "time (ms)", "tokens/s", "state (MiB)", "step memory (MiB)",
            "GB/s", "of peak"]
  body = []
  for r in rows:
    if r["status"] != "ok":
      body.append([r["implementation"], r["context"], r.get("num_splits") or "", r["status"], "", "", "", "", ""])
      continue
    body.append([r["implementation"], r["context"], r.get("num_splits") or "auto", _fmt(r["time_ms"], ".3f"),
                 _fmt(r["tokens_per_s"], ".0f"), _fmt(r["state_bytes"] / 2**20, ".3f"),
                 _fmt(r.get("step_memory_mb"), ".1f"), _fmt(r.get("bandwidth_gb_s"), ".1f"),
                 _fmt(r.get("bandwidth_fraction"), ".0%")])
  return common.markdown_table(header, body, "lrrrrrrrr")


def ratios(rows: list[dict], base: str = "jax_nn") -> list[tuple[int, str, float]]:
  """``(context, implementation, time / base's time)`` for every softmax implementation measured with ``base``."""
  ok = {(r["context"], r["implementation"]): r["time_ms"] for r in rows if r["status"] == "ok"}
  out = []
  for (L, impl), t in sorted(ok.items()):
    if impl in SOFTMAX_IMPLS and impl != base and (L, base) in ok:
      out.append((L, impl, t / ok[(L, base)]))
  return out


def report(data: dict) -> str:
  c = data["config"]
  lines = [f"# Decode attention: one token against L cached entries (B={c['batch']} N={c['heads']} "
           f"K={c['kv_heads']} H={c['head_dim']} {c['dtype']})", "",
           f"{data['meta']['date']}, {data['meta']['device_kind']} ({data['meta']['backend']}), "
           f"jax {data['meta']['jax']}, {data['meta']['cpu_count']} CPUs. Command: "
           f"`python -m experiments.decode_bench {' '.join(data['meta']['argv'][1:])}`", "",
           table(data["rows"]), ""]
  r = ratios(data["rows"])
  if r:
    lines += ["Time relative to the plain `jax.nn.dot_product_attention` call on the same cache:", "",
              common.markdown_table(["context", "implementation", "time / jax_nn"],
                                    [[L, impl, f"{x:.2f}"] for L, impl, x in r], "rlr"), ""]
  if data["sweep"]:
    lines += [f"num_splits sweep at L = {c['sweep_context']}:", "", table(data["sweep"]), ""]
  if data.get("model_rows"):
    lines += [f"Whole experiment Transformer (d_model {c['model_d']}, 2 layers, 2 heads) generating at position L: "
              "time per token and the decode state of all layers:", "",
              common.markdown_table(
                  ["variant", "context", "ms / token", "tokens/s", "decode state (MiB)"],
                  [[r["variant"], r["context"], _fmt(r.get("time_ms"), ".3f"), _fmt(r.get("tokens_per_s"), ".0f"),
                    _fmt(r["state_bytes"] / 2**20 if "state_bytes" in r else None, ".3f")]
                   if r["status"] == "ok" else [r["variant"], r["context"], r["status"], "", ""]
                   for r in data["model_rows"]], "lrrrr"), ""]
  return "\n".join(lines)


def plots(data: dict, workdir: str) -> None:
  ok = [r for r in data["rows"] if r["status"] == "ok"]
  impls = list(dict.fromkeys(r["implementation"] for r in ok))
  for key, ylabel, name in (("time_ms", "time per token (ms)", "decode_time.png"),
                            ("state_bytes", "decode state per layer (MiB)", "decode_state.png")):
    fig, (ax,) = common.new_figure((6, 4))
    scale = 1.0 if key == "time_ms" else 1 / 2**20
    series = {i: ([r["context"] for r in ok if r["implementation"] == i],
                  [r[key] * scale for r in ok if r["implementation"] == i]) for i in impls}
    common.line_plot(ax, series, xlabel="context length L", ylabel=ylabel, logy=True,
                     title=f"decode step, {data['config']['dtype']}, B={data['config']['batch']}")
    fig.savefig(os.path.join(workdir, name), dpi=120)


def main(config: DecodeBenchConfig, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  data = run(config)
  common.write_json(os.path.join(workdir, "results.json"), data)
  text = report(data)
  common.write_text(os.path.join(workdir, "results.md"), text)
  plots(data, workdir)
  print(text)


if __name__ == "__main__":
  config_lib.run(main, DecodeBenchConfig, PRESETS, workdir=WORKDIR)
