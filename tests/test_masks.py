"""Masks: hand-checked small cases, a loop-based oracle, bad input and edge sizes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import masks
from tests.helpers import np_mask


class MasksTest(chex.TestCase):

  def test_causal_by_hand(self):
    np.testing.assert_array_equal(masks.causal_mask(3, 4)[0, 0], [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(masks.causal_mask(3, 2)[0, 0], [[1, 0], [1, 1], [1, 1]])
    chex.assert_shape(masks.causal_mask(5, 6), (1, 1, 5, 6))

  def test_local_by_hand(self):
    # jax.nn's docstring example: window (3, 2) lets token 6 see 3..8.
    np.testing.assert_array_equal(np.flatnonzero(masks.local_mask(10, 10, (3, 2))[0, 0, 6]), [3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(masks.local_mask(3, 3, 1)[0, 0], [[1, 1, 0], [1, 1, 1], [0, 1, 1]])

  def test_padding_by_hand(self):
    m = masks.padding_mask(jnp.array([2, 3]), jnp.array([1, 4]), 3, 4)
    chex.assert_shape(m, (2, 1, 3, 4))
    np.testing.assert_array_equal(m[0, 0], [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(m[1, 0], np.ones((3, 4)))
    np.testing.assert_array_equal(masks.padding_mask(None, jnp.array([2]), 2, 3)[0, 0], [[1, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(masks.padding_mask(None, None, 2, 3), np.ones((1, 1, 2, 3)))

  def test_segment_by_hand(self):
    m = masks.segment_mask(jnp.array([[0, 0, 1]]), jnp.array([[0, 1, 1, 2]]))
    np.testing.assert_array_equal(m[0, 0], [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]])
    np.testing.assert_array_equal(masks.segment_mask(jnp.array([[3, 3, 4]]))[0, 0],
                                  [[1, 1, 0], [1, 1, 0], [0, 0, 1]])

  def test_against_loop_oracle(self):
    r = np.random.default_rng(0)
    q_len, kv_len = jnp.array([5, 2], jnp.int32), jnp.array([3, 7], jnp.int32)
    q_seg, kv_seg = r.integers(0, 2, (2, 5)), r.integers(0, 2, (2, 7))
    got = masks.combine_masks(masks.causal_mask(5, 7), masks.local_mask(5, 7, (1, 2)),
                              masks.padding_mask(q_len, kv_len, 5, 7),
                              masks.segment_mask(jnp.asarray(q_seg), jnp.asarray(kv_seg)))
    want = np_mask(2, 1, 5, 7, causal=True, window=(1, 2), q_lengths=q_len, kv_lengths=kv_len, q_seg=q_seg,
                   kv_seg=kv_seg)
    np.testing.assert_array_equal(got, want)

  def test_combine(self):
    a, b = jnp.array([[True, False]]), jnp.array([[True], [False]])
    np.testing.assert_array_equal(masks.combine_masks(a, None, b), [[True, False], [False, False]])
    self.assertIsNone(masks.combine_masks(None, None))
    with self.assertRaisesRegex(ValueError, r"\(1, 2\), \(3, 1\)|\(3, 1\)"):
      masks.combine_masks(jnp.ones((2, 2), bool), jnp.ones((3, 1), bool), jnp.ones((1, 3), bool))
    with self.assertRaisesRegex(ValueError, "boolean"):
      masks.combine_masks(jnp.ones((2, 2)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_vmap(self):
    lengths = jnp.array([[1, 2], [3, 0]], jnp.int32)
    f = self.variant(jax.vmap(lambda l: masks.padding_mask(None, l, 2, 3)))
    out = f(lengths)
    chex.assert_shape(out, (2, 2, 1, 2, 3))
    np.testing.assert_array_equal(out[1, 1], np.zeros((1, 2, 3)))
    seg = self.variant(jax.vmap(masks.segment_mask))(jnp.zeros((3, 1, 4), jnp.int32))
    chex.assert_shape(seg, (3, 1, 1, 4, 4))

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, r"shape=\(2, 1\)"):
      masks.padding_mask(jnp.ones((2, 1), jnp.int32), None, 3, 3)
    with self.assertRaisesRegex(ValueError, ">= 0"):
      masks.local_mask(3, 3, (-1, 2))
    with self.assertRaisesRegex(ValueError, r"q_segment_ids.shape=\(2, 3\) kv_segment_ids.shape=\(1, 3\)"):
      masks.segment_mask(jnp.zeros((2, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32))


I32 = jnp.int32

# (callable, args, expected exception, message regex): each must be refused with a message naming the value.
BAD_INPUT = [
    (masks.causal_mask, (2.5, 4), ValueError, r"q_len.*2\.5"),
    (masks.causal_mask, (-1, 5), ValueError, r"q_len=-1"),
    (masks.causal_mask, (3, True), ValueError, r"kv_len.*bool.*True"),
    (masks.causal_mask, (np.float32(3), 3), ValueError, r"q_len.*3\.0"),
    (masks.causal_mask, ("3", 3), ValueError, r"q_len.*'3'"),
    (masks.causal_mask, (3, 2**31), ValueError, r"kv_len=2147483648"),
    (masks.local_mask, (2.0, 3, 1), ValueError, r"q_len.*2\.0"),
    (masks.local_mask, (3, -2, 1), ValueError, r"kv_len=-2"),
    (masks.local_mask, (3, 3, None), ValueError, r"window.*None"),
    (masks.padding_mask, (None, None, 3, 1.5), ValueError, r"kv_len.*1\.5"),
    (masks.padding_mask, (None, None, -3, 1), ValueError, r"q_len=-3"),
    (masks.normalize_window, ("12",), ValueError, r"'12'"),
    (masks.normalize_window, (b"12",), ValueError, r"b'12'"),
    (masks.normalize_window, (2.0,), ValueError, r"2\.0"),
    (masks.normalize_window, (True,), ValueError, r"True"),
    (masks.normalize_window, ((1, False),), ValueError, r"\(1, False\)"),
    (masks.normalize_window, ((1.5, 2),), ValueError, r"\(1\.5, 2\)"),
    (masks.normalize_window, ((1, "2"),), ValueError, r"\(1, '2'\)"),
    (masks.normalize_window, (-1,), ValueError, r">= 0.*-1"),
    (masks.normalize_window, ((3, -2),), ValueError, r">= 0.*\(3, -2\)"),
    (masks.normalize_window, ((1, 2, 3),), ValueError, r"3 entries.*\(1, 2, 3\)"),
    (masks.normalize_window, ((1,),), ValueError, r"1 entries.*\(1,\)"),
    (masks.normalize_window, ({"left": 1},), ValueError, r"'left'"),
    (masks.padding_mask, (jnp.ones((2, 1), I32), None, 3, 3), ValueError, r"q_lengths.*shape=\(2, 1\)"),
    (masks.padding_mask, (None, jnp.array(3, I32), 3, 3), ValueError, r"kv_lengths.*shape=\(\)"),
    (masks.padding_mask, (jnp.array([1.0, 2.0]), None, 3, 3), ValueError, r"q_lengths.*dtype=float32"),
    (masks.padding_mask, (None, jnp.array([True, False]), 3, 3), ValueError, r"kv_lengths.*dtype=bool"),
    (masks.padding_mask, (jnp.array([1, -1], I32), None, 3, 3), ValueError, r"q_lengths.*\[0, 3\].*\[1, -1\]"),
    (masks.padding_mask, (None, jnp.array([4, 2], I32), 3, 3), ValueError, r"kv_lengths.*\[0, 3\].*\[4, 2\]"),
    (masks.padding_mask, (np.array([1, 2]), np.array([1, 2, 3]), 3, 3), ValueError, r"batch size.*\(2,\).*\(3,\)"),
    (masks.segment_mask, (jnp.zeros((2, 3), I32), jnp.zeros((1, 3), I32)), ValueError,
     r"q_segment_ids.shape=\(2, 3\) kv_segment_ids.shape=\(1, 3\)"),
    (masks.segment_mask, (jnp.zeros((3,), I32),), ValueError, r"q_segment_ids.*\[B, length\].*shape=\(3,\)"),
    (masks.segment_mask, (jnp.zeros((1, 2, 3), I32),), ValueError, r"q_segment_ids.*shape=\(1, 2, 3\)"),
    (masks.segment_mask, (jnp.zeros((2, 3), I32), jnp.zeros((2, 3))), ValueError, r"kv_segment_ids.*dtype=float32"),
    (masks.segment_mask, (jnp.zeros((2, 3), bool),), ValueError, r"q_segment_ids.*dtype=bool"),
    (masks.combine_masks, (jnp.ones((2, 2), bool), jnp.ones((2, 2), jnp.int32)), ValueError,
     r"boolean.*mask 1.*dtype=int32 shape=\(2, 2\)"),
    (masks.combine_masks, (jnp.ones((1, 1, 2, 3), bool), jnp.ones((4,), bool)), ValueError,
     r"do not broadcast.*\(1, 1, 2, 3\), \(4,\)"),
]


@pytest.mark.parametrize("fn,args,exc,regex", BAD_INPUT,
                         ids=[f"{i}-{fn.__name__}" for i, (fn, *_) in enumerate(BAD_INPUT)])
def test_bad_input_table(fn, args, exc, regex):
  with pytest.raises(exc, match=regex):
    fn(*args)


@pytest.mark.parametrize("window,expected", [
    (3, (3, 3)), (np.int64(2), (2, 2)), (np.int32(0), (0, 0)), ((1, 2), (1, 2)), ([4, 0], (4, 0)),
    ((np.int16(1), 5), (1, 5)), (np.array([2, 3]), (2, 3)), (None, None),
    (2**31, (2**30, 2**30)), ((0, 2**62), (0, 2**30)),
])
def test_normalize_window_accepts(window, expected):
  got = masks.normalize_window(window)
  assert got == expected
  if got is not None:
    assert all(type(w) is int for w in got)


def test_static_lengths_accept_numpy_integers():
  np.testing.assert_array_equal(masks.causal_mask(np.int64(3), np.uint8(2)), masks.causal_mask(3, 2))
  np.testing.assert_array_equal(masks.local_mask(np.int32(4), 4, (np.int64(1), 0)), masks.local_mask(4, 4, (1, 0)))


@pytest.mark.parametrize("window", [2**31, 2**40, (2**31, 2**31), (0, 2**31 + 5), (2**31, 0)])
def test_huge_windows_do_not_overflow(window):
  left, right = (window, window) if isinstance(window, int) else window
  want = np_mask(1, 1, 5, 7, window=(left, right))   # plain Python ints: no overflow in the oracle
  np.testing.assert_array_equal(masks.local_mask(5, 7, window), want)
  if left >= 5 and right >= 7:
    np.testing.assert_array_equal(masks.local_mask(5, 5, window), np.ones((1, 1, 5, 5), bool))
  np.testing.assert_array_equal(jax.jit(lambda: masks.local_mask(5, 7, window))(), want)


@pytest.mark.parametrize("q_len,kv_len", [(0, 0), (0, 4), (3, 0)])
def test_zero_length_masks_are_empty(q_len, kv_len):
  for m in (masks.causal_mask(q_len, kv_len), masks.local_mask(q_len, kv_len, (1, 2)),
            masks.padding_mask(None, None, q_len, kv_len)):
    assert m.shape == (1, 1, q_len, kv_len) and m.dtype == jnp.bool_
  m = masks.padding_mask(jnp.zeros((2,), I32), jnp.full((2,), kv_len, I32), q_len, kv_len)
  assert m.shape == (2, 1, q_len, kv_len) and m.dtype == jnp.bool_
  seg = masks.segment_mask(jnp.zeros((2, q_len), I32), jnp.zeros((2, kv_len), I32))
  assert seg.shape == (2, 1, q_len, kv_len)
  assert masks.combine_masks(masks.causal_mask(q_len, kv_len), seg).shape == (2, 1, q_len, kv_len)


def test_zero_batch_padding_mask():
  m = masks.padding_mask(jnp.zeros((0,), I32), jnp.zeros((0,), I32), 3, 4)
  assert m.shape == (0, 1, 3, 4)


def test_lengths_at_the_bounds_and_traced_lengths():
  m = masks.padding_mask(jnp.array([0, 3], I32), jnp.array([4, 0], I32), 3, 4)
  np.testing.assert_array_equal(m, np_mask(2, 1, 3, 4, q_lengths=[0, 3], kv_lengths=[4, 0]))
  # Traced lengths cannot be checked; they are used as given (and the mask still matches the oracle in range).
  got = jax.jit(lambda l: masks.padding_mask(None, l, 3, 4))(jnp.array([2, 4], I32))
  np.testing.assert_array_equal(got, np_mask(2, 1, 3, 4, kv_lengths=[2, 4]))


def test_combine_names_the_original_shapes():
  with pytest.raises(ValueError, match=r"\[\(2, 3\), \(1, 4\)\]"):
    masks.combine_masks(jnp.ones((2, 3), bool), None, jnp.ones((1, 4), bool))
