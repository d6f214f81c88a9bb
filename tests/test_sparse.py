"""Block-sparse attention: pattern definitions (hand-checked), the kernel against the dense masked reference
(forward, logsumexp, gradients), cost that follows the non-empty blocks, memory that stays out of T x S."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attention_jax as aj
from attention_jax import sparse
from tests.attention_suite import finite_under_debug_checks
from tests.helpers import assert_close, assert_derivatives_match, enable_x64, np_softmax_attention, randn



def grid(*rows: str) -> np.ndarray:
  """Hand-written mask: one string per query row, '1' = visible key, '.' = not."""
  return np.array([[c == "1" for c in row.replace(" ", "")] for row in rows])


# ----------------------------------------------------------------------------------------------------------
# Masks: small cases written out by hand from the papers' definitions
# ----------------------------------------------------------------------------------------------------------


def test_local_mask_by_hand():
  p = sparse.LocalPattern(1)   # |i - j| <= 1
  np.testing.assert_array_equal(p.dense_mask(5, 5), grid(
      "11...", "111..", ".111.", "..111", "...11"))
  np.testing.assert_array_equal(p.dense_mask(5, 5, is_causal=True), grid(   # i - 1 <= j <= i
      "1....", "11...", ".11..", "..11.", "...11"))
  np.testing.assert_array_equal(p.dense_mask(3, 6), grid("11....", "111...", ".111.."))
  assert p.dense_mask(3, 6).dtype == bool


def test_strided_mask_by_hand():
  # Child et al. 2019, l = 3, causal: {i - 3 < j <= i} U {j <= i : (i - j) mod 3 = 0}.
  np.testing.assert_array_equal(sparse.StridedPattern(3).dense_mask(8, 8, is_causal=True), grid(
      "1.......",
      "11......",
      "111.....",
      "1111....",   # 1, 2, 3 and 0
      ".1111...",   # 2, 3, 4 and 1
      "..1111..",
      "1..1111.",   # 4, 5, 6 and 0, 3
      ".1..1111"))  # 5, 6, 7 and 1, 4
  # Bidirectional extension: |i - j| < 3 or (i - j) mod 3 = 0.
  np.testing.assert_array_equal(sparse.StridedPattern(3).dense_mask(7, 7), grid(
      "1111..1", "11111..", "111111.", "1111111", ".111111", "..11111", "1..1111"))


def test_fixed_mask_by_hand():
  # Child et al. 2019, l = 3, c = 1, causal: same block of 3, or a summary column (j mod 3 = 2), and j <= i.
  np.testing.assert_array_equal(sparse.FixedPattern(3, 1).dense_mask(8, 8, is_causal=True), grid(
      "1.......",
      "11......",
      "111.....",
      "..11....",   # block {3, 4, 5} so far, and summary 2
      "..111...",
      "..1111..",
      "..1..11.",   # block {6, 7, 8} so far, and summaries 2, 5
      "..1..111"))
  # l = 4, c = 2, bidirectional: summaries are columns 2, 3, 6, 7.
  np.testing.assert_array_equal(sparse.FixedPattern(4, 2).dense_mask(8, 8), grid(
      *["1111..11"] * 4, *["..111111"] * 4))
  np.testing.assert_array_equal(sparse.FixedPattern(4, 0).dense_mask(6, 6), grid(
      *["1111.."] * 4, *["....11"] * 2))


def test_global_tokens_mask_by_hand():
  p = sparse.GlobalTokensPattern(1, (0, 4))   # |i - j| <= 1, or i or j in {0, 4}
  np.testing.assert_array_equal(p.dense_mask(6, 6), grid(
      "111111", "111.1.", "11111.", "1.111.", "111111", "1...11"))
  np.testing.assert_array_equal(p.dense_mask(6, 6, is_causal=True), grid(
      "1.....", "11....", "111...", "1.11..", "11111.", "1...11"))
  # A global position past the sequence is ignored; tokens are deduplicated and sorted.
  q = sparse.GlobalTokensPattern(0, [9, 2, 2])
  assert q.global_tokens == (2, 9)
  np.testing.assert_array_equal(q.dense_mask(4, 4), grid("1.1.", ".11.", "1111", "..11"))


def test_bigbird_mask_by_hand():
  # 6 blocks of 2; global blocks 0 and 5 (g = 2: first and last); window of 3 blocks; no random blocks.
  p = sparse.BigBirdPattern(window_blocks=3, global_blocks=2, random_blocks=0, block=2)
  blocks = grid("111111", "111..1", "1111.1", "1.1111", "1..111", "111111")
  np.testing.assert_array_equal(p.block_layout(12, 12, 2), blocks)
  np.testing.assert_array_equal(p.dense_mask(12, 12), np.kron(blocks, np.ones((2, 2), bool)))
  # g = 1: only the first block is global; window of 1 block.
  np.testing.assert_array_equal(sparse.BigBirdPattern(1, 1, 0, block=2).block_layout(6, 6, 2),
                                grid("111", "11.", "1.1"))
  # Odd length: the last block is partial (T = 5 -> blocks {0,1}, {2,3}, {4}).
  np.testing.assert_array_equal(sparse.BigBirdPattern(1, 1, 0, block=2).dense_mask(5, 5),
                                grid("11111", "11111", "1111.", "1111.", "11..1"))


@pytest.mark.parametrize("is_causal", [False, True])
def test_bigbird_random_blocks(is_causal):
  T, b, r = 21, 2, 2   # 11 blocks, the last one partial
  base = sparse.BigBirdPattern(3, 2, 0, seed=0, block=b).block_layout(T, T, b, is_causal=is_causal)
  layouts = [sparse.BigBirdPattern(3, 2, r, seed=s, block=b).block_layout(T, T, b, is_causal=is_causal)
             for s in (0, 0, 1)]
  np.testing.assert_array_equal(layouts[0], layouts[1])            # deterministic in the seed
  assert (layouts[0] != layouts[2]).any()                          # and it matters
  nq = base.shape[0]
  qb, kb = np.arange(nq)[:, None], np.arange(nq)[None, :]
  reachable = kb <= qb if is_causal else np.ones_like(base)
  available = (~base & reachable).sum(axis=1)                      # neither window nor global (nor future)
  for layout in layouts:
    extra = layout & ~base
    assert (layout >= base).all()
    assert not extra[[0, nq - 1]].any()                           # global rows have no random blocks
    np.testing.assert_array_equal(extra.sum(axis=1)[1:-1], np.minimum(r, available)[1:-1])
    assert not (extra & ~reachable).any()                          # causal: drawn from the past only
    # The element mask is constant on each block (up to causality).
    mask = sparse.BigBirdPattern(3, 2, r, seed=0, block=b).dense_mask(T, T, is_causal=is_causal)
    want = np.kron(layouts[0], np.ones((b, b), bool))[:T, :T]
    np.testing.assert_array_equal(mask, want & np.tri(T, dtype=bool) if is_causal else want)


def _paper_mask(name: str, T: int, S: int, is_causal: bool) -> np.ndarray:
  """The definitions again, written loop by loop in the test (not with the code under test)."""
  out = np.zeros((T, S), bool)
  for i in range(T):
    for j in range(S):
      if name == "local":
        ok = abs(i - j) <= 5
      elif name == "strided":
        ok = abs(i - j) < 4 or (i - j) % 4 == 0
      elif name == "fixed":
        ok = i // 6 == j // 6 or j % 6 >= 4
      else:
        ok = abs(i - j) <= 3 or i in (0, 9, 40) or j in (0, 9, 40)
      out[i, j] = ok and (j <= i or not is_causal)
  return out


PATTERNS = {
    "local": sparse.LocalPattern(5),
    "strided": sparse.StridedPattern(4),
    "fixed": sparse.FixedPattern(6, 2),
    "bigbird": sparse.BigBirdPattern(window_blocks=3, global_blocks=2, random_blocks=2, seed=1, block=8),
    "global": sparse.GlobalTokensPattern(3, (0, 9, 40)),
}


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("name", ["local", "strided", "fixed", "global"])
def test_masks_match_definitions_and_layouts(name, is_causal):
  T, S, bs = 45, 31, 8
  mask = PATTERNS[name].dense_mask(T, S, is_causal=is_causal)
  np.testing.assert_array_equal(mask, _paper_mask(name, T, S, is_causal))
  padded = np.pad(mask, ((0, 48 - T), (0, 32 - S)))
  np.testing.assert_array_equal(PATTERNS[name].block_layout(T, S, bs, is_causal=is_causal),
                                padded.reshape(6, bs, 4, bs).any(axis=(1, 3)))


# ----------------------------------------------------------------------------------------------------------
# sparse_attention against the dense masked reference
# ----------------------------------------------------------------------------------------------------------

SHAPES = {
    "t45_gqa": dict(B=2, T=45, S=45, N=4, K=2, H=16),   # T not a multiple of the block; GQA
    "t29_s50_mqa": dict(B=1, T=29, S=50, N=3, K=1, H=32),   # T != S; MQA
}


def _inputs(shape, dtype, seed=0):
  r = np.random.default_rng(seed)
  B, T, S, N, K, H = (shape[k] for k in "BTSNKH")
  Hv = shape.get("Hv", H)
  return randn(r, (B, T, N, H), dtype), randn(r, (B, S, K, H), dtype), randn(r, (B, S, K, Hv), dtype)


def _outputs_and_grads(fn, pattern, q, k, v, ct, **opts):
  """One compiled call: ``(out, lse, (dq, dk, dv))`` of ``sum(out * ct)``."""
  def loss(q, k, v):
    out, lse = fn(q, k, v, pattern, return_residual=True, **opts)
    return (out.astype(jnp.float32) * ct.astype(jnp.float32)).sum(), (out, lse)
  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, lse, grads


def check_against_reference(pattern, q, k, v, *, is_causal, block_size=8):
  """Output, public residual (jax.nn's [B, T, N] logsumexp in the input dtype; rows with no visible key: zeros and
  the dtype's most negative value), and dq/dk/dv against sparse_attention_reference."""
  dtype = q.dtype
  B, T, N = q.shape[:3]
  S = k.shape[1]
  ct = randn(np.random.default_rng(7), q.shape[:-1] + v.shape[-1:], dtype)
  opts = dict(is_causal=is_causal, block_size=block_size)
  out, lse, got = _outputs_and_grads(sparse.sparse_attention, pattern, q, k, v, ct, **opts)
  want, want_lse, exp = _outputs_and_grads(sparse.sparse_attention_reference, pattern, q, k, v, ct, **opts)
  chex.assert_shape((out, lse), (q.shape[:-1] + v.shape[-1:], (B, T, N)))
  assert out.dtype == dtype and lse.dtype == dtype
  assert_close(out, want, dtype, err_msg="output")
  dead = np.broadcast_to(~pattern.dense_mask(T, S, is_causal=is_causal).any(1)[None, :, None], (B, T, N))
  no_key = np.float32(jnp.finfo(dtype).min)
  as_f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_array_equal(as_f32(want_lse)[dead], no_key, err_msg="reference residual of empty rows")
  np.testing.assert_array_equal(as_f32(lse)[dead], no_key, err_msg="residual of rows with no visible key")
  np.testing.assert_array_equal(as_f32(out)[dead], 0.0, err_msg="rows with no visible key")
  assert_close(as_f32(lse)[~dead], as_f32(want_lse)[~dead], dtype, err_msg="residual (logsumexp)")
  chex.assert_tree_all_finite(got)
  for name, g, w in zip(("dq", "dk", "dv"), got, exp):
    assert g.dtype == dtype
    assert_close(g, w, dtype, kind="grad", err_msg=name)


# Every pattern, causal and not, with odd lengths and GQA; the CI subset takes one (causal, shape) per pattern,
# alternating: causal with T != S and MQA, non-causal with T not a multiple of the block and GQA.
CI_SHAPE = {False: "t45_gqa", True: "t29_s50_mqa"}
CI_CAUSAL = {n: i % 2 == 1 for i, n in enumerate(PATTERNS)}


@pytest.mark.parametrize("name,is_causal,shape", [
    pytest.param(n, c, s, marks=() if (s == CI_SHAPE[c] and c == CI_CAUSAL[n]) else pytest.mark.slow)
    for n in PATTERNS for c in (False, True) for s in SHAPES])
def test_float32_matches_reference(name, is_causal, shape):
  check_against_reference(PATTERNS[name], *_inputs(SHAPES[shape], jnp.float32), is_causal=is_causal)


@pytest.mark.parametrize("name", [n if n in ("strided", "bigbird") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PATTERNS])
def test_bfloat16_matches_reference(name):
  check_against_reference(PATTERNS[name], *_inputs(SHAPES["t45_gqa"], jnp.bfloat16), is_causal=True)


@pytest.mark.parametrize("name,is_causal", [("strided", True), ("fixed", False), ("global", True)])
def test_float32_numpy_oracle(name, is_causal):
  """Against the float64 NumPy oracle of tests/helpers.py with the test's own mask (default block size)."""
  q, k, v = _inputs(SHAPES["t29_s50_mqa"], jnp.float32, seed=3)
  out, lse = jax.jit(lambda q, k, v: sparse.sparse_attention(q, k, v, PATTERNS[name], is_causal=is_causal,
                                                              return_residual=True))(q, k, v)
  want, want_lse = np_softmax_attention(q, k, v, mask=_paper_mask(name, 29, 50, is_causal)[None, None])
  assert_close(out, want)
  assert_close(lse, want_lse.transpose(0, 2, 1))


@pytest.mark.parametrize("name,is_causal", [("strided", True), pytest.param("bigbird", True, marks=pytest.mark.slow),
                                             pytest.param("global", False, marks=pytest.mark.slow)])
def test_float64_end_to_end(name, is_causal):
  """float64 inputs compute in float64: ~1e-12 against the NumPy oracle (a float32 step would miss by ~1e-7), and
  float64 gradients against the reference formula."""
  with enable_x64():
    q, k, v = _inputs(SHAPES["t29_s50_mqa"], jnp.float64, seed=4)
    f = lambda q, k, v: sparse.sparse_attention(q, k, v, PATTERNS[name], is_causal=is_causal, block_size=8,
                                                return_residual=True)
    out, lse = f(q, k, v)
    mask = PATTERNS[name].dense_mask(29, 50, is_causal=is_causal)
    if name != "bigbird":
      np.testing.assert_array_equal(mask, _paper_mask(name, 29, 50, is_causal))
    want, want_lse = np_softmax_attention(q, k, v, mask=mask[None, None])
    assert out.dtype == lse.dtype == jnp.float64
    np.testing.assert_allclose(out, want, atol=1e-12, rtol=1e-12)
    np.testing.assert_allclose(lse, want_lse.transpose(0, 2, 1), atol=1e-12, rtol=1e-12)
    ct = randn(np.random.default_rng(5), out.shape, jnp.float64)
    loss = lambda fn: lambda q, k, v: (fn(q, k, v, PATTERNS[name], is_causal=is_causal, block_size=8) * ct).sum()
    got = jax.grad(loss(sparse.sparse_attention), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(sparse.sparse_attention_reference), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, ref):
      assert g.dtype == jnp.float64
      assert_close(g, w, jnp.float64, kind="grad")


@pytest.mark.parametrize("pattern,block_size", [
    (sparse.StridedPattern(1), 16),                     # l = 1: every key visible, all through the strided part
    (sparse.LocalPattern(100), 128),                    # one tile larger than the sequence
    pytest.param(sparse.FixedPattern(64, 3), 32, marks=pytest.mark.slow),
    pytest.param(sparse.BigBirdPattern(1, 0, 1, block=16), 8, marks=pytest.mark.slow)])
def test_dense_patterns_and_large_blocks(pattern, block_size):
  q, k, v = _inputs(SHAPES["t45_gqa"], jnp.float32, seed=5)
  check_against_reference(pattern, q, k, v, is_causal=False, block_size=block_size)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_rows_without_keys(dtype):
  """Queries past every key they may see return zeros (lse -inf) with finite gradients."""
  q, k, v = _inputs(dict(B=2, T=20, S=4, N=2, K=1, H=16), dtype)
  check_against_reference(sparse.LocalPattern(2), q, k, v, is_causal=True)          # rows 6.. see nothing
  if dtype == jnp.float32:
    check_against_reference(sparse.GlobalTokensPattern(1, (3,)), q, k[:, :2], v[:, :2], is_causal=False)  # 4..
  out, lse = sparse.sparse_attention(q, k, v, sparse.LocalPattern(2), block_size=4, return_residual=True)
  no_key = np.float32(jnp.finfo(dtype).min)
  np.testing.assert_array_equal(np.asarray(out[:, 6:], np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(lse[:, 6:], np.float32), no_key)
  assert np.isfinite(np.asarray(lse[:, :6], np.float32)).all() and (np.asarray(lse[:, :6], np.float32) > no_key).all()
  # No keys at all.
  out, lse = sparse.sparse_attention(q, k[:, :0], v[:, :0], sparse.StridedPattern(3), return_residual=True)
  np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(lse, np.float32), no_key)


@pytest.mark.parametrize("name", [n if n in ("strided", "bigbird") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PATTERNS])
def test_keys_outside_the_pattern_get_no_gradient(name):
  """Output row i depends on exactly the keys the mask allows it (dk, dv are zero elsewhere, nonzero inside)."""
  T = 45
  q, k, v = _inputs(dict(B=1, T=T, S=T, N=2, K=1, H=16), jnp.float32, seed=2)
  mask = PATTERNS[name].dense_mask(T, T, is_causal=True)
  f = lambda k, v: sparse.sparse_attention(q, k, v, PATTERNS[name], is_causal=True, block_size=8)
  rows = np.array([0, 8, 17, 40, 44])
  one_hot = jnp.asarray(np.arange(T)[None, :] == rows[:, None], jnp.float32)[:, None, :, None, None]
  pullback = lambda ct: jax.vjp(f, k, v)[1](ct)
  dk, dv = jax.jit(jax.vmap(pullback))(jnp.broadcast_to(one_hot, (len(rows),) + q.shape))
  for i, dk_i, dv_i in zip(rows, dk, dv):
    np.testing.assert_array_equal(np.abs(np.asarray(dv_i[0, :, 0])).sum(-1) > 0, mask[i], err_msg=f"row {i}")
    assert (np.asarray(dk_i[0, ~mask[i]]) == 0).all()


def test_jit_vmap_and_dispatch():
  pattern = PATTERNS["strided"]
  q, k, v = _inputs(SHAPES["t45_gqa"], jnp.float32, seed=4)
  f = lambda q, k, v: aj.sparse_attention(q, k, v, pattern, is_causal=True, block_size=16)
  ref = lambda q, k, v: sparse.sparse_attention_reference(q, k, v, pattern, is_causal=True)
  both = lambda fn: jax.value_and_grad(lambda q, k, v: (fn(q, k, v) * v[:, :45, :1]).sum(), argnums=(0, 1, 2))
  stack = lambda x, y: jnp.stack([x, y])
  value, grads = jax.jit(jax.vmap(both(f)))(stack(q, 2 * q), stack(k, -k), stack(v, v))
  want_value, want_grads = jax.jit(both(ref))(2 * q, -k, v)
  assert_close(value[1], want_value)
  for g, w in zip(grads, want_grads):
    assert_close(g[1], w, kind="grad")
  g = jax.jit(lambda q, k, v: [sparse.sparse_attention(q, k, v, pattern, implementation=i, scale=0.2)
                               for i in ("reference", "gather", "auto", None)])
  dense, *others = g(q, k, v)
  assert_close(dense, sparse.sparse_attention_reference(q, k, v, pattern, scale=0.2))
  for other in others:
    assert_close(other, dense)


# ----------------------------------------------------------------------------------------------------------
# Value head dim, batch dims, zero-size inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,is_causal", [("strided", True), pytest.param("global", False, marks=pytest.mark.slow)])
def test_value_head_dim_differs(name, is_causal):
  q, k, v = _inputs(dict(B=2, T=29, S=37, N=4, K=2, H=16, Hv=24), jnp.float32, seed=6)
  check_against_reference(PATTERNS[name], q, k, v, is_causal=is_causal)


def test_rank3_and_extra_batch_dims():
  r = np.random.default_rng(10)
  q, k, v = randn(r, (2, 3, 20, 4, 8)), randn(r, (2, 3, 26, 2, 8)), randn(r, (2, 3, 26, 2, 5))
  pattern = sparse.StridedPattern(3)
  out, lse = sparse.sparse_attention(q, k, v, pattern, is_causal=True, block_size=4, return_residual=True)
  chex.assert_shape((out, lse), ((2, 3, 20, 4, 5), (2, 3, 20, 4)))
  mask = pattern.dense_mask(20, 26, is_causal=True)[None, None]
  for i in range(2):
    for j in range(3):
      want, want_lse = np_softmax_attention(q[i, j][None], k[i, j][None], v[i, j][None], mask=mask)
      assert_close(out[i, j], want[0])
      assert_close(lse[i, j], want_lse[0].T)
  out3 = sparse.sparse_attention(q[1, 2], k[1, 2], v[1, 2], pattern, is_causal=True, block_size=4)
  chex.assert_shape(out3, (20, 4, 5))
  assert_close(out3, out[1, 2])


@pytest.mark.parametrize("implementation", ["gather", "reference"])
@pytest.mark.parametrize("name", ["B=0", "T=0", "S=0", "Hv=0", "rank3_S=0"])
def test_zero_size_inputs(name, implementation):
  q, k, v = _inputs(dict(B=2, T=9, S=11, N=4, K=2, H=8), jnp.float32, seed=11)
  a, b, c = {"B=0": (q[:0], k[:0], v[:0]), "T=0": (q[:, :0], k, v), "S=0": (q, k[:, :0], v[:, :0]),
             "Hv=0": (q, k, v[..., :0]), "rank3_S=0": (q[0], k[0, :0], v[0, :0])}[name]
  f = lambda a, b, c: sparse.sparse_attention(a, b, c, sparse.StridedPattern(3), is_causal=True, block_size=4,
                                              implementation=implementation, return_residual=True)
  out, lse = f(a, b, c)
  chex.assert_shape((out, lse), (a.shape[:-1] + c.shape[-1:], a.shape[:-1]))
  np.testing.assert_array_equal(out, 0.0)
  np.testing.assert_array_equal(lse, jnp.finfo(jnp.float32).min)
  grads = jax.grad(lambda *x: f(*x)[0].sum(), argnums=(0, 1, 2))(a, b, c)
  for g, x in zip(grads, (a, b, c)):
    chex.assert_shape(g, x.shape)
    np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Garbage at positions the pattern hides never reaches a query
# ----------------------------------------------------------------------------------------------------------


def _garbage_like(x: jax.Array, where_T: np.ndarray) -> jax.Array:
  """``x [B, L, K, D]`` with alternating NaN / Inf on the positions ``where_T [L]``."""
  junk = np.where(np.arange(x.size).reshape(x.shape) % 2, np.nan, np.inf)
  return jnp.where(jnp.asarray(where_T)[None, :, None, None], jnp.asarray(junk, x.dtype), x)


@pytest.mark.parametrize("name,T,S,is_causal", [
    ("local", 37, 20, False),       # queries 25.. see nothing
    ("strided", 20, 33, True),      # keys 20.. are seen by no query (causal)
    pytest.param("fixed", 20, 33, True, marks=pytest.mark.slow),
    pytest.param("global", 20, 33, True, marks=pytest.mark.slow),
    ("bigbird", 20, 33, True)])
def test_garbage_the_pattern_hides_never_leaks(name, T, S, is_causal):
  pattern = PATTERNS[name]
  q, k, v = _inputs(dict(B=2, T=T, S=S, N=4, K=2, H=16, Hv=8), jnp.float32, seed=12)
  visible = pattern.dense_mask(T, S, is_causal=is_causal)                # [T, S], the definition
  hidden_kv, dead_q = ~visible.any(0), ~visible.any(1)
  assert hidden_kv.any() or dead_q.any()
  ct = randn(np.random.default_rng(13), q.shape[:-1] + v.shape[-1:])
  f = lambda q, k, v: sparse.sparse_attention(q, k, v, pattern, is_causal=is_causal, block_size=8)

  @jax.jit
  def run(q, k, v):
    def loss(q, k, v):
      out = f(q, k, v)
      return jnp.where(jnp.isfinite(out), out * ct, 0.0).sum(), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads

  out, grads = run(q, k, v)
  out_p, grads_p = run(_garbage_like(q, dead_q), _garbage_like(k, hidden_kv), _garbage_like(v, hidden_kv))
  assert_close(out_p, out, err_msg="output with garbage at hidden positions")
  for g_name, g, gp, hidden in zip(("dq", "dk", "dv"), grads, grads_p, (dead_q, hidden_kv, hidden_kv)):
    assert_close(gp, g, kind="grad", err_msg=f"{g_name} with garbage at hidden positions")
    np.testing.assert_array_equal(np.asarray(gp)[:, hidden], 0.0, err_msg=f"{g_name} at hidden positions")
  # A NaN query row that sees some keys but not all: only that row turns non-finite, and the gradients of the keys
  # hidden from it and of the other rows stay those of the clean run.
  i = int(np.flatnonzero(visible.any(1) & ~visible.all(1))[0])
  out_q, grads_q = run(q.at[1, i, 3].set(jnp.nan), k, v)
  row = np.zeros(out.shape[:3], bool)
  row[1, i, 3] = True
  assert not np.isfinite(np.asarray(out_q)[row]).any(), "a NaN query row must not be finite"
  assert_close(np.asarray(out_q)[~row], np.asarray(out)[~row], err_msg="rows other than the NaN query row")
  assert_close(np.asarray(grads_q[0])[~row], np.asarray(grads[0])[~row], kind="grad", err_msg="dq, other rows")
  unseen = ~visible[i]
  for g_name, g, gq in zip(("dk", "dv"), grads[1:], grads_q[1:]):
    assert_close(np.asarray(gq)[1, unseen, 1], np.asarray(g)[1, unseen, 1], kind="grad",
                 err_msg=f"{g_name} of keys hidden from the NaN query row")
  # A NaN value, or key, at one key some queries see: exactly those queries' outputs become non-finite.
  seen = np.flatnonzero(visible.any(0))
  j = int(seen[len(seen) // 2])
  sees_j = visible[:, j]
  assert sees_j.any() and (~sees_j).any()
  for v_j, k_j in ((v.at[:, j].set(jnp.nan), k), (v, k.at[:, j, 0, 3].set(jnp.inf))):
    out_nan = np.asarray(f(q, k_j, v_j))
    assert not np.isfinite(out_nan[:, sees_j, :2]).any(), "rows that see the NaN must not be finite"
    assert_close(out_nan[:, ~sees_j], out[:, ~sees_j], err_msg="rows that do not see the NaN")


def test_nan_query_row_is_nan_on_every_call():
  """One compiled executable, called repeatedly on the same input with a NaN in one query row: that row is NaN every
  time. Without the barrier on the logits, XLA:CPU (jax 0.12) returned zeros or the clean row on some calls."""
  r = np.random.default_rng(15)
  q, k, v = randn(r, (2, 7, 4, 16)), randn(r, (2, 9, 2, 16)), randn(r, (2, 9, 2, 16))
  q = q.at[0, 3, 1, 5].set(jnp.nan)
  for _ in range(6):
    out = np.array(sparse.sparse_attention(q, k, v, sparse.LocalPattern(64), block_size=8))
    assert np.isnan(out[0, 3, 1]).all()
    out[0, 3, 1] = 0.0
    assert np.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------
# Forward mode, second order, jax.debug_infs / debug_nans
# ----------------------------------------------------------------------------------------------------------

TINY_PATTERNS = {"strided": sparse.StridedPattern(3), "global": sparse.GlobalTokensPattern(1, (0, 5))}


@pytest.mark.parametrize("name", ["global", pytest.param("strided", marks=pytest.mark.slow)])
def test_forward_mode_and_second_order_match_the_reference(name):
  """jvp / jacfwd / Hessian-vector / grad-of-grad run through the reference formula (the gather's custom VJP has
  no forward mode): same values as differentiating sparse_attention_reference."""
  with enable_x64():
    q, k, v = _inputs(dict(B=1, T=7, S=9, N=2, K=1, H=4, Hv=3), jnp.float64, seed=14)
    opts = dict(is_causal=True, block_size=2)
    f = lambda q, k, v: sparse.sparse_attention(q, k, v, TINY_PATTERNS[name], **opts)
    ref = lambda q, k, v: sparse.sparse_attention_reference(q, k, v, TINY_PATTERNS[name], **opts)
    # First order against finite differences; second order against the reference's own derivatives below.
    check_grads(f, (q, k, v), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
    assert_derivatives_match(f, ref, q, k, v, jacfwd_argnum=1)
    # A gradient taken inside a separately jitted function, differentiated again from outside: the gather's
    # backward (a scan) is itself differentiable.
    loss = lambda fn: lambda q: (fn(q, k, v) ** 2).sum()
    inner = lambda fn: jax.jit(jax.grad(loss(fn)))
    assert_close(jax.grad(lambda q: jnp.sin(inner(f)(q)).sum())(q),
                 jax.grad(lambda q: jnp.sin(inner(ref)(q)).sum())(q), jnp.float64, kind="grad")


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_debug_infs_and_nans_stay_silent(jit):
  """Rows with no visible key (queries 25.. below) keep -inf internal: outputs, residuals and gradients are finite
  under jax.debug_infs / jax.debug_nans, for one component and for merged components."""
  q, k, v = _inputs(dict(B=2, T=37, S=20, N=2, K=1, H=8, Hv=6), jnp.float32, seed=15)
  for pattern in (sparse.LocalPattern(2), sparse.GlobalTokensPattern(1, (30,))):
    f = lambda q, k, v: sparse.sparse_attention(q, k, v, pattern, block_size=8, return_residual=True)
    results = finite_under_debug_checks(f, (q, k, v), jit=jit)
    np.testing.assert_array_equal(results[0][0][:, 25], 0.0)


def test_bad_input_raises():
  q, k, v = _inputs(SHAPES["t45_gqa"], jnp.float32)
  p = sparse.LocalPattern(3)
  with pytest.raises(ValueError, match="same rank"):
    sparse.sparse_attention(q[0, 0], k[0, 0], v[0, 0], p)
  with pytest.raises(ValueError, match="same rank"):
    sparse.sparse_attention(q, k[0], v[0], p)
  with pytest.raises(ValueError, match="head dims differ"):
    sparse.sparse_attention(q, k[..., :8], v, p)
  with pytest.raises(ValueError, match="floating point"):
    sparse.sparse_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32), p)
  for bad in (0, -3, 2.5, True, "8", None):
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
      sparse.sparse_attention(q, k, v, p, block_size=bad)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
      sparse.sparse_attention_reference(q, k, v, p, block_size=bad)
  with pytest.raises(ValueError, match="is_causal must be a Python bool"):
    sparse.sparse_attention(q, k, v, p, is_causal="yes")
  with pytest.raises(ValueError, match="scale must be finite"):
    sparse.sparse_attention(q, k, v, p, scale=float("nan"))
  with pytest.raises(ValueError, match="needs a concrete scale"):
    jax.jit(lambda s: sparse.sparse_attention(q, k, v, p, scale=s))(0.5)
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    sparse.sparse_attention(q[:, :, :3], k, v, p)
  with pytest.raises(ValueError, match="batch sizes differ"):
    sparse.sparse_attention(q, k[:1], v[:1], p)
  with pytest.raises(ValueError, match="pattern must be"):
    sparse.sparse_attention(q, k, v, np.ones((45, 45), bool))
  with pytest.raises(ValueError, match="block_size"):
    sparse.sparse_attention(q, k, v, p, block_size=0)
  with pytest.raises(ValueError, match="unknown implementation"):
    sparse.sparse_attention(q, k, v, p, implementation="pallas")
  with pytest.raises(ValueError, match="pattern must be"):
    sparse.sparse_attention_reference(q, k, v, "local")
  for make, match in ((lambda: sparse.LocalPattern(-1), "window"), (lambda: sparse.LocalPattern(1.5), "window"),
                      (lambda: sparse.StridedPattern(0), "stride"),
                      (lambda: sparse.FixedPattern(4, 5), "num_global=5 must be <= block=4"),
                      (lambda: sparse.BigBirdPattern(window_blocks=2), "odd"),
                      (lambda: sparse.BigBirdPattern(block=0), "block"),
                      (lambda: sparse.GlobalTokensPattern(2, (-1,)), "global token"),
                      (lambda: sparse.GlobalTokensPattern(2, 3), "global_tokens"),
                      (lambda: sparse.LocalPattern("3"), "window"), (lambda: sparse.StridedPattern(2.0), "stride"),
                      (lambda: sparse.StridedPattern(True), "stride"),
                      (lambda: sparse.FixedPattern(4, -1), "num_global"),
                      (lambda: sparse.BigBirdPattern(random_blocks=-1), "random_blocks"),
                      (lambda: sparse.BigBirdPattern(seed=1.5), "seed"),
                      (lambda: sparse.GlobalTokensPattern(-1), "window"),
                      (lambda: sparse.GlobalTokensPattern(1, (2.5,)), "global token")):
    with pytest.raises(ValueError, match=match):
      make()


def test_patterns_are_hashable_values():
  assert sparse.StridedPattern(4) == sparse.StridedPattern(4)
  assert hash(sparse.GlobalTokensPattern(2, [5, 1])) == hash(sparse.GlobalTokensPattern(2, (1, 5)))
  assert sparse.BigBirdPattern(seed=1) != sparse.BigBirdPattern(seed=2)


# ----------------------------------------------------------------------------------------------------------
# Cost: only non-empty blocks are computed; memory stays proportional to them
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_causal", [False, True])
def test_local_computes_exactly_the_nonempty_blocks(is_causal):
  p = sparse.LocalPattern(256)
  for T in (1000, 4096):
    cost = sparse.plan_cost(p, T, T, block_size=128, is_causal=is_causal)
    assert cost["tiles"] == p.block_layout(T, T, 128, is_causal=is_causal).sum()
  # Linear in T: a query block of 128 sees at most 5 key blocks of 128 (window 256 each side).
  cost = sparse.plan_cost(p, 32768, 32768, block_size=128, is_causal=is_causal)
  assert cost["computed_scores"] <= 5 * 128 * 32768


def test_bigbird_computes_its_blocks():
  p = sparse.BigBirdPattern(3, 2, 3, seed=0, block=64)
  T = 4096
  cost = sparse.plan_cost(p, T, T, block_size=128)   # global rows run in tiles of 128, the rest in tiles of 64
  assert cost["computed_scores"] == p.block_layout(T, T, 64).sum() * 64 * 64


def test_strided_and_fixed_cost_t_sqrt_t():
  """With l = sqrt(T) the computed scores grow as T^1.5, although every natural-order block is non-empty."""
  for make in (sparse.StridedPattern, lambda l: sparse.FixedPattern(l, 1)):
    assert make(64).block_layout(4096, 4096, 128).all()          # row-major blocks would be dense
    ratios = []
    for T in (1024, 4096, 16384, 65536):
      l = int(round(T ** 0.5))
      cost = sparse.plan_cost(make(l), T, T, block_size=128, is_causal=False)
      ratios.append(cost["computed_scores"] / T ** 1.5)
    # Tiles of 128 cost O(T * 128) on top of O(T sqrt(T)), which dominates once sqrt(T) > 128.
    assert all(a >= b for a, b in zip(ratios, ratios[1:])) and ratios[-1] <= 4, ratios


def test_gradient_memory_is_linear_in_length():
  """XLA's compiled temporary memory for fwd+bwd grows ~linearly in T and stays far below one T x T matrix."""
  def temp_bytes(T):
    q = jax.ShapeDtypeStruct((1, T, 1, 64), jnp.float32)
    f = jax.grad(lambda q, k, v: sparse.sparse_attention(q, k, v, sparse.LocalPattern(128), block_size=64).sum(),
                 argnums=(0, 1, 2))
    return jax.jit(f).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(2048), temp_bytes(8192)
  assert large <= 5 * small, (small, large)
  assert large < 8192 * 8192 * 4 / 16, large   # one dense float32 score matrix would be 256 MiB


def _largest_intermediate(jaxpr) -> int:
  """Elements of the largest value any equation produces, descending into scan/custom_vjp/pjit bodies."""
  largest = 0
  for eqn in jaxpr.eqns:
    largest = max([largest] + [int(np.prod(getattr(v.aval, "shape", ()))) for v in eqn.outvars])
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          largest = max(largest, _largest_intermediate(sub))
  return largest


@pytest.mark.parametrize("name", ["local", "strided", "global"])
def test_no_t_by_s_intermediate(name):
  """Forward and backward never form anything near a T x S array (here T = S = 2048)."""
  T = 2048
  pattern = {"local": sparse.LocalPattern(64), "strided": sparse.StridedPattern(45),
             "global": sparse.GlobalTokensPattern(64, (0, 1000))}[name]
  q = jax.ShapeDtypeStruct((1, T, 2, 32), jnp.float32)
  loss = lambda q, k, v: sparse.sparse_attention(q, k, v, pattern, is_causal=True, block_size=64).sum()
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q).jaxpr
  assert _largest_intermediate(jaxpr) <= T * T // 16
  dense = jax.make_jaxpr(jax.grad(lambda q, k, v: sparse.sparse_attention_reference(q, k, v, pattern).sum()))
  assert _largest_intermediate(dense(q, q, q).jaxpr) >= T * T   # the check sees the dense one
