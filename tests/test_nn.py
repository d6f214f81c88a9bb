"""Flax integration: attention_fn adapters in flax.nnx / flax.linen MHA, our NNX modules."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import linen, nnx

import attention_jax as aj
from attention_jax import scores
from tests.helpers import assert_close, np_mask, randn

NNX_HAS_GQA = "num_kv_heads" in inspect.signature(nnx.MultiHeadAttention.__init__).parameters


def flax_mha(attention_fn=None, **kw):
  kw.setdefault("decode", False)
  if attention_fn is not None:
    kw["attention_fn"] = attention_fn
  return nnx.MultiHeadAttention(num_heads=4, in_features=16, rngs=nnx.Rngs(params=0, dropout=1), **kw)


def copy_weights(src, dst):
  """Gives src random non-zero biases (so a dropped bias would show), then copies all of src into dst."""
  for i, name in enumerate(("query", "key", "value", "out")):
    bias = getattr(src, name).bias
    bias[...] = 0.3 * jax.random.normal(jax.random.key(i), bias.shape)
    getattr(dst, name).kernel[...] = getattr(src, name).kernel[...]
    getattr(dst, name).bias[...] = bias[...]


class NnxAdapterTest(parameterized.TestCase):

  @parameterized.product(implementation=("reference", "xla", "auto"), causal=(False, True))
  def test_equals_flax_default(self, implementation, causal):
    x = randn(np.random.default_rng(0), (2, 9, 16))
    ref, ours = flax_mha(), flax_mha(aj.nn.make_attention_fn(implementation))
    copy_weights(ref, ours)
    assert_close(ours(x, is_causal=causal), ref(x, is_causal=causal))

  def test_float_mask_and_cross_attention(self):
    r = np.random.default_rng(1)
    x_q, x_kv = randn(r, (2, 5, 16)), randn(r, (2, 7, 16))
    mask = nnx.make_attention_mask(jnp.ones((2, 5)), jnp.asarray(r.random((2, 7)) > 0.3).at[:, 0].set(True))
    self.assertEqual(mask.dtype, jnp.float32)
    ref, ours = flax_mha(), flax_mha(aj.nn.make_attention_fn("reference"))
    copy_weights(ref, ours)
    assert_close(ours(x_q, x_kv, mask=mask), ref(x_q, x_kv, mask=mask))
    causal = nnx.make_causal_mask(jnp.ones((2, 5)))
    assert_close(ours(x_q, mask=causal), ref(x_q, mask=causal))

  def test_dropout_matches_flax(self):
    x = randn(np.random.default_rng(2), (2, 9, 16))
    for broadcast in (True, False):
      ref = flax_mha(dropout_rate=0.3, broadcast_dropout=broadcast)
      ours = flax_mha(aj.nn.make_attention_fn("reference"), dropout_rate=0.3, broadcast_dropout=broadcast)
      copy_weights(ref, ours)
      a, b = ours(x, deterministic=False), ref(x, deterministic=False)
      assert_close(a, b)
      self.assertFalse(np.allclose(a, ours(x, deterministic=True), atol=1e-3))   # dropout really happened

  def test_sow_weights(self):
    x = randn(np.random.default_rng(3), (2, 6, 16))
    ref, ours = flax_mha(), flax_mha(aj.nn.make_attention_fn("reference"))
    copy_weights(ref, ours)
    ref(x, sow_weights=True, is_causal=True)
    ours(x, sow_weights=True, is_causal=True)
    w_ref = nnx.state(ref, nnx.Intermediate)["attention_weights"]
    w_ours = nnx.state(ours, nnx.Intermediate)["attention_weights"]
    leaves_ref, leaves_ours = jax.tree.leaves(w_ref), jax.tree.leaves(w_ours)
    self.assertLen(leaves_ours, 1)
    chex.assert_shape(leaves_ours[0], (2, 4, 6, 6))
    assert_close(leaves_ours[0], leaves_ref[0])

  def test_non_weight_implementations_refuse_dropout_and_sow(self):
    x = randn(np.random.default_rng(4), (2, 6, 16))
    m = flax_mha(aj.nn.make_attention_fn("xla"), dropout_rate=0.1)
    with self.assertRaisesRegex(ValueError, r"attention dropout.*implementation='xla'"):
      m(x, deterministic=False)
    m(x, deterministic=True)   # no dropout in eval mode: fine
    with self.assertRaisesRegex(ValueError, r"sow_weights.*implementation='xla'"):
      flax_mha(aj.nn.make_attention_fn("xla"))(x, sow_weights=True)

  @parameterized.parameters(True, False)
  def test_gqa(self, _):
    if not NNX_HAS_GQA:
      self.skipTest("this flax's nnx.MultiHeadAttention has no num_kv_heads")
    x = randn(np.random.default_rng(5), (2, 7, 16))
    ref, ours = flax_mha(num_kv_heads=2), flax_mha(aj.nn.make_attention_fn("reference"), num_kv_heads=2)
    copy_weights(ref, ours)
    assert_close(ours(x, is_causal=True), ref(x, is_causal=True))

  def test_bad_options(self):
    with self.assertRaisesRegex(ValueError, "unknown implementation"):
      aj.nn.make_attention_fn("flash")
    with self.assertRaisesRegex(ValueError, "unknown options"):
      aj.nn.make_attention_fn("reference", window=3)
    fn = aj.nn.make_attention_fn("reference")
    q = jnp.zeros((2, 3, 4, 8))
    with self.assertRaisesRegex(ValueError, "input_positions"):
      fn(q, q, q, input_positions=jnp.arange(3))
    with self.assertRaisesRegex(ValueError, "dropout_rng is required"):
      fn(q, q, q, dropout_rate=0.1, deterministic=False)


class LinenAdapterTest(parameterized.TestCase):

  @parameterized.parameters("reference", "xla")
  def test_equals_linen_default(self, implementation):
    r = np.random.default_rng(6)
    x = randn(r, (2, 3, 8, 16))         # two batch dims
    mask = linen.make_causal_mask(jnp.ones((2, 3, 8)))
    ref = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)
    ours = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=16,
                                              attention_fn=aj.nn.make_attention_fn(implementation))
    params = ref.init(jax.random.key(0), x, mask=mask)
    assert_close(ours.apply(params, x, mask=mask), ref.apply(params, x, mask=mask))

  def test_dropout_and_sow(self):
    x = randn(np.random.default_rng(7), (2, 8, 16))
    kw = dict(num_heads=4, qkv_features=16, dropout_rate=0.2, deterministic=False)
    ref = linen.MultiHeadDotProductAttention(**kw)
    ours = linen.MultiHeadDotProductAttention(**kw, attention_fn=aj.nn.make_attention_fn("reference"))
    params = ref.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    rngs = {"dropout": jax.random.key(2)}
    a, state_a = ours.apply(params, x, rngs=rngs, sow_weights=True, mutable=["intermediates"])
    b, state_b = ref.apply(params, x, rngs=rngs, sow_weights=True, mutable=["intermediates"])
    assert_close(a, b)
    wa = jax.tree.leaves(state_a["intermediates"])
    self.assertLen(wa, 1)
    chex.assert_shape(wa[0], (2, 4, 8, 8))
    assert_close(wa[0], jax.tree.leaves(state_b["intermediates"])[0])


class OurMultiHeadAttentionTest(parameterized.TestCase):

  @parameterized.product(implementation=("reference", "xla"), causal=(False, True))
  def test_equals_flax_nnx(self, implementation, causal):
    x = randn(np.random.default_rng(8), (2, 9, 16))
    ref = flax_mha()
    ours = aj.nn.MultiHeadAttention(4, 16, implementation=implementation, rngs=nnx.Rngs(3))
    copy_weights(ref, ours)
    assert_close(ours(x, is_causal=causal), ref(x, is_causal=causal))

  def test_cross_gqa_options_and_jit(self):
    r = np.random.default_rng(9)
    m = aj.nn.MultiHeadAttention(4, 16, 32, num_kv_heads=2, in_kv_features=10, implementation="reference",
                                 local_window_size=2, rngs=nnx.Rngs(0))
    x_q, x_kv = randn(r, (2, 6, 16)), randn(r, (2, 6, 10))
    lengths = jnp.array([6, 4], jnp.int32)
    out = nnx.jit(lambda m, a, b: m(a, b, key_value_seq_lengths=lengths))(m, x_q, x_kv)
    chex.assert_shape(out, (2, 6, 16))
    # Same computation through the functional API.
    params = {n: {"kernel": getattr(m, n).kernel[...], "bias": getattr(m, n).bias[...]}
              for n in ("query", "key", "value", "out")}
    want, _ = aj.multi_head_attention(params, x_q, x_kv, num_heads=4, num_kv_heads=2, local_window_size=2,
                                      key_value_seq_lengths=lengths)
    assert_close(out, want)

  def test_dropout_and_sow(self):
    x = randn(np.random.default_rng(10), (2, 5, 16))
    m = aj.nn.MultiHeadAttention(4, 16, dropout_rate=0.5, rngs=nnx.Rngs(0))
    a = m(x, deterministic=False, sow_weights=True)
    b = m(x, deterministic=False)
    self.assertFalse(np.allclose(a, b))        # fresh dropout bits each call
    c = m(x, deterministic=True)
    self.assertEqual(len(jax.tree.leaves(nnx.state(m, nnx.Intermediate))), 1)
    with self.assertRaisesRegex(ValueError, "deterministic="):
      m(x)
    fast = aj.nn.MultiHeadAttention(4, 16, dropout_rate=0.5, implementation="xla", rngs=nnx.Rngs(0))
    chex.assert_tree_all_finite(fast(x, deterministic=True))
    with self.assertRaisesRegex(ValueError, "implementation='xla'"):
      fast(x, deterministic=False)
    del c

  def test_grad(self):
    m = aj.nn.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    x = randn(np.random.default_rng(11), (1, 4, 8))
    grads = nnx.grad(lambda m: m(x, is_causal=True).sum())(m)
    chex.assert_tree_all_finite(jax.tree.leaves(grads))


class ClassicModulesTest(parameterized.TestCase):

  def test_additive(self):
    r = np.random.default_rng(12)
    m = aj.nn.AdditiveAttention(6, 5, 7, rngs=nnx.Rngs(0))
    q, keys, values = randn(r, (2, 1, 6)), randn(r, (2, 9, 5)), randn(r, (2, 9, 3))
    mask = jnp.arange(9)[None, None, :] < jnp.array([9, 4])[:, None, None]
    ctx, w = m(q, keys, values, mask=mask)
    chex.assert_shape([ctx, w], [(2, 1, 3), (2, 1, 9)])
    W, U, v = (np.float64(getattr(m, n)[...]) for n in ("W", "U", "v"))
    logits = np.tanh((np.float64(q) @ W)[:, :, None] + (np.float64(keys) @ U)[:, None]) @ v
    logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    assert_close(w, weights)
    assert_close(ctx, weights @ np.float64(values))
    assert_close(m(q, keys, values, mask=mask, projected_keys=m.project_keys(keys))[0], ctx)

  @parameterized.parameters("dot", "scaled_dot", "general", "concat")
  def test_luong(self, score):
    r = np.random.default_rng(13)
    m = aj.nn.LuongAttention(8, score=score, attn_features=6, rngs=nnx.Rngs(0))
    q, keys = randn(r, (3, 2, 8)), randn(r, (3, 7, 8))
    ctx, w = m(q, keys)
    chex.assert_shape([ctx, w], [(3, 2, 8), (3, 2, 7)])
    expected = {"dot": lambda: scores.dot(q, keys), "scaled_dot": lambda: scores.scaled_dot(q, keys),
                "general": lambda: scores.general({"W": m.W[...]}, q, keys),
                "concat": lambda: scores.additive({n: getattr(m, n)[...] for n in "WUv"}, q, keys)}[score]()
    assert_close(w, jax.nn.softmax(expected, -1))
    grads = nnx.grad(lambda m: m(q, keys)[0].sum())(m)
    chex.assert_tree_all_finite(jax.tree.leaves(grads))

  def test_luong_errors(self):
    with self.assertRaisesRegex(ValueError, "unknown Luong score='bilinear'"):
      aj.nn.LuongAttention(4, score="bilinear")
    with self.assertRaisesRegex(ValueError, "query_features == key_features"):
      aj.nn.LuongAttention(4, 5, score="dot")
    with self.assertRaisesRegex(ValueError, "attn_features"):
      aj.nn.LuongAttention(4, score="concat", rngs=nnx.Rngs(0))
