"""Score functions and `attend` against float64 NumPy written here."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import attention_jax as aj
from attention_jax import scores
from tests.helpers import assert_close, randn


def np_additive(p, q, k):
  W, U, v = (np.asarray(p[n], np.float64) for n in ("W", "U", "v"))
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  return np.tanh((q @ W)[..., :, None, :] + (k @ U)[..., None, :, :]) @ v


class ScoresTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    r = np.random.default_rng(1)
    self.q = randn(r, (3, 5, 8))    # [B, T, Dq]
    self.k = randn(r, (3, 6, 8))    # [B, S, Dk]
    self.k2 = randn(r, (3, 6, 4))   # Dk != Dq
    self.general = scores.init_general(jax.random.key(0), 8, 4)
    self.additive = scores.init_additive(jax.random.key(1), 8, 4, 7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dot_and_scaled_dot(self):
    expected = np.einsum("btd,bsd->bts", np.float64(self.q), np.float64(self.k))
    assert_close(self.variant(scores.dot)(self.q, self.k), expected)
    assert_close(self.variant(scores.scaled_dot)(self.q, self.k), expected / math.sqrt(8))
    assert_close(self.variant(lambda q, k: scores.scaled_dot(q, k, scale=0.3))(self.q, self.k), expected * 0.3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_general(self):
    W = np.asarray(self.general["W"], np.float64)
    expected = np.einsum("btd,de,bse->bts", np.float64(self.q), W, np.float64(self.k2))
    assert_close(self.variant(scores.general)(self.general, self.q, self.k2), expected)

  def test_dot_equals_general_with_identity(self):
    got = scores.general({"W": jnp.eye(8)}, self.q, self.k)
    assert_close(got, scores.dot(self.q, self.k))

  @chex.variants(with_jit=True, without_jit=True)
  def test_additive(self):
    got = self.variant(scores.additive)(self.additive, self.q, self.k2)
    chex.assert_shape(got, (3, 5, 6))
    assert_close(got, np_additive(self.additive, self.q, self.k2))
    projected = scores.project_keys(self.additive, self.k2)
    assert_close(scores.additive(self.additive, self.q, self.k2, projected_keys=projected), got)

  def test_additive_by_hand(self):
    # v * tanh(W q + U k) with 1-d everything: 3 tanh(0.5 + 2 k).
    p = {"W": jnp.array([[1.0]]), "U": jnp.array([[2.0]]), "v": jnp.array([3.0])}
    got = scores.additive(p, jnp.array([[0.5]]), jnp.array([[0.25], [-1.0]]))
    np.testing.assert_allclose(got, [[3 * math.tanh(1.0), 3 * math.tanh(-1.5)]], rtol=1e-6)
    # Two attention units: v = [1, -1], W = [[1, 0]], U = [[0, 1]] -> tanh(q) - tanh(k).
    p = {"W": jnp.array([[1.0, 0.0]]), "U": jnp.array([[0.0, 1.0]]), "v": jnp.array([1.0, -1.0])}
    got = scores.additive(p, jnp.array([[0.2], [0.7]]), jnp.array([[0.1], [-0.4], [2.0]]))
    want = [[math.tanh(a) - math.tanh(b) for b in (0.1, -0.4, 2.0)] for a in (0.2, 0.7)]
    np.testing.assert_allclose(got, want, rtol=1e-6)

  def test_leading_dims_broadcast(self):
    q = self.q[:, None]                       # [3, 1, 5, 8] against k [3, 6, 8]
    got = scores.dot(q, self.k)
    chex.assert_shape(got, (3, 3, 5, 6))
    for i in range(3):
      for j in range(3):
        assert_close(got[i, j], scores.dot(self.q[i], self.k[j]))

  @parameterized.parameters(jnp.bfloat16, jnp.float16)
  def test_low_precision_inputs_give_float32_logits(self, dtype):
    q, k = self.q.astype(dtype), self.k.astype(dtype)
    exact = np.einsum("btd,bsd->bts", np.float64(q.astype(jnp.float32)), np.float64(k.astype(jnp.float32)))
    for logits in (scores.dot(q, k), scores.general({"W": jnp.eye(8, dtype=dtype)}, q, k)):
      self.assertEqual(logits.dtype, jnp.float32)
      assert_close(logits, exact, "float32")   # float32 accumulation of the rounded inputs is exact here

  def test_vmap(self):
    qs, ks = jnp.stack([self.q, 2 * self.q]), jnp.stack([self.k, self.k])
    for f in (scores.dot, scores.scaled_dot, lambda q, k: scores.general({"W": jnp.eye(8)}, q, k),
              lambda q, k: scores.additive(scores.init_additive(jax.random.key(2), 8, 8, 4), q, k)):
      batched = jax.vmap(f)(qs, ks)
      assert_close(batched[1], f(2 * self.q, self.k))

  def test_bad_shapes(self):
    with self.assertRaisesRegex(ValueError, r"q.shape=\(3, 5, 8\) k.shape=\(3, 6, 4\)"):
      scores.dot(self.q, self.k2)
    with self.assertRaisesRegex(ValueError, r"W.shape=\(8, 4\)"):
      scores.general(self.general, self.q, self.k)
    with self.assertRaisesRegex(ValueError, "U.shape"):
      scores.additive(self.additive, self.q, self.k)
    with self.assertRaisesRegex(ValueError, "do not broadcast"):
      scores.dot(self.q, self.k[:2])


class AttendTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_against_numpy(self):
    r = np.random.default_rng(2)
    logits, value = randn(r, (2, 3, 5, 6), scale=3.0), randn(r, (2, 3, 6, 4))
    mask = jnp.asarray(r.random((2, 1, 5, 6)) > 0.3).at[0, 0, 1].set(False)   # one fully-masked row
    out, weights = self.variant(aj.attend)(logits, value, mask)
    lg = np.where(np.broadcast_to(mask, logits.shape), np.float64(logits), -np.inf)
    with np.errstate(invalid="ignore"):
      w = np.exp(lg - lg.max(-1, keepdims=True))
      w = np.nan_to_num(w / w.sum(-1, keepdims=True))
    assert_close(weights, w)
    assert_close(out, w @ np.float64(value))
    np.testing.assert_array_equal(out[0, :, 1], 0.0)
    np.testing.assert_array_equal(weights[0, :, 1], 0.0)

  def test_masked_row_gradients_are_finite_and_zero(self):
    logits, value = jnp.ones((4, 5)), jnp.ones((5, 3))
    mask = jnp.zeros((4, 5), bool).at[1:].set(True)
    grads = jax.grad(lambda l, v: aj.attend(l, v, mask)[0].sum(), argnums=(0, 1))(logits, value)
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(grads[0][0], 0.0)

  def test_float32_softmax_for_bf16(self):
    # 4096 equal logits: the output is the mean of the values. A bf16 accumulation of 4096 terms would be off
    # by far more than one bf16 rounding of the result.
    r = np.random.default_rng(3)
    value = randn(r, (4096, 2), jnp.bfloat16)
    out, weights = aj.attend(jnp.zeros((1, 4096), jnp.bfloat16), value)
    self.assertEqual(out.dtype, jnp.bfloat16)
    expected = np.float64(value.astype(jnp.float32)).mean(0)
    np.testing.assert_allclose(np.float64(out.astype(jnp.float32))[0], expected, rtol=1e-2, atol=2e-4)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, r"logits.shape=\(2, 5\) value.shape=\(4, 3\)"):
      aj.attend(jnp.zeros((2, 5)), jnp.zeros((4, 3)))
    with self.assertRaisesRegex(ValueError, "does not broadcast"):
      aj.attend(jnp.zeros((2, 5)), jnp.zeros((5, 3)), jnp.ones((3, 5), bool))
    with self.assertRaisesRegex(ValueError, "boolean"):
      aj.attend(jnp.zeros((2, 5)), jnp.zeros((5, 3)), jnp.ones((2, 5)))
