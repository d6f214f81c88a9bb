"""experiments/decode_bench.py: a tiny run writes its files, state sizes are the arrays' (counted by hand here),
softmax state grows with the context and the recurrent states do not, unavailable implementations are recorded."""

import json
import os

import pytest

from experiments import config as config_lib
from experiments import decode_bench


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("decode_bench")
  config = config_lib.build(decode_bench.DecodeBenchConfig, decode_bench.PRESETS, "default",
                            implementations=("xla", "blockwise", "pallas", "linear_elu", "deltanet", "local:64"),
                            contexts=(256, 128), batch=2, heads=4, kv_heads=2, head_dim=16, num_splits=(1, 3),
                            sweep_context=128, repeats=1, model_variants=("softmax", "deltanet"),
                            model_contexts=(64, 128), model_d=16, model_steps=2)
  decode_bench.main(config, str(workdir))
  return workdir, json.load(open(workdir / "results.json"))


def test_files_and_rows(tiny):
  workdir, data = tiny
  for name in ("results.json", "results.md", "decode_time.png", "decode_state.png"):
    assert os.path.getsize(workdir / name) > 0
  assert [r["context"] for r in data["rows"]] == [128] * 6 + [256] * 6          # sorted by context
  assert [(r["implementation"], r["num_splits"]) for r in data["sweep"]] == [("blockwise", 1), ("blockwise", 3)]
  pallas = [r for r in data["rows"] if r["implementation"] == "pallas"]
  assert all(r["status"].startswith("skipped: pallas needs a GPU") for r in pallas)
  assert all(r["status"] == "ok" and r["time_ms"] > 0 for r in data["rows"] if r["implementation"] != "pallas")
  assert "| xla | 128 |" in open(workdir / "results.md").read()


def test_state_bytes(tiny):
  _, data = tiny
  state = {(r["implementation"], r["context"]): r.get("state_bytes") for r in data["rows"]}
  B, K, N, H = 2, 2, 4, 16
  for L in (128, 256):
    assert state[("xla", L)] == state[("blockwise", L)] == 2 * B * L * K * H * 4    # K and V caches, float32
    assert state[("local:64", L)] == 2 * B * 64 * K * H * 4                         # the window's buffer only
    assert state[("deltanet", L)] == B * N * H * H * 4                              # S [B, N, H, Hv]
    assert state[("linear_elu", L)] == B * K * (H * H + 2 * H) * 4                  # kv, z and log_scale
  assert state[("xla", 256)] == 2 * state[("xla", 128)]


def test_model_rows(tiny):
  """The generating models' decode state: softmax's KV caches double with the context, DeltaNet's state does not."""
  workdir, data = tiny
  state = {(r["variant"], r["context"]): r["state_bytes"] for r in data["model_rows"]}
  assert all(r["status"] == "ok" and r["time_ms"] > 0 for r in data["model_rows"])
  steps = 2
  # 2 layers x (K and V) x B x (L + steps) x d_model floats (2 heads of 8).
  assert state[("softmax", 64)] == 2 * 2 * 2 * (64 + steps) * 16 * 4
  assert state[("deltanet", 64)] == state[("deltanet", 128)]
  assert "Whole experiment Transformer" in open(workdir / "results.md").read()
