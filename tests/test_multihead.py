"""Functional multi-head attention: NumPy oracle, flax equivalence, GQA, cross-attention, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

import attention_jax as aj
from tests.helpers import assert_close, enable_x64, np_mask, np_softmax_attention, randn


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




_RNG = jax.random.key(0)
_P = aj.init_multi_head(jax.random.key(5), 16, 4, 2)             # query [16, 4, 4], key/value [16, 2, 4]
_X = np.ones((2, 5, 16), np.float32)


def _mha(params=_P, x_q=_X, x_kv=None, **kw):
  kw = {"num_heads": 4, "num_kv_heads": 2, **kw}
  return lambda: aj.multi_head_attention(params, x_q, x_kv, **kw)


def _replace(name, leaf, value):
  return {**_P, name: {**_P[name], leaf: value}}


# (callable, args, expected exception, message regex)
BAD_INPUT = [
    (aj.init_multi_head, (_RNG, 10, 4), ValueError, r"d_model=10 must be divisible by num_heads=4"),
    (aj.init_multi_head, (_RNG, 16, 4, 3), ValueError, r"num_heads=4 must be a multiple of num_kv_heads=3"),
    (aj.init_multi_head, (_RNG, 0, 4), ValueError, r"d_model must be a positive int.*d_model=0"),
    (aj.init_multi_head, (_RNG, 16, 0), ValueError, r"num_heads must be a positive int.*num_heads=0"),
    (aj.init_multi_head, (_RNG, 16, -4), ValueError, r"num_heads=-4"),
    (aj.init_multi_head, (_RNG, 16, 4, 0), ValueError, r"num_kv_heads must be a positive int.*num_kv_heads=0"),
    (aj.init_multi_head, (_RNG, 16, 4, -2), ValueError, r"num_kv_heads=-2"),
    (aj.init_multi_head, (_RNG, 16, 4, 2, 0), ValueError, r"d_kv must be a positive int.*d_kv=0"),
    (lambda: aj.init_multi_head(_RNG, 16, 4, head_dim=0), (), ValueError,
     r"head_dim must be a positive int.*head_dim=0"),
    (lambda: aj.init_multi_head(_RNG, 10, 4, head_dim=-1), (), ValueError, r"head_dim=-1"),
    (aj.init_multi_head, (_RNG, 16.0, 4), ValueError, r"d_model must be a positive int.*d_model=16\.0"),
    (aj.init_multi_head, (_RNG, 16, 2.0), ValueError, r"num_heads.*num_heads=2\.0"),
    (aj.init_multi_head, (_RNG, 16, True), ValueError, r"num_heads.*bool.*num_heads=True"),
    (lambda: aj.init_multi_head(_RNG, 16, 4, dtype=jnp.int32), (), TypeError, r"dtype must be a real floating"),
    (_mha(x_q=_X[0]), (), ValueError, r"x_q must be \[B, T, D\].*x_q.shape=\(5, 16\)"),
    (_mha(x_q=_X[None]), (), ValueError, r"x_q.shape=\(1, 2, 5, 16\)"),
    (_mha(x_kv=np.ones((2, 16), np.float32)), (), ValueError, r"x_kv.shape=\(2, 16\)"),
    (_mha(x_kv=np.ones((3, 7, 16), np.float32)), (), ValueError,
     r"same batch size.*x_q.shape=\(2, 5, 16\) x_kv.shape=\(3, 7, 16\)"),
    (_mha(x_q=np.ones((2, 5, 12), np.float32)), (), ValueError,
     r"params\['query'\]\['kernel'\] has shape \(16, 4, 4\); expected \(12, 4, H\).*x_q.shape=\(2, 5, 12\)"),
    (_mha(x_kv=np.ones((2, 7, 10), np.float32)), (), ValueError,
     r"params\['key'\]\['kernel'\] has shape \(16, 2, 4\); expected \(10, 2, 4\).*x_kv.shape=\(2, 7, 10\)"),
    (_mha(num_kv_heads=None), (), ValueError, r"params\['key'\]\['kernel'\] has shape \(16, 2, 4\)"),
    (_mha(num_heads=8), (), ValueError, r"params\['query'\]\['kernel'\].*expected \(16, 8, H\)"),
    (_mha(num_kv_heads=3), (), ValueError, r"num_heads=4 must be a multiple of num_kv_heads=3"),
    (_mha(num_heads=0), (), ValueError, r"num_heads must be a positive int"),
    (_mha(num_kv_heads=-1), (), ValueError, r"num_kv_heads=-1"),
    (_mha(num_heads=4.0), (), ValueError, r"num_heads=4\.0"),
    (_mha(x_q=np.ones((2, 5, 16), np.int32)), (), TypeError, r"x_q must be a real floating.*dtype=int32"),
    (_mha(x_kv=np.ones((2, 5, 16), bool)), (), TypeError, r"x_kv must be a real floating.*dtype=bool"),
    (_mha(x_q=np.ones((2, 5, 16), np.complex64)), (), TypeError, r"x_q.*complex64"),
    (_mha(params=_replace("query", "kernel", np.ones((16, 4, 4), np.int32))), (), TypeError,
     r"params\['query'\]\['kernel'\].*int32"),
    (_mha(params=_replace("value", "kernel", np.ones((16, 2), np.float32))), (), ValueError,
     r"params\['value'\]\['kernel'\] has shape \(16, 2\); expected \(16, 2, Hv\)"),
    (_mha(params=_replace("out", "kernel", np.ones((4, 4), np.float32))), (), ValueError,
     r"params\['out'\]\['kernel'\] has shape \(4, 4\); expected \(4, 4, D_out\)"),
    (_mha(params=_replace("out", "kernel", np.ones((4, 3, 16), np.float32))), (), ValueError,
     r"params\['out'\]\['kernel'\] has shape \(4, 3, 16\)"),
    (_mha(params=_replace("key", "bias", np.ones((4, 4), np.float32))), (), ValueError,
     r"params\['key'\]\['bias'\] has shape \(4, 4\); expected \(2, 4\)"),
    (_mha(params=_replace("out", "bias", np.ones((15,), np.float32))), (), ValueError,
     r"params\['out'\]\['bias'\] has shape \(15,\); expected \(16,\)"),
    (_mha(params={k: v for k, v in _P.items() if k != "value"}), (), ValueError, r"params must be.*'value'"),
    (_mha(params=[1, 2]), (), ValueError, r"params must be.*list"),
]


@pytest.mark.parametrize("fn,args,exc,regex", BAD_INPUT, ids=[str(i) for i in range(len(BAD_INPUT))])
def test_bad_input_table(fn, args, exc, regex):
  with pytest.raises(exc, match=regex):
    fn(*args)


def test_init_accepts_numpy_ints_and_float64_dtype():
  p = aj.init_multi_head(_RNG, np.int64(12), np.int32(6), np.int64(3), np.int16(5), head_dim=np.uint8(4))
  chex.assert_shape([p["query"]["kernel"], p["key"]["kernel"], p["out"]["kernel"]], [(12, 6, 4), (5, 3, 4),
                                                                                     (6, 4, 12)])
  with enable_x64():
    p64 = aj.init_multi_head(_RNG, 8, 2, dtype=jnp.float64)
  assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(p64))


@pytest.mark.parametrize("param_dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
def test_float64_computes_in_float64(param_dtype):
  """float64 inputs under x64 compute in float64, with float64 parameters or with float32 ones (promotion)."""
  r = np.random.default_rng(11)
  B, T, S, D, Dkv, N, K = 2, 6, 7, 12, 10, 4, 2
  x_q, x_kv = r.standard_normal((B, T, D)), r.standard_normal((B, S, Dkv))
  mask = r.random((B, 1, T, S)) > 0.3
  with enable_x64():
    params = randomize(aj.init_multi_head(jax.random.key(7), D, N, K, d_kv=Dkv, dtype=param_dtype), 8)
    out, weights = aj.multi_head_attention(params, jnp.asarray(x_q), jnp.asarray(x_kv), num_heads=N,
                                           num_kv_heads=K, mask=jnp.asarray(mask), return_weights=True)
    out_xla, _ = jax.jit(lambda p, a, b: aj.multi_head_attention(p, a, b, num_heads=N, num_kv_heads=K,
                                                                 is_causal=True, implementation="xla"))(
                                                                     params, x_q, x_kv)
    params_np = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  assert out.dtype == jnp.float64 and out_xla.dtype == jnp.float64
  want = np_mha(params_np, x_q, x_kv, np.broadcast_to(mask, (B, N, T, S)))
  assert_close(out, want, "float64")
  assert_close(out_xla, np_mha(params_np, x_q, x_kv, np_mask(B, N, T, S, causal=True)), "float64")
  chex.assert_shape(weights, (B, N, T, S))
  # The same computation rounded through float32 is far outside the float64 tolerance.
  p32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params_np)
  out32, _ = aj.multi_head_attention(p32, np.float32(x_q), np.float32(x_kv), num_heads=N, num_kv_heads=K,
                                     mask=jnp.asarray(mask))
  assert np.abs(np.asarray(out32, np.float64) - want).max() > 1e-9


def test_value_head_dim_may_differ():
  """Value kernel [Dkv, K, Hv] and out kernel [N, Hv, D] with Hv != H, as in MLA."""
  r = np.random.default_rng(12)
  params = randomize(aj.init_multi_head(jax.random.key(9), 16, 4, 2), 10)
  params["value"] = {"kernel": randn(r, (16, 2, 6)), "bias": randn(r, (2, 6))}
  params["out"] = {"kernel": randn(r, (4, 6, 16)), "bias": randn(r, (16,))}
  x = randn(r, (2, 5, 16))
  out, _ = aj.multi_head_attention(params, x, num_heads=4, num_kv_heads=2, is_causal=True,
                                   implementation="reference")
  # Float64 oracle with plain loops: head n uses kv head n // 2; query t sees keys s <= t.
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x64 = np.asarray(x, np.float64)
  q = np.einsum("btd,dnh->btnh", x64, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("btd,dkh->btkh", x64, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("btd,dkh->btkh", x64, p["value"]["kernel"]) + p["value"]["bias"]
  o = np.zeros((2, 5, 4, 6))
  for b in range(2):
    for n in range(4):
      for t in range(5):
        logits = np.array([q[b, t, n] @ k[b, s, n // 2] for s in range(t + 1)]) / np.sqrt(4)
        w = np.exp(logits - logits.max())
        o[b, t, n] = (w / w.sum()) @ v[b, :t + 1, n // 2]
  want = np.einsum("btnh,nhd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]
  assert_close(out, want, kind="grad")


@pytest.mark.parametrize("x_shape,kv_shape", [((0, 5, 16), None), ((2, 0, 16), None), ((2, 3, 16), (2, 0, 16))])
def test_zero_size_inputs(x_shape, kv_shape):
  params = randomize(aj.init_multi_head(jax.random.key(3), 16, 4, 2), 4)
  x_q = jnp.ones(x_shape)
  x_kv = None if kv_shape is None else jnp.ones(kv_shape)
  out, _ = aj.multi_head_attention(params, x_q, x_kv, num_heads=4, num_kv_heads=2)
  assert out.shape == x_shape and out.dtype == jnp.float32
  if kv_shape is not None:   # S = 0: no query sees a key, attention gives zeros and the output is the out bias
    np.testing.assert_allclose(out, np.broadcast_to(np.asarray(params["out"]["bias"]), x_shape), rtol=0, atol=0)
