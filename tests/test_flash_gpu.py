"""The Pallas (Triton-lowered) flash kernel against the reference, forward and gradients.

``FlashInterpretTest`` runs the kernels in Pallas interpret mode (CPU CI); ``FlashCompiledTest`` reruns the
same suite compiled, and is skipped unless a GPU is the default backend (experiments/gpu_check.sh runs it).
``FlashTritonLoweringTest`` lowers every case (structured masks, dense masks and biases of every broadcast shape
with their gradient kernel, Hv != H) and every block-size table row to Triton IR for an abstract H100 on any
machine, so a kernel change that Triton cannot lower fails in CPU CI rather than on the next GPU run.
``FlashApiTest``: dispatch (dense masks, float64 falling through, a Flax model), autodiff limits, debug_infs,
block-size arguments, batch dims and zero-size inputs.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

import attention_jax as aj
from attention_jax import core
from attention_jax.kernels import flash_gpu
from tests import attention_suite
from tests.attention_suite import (CASES, CI_CASES, CI_LOW_PRECISION, DENSE_CASES, HV_CASES, LOW_PRECISION,
                                   LOW_PRECISION_CASES, NAN_CASES, bias_inputs, check_debug_infs_and_nans,
                                   check_entry_point_errors, check_float32_under_x64, check_float64_refused,
                                   check_jitted_gradient_raises_clearly, check_reference_signature, ci_and_slow,
                                   make_inputs)
from tests.helpers import assert_close, randn

# Small tiles so that the short CI sequences still span many blocks, ragged last blocks, the causal diagonal and
# the band edges (masked and unmasked block loops), with different tiles in the three kernels.
SMALL_BLOCKS = flash_gpu.BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_kv_dkv=32, block_q_dq=32,
                                    block_kv_dq=16)

# Garbage isolation also through the soft-cap's tanh (its backward factor meets hidden logits).
NAN_SOFT_CAP = dict(B=2, T=30, S=37, N=2, K=1, H=16, input_scale=2.0,
                    options=dict(key_value_seq_lengths=[37, 20], query_seq_lengths=[30, 25], logits_soft_cap=3.0))
NAN_ALL = {**NAN_CASES, "soft_cap_lengths": NAN_SOFT_CAP}
# Bias shapes that exercise each reduction of the bias-gradient kernel: over the batch, over heads, over query rows
# (column sums from every query block), over key columns (row sums), over everything (a scalar bias). ``-inf``
# entries hide keys like a mask does.
BIAS_CASES = {
    "bias_B11S_minus_inf": dict(B=2, T=20, S=37, N=2, K=1, H=16, bias_shape=(2, 1, 1, 37),
                                neg_inf=(0, Ellipsis, [3, 30])),
    "bias_1NT1_causal": dict(B=2, T=24, S=24, N=4, K=2, H=16, bias_shape=(1, 4, 24, 1),
                             options=dict(is_causal=True)),
    "bias_1111_window_lengths": dict(B=2, T=20, S=30, N=2, K=2, H=16, bias_shape=(1, 1, 1, 1),
                                     options=dict(local_window_size=(4, 4), key_value_seq_lengths=[30, 11])),
}
# The CI subset of the new suites (the rest run with -m slow; every case also lowers to Triton in CI).
CI_NAN = ("mask_padding",)
CI_BIAS = ("bias_B11S_minus_inf",)
# bfloat16: masks and Hv only (the suite checks dbias at float32 tolerance, which a backward taking
# delta = rowsum(dO * O) from the bfloat16 output cannot meet).
BF16_EXTRA = {"hv": HV_CASES["hv48_h32_causal_gqa"], "mask_padding": DENSE_CASES["mask_B11S_padding"],
              "mask_causal": DENSE_CASES["mask_1NTS_causal"]}
CI_BF16_EXTRA = ("mask_padding",)
LONGEST_FIRST_CASES = {"causal_gqa": CASES["t333_s200_causal_gqa"], "window_causal": CASES["window_causal"],
                       "not_causal": CASES["t200_s333_gqa"]}


# KernelSuite is used through its module: a class imported by name would be collected as a test class too.
class FlashInterpretTest(attention_suite.KernelSuite):
  INTERPRET = True
  BLOCKS = SMALL_BLOCKS

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("compiled Triton kernels need a GPU")

  def attention(self, q, k, v, **options):
    return flash_gpu.flash_attention(q, k, v, block_sizes=self.BLOCKS, interpret=self.INTERPRET,
                                     return_residual=True, **options)

  test_float32, test_float32_slow = ci_and_slow(CASES, CI_CASES, "check_case", jnp.float32)
  test_bfloat16, test_bfloat16_slow = ci_and_slow(LOW_PRECISION, CI_LOW_PRECISION, "check_case", jnp.bfloat16)

  def test_float16(self):
    self.check_case(CASES["window_causal"], jnp.float16)


  test_nan_isolation, test_nan_isolation_slow = ci_and_slow(NAN_ALL, CI_NAN, "check_nan_isolation", jnp.float32)
  test_bfloat16_hv_and_dense, test_bfloat16_hv_and_dense_slow = ci_and_slow(
      BF16_EXTRA, CI_BF16_EXTRA, "check_case", jnp.bfloat16)

  test_bias_gradient_shapes, test_bias_gradient_shapes_slow = ci_and_slow(BIAS_CASES, CI_BIAS, "check_bias_gradient")

  def test_nan_row_does_not_leak_into_hidden_keys(self):
    """A query row holding NaN makes its own output and logsumexp NaN; keys it cannot see (causal: j > i) must not
    get NaN in dk / dv from that masked pair (its probability there is a select, not exp(-inf - NaN))."""
    r = np.random.default_rng(8)
    q, k, v = randn(r, (1, 24, 2, 16)), randn(r, (1, 24, 1, 16)), randn(r, (1, 24, 1, 16))
    q_nan = q.at[:, 5, 0].set(jnp.nan)       # row 5 of head 0; keys 6.. share its causal-diagonal tile
    ct = randn(r, (1, 24, 2, 16))

    def grads(fn, q, ct):
      def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.where(jnp.isfinite(out), out * ct, 0.0).sum()
      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    dq, dk, dv = grads(lambda q, k, v: self.attention(q, k, v, is_causal=True)[0], q_nan, ct)
    # Oracle: keys 6.. and rows 0..4 do not depend on row 5 at all; the NaN row's cotangent is 0 (its output is NaN).
    want = grads(lambda q, k, v: aj.reference_attention(q, k, v, is_causal=True), q, ct.at[:, 5, 0].set(0.0))
    self.assertTrue(np.isnan(np.asarray(self.attention(q_nan, k, v, is_causal=True)[0][0, 5, 0])).all())
    chex.assert_tree_all_finite((dk[:, 6:], dv[:, 6:]))
    assert_close(dk[:, 6:], want[1][:, 6:], kind="grad")
    assert_close(dv[:, 6:], want[2][:, 6:], kind="grad")
    assert_close(dq[:, :5], want[0][:, :5], kind="grad")      # rows before 5 never see it

  def test_default_block_sizes(self):
    case = dict(B=1, T=150, S=130, N=4, K=2, H=64, options=dict(is_causal=True))
    q, k, v, opts = make_inputs(case, jnp.float32)
    got = flash_gpu.flash_attention(q, k, v, interpret=self.INTERPRET, **opts)
    assert_close(got, flash_gpu.flash_attention_reference(q, k, v, **opts))

  def check_longest_first(self, case):
    """Reversed query-block launch order (forward and dQ grids) computes the same function."""
    self.BLOCKS = dataclasses.replace(self.BLOCKS, longest_first=True)
    self.check_case(case, jnp.float32)

  test_longest_first, test_longest_first_slow = ci_and_slow(
      LONGEST_FIRST_CASES, ("causal_gqa",), "check_longest_first")


class FlashCompiledTest(FlashInterpretTest):
  INTERPRET = False


def lower_for_cuda(fn, *args) -> str:
  """StableHLO of ``fn`` lowered for CUDA without a GPU: Pallas generates each kernel's Triton IR for an abstract
  H100 (PTX compilation is the part that still needs the GPU)."""
  dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev)):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_calls(q, k, v, opts, blocks, bias=None) -> int:
  """Triton custom calls in the lowered forward + backward (3: forward, dK/dV, dQ; 4 with a bias: dbias)."""
  def loss(q, k, v, bias):
    out = flash_gpu.flash_attention(q, k, v, bias, block_sizes=blocks, interpret=False, **opts)
    return out.astype(jnp.float32).sum()
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  return lower_for_cuda(jax.grad(loss, argnums=argnums), q, k, v, bias).count(
      "stablehlo.custom_call @__gpu$xla.gpu.triton")


# Every case the interpret suites run (structured, Hv != H, dense masks and biases), in one table for lowering.
LOWERING_CASES = {**CASES, **HV_CASES, **DENSE_CASES, "soft_cap_lengths": NAN_SOFT_CAP}


class FlashTritonLoweringTest(parameterized.TestCase):
  """Every case, and every row of the block-size table, lowers to Triton on a machine without a GPU."""

  @parameterized.named_parameters(*((n, n) for n in LOWERING_CASES))
  def test_case_lowers(self, name):
    dtype = jnp.bfloat16 if name in LOW_PRECISION_CASES or name.startswith("mask_") else jnp.float32
    q, k, v, opts = make_inputs(LOWERING_CASES[name], dtype)
    bias = opts.pop("bias", None)
    blocks = dataclasses.replace(SMALL_BLOCKS, longest_first=True)
    self.assertEqual(triton_calls(q, k, v, opts, blocks, bias), 3 if bias is None else 4)

  @parameterized.named_parameters(*((n, n) for n in BIAS_CASES))
  def test_bias_gradient_lowers(self, name):
    q, k, v, opts, bias = bias_inputs(BIAS_CASES[name], jnp.bfloat16)
    self.assertEqual(triton_calls(q, k, v, opts, SMALL_BLOCKS, bias.astype(jnp.bfloat16)), 4)

  def test_table_rows_lower(self):
    for (h, wide), blocks in flash_gpu._DEFAULT_BLOCKS.items():
      for dtype in ((jnp.float32,) if wide else (jnp.bfloat16, jnp.float16)):
        q = jnp.zeros((1, 1024, 4, h), dtype)
        k = jnp.zeros((1, 1024, 2, h), dtype)
        with self.subTest(h=h, dtype=jnp.dtype(dtype).name):
          self.assertEqual(triton_calls(q, k, k, dict(is_causal=True), blocks), 3)


class FlashApiTest(parameterized.TestCase):

  def test_dispatch(self):
    q, k, v, opts = make_inputs(CASES["window"], jnp.float32)
    got = aj.dot_product_attention(q, k, v, implementation="pallas", **opts)
    assert_close(got, aj.reference_attention(q, k, v, **opts))
    # The registered implementation keeps the internal (out, lse [B, N, T] float32, -inf = no key) format.
    inp = core.prepare_inputs(q, k, v, key_value_seq_lengths=jnp.array([0]), **opts)
    out, lse = core.attention_core(inp, "pallas")
    want_out, want_lse = core.attention_core(inp, "reference")
    chex.assert_shape(lse, (q.shape[0], q.shape[2], q.shape[1]))
    self.assertEqual(lse.dtype, jnp.float32)
    assert_close(out, want_out)
    self.assertTrue(np.isneginf(lse).all() and np.isneginf(want_lse).all())

  def test_dense_masks_run_on_the_kernel(self):
    """A causal or padding mask passed as an array (as Flax models do) runs on the kernel, forward and backward."""
    r = np.random.default_rng(1)
    q, k, v = randn(r, (2, 24, 2, 16)), randn(r, (2, 24, 2, 16)), randn(r, (2, 24, 2, 16))
    causal = jnp.tril(jnp.ones((24, 24), bool))[None, None]                                    # [1, 1, T, S]
    padding = jnp.asarray(np.arange(24)[None, None, None, :] < np.array([24, 9])[:, None, None, None])  # [B,1,1,S]
    def run(impl):
      def loss(q, k, v):
        out = aj.dot_product_attention(q, k, v, mask=causal & padding, implementation=impl)
        return (out ** 2).sum(), out
      return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, out), grads = run("pallas")
    (_, want), want_grads = run("reference")
    assert_close(out, want)
    for g, w in zip(grads, want_grads):
      assert_close(g, w, kind="grad")

  @pytest.mark.slow
  def test_flax_model_with_mask_array(self):
    """flax.nnx.MultiHeadAttention with a causal mask array, through make_attention_fn("pallas")."""
    from flax import nnx
    x = randn(np.random.default_rng(2), (2, 16, 32))
    mask = nnx.make_causal_mask(x[..., 0])
    make = lambda impl: nnx.MultiHeadAttention(num_heads=2, in_features=32, qkv_features=32, decode=False,
                                               attention_fn=aj.nn.make_attention_fn(implementation=impl),
                                               rngs=nnx.Rngs(0))
    kernel, reference = make("pallas"), make("reference")
    assert_close(kernel(x, mask=mask), reference(x, mask=mask))
    loss = lambda model: (model(x, mask=mask) ** 2).sum()
    g, w = nnx.grad(loss)(kernel), nnx.grad(loss)(reference)
    jax.tree.map(lambda a, b: assert_close(a, b, kind="grad"), nnx.state(g), nnx.state(w))

  def test_float32_under_x64(self):
    check_float32_under_x64(lambda q, k, v, **o: flash_gpu.flash_attention(q, k, v, block_sizes=16, **o))

  def test_float64_is_refused_and_dispatch_falls_through(self):
    check_float64_refused(flash_gpu.flash_attention, "pallas")

  def test_differentiating_a_jitted_gradient_raises_clearly(self):
    check_jitted_gradient_raises_clearly(functools.partial(flash_gpu.flash_attention, block_sizes=16))

  def test_debug_infs_and_nans_stay_silent(self):
    check_debug_infs_and_nans(functools.partial(flash_gpu.flash_attention, block_sizes=16))

  @pytest.mark.slow
  def test_debug_infs_and_nans_stay_silent_jit(self):
    check_debug_infs_and_nans(functools.partial(flash_gpu.flash_attention, block_sizes=16), jit=True)

  def test_block_sizes_argument(self):
    q, k, v, opts = make_inputs(CASES["t17_causal"], jnp.float32)
    a = flash_gpu.flash_attention(q, k, v, block_sizes=16, **opts)
    b = flash_gpu.flash_attention(q, k, v, block_sizes=flash_gpu.BlockSizes(16, 16, 16, 16, 16, 16), **opts)
    np.testing.assert_array_equal(a, b)
    for bad in (0, -16, 48, 8, 64.0, "64", True, (16, 16)):
      with self.assertRaisesRegex(ValueError, "block_sizes"):
        flash_gpu.flash_attention(q, k, v, block_sizes=bad)
    with self.assertRaisesRegex(ValueError, "power of two"):
      flash_gpu.BlockSizes(block_q=48)
    with self.assertRaisesRegex(ValueError, "power of two"):
      flash_gpu.BlockSizes(block_k=32.0)

  def test_reference_has_the_same_signature(self):
    check_reference_signature(flash_gpu.flash_attention, flash_gpu.flash_attention_reference, block_sizes=16)

  def test_errors(self):
    check_entry_point_errors(flash_gpu.flash_attention)
    q, k, v, _ = make_inputs(CASES["t17_causal"], jnp.float32)
    # What the kernel cannot take is refused with UnsupportedError, so that dispatch moves on.
    wide = jnp.zeros((1, 4, 1, 300), jnp.float32)
    with self.assertRaisesRegex(core.UnsupportedError, "head dims up to 256"):
      flash_gpu.flash_attention(wide, wide, wide)
    with self.assertRaisesRegex(core.UnsupportedError, "float32, bfloat16 or float16"):
      flash_gpu.flash_attention(*(x.astype(jnp.float8_e4m3fn) for x in (q, k, v)))

  def test_block_size_table(self):
    for h in (16, 32, 64, 96, 128, 256):
      for dtype in (jnp.bfloat16, jnp.float32):
        b = flash_gpu.BlockSizes.get_default(h, dtype)
        self.assertIsInstance(b, flash_gpu.BlockSizes)
    self.assertEqual(flash_gpu.BlockSizes.get_default(128, jnp.bfloat16).block_k, 64)
    self.assertEqual(flash_gpu.BlockSizes.table_key(96, jnp.bfloat16), (128, False))
    self.assertEqual(flash_gpu.BlockSizes.table_key(512, jnp.float32), (256, True))
    self.assertEqual(flash_gpu.padded_head_dim(5), 16)
