"""``flex_attention(implementation="pallas_tpu")``: the Mosaic TPU kernels, interpreted on CPU.

Outputs are checked against a float64 NumPy oracle (masks and score biases computed in NumPy from the same rule),
gradients against ``implementation="reference"`` (dense, differentiated by JAX). Interpretation costs seconds per
kernel compile: shapes are tiny and a few cases are marked slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import core, flex
from attention_jax.kernels import flex_tpu
from tests.helpers import assert_close, enable_x64, np_softmax_attention, randn


def _inputs(seed, B=1, T=32, S=32, N=2, K=1, H=16, Hv=None, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return (randn(rng, (B, T, N, H), dtype), randn(rng, (B, S, K, H), dtype), randn(rng, (B, S, K, Hv or H), dtype),
          randn(rng, (B, T, N, Hv or H), jnp.float32))


def _np_grid(rule, B, N, T, S):
  """A NumPy ``[B, N, T, S]`` array of ``rule(b, n, i, j)`` evaluated on broadcast index grids."""
  b, n, i, j = np.ix_(np.arange(B), np.arange(N), np.arange(T), np.arange(S))
  return np.broadcast_to(rule(b, n, i, j), (B, N, T, S))


def _grads(impl, q, k, v, cot, score_mod=None, block_mask=None, consts=(), residual=False):
  """``(out, grads of sum(out * cot) w.r.t. q, k, v and consts)``, and the public residual if asked;
  ``score_mod(*consts)`` builds the mod."""
  def loss(q, k, v, *cs):
    mod = None if score_mod is None else score_mod(*cs)
    out, res = flex.flex_attention(q, k, v, mod, block_mask, implementation=impl, return_residual=True)
    return jnp.sum(out.astype(jnp.float32) * cot), (out, res)
  (_, (out, res)), grads = jax.value_and_grad(loss, argnums=tuple(range(3 + len(consts))), has_aux=True)(
      q, k, v, *consts)
  return (out, grads, res) if residual else (out, grads)


def _check_grads(actual, expected, dtype):
  for a, e, name in zip(actual, expected, ("dq", "dk", "dv", "dconst0", "dconst1")):
    assert np.all(np.isfinite(np.asarray(a, np.float64))), name
    assert_close(a, e, dtype, kind="grad", err_msg=name)


def _causal(b, n, i, j):
  return j <= i


def test_no_mods_and_residual():
  q, k, v, cot = _inputs(0, B=2, T=32, S=24)
  bm = flex.dense_block_mask(32, 24, (16, 8))
  out, grads, res = _grads("pallas_tpu", q, k, v, cot, block_mask=bm, residual=True)
  expected, lse = np_softmax_attention(q, k, v)
  assert_close(out, expected, jnp.float32)
  assert_close(res, np.transpose(lse, (0, 2, 1)), jnp.float32)
  _check_grads(grads, _grads("reference", q, k, v, cot, block_mask=bm)[1], jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_causal_odd_lengths_gqa(dtype):
  """T=37, S=29 (ragged last blocks), blocks (16, 8), GQA (N=4, K=2): full, partial and empty blocks."""
  B, T, S, N = 1, 37, 29, 4
  q, k, v, cot = _inputs(1, B=B, T=T, S=S, N=N, K=2, dtype=dtype)
  bm = flex.create_block_mask(_causal, None, None, T, S, block_size=(16, 8))
  out, grads = _grads("pallas_tpu", q, k, v, cot, block_mask=bm)
  expected, _ = np_softmax_attention(q, k, v, mask=_np_grid(lambda b, n, i, j: j <= i, B, N, T, S))
  assert out.dtype == dtype
  assert_close(out, expected, dtype)
  _check_grads(grads, _grads("reference", q, k, v, cot, block_mask=bm)[1], dtype)


@pytest.mark.slow
def test_sliding_window_per_head_gqa_bf16():
  """A window whose width depends on the head (lists per query head in every kernel), GQA, bfloat16."""
  B, T, S, N = 1, 24, 24, 4
  widths = np.array([2, 5, 9, 24], np.int32)
  q, k, v, cot = _inputs(2, B=B, T=T, S=S, N=N, K=2, dtype=jnp.bfloat16)

  def window(b, n, i, j):
    return jnp.abs(i - j) <= jnp.asarray(widths)[n]

  bm = flex.create_block_mask(window, None, N, T, S, block_size=8)
  out, grads = _grads("pallas_tpu", q, k, v, cot, block_mask=bm)
  mask = _np_grid(lambda b, n, i, j: np.abs(i - j) <= widths[n], B, N, T, S)
  assert_close(out, np_softmax_attention(q, k, v, mask=mask)[0], jnp.bfloat16)
  _check_grads(grads, _grads("reference", q, k, v, cot, block_mask=bm)[1], jnp.bfloat16)


def test_alibi_gradient_to_slopes():
  """ALiBi (a score_mod reading a learned array by head) on a causal mask; gradients reach the slopes."""
  B, T, S, N = 2, 24, 24, 2
  q, k, v, cot = _inputs(3, B=B, T=T, S=S, N=N)
  slopes = jnp.asarray([0.3, 0.9], jnp.float32)
  alibi = lambda sl: lambda s, b, n, i, j: s - sl[n] * jnp.abs(i - j).astype(jnp.float32)
  bm = flex.create_block_mask(_causal, None, None, T, S, block_size=8)
  out, grads = _grads("pallas_tpu", q, k, v, cot, alibi, bm, (slopes,))
  bias = _np_grid(lambda b, n, i, j: -np.asarray(slopes, np.float64)[n] * np.abs(i - j), 1, N, T, S)
  expected, _ = np_softmax_attention(q, k, v, mask=_np_grid(lambda b, n, i, j: j <= i, B, N, T, S), bias=bias)
  assert_close(out, expected, jnp.float32)
  _check_grads(grads, _grads("reference", q, k, v, cot, alibi, bm, (slopes,))[1], jnp.float32)


def test_document_mask_traced_per_row():
  """Document ids differing per batch row, traced under jit, block mask built inside the jit (B=2)."""
  B, T, S, N = 2, 32, 32, 2
  q, k, v, cot = _inputs(4, B=B, T=T, S=S, N=N)
  ids = np.array([[0] * 5 + [1] * 14 + [2] * 13, [0] * 20 + [1] * 12], np.int32)

  @jax.jit
  def run(q, k, v, ids):
    def doc(b, n, i, j):
      return (ids[b, i] == ids[b, j]) & (j <= i)
    bm = flex.create_block_mask(doc, B, None, T, S, block_size=8)

    def loss(impl):
      return lambda q, k, v: jnp.sum(flex.flex_attention(q, k, v, block_mask=bm, implementation=impl) * cot)
    out = flex.flex_attention(q, k, v, block_mask=bm, implementation="pallas_tpu")
    return (out, jax.grad(loss("pallas_tpu"), argnums=(0, 1, 2))(q, k, v),
            jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v))

  out, grads, ref_grads = run(q, k, v, jnp.asarray(ids))
  mask = ((ids[:, :, None] == ids[:, None, :]) & np.tril(np.ones((T, S), bool)))[:, None]
  assert_close(out, np_softmax_attention(q, k, v, mask=mask)[0], jnp.float32)
  _check_grads(grads, ref_grads, jnp.float32)


def test_row_without_visible_key():
  """Query 3 sees no key: zeros, the public residual's finfo.min, finite gradients equal to the reference's."""
  B, T, S, N = 1, 16, 16, 2
  q, k, v, cot = _inputs(5, B=B, T=T, S=S, N=N)
  bm = flex.create_block_mask(lambda b, n, i, j: (j <= i) & (i != 3), None, None, T, S, block_size=8)
  out, grads, res = _grads("pallas_tpu", q, k, v, cot, block_mask=bm, residual=True)
  assert np.all(np.asarray(out)[:, 3] == 0)
  assert np.all(np.asarray(res)[:, 3] == np.finfo(np.float32).min)
  mask = _np_grid(lambda b, n, i, j: (j <= i) & (i != 3), B, N, T, S)
  assert_close(out, np_softmax_attention(q, k, v, mask=mask)[0], jnp.float32)
  assert np.all(np.asarray(grads[0])[:, 3] == 0)
  _check_grads(grads, _grads("reference", q, k, v, cot, block_mask=bm)[1], jnp.float32)


def test_nan_in_skipped_and_hidden_keys():
  """NaN in a key block the lists skip (empty for every query block, though no mask_mod hides it) and in a key
  that mask_mod hides inside partial blocks: outputs equal the oracle without those keys, gradients are finite
  and exactly zero for those keys."""
  B, T, S, N, blk = 1, 24, 32, 2, 8
  q, k, v, cot = _inputs(6, B=B, T=T, S=S, N=N)
  hidden_key = 5
  state = np.full((1, 1, T // blk, S // blk), flex.PARTIAL, np.int8)
  state[..., 2] = flex.EMPTY             # key block 2 (keys 16..23) is never listed
  state[:, :, 1, 3] = flex.FULL          # one full block (no mask_mod inside it)
  mod = lambda b, n, i, j: j != hidden_key
  bm = flex.BlockMask.from_state(jnp.asarray(state), (T, S), (blk, blk), mod)
  k_bad = k.at[:, 16:24].set(jnp.nan).at[:, hidden_key].set(jnp.nan)
  v_bad = v.at[:, 16:24].set(jnp.inf).at[:, hidden_key].set(jnp.nan)
  out, grads = _grads("pallas_tpu", q, k_bad, v_bad, cot, block_mask=bm)
  # The oracle: keys of the empty block and the hidden key are invisible; the full block ignores mask_mod, but
  # the hidden key lies in key block 0, so every visible pair is j not in {5} and j not in 16..23.
  visible = _np_grid(lambda b, n, i, j: (j != hidden_key) & ((j < 16) | (j >= 24)), B, N, T, S)
  expected, _ = np_softmax_attention(q, k, v, mask=visible)
  assert_close(out, expected, jnp.float32)
  dk, dv = np.asarray(grads[1]), np.asarray(grads[2])
  assert np.all(dk[:, 16:24] == 0) and np.all(dv[:, 16:24] == 0)
  assert np.all(dk[:, hidden_key] == 0) and np.all(dv[:, hidden_key] == 0)
  # Gradients: the dense reference on clean inputs with a mask_mod hiding the same keys.
  ref_bm = flex.create_block_mask(lambda b, n, i, j: (j != hidden_key) & ((j < 16) | (j >= 24)), None, None, T, S,
                                  block_size=blk)
  _check_grads(grads, _grads("reference", q, k, v, cot, block_mask=ref_bm)[1], jnp.float32)


def test_vmap():
  q, k, v, _ = _inputs(7, B=3, T=16, S=16, N=2)
  bm = flex.create_block_mask(_causal, None, None, 16, 16, block_size=8)
  run = lambda impl: jax.vmap(lambda q, k, v: flex.flex_attention(q, k, v, block_mask=bm, implementation=impl))
  assert_close(run("pallas_tpu")(q, k, v), run("reference")(q, k, v), jnp.float32)


def test_refuses_what_it_cannot_take():
  q, k, v, _ = _inputs(8, T=16, S=16)
  bm = flex.create_block_mask(_causal, None, None, 16, 16, block_size=8)
  f, _ = flex.prepare(q, k, v, None, bm)
  with pytest.raises(core.UnsupportedError, match="multiples of 128"):
    flex_tpu.flex_tpu_core(f, interpret=False)
  with pytest.raises(core.UnsupportedError, match="scale"):
    jax.jit(lambda s: flex.flex_attention(q, k, v, block_mask=bm, scale=s, implementation="pallas_tpu"))(0.5)
  with enable_x64():
    q64, k64, v64 = (x.astype(jnp.float64) for x in (q, k, v))
    with pytest.raises(core.UnsupportedError, match="float64"):
      flex.flex_attention(q64, k64, v64, block_mask=bm, implementation="pallas_tpu")
    out = flex.flex_attention(q64, k64, v64, block_mask=bm, implementation=("pallas_tpu", "blockwise"))
    assert out.dtype == jnp.float64


@pytest.mark.slow
def test_relative_bias_table_gradient_hv_differs():
  """A T5-style relative bias table indexed by clipped relative position (a gather), per-batch mask (Bm=2),
  Hv != H, and an integer array captured beside it (no gradient)."""
  B, T, S, N = 2, 24, 20, 2
  q, k, v, cot = _inputs(9, B=B, T=T, S=S, N=N, H=16, Hv=8)
  table = jnp.asarray(np.random.default_rng(10).standard_normal((N, 9)), jnp.float32)
  offset = jnp.asarray(4, jnp.int32)
  t5 = lambda tb: lambda s, b, n, i, j: s + tb[n, jnp.clip(j - i, -4, 4) + offset]
  lens = np.array([20, 11], np.int32)
  bm = flex.create_block_mask(lambda b, n, i, j: j < jnp.asarray(lens)[b], B, None, T, S, block_size=8)
  out, grads = _grads("pallas_tpu", q, k, v, cot, t5, bm, (table,))
  tb = np.asarray(table, np.float64)
  bias = _np_grid(lambda b, n, i, j: tb[n, np.clip(j - i, -4, 4) + 4], 1, N, T, S)
  mask = _np_grid(lambda b, n, i, j: j < lens[b], B, N, T, S)
  assert_close(out, np_softmax_attention(q, k, v, mask=mask, bias=bias)[0], jnp.float32)
  _check_grads(grads, _grads("reference", q, k, v, cot, t5, bm, (table,))[1], jnp.float32)


@pytest.mark.slow
def test_alibi_bf16_window_gqa():
  B, T, S, N = 1, 33, 41, 4
  q, k, v, cot = _inputs(11, B=B, T=T, S=S, N=N, K=1, dtype=jnp.bfloat16)
  slopes = jnp.asarray([0.1, 0.2, 0.4, 0.8], jnp.float32)
  alibi = lambda sl: lambda s, b, n, i, j: s - sl[n] * jnp.abs(i - j).astype(jnp.float32)
  bm = flex.create_block_mask(lambda b, n, i, j: jnp.abs(i - j) <= 6, None, None, T, S, block_size=(8, 16))
  out, grads = _grads("pallas_tpu", q, k, v, cot, alibi, bm, (slopes,))
  bias = _np_grid(lambda b, n, i, j: -np.asarray(slopes, np.float64)[n] * np.abs(i - j), 1, N, T, S)
  mask = _np_grid(lambda b, n, i, j: np.abs(i - j) <= 6, B, N, T, S)
  assert_close(out, np_softmax_attention(q, k, v, mask=mask, bias=bias)[0], jnp.bfloat16)
  _check_grads(grads, _grads("reference", q, k, v, cot, alibi, bm, (slopes,))[1], jnp.bfloat16)


def _tpu_target():
  """An abstract TPU device, so that Mosaic lowering rules that ask for the chip version run on CPU."""
  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def test_lowers_to_mosaic():
  """Forward and both backward kernels lower to Mosaic for TPU (block shapes, every primitive of a causal mask and
  an arithmetic ALiBi); a score_mod that indexes a captured array is refused up front (dispatch falls through)."""
  B, T, S, N, K, H = 1, 256, 384, 4, 2, 64

  def loss(q, k, v, slopes, indexed: bool):
    if indexed:
      mod = lambda s, b, n, i, j: s - slopes[n] * jnp.abs(i - j).astype(jnp.float32)
    else:
      mod = lambda s, b, n, i, j: s - jnp.exp2(-(n + 1).astype(jnp.float32)) * jnp.abs(i - j).astype(jnp.float32)
    bm = flex.create_block_mask(_causal, None, None, T, S, block_size=128)
    f, _ = flex.prepare(q, k, v, mod, bm)
    return flex_tpu.flex_tpu_core(f, interpret=False)[0].astype(jnp.float32).sum()

  args = (jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16), jax.ShapeDtypeStruct((B, S, K, H), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, S, K, H), jnp.bfloat16), jax.ShapeDtypeStruct((N,), jnp.float32))
  export = lambda indexed: jax.export.export(
      jax.jit(jax.grad(lambda *a: loss(*a, indexed), argnums=(0, 1, 2, 3))), platforms=["tpu"])(*args)
  with _tpu_target():
    module = export(False).mlir_module()
    with pytest.raises(core.UnsupportedError, match="Mosaic cannot lower"):
      export(True)
  for name in ("fwd", "dkdv", "dq"):
    assert f"attention_jax_flex_tpu_{name}" in module
  assert module.count("tpu_custom_call") == 3
