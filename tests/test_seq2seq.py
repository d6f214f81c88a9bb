"""experiments/seq2seq_alignment.py: reversal data, masked attention weights, what each score reads, training."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import seq2seq_alignment as s2s
from tests.helpers import assert_close

TINY = s2s.Config(attentions=("bahdanau",), num_symbols=6, min_len=2, max_len=7, embed_dim=8, hidden=16,
                  attn_dim=8, batch_size=16, steps=40, lr=1e-2, eval_examples=8,
                  eval_lengths=(2, 5, 7), heatmap_length=4, log_every=10)
ATTENDING = ("bahdanau", "luong_dot", "luong_general", "luong_concat")


def tiny_model(attention, cell="gru", seed=0):
  return s2s.make_model(dataclasses.replace(TINY, cell=cell), attention, seed)


def test_make_batch_is_padded_reversal():
  batch = jax.device_get(s2s.make_batch(jax.random.key(0), 32, 2, 7, 6, width=9))
  assert batch.src.shape == (32, 9) and batch.tgt_in.shape == batch.tgt_out.shape == (32, 10)
  assert set(np.unique(batch.lengths)) <= set(range(2, 8)) and len(np.unique(batch.lengths)) > 1
  for src, tgt_in, tgt_out, L in zip(batch.src, batch.tgt_in, batch.tgt_out, batch.lengths):
    symbols = list(src[:L])
    assert all(s2s.NUM_SPECIAL <= x < s2s.NUM_SPECIAL + 6 for x in symbols)
    assert list(src[L:]) == [s2s.PAD] * (9 - L)
    assert list(tgt_out) == symbols[::-1] + [s2s.EOS] + [s2s.PAD] * (9 - L)
    assert list(tgt_in) == [s2s.BOS] + list(tgt_out[:-1])


def varied_batch(width=7, lengths=(7, 3, 5, 1)):
  batch = s2s.make_batch(jax.random.key(1), len(lengths), 1, 1, 6, width)
  sym = jax.random.randint(jax.random.key(2), (len(lengths), width), s2s.NUM_SPECIAL, s2s.NUM_SPECIAL + 6)
  lengths = jnp.asarray(lengths)
  src = jnp.where(jnp.arange(width)[None, :] < lengths[:, None], sym, s2s.PAD)
  return src, batch.tgt_in[:, :width]   # any decoder inputs will do


_FAST = ("bahdanau", "luong_general")


@pytest.mark.parametrize("attention", [a if a in _FAST else pytest.param(a, marks=pytest.mark.slow) for a in ATTENDING])
def test_weights_sum_to_one_over_valid_source_and_zero_on_padding(attention):
  src, tgt_in = varied_batch()
  model = tiny_model(attention)
  logits, w_BTS = model(src, tgt_in)
  assert logits.shape == (4, 7, model.vocab_size)
  assert w_BTS.shape == (4, 7, 7)
  valid = np.asarray(src != s2s.PAD)[:, None, :]
  w = np.asarray(w_BTS)
  assert np.all(w >= 0)
  assert_close(w.sum(-1), np.ones((4, 7)))
  assert np.all(w[np.broadcast_to(~valid, w.shape)] == 0.0)
  tokens, w_greedy = model.greedy(src, 5)
  assert tokens.shape == (4, 5) and w_greedy.shape == (4, 5, 7)
  assert_close(np.asarray(w_greedy).sum(-1), np.ones((4, 5)))
  assert np.all(np.asarray(w_greedy)[np.broadcast_to(~valid, w_greedy.shape)] == 0.0)


def test_no_attention_has_no_weights():
  src, tgt_in = varied_batch()
  logits, weights = tiny_model("none")(src, tgt_in)
  assert weights is None and logits.shape == (4, 7, s2s.NUM_SPECIAL + 6)


@pytest.mark.parametrize("attention,cell", [("luong_general", "gru"), ("bahdanau", "lstm")])
def test_padding_does_not_change_the_output(attention, cell):
  src, tgt_in = varied_batch(width=5, lengths=(5, 2, 4))
  wider = jnp.pad(src, ((0, 0), (0, 4)))
  model = tiny_model(attention, cell)
  logits, w = model(src, tgt_in)
  logits_wide, w_wide = model(wider, tgt_in)
  assert_close(logits_wide, logits)
  assert_close(w_wide[..., :5], w)
  assert np.all(np.asarray(w_wide[..., 5:]) == 0.0)


def test_bahdanau_scores_previous_state_luong_current_state():
  """Changing decoder input y_t (fed at step t) moves Luong's weights from step t, Bahdanau's only from t + 1."""
  src, tgt_in = varied_batch()
  changed = tgt_in.at[:, 2].set(jnp.where(tgt_in[:, 2] == 3, 4, 3))
  for attention, first_changed in (("bahdanau", 3), ("luong_dot", 2), ("luong_concat", 2)):
    model = tiny_model(attention)
    _, w = model(src, tgt_in)
    _, w_changed = model(src, changed)
    diff = np.abs(np.asarray(w_changed - w)).max(axis=(0, 2))       # per decoder step
    assert np.all(diff[:first_changed] == 0.0), (attention, diff)
    assert diff[first_changed] > 1e-6, (attention, diff)


def test_alignment_accuracy_on_hand_built_weights():
  L, T = np.array([3, 4]), 5
  anti = np.zeros((2, T, 4))
  for b, l in enumerate(L):
    for t in range(l):
      anti[b, t, l - 1 - t] = 1.0
  assert_close(s2s.alignment_accuracy(jnp.asarray(anti), jnp.asarray(L)), np.ones(2))
  diag = np.zeros((2, T, 4))
  diag[:, np.arange(4), np.arange(4)] = 1.0
  # Length 3: only t = 1 (position 1) is on both diagonals; length 4: none.
  assert_close(s2s.alignment_accuracy(jnp.asarray(diag), jnp.asarray(L)), np.array([1 / 3, 0.0]))


def test_bad_configuration_raises():
  with pytest.raises(ValueError, match="unknown attention='luong_cosine'"):
    tiny_model("luong_cosine")
  with pytest.raises(ValueError, match="unknown cell='rnn'"):
    tiny_model("none", cell="rnn")


def test_training_reduces_loss_and_writes_reports(tmp_path):
  config = dataclasses.replace(TINY, attentions=("none", "bahdanau"))
  rows = s2s.train_and_evaluate(config, tmp_path, verbose=False)
  log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
  for attention in config.attentions:
    losses = [r["loss"] for r in log if r["attention"] == attention]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.2, (attention, losses)
  assert {(r["attention"], r["length"]) for r in rows} == {(a, l) for a in config.attentions for l in (2, 5, 7)}
  for r in rows:
    assert 0.0 <= r["seq_acc"] <= r["token_acc"] + 1e-9 <= 1.0 + 1e-9
    assert (r["align_acc"] is None) == (r["attention"] == "none")
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == rows and saved["config"]["steps"] == TINY.steps
  table = (tmp_path / "results.md").read_text()
  assert "| length | none | bahdanau |" in table and "| 7 |" in table
  for name in ("accuracy_vs_length.png", "alignment_bahdanau.png", "alignments.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
  assert not (tmp_path / "alignment_none.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("attention,cell", [(a, "gru") for a in ATTENDING[1:]] +
                         [(a, "lstm") for a in s2s.ATTENTIONS])
def test_training_reduces_loss_every_variant(attention, cell):
  _, history = s2s.train(dataclasses.replace(TINY, cell=cell), attention, seed=1)
  assert history[-1]["loss"] < history[0]["loss"] - 0.2, history
