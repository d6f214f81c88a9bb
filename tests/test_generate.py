"""Autoregressive decoding (experiments/generate.py): every variant's decode state reproduces the full forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import generate, variants
from experiments.models import TransformerLM
from tests.helpers import assert_close

VOCAB, D_MODEL, HEADS, LAYERS, MAX_LEN = 24, 32, 2, 2, 24
T = 12   # sequence of the step-by-step checks; local:3 / based:4 / xla_local:3 wrap their ring buffers
PROMPT, NEW = 5, 8   # generate() feeds PROMPT + NEW - 1 = T positions
# Variants that decode, with the model's keyword arguments; CI runs the first three (a KV cache, a ring buffer,
# a recurrent state plus the short-convolution buffer), the rest under -m slow.
FAST = ("softmax", "local:3", "deltanet")
CASES = {
    "softmax": {}, "local:3": {}, "deltanet": {},
    "softmax/gqa": dict(num_kv_heads=1), "linear_elu": {}, "linear_relu": {}, "favor:32": {}, "taylor": {},
    "based:4": {}, "retnet": {}, "gla": {}, "alibi": {}, "nope": {}, "xla_local:3": {}, "flex": {},
    "blockwise": {}, "local:3/gqa": dict(num_kv_heads=1), "ring": {}, "pallas": {},
}
# (alibi's logits are checked above; its eager forward rebuilds flex's block mask on every call, too slow here.)
GENERATE_CASES = ("softmax", "local:3", "deltanet", "linear_elu", "favor:32", "based:4", "gla", "retnet", "taylor")


def _params(names):
  return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


@functools.cache
def _model(case: str) -> TransformerLM:
  spec = case.partition("/")[0]
  return TransformerLM(VOCAB, D_MODEL, HEADS, LAYERS, MAX_LEN, attention=spec, rngs=nnx.Rngs(0), **CASES[case])


def _tokens(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


@pytest.mark.parametrize("case", _params(CASES))
def test_decode_step_matches_forward(case):
  """From the empty cache, the logits of each step equal the full forward's at that position; so do a prefill's
  logits, its state (equal to the state the steps reach) and the steps after it."""
  model = _model(case)
  tokens = _tokens((2, T))
  expected = model(tokens)
  step = generate.make_decode_step(model)
  cache = generate.init_cache(model, 2, T)
  split = PROMPT
  for t in range(T):
    logits, cache = step(cache, tokens[:, t], t)   # donates the cache it is given
    assert_close(logits, expected[:, t], jnp.float32, err_msg=f"{case} position {t}")
    if t == split - 1:
      stepped = jax.tree.map(jnp.copy, cache)
  logits, cache = generate.prefill(model, tokens[:, :split], T)
  assert_close(logits, expected[:, :split], jnp.float32, err_msg=f"{case} prefill")
  assert jax.tree.structure(cache) == jax.tree.structure(stepped)
  for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(stepped)):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got, want, jnp.float32, err_msg=f"{case} prefill state")
  for t in range(split, T):
    logits, cache = generate.decode_step(model, cache, tokens[:, t], t)
    assert_close(logits, expected[:, t], jnp.float32, err_msg=f"{case} position {t} after prefill")


@pytest.mark.parametrize("case", _params(GENERATE_CASES))
def test_greedy_generate_matches_recomputing_the_prefix(case):
  """Each new token is the argmax of the full forward (no cache) of the prefix so far. The model is causal, so the
  forward runs on a fixed [B, T] window holding the prefix followed by random tokens, read at the prefix's last
  position (one shape, compiled once): a leak from later positions would make the two disagree."""
  model = _model(case)
  prompt = _tokens((2, PROMPT), seed=1)
  out = np.asarray(generate.generate(model, prompt, NEW))
  assert out.shape == (2, PROMPT + NEW) and out.dtype == np.int32
  seq = np.concatenate([np.asarray(prompt), np.asarray(_tokens((2, NEW), seed=2))], axis=1)
  for n in range(PROMPT, PROMPT + NEW):   # n tokens known; positions >= n still hold random tokens
    seq[:, n] = np.asarray(jnp.argmax(model(jnp.asarray(seq[:, :T]))[:, n - 1], axis=-1))
  np.testing.assert_array_equal(out, seq)


def test_sampling_is_seeded_and_in_range():
  model = _model("softmax")
  prompt = _tokens((2, PROMPT), seed=3)
  a, b, c = (np.asarray(generate.generate(model, prompt, NEW, greedy=False, rng=jax.random.key(s), temperature=2.0))
             for s in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and a.min() >= 0 and a.max() < VOCAB
  np.testing.assert_array_equal(a[:, :PROMPT], prompt)
  with pytest.raises(ValueError, match="greedy=False samples and needs rng"):
    generate.generate(model, prompt, 2, greedy=False)


def _abstract_model(case: str) -> TransformerLM:
  """The model's structure with shapes only (no parameter drawn): all init_cache needs."""
  spec = case.partition("/")[0]
  return nnx.eval_shape(lambda: TransformerLM(VOCAB, D_MODEL, HEADS, LAYERS, MAX_LEN, attention=spec,
                                              rngs=nnx.Rngs(0), **CASES[case]))


def _bytes(case: str, max_len: int) -> int:
  model = _abstract_model(case)
  return generate.cache_bytes(jax.eval_shape(lambda: generate.init_cache(model, 2, max_len)))


def test_cache_bytes_of_kv_caches_grow_with_the_context():
  for case in ("softmax", "softmax/gqa", "alibi"):
    small, large = _bytes(case, 8), _bytes(case, 16)
    assert large == 2 * small > 0, case
  # One layer's KV cache is variants.state_size floats per row.
  assert _bytes("softmax", 16) == LAYERS * 2 * 4 * variants.state_size("softmax", seq_len=16, d_model=D_MODEL,
                                                                        num_heads=HEADS)
  # A ring buffer grows until it holds the window (local:3 sees i-3..i: 4 entries), then stays flat.
  assert _bytes("local:3", 2) < _bytes("local:3", 4) == _bytes("local:3", 24)
  # The bytes are those of the arrays init_cache builds.
  cache = generate.init_cache(_abstract_model("deltanet"), 2, 8)
  assert generate.cache_bytes(cache) == sum(np.asarray(x).nbytes for x in jax.tree.leaves(cache))


# favor:32 draws its random features (a QR decomposition, several seconds to compile on the CPU).
@pytest.mark.parametrize("case", [*("local:3", "based:4", "linear_elu", "taylor", "retnet", "gla", "deltanet"),
                                  pytest.param("favor:32", marks=pytest.mark.slow)])
def test_cache_bytes_of_recurrent_states_are_flat(case):
  assert _bytes(case, 8) == _bytes(case, 24) > 0


@pytest.mark.parametrize("spec,kwargs,match", [
    ("strided:4", {}, "attention='strided:4' has no decode form"),
    ("fixed:4", {}, "attention='fixed:4' has no decode form"),
    ("bigbird:1@4", {}, "attention='bigbird:1@4' has no decode form"),
    ("softmax", dict(causal=False), "causal=False: a non-causal model has no autoregressive decode"),
    ("linear_elu", dict(causal=False), "causal=False: a non-causal model"),
    ("softmax", dict(causal=False, num_classes=5), "classifier .* no autoregressive decode"),
])
def test_variants_without_a_decode_form_raise(spec, kwargs, match):
  model = TransformerLM(VOCAB, D_MODEL, HEADS, 1, MAX_LEN, attention=spec, rngs=nnx.Rngs(0), **kwargs)
  prompt = _tokens((1, PROMPT))
  for call in (lambda: generate.init_cache(model, 1, 8), lambda: generate.generate(model, prompt, 2),
               lambda: generate.prefill(model, prompt, 8)):
    with pytest.raises(ValueError, match=match):
      call()


def test_bad_arguments_raise():
  model = _model("softmax")
  cache = generate.init_cache(model, 2, 8)
  with pytest.raises(ValueError, match=r"position must lie in \[0, 8\)"):
    generate.decode_step(model, cache, _tokens((2,)), 8)
  with pytest.raises(ValueError, match="tokens_B must be an integer array"):
    generate.decode_step(model, cache, _tokens((2, 1)), 0)
  with pytest.raises(ValueError, match=r"tokens_B.shape=\(3,\) does not match the cache's batch size 2"):
    generate.decode_step(model, cache, _tokens((3,)), 0)
  with pytest.raises(ValueError, match="exceeds the model's max_len=24"):
    generate.generate(model, _tokens((1, 20)), 6)
  with pytest.raises(ValueError, match="max_len must be a positive int"):
    generate.init_cache(model, 2, 0)
  with pytest.raises(ValueError, match="max_len >= its length"):
    generate.prefill(model, _tokens((1, 6)), 4)
  # A ring buffer cut to max_len < window cannot take positions past max_len.
  local = _model("local:3")
  with pytest.raises(ValueError, match=r"position must lie in \[0, 2\)"):
    generate.decode_step(local, generate.init_cache(local, 2, 2), _tokens((2,)), 2)
