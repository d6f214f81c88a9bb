"""Synthetic task generators: determinism and labels correct by construction (checked independently)."""

import numpy as np
import pytest

from experiments import tasks


def test_deterministic_per_seed_step_and_split():
  t = tasks.MQAR(vocab_size=128, seq_len=64, num_kv_pairs=4)
  a, b = t.batch(3, 7, 8), t.batch(3, 7, 8)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  np.testing.assert_array_equal(a["targets"], b["targets"])
  assert not np.array_equal(a["inputs"], t.batch(3, 8, 8)["inputs"])
  assert not np.array_equal(a["inputs"], t.batch(4, 7, 8)["inputs"])
  assert not np.array_equal(a["inputs"], t.batch(3, 7, 8, "test")["inputs"])
  for task in (tasks.SelectiveCopy(context_len=40, num_data=5), tasks.InductionHeads(seq_len=30),
               tasks.Copy(length=6), tasks.ListOps(max_depth=3, max_args=4, min_length=5, max_length=40,
                                                   num_train=50, num_test=10)):
    x, y = task.batch(1, 2, 4), task.batch(1, 2, 4)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("T,P,V,random_filler", [(64, 4, 128, True), (128, 8, 256, False), (256, 16, 8192, True)])
def test_mqar_answers_match_a_dict(T, P, V, random_filler):
  task = tasks.MQAR(vocab_size=V, seq_len=T, num_kv_pairs=P, random_non_queries=random_filler)
  batch = task.batch(0, 0, 32)
  inputs, targets = batch["inputs"], batch["targets"]
  assert inputs.shape == targets.shape == (32, T) and inputs.dtype == np.int32
  for x, y in zip(inputs, targets):
    kv = dict(zip(x[0:2 * P:2].tolist(), x[1:2 * P:2].tolist()))
    assert len(kv) == P                                   # distinct keys
    assert all(1 <= k < V // 2 for k in kv) and all(V // 2 <= v < V for v in kv.values())
    queried = np.flatnonzero(y != tasks.IGNORE)
    assert len(queried) == P                              # every key queried exactly once
    assert sorted(x[queried].tolist()) == sorted(kv)
    for pos in queried:
      assert pos >= 2 * P and y[pos] == kv[int(x[pos])]
    if not random_filler:
      rest = np.setdiff1d(np.arange(2 * P, T), queried)
      assert (x[rest] == 0).all()


def test_mqar_gaps_follow_the_power_law():
  # power_a = 0.01: most queries sit right after the key-value block.
  task = tasks.MQAR(vocab_size=512, seq_len=256, num_kv_pairs=4, random_non_queries=False)
  t = task.batch(0, 0, 256)["targets"]
  pos = np.argwhere(t != tasks.IGNORE)[:, 1] - 8
  assert np.median(pos) < 40 and pos.max() > 100


def test_selective_copy():
  task = tasks.SelectiveCopy(vocab_size=10, context_len=50, num_data=6)
  b = task.batch(0, 1, 16)
  assert b["inputs"].shape == (16, 56)
  for x, y in zip(b["inputs"], b["targets"]):
    data = x[:50][x[:50] != 0]
    assert len(data) == 6 and (data >= 2).all()
    np.testing.assert_array_equal(y[50:], data)           # in order
    assert (x[50:] == 1).all() and (y[:50] == tasks.IGNORE).all()


def test_induction_heads():
  task = tasks.InductionHeads(vocab_size=8, seq_len=40)
  b = task.batch(0, 0, 64)
  trigger = 7
  for x, y in zip(b["inputs"], b["targets"]):
    where = np.flatnonzero(x == trigger)
    assert len(where) == 2 and where[1] == 39
    assert y[39] == x[where[0] + 1] and (y[:39] == tasks.IGNORE).all()


def test_copy_and_reverse():
  for reverse in (False, True):
    b = tasks.Copy(vocab_size=20, length=5, reverse=reverse).batch(0, 0, 3)
    for x, y in zip(b["inputs"], b["targets"]):
      src = x[1:6]
      want = src[::-1] if reverse else src
      assert x[0] == 1 and x[6] == 2
      np.testing.assert_array_equal(y[6:11], want)
      assert y[11] == 3 and (y[:6] == tasks.IGNORE).all()


@pytest.mark.parametrize("text,value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[SM 3 4 5 ]", 2), ("[MED 1 5 3 9 ]", 4), ("[MIN [SM 9 9 ] 8 ]", 8),
    ("[MED 7 [MAX 1 2 ] 3 ]", 3), ("6", 6)])
def test_listops_evaluator_by_hand(text, value):
  vocab = {**{str(d): t for d, t in tasks.LISTOPS_DIGITS.items()}, **tasks.LISTOPS_OPS, "]": tasks.LISTOPS_END}
  assert tasks.evaluate_listops([vocab[w] for w in text.split()]) == value


def test_listops_labels_lengths_and_split():
  task = tasks.ListOps(max_depth=5, max_args=5, min_length=20, max_length=80, num_train=300, num_test=60)
  for split in ("train", "test"):
    b = task.batch(0, 0, 64, split)
    assert b["inputs"].shape == (64, 79) and b["label"].shape == (64,)
    for x, label in zip(b["inputs"], b["label"]):
      n = int((x != 0).sum())
      assert 20 < n < 80 and (x[n:] == 0).all()
      assert tasks.evaluate_listops(x) == label
  train = {toks for toks, _ in task.split_pool("train")}
  test = {toks for toks, _ in task.split_pool("test")}
  assert len(train) == 300 and len(test) == 60 and not train & test
  # Labels use all ten classes.
  assert len(np.unique(task.batch(0, 1, 256)["label"])) == 10


def test_bad_configs():
  with pytest.raises(ValueError, match="num_kv_pairs"):
    tasks.MQAR(seq_len=16, num_kv_pairs=8)
  with pytest.raises(ValueError, match="unknown task"):
    tasks.make_task("parity")
