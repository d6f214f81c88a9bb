"""The backward of the Mosaic GPU (Hopper) flash kernel, run in Pallas' GPU interpret mode on CPU.

The kernels are wired to the forward by a local ``jax.custom_vjp`` (forward: ``flash_mosaic_gpu._forward_impl`` on
inputs padded as ``mosaic_core`` pads them; backward: ``mosaic_backward``), and the gradients are compared with
those of the reference implementation differentiated by JAX in float64 from the same low-precision inputs
(tests/test_flash_mosaic_gpu.py also runs them through the dispatcher's own custom VJP).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from jax.experimental.pallas import mosaic_gpu as plgpu

from attention_jax import _numerics, core
from attention_jax.kernels import flash_mosaic_gpu as fm
from attention_jax.kernels import flash_mosaic_gpu_bwd as fmb
from tests.helpers import assert_close, enable_x64, np_mask, randn

# name: (B, T, S, N, K, H, Hv, dtype, options, with_d_lse)
CASES = {
    "bf16_causal_gqa": (1, 70, 130, 4, 2, 64, 64, jnp.bfloat16, dict(is_causal=True), False),
    "f16_h128_t_gt_s": (1, 130, 70, 2, 1, 128, 128, jnp.float16, {}, True),
    # Key lengths 0 and 37: batch row 0 sees no key; in row 1 consumer 0's 64 keys cross the length and consumer 1's
    # keys are all beyond it.
    "bf16_kv_lengths_empty_rows": (2, 40, 70, 2, 1, 64, 64, jnp.bfloat16, dict(key_value_seq_lengths=[0, 37]),
                                   False),
    "f16_causal_kv_lengths_hv64_h128": (2, 130, 100, 2, 2, 128, 64, jnp.float16,
                                        dict(is_causal=True, key_value_seq_lengths=[100, 9]), False),
}


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  yield
  interpret_pallas_call.reset_gpu_interpret_mode_state()


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg, q, k, v, kv_len):
  return fm._forward_impl(cfg, q, k, v, kv_len)


def _attend_fwd(cfg, q, k, v, kv_len):
  out, lse = fm._forward_impl(cfg, q, k, v, kv_len)
  return (out, lse), (q, k, v, kv_len, out, jnp.where(jnp.isneginf(lse), 0.0, lse))


def _attend_bwd(cfg, res, cts):
  q, k, v, kv_len, out, lse = res
  dq, dk, dv = fmb.mosaic_backward(cfg, q, k, v, kv_len, out, lse, *cts)
  return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def mosaic_attention(q, k, v, *, is_causal=False, key_value_seq_lengths=None, interpret=None):
  """(out [B, T, N, Hv], lse [B, N, T]) through the forward kernel and this backward, padded as mosaic_core pads."""
  B, T, N, H = q.shape
  S, K, Hv = v.shape[1:]
  blocks = fm.BlockSizes.get_default(max(H, Hv))
  Tp = _numerics.round_up(T, fm.CONSUMERS * blocks.block_q)
  Sp = _numerics.round_up(S, blocks.block_k)
  cfg = fm._Config(scale=1.0 / np.sqrt(H), is_causal=is_causal, T=T, S=S, Tp=Tp, Sp=Sp, groups=N // K,
                   has_kv_len=key_value_seq_lengths is not None, blocks=blocks,
                   interpret=plgpu.InterpretGPUParams() if interpret is None else (interpret or None))
  kv_len = None if key_value_seq_lengths is None else jnp.asarray(key_value_seq_lengths, jnp.int32)
  out, lse = _attend(cfg, _numerics.pad_axis(q, 1, Tp), _numerics.pad_axis(k, 1, Sp), _numerics.pad_axis(v, 1, Sp),
                     kv_len)
  return out[:, :T], lse[:, :, :T]


def reference_attention(q, k, v, mask_BNTS, **options):
  """The reference implementation's output, and a logsumexp written here (the reference stops its gradient): rows
  with no visible key get a finite stand-in (their cotangent is zeroed by ``grads``)."""
  out, _ = core.reference_impl(core.prepare_inputs(q, k, v, **options))
  G = q.shape[2] // k.shape[2]
  logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, G, axis=2)) / np.sqrt(q.shape[-1])
  sees = mask_BNTS.any(-1, keepdims=True)
  logits = jnp.where(mask_BNTS, logits, jnp.where(sees, -jnp.inf, 0.0))
  return out, jax.nn.logsumexp(logits, axis=-1)


def grads(fn, q, k, v, ct_out, ct_lse, mask_BNT):
  """VJP of ``(out, lse)``; the lse cotangent only on rows that see a key (elsewhere lse is -inf)."""
  def f(q, k, v):
    out, lse = fn(q, k, v)
    return out, jnp.where(mask_BNT, lse, jnp.zeros_like(lse))
  _, vjp = jax.vjp(f, q, k, v)
  return vjp((ct_out.astype(q.dtype), ct_lse.astype(jnp.float32 if q.dtype != jnp.float64 else q.dtype)))


def check(name, **kwargs):
  B, T, S, N, K, H, Hv, dtype, options, with_d_lse = CASES[name]
  rng = np.random.default_rng(list(CASES).index(name))
  q, k, v = randn(rng, (B, T, N, H), dtype), randn(rng, (B, S, K, H), dtype), randn(rng, (B, S, K, Hv), dtype)
  ct_out = randn(rng, (B, T, N, Hv), jnp.float32)
  mask = np_mask(B, N, T, S, causal=options.get("is_causal", False), kv_lengths=options.get("key_value_seq_lengths"))
  sees_BNT = mask.any(-1)
  ct_lse = randn(rng, (B, N, T), jnp.float32) if with_d_lse else jnp.zeros((B, N, T), jnp.float32)
  dq, dk, dv = grads(functools.partial(mosaic_attention, **options, **kwargs), q, k, v, ct_out, ct_lse, sees_BNT)
  with enable_x64():
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    reference = functools.partial(reference_attention, mask_BNTS=mask, **options)
    expected = grads(reference, up(q), up(k), up(v), up(ct_out), up(ct_lse), sees_BNT)
    expected = [np.asarray(x) for x in expected]
  for got, want, what in zip((dq, dk, dv), expected, ("dq", "dk", "dv")):
    assert got.dtype == dtype
    assert_close(got, want, dtype, kind="grad", err_msg=f"{name} {what}")
  # Rows that see no key get exactly zero dq; keys no row sees get exactly zero dk, dv.
  dq, dk, dv = (np.asarray(x, np.float32) for x in (dq, dk, dv))
  assert np.all(dq[np.swapaxes(~sees_BNT, 1, 2)] == 0)
  seen_BS = mask.any(axis=(1, 2))
  assert np.all(dk[~seen_BS] == 0) and np.all(dv[~seen_BS] == 0)
  return sees_BNT, seen_BS


def test_bf16_causal_gqa_without_races():
  """The CI case. Both rings wrap (4 (query head, query block) steps for the dK / dV program of the first keys, 4 key
  blocks for dQ, through 2 slots), with the race detector on."""
  check("bf16_causal_gqa", interpret=plgpu.InterpretGPUParams(detect_races=True))
  assert not interpret_pallas_call.get_races().races_found


@pytest.mark.slow
def test_kv_lengths_with_an_empty_batch_row():
  sees, seen = check("bf16_kv_lengths_empty_rows")
  assert not sees[0].any() and not seen[0].any() and seen[1].any()   # the case covers empty rows


@pytest.mark.slow
def test_f16_h128_t_gt_s_with_lse_cotangent():
  check("f16_h128_t_gt_s")


@pytest.mark.slow
def test_f16_causal_kv_lengths_hv_ne_h():
  check("f16_causal_kv_lengths_hv64_h128")


def test_refuses_head_dim_256():
  with pytest.raises(core.UnsupportedError, match="H=256"):
    fmb.check_supported(256, 256)


@pytest.mark.parametrize("H,Hv,causal,lengths", [(64, 64, True, True), (128, 128, False, False),
                                                 (128, 64, True, False)])
def test_lowers_for_hopper(H, Hv, causal, lengths):
  """Both backward kernels lower to Mosaic GPU for an abstract H100 (no GPU needed)."""
  from tests.test_flash_mosaic_gpu import lower_for_cuda

  def f(q, k, v, kv_len, ct):
    out, vjp = jax.vjp(lambda q, k, v: mosaic_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_len,
                                                        interpret=False)[0], q, k, v)
    return vjp(ct)

  sds = jax.ShapeDtypeStruct
  text = lower_for_cuda(f, sds((2, 300, 4, H), jnp.bfloat16), sds((2, 200, 2, H), jnp.bfloat16),
                        sds((2, 200, 2, Hv), jnp.bfloat16), sds((2,), jnp.int32) if lengths else None,
                        sds((2, 300, 4, Hv), jnp.bfloat16))
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3   # the forward and both backward kernels


@pytest.mark.slow
def test_hidden_non_finite_values_never_reach_a_gradient():
  """A NaN query row (row 20) reaches no dk / dv of keys it cannot see (keys 21.. of the causal diagonal tile), and
  NaN keys beyond the key length (60..) reach no dq; those keys get exactly zero dk / dv."""
  rng = np.random.default_rng(11)
  B, T, S, N, K, H, dtype = 1, 70, 70, 2, 1, 64, jnp.bfloat16
  q, k, v = randn(rng, (B, T, N, H), dtype), randn(rng, (B, S, K, H), dtype), randn(rng, (B, S, K, H), dtype)
  ct_out = randn(rng, (B, T, N, H), jnp.float32)
  options = dict(is_causal=True, key_value_seq_lengths=[60])
  mask = np_mask(B, N, T, S, causal=True, kv_lengths=[60])
  bad_q, bad_k = q.at[0, 20, 0].set(jnp.nan), k.at[0, 60:].set(jnp.nan)
  zeros = jnp.zeros((B, N, T), jnp.float32)
  dq, dk, dv = (np.asarray(x, np.float32) for x in grads(functools.partial(mosaic_attention, **options),
                                                         bad_q, bad_k, v, ct_out, zeros, mask.any(-1)))
  with enable_x64():
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    clean_q, clean_k = q.at[0, 20, 0].set(0), k.at[0, 60:].set(0)
    reference = functools.partial(reference_attention, mask_BNTS=mask, **options)
    eq, ek, ev = (np.asarray(x) for x in grads(reference, up(clean_q), up(clean_k), up(v), up(ct_out), up(zeros),
                                                mask.any(-1)))
  rows = np.arange(T) != 20
  assert_close(dq[:, rows, 0], eq[:, rows, 0], dtype, kind="grad")
  assert_close(dq[:, :, 1], eq[:, :, 1], dtype, kind="grad")
  assert_close(dk[:, 21:60], ek[:, 21:60], dtype, kind="grad")
  assert_close(dv[:, 21:60], ev[:, 21:60], dtype, kind="grad")
  assert np.all(dk[:, 60:] == 0) and np.all(dv[:, 60:] == 0)
