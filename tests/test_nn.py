"""Flax integration: attention_fn adapters in flax.nnx / flax.linen MHA, our NNX modules."""

import inspect
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import linen, nnx

import attention_jax as aj
from attention_jax import core, scores
from tests.helpers import assert_close, randn

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


class AdapterContractTest(parameterized.TestCase):
  """make_attention_fn's own contract: masks pass through, core does the shape work, weights dtype as in flax,
  finite under jax.debug_infs, clear errors."""

  def test_masks_pass_through_to_core(self):
    r = np.random.default_rng(20)
    q = randn(r, (2, 3, 5, 4, 8))                       # two batch dims, handed to core as they are
    seen = {}

    def spy(*args, **kwargs):
      seen["args"], seen["kwargs"] = args, kwargs
      return jnp.zeros(q.shape, q.dtype)

    bool_mask = jnp.asarray(r.random((2, 1, 1, 5, 5)) > 0.5)
    float_mask = jnp.asarray(r.random((3, 1, 5, 5)) > 0.5, jnp.float32) * 2.0
    fn = aj.nn.make_attention_fn("pallas")
    with mock.patch.object(core, "dot_product_attention", spy):
      fn(q, q, q, mask=bool_mask, is_causal=True)
      self.assertIs(seen["args"][4], bool_mask)
      chex.assert_shape(seen["args"][0], q.shape)
      self.assertEqual(seen["kwargs"]["implementation"], "pallas")
      self.assertTrue(seen["kwargs"]["is_causal"])
      fn(q, q, q, mask=float_mask)
      self.assertEqual(seen["args"][4].dtype, jnp.bool_)
      np.testing.assert_array_equal(seen["args"][4], np.asarray(float_mask) != 0)

  @parameterized.parameters("reference", "xla", "blockwise", "pallas")
  def test_batch_dims_rank3_and_value_head_dim_defer_to_core(self, implementation):
    r = np.random.default_rng(21)
    q, k = randn(r, (2, 3, 6, 4, 8)), randn(r, (2, 3, 7, 2, 8))
    v = randn(r, (2, 3, 7, 2, 8 if implementation == "xla" else 12))   # jax.nn needs Hv == H
    mask = jnp.asarray(r.random((3, 1, 6, 7)) > 0.3).at[..., 0].set(True)
    fn = aj.nn.make_attention_fn(implementation)
    got = fn(q, k, v, mask=mask)
    want = aj.reference_attention(q, k, v, mask=mask)
    chex.assert_shape(got, q.shape[:-1] + v.shape[-1:])
    assert_close(got, want)
    assert_close(fn(q[0, 0], k[0, 0], v[0, 0], mask=mask[0, 0]), want[0, 0])   # rank 3, rank-3 mask

  def test_sow_with_batch_dims_and_value_head_dim(self):
    r = np.random.default_rng(22)
    q, k, v = randn(r, (2, 3, 6, 4, 8)), randn(r, (2, 3, 7, 2, 8)), randn(r, (2, 3, 7, 2, 5))

    class Dummy(nnx.Module):
      pass

    fn = aj.nn.make_attention_fn("reference")
    out, state = nnx.capture(lambda m: fn(q, k, v, module=m, is_causal=True), nnx.Intermediate)(Dummy())
    want_out, _, want_w = aj.reference_attention(q, k, v, is_causal=True, return_residual=True, return_weights=True)
    assert_close(out, want_out)
    weights = jax.tree.leaves(state)[0]
    chex.assert_shape(weights, (2, 3, 4, 6, 7))
    assert_close(weights, want_w)

  @parameterized.parameters(False, True)
  def test_linen_weights_dtype_follows_force_fp32(self, force_fp32):
    """flax.linen sows float32 weights under force_fp32_for_softmax (when dtype is lower precision), else weights
    in dtype; so does the adapter. nnx (no such flag) sows weights in dtype."""
    x = randn(np.random.default_rng(23), (2, 5, 8))
    kw = dict(num_heads=2, qkv_features=8, dtype=jnp.bfloat16, force_fp32_for_softmax=force_fp32)
    want_dtype = jnp.float32 if force_fp32 else jnp.bfloat16
    for attention_fn in (linen.dot_product_attention, aj.nn.make_attention_fn("reference")):
      m = linen.MultiHeadDotProductAttention(**kw, attention_fn=attention_fn)
      params = m.init(jax.random.key(0), x)
      _, state = m.apply(params, x, sow_weights=True, mutable=["intermediates"])
      self.assertEqual(jax.tree.leaves(state)[0].dtype, want_dtype)
    ours = flax_mha(aj.nn.make_attention_fn("reference"), dtype=jnp.bfloat16)
    x = randn(np.random.default_rng(25), (2, 5, 16))
    _, state = nnx.capture(lambda m: m(x, sow_weights=True), nnx.Intermediate)(ours)
    self.assertEqual(jax.tree.leaves(state)[0].dtype, jnp.bfloat16)

  @parameterized.parameters(False, True)
  def test_debug_infs_silent_with_sow_and_dropout(self, jit):
    """Rows with no visible key (a padding mask that hides every key of one example) use -inf internally; under
    jax.debug_infs / debug_nans the adapter stays silent, eagerly and jitted, forward and backward."""
    r = np.random.default_rng(24)
    q = randn(r, (2, 6, 4, 8))
    mask = nnx.make_attention_mask(jnp.ones((2, 6)), jnp.array([[1] * 6, [0] * 6]))

    class Dummy(nnx.Module):
      pass

    fn = aj.nn.make_attention_fn("reference")

    def run(q, rng):
      out, state = nnx.capture(lambda m: fn(q, q, q, mask=mask, module=m, dropout_rate=0.3, dropout_rng=rng),
                               nnx.Intermediate)(Dummy())
      return out, jax.tree.leaves(state)[0]

    run = jax.jit(run) if jit else run
    loss = lambda q, rng: run(q, rng)[0].sum()
    with jax.debug_infs(True), jax.debug_nans(True):
      out, weights = run(q, jax.random.key(0))
      grad = (jax.jit(jax.grad(loss)) if jit else jax.grad(loss))(q, jax.random.key(0))
    chex.assert_tree_all_finite((out, weights, grad))
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(weights[1], 0.0)

  def test_complex_refused(self):
    x = jnp.ones((1, 4, 2, 8), jnp.complex64)
    with self.assertRaisesRegex(ValueError, "complex"):
      aj.nn.make_attention_fn("reference")(x, x, x)
    with self.assertRaisesRegex(ValueError, r"dtype is complex \(complex64\)"):   # before any cast to float
      aj.nn.make_attention_fn("reference")(x.real, x.real, x.real, dtype=jnp.complex64)
    m = aj.nn.MultiHeadAttention(2, 4, param_dtype=jnp.complex64, implementation="reference", rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "complex"):
      m(jnp.ones((1, 3, 4), jnp.complex64))

  def test_zero_size_with_weights(self):
    q, kv = jnp.ones((1, 3, 2, 4)), jnp.ones((1, 0, 2, 4))

    class Dummy(nnx.Module):
      pass

    out, state = nnx.capture(lambda m: aj.nn.make_attention_fn("reference")(q, kv, kv, module=m),
                             nnx.Intermediate)(Dummy())
    np.testing.assert_array_equal(out, np.zeros((1, 3, 2, 4)))
    chex.assert_shape(jax.tree.leaves(state)[0], (1, 2, 3, 0))

  def test_bad_input(self):
    with self.assertRaisesRegex(TypeError, "implementation must be None, a name or a sequence"):
      aj.nn.make_attention_fn(3)
    with self.assertRaisesRegex(ValueError, "unknown implementation='flash'"):
      aj.nn.make_attention_fn(("pallas", "flash"))
    with self.assertRaisesRegex(ValueError, "make_attention_fn: .*scale"):
      aj.nn.make_attention_fn("reference", scale="big")
    with self.assertRaisesRegex(ValueError, "make_attention_fn: .*window"):
      aj.nn.make_attention_fn("reference", local_window_size=-1)
    with self.assertRaisesRegex(ValueError, "make_attention_fn: .*logits_soft_cap"):
      aj.nn.make_attention_fn("reference", logits_soft_cap=0.0)
    fn = aj.nn.make_attention_fn("reference")
    q = jnp.ones((2, 3, 4, 8))
    for rate in (1.0, -0.1, True, "0.1"):
      with self.assertRaisesRegex(ValueError, r"dropout_rate must be a number in \[0, 1\)"):
        fn(q, q, q, dropout_rate=rate, dropout_rng=jax.random.key(0))
    with self.assertRaisesRegex(ValueError, "same rank"):
      fn(q[0, 0], q[0, 0], q[0, 0])                      # rank 2: no [T, N, H]
    with self.assertRaisesRegex(ValueError, "same rank"):
      fn(q, q[0], q[0])
    with self.assertRaisesRegex(ValueError, "mask of shape"):
      fn(q, q, q, mask=jnp.ones((2, 4, 3, 4), bool))
    with self.assertRaisesRegex(TypeError, "module= must be a flax"):
      fn(q, q, q, module=object())
    with self.assertRaisesRegex(ValueError, "custom einsum"):
      fn(q, q, q, qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=jnp.einsum)

  def test_module_bad_input(self):
    rngs = nnx.Rngs(0)
    for kwargs, message in (
        (dict(num_heads=0, in_features=16), "num_heads must be a positive int"),
        (dict(num_heads=4, in_features=16.0), "in_features must be a positive int"),
        (dict(num_heads=3, in_features=16), "qkv_features=16 must be divisible by num_heads=3"),
        (dict(num_heads=4, in_features=16, num_kv_heads=3), "multiple of num_kv_heads=3"),
        (dict(num_heads=4, in_features=16, dropout_rate=1.0), r"dropout_rate must be a number in \[0, 1\)"),
        (dict(num_heads=4, in_features=16, implementation="flash"), "unknown implementation"),
        (dict(num_heads=4, in_features=16, window=3), "unknown options"),
    ):
      with self.assertRaisesRegex(ValueError, message):
        aj.nn.MultiHeadAttention(**kwargs, rngs=rngs)
    m = aj.nn.MultiHeadAttention(4, 16, in_kv_features=10, rngs=rngs)
    with self.assertRaisesRegex(ValueError, r"inputs_q must be \[batch..., length, 16\]; got inputs_q.shape=\(16,\)"):
      m(jnp.ones((16,)), jnp.ones((3, 10)))
    with self.assertRaisesRegex(ValueError, r"inputs_k must be \[batch..., length, 10\]"):
      m(jnp.ones((2, 3, 16)), jnp.ones((2, 3, 16)))
    with self.assertRaisesRegex(ValueError, "inputs_k cannot be None"):
      m(jnp.ones((2, 3, 16)), inputs_v=jnp.ones((2, 3, 10)))
    with self.assertRaisesRegex(ValueError, "unsupported arguments"):
      m(jnp.ones((2, 3, 16)), jnp.ones((2, 3, 10)), segment_ids=jnp.zeros((2, 3), jnp.int32))


def np_alibi_bias(num_heads: int, T: int, S: int) -> np.ndarray:
  """ALiBi's bias ``[1, N, T, S]`` written from the paper (slopes 2^(-8 i / N), i = 1..N; N a power of two)."""
  slopes = 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)
  distance = np.abs(np.arange(T)[:, None] - np.arange(S)[None, :])
  return (-slopes[:, None, None] * distance)[None].astype(np.float32)


def with_bias(attention_fn, bias, **fixed):
  """An attention_fn that adds a fixed bias array (and fixed keywords) to every call."""
  def fn(query, key, value, mask=None, **kw):
    return attention_fn(query, key, value, bias, mask, **{**kw, **fixed})
  return fn


class FlexAdapterTest(parameterized.TestCase):
  """make_attention_fn("flex", score_mod=..., mask_mod=...) against the reference adapter given the same logits
  as a bias array and masks."""

  def setUp(self):
    super().setUp()
    from attention_jax import mods
    self.mods = mods
    self.alibi = mods.alibi(jnp.asarray(mods.alibi_slopes(4)))

  @parameterized.parameters("blockwise", "reference")
  def test_nnx_alibi_causal_equals_bias_reference(self, flex_implementation):
    x = randn(np.random.default_rng(30), (2, 11, 16))
    bias = jnp.asarray(np_alibi_bias(4, 11, 11))
    flex_fn = aj.nn.make_attention_fn("flex", score_mod=self.alibi, mask_mod=self.mods.causal(), block_size=4,
                                      flex_implementation=flex_implementation)
    ref = flax_mha(with_bias(aj.nn.make_attention_fn("reference"), bias, is_causal=True))
    ours = flax_mha(flex_fn)
    copy_weights(ref, ours)
    assert_close(ours(x), ref(x))
    assert_close(nnx.jit(lambda m, x: m(x))(ours, x), ref(x))
    # Gradients w.r.t. every parameter agree too (the blockwise path has its own backward).
    loss = lambda m: jnp.sum(jnp.sin(m(x)))
    g_ours, g_ref = nnx.grad(loss)(ours), nnx.grad(loss)(ref)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
      assert_close(a, b, kind="grad")

  def test_nnx_flax_mask_and_is_causal_join_the_mask_mod(self):
    """A padding mask from flax and is_causal=True are and-ed with the adapter's own mask_mod (a window)."""
    r = np.random.default_rng(31)
    x = randn(r, (2, 10, 16))
    keep = jnp.asarray([[1] * 10, [1] * 7 + [0] * 3])
    mask = nnx.make_attention_mask(keep, keep)                       # float, [2, 1, 10, 10]
    bias = jnp.asarray(np_alibi_bias(4, 10, 10))
    window = np.abs(np.arange(10)[:, None] - np.arange(10)[None, :]) <= 3
    ref_mask = jnp.logical_and(mask != 0, jnp.asarray(window)[None, None])
    flex_fn = aj.nn.make_attention_fn("flex", score_mod=self.alibi, mask_mod=self.mods.sliding_window(3),
                                      block_size=4)
    ref = flax_mha(aj.nn.make_attention_fn("reference"))
    ours = flax_mha(flex_fn)
    copy_weights(ref, ours)
    want = with_bias(ref.attention_fn, bias)
    ref.attention_fn = lambda q, k, v, mask=None, **kw: want(q, k, v, mask=ref_mask, **kw)
    got = ours(x, mask=mask, is_causal=True)
    assert_close(got[:, :7], ref(x, is_causal=True)[:, :7])
    assert_close(got[0], ref(x, is_causal=True)[0])

  def test_bias_array_is_added_and_gets_gradients(self):
    r = np.random.default_rng(32)
    q, k, v = randn(r, (2, 6, 2, 8)), randn(r, (2, 9, 2, 8)), randn(r, (2, 9, 2, 8))
    bias = randn(r, (2, 1, 6, 9))
    soft_cap = lambda s, b, n, i, j: 5.0 * jnp.tanh(s / 5.0)
    flex_fn = aj.nn.make_attention_fn("flex", score_mod=soft_cap, block_size=4)
    ref_fn = aj.nn.make_attention_fn("reference", logits_soft_cap=5.0)
    assert_close(flex_fn(q, k, v, bias), ref_fn(q, k, v, bias))
    loss = lambda fn: lambda q, bias: jnp.sum(jnp.sin(fn(q, k, v, bias)))
    for a, b in zip(jax.grad(loss(flex_fn), (0, 1))(q, bias), jax.grad(loss(ref_fn), (0, 1))(q, bias)):
      assert_close(a, b, kind="grad")

  def test_mask_mod_reading_the_batch_index_under_jit(self):
    """A document mask (ids per batch row, traced under jit) equals segment ids in the reference."""
    r = np.random.default_rng(33)
    q, k, v = (randn(r, (2, 12, 4, 8)) for _ in range(3))
    doc = jnp.asarray([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3], jnp.int32)

    @jax.jit
    def run(q, k, v, doc):
      fn = aj.nn.make_attention_fn("flex", mask_mod=self.mods.document(doc), block_size=4)
      return fn(q, k, v, is_causal=True)
    want = aj.reference_attention(q, k, v, is_causal=True, q_segment_ids=doc, kv_segment_ids=doc)
    assert_close(run(q, k, v, doc), want)

  def test_batch_dims_and_gqa(self):
    r = np.random.default_rng(34)
    q, k, v = randn(r, (2, 3, 7, 4, 8)), randn(r, (2, 3, 7, 2, 8)), randn(r, (2, 3, 7, 2, 8))
    fn = aj.nn.make_attention_fn("flex", score_mod=self.alibi, mask_mod=self.mods.causal(), block_size=4)
    bias = jnp.asarray(np_alibi_bias(4, 7, 7))
    assert_close(fn(q, k, v), aj.reference_attention(q, k, v, bias, is_causal=True))
    assert_close(fn(q[0, 0], k[0, 0], v[0, 0]), aj.reference_attention(q, k, v, bias, is_causal=True)[0, 0])

  def test_linen_adapter(self):
    x = randn(np.random.default_rng(35), (2, 9, 16))
    mask = linen.make_causal_mask(jnp.ones((2, 9)))
    bias = jnp.asarray(np_alibi_bias(4, 9, 9))
    ref = linen.MultiHeadDotProductAttention(
        num_heads=4, qkv_features=16, attention_fn=with_bias(aj.nn.make_attention_fn("reference"), bias))
    ours = linen.MultiHeadDotProductAttention(
        num_heads=4, qkv_features=16, attention_fn=aj.nn.make_attention_fn("flex", score_mod=self.alibi))
    params = ref.init(jax.random.key(0), x, mask=mask)
    assert_close(ours.apply(params, x, mask=mask), ref.apply(params, x, mask=mask))

  def test_our_module_takes_flex_options(self):
    x = randn(np.random.default_rng(36), (2, 6, 16))
    ours = aj.nn.MultiHeadAttention(4, 16, implementation="flex", score_mod=self.alibi, rngs=nnx.Rngs(0))
    ref = aj.nn.MultiHeadAttention(4, 16, implementation="reference", rngs=nnx.Rngs(0))
    bias = jnp.asarray(np_alibi_bias(4, 6, 6))
    assert_close(ours(x, is_causal=True), ref(x, bias=bias, is_causal=True))

  def test_dropout_and_sow_refused(self):
    x = randn(np.random.default_rng(37), (2, 6, 16))
    m = flax_mha(aj.nn.make_attention_fn("flex", mask_mod=self.mods.causal()), dropout_rate=0.1)
    chex.assert_tree_all_finite(m(x, deterministic=True))
    with self.assertRaisesRegex(ValueError, r"dropout \(dropout_rate=0.1, deterministic=False\).*never forms"):
      m(x, deterministic=False)
    with self.assertRaisesRegex(ValueError, "sow_weights .*flex_attention never forms"):
      m(x, deterministic=True, sow_weights=True)

  def test_bad_options(self):
    with self.assertRaisesRegex(ValueError, r"make_attention_fn\('flex'\): unknown options \['is_causal'\]"):
      aj.nn.make_attention_fn("flex", is_causal=True)
    with self.assertRaisesRegex(ValueError, "block_size must be a positive int; got block_size=0"):
      aj.nn.make_attention_fn("flex", block_size=0)
    with self.assertRaisesRegex(ValueError, r"block_size must be an int or \(query block, key block\)"):
      aj.nn.make_attention_fn("flex", block_size=(8, 8, 8))
    with self.assertRaisesRegex(TypeError, "score_mod must be callable"):
      aj.nn.make_attention_fn("flex", score_mod=1.0)
    with self.assertRaisesRegex(TypeError, "mask_mod must be callable"):
      aj.nn.make_attention_fn("flex", mask_mod=np.ones((4, 4), bool))
    with self.assertRaisesRegex(ValueError, "unknown flex_attention implementation='flash'"):
      aj.nn.make_attention_fn("flex", flex_implementation="flash")
    with self.assertRaisesRegex(ValueError, r"make_attention_fn\('flex'\): bad scale"):
      aj.nn.make_attention_fn("flex", scale="big")
    q = jnp.ones((1, 4, 2, 8))
    with self.assertRaisesRegex(ValueError, r"unsupported arguments \['q_segment_ids'\].*mods.document"):
      aj.nn.make_attention_fn("flex")(q, q, q, q_segment_ids=jnp.zeros((1, 4), jnp.int32))
