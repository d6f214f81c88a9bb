"""Masks: hand-checked small cases and a loop-based oracle."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

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
    with self.assertRaisesRegex(ValueError, r"q_BT.shape=\(2, 3\) kv_BS.shape=\(1, 3\)"):
      masks.segment_mask(jnp.zeros((2, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32))
