"""experiments/scaling.py: one measurement end to end in a subprocess, the dense-size skip, and the tables."""

from experiments import scaling


def _cfg(**kw):
  cfg = dict(variant="xla", mode="fwd_bwd", seq_len=64, batch=1, heads=1, head_dim=16, dtype="float32",
             causal=False, repeats=1, devices=1)
  cfg.update(kw)
  return cfg


def test_measure_in_a_subprocess():
  res = scaling.measure(_cfg(variant="linear_elu", causal=True), timeout_s=300)
  assert res["status"] == "ok", res["status"]
  assert res["time_s"] > 0 and res["peak_rss_mb"] >= res["rss_before_attention_mb"] > 0
  assert res["compiled_memory_mb"] > 0


def test_dense_variants_are_skipped_above_the_limit_without_running():
  res = scaling.measure(_cfg(seq_len=1 << 20), max_dense_gb=1.0)
  assert res["status"].startswith("skipped: dense logits need ~12288 GB")


def _row(variant, T, time_s, mem, status="ok", devices=1):
  return dict(variant=variant, mode="fwd_bwd", seq_len=T, devices=devices, status=status, time_s=time_s,
              peak_rss_mb=100.0, rss_before_attention_mb=50.0, compiled_memory_mb=mem)


def test_relative_table_divides_by_the_baseline_per_length():
  rows = [_row("xla", 1024, 2.0, 400.0), _row("lin", 1024, 0.5, 10.0), _row("xla", 4096, 0, 0, status="skipped"),
          _row("lin", 4096, 1.5, 40.0), _row("lin", 1024, 1.0, 5.0, devices=2)]
  table = scaling.relative_table(rows)
  assert "relative to `xla`" in table
  assert "| lin | 4× / 0.025× | 1.5 s / 40 MB |" in table          # 2.0/0.5 and 10/400; no baseline at 4096
  assert "| lin (2 devices) | 2× / 0.013× | – |" in table
  assert "| xla | 1× / 1× | – |" in table


def test_markdown_table_shows_failures():
  rows = [_row("xla", 64, 0.1, 1.0), _row("ring", 64, 0, 0, status="failed (exit -6): abort")]
  table = scaling.markdown_table(rows)
  assert "| xla | fwd_bwd | 64 | 1 | 0.100 | 100 | 50 | 1.0 | ok |" in table
  assert "| ring | fwd_bwd | 64 | 1 | – | – | – | – | failed (exit -6): abort |" in table


def test_experiment_scripts_import_together():
  """Scripts define their absl flags only when run, so importing several in one process does not clash."""
  import importlib
  for name in ("compare", "scaling", "bench_kernels", "tune_blocks", "mask_agreement", "analyze_heads",
               "seq2seq_alignment"):
    importlib.import_module(f"experiments.{name}")
