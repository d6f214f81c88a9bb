"""attention_jax.viz: figures (axes, labels, PNGs) and head statistics on hand-built weight matrices."""

import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.figure import Figure

import attention_jax as aj
from attention_jax import viz
from tests.helpers import assert_close

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_weights(rng, shape, causal=False):
  logits = rng.standard_normal(shape)
  if causal:
    T = shape[-1]
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def previous_token_head(T):
  w = np.zeros((T, T))
  w[0, 0] = 1.0
  w[np.arange(1, T), np.arange(T - 1)] = 1.0
  return w


def repeated_tokens(rng, period, vocab=50):
  first = rng.choice(vocab, size=period, replace=False)
  return np.concatenate([first, first])


def induction_head(period):
  """Row t < P attends to itself; row t >= P attends to t - P + 1 (the token after t's first occurrence)."""
  T = 2 * period
  w = np.eye(T)
  for t in range(period, T):
    w[t] = 0.0
    w[t, t - period + 1] = 1.0
  return w


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


def tick_texts(ax, axis):
  labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
  return [t.get_text() for t in labels]


def test_plot_attention_labels_axes_and_png(tmp_path):
  rng = np.random.default_rng(0)
  src, tgt = list("abcdefg"), ["x", "y", "z", "<eos>"]
  path = tmp_path / "sub" / "attn.png"
  fig = aj.viz.plot_attention(random_weights(rng, (4, 7)), src, tgt, title="t", save=path)
  assert isinstance(fig, Figure)
  assert len(fig.axes) == 2                       # heatmap + colorbar
  ax = fig.axes[0]
  assert tick_texts(ax, "x") == src
  assert tick_texts(ax, "y") == tgt
  assert ax.get_title() == "t"
  assert path.read_bytes()[:8] == PNG_MAGIC
  assert ax.images[0].get_array().shape == (4, 7)


def test_plot_attention_defaults_and_given_ax(tmp_path):
  rng = np.random.default_rng(1)
  toks = ["p", "q", "r"]
  fig = viz.plot_attention(jnp.asarray(random_weights(rng, (3, 3))), toks, colorbar=False)
  assert len(fig.axes) == 1
  assert tick_texts(fig.axes[0], "y") == toks     # self-attention: y labels default to x labels
  fig2 = viz.plot_attention(random_weights(rng, (2, 3)), None)
  assert tick_texts(fig2.axes[0], "x") == ["0", "1", "2"] and tick_texts(fig2.axes[0], "y") == ["0", "1"]
  host = Figure()
  axes = host.subplots(1, 2)
  got = viz.plot_attention(random_weights(rng, (2, 3)), toks, ["u", "v"], ax=axes[1], colorbar=False)
  assert got is host
  assert len(axes[1].images) == 1 and len(axes[0].images) == 0
  got.savefig(tmp_path / "host.png")
  assert (tmp_path / "host.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_attention_long_sequences_subsample_labels():
  T = 100
  fig = viz.plot_attention(np.eye(T), [f"t{i}" for i in range(T)], colorbar=False)
  labels = tick_texts(fig.axes[0], "x")
  assert 10 <= len(labels) <= viz.MAX_TICK_LABELS
  assert labels[0] == "t0" and labels[1] == f"t{math.ceil(T / viz.MAX_TICK_LABELS)}"


def test_plot_attention_bad_input():
  with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
    viz.plot_attention(np.zeros((2, 3, 4)), None)
  with pytest.raises(ValueError, match="2 x .* length 3"):
    viz.plot_attention(np.zeros((2, 3)), ["a", "b"])
  with pytest.raises(ValueError, match="1 y .* length 2"):
    viz.plot_attention(np.zeros((2, 3)), ["a", "b", "c"], ["z"])


@pytest.mark.parametrize("num_heads,ncols,grid", [(6, None, (2, 4)), (3, 1, (3, 1)), (1, None, (1, 1))])
def test_plot_heads_one_panel_per_head(tmp_path, num_heads, ncols, grid):
  rng = np.random.default_rng(2)
  toks = list("abcde")
  path = tmp_path / f"heads{num_heads}.png"
  titles = [f"H{n}" for n in range(num_heads)]
  fig = aj.viz.plot_heads(random_weights(rng, (num_heads, 5, 5)), toks, titles=titles, ncols=ncols,
                          suptitle="layer 0", save=path)
  assert isinstance(fig, Figure)
  assert len(fig.axes) == num_heads
  assert [ax.get_title() for ax in fig.axes] == titles
  for ax in fig.axes:
    assert tick_texts(ax, "x") == toks and tick_texts(ax, "y") == toks
  rows, cols = grid
  assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (rows, cols)
  assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_heads_bad_input():
  with pytest.raises(ValueError, match=r"\[N, T, S\].*\(4, 4\)"):
    viz.plot_heads(np.zeros((4, 4)), None)
  with pytest.raises(ValueError, match="1 titles for 2 heads"):
    viz.plot_heads(np.zeros((2, 3, 3)), None, titles=["a"])


def test_plots_leave_pyplot_and_backend_alone():
  code = ("import matplotlib, sys, numpy as np; before = matplotlib.get_backend(); "
          "from attention_jax import viz; viz.plot_heads(np.ones((2, 3, 3)) / 3, list('abc')); "
          "viz.plot_attention(np.ones((3, 3)) / 3, list('abc')); "
          "assert 'matplotlib.pyplot' not in sys.modules, 'viz imported pyplot'; "
          "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())")
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MPLBACKEND": "svg"})


# ---------------------------------------------------------------------------------------------------------
# Head statistics
# ---------------------------------------------------------------------------------------------------------


def test_previous_token_head_scores_one():
  T = 9
  w = previous_token_head(T)
  assert_close(viz.previous_token_score(w), 1.0)
  assert_close(viz.attention_distance(w), (T - 1) / T)      # row 0 attends to itself (distance 0)
  assert_close(viz.attention_entropy(w), 0.0)
  assert_close(viz.previous_token_score(np.eye(T)), 0.0)


@pytest.mark.parametrize("S", [1, 5, 16])
def test_uniform_head_has_maximal_entropy(S):
  T = 6
  uniform = np.full((T, S), 1.0 / S)
  assert_close(viz.attention_entropy(uniform), math.log(S))
  if S > 1:   # any non-uniform row has less
    w = random_weights(np.random.default_rng(S), (3, T, S))
    assert np.all(np.asarray(viz.attention_entropy(w)) < math.log(S) - 1e-3)


def test_entropy_matches_numpy_and_skips_empty_rows():
  rng = np.random.default_rng(3)
  w = random_weights(rng, (2, 3, 7, 5))
  w[..., 4, :] = 0.0                                    # a query with no visible key
  rows = -(w * np.log(np.where(w > 0, w, 1.0))).sum(-1)  # [2, 3, 7]
  expected = np.delete(rows, 4, axis=-1).mean(-1)
  got = viz.attention_entropy(w)
  assert got.shape == (2, 3)
  assert_close(got, expected)


def test_distance_diagonal_zero_and_uniform_causal():
  T = 11
  assert_close(viz.attention_distance(np.eye(T)), 0.0)
  causal_uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
  # Row t is uniform over 0..t, so its mean distance is t / 2; the mean over rows is (T - 1) / 4.
  assert_close(viz.attention_distance(causal_uniform), (T - 1) / 4)
  rng = np.random.default_rng(4)
  w = random_weights(rng, (4, 6, 9))
  expected = np.array([[sum(w[b, t, s] * abs(t - s) for s in range(9)) for t in range(6)] for b in range(4)])
  assert_close(viz.attention_distance(w), expected.mean(-1))


@pytest.mark.parametrize("period", [3, 8])
def test_perfect_induction_head_scores_one(period):
  rng = np.random.default_rng(period)
  tokens = repeated_tokens(rng, period)
  assert_close(viz.induction_score(induction_head(period), tokens), 1.0)
  # A previous-token head and a diagonal head do no induction on the same sequence.
  assert_close(viz.induction_score(previous_token_head(2 * period), tokens), 0.0)
  assert_close(viz.induction_score(np.eye(2 * period), tokens), 0.0)


def np_induction_score(w_TT, tokens):
  """Loop oracle: for each t whose token occurred before, the weight on the position after its last occurrence."""
  picked = []
  for t in range(len(tokens)):
    earlier = [j for j in range(t) if tokens[j] == tokens[t]]
    if earlier and w_TT[t].sum() > 0:
      picked.append(w_TT[t, earlier[-1] + 1])
  return np.mean(picked) if picked else 0.0


def test_induction_score_matches_loop_oracle_with_repeats_and_batches():
  rng = np.random.default_rng(5)
  B, N, T = 3, 2, 13
  tokens = rng.integers(0, 4, size=(B, T))              # small vocabulary: many repeats, some within one copy
  w = random_weights(rng, (B, N, T, T), causal=True)
  w[1, :, 7, :] = 0.0
  got = viz.induction_score(w, tokens)
  assert got.shape == (B, N)
  expected = np.array([[np_induction_score(w[b, n], tokens[b]) for n in range(N)] for b in range(B)])
  assert_close(got, expected)
  shared = viz.induction_score(w, tokens[0])            # tokens [T] shared by every batch row
  assert_close(shared, np.array([[np_induction_score(w[b, n], tokens[0]) for n in range(N)] for b in range(B)]))


def test_induction_targets_on_repeated_sequence():
  tokens = jnp.asarray([7, 3, 9, 7, 3, 9])
  target, valid = viz.induction_targets(tokens)
  np.testing.assert_array_equal(valid, [False, False, False, True, True, True])
  np.testing.assert_array_equal(np.asarray(target)[3:], [1, 2, 3])    # t - P + 1 with P = 3


def test_head_statistics_jit_vmap_and_shapes():
  rng = np.random.default_rng(6)
  L, N, T = 2, 4, 8
  w = jnp.asarray(random_weights(rng, (L, N, T, T), causal=True), jnp.float32)
  tokens = jnp.asarray(repeated_tokens(rng, T // 2))
  stats = jax.jit(viz.head_statistics)(w, tokens)
  assert set(stats) == {"entropy", "previous_token", "distance", "induction"}
  for v in stats.values():
    assert v.shape == (L, N)
  eager = viz.head_statistics(w, tokens)
  for k in stats:
    assert_close(stats[k], eager[k])
    assert_close(jax.vmap(lambda x: viz.head_statistics(x, tokens)[k])(w), eager[k])
  assert "induction" not in viz.head_statistics(w)
  assert_close(viz.head_statistics(w.astype(jnp.bfloat16))["entropy"], eager["entropy"], dtype=jnp.bfloat16)


def test_statistics_bad_input():
  with pytest.raises(ValueError, match=r"\[\.\.\., T, T\].*\(3, 4\)"):
    viz.previous_token_score(np.zeros((3, 4)))
  with pytest.raises(ValueError, match=r"\(5,\)"):
    viz.attention_entropy(np.zeros(5))
  with pytest.raises(ValueError, match=r"tokens.shape=\(4,\) weights.shape=\(5, 5\)"):
    viz.induction_score(np.zeros((5, 5)), np.zeros(4, int))
  with pytest.raises(ValueError, match=r"tokens.shape=\(3, 5\)"):
    viz.induction_score(np.zeros((2, 5, 5)), np.zeros((3, 5), int))


# ---------------------------------------------------------------------------------------------------------
# Long sequences, bad input, non-finite weights and empty inputs
# ---------------------------------------------------------------------------------------------------------


def test_small_plot_keeps_its_size_and_every_label():
  fig = viz.plot_attention(np.full((4, 7), 1 / 7), list("abcdefg"), list("wxyz"))
  np.testing.assert_allclose(fig.get_size_inches(), (1.2 + 0.28 * 7, 2.5))   # width 0.28"/token, height >= 2.5"
  assert tick_texts(fig.axes[0], "x") == list("abcdefg") and tick_texts(fig.axes[0], "y") == list("wxyz")
  np.testing.assert_allclose(viz.plot_attention(np.eye(20), None).get_size_inches(), (1.2 + 0.28 * 20,
                                                                                      0.9 + 0.28 * 20))


def test_long_plot_is_capped_and_thinned():
  """T = S = 500: the figure stays 12" a side, labels are thinned and no per-cell text is written."""
  T = 500
  w = random_weights(np.random.default_rng(7), (T, T))
  toks = [f"t{i}" for i in range(T)]
  fig = viz.plot_attention(w, toks, annotate=True)
  assert np.all(fig.get_size_inches() <= viz.MAX_FIGURE_INCHES)
  np.testing.assert_allclose(fig.get_size_inches(), (viz.MAX_FIGURE_INCHES, viz.MAX_FIGURE_INCHES))
  ax = fig.axes[0]
  for axis in ("x", "y"):
    labels = tick_texts(ax, axis)
    assert 10 <= len(labels) <= viz.MAX_TICK_LABELS
    step = int(labels[1][1:])
    assert labels == toks[::step]
  assert len(ax.texts) == 0                      # annotations switched off at this size
  heads = viz.plot_heads(np.stack([w] * 12), toks)
  assert len(heads.axes) == 12
  assert np.all(heads.get_size_inches() <= viz.MAX_FIGURE_INCHES)
  for ax in heads.axes:
    assert 1 <= len(tick_texts(ax, "x")) <= viz.MAX_TICK_LABELS


def test_long_plot_renders_with_bounded_memory(tmp_path):
  """Builds and saves a T = S = 500 heatmap (and a 16-head grid) in a fresh process: seconds and well under
  1.5 GB (the uncapped 140-inch figure needed more than 7 GB)."""
  code = ("import sys, numpy as np; from attention_jax import viz; T = 500; "
          "w = np.random.default_rng(0).random((T, T), dtype=np.float32); toks = [str(i) for i in range(T)]; "
          "fig = viz.plot_attention(w, toks, annotate=True, save=sys.argv[1] + '/a.png'); "
          "viz.plot_heads(np.stack([w] * 16), toks, save=sys.argv[1] + '/h.png'); "
          "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
  start = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  elapsed = time.perf_counter() - start
  # VmHWM (kB): the peak of this process's own memory. ru_maxrss would not do: Linux carries it across exec from
  # the forking parent, here a pytest worker that may already hold gigabytes.
  peak_mb = int(result.stdout.split()[-1]) / 1024
  assert peak_mb < 1536, f"peak RSS {peak_mb:.0f} MB"
  assert elapsed < 120, f"took {elapsed:.0f} s"
  assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC and (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC


def test_annotations_on_small_plots_only():
  w = np.array([[0.25, 0.75], [1.0, 0.0]])
  fig = viz.plot_attention(w, ["a", "b"], colorbar=False, annotate=True)
  assert sorted(t.get_text() for t in fig.axes[0].texts) == ["0.00", "0.25", "0.75", "1.00"]
  assert len(viz.plot_attention(w, ["a", "b"]).axes[0].texts) == 0             # off by default
  n = viz.MAX_ANNOTATED_TOKENS
  assert len(viz.plot_attention(np.eye(n), None, annotate=True).axes[0].texts) == n * n
  assert len(viz.plot_attention(np.eye(n + 1), None, annotate=True).axes[0].texts) == 0


def test_many_heads_stay_within_the_cap():
  fig = viz.plot_heads(random_weights(np.random.default_rng(8), (64, 6, 6)), list("abcdef"), suptitle="64 heads")
  assert len(fig.axes) == 64
  assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (8, 8)
  assert np.all(fig.get_size_inches() <= viz.MAX_FIGURE_INCHES)
  narrow = viz.plot_heads(random_weights(np.random.default_rng(9), (10, 4, 4)), None, ncols=1)
  assert np.all(narrow.get_size_inches() <= viz.MAX_FIGURE_INCHES)


def test_non_finite_weights_are_drawn_masked(tmp_path):
  """NaN / Inf cells are masked (drawn in the colormap's 'bad' grey); finite cells keep their values."""
  w = np.array([[0.5, np.nan, 0.5], [np.inf, 0.2, 0.8]])
  fig = viz.plot_attention(w, None, annotate=True, save=tmp_path / "nan.png")
  data = fig.axes[0].images[0].get_array()
  np.testing.assert_array_equal(np.ma.getmaskarray(data), ~np.isfinite(w))
  np.testing.assert_allclose(data.compressed(), w[np.isfinite(w)])
  assert fig.axes[0].images[0].get_clim() == (0.0, np.float32(0.8))
  assert "nan" in [t.get_text() for t in fig.axes[0].texts]
  all_nan = viz.plot_heads(np.full((2, 3, 3), np.nan), None, save=tmp_path / "all_nan.png")
  assert np.ma.getmaskarray(all_nan.axes[0].images[0].get_array()).all()
  assert (tmp_path / "all_nan.png").read_bytes()[:8] == PNG_MAGIC


PLOT_BAD_INPUT = [
    (viz.plot_attention, (np.zeros((2, 3, 4)), None), ValueError, r"\[T, S\].*\(2, 3, 4\)"),
    (viz.plot_attention, (np.zeros(4), None), ValueError, r"\[T, S\].*\(4,\)"),
    (viz.plot_attention, (np.float32(1.0), None), ValueError, r"\[T, S\].*\(\)"),
    (viz.plot_attention, (np.zeros((0, 3)), None), ValueError, r"nothing to draw.*\(0, 3\)"),
    (viz.plot_attention, (np.zeros((3, 0)), None), ValueError, r"nothing to draw.*\(3, 0\)"),
    (viz.plot_attention, (np.zeros((2, 2), np.complex64), None), TypeError, r"real numbers.*complex64"),
    (viz.plot_attention, (np.array([["a", "b"]]), None), TypeError, r"real numbers.*<U1"),
    (viz.plot_attention, (np.zeros((2, 3)), ["a", "b"]), ValueError, r"2 x .* length 3"),
    (viz.plot_heads, (np.zeros((4, 4)), None), ValueError, r"\[N, T, S\].*\(4, 4\)"),
    (viz.plot_heads, (np.zeros((1, 2, 3, 3)), None), ValueError, r"\[N, T, S\].*\(1, 2, 3, 3\)"),
    (viz.plot_heads, (np.zeros((0, 3, 3)), None), ValueError, r"nothing to draw.*\(0, 3, 3\)"),
    (viz.plot_heads, (np.zeros((2, 3, 3), np.complex128), None), TypeError, r"complex128"),
    (viz.plot_heads, (np.zeros((2, 3, 4)), list("abc")), ValueError, r"3 key tokens .* length 4"),
    (lambda: viz.plot_heads(np.zeros((2, 3, 3)), None, ncols=1.5), (), TypeError, r"ncols.*1\.5"),
]

STATS_BAD_INPUT = [
    (viz.attention_entropy, (np.zeros(5),), ValueError, r"attention_entropy.*\[\.\.\., T, S\].*\(5,\)"),
    (viz.attention_entropy, (np.float32(0.5),), ValueError, r"\(\)"),
    (viz.attention_entropy, (np.zeros((2, 2), np.complex64),), TypeError, r"attention_entropy.*complex64"),
    (viz.attention_distance, (np.zeros(3),), ValueError, r"attention_distance.*\(3,\)"),
    (viz.previous_token_score, (np.zeros((3, 4)),), ValueError, r"previous_token_score.*\[\.\.\., T, T\].*\(3, 4\)"),
    (viz.previous_token_score, (np.zeros(3),), ValueError, r"\(3,\)"),
    (viz.induction_score, (np.zeros((4, 5)), np.zeros(4, int)), ValueError, r"induction_score.*\(4, 5\)"),
    (viz.induction_score, (np.zeros((5, 5)), np.zeros(4, int)), ValueError,
     r"tokens.shape=\(4,\) weights.shape=\(5, 5\)"),
    (viz.induction_score, (np.zeros((5, 5)), np.int32(3)), ValueError, r"tokens.shape=\(\)"),
    (viz.induction_score, (np.zeros((2, 5, 5)), np.zeros((3, 5), int)), ValueError, r"tokens.shape=\(3, 5\)"),
    (viz.induction_targets, (np.int32(3),), ValueError, r"induction_targets.*shape \(\)"),
    (viz.head_statistics, (np.zeros((2, 3, 4)),), ValueError, r"\[\.\.\., T, T\].*\(2, 3, 4\)"),
    (viz.head_statistics, (np.zeros((2, 4, 4)), np.zeros((3, 4), int)), ValueError, r"tokens.shape=\(3, 4\)"),
]


@pytest.mark.parametrize("fn,args,exc,regex", PLOT_BAD_INPUT + STATS_BAD_INPUT,
                         ids=[str(i) for i in range(len(PLOT_BAD_INPUT) + len(STATS_BAD_INPUT))])
def test_bad_input_table(fn, args, exc, regex):
  with pytest.raises(exc, match=regex):
    fn(*args)


def test_statistics_of_empty_inputs():
  # No leading dims: a mean over no rows is 0.
  for w in (np.zeros((0, 0)), np.zeros((0, 4)), np.zeros((3, 0))):
    assert_close(viz.attention_entropy(w), 0.0)
    assert_close(viz.attention_distance(w), 0.0)
  for T in (0, 1):
    w = np.ones((T, T))
    assert_close(viz.previous_token_score(w), 0.0)
    assert_close(viz.induction_score(w, np.zeros(T, int)), 0.0)
    stats = viz.head_statistics(w, np.zeros(T, int))
    assert set(stats) == {"entropy", "previous_token", "distance", "induction"}
    for v in stats.values():
      assert v.shape == ()
  target, valid = viz.induction_targets(np.zeros((2, 0), int))
  assert target.shape == valid.shape == (2, 0)
  # Zero leading dims give empty results of the leading shape.
  w = np.zeros((0, 3, 5, 5))
  for v in viz.head_statistics(w, np.zeros((0, 5), int)).values():
    assert v.shape == (0, 3)
  assert viz.attention_entropy(np.zeros((2, 0, 4, 6))).shape == (2, 0)


def test_statistics_propagate_nan():
  """A NaN in a row the statistic reads gives NaN, not a silently skipped row."""
  T = 5
  w = previous_token_head(T)
  w[3, 2] = np.nan
  for f in (viz.attention_entropy, viz.attention_distance, viz.previous_token_score):
    assert np.isnan(np.asarray(f(w))), f.__name__
  clean = previous_token_head(T)
  clean[3, 4] = np.nan      # the previous-token score reads only w[t, t-1]
  assert_close(viz.previous_token_score(clean), 1.0)


def test_plot_block_mask_draws_the_block_states(tmp_path):
  from attention_jax import flex, mods
  bm = flex.create_block_mask(mods.causal() & mods.sliding_window((16, 0)), None, None, 64, 64, block_size=16)
  fig = viz.plot_block_mask(bm, save=tmp_path / "blocks.png")
  image = fig.axes[0].images[0].get_array()
  np.testing.assert_array_equal(np.asarray(image), [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
  assert "0 full, 7 partial of 16 blocks (56.2% skipped)" in fig.axes[0].get_title()
  assert (tmp_path / "blocks.png").stat().st_size > 0
  with pytest.raises(ValueError, match="outside"):
    viz.plot_block_mask(flex.create_block_mask(mods.causal(), 2, None, 64, 64), b=2)
