"""The Pallas TPU (Mosaic-lowered) flash kernel against the reference, forward and gradients.

``FlashTpuInterpretTest`` runs the kernels interpreted on CPU (Pallas's interpreter, ``interpret=True``), and the
bias-gradient case in the TPU interpret mode (``pltpu.InterpretParams``: simulated TPU memory and DMAs, VMEM buffers
reused across grid steps, out-of-bounds checks). Interpretation costs seconds per kernel compile, so CI runs a
subset of the shared cases chosen to cover every feature (odd lengths, T != S, causal, GQA, segment ids, kv/query
lengths, fully masked rows, window, soft-cap, dense masks and biases of each broadcast shape with their gradient,
Hv != H, garbage isolation, f32 and bf16); the remaining cases are marked slow.
``FlashTpuCompiledTest`` reruns the suite compiled and is skipped unless a TPU is the default backend.
``FlashTpuLoweringTest`` lowers forward and backward to Mosaic for TPU on any machine (``jax.export``), which
checks block shapes against the 8 x 128 tiling and that every primitive has a Mosaic lowering.
``FlashTpuApiTest``: dispatch (a dense mask, float64 falling through), autodiff limits and ``jax.checkpoint``,
debug_infs, block-size arguments, batch dims and zero-size inputs.
"""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.experimental.pallas import tpu as pltpu

import attention_jax as aj
from attention_jax import core
from attention_jax.kernels import flash_tpu
from tests import attention_suite
from tests.attention_suite import (CASES, DENSE_CASES, HV_CASES, LOW_PRECISION, NAN_CASES, AttentionSuite,
                                   check_debug_infs_and_nans, check_entry_point_errors, check_float32_under_x64,
                                   check_float64_refused, check_jitted_gradient_raises_clearly,
                                   check_reference_signature, ci_and_slow, make_inputs, named, slow_only)
from tests.helpers import assert_close, np_mask, np_softmax_attention

# The smallest TPU tiles (128), with 256 in two backward tiles: the CI sequences still span several blocks, ragged
# last blocks, the causal diagonal, band edges and query blocks made only of padding, tiled differently in the
# three kernels.
SMALL_BLOCKS = flash_tpu.BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=256, block_q_dq=256,
                                    block_k_dq=128)
# CI subset of the structured cases: two cases that each combine several features (in float32, the first also in
# bfloat16); every shared case of tests/attention_suite.py is a slow test.
CI_CASES = {
    # Odd T != S, causal, GQA, packed segments, kv lengths with a length-0 example (rows with no key).
    "odd_causal_gqa_segments_lengths": dict(B=2, T=333, S=200, N=4, K=2, H=32, segments=3,
                                            options=dict(is_causal=True, key_value_seq_lengths=[0, 170])),
    # Local window, soft-cap, query lengths, H = 80 padded to 128, S > T.
    "window_softcap_qlen_h80": dict(B=1, T=150, S=170, N=2, K=2, H=80, input_scale=3.0,
                                    options=dict(local_window_size=(40, 8), logits_soft_cap=5.0,
                                                 query_seq_lengths=[101])),
}
# Garbage isolation also through the soft-cap's tanh (its backward factor meets hidden logits).
NAN_SOFT_CAP = dict(B=2, T=30, S=37, N=2, K=1, H=16, input_scale=2.0,
                    options=dict(key_value_seq_lengths=[37, 20], query_seq_lengths=[30, 25], logits_soft_cap=3.0))
NAN_ALL = {**NAN_CASES, "soft_cap_lengths": NAN_SOFT_CAP}
# Bias shapes that exercise each reduction and each HBM layout of the bias-gradient kernel: over heads and query
# rows, within a tile and across query blocks (a [B, 1, 1, S] key bias, stored as sublane-replicated rows), over
# key columns (a [1, N, T, 1] query bias, stored as lane-replicated columns), over everything (one value per
# (batch, head)). -inf entries hide their pairs like a mask does.
BIAS_CASES = {
    "bias_B11S_minus_inf_causal": dict(B=2, T=150, S=150, N=2, K=1, H=16, Hv=24, bias_shape=(2, 1, 1, 150),
                                       neg_inf=(..., [3, 140]), options=dict(is_causal=True)),
    "bias_1NT1_softcap_lengths": dict(B=2, T=40, S=30, N=4, K=2, H=16, bias_shape=(1, 4, 40, 1),
                                      neg_inf=(0, 1, 7), input_scale=2.0,
                                      options=dict(logits_soft_cap=3.0, key_value_seq_lengths=[30, 11])),
    "bias_BN11_window": dict(B=2, T=20, S=30, N=2, K=2, H=16, bias_shape=(2, 2, 1, 1), neg_inf=(1, 0),
                             options=dict(local_window_size=(4, 4))),
}
# The CI subset of the new suites (the rest run with -m slow; every case also lowers to Mosaic in CI).
CI_NAN = ("mask_padding",)
CI_BIAS = ("bias_B11S_minus_inf_causal",)
# bfloat16: masks and Hv only (the suite checks dbias at float32 tolerance, which a backward taking
# delta = rowsum(dO * O) from the bfloat16 output cannot meet).
BF16_EXTRA = {"hv_mask_padding": dict(DENSE_CASES["mask_B11S_padding"], Hv=40),
              "mask_causal": DENSE_CASES["mask_1NTS_causal"], "hv": HV_CASES["hv48_h32_causal_gqa"]}
CI_BF16_EXTRA = ("hv_mask_padding",)


# KernelSuite is used through its module: a class imported by name would be collected as a test class too.
class FlashTpuInterpretTest(attention_suite.KernelSuite):
  INTERPRET = True
  BLOCKS = SMALL_BLOCKS

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "tpu":
      self.skipTest("compiled Mosaic kernels need a TPU")

  def attention(self, q, k, v, *args, **options):
    return flash_tpu.flash_attention_tpu(q, k, v, *args, block_sizes=self.BLOCKS, interpret=self.INTERPRET,
                                         return_residual=True, **options)

  @parameterized.named_parameters(*((n, n) for n in CI_CASES))
  def test_float32(self, name):
    self.check_case(CI_CASES[name], jnp.float32)

  def test_bfloat16(self):
    self.check_case(CI_CASES["odd_causal_gqa_segments_lengths"], jnp.bfloat16)

  test_suite_float32 = slow_only(CASES, "check_case", jnp.float32)
  test_suite_bfloat16 = slow_only(LOW_PRECISION, "check_case", jnp.bfloat16)

  @pytest.mark.slow
  def test_float16(self):
    self.check_case(CASES["window_causal"], jnp.float16)

  test_nan_isolation, test_nan_isolation_slow = ci_and_slow(NAN_ALL, CI_NAN, "check_nan_isolation", jnp.float32)

  test_bfloat16_hv_and_dense, test_bfloat16_hv_and_dense_slow = ci_and_slow(
      BF16_EXTRA, CI_BF16_EXTRA, "check_case", jnp.bfloat16)

  @parameterized.named_parameters(*named(BIAS_CASES, CI_BIAS))
  def test_bias_gradient_shapes(self, name):
    """In CI, in the TPU interpret mode (simulated TPU memory: an output block a kernel forgets to write holds a
    stale VMEM buffer and fails), with 128-long tiles everywhere (two query blocks reduced into one bias tile)."""
    interpret = pltpu.InterpretParams() if self.INTERPRET else False
    self.check_bias_gradient(BIAS_CASES[name], attention=lambda q, k, v, b, **o: flash_tpu.flash_attention_tpu(
        q, k, v, b, block_sizes=128, interpret=interpret, **o))

  @parameterized.named_parameters(*named(BIAS_CASES, CI_BIAS, slow=True))
  @pytest.mark.slow
  def test_bias_gradient_shapes_slow(self, name):
    self.check_bias_gradient(BIAS_CASES[name])

  def test_default_block_sizes(self):
    case = dict(B=1, T=600, S=530, N=4, K=2, H=64, options=dict(is_causal=True))
    q, k, v, opts = make_inputs(case, jnp.float32)
    got = flash_tpu.flash_attention_tpu(q, k, v, interpret=self.INTERPRET, **opts)
    assert_close(got, flash_tpu.flash_attention_tpu_reference(q, k, v, **opts))

  def test_numpy_oracle(self):
    """Forward and logsumexp against the float64 NumPy oracle of tests/helpers.py (independent of the library)."""
    case = dict(B=2, T=45, S=30, N=4, K=2, H=16, segments=2,
                options=dict(is_causal=True, key_value_seq_lengths=[30, 12], local_window_size=(20, 3)))
    q, k, v, opts = make_inputs(case, jnp.float32, seed=3)
    out, res = self.attention(q, k, v, **opts)
    B, T, N, _ = q.shape
    S = k.shape[1]
    mask = np_mask(B, N, T, S, causal=True, window=(20, 3), kv_lengths=[30, 12],
                   q_seg=np.asarray(opts["q_segment_ids"]), kv_seg=np.asarray(opts["kv_segment_ids"]))
    want_out, want_lse = np_softmax_attention(q, k, v, mask=mask)
    assert_close(out, want_out, jnp.float32, err_msg="output")
    want_res = np.transpose(want_lse, (0, 2, 1))                        # jax.nn's [B, T, N]
    finite = np.isfinite(want_res)
    self.assertTrue((~finite).any() and finite.any())    # the case has rows with and without keys
    np.testing.assert_array_equal(np.asarray(res)[~finite], np.finfo(np.float32).min)
    assert_close(np.asarray(res)[finite], want_res[finite], jnp.float32, err_msg="logsumexp")


class FlashTpuInterpretModeTest(AttentionSuite):
  """The CI cases that combine the most features, in the TPU interpret mode (``pltpu.InterpretParams``), which
  simulates TPU memory: an output block a kernel forgets to write holds a stale VMEM buffer, and out-of-bounds DMAs
  fail. The plain interpreter (the default on CPU, and the rest of this file) cannot see either."""

  def attention(self, q, k, v, *args, **options):
    return flash_tpu.flash_attention_tpu(q, k, v, *args, block_sizes=SMALL_BLOCKS,
                                         interpret=pltpu.InterpretParams(), return_residual=True, **options)

  def test_structured(self):
    self.check_case(CI_CASES["odd_causal_gqa_segments_lengths"], jnp.float32)

  def test_dense_mask_and_bias(self):
    self.check_case(DENSE_CASES["bias_11TS_mask_B1T1"], jnp.float32)


class FlashTpuCompiledTest(FlashTpuInterpretTest):
  INTERPRET = False


def _tpu_target():
  """An abstract TPU device, so that Mosaic lowering rules that ask for the chip version run on CPU."""
  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def mosaic_module(fn, *args) -> str:
  """StableHLO of ``jax.jit(fn)`` exported for TPU: each Pallas call lowered to a Mosaic ``tpu_custom_call``."""
  with _tpu_target():
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def _spec(shape, dtype):
  return None if shape is None else jax.ShapeDtypeStruct(shape, dtype)


class FlashTpuLoweringTest(parameterized.TestCase):
  """Forward + backward lower to Mosaic TPU custom calls (what a TPU compiles), checked on any backend."""

  @parameterized.named_parameters(
      ("bf16_causal_gqa_default_blocks", jnp.bfloat16, 2, 1000, 1000, 8, 2, 128, dict(is_causal=True), None),
      ("f32_window_softcap_h80", jnp.float32, 1, 300, 200, 4, 1, 80,
       dict(local_window_size=(30, 5), logits_soft_cap=5.0), SMALL_BLOCKS),
      ("bf16_segments_lengths_h256", jnp.bfloat16, 2, 700, 333, 4, 2, 256,
       dict(is_causal=True, segments=True, lengths=True), None),
  )
  def test_lowers_to_mosaic(self, dtype, B, T, S, N, K, H, options, blocks):
    options = dict(options)
    arrays = {}
    if options.pop("segments", False):
      arrays["q_segment_ids"] = jax.ShapeDtypeStruct((B, T), jnp.int32)
      arrays["kv_segment_ids"] = jax.ShapeDtypeStruct((B, S), jnp.int32)
    if options.pop("lengths", False):
      arrays["query_seq_lengths"] = arrays["key_value_seq_lengths"] = jax.ShapeDtypeStruct((B,), jnp.int32)

    def loss(q, k, v, arrays):
      out = flash_tpu.flash_attention_tpu(q, k, v, block_sizes=blocks, interpret=False, **options, **arrays)
      return out.astype(jnp.float32).sum()

    q = jax.ShapeDtypeStruct((B, T, N, H), dtype)
    kv = jax.ShapeDtypeStruct((B, S, K, H), dtype)
    module = mosaic_module(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, arrays)
    for name in ("fwd", "dkdv", "dq"):
      self.assertIn(f"attention_jax_flash_tpu_{name}", module)
    self.assertEqual(module.count("tpu_custom_call"), 3)

  @parameterized.named_parameters(
      # (bias shape, mask shape): every HBM layout of each (full, T- or S-broadcast, both) with batch/head
      # broadcasts, and every reduction of the bias-gradient kernel.
      ("bias_1NTS_mask_B11S", (1, 4, 300, 200), (2, 1, 1, 200), jnp.bfloat16),
      ("bias_B11S_mask_B1T1", (2, 1, 1, 200), (2, 1, 300, 1), jnp.float32),
      ("bias_1NT1_mask_1NTS", (1, 4, 300, 1), (1, 4, 300, 200), jnp.bfloat16),
      ("bias_BN11_bf16", (2, 4, 1, 1), None, jnp.float32),
      ("mask_B1TS", None, (2, 1, 300, 200), jnp.float32),
  )
  def test_dense_and_value_head_dim_lower(self, bias_shape, mask_shape, dtype):
    """Dense masks and biases (with the bias-gradient kernel), Hv != H and a soft-cap lower to Mosaic."""
    B, T, S, N, K, H, Hv = 2, 300, 200, 4, 2, 64, 96
    bias_dtype = jnp.bfloat16 if bias_shape == (2, 4, 1, 1) else jnp.float32

    def loss(q, k, v, bias, mask):
      out = flash_tpu.flash_attention_tpu(q, k, v, bias, mask, is_causal=True, logits_soft_cap=3.0,
                                          block_sizes=128, interpret=False)
      return out.astype(jnp.float32).sum()

    argnums = (0, 1, 2) if bias_shape is None else (0, 1, 2, 3)
    module = mosaic_module(jax.grad(loss, argnums=argnums), _spec((B, T, N, H), dtype), _spec((B, S, K, H), dtype),
                           _spec((B, S, K, Hv), dtype), _spec(bias_shape, bias_dtype), _spec(mask_shape, jnp.bool_))
    self.assertEqual(module.count("tpu_custom_call"), 3 if bias_shape is None else 4)
    if bias_shape is not None:
      self.assertIn("attention_jax_flash_tpu_dbias", module)

  def test_bias_gradient_kernel_is_dropped_when_unused(self):
    x = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, 2, 256, 256), jnp.float32)
    loss = lambda q, k, v, b: flash_tpu.flash_attention_tpu(q, k, v, b, interpret=False).astype(jnp.float32).sum()
    module = mosaic_module(jax.grad(loss, argnums=(0, 1, 2)), x, x, x, bias)
    self.assertEqual(module.count("tpu_custom_call"), 3)

  def test_checkpoint_lowers(self):
    """Compiled Pallas TPU calls carry no effects, so jax.checkpoint differentiates them (on a TPU as here)."""
    x = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    f = jax.checkpoint(lambda q, k, v: flash_tpu.flash_attention_tpu(
        q, k, v, is_causal=True, interpret=False).astype(jnp.float32).sum())
    module = mosaic_module(jax.grad(f, argnums=(0, 1, 2)), x, x, x)
    self.assertEqual(module.count("tpu_custom_call"), 3)

  def test_vmap_lowers(self):
    x = jax.ShapeDtypeStruct((3, 2, 256, 4, 128), jnp.bfloat16)
    f = jax.vmap(lambda q, k, v: flash_tpu.flash_attention_tpu(q, k, v, is_causal=True, interpret=False))
    self.assertEqual(mosaic_module(f, x, x, x).count("tpu_custom_call"), 1)


class FlashTpuApiTest(parameterized.TestCase):

  def test_dispatch(self):
    """dot_product_attention runs the kernel, also with a dense mask array (as Flax models pass causal and padding
    masks): here a causal & padding mask, with a window."""
    q, k, v, opts = make_inputs(CASES["window"], jnp.float32)
    T = q.shape[1]
    mask = jnp.tril(jnp.ones((T, T), bool)) & (jnp.arange(T) < 100)[None, :]
    got, res = aj.dot_product_attention(q, k, v, mask=mask, implementation="pallas_tpu", return_residual=True,
                                        **opts)
    want, want_res = aj.reference_attention(q, k, v, mask=mask, return_residual=True, **opts)
    assert_close(got, want)
    assert_close(res, want_res)
    # The registered implementation keeps the internal (out, lse [B, N, T] float32, -inf = no key) format.
    inp = core.prepare_inputs(q, k, v, key_value_seq_lengths=jnp.array([0]), **opts)
    out, lse = core.attention_core(inp, "pallas_tpu")
    chex.assert_shape(lse, (q.shape[0], q.shape[2], q.shape[1]))
    self.assertEqual(lse.dtype, jnp.float32)
    np.testing.assert_array_equal(out, 0.0)
    self.assertTrue(np.isneginf(lse).all())

  def test_auto_picks_pallas_tpu_on_tpu(self):
    q, k, v, _ = make_inputs(CASES["t17_causal"], jnp.float32)
    masked = core.prepare_inputs(q, k, v, mask=jnp.ones((1, 1, 17, 17), bool))
    with mock.patch.object(jax, "default_backend", return_value="tpu"):
      self.assertEqual(core.resolve_implementation(None, masked), "pallas_tpu")
      self.assertEqual(core.resolve_implementation("auto", None), "pallas_tpu")
    with mock.patch.object(jax, "default_backend", return_value="gpu"):
      with self.assertRaisesRegex(core.UnsupportedError, "runs on TPU"):
        flash_tpu.flash_attention_tpu(q, k, v)

  def test_float32_under_x64(self):
    check_float32_under_x64(flash_tpu.flash_attention_tpu)

  def test_float64_is_refused_and_dispatch_falls_through(self):
    check_float64_refused(flash_tpu.flash_attention_tpu, "pallas_tpu")

  def test_checkpoint(self):
    """jax.grad through jax.checkpoint (interpreted: Pallas's interpreter has no side effects; compiled calls have
    none either, see FlashTpuLoweringTest.test_checkpoint_lowers)."""
    q, k, v, opts = make_inputs(CASES["t17_causal"], jnp.float32)
    loss = lambda impl: jax.checkpoint(
        lambda q, k, v: (aj.dot_product_attention(q, k, v, implementation=impl, **opts) ** 2).sum())
    got = jax.grad(loss("pallas_tpu"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
      assert_close(g, w, kind="grad")

  def test_differentiating_a_jitted_gradient_raises_clearly(self):
    check_jitted_gradient_raises_clearly(flash_tpu.flash_attention_tpu)

  def test_debug_infs_and_nans_stay_silent(self):
    check_debug_infs_and_nans(flash_tpu.flash_attention_tpu, neg_inf_bias=True)

  def test_block_sizes_argument(self):
    q, k, v, opts = make_inputs(CASES["t17_causal"], jnp.float32)
    a = flash_tpu.flash_attention_tpu(q, k, v, block_sizes=256, **opts)
    b = flash_tpu.flash_attention_tpu(q, k, v, block_sizes=flash_tpu.BlockSizes(*(256,) * 6), **opts)
    np.testing.assert_array_equal(a, b)
    for bad in (0, -128, 64, 384, 128.0, "128", True, (128, 128)):
      with self.assertRaisesRegex(ValueError, "block_sizes"):
        flash_tpu.flash_attention_tpu(q, k, v, block_sizes=bad)
    for bad in (64, 384):
      with self.assertRaisesRegex(ValueError, "power of two >= 128"):
        flash_tpu.BlockSizes(block_k_dq=bad)

  def test_reference_has_the_same_signature(self):
    check_reference_signature(flash_tpu.flash_attention_tpu, flash_tpu.flash_attention_tpu_reference,
                              block_sizes=128)

  def test_errors(self):
    check_entry_point_errors(flash_tpu.flash_attention_tpu)
    q, k, v, _ = make_inputs(CASES["t17_causal"], jnp.float32)
    with self.assertRaisesRegex(ValueError, "interpret"):
      flash_tpu.flash_attention_tpu(q, k, v, interpret="yes")

  def test_block_size_defaults(self):
    self.assertEqual(flash_tpu.BlockSizes.get_default(128, jnp.bfloat16), flash_tpu.BlockSizes())
    self.assertEqual(flash_tpu.BlockSizes.get_default(256, jnp.bfloat16).block_q, 256)
    self.assertEqual(flash_tpu.BlockSizes.get_default(64, jnp.float32).block_k, 256)
