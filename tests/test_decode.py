"""Decode attention over KV caches (contiguous and paged): every implementation against a float64 NumPy loop
written from the definition, against causal full attention on the same prefix, hidden garbage in the cache, GQA,
ragged lengths, windows, soft-cap, Tq > 1, shuffled page tables, jit / vmap, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax as aj
from attention_jax import decode
from tests.helpers import assert_close, enable_x64, randn

CPU_IMPLS = ("reference", "xla", "blockwise")
KERNEL_IMPLS = ("pallas", "pallas_tpu")


def np_decode(q, k, v, lengths, *, scale=None, soft_cap=None, window=None):
  """Float64 loops from the definition: query i of row b sits at p = lengths[b] - Tq + i and sees cache entries
  max(0, p - window) <= j <= p; query head n reads kv head n // (N // K); no visible entry -> zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, Tq, N, H = q.shape
  G = N // k.shape[2]
  scale = H ** -0.5 if scale is None else scale
  out = np.zeros((B, Tq, N, v.shape[-1]))
  for b in range(B):
    for i in range(Tq):
      p = int(lengths[b]) - Tq + i
      lo = 0 if window is None else max(0, p - window)
      js = list(range(lo, p + 1))
      if not js:
        continue
      for n in range(N):
        if not (np.isfinite(k[b, js, n // G]).all() and np.isfinite(v[b, js, n // G]).all()):
          out[b, i, n] = np.nan   # a non-finite entry the query sees
          continue
        s = np.array([scale * q[b, i, n] @ k[b, j, n // G] for j in js])
        if soft_cap is not None:
          s = soft_cap * np.tanh(s / soft_cap)
        w = np.exp(s - s.max())
        w /= w.sum()
        out[b, i, n] = sum(wj * v[b, j, n // G] for wj, j in zip(w, js))
  return out


def _case(seed=0, B=3, Tq=1, N=4, K=2, S=37, H=16, Hv=16, dtype=jnp.float32, lengths=(37, 20, 1)):
  rng = np.random.default_rng(seed)
  q = randn(rng, (B, Tq, N, H), dtype)
  k = randn(rng, (B, S, K, H), dtype)
  v = randn(rng, (B, S, K, Hv), dtype)
  return q, k, v, jnp.asarray(lengths, jnp.int32)


def _skip_unavailable(impl):
  if impl == "pallas":
    pytest.importorskip("attention_jax.kernels.decode_gpu")
  if impl == "pallas_tpu":
    pytest.importorskip("attention_jax.kernels.decode_tpu")


@pytest.mark.parametrize("impl", CPU_IMPLS + KERNEL_IMPLS)
@pytest.mark.parametrize("Tq,K,lengths", [(1, 2, (37, 20, 1)), (3, 1, (37, 5, 2)), (2, 4, (0, 16, 33))])
def test_matches_loops(impl, Tq, K, lengths):
  """GQA / MQA / MHA, ragged lengths in one batch (full, partial, shorter than Tq, empty), Tq > 1."""
  _skip_unavailable(impl)
  q, k, v, lens = _case(Tq=Tq, K=K, lengths=lengths)
  out = aj.decode_attention(q, k, v, kv_lengths=lens, implementation=impl)
  assert_close(out, np_decode(q, k, v, lens), jnp.float32)


@pytest.mark.parametrize("impl", CPU_IMPLS + KERNEL_IMPLS)
def test_window_and_soft_cap(impl):
  _skip_unavailable(impl)
  q, k, v, lens = _case(seed=1, Tq=2, lengths=(37, 9, 30))
  for window, cap in ((6, None), (None, 3.0), (4, 2.0)):
    if impl == "xla" and cap is not None:
      with pytest.raises(NotImplementedError, match="logits_soft_cap"):
        aj.decode_attention(q, k, v, kv_lengths=lens, logits_soft_cap=cap, implementation=impl)
      continue
    out = aj.decode_attention(q, k, v, kv_lengths=lens, local_window_size=window, logits_soft_cap=cap,
                              implementation=impl)
    assert_close(out, np_decode(q, k, v, lens, window=window, soft_cap=cap), jnp.float32,
                 err_msg=f"window={window} cap={cap}")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, 64])
def test_split_counts(num_splits):
  """Splits that divide the cache, that do not (padded), and more splits than entries."""
  q, k, v, lens = _case(seed=2, Tq=2, lengths=(37, 3, 18))
  out = aj.decode_attention(q, k, v, kv_lengths=lens, num_splits=num_splits, implementation="blockwise")
  assert_close(out, np_decode(q, k, v, lens), jnp.float32)


@pytest.mark.parametrize("reduce_form", [True, False])
def test_blockwise_products_as_dots_and_as_reductions(reduce_form):
  """Both ways blockwise forms its products (fused multiply-reductions on CPU, dots elsewhere), with splits that do
  not divide the cache, GQA, Tq > 1, a window and a soft-cap, and bf16."""
  for dtype in (jnp.float32, jnp.bfloat16):
    q, k, v, lens = _case(seed=10, Tq=3, Hv=8, dtype=dtype, lengths=(37, 14, 2))
    inp = decode.prepare(q, k, v, kv_lengths=lens, local_window_size=9, logits_soft_cap=4.0)
    out = jax.jit(lambda inp: decode.blockwise_core(inp, 4, reduce_form=reduce_form))(inp)
    assert out.dtype == dtype
    assert_close(out, np_decode(q, k, v, lens, window=9, soft_cap=4.0), dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float64])
@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_dtypes(dtype, impl):
  with enable_x64():
    q, k, v, lens = _case(seed=3, Tq=2, Hv=8, dtype=dtype, lengths=(37, 11, 2))
    out = aj.decode_attention(q, k, v, kv_lengths=lens, num_splits=3, implementation=impl)
    assert out.dtype == dtype
    assert_close(out, np_decode(q, k, v, lens), dtype)


@pytest.mark.parametrize("impl", CPU_IMPLS + tuple(pytest.param(i, marks=pytest.mark.slow) for i in KERNEL_IMPLS))
def test_equals_row_of_causal_full_attention(impl):
  """Decoding position t of a sequence is row t of causal attention over the whole sequence."""
  _skip_unavailable(impl)
  rng = np.random.default_rng(4)
  T, N, K, H = 21, 4, 2, 16
  q, k, v = randn(rng, (2, T, N, H)), randn(rng, (2, T, K, H)), randn(rng, (2, T, K, H))
  full = aj.dot_product_attention(q, k, v, is_causal=True, implementation="reference")
  cache_k = jnp.zeros((2, 32, K, H)).at[:, :T].set(k)   # the cache is longer than the sequence
  cache_v = jnp.zeros((2, 32, K, H)).at[:, :T].set(v)
  for t in (0, 7, T - 1):
    lens = jnp.full((2,), t + 1, jnp.int32)
    out = aj.decode_attention(q[:, t:t + 1], cache_k, cache_v, kv_lengths=lens, implementation=impl)
    assert_close(out[:, 0], full[:, t], jnp.float32, err_msg=f"t={t}")
  # Speculative decoding: the last 3 positions at once are the last 3 rows.
  out = aj.decode_attention(q[:, T - 3:], cache_k, cache_v, kv_lengths=jnp.full((2,), T, jnp.int32),
                            implementation=impl)
  assert_close(out, full[:, T - 3:], jnp.float32)


@pytest.mark.parametrize("impl", CPU_IMPLS + KERNEL_IMPLS)
def test_hidden_garbage_never_leaks(impl):
  """NaN / inf beyond the lengths and outside the window stay out; a NaN a query sees makes it NaN."""
  _skip_unavailable(impl)
  q, k, v, lens = _case(seed=5, Tq=2, lengths=(30, 12, 0))
  k = k.at[0, 30:].set(jnp.nan).at[1, 12:].set(jnp.inf).at[2].set(jnp.nan)
  v = v.at[0, 30:].set(jnp.nan).at[1, 12:].set(-jnp.inf).at[2].set(jnp.nan)
  k = k.at[0, :20].set(jnp.nan)   # outside a window of 8 for positions 28, 29
  v = v.at[0, :20].set(jnp.inf)
  out = aj.decode_attention(q, k, v, kv_lengths=lens, local_window_size=8, implementation=impl)
  kk, vv = (jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in (k, v))
  expected = np_decode(q, kk, vv, lens, window=8)
  assert np.isfinite(np.asarray(out)).all()
  assert_close(out, expected, jnp.float32)
  np.testing.assert_array_equal(np.asarray(out[2]), 0.0)   # empty row: zeros
  # A visible NaN value poisons the queries that see it, and only those rows.
  v_bad = v.at[1, 11, 0].set(jnp.nan)   # the last entry of row 1: only its last query sees it
  out = np.asarray(aj.decode_attention(q, k, v_bad, kv_lengths=lens, local_window_size=8, implementation=impl))
  assert np.isnan(out[1, 1, :2]).all() and np.isfinite(out[1, 0]).all() and np.isfinite(out[1, 1, 2:]).all()
  assert np.isfinite(out[0]).all()
  if impl != "xla":   # a visible -inf key: NaN (jax.nn, behind "xla", drops the entry instead)
    k_bad = k.at[1, 11, 1].set(-jnp.inf)
    out = np.asarray(aj.decode_attention(q, k_bad, v, kv_lengths=lens, local_window_size=8, implementation=impl))
    assert np.isnan(out[1, 1, 2:]).all() and np.isfinite(out[1, 1, :2]).all() and np.isfinite(out[1, 0]).all()


def _paged(k, v, lens, page_size, seed):
  """Scatter a contiguous cache into a shuffled page pool with spare pages full of garbage."""
  B, S = k.shape[:2]
  per_row = -(-S // page_size)
  rng = np.random.default_rng(seed)
  P = B * per_row + 3
  order = rng.permutation(P)[:B * per_row].reshape(B, per_row)
  kp = np.full((P, page_size) + k.shape[2:], np.nan, np.float32)
  vp = np.full((P, page_size) + v.shape[2:], np.nan, np.float32)
  pad = per_row * page_size - S
  kc = np.pad(np.asarray(k), ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=np.nan)
  vc = np.pad(np.asarray(v), ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=np.nan)
  for b in range(B):
    for i in range(per_row):
      kp[order[b, i]] = kc[b, i * page_size:(i + 1) * page_size]
      vp[order[b, i]] = vc[b, i * page_size:(i + 1) * page_size]
  return jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(order, jnp.int32)


# Every implementation takes 16-entry pages; the pure-JAX ones take any page size (the kernels' own test files
# cover the sizes each kernel takes).
PAGED_CASES = [(impl, 16, 1) for impl in decode.PAGED_IMPLEMENTATIONS] + [
    (impl, page_size, Tq) for impl in ("reference", "blockwise") for page_size, Tq in ((8, 3), (5, 2))]


@pytest.mark.parametrize("impl,page_size,Tq", PAGED_CASES)
def test_paged_shuffled_table(impl, page_size, Tq):
  _skip_unavailable(impl)
  q, k, v, lens = _case(seed=6, Tq=Tq, lengths=(37, 17, 2))
  kp, vp, table = _paged(k, v, lens, page_size, seed=page_size)
  out = aj.paged_decode_attention(q, kp, vp, table, kv_lengths=lens, local_window_size=20, implementation=impl)
  expected = np_decode(q, k, v, lens, window=20)
  assert np.isfinite(np.asarray(out)).all()
  assert_close(out, expected, jnp.float32)


def test_jit_vmap_and_batch_dims():
  q, k, v, lens = _case(seed=7, Tq=2, lengths=(37, 20, 4))
  expected = np_decode(q, k, v, lens)
  f = jax.jit(lambda q, k, v, n: aj.decode_attention(q, k, v, kv_lengths=n, num_splits=2))
  assert_close(f(q, k, v, lens), expected, jnp.float32)   # traced lengths
  per_row = jax.vmap(lambda q, k, v, n: aj.decode_attention(q, k, v, kv_lengths=n, num_splits=2))
  assert_close(per_row(q, k, v, lens), expected, jnp.float32)   # rank-3 inputs under vmap
  out = aj.decode_attention(q.reshape(1, 3, 2, 4, 16), k.reshape(1, 3, 37, 2, 16), v.reshape(1, 3, 37, 2, 16),
                            kv_lengths=lens.reshape(1, 3))
  assert_close(out.reshape(expected.shape), expected, jnp.float32)


def test_gradients_of_pure_jax_paths():
  """Blockwise decode differentiates like any JAX code (to the query and the cache)."""
  with enable_x64():
    q, k, v, lens = _case(seed=8, Tq=2, dtype=jnp.float64, lengths=(37, 9, 1))
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(aj.decode_attention(
        q, k, v, kv_lengths=lens, num_splits=3, local_window_size=7, implementation=impl)))
    got = jax.grad(loss("blockwise"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
      assert_close(g, w, jnp.float64, kind="grad")
    assert np.abs(np.asarray(got[1][1, 9:])).max() == 0.0   # entries past the length get no gradient


def test_empty_and_no_keys():
  q, k, v, _ = _case()
  out = aj.decode_attention(q, k, v, kv_lengths=jnp.zeros((3,), jnp.int32))
  chex.assert_trees_all_equal(out, jnp.zeros_like(out))
  out = aj.decode_attention(q, k[:, :0], v[:, :0], kv_lengths=jnp.zeros((3,), jnp.int32))
  assert out.shape == q.shape and not np.asarray(out).any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(kv_lengths=None), "kv_lengths is required"),
    (dict(kv_lengths=jnp.asarray([1, 2])), r"kv_lengths must be an integer array of shape \[\*B\]=\(3,\)"),
    (dict(kv_lengths=jnp.asarray([1, 2, 38])), r"kv_lengths must lie in \[0, 37\]"),
    (dict(kv_lengths=jnp.asarray([1.0, 2.0, 3.0])), "integer array"),
    (dict(kv_lengths=jnp.asarray([1, 2, 3]), num_splits=0), "num_splits must be a positive int"),
    (dict(kv_lengths=jnp.asarray([1, 2, 3]), logits_soft_cap=-1.0), "logits_soft_cap must be positive"),
    (dict(kv_lengths=jnp.asarray([1, 2, 3]), implementation="flash"), "unknown decode_attention implementation"),
])
def test_bad_arguments(kwargs, match):
  q, k, v, _ = _case()
  with pytest.raises(ValueError, match=match):
    aj.decode_attention(q, k, v, **kwargs)


def test_bad_shapes():
  q, k, v, lens = _case()
  with pytest.raises(ValueError, match=r"multiple of kv heads K=3"):
    aj.decode_attention(q, jnp.zeros((3, 37, 3, 16)), jnp.zeros((3, 37, 3, 16)), kv_lengths=lens)
  with pytest.raises(ValueError, match=r"head dims differ"):
    aj.decode_attention(q, k[..., :8], v, kv_lengths=lens)
  with pytest.raises(ValueError, match=r"batch dims differ"):
    aj.decode_attention(q[:2], k, v, kv_lengths=lens[:2])
  with pytest.raises(ValueError, match=r"share a dtype"):
    aj.decode_attention(q.astype(jnp.bfloat16), k, v, kv_lengths=lens)
  kp, vp, table = _paged(k, v, lens, 8, 0)
  with pytest.raises(ValueError, match=r"page_table entries must lie in \[0, 18\)"):
    aj.paged_decode_attention(q, kp, vp, table.at[0, 0].set(18), kv_lengths=lens)
  with pytest.raises(ValueError, match=r"page_table must be an integer array \[B=3, max_pages\]"):
    aj.paged_decode_attention(q, kp, vp, table[:2], kv_lengths=lens)
  with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, 40\]"):
    aj.paged_decode_attention(q, kp, vp, table, kv_lengths=jnp.asarray([41, 1, 1]))


@pytest.mark.parametrize("chunk", [8, 16, 37])
def test_cleaning_fallback_in_chunks(chunk):
  """The select-only path the fast implementations fall back to when their output is not finite: chunks that
  divide the cache, that do not (the last one shifted back), and one chunk; hidden NaN stays out, visible NaN
  poisons exactly its queries."""
  q, k, v, lens = _case(seed=9, Tq=3, lengths=(37, 12, 2))
  k = k.at[1, 12:].set(jnp.nan).at[0, :10].set(jnp.inf)
  v = v.at[1, 12:].set(jnp.nan).at[0, :10].set(jnp.nan).at[2, 0, 1].set(jnp.nan)
  inp = decode.prepare(q, k, v, kv_lengths=lens, local_window_size=20)
  out = np.asarray(decode._clean_core(inp, chunk=chunk))
  clean = lambda x: jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
  expected = np_decode(q, clean(k), clean(v), lens, window=20)
  # Row 2 (length 2, Tq = 3): queries at positions -1, 0, 1; kv head 1 (query heads 2, 3) has a NaN value at 0.
  assert np.isnan(out[2, 1:, 2:]).all()
  assert_close(out[2, 1:, :2], expected[2, 1:, :2], jnp.float32)
  np.testing.assert_array_equal(out[2, 0], 0.0)                              # position -1: no entry
  assert_close(out[:2], expected[:2], jnp.float32)
