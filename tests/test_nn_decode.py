"""Decode mode (KV cache) of attention_jax.nn.MultiHeadAttention, and make_attention_fn as the attention_fn of
flax.nnx.MultiHeadAttention(decode=True)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

import attention_jax as aj
from tests.helpers import assert_close, np_mask, np_softmax_attention, randn

D, N, K, MAX = 32, 4, 2, 24      # d_model, query heads, kv heads (GQA), cache length
H = D // N


def randomize_biases(m, seed=0):
  """Random non-zero projection biases (a dropped bias would show)."""
  for i, name in enumerate(("query", "key", "value", "out")):
    bias = getattr(m, name).bias
    bias[...] = 0.3 * jax.random.normal(jax.random.key(seed + i), bias.shape)
  return m


def ours(implementation="reference", seed=0, **kw):
  """Our module; decode by the dense reference unless a test says otherwise (each shape compiles once: keep the
  number of distinct chunk sizes small)."""
  kw.setdefault("decode_implementation", "reference")
  m = aj.nn.MultiHeadAttention(N, D, num_kv_heads=K, implementation=implementation, rngs=nnx.Rngs(seed), **kw)
  return randomize_biases(m, seed)


def flax_mha(attention_fn=None, seed=0, **kw):
  if attention_fn is not None:
    kw["attention_fn"] = attention_fn
  m = nnx.MultiHeadAttention(N, D, num_kv_heads=K, decode=True, rngs=nnx.Rngs(seed), **kw)
  return randomize_biases(m, seed)


def np_mha(m, x, *, window=None, soft_cap=None, scale=None):
  """Float64 NumPy causal self-attention with m's weights (GQA kv heads shared by groups of query heads)."""
  w = {n: (np.float64(getattr(m, n).kernel[...]), np.float64(getattr(m, n).bias[...]))
       for n in ("query", "key", "value", "out")}
  x = np.float64(x)
  batch, T = x.shape[:-2], x.shape[-2]
  x = x.reshape(-1, T, D)
  proj = lambda n: np.einsum("btd,dnh->btnh", x, w[n][0]) + w[n][1]
  mask = np_mask(x.shape[0], N, T, T, causal=True, window=window)
  out, _ = np_softmax_attention(proj("query"), proj("key"), proj("value"), mask=mask, soft_cap=soft_cap,
                                scale=scale)
  y = np.einsum("btnh,nhd->btd", out, w["out"][0]) + w["out"][1]
  return y.reshape(*batch, T, -1)


def run_chunks(step, m, x, sizes):
  """Fresh cache, then ``step(m, chunk)`` over consecutive chunks of x (time axis -2); outputs concatenated."""
  m.init_cache(x.shape[:-2] + (MAX, x.shape[-1]))
  outs, t = [], 0
  for size in sizes:
    outs.append(step(m, x[..., t:t + size, :]))
    t += size
  assert t == x.shape[-2]
  return jnp.concatenate(outs, axis=-2)


eager_step = lambda m, x: m(x, decode=True)


class OurDecodeTest(parameterized.TestCase):

  def test_token_by_token_equals_full_causal(self):
    self.check_token_by_token("blockwise")

  @parameterized.parameters("reference", "xla")
  @pytest.mark.slow
  def test_token_by_token_other_implementations(self, decode_implementation):
    self.check_token_by_token(decode_implementation)

  def check_token_by_token(self, decode_implementation):
    x = randn(np.random.default_rng(0), (2, 9, D))
    m = ours(decode_implementation=decode_implementation)
    got = run_chunks(eager_step, m, x, [1] * 9)
    assert_close(got, np_mha(m, x))
    assert_close(got, m(x, is_causal=True))                       # the non-decode path of the same module
    np.testing.assert_array_equal(m.cache_index[...], [9, 9])

  def test_chunks_with_window_and_soft_cap(self):
    """Tq = 3 chunks and a final chunk of 2 (prefill in chunks), the module's window and soft cap honoured."""
    x = randn(np.random.default_rng(1), (2, 11, D), scale=2.0)
    m = ours(local_window_size=3, logits_soft_cap=1.5, scale=0.5)
    got = run_chunks(eager_step, m, x, [3, 3, 3, 2])
    assert_close(got, m(x, is_causal=True))
    assert_close(got, np_mha(m, x, window=3, soft_cap=1.5, scale=0.5))

  def test_decode_flag_from_constructor_and_cache_layout(self):
    x = randn(np.random.default_rng(2), (2, 5, D))
    m = ours(decode=True)
    m.init_cache((2, MAX, D))
    chex.assert_shape([m.cached_key[...], m.cached_value[...]], (2, MAX, K, H))   # kv heads, never repeated
    self.assertEqual(m.cache_index[...].dtype, jnp.int32)
    chex.assert_shape(m.cache_index[...], (2,))
    got = m(x)                                                 # decode=True from the constructor: one prefill
    assert_close(got, np_mha(m, x))
    key = np.einsum("btd,dkh->btkh", np.float64(x), np.float64(m.key.kernel[...])) + np.float64(m.key.bias[...])
    assert_close(m.cached_key[...][:, :5], key)
    np.testing.assert_array_equal(m.cached_key[...][:, 5:], 0.0)
    assert_close(m(x, decode=False, is_causal=True), got)        # the call flag wins; the cache is untouched
    np.testing.assert_array_equal(m.cache_index[...], [5, 5])

  def test_low_precision_cache(self):
    """A bfloat16 cache under float32 parameters: queries and new entries are cast to the cache dtype."""
    x = randn(np.random.default_rng(13), (2, 4, D))
    m = ours()
    m.init_cache((2, MAX, D), dtype=jnp.bfloat16)
    self.assertEqual(m.cached_key[...].dtype, jnp.bfloat16)
    assert_close(m(x, decode=True), np_mha(m, x), jnp.bfloat16)

  def test_jit_over_the_step(self):
    x = randn(np.random.default_rng(3), (2, 7, D))
    m = ours()
    want = np_mha(m, x)
    assert_close(run_chunks(nnx.jit(eager_step), m, x, [1] * 7), want)

    graphdef, state = nnx.split(m)

    @jax.jit
    def step(state, x_t):
      module = nnx.merge(graphdef, state)
      y = module(x_t, decode=True)
      return y, nnx.state(module)

    m.init_cache((2, MAX, D))
    _, state = nnx.split(m)
    outs = []
    for t in (0, 3, 4, 5):
      stop = {0: 3, 3: 4, 4: 5, 5: 7}[t]
      y, state = step(state, x[:, t:stop])
      outs.append(y)
    assert_close(jnp.concatenate(outs, axis=1), want)

  def test_batch_dims_and_no_batch(self):
    x = randn(np.random.default_rng(4), (2, 3, 6, D))
    m = ours()
    assert_close(run_chunks(eager_step, m, x, [3, 3]), np_mha(m, x))
    chex.assert_shape(m.cache_index[...], (2, 3))
    assert_close(run_chunks(eager_step, m, x[0, 1], [6]), np_mha(m, x[0, 1]))      # [T, D]: no batch dim
    chex.assert_shape(m.cached_key[...], (MAX, K, H))
    np.testing.assert_array_equal(m.cache_index[...], 6)

  def test_ragged_rows_after_padded_prefill(self):
    """Per-row cache_index: prefill right-padded prompts together, set each row's length, decode together."""
    r = np.random.default_rng(5)
    lengths = [5, 2]
    prompt, new = randn(r, (2, 5, D)), randn(r, (2, 4, D))
    m = ours()
    m.init_cache((2, MAX, D))
    m(prompt, decode=True)                                       # row 1's last 3 prompt tokens are padding
    m.cache_index[...] = jnp.array(lengths, jnp.int32)
    got = jnp.concatenate([m(new[:, t:t + 1], decode=True) for t in range(4)], axis=1)
    np.testing.assert_array_equal(m.cache_index[...], [9, 6])
    for b, n in enumerate(lengths):
      seq = jnp.concatenate([prompt[b, :n], new[b]], axis=0)     # the row's real tokens
      assert_close(got[b], np_mha(m, seq)[n:], err_msg=f"row {b}")

  def test_stale_cache_entries_never_read(self):
    """Entries at or past the index may hold anything (rewound speculative tokens, NaN): they never show."""
    x = randn(np.random.default_rng(6), (2, 6, D))
    m = ours()
    m.init_cache((2, MAX, D))
    m.cached_key[...] = jnp.full(m.cached_key.shape, jnp.nan)
    m.cached_value[...] = jnp.full(m.cached_value.shape, jnp.inf)
    m(x[:, :4], decode=True)
    m(randn(np.random.default_rng(7), (2, 2, D)), decode=True)  # speculative tokens, then rejected
    m.cache_index[...] = jnp.array([4, 4], jnp.int32)
    got = m(x[:, 4:], decode=True)
    chex.assert_tree_all_finite(got)
    assert_close(got, np_mha(m, x)[:, 4:])

  def test_traced_overflow_gives_nan_rows(self):
    """Under jit the index is not known: the overflowing row's writes past max_length are dropped and its output
    is NaN; other rows are unaffected."""
    x = randn(np.random.default_rng(8), (2, 3, D))
    m = ours()
    m.init_cache((2, MAX, D))
    m.cache_index[...] = jnp.array([MAX - 2, 0], jnp.int32)
    y = nnx.jit(eager_step)(m, x)
    self.assertTrue(np.isnan(y[0]).all())
    assert_close(y[1], np_mha(m, x[1]))
    np.testing.assert_array_equal(m.cache_index[...], [MAX + 1, 3])

  def test_errors(self):
    x = jnp.ones((2, 1, D))
    m = ours()
    with self.assertRaisesRegex(ValueError, r"decode mode needs a KV cache; call init_cache"):
      m(x, decode=True)
    m.init_cache((2, 4, D))
    m(jnp.ones((2, 3, D)), decode=True)
    with self.assertRaisesRegex(ValueError, r"overflow: cache_index=\[3, 3\] \+ Tq=2 new tokens exceeds "
                                r"max_length=4 \(cached_key.shape=\(2, 4, 2, 8\)\)"):
      m(jnp.ones((2, 2, D)), decode=True)
    np.testing.assert_array_equal(m.cache_index[...], [3, 3])     # nothing written on error
    with self.assertRaisesRegex(ValueError, r"cache's batch dims \(2,\).*inputs_q.shape=\(3, 1, 32\)"):
      m(jnp.ones((3, 1, D)), decode=True)
    for kw in (dict(mask=jnp.ones((2, 1, 1, 4), bool)), dict(bias=jnp.zeros((1, 1, 1, 4))), dict(sow_weights=True),
               dict(key_value_seq_lengths=jnp.array([1, 1]))):
      with self.assertRaisesRegex(ValueError, rf"\['{next(iter(kw))}'\] do not apply in decode mode"):
        m(x, decode=True, **kw)
    dropout = ours(dropout_rate=0.1)
    dropout.init_cache((2, 4, D))
    with self.assertRaisesRegex(ValueError, r"dropout \(dropout_rate=0.1, deterministic=False\).*decode mode"):
      dropout(x, decode=True, deterministic=False)
    chex.assert_shape(dropout(x, decode=True, deterministic=True), (2, 1, D))
    flex = aj.nn.MultiHeadAttention(N, D, implementation="flex", rngs=nnx.Rngs(0))
    flex.init_cache((2, 4, D))
    with self.assertRaisesRegex(ValueError, "implementation='flex' has no decode mode"):
      flex(x, decode=True)
    fixed = ours(key_value_seq_lengths=jnp.array([1, 1]))
    fixed.init_cache((2, 4, D))
    with self.assertRaisesRegex(ValueError, r"options \['key_value_seq_lengths'\] fixed at construction"):
      fixed(x, decode=True)
    m.cached_value = nnx.Cache(jnp.zeros((2, 4, K, H + 1)))
    with self.assertRaisesRegex(ValueError, r"cached_key.shape=\(2, 4, 2, 8\) cached_value.shape=\(2, 4, 2, 9\)"):
      m(x, decode=True)
    for shape in ((2, 4), (4, D + 1), (2, 0, D), (2, 4.0, D)):
      with self.assertRaisesRegex(ValueError, "init_cache"):
        m.init_cache(shape)
    with self.assertRaisesRegex(ValueError, "unknown MultiHeadAttention decode implementation='flash'"):
      ours(decode_implementation="flash")
    with self.assertRaisesRegex(ValueError, "decode_num_splits must be a positive int"):
      ours(decode_num_splits=0)


class TinyLM(nnx.Module):
  """Token embedding -> one attention layer (with a residual) -> output projection."""

  def __init__(self, attention: nnx.Module, vocab: int = 13, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, D, rngs=rngs)
    self.attention = attention
    self.head = nnx.Linear(D, vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array, **kw) -> jax.Array:
    x = self.embed(tokens)
    return self.head(x + self.attention(x, **kw))


def greedy_without_cache(lm, prompt, steps, **kw):
  """Recomputes the whole prefix each step. The sequence is kept at its final length (zeros after the prefix) so
  every call has one shape: causal attention never lets the trailing zeros reach the prefix's positions."""
  B, P = prompt.shape
  seq = jnp.zeros((B, P + steps), jnp.int32).at[:, :P].set(prompt)
  logits = []
  for t in range(P, P + steps):
    out = lm(seq, is_causal=True, **kw)[:, t - 1]
    logits.append(out)
    seq = seq.at[:, t].set(jnp.argmax(out, -1))
  return seq[:, P:], jnp.stack(logits, 1)


def greedy_with_cache(lm, prompt, steps, prefill_chunk):
  lm.attention.init_cache((prompt.shape[0], MAX, D))
  for t in range(0, prompt.shape[1], prefill_chunk):
    out = lm(prompt[:, t:t + prefill_chunk], decode=True)[:, -1]
  tokens, logits = [], []
  for _ in range(steps):
    logits.append(out)
    tokens.append(jnp.argmax(out, -1))
    out = lm(tokens[-1][:, None], decode=True)[:, -1]
  return jnp.stack(tokens, 1), jnp.stack(logits, 1)


def check_greedy(test, lm, prefill_chunk, **no_cache_kw):
  prompt = jnp.asarray(np.random.default_rng(9).integers(0, 13, (2, 4)), jnp.int32)
  want_tokens, want_logits = greedy_without_cache(lm, prompt, 10, **no_cache_kw)
  got_tokens, got_logits = greedy_with_cache(lm, prompt, 10, prefill_chunk)
  test.assertGreater(len(np.unique(want_tokens)), 2)              # a generation that could go wrong
  np.testing.assert_array_equal(got_tokens, want_tokens)
  assert_close(got_logits, want_logits)


class GreedyGenerationTest(parameterized.TestCase):

  def test_our_module(self):
    check_greedy(self, TinyLM(ours(), rngs=nnx.Rngs(10)), prefill_chunk=4)

  @pytest.mark.slow
  def test_flax_module_with_adapter(self):
    lm = TinyLM(flax_mha(aj.nn.make_attention_fn("blockwise")), rngs=nnx.Rngs(10))
    check_greedy(self, lm, prefill_chunk=1, decode=False)          # flax's decode takes one token per call


class FlaxDecodeAdapterTest(parameterized.TestCase):
  """make_attention_fn inside flax.nnx.MultiHeadAttention(decode=True): flax passes the whole cache and an
  occupancy mask [B, 1, 1, max_length]."""

  def test_token_by_token_equals_flax_default(self):
    self.check_token_by_token("blockwise")

  @parameterized.parameters("xla", "reference")
  @pytest.mark.slow
  def test_token_by_token_other_implementations(self, implementation):
    self.check_token_by_token(implementation)

  def check_token_by_token(self, implementation):
    x = randn(np.random.default_rng(11), (2, 8, D))
    ref, m = flax_mha(), flax_mha(aj.nn.make_attention_fn(implementation))
    got = run_chunks(lambda m, x: m(x), m, x, [1] * 8)
    assert_close(got, run_chunks(lambda m, x: m(x), ref, x, [1] * 8))    # flax's own attention_fn
    assert_close(got, ref(x, decode=False, is_causal=True))             # no cache, causal mask
    assert_close(got, np_mha(m, x))

  def test_jit_step(self):
    x = randn(np.random.default_rng(12), (2, 6, D))
    m = flax_mha(aj.nn.make_attention_fn("xla"))
    assert_close(run_chunks(nnx.jit(lambda m, x: m(x)), m, x, [1] * 6), np_mha(m, x))
