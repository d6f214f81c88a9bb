"""The Triton decode kernel (interpret mode on CPU): splits, block skipping, cache lengths that are not whole
blocks, padded head dims, dtypes, paged pools read in place; refusals; lowering to Triton without a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax as aj
from attention_jax import decode
from attention_jax.kernels import decode_gpu
from tests.helpers import assert_close, enable_x64, randn
from tests.test_decode import _paged, np_decode
from tests.test_flash_gpu import lower_for_cuda


def _inputs(seed=0, B=2, Tq=1, N=4, K=2, S=70, H=16, Hv=16, dtype=jnp.float32, lengths=(70, 23)):
  rng = np.random.default_rng(seed)
  return (randn(rng, (B, Tq, N, H), dtype), randn(rng, (B, S, K, H), dtype), randn(rng, (B, S, K, Hv), dtype),
          jnp.asarray(lengths, jnp.int32))


def _run(q, k, v, lens, *, block_k=16, num_splits=None, **opts):
  def f(q, k, v, lens):
    inp = decode.prepare(q, k, v, kv_lengths=lens, **opts)
    return decode_gpu.decode_core(inp, num_splits=num_splits, block_k=block_k)
  return jax.jit(f)(q, k, v, lens)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_splits_and_skipped_blocks(num_splits):
  """16-entry blocks over a 70-entry cache (4 whole blocks + one shifted back), 1..7 splits (7 > blocks: some
  splits see nothing), a short row whose later blocks are never read, and a window that skips early blocks."""
  q, k, v, lens = _inputs(Tq=3, lengths=(70, 23))
  for window in (None, 9):
    out = _run(q, k, v, lens, num_splits=num_splits, local_window_size=window)
    assert_close(out, np_decode(q, k, v, lens, window=window), jnp.float32, err_msg=f"window={window}")


def test_blocks_past_the_length_are_not_read():
  """NaN in every block past the row's length: a kernel that read and multiplied them would return NaN."""
  q, k, v, lens = _inputs(lengths=(33, 1))
  k = k.at[0, 48:].set(jnp.nan).at[1, 16:].set(jnp.nan)
  v = v.at[0, 48:].set(jnp.nan).at[1, 16:].set(jnp.nan)
  out = _run(q, k, v, lens, num_splits=2)
  assert_close(out, np_decode(q, jnp.nan_to_num(k), jnp.nan_to_num(v), lens), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_and_value_head_dim(dtype):
  q, k, v, lens = _inputs(seed=1, Tq=2, Hv=32, dtype=dtype, lengths=(70, 40))
  out = _run(q, k, v, lens, num_splits=2, logits_soft_cap=5.0)
  assert out.dtype == dtype
  assert_close(out, np_decode(q, k, v, lens, soft_cap=5.0), dtype)


def test_padded_shapes():
  """A cache shorter than one block and head dims that are not powers of two are zero-padded inside."""
  for S, H, Hv, lengths in ((9, 16, 16, (9, 4)), (40, 24, 12, (40, 17))):
    q, k, v, lens = _inputs(seed=2, S=S, H=H, Hv=Hv, lengths=lengths)
    out = aj.decode_attention(q, k, v, kv_lengths=lens, implementation="pallas")
    assert_close(out, np_decode(q, k, v, lens), jnp.float32, err_msg=f"S={S} H={H} Hv={Hv}")


@pytest.mark.parametrize("page_size,num_splits", [(16, 1), (16, 3), (32, 2)])
def test_paged_pool_in_place(page_size, num_splits):
  q, k, v, lens = _inputs(seed=3, Tq=2, lengths=(70, 30))
  kp, vp, table = _paged(k, v, lens, page_size, seed=4)
  out = aj.paged_decode_attention(q, kp, vp, table, kv_lengths=lens, num_splits=num_splits, local_window_size=40,
                                  implementation="pallas")
  assert_close(out, np_decode(q, k, v, lens, window=40), jnp.float32)


def test_refusals():
  q, k, v, lens = _inputs()
  with enable_x64(), pytest.raises(NotImplementedError, match="float32, bfloat16 or float16"):
    decode_gpu.decode_core(decode.prepare(*(x.astype(jnp.float64) for x in (q, k, v)), kv_lengths=lens))
  kp, vp, table = _paged(k, v, lens, 8, seed=0)
  with pytest.raises(NotImplementedError, match="page_size and the head dims must be powers of two"):
    aj.paged_decode_attention(q, kp, vp, table, kv_lengths=lens, implementation="pallas")
  # ...and a sequence falls through to the next implementation.
  out = aj.paged_decode_attention(q, kp, vp, table, kv_lengths=lens, implementation=("pallas", "blockwise"))
  assert_close(out, np_decode(q, k, v, lens), jnp.float32)
  with pytest.raises(NotImplementedError, match="no derivative"):
    jax.grad(lambda q: aj.decode_attention(q, k, v, kv_lengths=lens, implementation="pallas").sum())(q)


def test_lowers_to_triton():
  """Contiguous and paged kernels lower to one Triton call each for an H100, without a GPU."""
  q, k, v, lens = _inputs(S=256, H=64, Hv=64, dtype=jnp.bfloat16, lengths=(256, 100))
  contiguous = lambda q, k, v, lens: decode_gpu.decode_core(
      decode.prepare(q, k, v, kv_lengths=lens, local_window_size=50, logits_soft_cap=10.0), num_splits=2,
      interpret=False)
  text = lower_for_cuda(contiguous, q, k, v, lens)
  assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
  kp, vp, table = _paged(k.astype(jnp.float32), v.astype(jnp.float32), lens, 16, seed=1)
  paged = lambda q, kp, vp, table, lens: decode_gpu.paged_decode_core(
      decode.prepare_paged(q, kp, vp, table, kv_lengths=lens), num_splits=4, interpret=False)
  text = lower_for_cuda(paged, q, kp.astype(jnp.bfloat16), vp.astype(jnp.bfloat16), table, lens)
  assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
