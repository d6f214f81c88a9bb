"""flex_attention, BlockMask and the mods library: every mod against a float64 NumPy oracle written from the
definitions (not from the library), the blockwise path against the dense reference (forward and gradients, to q,
k, v and captured arrays), block classification safety, the built-in options and sparse patterns expressed as mods,
and the error messages."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import core, flex, mods, sparse
from tests.helpers import assert_close, enable_x64, np_mask, np_softmax_attention, qkv, randn

B, T, S, N, K, H = 2, 37, 29, 4, 2, 8
BLOCK = 8


def _ids(rng, length, docs=4):
  return np.sort(rng.integers(0, docs, (B, length)), axis=1).astype(np.int32)


# Mask cases: name -> (mask_mod, B dependence, NumPy oracle [B|1, 1, T, S]) built from first principles.
def _mask_case(name, rng, T=T, S=S):
  i, j = np.arange(T)[:, None], np.arange(S)[None, :]
  if name == "none":
    return None, None, np.ones((1, 1, T, S), bool)
  if name == "causal":
    return mods.causal(), None, np_mask(1, 1, T, S, causal=True)
  if name == "window":
    return mods.sliding_window((5, 2)), None, np_mask(1, 1, T, S, window=(5, 2))
  if name == "causal_window":
    return mods.causal() & mods.sliding_window((7, 0)), None, np_mask(1, 1, T, S, causal=True, window=(7, 0))
  if name == "prefix_lm":
    p = np.array([4, 11], np.int32)
    return mods.prefix_lm(p), B, np.stack([(j <= i) | (j < p[b]) for b in range(B)])[:, None]
  if name == "document":
    q_ids, kv_ids = _ids(rng, T), _ids(rng, S)
    return mods.document(q_ids, kv_ids), B, np_mask(B, 1, T, S, q_seg=q_ids, kv_seg=kv_ids)
  if name == "lengths":
    ql, kl = np.array([T, 20]), np.array([13, S])
    return mods.lengths(ql, kl), B, np_mask(B, 1, T, S, q_lengths=ql, kv_lengths=kl)
  if name == "random_table":   # an arbitrary user mod (no classifier): evaluated exactly per query block
    table = rng.random((B, 1, T, S)) < 0.3
    t = jnp.asarray(table)
    return (lambda b, n, qi, kj: t[b, 0, qi, kj]), B, table
  pattern = {"local": sparse.LocalPattern(4), "strided": sparse.StridedPattern(6), "fixed": sparse.FixedPattern(8, 2),
             "bigbird": sparse.BigBirdPattern(3, 2, 1, seed=1, block=4),
             "global": sparse.GlobalTokensPattern(3, (0, 17))}[name]
  return mods.from_pattern(pattern, T, S), None, pattern.dense_mask(T, S)[None, None]


MASKS = ("none", "causal", "window", "causal_window", "prefix_lm", "document", "lengths", "random_table", "local",
         "strided", "fixed", "bigbird", "global")


def _np_t5_bucket(rel, num_buckets, bidirectional, max_distance):
  """T5's bucketing, written again from the paper's reference code (scalar Python)."""
  n, ret = -rel, 0
  if bidirectional:
    num_buckets //= 2
    ret += num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  return ret + min(large, num_buckets - 1)


def _score_case(name, rng, T=T, S=S):
  """(score_mod factory of its params, params, NumPy bias [1|B, N, T, S], soft_cap)."""
  i, j = np.arange(T)[:, None], np.arange(S)[None, :]
  if name == "none":
    return None, None, None, None
  if name == "alibi":
    slopes = mods.alibi_slopes(N) * 4
    return mods.alibi, jnp.asarray(slopes), -slopes[None, :, None, None] * np.abs(i - j)[None, None], None
  if name == "t5":
    table = rng.standard_normal((16, N)).astype(np.float32)
    buckets = np.vectorize(lambda a, b: _np_t5_bucket(b - a, 16, True, 20))(i, j)
    make = lambda t: mods.relative_position_bias(t, max_distance=20)
    return make, jnp.asarray(table), np.transpose(table[buckets], (2, 0, 1))[None], None
  if name == "soft_cap":
    return (lambda _: mods.soft_cap(0.7)), jnp.zeros(()), None, 0.7
  if name == "alibi_soft_cap":
    slopes = mods.alibi_slopes(N)
    make = lambda s: mods.compose(mods.soft_cap(0.7), mods.alibi(s))
    return make, jnp.asarray(slopes), -slopes[None, :, None, None] * np.abs(i - j)[None, None], 0.7
  raise ValueError(name)


def _run(q, k, v, mask_mod, b_dep, score_make=None, params=None, implementation="blockwise", block=BLOCK, **kw):
  Tq, Sk = q.shape[1], k.shape[1]
  bm = flex.create_block_mask(mask_mod, b_dep, None, Tq, Sk, block_size=block)
  score_mod = None if score_make is None else score_make(params)
  return flex.flex_attention(q, k, v, score_mod, bm, implementation=implementation, **kw)


_FAST_REFERENCE_MASKS = ("causal", "document", "random_table")
# Masks whose blockwise case runs in CI (the rest, covered by the classifier tests and the slow set, are slow).
_FAST_BLOCKWISE_MASKS = ("none", "causal", "causal_window", "prefix_lm", "document", "random_table", "bigbird")


@pytest.mark.parametrize("mask_name,implementation", [
    pytest.param(m, impl, marks=[] if m in (_FAST_REFERENCE_MASKS if impl == "reference" else _FAST_BLOCKWISE_MASKS)
                 else [pytest.mark.slow])
    for m in MASKS for impl in ("reference", "blockwise")])
def test_masks_match_numpy_oracle(mask_name, implementation):
  rng = np.random.default_rng(hash(mask_name) % 2 ** 32)
  q, k, v = qkv(rng, B, T, S, N, K, H)
  mask_mod, b_dep, np_visible = _mask_case(mask_name, rng)
  out = _run(q, k, v, mask_mod, b_dep, implementation=implementation)
  want, _ = np_softmax_attention(q, k, v, mask=np_visible)
  assert_close(out, want, jnp.float32)


@pytest.mark.parametrize("score_name", ["alibi", "t5", "soft_cap", "alibi_soft_cap"])
def test_score_mods_match_numpy_oracle(score_name):
  rng = np.random.default_rng(7)
  q, k, v = qkv(rng, B, T, S, N, K, H)
  make, params, bias, cap = _score_case(score_name, rng)
  mask_mod, b_dep, np_visible = _mask_case("causal", rng)
  want, want_lse = np_softmax_attention(q, k, v, mask=np_visible, bias=bias, soft_cap=cap)
  for implementation in ("reference", "blockwise"):
    out, lse = _run(q, k, v, mask_mod, b_dep, make, params, implementation=implementation, return_residual=True)
    assert_close(out, want, jnp.float32, err_msg=implementation)
    assert_close(lse, np.swapaxes(want_lse, 1, 2), jnp.float32, err_msg=implementation)


def _grads(q, k, v, mask_mod, b_dep, make, params, implementation, block=BLOCK):
  cot = randn(np.random.default_rng(3), q.shape[:-1] + (v.shape[-1],))

  def loss(q, k, v, params):
    return jnp.sum(_run(q, k, v, mask_mod, b_dep, make, params, implementation, block=block) * cot)
  argnums = (0, 1, 2) if make is None or params is None else (0, 1, 2, 3)
  return jax.jit(jax.grad(loss, argnums=argnums))(q, k, v, params)


@pytest.mark.parametrize("mask_name,score_name", [
    ("causal", "alibi"), ("document", "t5"), ("window", "alibi_soft_cap"), ("none", "none"),
    ("random_table", "alibi"), ("prefix_lm", "soft_cap")])
def test_blockwise_gradients_match_reference(mask_name, score_name):
  """Gradients to q, k, v and to the arrays the score_mod closes over (slopes, the T5 table)."""
  rng = np.random.default_rng(11)
  q, k, v = qkv(rng, B, T, S, N, K, H)
  mask_mod, b_dep, _ = _mask_case(mask_name, rng)
  make, params, _, _ = _score_case(score_name, rng)
  got = _grads(q, k, v, mask_mod, b_dep, make, params, "blockwise")
  want = _grads(q, k, v, mask_mod, b_dep, make, params, "reference")
  for name, g, w in zip(("dq", "dk", "dv", "dparams"), got, want):
    assert np.all(np.isfinite(np.asarray(g))), name
    assert_close(g, w, jnp.float32, kind="grad", err_msg=name)


def test_captured_slope_gradient_matches_finite_differences():
  """The ALiBi slope gradient against central differences of the float64 NumPy oracle (independent of autodiff)."""
  rng = np.random.default_rng(5)
  with enable_x64():
    q, k, v = qkv(rng, 1, 13, 11, 2, 1, 4, dtype=jnp.float64)
    slopes = np.array([0.3, 0.7])
    cot = rng.standard_normal((1, 13, 2, 4))
    i, j = np.arange(13)[:, None], np.arange(11)[None, :]
    visible = np_mask(1, 1, 13, 11, causal=True)

    def np_loss(s):
      out, _ = np_softmax_attention(q, k, v, mask=visible, bias=-s[None, :, None, None] * np.abs(i - j))
      return float(np.sum(out * cot))
    eps = 1e-6
    fd = np.array([(np_loss(slopes + eps * e) - np_loss(slopes - eps * e)) / (2 * eps) for e in np.eye(2)])
    bm = flex.create_block_mask(mods.causal(), None, None, 13, 11, block_size=4)
    got = jax.grad(lambda s: jnp.sum(flex.flex_attention(q, k, v, mods.alibi(s), bm, implementation="blockwise")
                                     * cot))(jnp.asarray(slopes))
    np.testing.assert_allclose(np.asarray(got), fd, rtol=1e-6, atol=1e-8)


def test_rows_without_keys_give_zeros_and_finite_gradients():
  rng = np.random.default_rng(2)
  q, k, v = qkv(rng, B, T, S, N, K, H)
  hidden_rows = lambda b, n, i, j: (i % 5 != 0) & (j <= i)    # rows 0, 5, 10, ... see nothing
  for implementation in ("reference", "blockwise"):
    out, lse = _run(q, k, v, hidden_rows, None, implementation=implementation, return_residual=True)
    assert np.all(np.asarray(out)[:, ::5] == 0), implementation
    assert np.all(np.asarray(lse)[:, ::5] == np.finfo(np.float32).min)
    grads = _grads(q, k, v, hidden_rows, None, mods.alibi, jnp.ones(N), implementation)
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g))), implementation
    assert np.all(np.asarray(grads[0])[:, ::5] == 0)


def test_nan_at_hidden_positions_never_reaches_a_query():
  rng = np.random.default_rng(4)
  q, k, v = qkv(rng, B, T, S, N, K, H)
  mask_mod = mods.causal() & mods.lengths(None, 21)
  k = k.at[:, 21:].set(jnp.nan)
  v = v.at[:, 21:].set(jnp.inf)
  want, _ = np_softmax_attention(q[:, :, :, :], k[:, :21], v[:, :21], mask=np_mask(1, 1, T, 21, causal=True))
  for implementation in ("reference", "blockwise"):
    out = _run(q, k, v, mask_mod, None, implementation=implementation)
    assert_close(out, want, jnp.float32, err_msg=implementation)
    grads = _grads(q, k, v, mask_mod, None, None, None, implementation)
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g))), implementation
    assert np.all(np.asarray(grads[1])[:, 21:] == 0) and np.all(np.asarray(grads[2])[:, 21:] == 0)


def test_visible_nan_propagates():
  rng = np.random.default_rng(4)
  q, k, v = qkv(rng, 1, 16, 16, 2, 1, 8)
  v = v.at[:, 9].set(jnp.nan)
  for implementation in ("reference", "blockwise"):
    out = np.asarray(_run(q, k, v, mods.causal(), None, implementation=implementation))
    assert np.all(np.isfinite(out[:, :9])) and np.all(np.isnan(out[:, 9:])), implementation


@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)])
def test_low_precision_matches_numpy_oracle(dtype):
  rng = np.random.default_rng(9)
  q, k, v = qkv(rng, B, T, S, N, K, H, dtype=dtype)
  make, params, bias, _ = _score_case("alibi", rng)
  mask_mod, b_dep, np_visible = _mask_case("document", rng)
  want, _ = np_softmax_attention(q, k, v, mask=np_visible, bias=bias)
  out = _run(q, k, v, mask_mod, b_dep, make, params)
  assert out.dtype == dtype
  assert_close(out, want, dtype)
  got = _grads(q, k, v, mask_mod, b_dep, make, params, "blockwise")
  ref = _grads(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask_mod, b_dep, make, params,
               "reference")
  for g, w in zip(got, ref):
    assert_close(g, w, dtype, kind="grad")


def test_float64_blockwise_matches_oracle():
  rng = np.random.default_rng(1)
  with enable_x64():
    q, k, v = qkv(rng, B, T, S, N, K, H, dtype=jnp.float64)
    make, params, bias, _ = _score_case("alibi", rng)
    mask_mod, b_dep, np_visible = _mask_case("strided", rng)
    out = _run(q, k, v, mask_mod, b_dep, make, params.astype(jnp.float64))
    want, _ = np_softmax_attention(q, k, v, mask=np_visible, bias=bias)
    assert out.dtype == jnp.float64
    assert_close(out, want, jnp.float64)


def test_traced_document_ids_under_jit_and_vmap():
  """create_block_mask inside jit on ids that differ per row; vmap over an extra axis of the whole call."""
  rng = np.random.default_rng(12)
  q, k, v = qkv(rng, B, 40, 40, N, K, H)
  ids = _ids(rng, 40)

  @jax.jit
  def run(q, k, v, ids, slopes):
    bm = flex.create_block_mask(mods.document(ids), B, None, 40, 40, block_size=8)
    return flex.flex_attention(q, k, v, mods.alibi(slopes), bm, implementation="blockwise")
  slopes = jnp.asarray(mods.alibi_slopes(N))
  bias = -np.asarray(slopes)[None, :, None, None] * np.abs(np.arange(40)[:, None] - np.arange(40)[None, :])
  want, _ = np_softmax_attention(q, k, v, mask=np_mask(B, 1, 40, 40, q_seg=ids, kv_seg=ids), bias=bias)
  assert_close(run(q, k, v, jnp.asarray(ids), slopes), want, jnp.float32)
  stacked = jax.vmap(run, in_axes=(0, None, None, 0, None))(jnp.stack([q, q * 0.5]), k, v,
                                                            jnp.stack([ids, ids[::-1]]), slopes)
  assert_close(stacked[0], want, jnp.float32)
  want1, _ = np_softmax_attention(q * 0.5, k, v, mask=np_mask(B, 1, 40, 40, q_seg=ids[::-1], kv_seg=ids[::-1]),
                                  bias=bias)
  assert_close(stacked[1], want1, jnp.float32)


def test_head_dependent_mask_and_mqa():
  """A mask that differs per query head (Nm = N) with MQA (K = 1) and rank-3 inputs (no batch)."""
  rng = np.random.default_rng(13)
  q, k, v = qkv(rng, 1, 21, 19, 4, 1, 8)
  mm = lambda b, n, i, j: (j <= i + n) & (j >= i - 3 * n)
  bm = flex.create_block_mask(mm, None, 4, 21, 19, block_size=(4, 8))
  i, j = np.arange(21)[:, None], np.arange(19)[None, :]
  visible = np.stack([(j <= i + n) & (j >= i - 3 * n) for n in range(4)])[None]
  want, _ = np_softmax_attention(q, k, v, mask=visible)
  for implementation in ("reference", "blockwise"):
    assert_close(flex.flex_attention(q[0], k[0], v[0], None, bm, implementation=implementation), want[0],
                 jnp.float32)


def test_builtin_options_are_expressible_as_mods():
  """dot_product_attention's causal / window / lengths / segments / soft-cap equal the same mods through flex."""
  rng = np.random.default_rng(14)
  q, k, v = qkv(rng, B, 33, 33, N, K, H)
  seg = _ids(rng, 33, docs=3)
  ql, kl = np.array([33, 25]), np.array([30, 18])
  want = core.dot_product_attention(q, k, v, is_causal=True, local_window_size=(6, 0), query_seq_lengths=ql,
                                    key_value_seq_lengths=kl, q_segment_ids=seg, kv_segment_ids=seg,
                                    logits_soft_cap=1.5, implementation="reference")
  mask_mod = mods.causal() & mods.sliding_window((6, 0)) & mods.lengths(ql, kl) & mods.document(seg)
  bm = flex.create_block_mask(mask_mod, B, None, 33, 33, block_size=8)
  for implementation in ("reference", "blockwise"):
    got = flex.flex_attention(q, k, v, mods.soft_cap(1.5), bm, implementation=implementation)
    assert_close(got, want, jnp.float32, err_msg=implementation)


def test_bias_array_score_mod_matches_dot_product_bias_and_its_gradient():
  rng = np.random.default_rng(15)
  q, k, v = qkv(rng, B, 17, 23, N, K, H)
  bias = randn(rng, (1, N, 17, 23))
  want = core.dot_product_attention(q, k, v, bias, implementation="reference")
  got = flex.flex_attention(q, k, v, mods.bias(bias), implementation="blockwise")
  assert_close(got, want, jnp.float32)
  g_want = jax.grad(lambda b: jnp.sum(core.dot_product_attention(q, k, v, b, implementation="reference") ** 2))(bias)
  g_got = jax.grad(lambda b: jnp.sum(flex.flex_attention(q, k, v, mods.bias(b), implementation="blockwise") ** 2))(
      bias)
  assert_close(g_got, g_want, jnp.float32, kind="grad")


@pytest.mark.parametrize("pattern", [
    sparse.LocalPattern(5),
    *(pytest.param(p, marks=pytest.mark.slow) for p in (sparse.StridedPattern(7), sparse.FixedPattern(8, 2),
                                                        sparse.BigBirdPattern(3, 2, 1, seed=3, block=8),
                                                        sparse.GlobalTokensPattern(4, (0, 30))))],
    ids=lambda p: type(p).__name__)
def test_sparse_patterns_through_flex_match_the_gather_path(pattern):
  """sparse_attention(implementation="flex") (the pattern as a mask_mod) against the block-gather path, forward and
  gradients, causal."""
  rng = np.random.default_rng(16)
  q, k, v = qkv(rng, B, 48, 48, N, K, H)
  run = lambda impl: lambda q, k, v: sparse.sparse_attention(q, k, v, pattern, block_size=8, is_causal=True,
                                                             implementation=impl)
  assert_close(run("flex")(q, k, v), run("gather")(q, k, v), jnp.float32)
  loss = lambda f: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))
  for g, w in zip(loss(run("flex"))(q, k, v), loss(run("gather"))(q, k, v)):
    assert_close(g, w, jnp.float32, kind="grad")


@pytest.mark.parametrize("name", ["causal", "window", "prefix_lm", "document", "lengths", "strided", "fixed",
                                  "bigbird", "global"])
@pytest.mark.parametrize("block", [8, (5, 7)])
def test_block_classifiers_are_safe_and_tight(name, block):
  """Blocks a classifier calls full are all visible and blocks it calls empty hold no visible pair (checked against
  the NumPy oracle), and it finds the same blocks as exact evaluation of the mask_mod element by element."""
  rng = np.random.default_rng(17)
  mask_mod, b_dep, np_visible = _mask_case(name, rng)
  bm = flex.create_block_mask(mask_mod, b_dep, None, T, S, block_size=block)
  exact = flex.create_block_mask(mask_mod.fn, b_dep, None, T, S, block_size=block)
  state = np.asarray(bm.state())
  bq, bk = bm.block_size
  visible = np.broadcast_to(np_visible, (state.shape[0], 1, T, S))
  for b in range(state.shape[0]):
    for i in range(state.shape[2]):
      for j in range(state.shape[3]):
        tile = visible[b, 0, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
        full_tile = tile.shape == (bq, bk)
        want = 0 if not tile.any() else (2 if tile.all() and full_tile else 1)
        assert state[b, 0, i, j] == want or state[b, 0, i, j] == 1 and want != 0, (b, i, j, state[b, 0, i, j], want)
  np.testing.assert_array_equal(np.asarray(exact.state()) == 0, state == 0)   # empty blocks found exactly
  assert np.mean(state == 1) <= np.mean(np.asarray(exact.state()) == 1) + 0.05


def test_block_mask_lists_composition_sparsity_and_repr():
  causal = flex.create_block_mask(mods.causal(), None, None, 64, 64, block_size=16)
  window = flex.create_block_mask(mods.sliding_window((16, 16)), None, None, 64, 64, block_size=16)
  np.testing.assert_array_equal(np.asarray(causal.state()[0, 0]),
                                [[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]])
  np.testing.assert_array_equal(np.asarray(causal.full_kv_num_blocks[0, 0]), [0, 1, 2, 3])
  np.testing.assert_array_equal(np.asarray(causal.q_num_blocks[0, 0]), [1, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(causal.full_q_indices[0, 0, 0, :3]), [1, 2, 3])
  assert causal.sparsity() == pytest.approx(100 * 6 / 16)
  both = causal & window
  assert np.asarray(both.state()[0, 0]).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
  either = causal | window
  assert np.asarray(either.state()[0, 0]).tolist() == [[2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1], [2, 2, 2, 2]]
  rng = np.random.default_rng(0)
  q, k, v = qkv(rng, 1, 64, 64, 2, 2, 8)
  i = np.arange(64)
  want, _ = np_softmax_attention(q, k, v, mask=(i[None, :] <= i[:, None]) & (np.abs(i[:, None] - i[None, :]) <= 16))
  assert_close(flex.flex_attention(q, k, v, None, both, implementation="blockwise"), want, jnp.float32)
  text = repr(causal)
  assert "T=64" in text and "sparsity=37.50%" in text and "░···" in text and "███░" in text
  seen = []

  @jax.jit
  def traced(ids):
    seen.append(repr(flex.create_block_mask(mods.document(ids), None, None, 64, 64)))
    return ids
  traced(jnp.zeros(64, jnp.int32))
  assert seen[0].startswith("BlockMask(shape=(B=1, N=1, T=64, S=64)") and "sparsity" not in seen[0]


def test_forward_mode_runs_through_the_reference():
  rng = np.random.default_rng(18)
  q, k, v = qkv(rng, 1, 9, 9, 2, 1, 4)
  bm = flex.create_block_mask(mods.causal(), None, None, 9, 9, block_size=4)
  f = lambda q: flex.flex_attention(q, k, v, mods.alibi(jnp.ones(2)), bm, implementation="blockwise")
  g = lambda q: flex.flex_attention(q, k, v, mods.alibi(jnp.ones(2)), bm, implementation="reference")
  assert_close(jax.jvp(f, (q,), (q,))[1], jax.jvp(g, (q,), (q,))[1], jnp.float32)


def test_errors_name_the_shapes():
  rng = np.random.default_rng(0)
  q, k, v = qkv(rng, 2, 16, 12, 4, 2, 8)
  bm = flex.create_block_mask(mods.causal(), None, None, 16, 16)
  with pytest.raises(ValueError, match=r"T=16, S=16.*S=12"):
    flex.flex_attention(q, k, v, None, bm)
  bm3 = flex.create_block_mask(mods.causal(), 3, None, 16, 12)
  with pytest.raises(ValueError, match=r"B=3"):
    flex.flex_attention(q, k, v, None, bm3)
  with pytest.raises(TypeError, match="score_mod must be callable"):
    flex.flex_attention(q, k, v, 3.0)
  with pytest.raises(ValueError, match="must return a bool"):
    flex.create_block_mask(lambda b, n, i, j: i - j, None, None, 16, 12)
  with pytest.raises(ValueError, match="one scalar"):
    flex.flex_attention(q, k, v, lambda s, b, n, i, j: jnp.stack([s, s]))
  with pytest.raises(ValueError, match="unknown flex_attention implementation"):
    flex.flex_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="block_size"):
    flex.create_block_mask(mods.causal(), None, None, 16, 12, block_size=0)
  with pytest.raises(ValueError, match="head dims differ"):
    flex.flex_attention(q, k[..., :4], v)
  with pytest.raises(ValueError, match="do not match"):
    flex.create_block_mask(mods.document(np.zeros(10, np.int32)), None, None, 16, 12)


def test_blockwise_coarsens_concrete_masks_only_where_it_computes_little_more(monkeypatch):
  """compute_blocks: causal goes to 512-long tiles, a narrow window keeps its blocks, a traced mask keeps its
  blocks; coarsening keeps the mask exact (partial coarse blocks evaluate mask_mod) and the results equal."""
  causal = flex.create_block_mask(mods.causal(), None, None, 4096, 4096)
  assert flex.compute_blocks(causal).block_size == (512, 512)
  window = flex.create_block_mask(mods.causal() & mods.sliding_window((64, 0)), None, None, 4096, 4096)
  assert flex.compute_blocks(window).block_size == (128, 128)
  small = flex.create_block_mask(mods.sliding_window((3, 0)) & mods.causal(), None, None, 37, 29, block_size=4)
  coarse = small.coarsen(2, 4)
  fine = np.asarray(small.state()[0, 0])
  padded = np.zeros((10, 8), np.int8)
  padded[:fine.shape[0], :fine.shape[1]] = fine
  blocks = padded.reshape(5, 2, 2, 4).transpose(0, 2, 1, 3).reshape(5, 2, 8)
  want = np.where((blocks == 2).all(-1), 2, np.where((blocks != 0).any(-1), 1, 0))
  np.testing.assert_array_equal(np.asarray(coarse.state()[0, 0]), want)
  assert coarse.block_size == (8, 16)
  rng = np.random.default_rng(20)
  q, k, v = qkv(rng, B, 37, 29, N, K, H)
  run = lambda bm: flex.flex_attention(q, k, v, mods.alibi(jnp.ones(N)), bm, implementation="blockwise")
  monkeypatch.setattr(flex, "MAX_TILE", 4)      # the block mask's own blocks
  out_fine = run(small)
  monkeypatch.setattr(flex, "MAX_EXTRA_WORK", 100.0)
  monkeypatch.setattr(flex, "MAX_TILE", 32)     # as coarse as it goes
  assert flex.compute_blocks(small, flex.MAX_TILE, flex.MAX_EXTRA_WORK).block_size == (32, 32)
  assert_close(run(small), out_fine, jnp.float32)
  assert_close(run(coarse), out_fine, jnp.float32)

  @jax.jit
  def traced(ids):
    bm = flex.create_block_mask(mods.document(ids), None, None, 64, 64, block_size=8)
    assert flex.compute_blocks(bm).block_size == (8, 8)
    return ids
  traced(jnp.zeros(64, jnp.int32))


# Every mask mod (each with a score mod, rotating) through the Pallas kernels in interpret mode, forward and
# gradients (q, k, v and the score mod's captured array) against the reference. One case per kernel runs in CI
# (tests/test_flex_gpu.py and tests/test_flex_tpu.py hold more); the rest are slow.
_KERNEL_SCORES = ("alibi", "t5", "soft_cap", "alibi_soft_cap")
_KERNEL_CI = {("prefix_lm", "pallas"), ("random_table", "pallas_tpu")}


@pytest.mark.parametrize("mask_name,score_name,implementation", [
    pytest.param(m, _KERNEL_SCORES[i % len(_KERNEL_SCORES)], impl,
                 marks=[] if (m, impl) in _KERNEL_CI else [pytest.mark.slow])
    for i, m in enumerate(MASKS) for impl in ("pallas", "pallas_tpu")])
def test_every_mod_in_the_kernels(mask_name, score_name, implementation):
  rng = np.random.default_rng(21)
  q, k, v = qkv(rng, B, T, S, N, K, H)
  mask_mod, b_dep, np_visible = _mask_case(mask_name, rng)
  make, params, bias, cap = _score_case(score_name, rng)
  want, _ = np_softmax_attention(q, k, v, mask=np_visible, bias=bias, soft_cap=cap)
  assert_close(_run(q, k, v, mask_mod, b_dep, make, params, implementation=implementation, block=16), want,
               jnp.float32)
  got = _grads(q, k, v, mask_mod, b_dep, make, params, implementation, block=16)
  ref = _grads(q, k, v, mask_mod, b_dep, make, params, "reference", block=16)
  for name, g, w in zip(("dq", "dk", "dv", "dparams"), got, ref):
    assert_close(g, w, jnp.float32, kind="grad", err_msg=name)


def test_flex_attention_reference_has_the_signature_and_the_reference_result():
  import inspect
  assert inspect.signature(flex.flex_attention_reference) == inspect.signature(flex.flex_attention)
  rng = np.random.default_rng(23)
  q, k, v = qkv(rng, 1, 11, 9, 2, 1, 8)
  bm = flex.create_block_mask(mods.causal(), None, None, 11, 9, block_size=4)
  want, _ = np_softmax_attention(q, k, v, mask=np_mask(1, 1, 11, 9, causal=True))
  assert_close(flex.flex_attention_reference(q, k, v, None, bm, implementation="pallas"), want, jnp.float32)
  with pytest.raises(ValueError, match="unknown flex_attention implementation"):
    flex.flex_attention_reference(q, k, v, implementation="xla")
