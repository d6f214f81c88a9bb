"""Seeded synthetic long-sequence tasks, generated in vectorised NumPy (no downloads).

Every task has ``vocab_size``, ``seq_len`` (model input length), ``num_classes`` (None for per-token tasks) and
``batch(seed, step, batch_size, split="train") -> dict`` returning int32 arrays:
``inputs [B, T]`` and either ``targets [B, T]`` (IGNORE = -100 where no loss is taken) or ``label [B]``.
A batch depends only on (seed, split, step, batch_size), so runs are reproducible and the test split never
overlaps the training stream's random draws.

* :class:`MQAR` — multi-query associative recall (Zoology, Arora et al. 2023).
* :class:`SelectiveCopy` — copy the scattered data tokens in order (Mamba, Gu & Dao 2023, E.1).
* :class:`InductionHeads` — predict the token that followed the first occurrence of a trigger (Mamba appendix).
* :class:`ListOps` — nested MIN/MAX/MED/SM expressions, 10 classes (Long Range Arena, Tay et al. 2020).
* :class:`Copy` — ``$ x | x .`` or its reversal, loss on the answer only (Jelassi et al. 2024).
"""

from __future__ import annotations

import dataclasses
import functools
import random

import numpy as np

IGNORE = -100
_TEST_STREAM = 1_000_003   # split offset mixed into the seed sequence


def _rng(seed: int, step: int, split: str) -> np.random.Generator:
  return np.random.default_rng([seed, _TEST_STREAM if split == "test" else 0, step])


def _random_subsets(rng: np.random.Generator, batch: int, population: int, size: int) -> np.ndarray:
  """``[batch, size]`` distinct values from ``range(population)`` per row (uniform, vectorised)."""
  return np.argsort(rng.random((batch, population)), axis=1)[:, :size]


def _require(task, ok: bool, needs: str) -> None:
  """ValueError naming the task, what it needs and its settings, unless ``ok``."""
  if not ok:
    raise ValueError(f"{type(task).__name__} needs {needs}; got {task}")


def _weighted_subsets(rng: np.random.Generator, batch: int, probs: np.ndarray, size: int) -> np.ndarray:
  """Sampling without replacement with probabilities ``probs`` (Gumbel top-k == sequential draws)."""
  keys = np.log(probs)[None, :] + rng.gumbel(size=(batch, probs.shape[0]))
  return np.argsort(-keys, axis=1)[:, :size]


@dataclasses.dataclass(frozen=True)
class MQAR:
  """Multi-query associative recall, following the generator of Zoology (Arora et al. 2023, arXiv:2312.04927).

  Keys come from ``[1, V/2)``, values from ``[V/2, V)``; an example starts with ``num_kv_pairs`` pairs
  ``k1 v1 k2 v2 ...``; each key is queried once later, at gaps drawn without replacement from a power law
  (``power_a``); the target at a query position is that key's value and every other position is IGNORE.
  Filler is 0, replaced by random tokens when ``random_non_queries`` (Zoology's default).
  """
  vocab_size: int = 8192
  seq_len: int = 64
  num_kv_pairs: int = 4
  power_a: float = 0.01
  random_non_queries: bool = True
  num_classes = None

  def __post_init__(self):
    _require(self, self.seq_len % 2 == 0 and 4 * self.num_kv_pairs <= self.seq_len < self.vocab_size,
             "an even seq_len >= 4 * num_kv_pairs and vocab_size > seq_len")
    _require(self, self.vocab_size // 2 - 1 >= self.num_kv_pairs, "vocab_size // 2 - 1 >= num_kv_pairs (keys)")

  def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
    rng = _rng(seed, step, split)
    B, T, P, V = batch_size, self.seq_len, self.num_kv_pairs, self.vocab_size
    half = V // 2
    keys = 1 + _random_subsets(rng, B, half - 1, P)
    values = half + _random_subsets(rng, B, V - half, P)
    context = 2 * P
    space = (T - context) // 2
    probs = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
    gaps = _weighted_subsets(rng, B, probs / probs.sum(), P)
    seq = np.zeros((B, T + 1), np.int64)
    seq[:, 0:context:2], seq[:, 1:context:2] = keys, values
    rows = np.arange(B)[:, None]
    seq[rows, context + 2 * gaps] = keys
    labels = np.full((B, T + 1), IGNORE, np.int64)
    labels[rows, context + 2 * gaps + 1] = values
    inputs, targets = seq[:, :-1], labels[:, 1:]
    if self.random_non_queries:
      filler = inputs == 0
      inputs = np.where(filler, rng.integers(0, V, size=inputs.shape), inputs)
    return dict(inputs=inputs.astype(np.int32), targets=targets.astype(np.int32))


@dataclasses.dataclass(frozen=True)
class SelectiveCopy:
  """``num_data`` data tokens at random positions among noise in a context of ``context_len``, followed by
  ``num_data`` marker tokens; at the i-th marker the target is the i-th data token (in order).

  Tokens: 0 = noise, 1 = marker, data from ``[2, vocab_size)``. ``seq_len = context_len + num_data``.
  """
  vocab_size: int = 16
  context_len: int = 256
  num_data: int = 16
  num_classes = None

  def __post_init__(self):
    _require(self, self.num_data <= self.context_len and self.vocab_size >= 3,
             "num_data <= context_len and vocab_size >= 3")

  @property
  def seq_len(self) -> int:
    return self.context_len + self.num_data

  def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
    rng = _rng(seed, step, split)
    B, L, n = batch_size, self.context_len, self.num_data
    positions = np.sort(_random_subsets(rng, B, L, n), axis=1)
    data = rng.integers(2, self.vocab_size, size=(B, n))
    inputs = np.zeros((B, L + n), np.int64)
    inputs[np.arange(B)[:, None], positions] = data
    inputs[:, L:] = 1
    targets = np.full((B, L + n), IGNORE, np.int64)
    targets[:, L:] = data
    return dict(inputs=inputs.astype(np.int32), targets=targets.astype(np.int32))


@dataclasses.dataclass(frozen=True)
class InductionHeads:
  """Random tokens from ``[0, vocab_size - 1)``; the trigger ``vocab_size - 1`` appears at a random position
  followed by a random token x, and again at the last position, whose target is x (the only loss position)."""
  vocab_size: int = 16
  seq_len: int = 256
  num_classes = None

  def __post_init__(self):
    _require(self, self.seq_len >= 4 and self.vocab_size >= 3, "seq_len >= 4 and vocab_size >= 3")

  def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
    rng = _rng(seed, step, split)
    B, T, trigger = batch_size, self.seq_len, self.vocab_size - 1
    inputs = rng.integers(0, trigger, size=(B, T))
    first = rng.integers(0, T - 2, size=B)          # trigger position; its successor sits at first + 1 <= T - 2
    answer = inputs[np.arange(B), first + 1]
    inputs[np.arange(B), first] = trigger
    inputs[:, T - 1] = trigger
    targets = np.full((B, T), IGNORE, np.int64)
    targets[:, T - 1] = answer
    return dict(inputs=inputs.astype(np.int32), targets=targets.astype(np.int32))


# ---------------------------------------------------------------------------------------------------------
# ListOps
# ---------------------------------------------------------------------------------------------------------

LISTOPS_PAD = 0
LISTOPS_DIGITS = {d: d + 1 for d in range(10)}                       # '0'..'9' -> 1..10
LISTOPS_OPS = {"[MIN": 11, "[MAX": 12, "[MED": 13, "[SM": 14}
LISTOPS_END = 15
LISTOPS_VOCAB = 16
_VALUE_P = 0.25   # LRA: a node is an operator with probability VALUE_P, else a digit


def _listops_tree(rnd: random.Random, depth: int, max_depth: int, max_args: int):
  """LRA's tree generator: returns (nested list of tokens, length in tokens)."""
  if depth >= max_depth or rnd.random() > _VALUE_P:
    return rnd.randrange(10), 1
  op = rnd.choice(list(LISTOPS_OPS))
  children, length = [], 2
  for _ in range(rnd.randint(2, max_args)):
    child, n = _listops_tree(rnd, depth + 1, max_depth, max_args)
    children.append(child)
    length += n
  return [op, *children], length


def _tree_tokens(tree) -> list[int]:
  if isinstance(tree, int):
    return [LISTOPS_DIGITS[tree]]
  out = [LISTOPS_OPS[tree[0]]]
  for child in tree[1:]:
    out += _tree_tokens(child)
  return out + [LISTOPS_END]


def _tree_value(tree) -> int:
  if isinstance(tree, int):
    return tree
  args = [_tree_value(c) for c in tree[1:]]
  op = tree[0]
  if op == "[MIN":
    return min(args)
  if op == "[MAX":
    return max(args)
  if op == "[MED":
    return int(np.median(args))
  return sum(args) % 10


def evaluate_listops(tokens) -> int:
  """Evaluates a token sequence directly (a stack machine, independent of the tree generator)."""
  inv_ops = {v: k for k, v in LISTOPS_OPS.items()}
  stack: list[list] = [[None]]
  for t in tokens:
    t = int(t)
    if t == LISTOPS_PAD:
      continue
    if t in inv_ops:
      stack.append([inv_ops[t]])
    elif t == LISTOPS_END:
      op, *args = stack.pop()
      value = (min(args) if op == "[MIN" else max(args) if op == "[MAX" else
               int(np.median(args)) if op == "[MED" else sum(args) % 10)
      stack[-1].append(value)
    elif 1 <= t <= 10:
      stack[-1].append(t - 1)
    else:
      raise ValueError(f"not a ListOps token: {t}")
  if len(stack) != 1 or len(stack[0]) != 2:
    raise ValueError("unbalanced ListOps expression")
  return stack[0][1]


@functools.lru_cache(maxsize=8)
def _listops_dataset(seed: int, num_examples: int, max_depth: int, max_args: int, min_length: int,
                     max_length: int) -> tuple[tuple[tuple[int, ...], int], ...]:
  """Distinct expressions with min_length < length < max_length (LRA's rule), deterministic per seed."""
  rnd = random.Random(seed)
  seen: dict[tuple[int, ...], int] = {}
  tries = 0
  while len(seen) < num_examples:
    tries += 1
    if tries > 200 * num_examples:
      raise ValueError(f"ListOps: could not find {num_examples} expressions with {min_length} < length < "
                       f"{max_length} (max_depth={max_depth}, max_args={max_args})")
    tree, length = _listops_tree(rnd, 1, max_depth, max_args)
    if min_length < length < max_length:
      toks = tuple(_tree_tokens(tree))
      if toks not in seen:
        seen[toks] = _tree_value(tree)
  return tuple(seen.items())


@dataclasses.dataclass(frozen=True)
class ListOps:
  """LRA ListOps: operators MIN, MAX, MED, SM (sum mod 10) over digits 0-9, brackets as tokens, 10 classes.

  A fixed pool of ``num_train + num_test`` distinct expressions (deduplicated, split disjointly) is generated
  once per seed; batches sample from the split's pool. Sequences are padded with 0 to ``seq_len`` (= the
  largest allowed length). LRA's setting is max_depth 10, max_args 10, 500 < length < 2000.
  """
  max_depth: int = 10
  max_args: int = 10
  min_length: int = 500
  max_length: int = 2000
  num_train: int = 96_000
  num_test: int = 2_000
  data_seed: int = 0
  vocab_size = LISTOPS_VOCAB
  num_classes = 10

  @property
  def seq_len(self) -> int:
    return self.max_length - 1

  def split_pool(self, split: str):
    pool = _listops_dataset(self.data_seed, self.num_train + self.num_test, self.max_depth, self.max_args,
                            self.min_length, self.max_length)
    return pool[:self.num_train] if split == "train" else pool[self.num_train:]

  def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
    pool = self.split_pool(split)
    idx = _rng(seed, step, split).integers(0, len(pool), size=batch_size)
    inputs = np.zeros((batch_size, self.seq_len), np.int32)
    labels = np.zeros((batch_size,), np.int32)
    for row, i in enumerate(idx):
      toks, value = pool[i]
      inputs[row, :len(toks)] = toks
      labels[row] = value
    return dict(inputs=inputs, label=labels)


@dataclasses.dataclass(frozen=True)
class Copy:
  """``$ x1..xn | y1..yn .`` with y = x (copy) or reversed x; next-token targets only on ``y`` and ``.``.

  Tokens: 0 pad (unused), 1 ``$``, 2 ``|``, 3 ``.``, letters from ``[4, vocab_size)``. ``seq_len = 2n + 2``.
  """
  vocab_size: int = 30
  length: int = 32
  reverse: bool = False
  num_classes = None

  @property
  def seq_len(self) -> int:
    return 2 * self.length + 2

  def batch(self, seed: int, step: int, batch_size: int, split: str = "train") -> dict[str, np.ndarray]:
    rng = _rng(seed, step, split)
    n = self.length
    x = rng.integers(4, self.vocab_size, size=(batch_size, n))
    y = x[:, ::-1] if self.reverse else x
    ones = np.ones((batch_size, 1), np.int64)
    seq = np.concatenate([ones, x, 2 * ones, y, 3 * ones], axis=1)     # [B, 2n + 3]
    targets = seq[:, 1:].copy()
    targets[:, :n + 1] = IGNORE          # no loss on predicting x or '|'
    return dict(inputs=seq[:, :-1].astype(np.int32), targets=targets.astype(np.int32))


TASKS = {"mqar": MQAR, "selective_copy": SelectiveCopy, "induction": InductionHeads, "listops": ListOps,
         "copy": Copy}


def make_task(name: str, **kwargs):
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
  return TASKS[name](**kwargs)
