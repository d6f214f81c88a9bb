"""dot_product_attention ("reference", "xla", "cudnn" dispatch): oracle, peer, property and error tests."""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, strategies as st
from jax.test_util import check_grads

import attention_jax as aj
from tests.helpers import assert_close, np_mask, np_softmax_attention, qkv, randn

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def enable_x64():
  return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()


def make_case(name, rng, dtype=jnp.float32):
  """Inputs for one option combination: (q, k, v, kwargs for dot_product_attention, NumPy oracle kwargs)."""
  B, T, S, N, K, H = 2, 7, 9, 4, 2, 16
  if name in ("causal_t_gt_s", "window_t_gt_s"):
    T, S = 11, 5
  if name == "mqa":
    K = 1
  q, k, v = qkv(rng, B, T, S, N, K, H, dtype)
  kw, mk, extra = {}, {}, {}
  if name in ("causal", "causal_t_gt_s", "everything"):
    kw["is_causal"] = mk["causal"] = True
  if name in ("window", "window_t_gt_s", "everything"):
    kw["local_window_size"] = mk["window"] = (2, 1)
  if name == "window_int":
    kw["local_window_size"] = mk["window"] = 1
  if name in ("lengths", "everything"):
    kw["query_seq_lengths"] = mk["q_lengths"] = jnp.array([5, T], jnp.int32)
    kw["key_value_seq_lengths"] = mk["kv_lengths"] = jnp.array([S, 4], jnp.int32)
  if name == "kv_lengths":
    kw["key_value_seq_lengths"] = mk["kv_lengths"] = jnp.array([3, 8], jnp.int32)
  if name in ("mask", "everything"):
    m = rng.random((B, N, T, S)) > 0.4
    m[..., 0] = True   # keep every row non-empty so jax.nn (which averages fully-masked rows) is comparable
    kw["mask"] = mk["mask"] = jnp.asarray(m)
  if name in ("bias", "everything"):
    kw["bias"] = extra["bias"] = randn(rng, (1, N, T, S))
  if name in ("segments", "everything"):
    q_seg = np.sort(rng.integers(0, 3, (B, T)), axis=1)
    kv_seg = np.sort(rng.integers(0, 3, (B, S)), axis=1)
    kw["q_segment_ids"], kw["kv_segment_ids"] = jnp.asarray(q_seg), jnp.asarray(kv_seg)
    mk["q_seg"], mk["kv_seg"] = q_seg, kv_seg
  if name in ("soft_cap", "everything"):
    kw["logits_soft_cap"] = extra["soft_cap"] = 1.5
  if name in ("scale", "soft_cap"):
    kw["scale"] = extra["scale"] = 0.9
  mask = np_mask(B, N, T, S, **mk) if mk else None
  return q, k, v, kw, dict(mask=mask, **extra)


CASES = ("plain", "causal", "causal_t_gt_s", "window", "window_int", "window_t_gt_s", "lengths", "kv_lengths",
         "mask", "bias", "segments", "soft_cap", "scale", "mqa", "everything")
# Options jax.nn.dot_product_attention shares with us.
JAX_NN_CASES = ("plain", "causal", "causal_t_gt_s", "window", "window_int", "window_t_gt_s", "lengths",
                "kv_lengths", "mask", "bias", "scale", "mqa")


class OracleTest(parameterized.TestCase):
  """Against the float64 NumPy oracle in tests/helpers.py."""

  @parameterized.product(case=CASES, implementation=("reference", "xla"))
  def test_forward_and_residual(self, case, implementation):
    q, k, v, kw, oracle = make_case(case, np.random.default_rng(hash(case) % 2**32))
    if implementation == "xla" and "logits_soft_cap" in kw:
      with self.assertRaisesRegex(ValueError, "logits_soft_cap"):
        aj.dot_product_attention(q, k, v, implementation="xla", **kw)
      return
    out, lse = aj.dot_product_attention(q, k, v, implementation=implementation, return_residual=True, **kw)
    want_out, want_lse = np_softmax_attention(q, k, v, **oracle)
    assert_close(out, want_out)
    self.assertEqual(lse.dtype, jnp.float32)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    finite = np.isfinite(want_lse)
    assert_close(np.asarray(lse)[finite], want_lse[finite])

  @parameterized.product(case=("plain", "causal_t_gt_s", "everything", "mqa"), dtype=(jnp.bfloat16, jnp.float16),
                         implementation=("reference", "xla"))
  def test_low_precision(self, case, dtype, implementation):
    q, k, v, kw, oracle = make_case(case, np.random.default_rng(7), dtype)
    if implementation == "xla":
      kw.pop("logits_soft_cap", None)
      oracle.pop("soft_cap", None)
    out = aj.dot_product_attention(q, k, v, implementation=implementation, **kw)
    self.assertEqual(out.dtype, dtype)
    assert_close(out, np_softmax_attention(q, k, v, **oracle)[0], dtype)


class PeerTest(parameterized.TestCase):
  """Our reference against jax.nn.dot_product_attention on every option jax.nn shares."""

  @parameterized.parameters(*JAX_NN_CASES)
  def test_matches_jax_nn(self, case):
    q, k, v, kw, oracle = make_case(case, np.random.default_rng(11))
    ours = aj.dot_product_attention(q, k, v, implementation="reference", **kw)
    theirs = jax.nn.dot_product_attention(q, k, v, **kw)
    # jax.nn averages the values on rows with no visible key (we return zeros): compare rows that see a key.
    mask = oracle["mask"]
    has_key = np.ones(q.shape[:3], bool) if mask is None else np.transpose(mask.any(-1), (0, 2, 1))
    self.assertGreater(has_key.mean(), 0.5)
    assert_close(np.asarray(ours)[has_key], np.asarray(theirs)[has_key])
    np.testing.assert_array_equal(np.asarray(ours)[~has_key], 0.0)

  @parameterized.parameters("plain", "causal", "lengths", "mask", "mqa")
  def test_gradients_match_jax_nn(self, case):
    q, k, v, kw, _ = make_case(case, np.random.default_rng(12))
    ct = randn(np.random.default_rng(13), q.shape)
    loss = lambda f: lambda q, k, v: (f(q, k, v) * ct).sum()
    ours = jax.grad(loss(lambda q, k, v: aj.dot_product_attention(q, k, v, implementation="reference", **kw)),
                    argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs):
      assert_close(a, b, kind="grad")


class SemanticsTest(parameterized.TestCase):

  @parameterized.product(implementation=("reference", "xla"), dtype=DTYPES)
  def test_fully_masked_rows_are_zero_with_finite_grads(self, implementation, dtype):
    r = np.random.default_rng(3)
    q, k, v = qkv(r, B=2, T=6, S=5, dtype=dtype)
    mask = np.ones((2, 4, 6, 5), bool)
    mask[0, :, 2] = False          # user mask hides every key of row 2 (batch 0, all heads)
    mask[1, 1, 4] = False          # one head of one row
    lengths = jnp.array([5, 0], jnp.int32)   # batch 1: no key at all
    kw = dict(mask=jnp.asarray(mask), local_window_size=(0, 1), implementation=implementation)

    def f(q, k, v):
      return aj.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, return_residual=True, **kw)

    (out, lse) = f(q, k, v)
    out32 = np.asarray(out.astype(jnp.float32))
    np.testing.assert_array_equal(out32[0, 2], 0.0)
    np.testing.assert_array_equal(out32[1], 0.0)
    np.testing.assert_array_equal(out32[0, 5], 0.0)  # window (0, 1) at row 5 wants keys 5..6; S=5
    grads = jax.grad(lambda q, k, v: f(q, k, v)[0].astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(np.asarray(grads[0].astype(jnp.float32))[0, 2], 0.0)
    self.assertTrue(np.isneginf(lse[0, :, 2]).all() and np.isneginf(lse[1]).all())
    self.assertTrue(np.isfinite(lse[0, :, :2]).all())

  @parameterized.product(implementation=("reference", "xla"), dtype=(jnp.bfloat16, jnp.float16))
  def test_large_logits_stay_finite(self, implementation, dtype):
    q, k, v = qkv(np.random.default_rng(4), dtype=dtype, scale=1.0)
    q, k = q * 100, k * 100     # logits ~ 1e4 / sqrt(H): far beyond exp's range without max-subtraction
    f = lambda q, k, v: aj.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    out = f(q, k, v)
    self.assertEqual(out.dtype, dtype)
    chex.assert_tree_all_finite(out)
    chex.assert_tree_all_finite(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v))

  @parameterized.parameters("reference", "xla")
  def test_float32_accumulation_for_bf16(self, implementation):
    # Equal logits over S=4096 keys: the output is the mean of the values; bf16 accumulation would miss it by
    # many bf16 ulps, float32 accumulation only by the final rounding.
    r = np.random.default_rng(5)
    q = jnp.zeros((1, 1, 1, 8), jnp.bfloat16)
    k, v = randn(r, (1, 4096, 1, 8), jnp.bfloat16), randn(r, (1, 4096, 1, 8), jnp.bfloat16)
    out = aj.dot_product_attention(q, k, v, implementation=implementation)
    want = np.float64(v.astype(jnp.float32)).mean(1)
    np.testing.assert_allclose(np.float64(out.astype(jnp.float32))[:, 0], want, rtol=1e-2, atol=3e-4)

  @parameterized.product(implementation=("reference", "xla"), dtype=DTYPES)
  def test_output_dtype(self, implementation, dtype):
    q, k, v = qkv(np.random.default_rng(6), dtype=dtype)
    out, lse = aj.dot_product_attention(q, k, v, implementation=implementation, return_residual=True)
    self.assertEqual(out.dtype, dtype)
    self.assertEqual(lse.dtype, jnp.float32)
    chex.assert_shape(lse, (2, 4, 7))

  @parameterized.product(implementation=("reference", "xla"), t_s=((6, 6), (6, 9), (9, 4)))
  def test_causality_by_gradients(self, implementation, t_s):
    T, S = t_s
    q, k, v = qkv(np.random.default_rng(8), T=T, S=S)
    for i in range(T):
      gk, gv = jax.grad(lambda k, v: aj.dot_product_attention(
          q, k, v, is_causal=True, implementation=implementation)[:, i].sum(), argnums=(0, 1))(k, v)
      np.testing.assert_array_equal(np.asarray(gk)[:, i + 1:], 0.0)
      np.testing.assert_array_equal(np.asarray(gv)[:, i + 1:], 0.0)
      self.assertTrue(np.all(np.abs(np.asarray(gv)[:, :min(i + 1, S)]).sum(axis=(2, 3)) > 0))

  def test_check_grads_reference_float64(self):
    with enable_x64():
      q, k, v = qkv(np.random.default_rng(9), T=5, S=6, dtype=jnp.float64)
      mask = jnp.asarray(np.random.default_rng(10).random((2, 1, 5, 6)) > 0.3)
      bias = randn(np.random.default_rng(11), (2, 4, 5, 6), jnp.float64)
      for kw in (dict(), dict(is_causal=True, mask=mask, bias=bias),
                 dict(logits_soft_cap=2.0, local_window_size=(1, 2), key_value_seq_lengths=jnp.array([4, 6]))):
        f = lambda q, k, v: aj.dot_product_attention(q, k, v, implementation="reference", **kw)
        self.assertEqual(f(q, k, v).dtype, jnp.float64)
        check_grads(f, (q, k, v), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)

  @parameterized.parameters("reference", "xla")
  def test_residual_is_logsumexp_without_gradient(self, implementation):
    q, k, v = qkv(np.random.default_rng(12))
    g = jax.grad(lambda q: aj.dot_product_attention(q, k, v, implementation=implementation,
                                                    return_residual=True)[1].sum())(q)
    np.testing.assert_array_equal(g, 0.0)


@given(B=st.integers(1, 2), T=st.integers(1, 9), S=st.integers(1, 9), extra=st.integers(1, 6),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), causal=st.booleans(),
       implementation=st.sampled_from(["reference", "xla"]), via=st.sampled_from(["lengths", "mask"]),
       seed=st.integers(0, 2**16))
def test_padding_invariance(B, T, S, extra, heads, causal, implementation, via, seed):
  """Appending masked (padding) keys changes nothing, forward or backward."""
  N, K = heads
  r = np.random.default_rng(seed)
  q, k, v = qkv(r, B, T, S, N, K, H=8)
  k_pad = jnp.concatenate([k, randn(r, (B, extra, K, 8), scale=10.0)], axis=1)
  v_pad = jnp.concatenate([v, randn(r, (B, extra, K, 8), scale=10.0)], axis=1)
  if via == "lengths":
    pad_kw = dict(key_value_seq_lengths=jnp.full((B,), S, jnp.int32))
  else:
    pad_kw = dict(mask=jnp.asarray(np.arange(S + extra) < S)[None, None, None, :])

  base = lambda q, k, v: aj.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  padded = lambda q, k, v: aj.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation,
                                                    **pad_kw)
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2)))
  assert_close(padded(q, k_pad, v_pad), base(q, k, v))
  _, g_base = value_and_grad(base)(q, k, v)
  _, g_pad = value_and_grad(padded)(q, k_pad, v_pad)
  assert_close(g_pad[0], g_base[0], kind="grad")
  assert_close(g_pad[1][:, :S], g_base[1], kind="grad")
  assert_close(g_pad[2][:, :S], g_base[2], kind="grad")
  np.testing.assert_array_equal(g_pad[1][:, S:], 0.0)
  np.testing.assert_array_equal(g_pad[2][:, S:], 0.0)


class TransformsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit(self):
    q, k, v, kw, oracle = make_case("everything", np.random.default_rng(14))
    kw.pop("logits_soft_cap")
    oracle.pop("soft_cap")
    want = np_softmax_attention(q, k, v, **oracle)[0]
    arrays = {n: x for n, x in kw.items() if isinstance(x, jax.Array)}
    static = {n: x for n, x in kw.items() if n not in arrays}
    for implementation in ("reference", "xla", None, "auto"):
      f = self.variant(lambda q, k, v, arrays: aj.dot_product_attention(
          q, k, v, implementation=implementation, **arrays, **static))
      assert_close(f(q, k, v, arrays), want)
    f = self.variant(lambda q, k, v: aj.reference_attention(q, k, v, return_weights=True))
    out, weights = f(q, k, v)
    chex.assert_shape(weights, (2, 4, 7, 9))
    assert_close(weights.sum(-1), np.ones((2, 4, 7)))

  def test_vmap_extra_batch_axis(self):
    r = np.random.default_rng(15)
    q, k, v = (randn(r, (3,) + s) for s in ((2, 5, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)))
    lengths = jnp.array([[6, 2], [1, 6], [3, 3]], jnp.int32)
    for implementation in ("reference", "xla"):
      f = lambda q, k, v, l: aj.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=l,
                                                      implementation=implementation)
      batched = jax.jit(jax.vmap(f))(q, k, v, lengths)
      for i in range(3):
        assert_close(batched[i], f(q[i], k[i], v[i], lengths[i]))
      gb = jax.jit(jax.vmap(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))))(q, k, v, lengths)
      g1 = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q[1], k[1], v[1], lengths[1])
      for a, b in zip(gb, g1):
        assert_close(a[1], b, kind="grad")


class ErrorsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.q, self.k, self.v = qkv(np.random.default_rng(16), B=2, T=3, S=5, N=4, K=2, H=8)

  def test_rank(self):
    with self.assertRaisesRegex(ValueError, r"rank 4.*query.shape=\(3, 4, 8\)"):
      aj.dot_product_attention(self.q[0], self.k[0], self.v[0])

  def test_mismatches(self):
    q, k, v = self.q, self.k, self.v
    with self.assertRaisesRegex(ValueError, r"batch.*query.shape=\(1, 3, 4, 8\)"):
      aj.dot_product_attention(q[:1], k, v)
    with self.assertRaisesRegex(ValueError, r"key and value.*value.shape=\(2, 4, 2, 8\)"):
      aj.dot_product_attention(q, k, v[:, :4])
    with self.assertRaisesRegex(ValueError, r"head dims.*query.shape=\(2, 3, 4, 4\)"):
      aj.dot_product_attention(q[..., :4], k, v)
    with self.assertRaisesRegex(ValueError, r"N=4.*K=3"):
      aj.dot_product_attention(q, jnp.zeros((2, 5, 3, 8)), jnp.zeros((2, 5, 3, 8)))
    with self.assertRaisesRegex(ValueError, "dtype"):
      aj.dot_product_attention(q.astype(jnp.bfloat16), k, v)

  def test_masks_and_options(self):
    q, k, v = self.q, self.k, self.v
    with self.assertRaisesRegex(ValueError, r"mask of shape \(2, 4, 3, 4\) does not broadcast.*\(2, 4, 3, 5\)"):
      aj.dot_product_attention(q, k, v, mask=jnp.ones((2, 4, 3, 4), bool))
    with self.assertRaisesRegex(ValueError, r"mask of shape \(2, 2, 3, 5\)"):   # kv heads are not query heads
      aj.dot_product_attention(q, k, v, mask=jnp.ones((2, 2, 3, 5), bool))
    with self.assertRaisesRegex(ValueError, "boolean"):
      aj.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 3, 5)))
    with self.assertRaisesRegex(ValueError, r"bias of shape \(3, 5\)"):
      aj.dot_product_attention(q, k, v, bias=jnp.ones((3, 5)))
    with self.assertRaisesRegex(ValueError, r"key_value_seq_lengths.*shape=\(3,\)"):
      aj.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.ones((3,), jnp.int32))
    with self.assertRaisesRegex(ValueError, r"kv_segment_ids.*\(2, 5\).*shape=\(2, 3\)"):
      aj.dot_product_attention(q, k, v, q_segment_ids=jnp.zeros((2, 3), jnp.int32),
                               kv_segment_ids=jnp.zeros((2, 3), jnp.int32))
    with self.assertRaisesRegex(ValueError, "T != S"):
      aj.dot_product_attention(q, k, v, q_segment_ids=jnp.zeros((2, 3), jnp.int32))
    with self.assertRaisesRegex(ValueError, "window"):
      aj.dot_product_attention(q, k, v, local_window_size=(1, 2, 3))
    with self.assertRaisesRegex(ValueError, "soft_cap"):
      aj.dot_product_attention(q, k, v, logits_soft_cap=-1.0)

  def test_implementations(self):
    q, k, v = self.q, self.k, self.v
    with self.assertRaisesRegex(ValueError, r"unknown implementation='flash'.*'reference'"):
      aj.dot_product_attention(q, k, v, implementation="flash")
    if jax.default_backend() != "gpu":
      with self.assertRaisesRegex(ValueError, "cudnn.*GPU"):
        aj.dot_product_attention(q, k, v, implementation="cudnn")

  def test_errors_under_jit(self):
    f = jax.jit(lambda q, k, v: aj.dot_product_attention(q, k, v, mask=jnp.ones((2, 4, 3, 4), bool)))
    with self.assertRaisesRegex(ValueError, "does not broadcast"):
      f(self.q, self.k, self.v)
