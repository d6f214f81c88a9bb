"""Training loop, models and the comparison script (smoke preset end to end)."""

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import compare, tasks, train
from experiments import config as config_lib
from experiments.models import TransformerLM


def test_loss_goes_down(tmp_path):
  cfg = train.TrainConfig(task="selective_copy", task_kwargs=dict(vocab_size=12, context_len=32, num_data=4),
                          d_model=32, num_heads=2, num_layers=1, steps=60, batch_size=32, lr=3e-3, warmup_steps=5,
                          log_every=10, eval_every=60, eval_batches=1, eval_batch_size=64)
  result = train.train_and_evaluate(cfg, str(tmp_path))
  train_losses = [h["loss"] for h in result.history if h["split"] == "train"]
  assert len(train_losses) == 6
  assert train_losses[-1] < train_losses[0] - 0.2, train_losses
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[-1]["split"] == "eval" and 0.0 <= lines[-1]["accuracy"] <= 1.0
  assert json.load(open(tmp_path / "config.json"))["task"] == "selective_copy"
  assert result.metrics["step_memory_mb"] > 0


def test_model_shapes_and_causality():
  m = TransformerLM(20, 32, 2, 2, 16, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 20, (2, 12)), jnp.int32)
  logits, weights = m(tokens, return_attention=True)
  assert logits.shape == (2, 12, 20) and len(weights) == 2 and weights[0].shape == (2, 2, 12, 12)
  np.testing.assert_allclose(np.asarray(weights[1]).sum(-1), 1.0, rtol=1e-5)
  # Changing the last token leaves earlier logits unchanged.
  changed = m(tokens.at[:, -1].set((tokens[:, -1] + 1) % 20))
  np.testing.assert_allclose(changed[:, :-1], logits[:, :-1], atol=1e-5)
  clf = TransformerLM(20, 32, 2, 1, 16, causal=False, num_classes=10, rngs=nnx.Rngs(0))
  assert clf(tokens).shape == (2, 10)


def _compare_config(preset, **overrides):
  return config_lib.build(compare.CompareConfig, compare.PRESETS, preset, **overrides)


def test_compare_smoke(tmp_path):
  results = compare.run_comparison(_compare_config("smoke"), tmp_path, preset="smoke")
  assert {r["task"] for r in results["runs"]} == {"mqar", "listops"}
  assert all(np.isfinite(r["loss"]) for r in results["runs"])
  assert all(r["d_model"] == 32 and r["state_size"] > 0 for r in results["runs"])
  for name in ("results.json", "results.md", "accuracy_vs_length_mqar.png", "accuracy_vs_length_listops.png",
               "recall_vs_state_mqar_T32.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert "| mqar | 32 | 32 | softmax | 0 | 2048 |" in open(tmp_path / "results.md").read()   # state 2 T d


def test_compare_budget_lists_what_did_not_run(tmp_path):
  config = _compare_config("smoke", tasks=["mqar"], variants=["softmax", "linear_elu"], budget_s=0.0)
  results = compare.run_comparison(config, tmp_path, preset="smoke")
  assert results["runs"] == []
  assert [(r["task"], r["variant"]) for r in results["not_run"]] == [("mqar", "softmax"), ("mqar", "linear_elu")]
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["not_run"] == results["not_run"]
  text = open(tmp_path / "results.md").read()
  assert "Not run (time budget): mqar T=32 d=32 softmax, mqar T=32 d=32 linear_elu" in text


def test_full_preset_task_instances_generate():
  """The full preset's task settings are valid generators (ListOps at T=512 needs deeper trees than at 256)."""
  full = _compare_config("full")
  for task, lens in full.task_lens.items():
    for seq_len in lens:
      kwargs = compare.task_kwargs(task, seq_len, full)
      if task == "listops":
        kwargs.update(num_train=64, num_test=16)
      batch = tasks.make_task(task, **kwargs).batch(0, 0, 4)
      assert batch["inputs"].shape == (4, seq_len), (task, seq_len, batch["inputs"].shape)


def test_compare_bigbird_spec_is_sparse_at_the_compared_lengths():
  """The BigBird spec compare.py trains must leave most key blocks out (quarter-length blocks would be dense)."""
  from attention_jax import sparse
  from experiments import variants
  for seq_len in (128, 256, 512):
    spec = compare._variant_spec("bigbird", seq_len)
    name, arg = variants.parse(spec)
    window, block = (int(x) for x in arg.split("@"))
    pattern = sparse.BigBirdPattern(window_blocks=window, global_blocks=1, random_blocks=2, seed=0, block=block)
    density = float(np.asarray(pattern.dense_mask(seq_len, seq_len)).mean())
    assert density < 0.5, (spec, density)
  fn = variants.make_attention(compare._variant_spec("bigbird", 128))
  q = jnp.ones((1, 128, 2, 8))
  assert fn(q, q, q, is_causal=True).shape == q.shape
