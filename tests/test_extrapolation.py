"""experiments/extrapolation.py (smoke run) and the flex variants it trains (experiments/variants.py, models.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from experiments import config as config_lib
from experiments import extrapolation, tasks, variants
from experiments.models import TransformerLM
from tests.helpers import assert_close, randn


def np_causal_alibi_attention(q, k, v):
  """Causal softmax attention with ALiBi (Press et al. 2022) in float64 NumPy, slopes 2^(-8 i / N), i = 1..N."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  slopes = 2.0 ** (-8.0 * np.arange(1, N + 1) / N)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H) - slopes[None, :, None, None] * (i - j)[None, None]
  logits = np.where(j <= i, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("spec", ["alibi", "alibi:reference", "alibi:blockwise"])
def test_alibi_variant_equals_numpy_oracle(spec):
  r = np.random.default_rng(0)
  q, k, v = (randn(r, (2, 12, 4, 8)) for _ in range(3))
  fn = variants.make_attention(spec, block_size=4)
  assert_close(fn(q, k, v, is_causal=True), np_causal_alibi_attention(q, k, v))
  assert_close(jax.jit(fn, static_argnames="is_causal")(q, k, v, is_causal=True), np_causal_alibi_attention(q, k, v))


def test_flex_and_nope_variants_are_plain_causal_softmax():
  r = np.random.default_rng(1)
  q, k, v = (randn(r, (2, 10, 2, 8)) for _ in range(3))
  want = aj.reference_attention(q, k, v, is_causal=True)
  for spec in ("flex", "nope"):
    assert_close(variants.make_attention(spec)(q, k, v, is_causal=True), want)
  assert [variants.learned_positions(s) for s in ("softmax", "local:8", "flex", "alibi", "alibi:reference", "nope")] \
      == [True, True, True, False, False, False]


def test_positions_follow_the_variant_and_none_takes_any_length():
  learned = TransformerLM(20, 16, 2, 1, 8, attention="softmax", rngs=nnx.Rngs(0))
  alibi = TransformerLM(20, 16, 2, 1, 8, attention="alibi", rngs=nnx.Rngs(0))
  assert learned.positions == "learned" and learned.pos[...].shape == (8, 16)
  assert alibi.positions == "none" and alibi.pos is None
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 20, (2, 24)), jnp.int32)
  assert nnx.jit(lambda m, t: m(t))(alibi, tokens).shape == (2, 24, 20)
  with pytest.raises(ValueError, match="exceeds max_len=8"):
    nnx.jit(lambda m, t: m(t))(learned, tokens)
  with pytest.raises(ValueError, match="positions must be one of"):
    TransformerLM(20, 16, 2, 1, 8, positions="rotary", rngs=nnx.Rngs(0))


def test_learned_rows_past_the_training_length_get_no_gradient():
  """What the experiment relies on: training at L never updates the position rows L..4L-1."""
  config = config_lib.build(extrapolation.Config, extrapolation.PRESETS, "smoke")
  model = extrapolation.make_model(config, "learned", 0)
  L = config.train_len
  assert model.pos[...].shape[0] == L * max(config.eval_factors)
  batch = tasks.make_task("induction", vocab_size=config.vocab_size, seq_len=L).batch(0, 0, 4)

  def loss(m):
    return extrapolation._loss_and_accuracy(m(batch["inputs"]), batch["targets"])[0]
  g = np.asarray(nnx.jit(nnx.grad(loss))(model).pos[...])
  assert np.all(g[L:] == 0) and np.any(g[:L] != 0)


def test_smoke_run_writes_files_and_sane_numbers(tmp_path):
  config = config_lib.build(extrapolation.Config, extrapolation.PRESETS, "smoke", schemes=("learned", "alibi"),
                            eval_factors=(1, 2))
  results = extrapolation.train_and_evaluate(config, tmp_path)
  for name in ("results.json", "results.md", "accuracy_vs_length.png"):
    assert os.path.getsize(tmp_path / name) > 0
  saved = json.load(open(tmp_path / "results.json"))
  assert [(r["scheme"], r["lengths"]) for r in saved["runs"]] == [("learned", [8, 16]), ("alibi", [8, 16])]
  for r in saved["runs"]:
    assert all(0.0 <= a <= 1.0 for a in r["accuracy"]) and all(np.isfinite(r["loss"]))
    for key in ("accuracy_by_position", "accuracy_by_distance"):
      assert sum(b["count"] for b in r[key]["16"].values()) == config.eval_batch_size
  assert saved["summary"]["alibi"]["mean"] == results["runs"][1]["accuracy"]
  text = open(tmp_path / "results.md").read()
  assert "| learned | `softmax` |" in text and "| alibi | `alibi` |" in text and "T = 16 (2L)" in text
