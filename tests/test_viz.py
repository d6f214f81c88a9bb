"""attention_jax.viz: figures (axes, labels, PNGs) and head statistics on hand-built weight matrices."""

import math
import os
import subprocess
import sys

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
