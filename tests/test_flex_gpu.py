"""``flex_attention(implementation="pallas")``: the Triton-lowered Pallas kernels of flex_gpu.py, run in interpret
mode, against ``implementation="reference"`` (forward and every gradient, including the arrays a ``score_mod``
closes over) and a float64 NumPy oracle whose masks and biases are computed here from first principles.
``FlexTritonLoweringTest`` lowers the kernels (forward, dK/dV, dQ) to Triton IR for an abstract H100, so a change
Triton cannot lower fails without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from attention_jax import _checks, flex, mods
from attention_jax.kernels import flex_gpu
from tests.helpers import assert_close, np_softmax_attention, randn


# ----------------------------------------------------------------------------------------------------------
# Oracles: masks and biases in NumPy, from positions
# ----------------------------------------------------------------------------------------------------------


def np_pairs(T, S):
  i = np.arange(T)[:, None]
  j = np.arange(S)[None, :]
  return i, j


def np_causal(T, S):
  i, j = np_pairs(T, S)
  return (j <= i)[None, None]


def np_window(T, S, left):
  i, j = np_pairs(T, S)
  return ((j <= i) & (j >= i - left))[None, None]


def np_document(ids_BT):
  ids = np.asarray(ids_BT)
  return (ids[:, :, None] == ids[:, None, :])[:, None]


def np_alibi(slopes, T, S):
  i, j = np_pairs(T, S)
  return -np.asarray(slopes, np.float64)[None, :, None, None] * np.abs(i - j)[None, None]


def np_t5_bucket(rel, num_buckets, max_distance):
  """T5's bidirectional bucket of ``rel = kv - q``, written out with Python integers."""
  half = num_buckets // 2
  out = np.zeros(rel.shape, np.int64)
  for idx, r in np.ndenumerate(rel):
    n = -int(r)
    base = half if n < 0 else 0
    n = abs(n)
    exact = half // 2
    if n < exact:
      out[idx] = base + n
    else:
      large = exact + int(np.float32(np.log(np.float32(max(n, 1)) / np.float32(exact)) /
                                    np.float32(np.log(max_distance / exact)) * np.float32(half - exact)))
      out[idx] = base + min(large, half - 1)
  return out


def np_t5_bias(table, T, S, max_distance):
  i, j = np_pairs(T, S)
  bucket = np_t5_bucket(j - i, table.shape[0], max_distance)               # [T, S]
  return np.transpose(np.asarray(table, np.float64)[bucket], (2, 0, 1))[None]   # [1, N, T, S]


# ----------------------------------------------------------------------------------------------------------
# Running an implementation: output, logsumexp and gradients of a fixed random cotangent
# ----------------------------------------------------------------------------------------------------------


def run(impl, q, k, v, score_mod_of=None, consts=(), block_mask=None):
  """``(out, lse, (dq, dk, dv, *d consts))``; ``score_mod_of(*consts)`` builds the score mod from the arrays it
  closes over (so that they are differentiated)."""
  ct = randn(np.random.default_rng(7), q.shape[:3] + v.shape[3:], jnp.float32)

  def loss(q, k, v, *cs):
    score_mod = None if score_mod_of is None else score_mod_of(*cs)
    f, _ = flex.prepare(q, k, v, score_mod, block_mask)
    out, lse = flex.flex_core(f, impl)
    return jnp.sum(out.astype(jnp.float32) * ct), (out, lse)

  argnums = tuple(range(3 + len(consts)))
  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(q, k, v, *consts)
  return out, lse, grads


def check_against_reference(q, k, v, score_mod_of=None, consts=(), block_mask=None, *, oracle_mask=None,
                            oracle_bias=None):
  """The kernel against the reference (output, lse, every gradient) and against NumPy (output, lse)."""
  dtype = q.dtype
  out, lse, grads = run("pallas", q, k, v, score_mod_of, consts, block_mask)
  want_out, want_lse, want_grads = run("reference", q, k, v, score_mod_of, consts, block_mask)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert_close(out, want_out, dtype, err_msg="output vs reference")
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  fin = np.isfinite(np.asarray(want_lse))
  assert_close(np.where(fin, lse, 0), np.where(fin, want_lse, 0), dtype, err_msg="lse vs reference")
  for name, g, w in zip(("dq", "dk", "dv", "d_consts"), grads, want_grads):
    assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
    assert_close(g, w, dtype, kind="grad", err_msg=f"{name} vs reference")
  np_out, np_lse = np_softmax_attention(q, k, v, mask=oracle_mask, bias=oracle_bias)
  assert_close(out, np_out, dtype, err_msg="output vs NumPy")
  np_fin = np.isfinite(np_lse)
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), ~np_fin)
  assert_close(np.where(np_fin, lse, 0), np.where(np_fin, np_lse, 0), dtype, err_msg="lse vs NumPy")
  return out, lse, grads


def inputs(B=2, T=37, S=29, N=4, K=2, H=16, Hv=None, dtype=jnp.float32, seed=0):
  r = np.random.default_rng(seed)
  return (randn(r, (B, T, N, H), dtype), randn(r, (B, S, K, H), dtype), randn(r, (B, S, K, Hv or H), dtype))


# ----------------------------------------------------------------------------------------------------------
# Numerics against the reference and NumPy
# ----------------------------------------------------------------------------------------------------------


class FlexGpuTest(parameterized.TestCase):

  def test_causal_alibi_gqa_ragged(self):
    """Causal mask (partial diagonal blocks, full blocks below, empty above) and ALiBi with a gradient to the
    slopes; T != S both ragged (37, 29 with 16-blocks), GQA 4 query heads on 2 kv heads, Hv != H."""
    T, S, N = 37, 29, 4
    q, k, v = inputs(B=1, T=T, S=S, N=N, K=2, H=16, Hv=8)
    slopes = jnp.asarray(mods.alibi_slopes(N)) * 3.0
    bm = flex.create_block_mask(mods.causal(), None, None, T, S, block_size=16)
    check_against_reference(q, k, v, mods.alibi, (slopes,), bm, oracle_mask=np_causal(T, S),
                            oracle_bias=np_alibi(slopes, T, S))

  def test_document_mask_traced_per_batch_row(self):
    """Document ids that differ per batch row, traced under jit (the block mask is built inside it)."""
    B, T, N = 2, 40, 2
    q, k, v = inputs(B=B, T=T, S=T, N=N, K=1, H=16, seed=1)
    ids = jnp.asarray(np.stack([np.repeat([0, 1, 2], [10, 17, 13]), np.repeat([0, 1], [25, 15])]), jnp.int32)
    ct = randn(np.random.default_rng(3), (B, T, N, 16))

    def fn(impl):
      @jax.jit
      def go(q, k, v, ids):
        bm = flex.create_block_mask(mods.document(ids), B, None, T, T, block_size=16)
        loss = lambda q, k, v: jnp.sum(flex.flex_attention(q, k, v, None, bm, implementation=impl) * ct)
        out = flex.flex_attention(q, k, v, None, bm, implementation=impl)
        return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
      return go(q, k, v, ids)

    out, grads = fn("pallas")
    want, want_grads = fn("reference")
    assert_close(out, want)
    for g, w in zip(grads, want_grads):
      assert_close(g, w, kind="grad")
    assert_close(out, np_softmax_attention(q, k, v, mask=np_document(ids))[0])

  def test_no_mods_bfloat16(self):
    q, k, v = inputs(B=1, T=24, S=40, N=2, K=2, H=16, dtype=jnp.bfloat16, seed=2)
    bm = flex.create_block_mask(None, None, None, 24, 40, block_size=16)
    check_against_reference(q, k, v, block_mask=bm)

  def test_rows_without_keys(self):
    """A strictly causal mask hides every key from query 0 (and the kv head 1 of head 1 sees nothing at all): zeros,
    lse -inf, finite gradients; the same for the gradient of an ALiBi slope."""
    T, S, N = 20, 20, 2
    q, k, v = inputs(B=1, T=T, S=S, N=N, K=1, H=16, seed=3)

    def strict(b, n, i, j):
      return (j < i) & (n == 0)
    bm = flex.create_block_mask(strict, None, N, T, S, block_size=16)
    mask = np.zeros((1, N, T, S), bool)
    mask[:, 0] = np.tril(np.ones((T, S), bool), -1)
    slopes = jnp.asarray([0.5, 0.25])
    out, lse, grads = check_against_reference(q, k, v, mods.alibi, (slopes,), bm, oracle_mask=mask,
                                              oracle_bias=np_alibi(slopes, T, S))
    np.testing.assert_array_equal(np.asarray(out[0, 0, 0]), 0)
    np.testing.assert_array_equal(np.asarray(out[0, :, 1]), 0)
    assert np.isneginf(np.asarray(lse[0, 0, 0])) and np.isneginf(np.asarray(lse[0, 1])).all()
    for g in grads:
      assert np.isfinite(np.asarray(g)).all()

  def test_hidden_nan_never_reaches_a_query(self):
    """NaN in a query row that sees no key and in keys / values no query sees (inside partial blocks): every output
    and gradient equals the clean run's; those rows are zero, those keys get exactly zero dK / dV."""
    T = 32

    def mask(b, n, i, j):
      return (j < i) & (j < 30)
    q, k, v = inputs(B=1, T=T, S=T, N=2, K=1, H=16, seed=4)
    bm = flex.create_block_mask(mask, None, None, T, T, block_size=16)
    clean_out, _, clean_grads = run("pallas", q, k, v, block_mask=bm)
    qd, kd, vd = q.at[0, 0, 1, 3].set(jnp.nan), k.at[0, 31, 0, 3].set(jnp.inf), v.at[0, 30, 0, 5].set(jnp.nan)
    out, lse, grads = run("pallas", qd, kd, vd, block_mask=bm)
    assert_close(out, clean_out)
    np.testing.assert_array_equal(np.asarray(out[0, 0]), 0)
    for g, w in zip(grads, clean_grads):
      assert_close(g, w, kind="grad")
    np.testing.assert_array_equal(np.asarray(grads[1][0, 30:]), 0)
    np.testing.assert_array_equal(np.asarray(grads[2][0, 30:]), 0)

  # ------------------------------------------------------------------------------------------------------
  # Slow: more mods, dtypes, vmap
  # ------------------------------------------------------------------------------------------------------

  @pytest.mark.slow
  def test_sliding_window_float32(self):
    T = 48
    q, k, v = inputs(B=1, T=T, S=T, N=2, K=1, H=16, seed=5)
    bm = flex.create_block_mask(mods.causal() & mods.sliding_window((9, 0)), None, None, T, T, block_size=16)
    check_against_reference(q, k, v, block_mask=bm, oracle_mask=np_window(T, T, 9))

  @pytest.mark.slow
  def test_t5_table_gradient(self):
    """T5's relative position bias: a [buckets, N] table looked up per pair, its gradient summed over pairs."""
    T, S, N = 24, 33, 2
    q, k, v = inputs(B=1, T=T, S=S, N=N, K=1, H=16, seed=6)
    table = randn(np.random.default_rng(8), (16, N))
    bm = flex.create_block_mask(None, None, None, T, S, block_size=16)
    of = lambda t: mods.relative_position_bias(t, max_distance=32)
    check_against_reference(q, k, v, of, (table,), bm, oracle_bias=np_t5_bias(table, T, S, 32))

  @pytest.mark.slow
  def test_bfloat16_causal_alibi(self):
    T, S, N = 37, 29, 4
    q, k, v = inputs(T=T, S=S, N=N, K=2, H=16, dtype=jnp.bfloat16, seed=9)
    slopes = jnp.asarray(mods.alibi_slopes(N))
    bm = flex.create_block_mask(mods.causal(), None, None, T, S, block_size=16)
    check_against_reference(q, k, v, mods.alibi, (slopes,), bm, oracle_mask=np_causal(T, S),
                            oracle_bias=np_alibi(slopes, T, S))

  @pytest.mark.slow
  def test_vmap_extra_axis(self):
    """jax.vmap over a leading axis (the block mask and slopes shared), forward and gradients."""
    T, N = 24, 2
    r = np.random.default_rng(10)
    q, k, v = randn(r, (2, 1, T, N, 16)), randn(r, (2, 1, T, 1, 16)), randn(r, (2, 1, T, 1, 16))
    slopes = jnp.asarray([0.3, 0.1])
    bm = flex.create_block_mask(mods.causal(), None, None, T, T, block_size=16)

    def per_example(impl):
      def loss(q, k, v, s):
        return jnp.sum(flex.flex_attention(q, k, v, mods.alibi(s), bm, implementation=impl) ** 2)
      return jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), in_axes=(0, 0, 0, None))

    (l1, g1), (l2, g2) = per_example("pallas")(q, k, v, slopes), per_example("reference")(q, k, v, slopes)
    assert_close(l1, l2)
    for a, b in zip(g1, g2):
      assert_close(a, b, kind="grad")
    for e in range(2):
      want = np_softmax_attention(q[e], k[e], v[e], mask=np_causal(T, T), bias=np_alibi(slopes, T, T))[0]
      got = flex.flex_attention(q[e], k[e], v[e], mods.alibi(slopes), bm, implementation="pallas")
      assert_close(got, want)


# ----------------------------------------------------------------------------------------------------------
# What the kernel refuses, and Triton lowering
# ----------------------------------------------------------------------------------------------------------


class FlexGpuApiTest(parameterized.TestCase):

  def _f(self, dtype=jnp.float32, H=16, block_size=16, scale=None):
    q, k, v = inputs(B=1, T=32, S=32, N=2, K=1, H=H, dtype=dtype)
    bm = flex.create_block_mask(mods.causal(), None, None, 32, 32, block_size=block_size)
    return flex.prepare(q, k, v, None, bm, scale=scale)[0]

  def test_float64_refused(self):
    from tests.helpers import enable_x64
    with enable_x64():
      with self.assertRaisesRegex(_checks.UnsupportedError, "float64"):
        flex_gpu.flex_gpu_core(self._f(jnp.float64))

  def test_unsupported_calls(self):
    with self.assertRaisesRegex(_checks.UnsupportedError, "head dims"):
      flex_gpu.flex_gpu_core(self._f(H=300))
    with self.assertRaisesRegex(_checks.UnsupportedError, "powers of two"):
      flex_gpu.flex_gpu_core(self._f(block_size=24), interpret=False)
    with self.assertRaisesRegex(_checks.UnsupportedError, "traced"):
      jax.jit(lambda s: flex_gpu.flex_gpu_core(self._f(scale=s))[0])(0.5)
    # Dispatch falls through to blockwise when the kernel refuses.
    from tests.helpers import enable_x64
    with enable_x64():
      f = self._f(jnp.float64)
      out, _ = flex.flex_core(f, ("pallas", "blockwise"))
      assert out.dtype == jnp.float64


def lower_for_cuda(fn, *args) -> str:
  """StableHLO of ``fn`` lowered for CUDA without a GPU (Pallas emits each kernel's Triton IR for an H100)."""
  dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev)):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


LOWERING_CASES = {
    "causal_alibi": ("alibi", "causal"),
    "document_soft_cap": ("soft_cap", "document"),
    "window_t5": ("t5", "window"),
}


class FlexTritonLoweringTest(parameterized.TestCase):
  """Forward, dK/dV and dQ kernels (with a score-const gradient) lower to Triton IR on a machine without a GPU:
  lookups in captured arrays become selects, never gathers or scatters."""

  @parameterized.named_parameters(*((n, n) for n in LOWERING_CASES))
  def test_lowers(self, name):
    score, mask = LOWERING_CASES[name]
    B, T, N, K, H = 2, 64, 4, 2, 32
    q = jnp.zeros((B, T, N, H), jnp.bfloat16)
    k = jnp.zeros((B, T, K, H), jnp.bfloat16)
    consts = (jnp.asarray(mods.alibi_slopes(N)), jnp.zeros((32, N)), jnp.zeros((B, T), jnp.int32))

    def loss(q, k, slopes, table, ids):
      score_mod = {"alibi": mods.alibi(slopes), "soft_cap": mods.soft_cap(5.0),
                   "t5": mods.relative_position_bias(table)}[score]
      mask_mod, Bm = {"causal": (mods.causal(), None), "document": (mods.document(ids), B),
                      "window": (mods.causal() & mods.sliding_window((16, 0)), None)}[mask]
      bm = flex.create_block_mask(mask_mod, Bm, None, T, T, block_size=32)
      f, _ = flex.prepare(q, k, k, score_mod, bm)
      return flex_gpu.flex_gpu_core(f, interpret=False)[0].astype(jnp.float32).sum()

    text = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), q, k, *consts)
    self.assertEqual(text.count("stablehlo.custom_call @__gpu$xla.gpu.triton"), 3)
