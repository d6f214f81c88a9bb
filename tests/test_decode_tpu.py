"""The Pallas TPU (Mosaic) split-K decode kernel, interpreted on CPU, against the float64 NumPy loop of
tests/test_decode.py: split counts (one, several, more than blocks), blocks skipped past short lengths and before
windows, ragged lengths with empty rows, GQA / MQA, Tq in {1, 3}, window, soft-cap, bfloat16 / float32 (float16
interpreted), Hv != H, paged caches with a shuffled table and garbage in spare pages and past the lengths, visible
non-finite entries; the index maps' clamping (skipped steps issue no DMA); refusals (float64, traced scale,
compiled float16 / unaligned pages, GPU backend) and derivatives; lowering to Mosaic for TPU (``jax.export``).

Small blocks (``block_k=8``, a few pages per step) make the tiny caches span several blocks and splits."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import attention_jax as aj
from attention_jax import core, decode
from attention_jax.kernels import decode_tpu
from tests.helpers import assert_close, enable_x64
from tests.test_decode import _case, _paged, np_decode


def _garbage(k, v, lens):
  """NaN keys and inf values past each row's length (stale cache memory)."""
  past = (np.arange(k.shape[1])[None, :] >= np.asarray(lens)[:, None])[:, :, None, None]
  return jnp.where(past, jnp.nan, k), jnp.where(past, jnp.inf, v)


def _contiguous(q, k, v, lens, *, num_splits=None, block_k=None, window=None, cap=None, interpret=None):
  inp = decode.prepare(q, k, v, kv_lengths=lens, local_window_size=window, logits_soft_cap=cap)
  return decode_tpu.decode_core(inp, num_splits=num_splits, block_k=block_k, interpret=interpret)


def _paged_call(q, kp, vp, table, lens, *, num_splits=None, pages_per_block=None, window=None, interpret=None):
  inp = decode.prepare_paged(q, kp, vp, table, kv_lengths=lens, local_window_size=window)
  return decode_tpu.paged_decode_core(inp, num_splits=num_splits, pages_per_block=pages_per_block,
                                      interpret=interpret)


# (block_k, num_splits): 5 blocks of 8 for S = 37 (the last one partial) in 1 or 2 splits, more splits than blocks,
# 3 blocks of 16 in 3 splits, and the defaults (one block, one split on CPU).
@pytest.mark.parametrize("block_k,num_splits", [
    (8, 2), pytest.param(8, 64, marks=pytest.mark.slow),
    pytest.param(8, 1, marks=pytest.mark.slow), pytest.param(16, 3, marks=pytest.mark.slow),
    pytest.param(None, None, marks=pytest.mark.slow)])
def test_splits_blocks_and_ragged_lengths(block_k, num_splits):
  """GQA (G = 2), Tq = 3, lengths full / short (blocks past it skipped; a block boundary among its queries) /
  shorter than Tq / empty."""
  q, k, v, lens = _case(seed=10, B=4, Tq=3, N=4, K=2, lengths=(37, 17, 2, 0))
  expected = np_decode(q, k, v, lens)
  k, v = _garbage(k, v, lens)
  out = _contiguous(q, k, v, lens, num_splits=num_splits, block_k=block_k)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_close(out, expected, jnp.float32)
  np.testing.assert_array_equal(np.asarray(out[3]), 0.0)   # empty row: zeros


@pytest.mark.parametrize("dtype,H,Hv,window,cap", [
    (jnp.bfloat16, 32, 40, 6, 2.0), pytest.param(jnp.float32, 16, 16, 6, None, marks=pytest.mark.slow),
    pytest.param(jnp.float32, 16, 16, None, 3.0, marks=pytest.mark.slow)])
def test_mqa_window_soft_cap(dtype, H, Hv, window, cap):
  """MQA (G = 4), Tq = 1: blocks before the window are skipped (row 1's window starts just past a block
  boundary); garbage outside the window stays out."""
  q, k, v, lens = _case(seed=11, Tq=1, N=4, K=1, H=H, Hv=Hv, dtype=dtype, lengths=(37, 24, 3))
  expected = np_decode(q, k, v, lens, window=window, soft_cap=cap)
  k, v = _garbage(k, v, lens)
  if window is not None:
    k, v = k.at[0, :28].set(jnp.nan), v.at[0, :28].set(-jnp.inf)   # before position 36's window of 6
  out = _contiguous(q, k, v, lens, num_splits=3, block_k=8, window=window, cap=cap)
  assert out.dtype == dtype and out.shape == (3, 1, 4, Hv)
  assert_close(out, expected, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,H,Hv", [(jnp.bfloat16, 32, 40), (jnp.float32, 16, 8), (jnp.float16, 16, 24)])
def test_dtypes_and_value_head_dim(dtype, H, Hv):
  """GQA, Tq = 3, a window; float16 only interpreted (its tiles widened to float32 in the kernel)."""
  q, k, v, lens = _case(seed=12, Tq=3, N=4, K=2, H=H, Hv=Hv, dtype=dtype, lengths=(37, 13, 1))
  out = _contiguous(q, k, v, lens, num_splits=2, block_k=16, window=20)
  assert out.dtype == dtype and out.shape == (3, 3, 4, Hv)
  assert_close(out, np_decode(q, k, v, lens, window=20), dtype)


@pytest.mark.parametrize("page_size,pages_per_block,num_splits", [
    (8, 3, 2), pytest.param(8, 1, 5, marks=pytest.mark.slow), pytest.param(8, None, None, marks=pytest.mark.slow),
    pytest.param(5, 2, 3, marks=pytest.mark.slow)])
def test_paged_shuffled_table_with_garbage(page_size, pages_per_block, num_splits):
  """Pages read in place through a shuffled table; spare pages are NaN, entries past the lengths garbage."""
  q, k, v, lens = _case(seed=13, Tq=3, N=4, K=2, lengths=(37, 17, 2))
  expected = np_decode(q, k, v, lens, window=20)
  k, v = _garbage(k, v, lens)
  kp, vp, table = _paged(k, v, lens, page_size, seed=page_size)
  out = _paged_call(q, kp, vp, table, lens, num_splits=num_splits, pages_per_block=pages_per_block, window=20)
  assert np.isfinite(np.asarray(out)).all()
  assert_close(out, expected, jnp.float32)


@pytest.mark.parametrize("cap", [2.0, pytest.param(None, marks=pytest.mark.slow)])
def test_visible_non_finite_entries_poison_only_their_rows(cap):
  """A NaN value seen in a fully visible block and in a masked block; a -inf key entry (softmax would drop it,
  the soft-cap would flatten it) makes the queries that see it NaN and no others."""
  q, k, v, lens = _case(seed=14, Tq=2, N=4, K=2, lengths=(37, 12, 30))
  v = v.at[0, 10, 0, 3].set(jnp.nan)    # row 0, kv head 0, in a block both queries see whole
  v = v.at[1, 11, 1, 0].set(jnp.nan)    # row 1, kv head 1, the last entry: only query 1 sees it (masked block)
  k = k.at[2, 29, 0, 0].set(-jnp.inf)   # row 2, kv head 0, the last entry
  q = q.at[2, :, :, 0].set(jnp.abs(q[2, :, :, 0]) + 0.5)   # so that its logit is -inf, not +inf
  out = np.asarray(_contiguous(q, k, v, lens, num_splits=2, block_k=8, cap=cap))
  nan = np.zeros(out.shape[:3], bool)   # [B, Tq, N]
  nan[0, :, :2] = True
  nan[1, 1, 2:] = True
  nan[2, 1, :2] = True
  np.testing.assert_array_equal(np.isnan(out).any(-1), nan)
  assert np.isfinite(out[~nan]).all()


def _slots(cfg, b, lens):
  """Per tile position t: the slot each grid step (s, u) of row b reads, in grid order."""
  lens_ref = jnp.asarray(lens, jnp.int32)
  return [[int(decode_tpu._slot(cfg, t, b, s, u, lens_ref)) for s in range(cfg.splits) for u in range(cfg.steps)]
          for t in range(cfg.tiles)]


@pytest.mark.parametrize("page,tiles,splits,steps,window", [(8, 1, 3, 2, None), (8, 1, 2, 3, 5), (4, 3, 2, 2, 6),
                                                            (4, 2, 4, 2, None)])
def test_index_maps_fetch_each_needed_tile_once(page, tiles, splits, steps, window):
  """Consecutive grid steps of a row read each tile slot the row needs exactly once, in order, and nothing else:
  skipped steps repeat the previous block index, which the pipeline does not fetch again."""
  slots = splits * steps * tiles
  cfg = decode_tpu._Config(scale=1.0, soft_cap=None, window_left=window, Tq=2, page=page, tiles=tiles,
                           splits=splits, steps=steps, slots=slots, paged=tiles > 1, hp=128, hvp=128, widen=False,
                           interpret=True)
  cache = slots * page
  lens = list(range(0, cache + 1, 3)) + [cache]
  for b, n in enumerate(lens):
    lo = 0 if window is None else max(0, n - 2 - window)     # lowest position a query of the row sees
    needed = [x for x in range(lo // page, -(-n // page))]
    for t, seq in enumerate(_slots(cfg, b, lens)):
      fetched = [x for i, x in enumerate(seq) if i == 0 or x != seq[i - 1]]
      mine = [x for x in needed if x % tiles == t]
      if mine:
        assert fetched == mine, (n, t, seq)
      else:
        assert len(fetched) == 1 and 0 <= fetched[0] < slots, (n, t, seq)


def test_default_num_splits():
  assert decode_tpu.default_num_splits(100_000, "cpu") == 1
  assert decode_tpu.default_num_splits(100, "tpu") == 1
  assert decode_tpu.default_num_splits(4096, "tpu") == 8
  assert decode_tpu.default_num_splits(100_000, "tpu") == decode_tpu.MAX_SPLITS
  assert decode_tpu._plan(64, 5, 40) == (5, 1)     # never more splits than blocks
  assert decode_tpu._plan(4, 10, 80) == (4, 3)     # 3 + 3 + 3 + 1 blocks


def test_differentiating_raises():
  q, k, v, lens = _case(seed=15, Tq=1, lengths=(37, 5, 1))
  loss = lambda q: aj.decode_attention(q, k, v, kv_lengths=lens, implementation="pallas_tpu").sum()
  with pytest.raises(NotImplementedError, match="no derivative.*'blockwise'"):
    jax.grad(loss)(q)
  kp, vp, table = _paged(k, v, lens, 8, seed=0)
  loss = lambda v: aj.paged_decode_attention(q, kp, v, table, kv_lengths=lens, implementation="pallas_tpu").sum()
  with pytest.raises(NotImplementedError, match="no derivative"):
    jax.grad(loss)(vp)


def test_refusals():
  q, k, v, lens = _case(seed=16, Tq=1, lengths=(37, 5, 1))
  with enable_x64():
    q64, k64, v64 = (x.astype(jnp.float64) for x in (q, k, v))
    with pytest.raises(core.UnsupportedError, match=r"float64.*query.shape=\(3, 1, 4, 16\)"):
      aj.decode_attention(q64, k64, v64, kv_lengths=lens, implementation="pallas_tpu")
    out = aj.decode_attention(q64, k64, v64, kv_lengths=lens, implementation=("pallas_tpu", "blockwise"))
    assert_close(out, np_decode(q, k, v, lens), jnp.float64)   # fell through
  inp = decode.prepare(q, k, v, kv_lengths=lens)
  with pytest.raises(core.UnsupportedError, match="concrete scale"):
    jax.jit(lambda s: decode_tpu.decode_core(inp._replace(scale=s), num_splits=None))(0.25)
  with pytest.raises(core.UnsupportedError, match="float16 when compiled"):
    _contiguous(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), lens, interpret=False)
  kp, vp, table = _paged(k, v, lens, 5, seed=0)
  with pytest.raises(core.UnsupportedError, match=r"page_size to be a multiple of 8.*got page_size=5"):
    _paged_call(q, kp, vp, table, lens, interpret=False)
  with pytest.raises(core.UnsupportedError, match="block_k to be a multiple of 128"):
    _contiguous(q, k, v, lens, block_k=8, interpret=False)
  with pytest.raises(ValueError, match="block_k must be a positive multiple of 8"):
    _contiguous(q, k, v, lens, block_k=12)
  with mock.patch.object(jax, "default_backend", return_value="gpu"):
    with pytest.raises(core.UnsupportedError, match="backend is 'gpu'"):
      _contiguous(q, k, v, lens)


def _tpu_target():
  """An abstract TPU device, so that Mosaic lowering rules that ask for the chip version run on CPU."""
  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def _mosaic(fn, *args) -> str:
  with _tpu_target():
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


@pytest.mark.parametrize("dtype,H,Hv,window,cap", [(jnp.bfloat16, 128, 128, None, None),
                                                    (jnp.float32, 80, 64, 100, 30.0)])
def test_lowers_to_mosaic(dtype, H, Hv, window, cap):
  """Contiguous (4 splits of 512-entry blocks, a partial last block) and paged (4 pages of 16 per step) calls lower
  to one Mosaic TPU custom call each: block shapes fit the tiling and every primitive has a Mosaic lowering."""
  B, Tq, N, K, S, P, page, pages = 2, 3, 8, 2, 2000, 64, 16, 20
  spec = jax.ShapeDtypeStruct
  lens = spec((B,), jnp.int32)

  def contiguous(q, k, v, lens):
    inp = decode.DecodeInputs(q, k, v, lens, H ** -0.5, cap, window)
    return decode_tpu.decode_core(inp, num_splits=4, interpret=False)

  def paged(q, k, v, table, lens):
    inp = decode.PagedInputs(q, k, v, table, lens, H ** -0.5, cap, window)
    return decode_tpu.paged_decode_core(inp, num_splits=2, pages_per_block=4, interpret=False)

  q = spec((B, Tq, N, H), dtype)
  module = _mosaic(contiguous, q, spec((B, S, K, H), dtype), spec((B, S, K, Hv), dtype), lens)
  assert module.count("tpu_custom_call") == 1 and "attention_jax_decode_tpu" in module
  module = _mosaic(paged, q, spec((P, page, K, H), dtype), spec((P, page, K, Hv), dtype),
                   spec((B, pages), jnp.int32), lens)
  assert module.count("tpu_custom_call") == 1 and "attention_jax_decode_tpu_paged" in module


@pytest.mark.slow
def test_entry_points_under_x64_vmap_and_batch_dims():
  """Through decode_attention / paged_decode_attention: float32 under jax_enable_x64, jax.vmap over rank-3
  inputs, extra leading batch dims."""
  q, k, v, lens = _case(seed=18, Tq=2, N=4, K=2, lengths=(37, 17, 0))
  expected = np_decode(q, k, v, lens, window=5, soft_cap=3.0)
  call = lambda q, k, v, n: aj.decode_attention(q, k, v, kv_lengths=n, local_window_size=5, logits_soft_cap=3.0,
                                                num_splits=2, implementation="pallas_tpu")
  with enable_x64():
    out = call(q, k, v, lens)
    assert out.dtype == jnp.float32
    assert_close(out, expected, jnp.float32)
    kp, vp, table = _paged(k, v, lens, 8, seed=2)
    out = aj.paged_decode_attention(q, kp, vp, table, kv_lengths=lens, local_window_size=5, logits_soft_cap=3.0,
                                    num_splits=2, implementation="pallas_tpu")
    assert_close(out, expected, jnp.float32)
  assert_close(jax.vmap(call)(q, k, v, lens), expected, jnp.float32)
  out = call(q.reshape(1, 3, 2, 4, 16), k.reshape(1, 3, 37, 2, 16), v.reshape(1, 3, 37, 2, 16), lens.reshape(1, 3))
  assert_close(out.reshape(expected.shape), expected, jnp.float32)


@pytest.mark.slow
def test_tpu_interpret_mode():
  """The TPU interpret mode simulates the DMAs and VMEM (uninitialised buffers are NaN, out-of-bounds reads
  raise): clamped block indices, partial last blocks and scratch initialisation."""
  q, k, v, lens = _case(seed=17, Tq=3, N=4, K=2, lengths=(37, 5, 0))
  expected = np_decode(q, k, v, lens, window=6)
  k, v = _garbage(k, v, lens)
  out = _contiguous(q, k, v, lens, num_splits=2, block_k=8, window=6, interpret=pltpu.InterpretParams())
  assert_close(out, expected, jnp.float32)
  kp, vp, table = _paged(k, v, lens, 8, seed=1)
  out = _paged_call(q, kp, vp, table, lens, num_splits=2, pages_per_block=2, window=6,
                    interpret=pltpu.InterpretParams())
  assert_close(out, expected, jnp.float32)
