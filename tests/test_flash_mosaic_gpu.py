"""The Mosaic GPU (Hopper) flash-attention forward kernel, run in Pallas' GPU interpret mode on CPU.

Interpret mode simulates the warpgroups, SMEM, mbarriers, TMA copies and wgmma, and reports barrier misuse
(a phase completed that no thread observed) and, with ``detect_races=True``, data races. Every output is checked
against the float64 NumPy oracle of tests/helpers.py. ``LoweringTest`` lowers the kernel for an abstract H100
without a GPU (Pallas -> Mosaic GPU IR), so a construct Mosaic GPU cannot lower fails in CPU CI.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from attention_jax import core
from attention_jax.kernels import flash_mosaic_gpu as fm
from tests.helpers import assert_close, enable_x64, np_mask, np_softmax_attention, randn

# name: (B, T, S, N, K, H, Hv, dtype, options). T and S are not multiples of the tiles (ragged last blocks);
# S > 128 or T > 128 spans several key blocks / query programs.
CASES = {
    "bf16_causal_gqa": (1, 70, 130, 4, 2, 64, 64, jnp.bfloat16, dict(is_causal=True)),
    "f16_causal_gqa_h128_t_gt_s": (1, 130, 70, 4, 2, 128, 128, jnp.float16, dict(is_causal=True)),
    "bf16_h128": (1, 70, 130, 2, 1, 128, 128, jnp.bfloat16, {}),
    "f16_gqa_h64": (1, 70, 130, 4, 2, 64, 64, jnp.float16, {}),
    "bf16_kv_lengths_empty_rows": (2, 40, 130, 2, 1, 64, 64, jnp.bfloat16,
                                   dict(key_value_seq_lengths=[0, 77], query_seq_lengths=[40, 23])),
    "f16_causal_kv_lengths_hv64_h128": (2, 130, 100, 2, 2, 128, 64, jnp.float16,
                                        dict(is_causal=True, key_value_seq_lengths=[100, 9])),
    "bf16_h256_causal": (1, 70, 130, 1, 1, 256, 256, jnp.bfloat16, dict(is_causal=True)),
    # With 64-key blocks and 2 ring slots: 5 key blocks stream through 2 slots, and under the causal mask consumer 0
    # (earlier rows) of each program finishes first and frees the blocks only consumer 1 needs.
    "f16_causal_ring_wrap": (1, 130, 260, 2, 1, 64, 64, jnp.float16, dict(is_causal=True)),
}


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  """A kernel that fails inside the interpreter leaves its simulated state behind; clear it for the next test."""
  yield
  interpret_pallas_call.reset_gpu_interpret_mode_state()


def run_and_oracle(name, interpret=None, block_sizes=None):
  B, T, S, N, K, H, Hv, dtype, options = CASES[name]
  rng = np.random.default_rng(list(CASES).index(name))
  q, k, v = randn(rng, (B, T, N, H), dtype), randn(rng, (B, S, K, H), dtype), randn(rng, (B, S, K, Hv), dtype)
  inp = core.prepare_inputs(q, k, v, **options)
  out, lse = fm.mosaic_core(inp, interpret=interpret, block_sizes=block_sizes)
  mask = np_mask(B, N, T, S, causal=options.get("is_causal", False), q_lengths=options.get("query_seq_lengths"),
                 kv_lengths=options.get("key_value_seq_lengths"))
  expected_out, expected_lse = np_softmax_attention(q, k, v, mask=mask)
  return out, lse, expected_out, expected_lse, mask, dtype


def check(name, **kwargs):
  out, lse, expected_out, expected_lse, mask, dtype = run_and_oracle(name, **kwargs)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert_close(out, expected_out, dtype)
  empty_BNT = ~mask.any(-1)
  # Rows with no visible key: exactly zero output and lse = -inf (the oracle's -inf would fail allclose).
  assert np.all(np.asarray(out, np.float32)[np.swapaxes(empty_BNT, 1, 2)] == 0)
  assert np.all(np.isneginf(np.asarray(lse)[empty_BNT]))
  assert_close(np.where(empty_BNT, 0.0, lse), np.where(empty_BNT, 0.0, expected_lse), dtype)
  return empty_BNT


# CI keeps a bf16 causal GQA case, the lengths case and H=128; the rest run under -m slow.
_CI_CASES = ("bf16_causal_gqa", "bf16_kv_lengths_empty_rows", "f16_causal_gqa_h128_t_gt_s")


@pytest.mark.parametrize("name", [n if n in _CI_CASES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CASES if n != "f16_causal_ring_wrap"])
def test_matches_oracle(name):
  empty = check(name)
  if name == "bf16_kv_lengths_empty_rows":
    assert empty.any()   # the case does cover rows with no visible key


def test_hidden_non_finite_values_never_reach_a_row():
  """NaN values past the kv lengths and above the causal diagonal stay out (the kernel's P V product would let them
  through 0 * NaN; the wrapper reruns such calls through the selecting path); a visible NaN poisons its rows."""
  rng = np.random.default_rng(7)
  B, T, S, N, K, H = 2, 40, 70, 2, 1, 64
  q, k, v = (randn(rng, (B, T, N, H), jnp.bfloat16), randn(rng, (B, S, K, H), jnp.bfloat16),
             randn(rng, (B, S, K, H), jnp.bfloat16))
  v = v.at[0, 50:].set(jnp.nan).at[1, 39].set(jnp.inf)   # row 0: past its length 50; row 1: key 39, causal
  inp = core.prepare_inputs(q, k, v, is_causal=True, key_value_seq_lengths=[50, 70])
  out, _ = fm.mosaic_core(inp)
  mask = np_mask(B, N, T, S, causal=True, kv_lengths=[50, 70])
  clean = jnp.nan_to_num(v, nan=0.0, posinf=0.0)
  expected, _ = np_softmax_attention(q, k, clean, mask=mask)
  out = np.asarray(out, np.float32)
  assert np.isfinite(out[0]).all() and np.isfinite(out[1, :39]).all()
  assert np.isnan(out[1, 39:]).all()                    # queries 39.. see key 39
  assert_close(out[0], expected[0], jnp.bfloat16)
  assert_close(out[1, :39], expected[1, :39], jnp.bfloat16)


def test_ring_wraps_without_races():
  """More key blocks than ring slots (the producer refills slots the consumers freed), causal, with the race
  detector on."""
  check("f16_causal_ring_wrap", interpret=plgpu.InterpretGPUParams(detect_races=True),
        block_sizes=fm.BlockSizes(block_k=64, num_stages=2))
  assert not interpret_pallas_call.get_races().races_found


def inputs(dtype=jnp.bfloat16, H=64, Hv=None, **options):
  rng = np.random.default_rng(0)
  q, k = randn(rng, (1, 8, 2, H), dtype), randn(rng, (1, 8, 2, H), dtype)
  return core.prepare_inputs(q, k, randn(rng, (1, 8, 2, Hv or H), dtype), **options)


@pytest.mark.parametrize("dtype,H,Hv", [(jnp.float32, 64, 64), (jnp.bfloat16, 32, 32), (jnp.bfloat16, 64, 96),
                                        (jnp.float16, 80, 64)])
def test_refuses_dtypes_and_head_dims(dtype, H, Hv):
  with pytest.raises(core.UnsupportedError, match=r"query.shape=\(1, 8, 2, "):
    fm.mosaic_core(inputs(dtype, H, Hv))


def test_refuses_float64():
  with enable_x64():
    with pytest.raises(core.UnsupportedError, match="float64"):
      fm.mosaic_core(inputs(jnp.float64))


@pytest.mark.parametrize("what,options", [
    ("mask array", dict(mask=np.ones((8, 8), bool))), ("bias array", dict(bias=np.zeros((8, 8), np.float32))),
    ("segment ids", dict(q_segment_ids=np.zeros((1, 8), np.int32), kv_segment_ids=np.zeros((1, 8), np.int32))),
    ("window", dict(local_window_size=3)), ("soft-cap", dict(logits_soft_cap=5.0))])
def test_refuses_options(what, options):
  with pytest.raises(core.UnsupportedError, match=what.split()[0]):
    fm.mosaic_core(inputs(**options))


def test_refuses_what_does_not_fit_shared_memory():
  with pytest.raises(core.UnsupportedError, match="shared memory"):
    fm.mosaic_core(inputs(H=256), block_sizes=fm.BlockSizes(block_k=256, num_stages=4))


def test_gradients_through_the_dispatcher():
  """``jax.grad`` of ``dot_product_attention(implementation="mosaic")`` runs the Mosaic backward kernels (custom VJP
  in ``mosaic_core``): causal GQA with key lengths (one batch row with none) and query lengths, against the float64
  reference's gradients; rows and keys that see nothing get exactly zero."""
  import attention_jax as aj
  rng = np.random.default_rng(11)
  q, k, v = (randn(rng, (2, 40, 4, 64), jnp.bfloat16), randn(rng, (2, 70, 2, 64), jnp.bfloat16),
             randn(rng, (2, 70, 2, 64), jnp.bfloat16))
  opts = dict(is_causal=True, key_value_seq_lengths=jnp.asarray([0, 37]), query_seq_lengths=jnp.asarray([40, 23]))
  ct = randn(rng, (2, 40, 4, 64), jnp.float32)
  loss = lambda impl: lambda q, k, v: jnp.sum(
      aj.dot_product_attention(q, k, v, implementation=impl, **opts).astype(jnp.float32) * ct)
  got = jax.grad(loss("mosaic"), argnums=(0, 1, 2))(q, k, v)
  with enable_x64():
    want = jax.grad(loss("reference"), argnums=(0, 1, 2))(*(x.astype(jnp.float64) for x in (q, k, v)))
  for g, w in zip(got, want):
    assert np.isfinite(np.asarray(g, np.float32)).all()
    assert_close(g, w, jnp.bfloat16, kind="grad")
  assert not np.asarray(got[0][0], np.float32).any() and not np.asarray(got[1][0], np.float32).any()


def test_head_dim_256_has_no_backward():
  inp = inputs(H=256)

  def loss(q):
    return fm.mosaic_core(inp._replace(query=q))[0].astype(jnp.float32).sum()

  with pytest.raises(NotImplementedError, match="takes head dims H, Hv in"):
    jax.grad(loss)(inp.query)


def test_block_sizes():
  assert fm.BlockSizes.get_default(64) == fm.BlockSizes(64, 128, 3)
  assert fm.BlockSizes.get_default(100, jnp.float16).block_k == 64
  for bad in (dict(block_q=128), dict(block_k=96), dict(num_stages=1), dict(block_k=True)):
    with pytest.raises(ValueError, match="BlockSizes"):
      fm.BlockSizes(**bad)
  for bad in (32, 96, 0, True, "64"):
    with pytest.raises(ValueError, match="block_sizes"):
      fm.check_block_sizes(bad)
  assert fm.check_block_sizes(128) == 128
  for H in fm.HEAD_DIMS:   # every default row fits in shared memory, also with Hv != H
    assert fm.BlockSizes.get_default(H).smem_bytes(H, 64, 2) <= fm.SMEM_BYTES
    assert fm.BlockSizes.get_default(H).smem_bytes(H, H, 2) <= fm.SMEM_BYTES


def lower_for_cuda(fn, *args) -> str:
  """StableHLO of ``fn`` lowered for CUDA without a GPU: Pallas builds the Mosaic GPU IR for an abstract H100."""
  dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev)):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("H,Hv,causal,lengths", [(64, 64, True, False), (128, 128, True, True),
                                                 (256, 256, False, True), (128, 64, False, False)])
def test_lowers_for_hopper(H, Hv, causal, lengths):
  def f(q, k, v, kv_len):
    inp = core.prepare_inputs(q, k, v, is_causal=causal, key_value_seq_lengths=kv_len)
    return fm.mosaic_core(inp, interpret=False)

  sds = jax.ShapeDtypeStruct
  text = lower_for_cuda(f, sds((2, 300, 4, H), jnp.bfloat16), sds((2, 200, 2, H), jnp.bfloat16),
                        sds((2, 200, 2, Hv), jnp.bfloat16), sds((2,), jnp.int32) if lengths else None)
  assert "mosaic_gpu" in text


def test_public_entry_point_and_reference():
  """``aj.kernels.flash_attention_mosaic`` (caller's batch dims, residual in jax.nn's format) against its
  ``_reference`` twin, which shares the argument checks and computes the plain formula."""
  import attention_jax as aj
  rng = np.random.default_rng(3)
  q, k, v = (randn(rng, (2, 1, 33, 2, 64), jnp.bfloat16), randn(rng, (2, 1, 50, 1, 64), jnp.bfloat16),
             randn(rng, (2, 1, 50, 1, 64), jnp.bfloat16))
  got, lse = aj.kernels.flash_attention_mosaic(q, k, v, is_causal=True, return_residual=True)
  want, want_lse = aj.kernels.flash_attention_mosaic_reference(q, k, v, is_causal=True, block_sizes=64,
                                                               return_residual=True)
  assert got.shape == q.shape and lse.shape == q.shape[:-1]
  assert_close(got, want, jnp.bfloat16)
  assert_close(lse, want_lse, jnp.bfloat16)
