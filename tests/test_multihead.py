"""Functional multi-head attention: NumPy oracle, flax equivalence, GQA, cross-attention, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

import attention_jax as aj
from tests.helpers import assert_close, np_mask, np_softmax_attention, randn


def np_mha(params, x_q, x_kv, mask=None):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  q = np.einsum("btd,dnh->btnh", x_q, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bsd,dkh->bskh", x_kv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bsd,dkh->bskh", x_kv, p["value"]["kernel"]) + p["value"]["bias"]
  o, _ = np_softmax_attention(q, k, v, mask=mask)
  return np.einsum("btnh,nhd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]


def randomize(params, seed):
  """Non-zero biases too, so a dropped bias term would show."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, l.shape, l.dtype) * 0.3 for k, l in zip(keys, leaves)])


class MultiHeadTest(chex.TestCase, parameterized.TestCase):

  def test_init_shapes(self):
    p = aj.init_multi_head(jax.random.key(0), 32, 8, num_kv_heads=2, d_kv=12)
    chex.assert_shape([p["query"]["kernel"], p["key"]["kernel"], p["value"]["kernel"], p["out"]["kernel"]],
                      [(32, 8, 4), (12, 2, 4), (12, 2, 4), (8, 4, 32)])
    chex.assert_shape([p["query"]["bias"], p["key"]["bias"], p["out"]["bias"]], [(8, 4), (2, 4), (32,)])
    # lecun normal: variance 1 / fan_in.
    big = aj.init_multi_head(jax.random.key(1), 256, 4)
    np.testing.assert_allclose(np.var(big["query"]["kernel"]), 1 / 256, rtol=0.1)
    np.testing.assert_allclose(np.var(big["out"]["kernel"]), 1 / 256, rtol=0.1)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("mha", 4, 4, False), ("gqa_causal", 4, 2, True), ("mqa", 4, 1, True))
  def test_self_attention_against_numpy(self, num_heads, num_kv_heads, causal):
    r = np.random.default_rng(0)
    params = randomize(aj.init_multi_head(jax.random.key(0), 16, num_heads, num_kv_heads), 1)
    x = randn(r, (2, 7, 16))
    f = self.variant(lambda p, x: aj.multi_head_attention(p, x, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                                          is_causal=causal)[0])
    mask = np_mask(2, num_heads, 7, 7, causal=causal)
    assert_close(f(params, x), np_mha(params, x, x, mask), kind="grad")

  def test_cross_attention_with_mask_and_weights(self):
    r = np.random.default_rng(1)
    params = randomize(aj.init_multi_head(jax.random.key(2), 16, 4, 2, d_kv=10), 3)
    x_q, x_kv = randn(r, (2, 5, 16)), randn(r, (2, 8, 10))
    mask = jnp.asarray(r.random((2, 1, 5, 8)) > 0.3)
    out, weights = aj.multi_head_attention(params, x_q, x_kv, num_heads=4, num_kv_heads=2, mask=mask,
                                           return_weights=True)
    assert_close(out, np_mha(params, x_q, x_kv, np.broadcast_to(mask, (2, 4, 5, 8))), kind="grad")
    chex.assert_shape(weights, (2, 4, 5, 8))
    np.testing.assert_array_equal(np.asarray(weights)[~np.broadcast_to(mask, (2, 4, 5, 8))], 0.0)
    for implementation in ("xla", "reference"):
      out2, none = aj.multi_head_attention(params, x_q, x_kv, num_heads=4, num_kv_heads=2, mask=mask,
                                           implementation=implementation)
      self.assertIsNone(none)
      assert_close(out2, out)

  def test_options_pass_through(self):
    r = np.random.default_rng(2)
    params = aj.init_multi_head(jax.random.key(3), 16, 4)
    x = randn(r, (2, 6, 16))
    lengths = jnp.array([6, 3], jnp.int32)
    a, _ = aj.multi_head_attention(params, x, num_heads=4, key_value_seq_lengths=lengths, local_window_size=2)
    b, _ = aj.multi_head_attention(params, x, num_heads=4, mask=jnp.asarray(np_mask(2, 1, 6, 6, window=2,
                                                                                    kv_lengths=lengths)))
    assert_close(a, b)

  def test_matches_flax_nnx(self):
    r = np.random.default_rng(3)
    theirs = nnx.MultiHeadAttention(num_heads=4, in_features=16, decode=False, rngs=nnx.Rngs(0))
    params = {n: {"kernel": getattr(theirs, n).kernel[...], "bias": getattr(theirs, n).bias[...]}
              for n in ("query", "key", "value", "out")}
    x = randn(r, (2, 9, 16))
    ours, _ = aj.multi_head_attention(params, x, num_heads=4, is_causal=True)
    assert_close(ours, theirs(x, is_causal=True))

  def test_vmap_and_grad(self):
    r = np.random.default_rng(4)
    params = aj.init_multi_head(jax.random.key(4), 8, 2)
    xs = randn(r, (3, 2, 5, 8))
    f = lambda p, x: aj.multi_head_attention(p, x, num_heads=2, is_causal=True)[0]
    batched = jax.vmap(f, in_axes=(None, 0))(params, xs)
    assert_close(batched[2], f(params, xs[2]))
    grads = jax.grad(lambda p: f(p, xs[0]).sum())(params)
    chex.assert_tree_all_finite(grads)
    chex.assert_trees_all_equal_shapes(grads, params)

  def test_errors(self):
    params = aj.init_multi_head(jax.random.key(5), 16, 4, 2)
    x = jnp.zeros((2, 5, 16))
    with self.assertRaisesRegex(ValueError, r"x_q.shape=\(5, 16\)"):
      aj.multi_head_attention(params, x[0], num_heads=4, num_kv_heads=2)
    with self.assertRaisesRegex(ValueError, r"params\['key'\]\['kernel'\] has shape \(16, 2, 4\)"):
      aj.multi_head_attention(params, x, num_heads=4)   # num_kv_heads forgotten
    with self.assertRaisesRegex(ValueError, r"expected \(12, 4, H\)"):
      aj.multi_head_attention(params, jnp.zeros((2, 5, 12)), num_heads=4, num_kv_heads=2)
    with self.assertRaisesRegex(ValueError, "return_weights=True needs the reference"):
      aj.multi_head_attention(params, x, num_heads=4, num_kv_heads=2, return_weights=True, implementation="xla")
    with self.assertRaisesRegex(ValueError, "num_kv_heads=3"):
      aj.init_multi_head(jax.random.key(0), 16, 4, 3)
    with self.assertRaisesRegex(ValueError, "d_model=10"):
      aj.init_multi_head(jax.random.key(0), 10, 4)
