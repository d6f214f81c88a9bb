"""Score functions and `attend` against float64 NumPy written here."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import attention_jax as aj
from attention_jax import scores
from tests.helpers import assert_close, enable_x64, randn


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




_F32 = np.float32
_GENERAL = {"W": np.ones((8, 4), _F32)}
_ADDITIVE = {"W": np.ones((8, 7), _F32), "U": np.ones((4, 7), _F32), "v": np.ones((7,), _F32)}
_Q, _K, _K4 = np.ones((3, 5, 8), _F32), np.ones((3, 6, 8), _F32), np.ones((3, 6, 4), _F32)
_RNG = jax.random.key(0)

# (callable, args, expected exception, message regex)
BAD_INPUT = [
    (scores.dot, (np.ones(8, _F32), _K), ValueError, r"q.shape=\(8,\) k.shape=\(3, 6, 8\)"),
    (scores.dot, (_Q, np.ones(8, _F32)), ValueError, r"k.shape=\(8,\)"),
    (scores.dot, (_Q, _K4), ValueError, r"same last dim.*q.shape=\(3, 5, 8\) k.shape=\(3, 6, 4\)"),
    (scores.scaled_dot, (_Q, _K4), ValueError, r"q.shape=\(3, 5, 8\) k.shape=\(3, 6, 4\)"),
    (scores.dot, (_Q, np.ones((2, 6, 8), _F32)), ValueError, r"do not broadcast.*k.shape=\(2, 6, 8\)"),
    (scores.dot, (np.ones((3, 5, 8), np.int32), _K), TypeError, r"dot: q.*floating.*dtype=int32 shape=\(3, 5, 8\)"),
    (scores.dot, (_Q, np.ones((3, 6, 8), bool)), TypeError, r"dot: k.*dtype=bool"),
    (scores.scaled_dot, (_Q, np.ones((3, 6, 8), np.complex64)), TypeError, r"k.*dtype=complex64"),
    (scores.dot, ("abc", _K), TypeError, r"dot: q.*floating"),
    (scores.general, (_GENERAL, _Q, _K), ValueError, r"W must be \[Dq, Dk\] = \(8, 8\).*W.shape=\(8, 4\)"),
    (scores.general, (_GENERAL, _Q[0, 0], _K4), ValueError, r"q.shape=\(8,\)"),
    (scores.general, (_GENERAL, _Q, _K4[:2]), ValueError, r"do not broadcast.*k.shape=\(2, 6, 4\)"),
    (scores.general, (_GENERAL, _Q.astype(np.int32), _K4), TypeError, r"general: q.*int32"),
    (scores.general, ({"W": np.ones((8, 4), np.int32)}, _Q, _K4), TypeError, r"general: W.*int32"),
    (scores.general, ({"W": np.ones((8, 4, 1), _F32)}, _Q, _K4), ValueError, r"W must have rank 2.*\(8, 4, 1\)"),
    (scores.general, ({"U": np.ones((8, 4), _F32)}, _Q, _K4), ValueError, r"dict with 'W'.*\['U'\]"),
    (scores.general, (np.ones((8, 4), _F32), _Q, _K4), ValueError, r"dict with 'W'.*ndarray"),
    (scores.additive, (_ADDITIVE, _Q, _K), ValueError, r"U \[Dk, A\]=\(8, 7\).*U.shape=\(4, 7\)"),
    (scores.additive, ({**_ADDITIVE, "v": np.ones((6,), _F32)}, _Q, _K4), ValueError, r"W.shape=\(8, 7\).*v.shape"),
    (scores.additive, ({**_ADDITIVE, "v": np.float32(1.0)}, _Q, _K4), ValueError, r"v must have rank 1.*\(\)"),
    (scores.additive, ({**_ADDITIVE, "v": np.ones(7, np.int32)}, _Q, _K4), TypeError, r"additive: v.*int32"),
    (scores.additive, (_ADDITIVE, _Q, _K4.astype(bool)), TypeError, r"additive: k.*bool"),
    (scores.additive, (_ADDITIVE, _Q, _K4[:2]), ValueError, r"do not broadcast"),
    (lambda: scores.additive(_ADDITIVE, _Q, _K4, projected_keys=np.ones((3, 6, 5), _F32)), (), ValueError,
     r"projected_keys must be \[\.\.\., S, A\].*\(3, 6, 5\)"),
    (lambda: scores.additive(_ADDITIVE, _Q, _K4, projected_keys=np.ones((2, 6, 7), _F32)), (), ValueError,
     r"projected_keys and q do not broadcast.*\(2, 6, 7\)"),
    (lambda: scores.additive(_ADDITIVE, _Q, _K4, projected_keys=np.ones((3, 6, 7), np.int32)), (), TypeError,
     r"projected_keys.*int32"),
    (scores.project_keys, (_ADDITIVE, _K), ValueError, r"k.shape=\(3, 6, 8\) U.shape=\(4, 7\)"),
    (scores.project_keys, (_ADDITIVE, np.ones(4, _F32)), ValueError, r"k.shape=\(4,\)"),
    (scores.project_keys, (_ADDITIVE, np.ones((6, 4), np.int8)), TypeError, r"project_keys: k.*int8"),
    (scores.project_keys, ({"W": _ADDITIVE["W"]}, _K4), ValueError, r"dict with 'U'"),
    (scores.init_general, (_RNG, 0, 4), ValueError, r"dq must be a positive int.*dq=0"),
    (scores.init_general, (_RNG, 4, -2), ValueError, r"dk must be a positive int.*dk=-2"),
    (scores.init_general, (_RNG, 4.0, 4), ValueError, r"dq must be a positive int.*dq=4\.0"),
    (scores.init_general, (_RNG, 4, True), ValueError, r"dk.*bool.*dk=True"),
    (scores.init_general, (_RNG, "4", 4), ValueError, r"dq.*dq='4'"),
    (scores.init_general, (_RNG, 4, 4, jnp.int32), TypeError, r"dtype must be a real floating dtype"),
    (scores.init_additive, (_RNG, 4, 4, 0), ValueError, r"attn_dim must be a positive int.*attn_dim=0"),
    (scores.init_additive, (_RNG, 4, 4, 2.5), ValueError, r"attn_dim.*attn_dim=2\.5"),
    (scores.init_additive, (_RNG, -1, 4, 3), ValueError, r"dq=-1"),
    (scores.init_additive, (_RNG, 4, None, 3), ValueError, r"dk=None"),
]


@pytest.mark.parametrize("fn,args,exc,regex", BAD_INPUT, ids=[str(i) for i in range(len(BAD_INPUT))])
def test_bad_input_table(fn, args, exc, regex):
  with pytest.raises(exc, match=regex):
    fn(*args)


def test_init_accepts_numpy_ints():
  p = scores.init_additive(jax.random.key(0), np.int64(3), np.int32(2), np.uint8(5))
  chex.assert_shape([p["W"], p["U"], p["v"]], [(3, 5), (2, 5), (5,)])
  chex.assert_shape(scores.init_general(jax.random.key(0), np.int16(2), 6)["W"], (2, 6))


def test_float64_computes_in_float64():
  r = np.random.default_rng(7)
  q, k, k2 = r.standard_normal((2, 5, 8)), r.standard_normal((2, 6, 8)), r.standard_normal((2, 6, 4))
  with enable_x64():
    general_p = scores.init_general(jax.random.key(0), 8, 4, dtype=jnp.float64)
    additive_p = scores.init_additive(jax.random.key(1), 8, 4, 7, dtype=jnp.float64)
    q64, k64, k264 = (jnp.asarray(x, jnp.float64) for x in (q, k, k2))
    got = {
        "dot": scores.dot(q64, k64),
        "scaled_dot": scores.scaled_dot(q64, k64),
        "general": scores.general(general_p, q64, k264),
        "additive": scores.additive(additive_p, q64, k264),
        "additive_projected": scores.additive(additive_p, q64, k264,
                                              projected_keys=scores.project_keys(additive_p, k264)),
        # float32 parameters with float64 inputs promote to float64 (the float32 weights are exact in float64).
        "general_f32_params": scores.general(jax.tree.map(lambda a: a.astype(jnp.float32), general_p), q64, k264),
    }
    W = np.asarray(general_p["W"], np.float64)
    W32 = np.asarray(general_p["W"].astype(jnp.float32), np.float64)
  want = {
      "dot": q @ np.swapaxes(k, -1, -2),
      "scaled_dot": q @ np.swapaxes(k, -1, -2) / math.sqrt(8),
      "general": q @ W @ np.swapaxes(k2, -1, -2),
      "additive": np_additive(additive_p, q, k2),
      "additive_projected": np_additive(additive_p, q, k2),
      "general_f32_params": q @ W32 @ np.swapaxes(k2, -1, -2),
  }
  for name, logits in got.items():
    assert logits.dtype == np.float64, name
    assert_close(logits, want[name], "float64", err_msg=name)
  # The same inputs rounded through float32 would miss the float64 tolerance: the test can tell the two apart.
  rounded = np.float32(q) @ np.float32(np.swapaxes(k, -1, -2))
  assert np.abs(rounded - want["dot"]).max() > 1e-8


@pytest.mark.parametrize("q_shape,k_shape,out_shape", [
    ((2, 0, 8), (2, 6, 8), (2, 0, 6)),    # T = 0
    ((2, 5, 8), (2, 0, 8), (2, 5, 0)),    # S = 0
    ((0, 5, 8), (1, 6, 8), (0, 5, 6)),    # empty batch
    ((2, 5, 0), (2, 6, 0), (2, 5, 6)),    # zero depth: zero logits
])
def test_zero_size_inputs(q_shape, k_shape, out_shape):
  q, k = jnp.ones(q_shape), jnp.ones(k_shape)
  for logits in (scores.dot(q, k), scores.scaled_dot(q, k), jax.jit(scores.scaled_dot)(q, k),
                 scores.general({"W": jnp.ones((q_shape[-1], k_shape[-1]))}, q, k)):
    assert logits.shape == out_shape and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, np.zeros(out_shape))
  if q_shape[-1]:
    p = scores.init_additive(jax.random.key(0), q_shape[-1], k_shape[-1], 3)
    logits = scores.additive(p, q, k)
    assert logits.shape == out_shape
    assert scores.project_keys(p, k).shape == k_shape[:-1] + (3,)


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
