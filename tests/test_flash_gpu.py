"""The Pallas (Triton-lowered) flash kernel against the reference, forward and gradients.

``FlashInterpretTest`` runs the kernels in Pallas interpret mode (CPU CI); ``FlashCompiledTest`` reruns the
same suite compiled, and is skipped unless a GPU is the default backend (experiments/gpu_check.sh runs it).
``FlashTritonLoweringTest`` lowers every case and every block-size table row to Triton IR for an abstract H100 on
any machine, so a kernel change that Triton cannot lower fails in CPU CI rather than on the next GPU lease.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

import attention_jax as aj
from attention_jax.kernels import flash_gpu
from tests.attention_suite import CASES, LOW_PRECISION_CASES, SLOW_CASES, AttentionSuite, make_inputs
from tests.helpers import assert_close

# Small tiles so that the short CI sequences still span many blocks, ragged last blocks, the causal diagonal and
# the band edges (masked and unmasked block loops), with different tiles in the three kernels.
SMALL_BLOCKS = flash_gpu.BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32,
                                    block_k_dq=16)


class FlashInterpretTest(AttentionSuite):
  INTERPRET = True
  BLOCKS = SMALL_BLOCKS

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != "gpu":
      self.skipTest("compiled Triton kernels need a GPU")

  def attention(self, q, k, v, **options):
    return flash_gpu.flash_attention(q, k, v, block_sizes=self.BLOCKS, interpret=self.INTERPRET,
                                     return_residual=True, **options)

  @parameterized.named_parameters(*((n, n) for n in CASES))
  def test_float32(self, name):
    self.check_case(CASES[name], jnp.float32)

  @parameterized.named_parameters(*((n, n) for n in LOW_PRECISION_CASES))
  def test_bfloat16(self, name):
    self.check_case(CASES[name], jnp.bfloat16)

  def test_float16(self):
    self.check_case(CASES["window_causal"], jnp.float16)

  @parameterized.named_parameters(*((n, n) for n in SLOW_CASES))
  @pytest.mark.slow
  def test_long(self, name):
    self.check_case(SLOW_CASES[name], jnp.float32)
    self.check_case(SLOW_CASES[name], jnp.bfloat16)

  def test_default_block_sizes(self):
    case = dict(B=1, T=150, S=130, N=4, K=2, H=64, options=dict(is_causal=True))
    q, k, v, opts = make_inputs(case, jnp.float32)
    got = flash_gpu.flash_attention(q, k, v, interpret=self.INTERPRET, **opts)
    assert_close(got, flash_gpu.flash_attention_reference(q, k, v, **opts))

  @parameterized.named_parameters(("causal_gqa", "t333_s200_causal_gqa"), ("window_causal", "window_causal"),
                                  ("not_causal", "t200_s333_gqa"))
  def test_longest_first(self, name):
    """Reversed query-block launch order (forward and dQ grids) computes the same function."""
    self.BLOCKS = dataclasses.replace(self.BLOCKS, longest_first=True)
    self.check_case(CASES[name], jnp.float32)

  def test_vmap_and_jit(self):
    q, k, v, opts = make_inputs(CASES["t17_causal"], jnp.float32)
    f = jax.jit(lambda q, k, v: flash_gpu.flash_attention(q, k, v, is_causal=True, block_sizes=self.BLOCKS,
                                                          interpret=self.INTERPRET))
    batched = jax.vmap(f)(jnp.stack([q, 2 * q]), jnp.stack([k, k]), jnp.stack([v, -v]))
    assert_close(batched[1], aj.reference_attention(2 * q, k, -v, is_causal=True))


class FlashCompiledTest(FlashInterpretTest):
  INTERPRET = False


def lower_for_cuda(fn, *args) -> str:
  """StableHLO of ``fn`` lowered for CUDA without a GPU: Pallas generates each kernel's Triton IR for an abstract
  H100 (PTX compilation is the part that still needs the GPU)."""
  dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev)):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_calls(q, k, v, opts, blocks) -> int:
  """Triton custom calls in the lowered forward + backward (3: forward, dK/dV, dQ)."""
  def loss(q, k, v):
    out = flash_gpu.flash_attention(q, k, v, block_sizes=blocks, interpret=False, **opts)
    return out.astype(jnp.float32).sum()
  return lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v).count("stablehlo.custom_call @__gpu$xla.gpu.triton")


class FlashTritonLoweringTest(parameterized.TestCase):
  """Every case, and every row of the block-size table, lowers to Triton on a machine without a GPU."""

  @parameterized.named_parameters(*((n, n) for n in CASES))
  def test_case_lowers(self, name):
    dtype = jnp.bfloat16 if name in LOW_PRECISION_CASES else jnp.float32
    q, k, v, opts = make_inputs(CASES[name], dtype)
    self.assertEqual(triton_calls(q, k, v, opts, dataclasses.replace(SMALL_BLOCKS, longest_first=True)), 3)

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

  def test_errors(self):
    q, k, v, _ = make_inputs(CASES["t17_causal"], jnp.float32)
    with self.assertRaisesRegex(ValueError, "no dense bias/mask"):
      aj.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 17, 17), bool), implementation="pallas")
    with self.assertRaisesRegex(ValueError, "power of two"):
      flash_gpu.BlockSizes(block_q=48)
    with self.assertRaisesRegex(ValueError, r"query.shape=\(1, 17, 2, 32\)"):
      flash_gpu.flash_attention(q, k[:, :, :, :16], v)

  def test_block_size_table(self):
    for h in (16, 32, 64, 96, 128, 256):
      for dtype in (jnp.bfloat16, jnp.float32):
        b = flash_gpu.BlockSizes.get_default(h, dtype)
        self.assertIsInstance(b, flash_gpu.BlockSizes)
    self.assertEqual(flash_gpu.BlockSizes.get_default(128, jnp.bfloat16).block_k, 64)
    self.assertEqual(flash_gpu.BlockSizes.table_key(96, jnp.bfloat16), (128, False))
    self.assertEqual(flash_gpu.BlockSizes.table_key(512, jnp.float32), (256, True))
    self.assertEqual(flash_gpu.padded_head_dim(5), 16)
