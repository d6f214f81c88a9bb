"""The pure-JAX blockwise path against the reference: forward, logsumexp and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import attention_jax as aj
from attention_jax import blockwise
from tests.attention_suite import CASES, LOW_PRECISION_CASES, SLOW_CASES, AttentionSuite, make_inputs
from tests.helpers import assert_close

BLOCKWISE_CASES = {
    **CASES,
    "bias_causal": dict(B=2, T=45, S=45, N=2, K=1, H=16, bias=True, options=dict(is_causal=True)),
    "mask_gqa": dict(B=2, T=30, S=50, N=4, K=2, H=16, mask=True),
    "t1000_causal_gqa": SLOW_CASES["t1000_causal_gqa"],
}


class BlockwiseTest(AttentionSuite):
  CHUNKS = blockwise.ChunkSizes(64, 32)   # several chunks per sequence, ragged last chunks

  def attention(self, q, k, v, **options):
    return blockwise.blockwise_attention(q, k, v, chunk_sizes=self.CHUNKS, return_residual=True, **options)

  @parameterized.named_parameters(*((n, n) for n in BLOCKWISE_CASES))
  def test_float32(self, name):
    self.check_case(BLOCKWISE_CASES[name], jnp.float32)

  @parameterized.named_parameters(*((n, n) for n in LOW_PRECISION_CASES))
  def test_bfloat16(self, name):
    self.check_case(CASES[name], jnp.bfloat16)

  def test_float16(self):
    self.check_case(CASES["t90_segments_causal"], jnp.float16)

  def test_default_chunks_and_dispatch(self):
    q, k, v, opts = make_inputs(CASES["window_causal"], jnp.float32)
    want = aj.reference_attention(q, k, v, **opts)
    assert_close(aj.dot_product_attention(q, k, v, implementation="blockwise", **opts), want)
    if jax.default_backend() == "cpu":
      self.assertEqual(aj.core.resolve_implementation("auto", aj.core.prepare_inputs(q, k, v)), "blockwise")
    assert_close(aj.dot_product_attention(q, k, v, **opts), want)

  def test_jit_and_vmap(self):
    q, k, v, opts = make_inputs(CASES["t17_causal"], jnp.float32)
    f = jax.jit(lambda q, k, v: blockwise.blockwise_attention(q, k, v, is_causal=True,
                                                                chunk_sizes=blockwise.ChunkSizes(8, 8)))
    batched = jax.vmap(f)(jnp.stack([q, 2 * q]), jnp.stack([k, k]), jnp.stack([v, -v]))
    assert_close(batched[1], aj.reference_attention(2 * q, k, -v, is_causal=True))

  def test_reference_has_the_same_signature(self):
    q, k, v, opts = make_inputs(CASES["soft_cap"], jnp.float32)
    a = blockwise.blockwise_attention(q, k, v, **opts)
    b = blockwise.blockwise_attention_reference(q, k, v, chunk_sizes=self.CHUNKS, **opts)
    assert_close(a, b)

  def test_traced_scale_is_refused(self):
    q, k, v, _ = make_inputs(CASES["t1"], jnp.float32)
    with self.assertRaisesRegex(ValueError, "scale must be a Python/concrete number"):
      jax.jit(lambda s: blockwise.blockwise_attention(q, k, v, scale=s))(0.5)
    # "auto" falls back to the reference instead.
    jax.jit(lambda s: aj.dot_product_attention(q, k, v, scale=s))(0.5)
