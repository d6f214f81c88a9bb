"""flax's multi-head attention tests, run with ``attention_fn=attention_jax.nn.make_attention_fn(implementation)``.

The cases and their assertions come from google/flax's ``tests/nnx/nn/attention_test.py`` (``nnx.MultiHeadAttention``
and ``nnx.dot_product_attention``) and ``tests/linen/linen_attention_test.py`` (``linen.MultiHeadDotProductAttention``
/ ``SelfAttention``), rewritten in this project's style. Where upstream only checks shapes, the output is also
compared with flax's default attention under identical parameters (tolerances from tests/helpers.py).

Each suite runs once per implementation: "reference", "xla", "blockwise" and "pallas" (interpret mode on CPU). CI
runs both suites with "reference", the nnx suite with "xla" and the linen suite with "blockwise"; the other
combinations are slow, and ``FlaxPallasTest`` keeps causal / padding masks as arrays, decoding and GQA with the
Pallas kernel in CI.
Attention dropout and ``sow_weights`` need the attention weights, which only "reference" (and the automatic choice)
forms: the other implementations must refuse them with a ``ValueError``, which is what their runs check.
Deliberate differences from flax, commented where an assertion changes: rows with no visible key give zeros
(flax: the mean of the values), complex inputs are refused, error messages are the library's own.
"""

from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import jax_utils, linen, nnx
from flax.core import pop
from jax import lax
from jax.nn import initializers

import attention_jax as aj
from tests.helpers import assert_close, enable_x64, randn

WEIGHT_IMPLS = ("reference",)



def copy_nnx_params(src: nnx.Module, dst: nnx.Module) -> None:
  nnx.update(dst, nnx.state(src, nnx.Param))


class Suite(parameterized.TestCase):
  __test__ = False   # collected through the per-implementation subclasses below
  IMPL = "reference"

  def attention_fn(self):
    return aj.nn.make_attention_fn(self.IMPL)

  @property
  def forms_weights(self) -> bool:
    return self.IMPL in WEIGHT_IMPLS

  def assert_refuses_weights(self, what: str, thunk) -> None:
    """Dropout / sow_weights on an implementation that never forms the weights: a clear ValueError."""
    with self.assertRaisesRegex(ValueError, rf"{what}.*implementation={self.IMPL!r}"):
      thunk()


# ----------------------------------------------------------------------------------------------------------
# flax tests/nnx/nn/attention_test.py
# ----------------------------------------------------------------------------------------------------------

LINEN_CONSISTENCY = [
    (f"bias{int(b)}_{jnp.dtype(d).name}_p{jnp.dtype(p).name}_{str(pr).split('.')[-1]}_dec{int(dec)}_qk{int(qk)}",
     b, d, p, pr, dec, qk)
    for b in (True, False) for d in (jnp.float32, jnp.float16) for p in (jnp.float32, jnp.float16)
    for pr in (lax.Precision.DEFAULT, lax.Precision.HIGH, lax.Precision.HIGHEST) for dec in (True, False)
    for qk in (True, False)]
LINEN_CONSISTENCY_FAST = {"bias1_float32_pfloat32_DEFAULT_dec0_qk0", "bias0_float16_pfloat32_HIGHEST_dec1_qk1",
                          "bias1_float32_pfloat16_HIGH_dec1_qk0"}


class NnxSuite(Suite):
  __test__ = False

  def pair(self, **kw):
    """flax's default nnx.MultiHeadAttention and one with our attention_fn, with identical parameters."""
    ref = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
    ours = nnx.MultiHeadAttention(**kw, attention_fn=self.attention_fn(), rngs=nnx.Rngs(0))
    copy_nnx_params(ref, ours)
    return ref, ours

  def test_basic(self):
    ref, module = self.pair(num_heads=2, in_features=3, qkv_features=6, out_features=6)
    y = module(jnp.ones((1, 7, 3)), decode=False)
    assert y.shape == (1, 7, 6)
    x = randn(np.random.default_rng(0), (2, 7, 3))
    assert_close(module(x, decode=False), ref(x, decode=False))

  def test_multihead_sow_attention_weights(self):
    class Model(nnx.Module):
      def __init__(self, attention_kwargs, rng):
        self.attention_layers = nnx.data([nnx.MultiHeadAttention(**attention_kwargs, rngs=rng) for _ in range(3)])

      def __call__(self, x, sow_weights=False):
        x = self.attention_layers[0](x, sow_weights=sow_weights)
        x = self.attention_layers[1](x)
        x = self.attention_layers[2](x, sow_weights=sow_weights)
        return x

    kwargs = dict(in_features=8, num_heads=8, kernel_init=nnx.initializers.ones_init(),
                  bias_init=nnx.initializers.zeros_init(), deterministic=False)
    module = Model(dict(kwargs, attention_fn=self.attention_fn()), nnx.Rngs(0))
    module.set_attributes(decode=False)
    x = jnp.ones((4, 6, 8))
    if not self.forms_weights:
      self.assert_refuses_weights("sow_weights", lambda: module(x, True))
      return
    _, intermediates = nnx.capture(module, nnx.Intermediate)(x, True)
    assert intermediates["attention_layers"][0]["attention_weights"][0].shape == (4, 8, 6, 6)
    assert 1 not in intermediates["attention_layers"]
    assert intermediates["attention_layers"][2]["attention_weights"][0].shape == (4, 8, 6, 6)
    _, intermediates = nnx.capture(module, nnx.Intermediate)(x)
    assert not intermediates  # empty

    # The sown weights equal flax's on random inputs and random (identical) parameters.
    default = Model(dict(kwargs, kernel_init=nnx.initializers.lecun_normal()), nnx.Rngs(1))
    ours = Model(dict(kwargs, kernel_init=nnx.initializers.lecun_normal(), attention_fn=self.attention_fn()),
                 nnx.Rngs(1))
    default.set_attributes(decode=False)
    ours.set_attributes(decode=False)
    x = randn(np.random.default_rng(1), (4, 6, 8))
    want_y, want = nnx.capture(default, nnx.Intermediate)(x, True)
    got_y, got = nnx.capture(ours, nnx.Intermediate)(x, True)
    assert_close(got_y, want_y)
    for i in (0, 2):
      w = got["attention_layers"][i]["attention_weights"][0]
      self.assertEqual(w.dtype, jnp.float32)
      assert_close(w, want["attention_layers"][i]["attention_weights"][0])

  def test_autoregressive_decode_with_x64(self):
    with enable_x64():
      x = jnp.ones((1, 4, 4))
      kw = dict(in_features=4, num_heads=2, qkv_features=4, decode=True)
      ref, module = self.pair(**kw)
      for m in (ref, module):
        m.init_cache(x.shape, dtype=x.dtype)
      assert module.cached_key.shape == (1, 4, 2, 2)
      assert module.cached_value.shape == (1, 4, 2, 2)
      if self.IMPL == "pallas":   # float64 stays float64 in this library; the Pallas kernels cannot, and say so
        with self.assertRaisesRegex(NotImplementedError, "float64"):
          module(x[:, :1, :])
        return
      y1 = module(x[:, :1, :])
      y2 = module(x[:, 1:2, :])
      assert y1.shape == (1, 1, 4)
      assert y2.shape == (1, 1, 4)
      self.assertEqual(y2.dtype, jnp.float64)
      assert_close(y1, ref(x[:, :1, :]), jnp.float32)   # flax's softmax is float32 even in x64
      assert_close(y2, ref(x[:, 1:2, :]), jnp.float32)

  @parameterized.product(use_padding=[True, False], is_cross_attention=[True, False])
  def test_causal_mask_equivalence(self, use_padding, is_cross_attention):
    batch_size, num_heads, q_len, head_dim = 1, 2, 2, 4
    kv_len = 4 if is_cross_attention else q_len
    q = jax.random.normal(jax.random.key(0), (batch_size, 1, q_len, num_heads, head_dim))
    k = jax.random.normal(jax.random.key(1), (batch_size, 1, kv_len, num_heads, head_dim))
    v = jax.random.normal(jax.random.key(2), (batch_size, 1, kv_len, num_heads, head_dim))
    causal_mask = jnp.broadcast_to(jnp.tril(jnp.ones((q_len, kv_len), jnp.bool_)),
                                   (batch_size, 1, num_heads, q_len, kv_len))
    padding_mask = None
    if use_padding:
      padding_mask = jnp.ones((batch_size, 1, 1, q_len, kv_len), jnp.bool_).at[..., -2:].set(False)
    manual_mask = nnx.combine_masks(padding_mask, causal_mask, dtype=q.dtype)
    fn = self.attention_fn()

    # Precombined (float) mask and is_causal=False, against the padding mask with is_causal=True (with the weights
    # sown through nnx.capture where the implementation forms them).
    attn_jax = fn(query=q, key=k, value=v, mask=manual_mask, is_causal=False, deterministic=True, module=None)

    class DummyModule(nnx.Module):
      pass

    def run(m):
      return fn(query=q, key=k, value=v, mask=padding_mask, is_causal=True, deterministic=True, module=m)

    if self.forms_weights:
      attn_manual, _ = nnx.capture(run, nnx.Intermediate)(DummyModule())
    else:
      attn_manual = run(None)
    np.testing.assert_allclose(attn_jax, attn_manual, atol=1e-6)

    # Against flax's own function. Without cross attention the padding hides both keys: every row is empty, and
    # there this library returns zeros where flax returns the mean of the values.
    want = nnx.dot_product_attention(q, k, v, mask=manual_mask)
    if use_padding and not is_cross_attention:
      np.testing.assert_array_equal(attn_jax, 0.0)
      assert_close(want, jnp.broadcast_to(v.mean(axis=2, keepdims=True), want.shape))
    else:
      assert_close(attn_jax, want)

  def check_nnx_attention_equivalence(self, use_bias, dtype, param_dtype, precision, decode, normalize_qk):
    key = jax.random.key(42)
    num_heads, in_features, qkv_features, out_features = 2, 3, 6, 6
    x = jax.numpy.ones((1, in_features))
    kw = dict(num_heads=num_heads, qkv_features=qkv_features, out_features=out_features, use_bias=use_bias,
              dtype=dtype, param_dtype=param_dtype, precision=precision, decode=decode, normalize_qk=normalize_qk,
              attention_fn=self.attention_fn())
    model_nnx = nnx.MultiHeadAttention(in_features=in_features, rngs=nnx.Rngs(42), **kw)
    model = linen.MultiHeadDotProductAttention(**kw)
    variables = model.init(key, x)
    default_nnx = nnx.MultiHeadAttention(in_features=in_features, rngs=nnx.Rngs(42),
                                         **{k: v for k, v in kw.items() if k != "attention_fn"})
    for m in (model_nnx, default_nnx):
      for qkvo in ("query", "key", "value", "out"):
        getattr(m, qkvo).kernel[...] = variables["params"][qkvo]["kernel"]
        if use_bias:
          getattr(m, qkvo).bias[...] = variables["params"][qkvo]["bias"]
      if decode:
        m.init_cache(x.shape, dtype=dtype)
    out_nnx = model_nnx(x)
    out, _ = model.apply(variables, x, mutable=["cache"])
    np.testing.assert_array_equal(out, out_nnx)
    assert_close(out_nnx, default_nnx(x), out_nnx.dtype)

  @parameterized.named_parameters(*(c for c in LINEN_CONSISTENCY if c[0] in LINEN_CONSISTENCY_FAST))
  def test_nnx_attention_equivalence(self, *args):
    self.check_nnx_attention_equivalence(*args)

  @parameterized.named_parameters(*(c for c in LINEN_CONSISTENCY if c[0] not in LINEN_CONSISTENCY_FAST))
  @pytest.mark.slow
  def test_nnx_attention_equivalence_all(self, *args):
    self.check_nnx_attention_equivalence(*args)

  def test_varying_num_features(self):
    x = jax.numpy.ones((1, 3))
    y = jax.random.normal(jax.random.key(42), (1, 4))
    ref, layer = self.pair(num_heads=2, in_features=3, qkv_features=6, out_features=6, in_kv_features=4,
                           decode=False)
    self.assertIsNotNone(layer(x, y))
    x = randn(np.random.default_rng(2), (2, 5, 3))
    y = randn(np.random.default_rng(3), (2, 7, 4))
    assert_close(layer(x, y), ref(x, y))

  def test_gqa_shapes(self):
    B, T, S, D = 2, 4, 5, 8
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    query = jax.random.normal(k1, (B, T, 6, D))
    key = jax.random.normal(k2, (B, S, 3, D))
    value = jax.random.normal(k3, (B, S, 3, D))
    output = self.attention_fn()(query, key, value)
    self.assertEqual(output.shape, (B, T, 6, D))
    assert_close(output, nnx.dot_product_attention(query, key, value))

  def test_gqa_invalid_heads(self):
    query = jnp.ones((1, 4, 5, 8))
    key = jnp.ones((1, 4, 2, 8))
    with self.assertRaisesRegex(ValueError, "must be a multiple"):
      self.attention_fn()(query, key, key)

  def test_gqa_multihead_attention(self):
    in_feat, n_heads, n_kv_heads, qkv_feat = 128, 32, 8, 2048
    head_dim = qkv_feat // n_heads
    ref, model = self.pair(num_heads=n_heads, in_features=in_feat, qkv_features=qkv_feat, num_kv_heads=n_kv_heads)
    assert model.query.kernel.shape == (in_feat, n_heads, head_dim)
    assert model.key.kernel.shape == (in_feat, n_kv_heads, head_dim)
    assert model.value.kernel.shape == (in_feat, n_kv_heads, head_dim)
    x = jnp.ones((1, 10, in_feat))
    y = model(x, decode=False)
    assert y.shape == (1, 10, in_feat)
    x = randn(np.random.default_rng(4), (1, 10, in_feat))
    assert_close(model(x, decode=False), ref(x, decode=False))
    for m in (model, ref):
      m.init_cache((1, 10, in_feat))
    assert model.cached_key.shape == (1, 10, n_kv_heads, head_dim)
    x_token = x[:, :1]
    y_token = model(x_token, decode=True)
    assert y_token.shape == (1, 1, in_feat)
    assert model.cache_index == 1
    assert_close(y_token, ref(x_token, decode=True))

  def test_gqa_parity_with_jax(self):
    class DummyModule(nnx.Module):
      pass

    B, T, S, D = 2, 8, 8, 16
    k1, k2, k3 = jax.random.split(jax.random.key(42), 3)
    query = jax.random.normal(k1, (B, T, 4, D))
    key = jax.random.normal(k2, (B, S, 2, D))
    value = jax.random.normal(k3, (B, S, 2, D))
    jax_out = jax.nn.dot_product_attention(query, key, value)
    fn = self.attention_fn()
    if self.forms_weights:
      nnx_out, _ = nnx.capture(lambda m: fn(query, key, value, module=m), nnx.Intermediate)(DummyModule())
    else:
      nnx_out = fn(query, key, value)
    np.testing.assert_allclose(nnx_out, jax_out, atol=1e-3, rtol=1e-3)

  # flax's messages say "lengths must match" / "depths must match"; this library names the shapes its own way.
  @parameterized.parameters(
      ((2, 16, 4, 8), (16, 4, 8), (16, 4, 8), "same rank"),
      ((2, 16, 4, 8), (3, 16, 4, 8), (3, 16, 4, 8), "batch dims"),
      ((2, 16, 4, 8), (2, 16, 4, 8), (2, 15, 4, 8), r"key and value must agree on \[S, K\]"),
      ((2, 16, 4, 8), (2, 16, 4, 7), (2, 16, 4, 8), "head dims differ"),
  )
  def test_invalid_shapes(self, q_shape, k_shape, v_shape, match):
    q, k, v = jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape)
    with self.assertRaisesRegex(ValueError, match):
      self.attention_fn()(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0))

  def test_padding_mask_array_with_empty_rows(self):
    """A padding mask passed as a float array (nnx.make_attention_mask), with one example whose queries are all
    padding: rows with keys match flax; rows without give zeros here (flax: the mean of the values)."""
    r = np.random.default_rng(5)
    ref, ours = self.pair(num_heads=4, in_features=16, qkv_features=32, decode=False)
    x = randn(r, (2, 9, 16))
    q_valid = jnp.array([[1] * 9, [1] * 6 + [0] * 3])
    k_valid = jnp.array([[1] * 9, [0] * 9])
    mask = nnx.make_attention_mask(q_valid, k_valid)
    self.assertEqual(mask.dtype, jnp.float32)
    got, want = ours(x, mask=mask), ref(x, mask=mask)
    assert_close(got[0], want[0])
    # Example 1 sees no key: its attention output is zeros, so the layer returns the out projection's bias.
    assert_close(got[1], jnp.broadcast_to(ours.out.bias[...], got[1].shape))


class NnxReferenceTest(NnxSuite):
  __test__ = True
  IMPL = "reference"


class NnxXlaTest(NnxSuite):
  __test__ = True
  IMPL = "xla"


@pytest.mark.slow   # CI runs "blockwise" through the linen suite
class NnxBlockwiseTest(NnxSuite):
  __test__ = True
  IMPL = "blockwise"


@pytest.mark.slow
class NnxPallasTest(NnxSuite):
  __test__ = True
  IMPL = "pallas"


# ----------------------------------------------------------------------------------------------------------
# flax tests/linen/linen_attention_test.py
# ----------------------------------------------------------------------------------------------------------


def check_decoding(attention_fn, spatial_shape, attn_dims):
  """flax's linen test_decoding: a causal layer on the whole sequence (float causal mask, batch dims) equals the
  same layer decoding one position at a time with a cache."""
  bs, num_heads, num_features = 2, 3, 4
  key1, key2 = jax.random.split(jax.random.key(0))
  inputs = jax.random.normal(key1, (bs,) + spatial_shape + (num_heads * num_features,))
  module = linen.MultiHeadDotProductAttention(num_heads=num_heads, qkv_features=num_heads * num_features,
                                             precision=lax.Precision.HIGHEST, deterministic=False, decode=False,
                                             attention_fn=attention_fn)
  decode_module = module.clone(decode=True)
  initial_vars = decode_module.init(key2, inputs)
  state, params = pop(initial_vars, "params")
  causal_mask = linen.attention.make_causal_mask(jnp.ones((bs,) + spatial_shape))   # float, extra batch dims
  y_ref = jax.jit(lambda x, y: module.apply(initial_vars, x, mask=y))(inputs, causal_mask)

  def body_fn(state, x):   # feed the inputs one position at a time, as in autoregressive decoding
    y, state = decode_module.apply({"params": params, **state}, x, mutable=["cache"])
    return state, y

  _, y = jax_utils.scan_in_dim(body_fn, state, inputs, axis=attn_dims, keepdims=True)
  np.testing.assert_allclose(y_ref, y, atol=1e-5)


class LinenSuite(Suite):
  __test__ = False

  def mhdpa(self, **kw):
    return linen.MultiHeadDotProductAttention(attention_fn=self.attention_fn(), **kw)

  def test_multihead_self_attention(self):
    x = jnp.ones((4, 6, 5))
    kw = dict(num_heads=8, qkv_features=16, kernel_init=initializers.ones, bias_init=initializers.zeros,
              deterministic=False)
    y, _ = self.mhdpa(**kw).init_with_output(jax.random.key(0), x)
    self.assertEqual(y.shape, x.shape)
    self.assertEqual(y.dtype, jnp.float32)
    # linen.SelfAttention (older flax versions of this test), random inputs, against flax's default.
    x = randn(np.random.default_rng(6), (4, 6, 5))
    kw["kernel_init"] = initializers.lecun_normal()
    module = linen.SelfAttention(attention_fn=self.attention_fn(), **kw)
    variables = module.init(jax.random.key(0), x)
    assert_close(module.apply(variables, x), linen.SelfAttention(**kw).apply(variables, x))

  def test_dtype_infer(self):
    # Upstream: complex64 inputs give a complex64 output. Refused here on purpose: softmax needs real logits.
    x = jnp.ones((4, 6, 5), jnp.complex64)
    module = self.mhdpa(num_heads=8, qkv_features=16, kernel_init=initializers.ones, bias_init=initializers.zeros,
                        deterministic=False)
    with self.assertRaisesRegex(ValueError, "complex"):
      module.init_with_output(jax.random.key(0), x)

  def test_multihead_encoder_decoder_attention(self):
    q = jnp.ones((4, 2, 3, 5))
    kw = dict(num_heads=8, qkv_features=16, kernel_init=initializers.ones, bias_init=initializers.zeros,
              deterministic=False)
    y, _ = self.mhdpa(**kw).init_with_output(jax.random.key(0), q)
    self.assertEqual(y.shape, q.shape)
    # Two batch dims and cross attention on random inputs, against flax's default.
    r = np.random.default_rng(7)
    q, kv = randn(r, (4, 2, 3, 5)), randn(r, (4, 2, 7, 5))
    kw["kernel_init"] = initializers.lecun_normal()
    variables = self.mhdpa(**kw).init(jax.random.key(0), q, kv)
    assert_close(self.mhdpa(**kw).apply(variables, q, kv),
                 linen.MultiHeadDotProductAttention(**kw).apply(variables, q, kv))

  def test_mha_out_initializers(self):
    q = jnp.ones((4, 2, 3, 5))
    module = self.mhdpa(num_heads=8, qkv_features=16, kernel_init=initializers.ones,
                        out_kernel_init=initializers.zeros, bias_init=initializers.zeros,
                        out_bias_init=initializers.ones, deterministic=False)
    params = module.init(jax.random.key(0), q)["params"]
    for name in ("query", "key", "value"):
      np.testing.assert_allclose(params[name]["kernel"], 1.0)
      np.testing.assert_allclose(params[name]["bias"], 0.0)
    np.testing.assert_allclose(params["out"]["kernel"], 0.0)
    np.testing.assert_allclose(params["out"]["bias"], 1.0)

  def test_multihead_self_attention_w_dropout(self):
    x = jnp.ones((4, 2, 3, 5))
    module = self.mhdpa(num_heads=8, qkv_features=16, kernel_init=initializers.ones, bias_init=initializers.zeros,
                        dropout_rate=0.1, deterministic=False)
    rng1, rng2 = jax.random.split(jax.random.key(0))
    rngs = {"params": rng1, "dropout": rng2}
    if not self.forms_weights:
      self.assert_refuses_weights("attention dropout", lambda: module.init_with_output(rngs, x))
      return
    y, _ = module.init_with_output(rngs, x)
    self.assertEqual(y.shape, x.shape)

  def test_multihead_self_attention_explicit_dropout(self):
    def clone(key):
      return jax.tree.map(jax.random.clone, key)

    attention_fn = self.attention_fn()

    class Foo(linen.Module):
      attention_kwargs: dict

      @linen.compact
      def __call__(self, x, dropout_rng=None):
        a = linen.MultiHeadDotProductAttention(**self.attention_kwargs)(x, x, dropout_rng=dropout_rng)
        if dropout_rng is not None:
          dropout_rng = clone(dropout_rng)
        b = linen.MultiHeadDotProductAttention(**self.attention_kwargs)(x, x, dropout_rng=dropout_rng)
        return a, b

    kwargs = dict(num_heads=8, qkv_features=16, kernel_init=initializers.ones, bias_init=initializers.zeros,
                  dropout_rate=0.5, deterministic=False)
    module = Foo(dict(kwargs, attention_fn=attention_fn))
    rng1, rng2, rng3, rng4 = jax.random.split(jax.random.key(0), 4)
    x = jnp.ones((4, 2, 3, 5))
    rngs = {"params": rng1, "dropout": rng2}
    if not self.forms_weights:
      self.assert_refuses_weights("attention dropout", lambda: module.init(rngs, x))
      return
    v = module.init(rngs, x)
    a, b = module.apply(v, x, rngs=clone(rngs))
    c, d = module.apply(v, x, rngs={"dropout": clone(rng2)})
    e, f = module.apply(v, x, rngs={"dropout": rng3})
    self.assertFalse((a == b).all())
    self.assertTrue((a == c).all())
    self.assertTrue((b == d).all())
    self.assertFalse((a == e).all())
    self.assertFalse((b == f).all())
    a, b = module.apply(v, x, rngs=clone(rngs), dropout_rng=rng4)
    self.assertTrue((a == b).all())
    a, b = module.apply(v, x, dropout_rng=clone(rng4))
    self.assertTrue((a == b).all())
    self.assertTrue(a.shape == b.shape == x.shape)
    # Same bits as flax's own dropout: equal outputs on random inputs and parameters.
    kwargs["kernel_init"] = initializers.lecun_normal()
    xr = randn(np.random.default_rng(8), (4, 2, 3, 5))
    ours, default = Foo(dict(kwargs, attention_fn=attention_fn)), Foo(kwargs)
    v = default.init(rngs, xr)
    for got, want in zip(ours.apply(v, xr, rngs={"dropout": rng3}), default.apply(v, xr, rngs={"dropout": rng3})):
      assert_close(got, want)

  def test_multihead_self_attention_w_dropout_disabled(self):
    x = jnp.ones((4, 2, 3, 5))
    kw = dict(num_heads=8, qkv_features=16, kernel_init=initializers.ones, bias_init=initializers.zeros)
    sa_module0 = self.mhdpa(**kw, dropout_rate=0.0, deterministic=True)
    rng1, rng2, rng3, rng4 = jax.random.split(jax.random.key(0), 4)
    rngs1 = {"params": rng1, "dropout": rng2}
    rngs2 = {"params": rng3, "dropout": rng4}
    y1, vs = sa_module0.init_with_output(rngs1, x)
    y2, _ = sa_module0.init_with_output(rngs2, x)
    np.testing.assert_allclose(y1, y2)
    y3 = sa_module0.apply(vs, x, rngs=rngs1)
    y4 = sa_module0.apply(vs, x, rngs=rngs2)
    np.testing.assert_allclose(y3, y4)
    sa_module1 = self.mhdpa(**kw, dropout_rate=0.0)
    y5 = sa_module1.apply(vs, x, deterministic=True, rngs=rngs1)
    y6 = sa_module1.apply(vs, x, deterministic=True, rngs=rngs2)
    np.testing.assert_allclose(y5, y6)
    sa_module2 = self.mhdpa(**kw, dropout_rate=0.5)
    y7 = sa_module2.apply(vs, x, deterministic=True, rngs=rngs1)
    y8 = sa_module2.apply(vs, x, deterministic=True, rngs=rngs2)
    np.testing.assert_allclose(y7, y8)

  @parameterized.parameters([((5,), (1,)), ((6, 5), (2,))])
  def test_decoding(self, spatial_shape, attn_dims):
    check_decoding(self.attention_fn(), spatial_shape, attn_dims)

  def test_autoregresive_receptive_field_1d(self):
    rng1, rng2 = jax.random.split(jax.random.key(0), num=2)
    length, dim, num_heads = 10, 1, 1
    input_shape = (1, length, dim)
    inputs = jax.random.normal(rng2, input_shape)
    module = self.mhdpa(num_heads=num_heads, kernel_init=jax.nn.initializers.ones, deterministic=False)
    initial_vars = module.init(rng1, inputs)
    causal_mask = linen.attention.make_causal_mask(jnp.ones(input_shape[:-1]))

    def model_loss(inputs, pos):
      out = module.apply(initial_vars, inputs, mask=causal_mask)
      assert out.shape == input_shape
      assert len(out.shape) == 3
      return out[0, pos, :].sum()

    grad_fn = jax.jit(jax.grad(model_loss))

    def get_receptive_field_1d(pos):
      g = grad_fn(inputs, pos)[0, :, :]
      return jnp.any((jnp.abs(g) > 1e-5).astype(jnp.uint32), axis=-1)

    for i in range(length):
      deps = get_receptive_field_1d(i)
      assert (deps[:i] == 1).all(), "Receptive Field Error: Some of the previous positions are not reachable."
      if i != length - 1:
        assert (deps[i + 1:] == 0).all(), "Receptive Field Error: Some of the future positions are reachable."

  def test_multihead_kv_args(self):
    key1, key2 = jax.random.split(jax.random.key(0), 2)
    query = jax.random.uniform(key1, (3, 5))       # no batch dim: rank-3 q/k/v reach the attention_fn
    key_value = jax.random.uniform(key2, (9, 5))
    module = self.mhdpa(num_heads=8, qkv_features=16, kernel_init=initializers.ones, bias_init=initializers.zeros,
                        deterministic=False)
    key = lambda: jax.random.key(43279)
    y0, v0 = module.init_with_output(key(), query, inputs_k=key_value, inputs_v=key_value)
    y1, v1 = module.init_with_output(key(), query, inputs_k=key_value)
    with self.assertWarnsRegex(DeprecationWarning, "The inputs_kv arg will be deprecated soon."):
      y2, v2 = module.init_with_output(key(), query, inputs_kv=key_value)
    self.assertTrue((y0 == y1).all() and (y1 == y2).all())
    self.assertTrue(jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda x, y, z: (x == y).all() and (y == z).all(), v0, v1, v2)))
    with self.assertRaisesRegex(ValueError, "`inputs_k` cannot be None if `inputs_v` is not None."):
      module.init_with_output(key(), query, inputs_v=key_value)
    exclusive = "If either `inputs_k` or `inputs_v` is not None, `inputs_kv` must be None."
    with self.assertRaisesRegex(ValueError, exclusive):
      module.init_with_output(key(), query, inputs_kv=key_value, inputs_v=key_value)
    with self.assertRaisesRegex(ValueError, exclusive):
      module.init_with_output(key(), query, key_value, key_value, inputs_kv=key_value)

  def test_multihead_sow_attention_weights(self):
    x = jnp.ones((4, 6, 5))
    attention_fn = self.attention_fn()

    class Model(linen.Module):
      attention_kwargs: dict

      @linen.compact
      def __call__(self, x, sow_weights=False):
        x = linen.MultiHeadDotProductAttention(**self.attention_kwargs)(x, sow_weights=sow_weights)
        x = linen.MultiHeadDotProductAttention(**self.attention_kwargs)(x)
        x = linen.MultiHeadDotProductAttention(**self.attention_kwargs)(x, sow_weights=sow_weights)
        return x

    module = Model(dict(num_heads=8, qkv_features=16, kernel_init=initializers.ones, bias_init=initializers.zeros,
                        deterministic=False, attention_fn=attention_fn))
    v = module.init(jax.random.key(0), x)
    if not self.forms_weights:
      self.assert_refuses_weights("sow_weights", lambda: module.apply(v, x, mutable=["intermediates"],
                                                                      sow_weights=True))
      return
    _, intermediates = module.apply(v, x, mutable=["intermediates"], sow_weights=True)
    inter = intermediates["intermediates"]
    self.assertEqual(inter["MultiHeadDotProductAttention_0"]["attention_weights"][0].shape, (4, 8, 6, 6))
    self.assertNotIn("MultiHeadDotProductAttention_1", inter)
    self.assertEqual(inter["MultiHeadDotProductAttention_2"]["attention_weights"][0].shape, (4, 8, 6, 6))
    _, intermediates = module.apply(v, x, mutable=["intermediates"], sow_weights=False)
    self.assertNotIn("intermediates", intermediates)

  def test_autoregressive_decode_with_x64(self):
    with enable_x64():
      x = jnp.ones((1, 4, 4))
      module = self.mhdpa(num_heads=2, qkv_features=4, decode=True)
      if self.IMPL == "pallas":   # float64 stays float64 in this library; the Pallas kernels cannot, and say so
        with self.assertRaisesRegex(NotImplementedError, "float64"):
          module.init(jax.random.key(0), x, x, x)
        return
      variables = module.init(jax.random.key(0), x, x, x)
      params, cache = variables["params"], variables["cache"]
      y1, updates = module.apply({"params": params, "cache": cache}, x[:, :1, :], mutable=["cache"])
      y2, updates = module.apply({"params": params, "cache": updates["cache"]}, x[:, 1:2, :], mutable=["cache"])
      assert y1.shape == (1, 1, 4)
      assert y2.shape == (1, 1, 4)

  def test_attention_alias_equivalence(self):
    key1, key2 = jax.random.split(jax.random.key(0), 2)
    query = jax.random.uniform(key1, (3, 5))
    key_value = jax.random.uniform(key2, (9, 5))
    kw = dict(num_heads=8, qkv_features=16, kernel_init=initializers.lecun_normal(),
              bias_init=initializers.uniform(), deterministic=False, attention_fn=self.attention_fn())
    module1 = linen.MultiHeadDotProductAttention(**kw)
    module2 = linen.MultiHeadAttention(**kw)
    key = lambda: jax.random.key(43279)
    out1, v1 = module1.init_with_output(key(), query, key_value)
    out2, v2 = module2.init_with_output(key(), query, key_value, key_value)
    self.assertTrue((out1 == out2).all())
    self.assertTrue(jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: (x == y).all(), v1, v2)))
    del kw["attention_fn"]
    assert_close(out1, linen.MultiHeadDotProductAttention(**kw).apply(v1, query, key_value))

  @parameterized.parameters(
      {"force_fp32": True, "attn_weights_dtype": jnp.float32},
      {"force_fp32": False, "attn_weights_dtype": jnp.bfloat16},
  )
  def test_mixed_precision_multihead_attention(self, force_fp32, attn_weights_dtype):
    input_key, params_key, dropout_key = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(input_key, (2, 4))
    kw = dict(num_heads=2, qkv_features=4, kernel_init=initializers.lecun_normal(), bias_init=initializers.uniform(),
              force_fp32_for_softmax=force_fp32, deterministic=False, dtype=jnp.bfloat16)
    mha = self.mhdpa(**kw)
    init_vars = mha.init({"params": params_key, "dropout": dropout_key}, x)
    if not self.forms_weights:
      self.assert_refuses_weights("sow_weights", lambda: mha.apply(init_vars, x, mutable=["intermediates"],
                                                                   sow_weights=True))
      return
    y, updated_vars = mha.apply(init_vars, x, mutable=["intermediates"], sow_weights=True)
    weights = updated_vars["intermediates"]["attention_weights"][0]
    self.assertEqual(weights.dtype, attn_weights_dtype)
    want_y, want = linen.MultiHeadDotProductAttention(**kw).apply(init_vars, x, mutable=["intermediates"],
                                                                  sow_weights=True)
    self.assertEqual(want["intermediates"]["attention_weights"][0].dtype, attn_weights_dtype)
    assert_close(weights, want["intermediates"]["attention_weights"][0], jnp.bfloat16)
    assert_close(y, want_y, jnp.bfloat16)

  @parameterized.parameters((lax.Precision.DEFAULT, None), (None, jax.lax.dot_general))
  def test_custom_einsums_refused(self, precision, einsum_dot_general):
    # Upstream checks flax's own argument validation (precision / einsum_dot_general vs custom einsums). Custom
    # einsum modules (AQT quantization hooks) have no meaning for these kernels: refused whatever the precision.
    del einsum_dot_general
    einsum_cls = lambda: jnp.einsum
    x = jnp.ones((1, 4, 2))
    with self.assertRaisesRegex(ValueError, "custom einsum"):
      self.attention_fn()(x[:, :, None], x[:, :, None], x[:, :, None], precision=precision,
                          qk_attn_weights_einsum=einsum_cls, attn_weights_value_einsum=einsum_cls)

  def test_padding_mask_array(self):
    """A padding mask passed as a float array of the caller's batch dims, cross attention, qkv_features != in."""
    r = np.random.default_rng(9)
    q, kv = randn(r, (2, 3, 6, 8)), randn(r, (2, 3, 10, 12))
    kv_valid = jnp.asarray(r.random((2, 3, 10)) > 0.4).at[..., 0].set(True)
    mask = linen.make_attention_mask(jnp.ones((2, 3, 6)), kv_valid)
    kw = dict(num_heads=4, qkv_features=16, out_features=8)
    variables = self.mhdpa(**kw).init(jax.random.key(0), q, kv, mask=mask)
    assert_close(self.mhdpa(**kw).apply(variables, q, kv, mask=mask),
                 linen.MultiHeadDotProductAttention(**kw).apply(variables, q, kv, mask=mask))


class LinenReferenceTest(LinenSuite):
  __test__ = True
  IMPL = "reference"


@pytest.mark.slow   # CI runs "xla" through the nnx suite
class LinenXlaTest(LinenSuite):
  __test__ = True
  IMPL = "xla"


class LinenBlockwiseTest(LinenSuite):
  __test__ = True
  IMPL = "blockwise"


@pytest.mark.slow
class LinenPallasTest(LinenSuite):
  __test__ = True
  IMPL = "pallas"


class FlaxPallasTest(parameterized.TestCase):
  """CI representatives for the Pallas kernel behind flax layers: causal and padding masks passed as arrays
  (nnx.make_causal_mask / make_attention_mask, float), decoding with a cache, GQA."""

  @parameterized.parameters("causal", "padding")
  def test_nnx_mask_arrays(self, kind):
    r = np.random.default_rng(10)
    kw = dict(num_heads=4, in_features=16, num_kv_heads=2, decode=False)
    ref = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
    ours = nnx.MultiHeadAttention(**kw, attention_fn=aj.nn.make_attention_fn("pallas"), rngs=nnx.Rngs(0))
    copy_nnx_params(ref, ours)
    x = randn(r, (2, 40, 16))
    if kind == "causal":
      mask = nnx.make_causal_mask(jnp.ones((2, 40)))
    else:
      mask = nnx.make_attention_mask(jnp.ones((2, 40)), jnp.arange(40)[None, :] < jnp.array([[40], [17]]))
    assert_close(ours(x, mask=mask), ref(x, mask=mask))
    grads = nnx.grad(lambda m: (m(x, mask=mask) ** 2).sum())(ours)
    want = nnx.grad(lambda m: (m(x, mask=mask) ** 2).sum())(ref)
    chex.assert_trees_all_close(grads, want, atol=1e-4, rtol=1e-4)

  def test_linen_decoding(self):
    check_decoding(aj.nn.make_attention_fn("pallas"), (5,), (1,))
