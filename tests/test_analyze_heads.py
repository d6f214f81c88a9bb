"""experiments/analyze_heads.py: repeated sequences, answer attention on task examples, the end-to-end run."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import viz
from experiments import analyze_heads as ah
from experiments import tasks as tasks_lib
from tests.helpers import assert_close


def test_repeated_random_tokens():
  tokens = ah.repeated_random_tokens(0, 5, 7, 3, 12)
  assert tokens.shape == (5, 14) and tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens[:, :7], tokens[:, 7:])
  for row in tokens:
    assert len(set(row[:7].tolist())) == 7 and row.min() >= 3 and row.max() < 12
  assert not np.array_equal(tokens[0], tokens[1])
  with pytest.raises(ValueError, match="period=10 .* has 9"):
    ah.repeated_random_tokens(0, 1, 10, 3, 12)


def test_answer_attention_on_induction_task_examples():
  task = tasks_lib.InductionHeads(vocab_size=8, seq_len=12)
  batch = task.batch(0, 0, 6)
  tokens, loss = batch["inputs"], batch["targets"] != tasks_lib.IGNORE
  B, T = tokens.shape
  trigger = task.vocab_size - 1
  # Head 0 attends from the last position to the token after the first trigger (the answer), head 1 to itself.
  w = np.zeros((1, B, 2, T, T))
  w[:, :, :, np.arange(T), np.arange(T)] = 1.0
  for b in range(B):
    first = int(np.flatnonzero(tokens[b] == trigger)[0])
    w[0, b, 0, T - 1] = 0.0
    w[0, b, 0, T - 1, first + 1] = 1.0
  got = ah.induction_attention(jnp.asarray(w), jnp.asarray(tokens), jnp.asarray(loss))
  assert got.shape == (1, 2)
  assert_close(got, np.array([[1.0, 0.0]]))
  # Uniform causal weights put 1 / T on the answer at the last position.
  uniform = np.broadcast_to(np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None], (1, B, 2, T, T))
  assert_close(ah.induction_attention(jnp.asarray(uniform), jnp.asarray(tokens), jnp.asarray(loss)),
               np.full((1, 2), 1.0 / T))


def test_induction_attention_on_all_positions_is_the_induction_score():
  rng = np.random.default_rng(0)
  tokens = ah.repeated_random_tokens(2, 3, 6, 0, 20)
  logits = rng.standard_normal((2, 3, 4, 12, 12))
  w = np.exp(np.where(np.tril(np.ones((12, 12), bool)), logits, -np.inf))
  w /= w.sum(-1, keepdims=True)
  got = ah.induction_attention(jnp.asarray(w), jnp.asarray(tokens), jnp.ones((3, 12), bool))
  # Every repeated query counts once, so the pooled mean equals the per-sequence mean (same count per sequence).
  expected = np.asarray(viz.induction_score(np.swapaxes(w, 0, 1), tokens)).mean(0)
  assert_close(got, expected)


def test_uniform_causal_reference_values():
  tokens = ah.repeated_random_tokens(1, 3, 5, 0, 10)
  ref = ah.uniform_causal_reference(tokens)
  T, P = 10, 5
  assert_close(ref["previous_token"], np.mean([1 / (t + 1) for t in range(1, T)]))
  assert_close(ref["induction"], np.mean([1 / (t + 1) for t in range(P, T)]))
  assert_close(ref["entropy"], np.mean(np.log(np.arange(1, T + 1))))


def test_bad_task_raises():
  with pytest.raises(ValueError, match="'copy'"):
    ah.task_kwargs(ah.HeadsConfig(task="copy"))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["induction", "mqar"])
def test_smoke_run_writes_table_and_plots(tmp_path, task):
  config = dataclasses.replace(ah.HeadsConfig(**ah.PRESETS["smoke"]), task=task)
  out = ah.train_and_evaluate(config, tmp_path, verbose=False)
  assert len(out["heads"]) == config.num_layers * config.num_heads
  for h in out["heads"]:
    assert set(ah.STATS) | {"answer_attention"} <= set(h)
    assert 0.0 <= h["induction"] <= 1.0 and 0.0 <= h["previous_token"] <= 1.0
  assert json.loads((tmp_path / "head_stats.json").read_text())["period"] == out["period"]
  assert "| uniform causal head |" in (tmp_path / "head_stats.md").read_text()
  for l in range(config.num_layers):
    for name in (f"heads_layer{l}.png", f"task_heads_layer{l}.png"):
      assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
  assert ("induction_in_context" in out["heads"][0]) == (task == "mqar")
  again = ah.train_and_evaluate(dataclasses.replace(config, reuse=True), str(tmp_path), verbose=False)  # reloads
  assert again["heads"] == out["heads"]
  with pytest.raises(ValueError, match="another configuration"):
    ah.train_and_evaluate(dataclasses.replace(config, steps=7, reuse=True), tmp_path, verbose=False)
