"""The Pallas TPU (Mosaic-lowered) flash kernel against the reference, forward and gradients.

``FlashTpuInterpretTest`` runs the kernels in Pallas TPU interpret mode on CPU. That mode simulates TPU memory
and DMAs in Python and costs seconds per kernel compile, so CI runs a subset of the shared cases chosen to cover
every feature (odd lengths, T != S, causal, GQA, segment ids, kv/query lengths, fully masked rows, window,
soft-cap, f32 and bf16); the remaining cases are marked slow. ``FlashTpuCompiledTest`` reruns the whole suite
compiled and is skipped unless a TPU is the default backend. ``FlashTpuLoweringTest`` lowers forward and backward
to Mosaic for TPU on any machine (``jax.export``), which checks block shapes against the 8 x 128 tiling and that
every primitive has a Mosaic lowering.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import attention_jax as aj
from attention_jax import core
from attention_jax.kernels import flash_tpu
from tests.attention_suite import CASES, LOW_PRECISION_CASES, SLOW_CASES, AttentionSuite, make_inputs
from tests.helpers import assert_close, np_mask, np_softmax_attention

# The smallest TPU tiles (128), with 256 in two backward tiles: the CI sequences still span several blocks, ragged
# last blocks, the causal diagonal, band edges and query blocks made only of padding, tiled differently in the
# three kernels.
SMALL_BLOCKS = flash_tpu.BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=256, block_q_dq=256,
                                    block_k_dq=128)
# CI subset: TPU interpret mode costs seconds per kernel compile, so CI checks two cases that each combine several
# features (in float32, the first also in bfloat16); every shared case of tests/attention_suite.py is a slow test.
CI_CASES = {
    # Odd T != S, causal, GQA, packed segments, kv lengths with a length-0 example (rows with no key).
    "odd_causal_gqa_segments_lengths": dict(B=2, T=333, S=200, N=4, K=2, H=32, segments=3,
                                            options=dict(is_causal=True, key_value_seq_lengths=[0, 170])),
    # Local window, soft-cap, query lengths, H = 80 padded to 128, S > T.
    "window_softcap_qlen_h80": dict(B=1, T=150, S=170, N=2, K=2, H=80, input_scale=3.0,
                                    options=dict(local_window_size=(40, 8), logits_soft_cap=5.0,
                                                 query_seq_lengths=[101])),
}


class FlashTpuInterpretTest(AttentionSuite):
  INTERPRET = True
  BLOCKS = SMALL_BLOCKS

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "tpu":
      self.skipTest("compiled Mosaic kernels need a TPU")

  def attention(self, q, k, v, **options):
    return flash_tpu.flash_attention_tpu(q, k, v, block_sizes=self.BLOCKS, interpret=self.INTERPRET,
                                         return_residual=True, **options)

  @parameterized.named_parameters(*((n, n) for n in CI_CASES))
  def test_float32(self, name):
    self.check_case(CI_CASES[name], jnp.float32)

  def test_bfloat16(self):
    self.check_case(CI_CASES["odd_causal_gqa_segments_lengths"], jnp.bfloat16)

  @parameterized.named_parameters(*((n, n) for n in CASES))
  @pytest.mark.slow
  def test_suite_float32(self, name):
    self.check_case(CASES[name], jnp.float32)

  @parameterized.named_parameters(*((n, n) for n in LOW_PRECISION_CASES))
  @pytest.mark.slow
  def test_suite_bfloat16(self, name):
    self.check_case(CASES[name], jnp.bfloat16)

  @pytest.mark.slow
  def test_float16(self):
    self.check_case(CASES["window_causal"], jnp.float16)

  @parameterized.named_parameters(*((n, n) for n in SLOW_CASES))
  @pytest.mark.slow
  def test_long(self, name):
    self.check_case(SLOW_CASES[name], jnp.float32)
    self.check_case(SLOW_CASES[name], jnp.bfloat16)

  @pytest.mark.slow
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
    out, lse = self.attention(q, k, v, **opts)
    B, T, N, _ = q.shape
    S = k.shape[1]
    mask = np_mask(B, N, T, S, causal=True, window=(20, 3), kv_lengths=[30, 12],
                   q_seg=np.asarray(opts["q_segment_ids"]), kv_seg=np.asarray(opts["kv_segment_ids"]))
    want_out, want_lse = np_softmax_attention(q, k, v, mask=mask)
    assert_close(out, want_out, jnp.float32, err_msg="output")
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    finite = np.isfinite(want_lse)
    self.assertTrue((~finite).any() and finite.any())    # the case has rows with and without keys
    assert_close(np.asarray(lse)[finite], want_lse[finite], jnp.float32, err_msg="logsumexp")

  def test_vmap_and_jit(self):
    q, k, v, _ = make_inputs(CASES["t17_causal"], jnp.float32)
    f = jax.jit(lambda q, k, v: flash_tpu.flash_attention_tpu(q, k, v, is_causal=True, block_sizes=self.BLOCKS,
                                                              interpret=self.INTERPRET))
    batched = jax.vmap(f)(jnp.stack([q, 2 * q]), jnp.stack([k, k]), jnp.stack([v, -v]))
    assert_close(batched[1], aj.reference_attention(2 * q, k, -v, is_causal=True))


class FlashTpuCompiledTest(FlashTpuInterpretTest):
  INTERPRET = False


def _tpu_target():
  """An abstract TPU device, so that Mosaic lowering rules that ask for the chip version run on CPU."""
  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


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
    with _tpu_target():
      exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(q, kv, kv, arrays)
    module = exported.mlir_module()
    for name in ("fwd", "dkdv", "dq"):
      self.assertIn(f"attention_jax_flash_tpu_{name}", module)
    self.assertEqual(module.count("tpu_custom_call"), 3)


  def test_vmap_lowers(self):
    x = jax.ShapeDtypeStruct((3, 2, 256, 4, 128), jnp.bfloat16)
    f = jax.vmap(lambda q, k, v: flash_tpu.flash_attention_tpu(q, k, v, is_causal=True, interpret=False))
    with _tpu_target():
      module = jax.export.export(jax.jit(f), platforms=["tpu"])(x, x, x).mlir_module()
    self.assertEqual(module.count("tpu_custom_call"), 1)


class FlashTpuApiTest(parameterized.TestCase):

  def test_dispatch(self):
    q, k, v, opts = make_inputs(CASES["window"], jnp.float32)
    got, lse = aj.dot_product_attention(q, k, v, implementation="pallas_tpu", return_residual=True, **opts)
    want, want_lse = aj.reference_attention(q, k, v, return_residual=True, **opts)
    assert_close(got, want)
    assert_close(lse, want_lse)

  def test_auto_picks_pallas_tpu_on_tpu(self):
    q, k, v, _ = make_inputs(CASES["t17_causal"], jnp.float32)
    plain = core.prepare_inputs(q, k, v, is_causal=True)
    masked = core.prepare_inputs(q, k, v, mask=jnp.ones((1, 1, 17, 17), bool))
    with mock.patch.object(jax, "default_backend", return_value="tpu"):
      self.assertEqual(core.resolve_implementation(None, plain), "pallas_tpu")
      self.assertEqual(core.resolve_implementation("auto", None), "pallas_tpu")
      self.assertEqual(core.resolve_implementation(None, masked), "blockwise")
    with mock.patch.object(jax, "default_backend", return_value="gpu"):
      with self.assertRaisesRegex(ValueError, "runs on TPU"):
        flash_tpu.flash_attention_tpu(q, k, v)

  def test_errors(self):
    q, k, v, _ = make_inputs(CASES["t17_causal"], jnp.float32)
    with self.assertRaisesRegex(ValueError, "no dense bias/mask"):
      aj.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 17, 17), bool), implementation="pallas_tpu")
    for bad in (64, 384):
      with self.assertRaisesRegex(ValueError, "power of two >= 128"):
        flash_tpu.BlockSizes(block_k_dq=bad)
    with self.assertRaisesRegex(ValueError, r"query.shape=\(1, 17, 2, 32\)"):
      flash_tpu.flash_attention_tpu(q, k[:, :, :, :16], v)

  def test_block_size_defaults(self):
    self.assertEqual(flash_tpu.BlockSizes.get_default(128, jnp.bfloat16), flash_tpu.BlockSizes())
    self.assertEqual(flash_tpu.BlockSizes.get_default(256, jnp.bfloat16).block_q, 256)
    self.assertEqual(flash_tpu.BlockSizes.get_default(64, jnp.float32).block_k, 256)
