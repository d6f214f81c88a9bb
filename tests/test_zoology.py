"""Zoology-style comparison: the recurrent variants (taylor, Based, RetNet, GLA, DeltaNet) in the model, their
decoding state sizes, and compare.py's widths grid, resuming and mean ± std reports."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import compare, models, tasks, train, variants
from experiments import config as config_lib
from tests.helpers import assert_close

NEW_VARIANTS = ("taylor", "based:4", "retnet", "gla", "deltanet", "gla:conv", "deltanet:noconv")
# These tests run tiny steps once: on the CPU, XLA's backend optimisations would take most of their time.
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
TINY_MQAR = dict(seq_len=16, num_kv_pairs=2, vocab_size=40)
# CI runs the mixers with the most machinery of their own (gates, short convolution, window + features); the rest
# run under -m slow.
CI_VARIANTS = ("based:4", "gla", "deltanet")
SPECS = [pytest.param(s, marks=() if s in CI_VARIANTS else pytest.mark.slow) for s in NEW_VARIANTS]


def _tiny_model(spec: str, seed: int = 0):
  task = tasks.make_task("mqar", **TINY_MQAR)
  cfg = train.TrainConfig(task="mqar", task_kwargs=TINY_MQAR, variant=spec, d_model=16, num_heads=2, num_layers=1,
                          steps=2, warmup_steps=1, lr=1e-2, batch_size=4, seed=seed)
  return cfg, task, train.make_model(cfg, task)


@pytest.mark.parametrize("spec", [pytest.param(s, marks=() if s == "deltanet" else pytest.mark.slow)
                                  for s in NEW_VARIANTS])
def test_new_variant_takes_a_train_step(spec):
  cfg, task, model = _tiny_model(spec)
  mixer = model.blocks[0].attn
  expected = models.MIXERS.get(variants.parse(spec)[0], models.SelfAttention)
  assert type(mixer) is expected
  graphdef, params = nnx.split(model)
  tx = train.make_optimizer(cfg)
  batch = task.batch(0, 0, cfg.batch_size)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE if jax.default_backend() == "cpu" else None)
  def step(params, opt_state):
    loss_fn = lambda p: train._loss_and_accuracy(nnx.merge(graphdef, p)(batch["inputs"]), batch)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  # Two steps: the first one's learning rate is 0 (warmup starts at 0).
  new_params, _, loss, grads = step(*step(params, tx.init(params))[:2])
  assert np.isfinite(float(loss))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(jax.device_get(grads)))
  assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(jax.tree.leaves(params),
                                                                    jax.tree.leaves(new_params)))
  # Every parameter of the mixer gets a gradient (no projection left unused).
  mixer_grads = jax.tree.leaves(jax.device_get(nnx.state(nnx.merge(graphdef, grads).blocks[0].attn)))
  assert mixer_grads and all(np.abs(g).max() > 0 for g in mixer_grads)


@pytest.mark.parametrize("spec", SPECS)
def test_new_variant_is_causal(spec):
  """Changing the tokens after position t leaves the logits at positions <= t unchanged (and changes later ones)."""
  _, _, model = _tiny_model(spec, seed=1)
  tokens = np.random.default_rng(0).integers(0, 40, (2, 16))
  t = 7
  changed = tokens.copy()
  changed[:, t + 1:] = (tokens[:, t + 1:] + 1) % 40
  before, after = (np.asarray(model(jnp.asarray(x, jnp.int32))) for x in (tokens, changed))
  assert_close(after[:, :t + 1], before[:, :t + 1], jnp.float32)
  assert np.abs(after[:, t + 1:] - before[:, t + 1:]).max() > 1e-3


def test_new_variants_refuse_non_causal_use():
  for spec in ("based", "retnet", "gla", "deltanet"):
    with pytest.raises(ValueError, match=f"attention='{spec}' is a causal recurrence .* is_causal=False"):
      models.TransformerLM(20, 16, 2, 1, 16, attention=spec, causal=False, num_classes=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="own projections"):
      variants.make_attention(spec)
  # Taylor features need no causal order: the non-causal form is linear attention's own.
  models.TransformerLM(20, 16, 2, 1, 16, attention="taylor", causal=False, num_classes=3, rngs=nnx.Rngs(0))


def test_causal_short_conv_matches_a_loop():
  conv = models.CausalShortConv(3, 4, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).standard_normal((2, 6, 3))
  w = np.asarray(conv.kernel[...], np.float64)
  want = np.zeros_like(x)
  for t in range(6):
    for i in range(4):          # tap i reads x[t - 3 + i]
      if t - 3 + i >= 0:
        want[:, t] += w[i] * x[:, t - 3 + i]
  assert_close(conv(jnp.asarray(x, jnp.float32)), want, jnp.float32)


def test_short_convolution_ablations():
  """deltanet:noconv drops DeltaNet's short convolution, gla:conv gives GLA the same one; other options refuse."""
  has_conv = {spec: models.make_mixer(16, 2, attention=spec, causal=True, rngs=nnx.Rngs(0)).conv is not None
              for spec in ("deltanet", "deltanet:noconv", "gla", "gla:conv")}
  assert has_conv == {"deltanet": True, "deltanet:noconv": False, "gla": False, "gla:conv": True}
  for spec, match in (("gla:noconv", "gla takes 'conv'"), ("deltanet:conv", "deltanet takes 'noconv'"),
                      ("retnet:conv", "retnet takes no option")):
    with pytest.raises(ValueError, match=match):
      variants.short_conv(spec)
  with pytest.raises(ValueError, match="short-convolution ablations have no decode form"):
    from experiments import generate
    generate.decode_plan(models.TransformerLM(20, 16, 2, 1, 16, attention="gla:conv", rngs=nnx.Rngs(0)))


def test_head_rms_norm():
  norm = models.HeadRMSNorm(2, 3)
  scale = np.random.default_rng(1).standard_normal(6)
  norm.scale[...] = jnp.asarray(scale, jnp.float32)
  x = np.random.default_rng(0).standard_normal((2, 4, 2, 3))
  want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * scale.reshape(2, 3)
  assert_close(norm(jnp.asarray(x, jnp.float32)), want, jnp.float32)


def test_retnet_decays_are_the_papers():
  assert_close(jnp.exp(variants.retnet_log_decay(3)), [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128], jnp.float32)


def test_state_sizes():
  """Hand-computed at T = 128, d_model = 64, 2 heads (H = 32)."""
  want = {
      "softmax": 16384,          # 2 T d
      "blockwise": 16384,
      "local:16": 2176,          # 2 (W + 1) d: a causal query sees itself and W keys before it
      "local:256": 16384,        # the window is capped at T
      "linear_elu": 2112,        # N (H H + H) = 2 (1024 + 32)
      "favor:64": 4224,          # N (M H + M) = 2 (2048 + 64)
      "favor": 16896,            # M = 256: 2 (8192 + 256)
      "taylor": 37026,           # D = 1 + 32 + 528 = 561: 2 (561 * 32 + 561)
      "based:16": 12146,         # D = 153: 2 (153 * 32 + 153) + 2 * 16 * 64 = 10098 + 2048
      "retnet": 2048,            # N H H
      "gla": 2048,
      "deltanet": 2048,
  }
  got = {spec: variants.state_size(spec, seq_len=128, d_model=64, num_heads=2) for spec in want}
  assert got == want
  with pytest.raises(ValueError, match="unknown attention variant 'mamba'"):
    variants.state_size("mamba", seq_len=8, d_model=8, num_heads=2)


def _build(preset=None, **overrides):
  return config_lib.build(compare.CompareConfig, compare.PRESETS, preset, **overrides)


def test_zoology_preset_grid():
  config = _build("zoology")
  assert config.task_lens == {"mqar": (64, 128)} and config.d_models == (64, 128, 256) and config.seeds == (0, 1, 2)
  assert set(config.variants) == {"softmax", "local", "linear_elu", "favor", "based", "retnet", "gla", "deltanet"}
  assert config.train["num_layers"] == 2 and config.train["batch_size"] == 32 and config.train["lr"] == 3e-3
  assert config.train["target_accuracy"] == 0.99 and config.train["eval_every"] == 100
  for seq_len, pairs in ((64, 4), (128, 8)):
    plan = compare.run_settings(config, "mqar", seq_len, 128, "based")
    assert plan["task_kwargs"]["num_kv_pairs"] == pairs and plan["settings"]["d_model"] == 128
    assert plan["spec"] == f"based:{seq_len // 8}"
    assert compare.run_settings(config, "mqar", seq_len, 64, "local")["spec"] == f"local:{seq_len // 8}"
    tasks.make_task("mqar", **plan["task_kwargs"])
  for variant in config.variants:   # every variant builds at the smallest width and has a state size
    spec = compare._variant_spec(variant, 64)
    nnx.eval_shape(lambda: models.TransformerLM(256, 64, 2, 1, 64, attention=spec, rngs=nnx.Rngs(0)))
    sizes = [variants.state_size(spec, seq_len=64, d_model=d, num_heads=2) for d in config.d_models]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1], (variant, sizes)


def _tiny_compare(**overrides):
  return _build(**dict(dict(task_lens={"mqar": (16,)}, variants=("softmax",), seeds=(0,), mqar_vocab=40,
                            train=dict(steps=2, d_model=16, num_heads=2, num_layers=1, batch_size=4, lr=3e-3,
                                       warmup_steps=1, eval_every=2, eval_batches=1, eval_batch_size=8,
                                       log_every=2)), **overrides))


def test_resume_keeps_recorded_runs(tmp_path, monkeypatch):
  """Training is replaced by a stub that records its calls (the real path is test_train.py's smoke run)."""
  calls = []

  def fake_train(config, workdir):
    calls.append(config)
    metrics = dict(accuracy=0.5 + 0.1 * config.seed, loss=1.0, steps=config.steps, wall_s=0.1, steps_per_sec=20.0,
                   step_memory_mb=1.0, first_train_loss=3.0, last_train_loss=2.0)
    return train.TrainResult(None, metrics, [])
  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  first = compare.run_comparison(_tiny_compare(), tmp_path)
  assert len(calls) == 1 and first["reused_runs"] == 0
  rec = first["runs"][0]
  assert rec["d_model"] == 16 and rec["state_size"] == 2 * 16 * 16 and rec["settings"]["steps"] == 2
  # A second seed: only that one trains; the first is kept as recorded.
  second = compare.run_comparison(_tiny_compare(seeds=(0, 1)), tmp_path)
  assert [c.seed for c in calls] == [0, 1] and second["reused_runs"] == 1
  assert [r["seed"] for r in second["runs"]] == [0, 1] and second["runs"][0] == rec
  assert "1 run(s) kept from an earlier results.json" in open(tmp_path / "results.md").read()
  assert [r["seed"] for r in json.load(open(tmp_path / "results.json"))["runs"]] == [0, 1]
  # Other widths: new runs, the recorded ones are kept (after the grid's runs).
  third = compare.run_comparison(_tiny_compare(seeds=(1,), d_models=(16, 32)), tmp_path)
  assert [(c.d_model, c.seed) for c in calls[2:]] == [(32, 1)] and third["reused_runs"] == 1
  assert [(r["d_model"], r["seed"]) for r in third["runs"]] == [(16, 1), (32, 1), (16, 0)]
  # Other settings are not the same runs: dropped and rerun (here the budget leaves every run out).
  del calls[:]
  fourth = compare.run_comparison(_tiny_compare(seeds=(0, 1), steps=1, budget_s=0.0), tmp_path)
  assert calls == [] and fourth["runs"] == [] and len(fourth["not_run"]) == 2
  compare.run_comparison(_tiny_compare(), tmp_path)
  fifth = compare.run_comparison(_tiny_compare(resume=False), tmp_path)
  assert len(calls) == 2 and fifth["reused_runs"] == 0 and len(fifth["runs"]) == 1


def _run(variant, d_model, seed, acc, size, seq_len=64, steps=100):
  return dict(task="mqar", seq_len=seq_len, d_model=d_model, variant=variant, spec=variant, seed=seed,
              state_size=size, accuracy=acc, loss=1.0, first_train_loss=5.0, last_train_loss=1.0, steps=steps,
              steps_per_sec=10.0, step_memory_mb=None)


def test_summary_mean_and_std_over_seeds(tmp_path):
  runs = [_run("softmax", 64, 0, 0.5, 8192, steps=100), _run("softmax", 64, 1, 0.7, 8192, steps=200),
          _run("softmax", 64, 2, 0.9, 8192, steps=300), _run("gla", 64, 0, 0.25, 2048),
          _run("gla", 128, 0, 0.4, 8192), _run("gla", 128, 1, 0.6, 8192)]
  results = dict(preset="hand", date="today", jax="0", backend="cpu", device_kind="cpu", wall_s=60.0,
                 skipped_variants={}, not_run=[], runs=runs)
  summary = compare.summarize(runs)
  assert [(s["variant"], s["d_model"], s["seeds"]) for s in summary] == [("softmax", 64, 3), ("gla", 64, 1),
                                                                          ("gla", 128, 2)]
  assert_close([s["accuracy_mean"] for s in summary], [0.7, 0.25, 0.5], jnp.float64)
  # Sample std: sqrt(((0.2)^2 + 0 + (0.2)^2) / 2) = 0.2; sqrt(2 (0.1)^2 / 1) = 0.1414...
  assert_close([s["accuracy_std"] for s in summary], [0.2, 0.0, 0.1 * 2 ** 0.5], jnp.float64)
  assert summary[0]["steps_mean"] == 200
  text = compare.markdown(results)
  assert "| mqar | 64 | 64 | softmax | softmax | 8192 | 3 | 0.700 ± 0.200 | 200 |" in text
  assert "| mqar | 64 | 128 | gla | gla | 8192 | 2 | 0.500 ± 0.141 | 100 |" in text
  assert "| variant | d_model=64 | d_model=128 |" in text
  assert "| softmax | 0.700 ± 0.200 | – |" in text and "| gla | 0.250 | 0.500 ± 0.141 |" in text
  paths = compare.plot(results, str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ["accuracy_vs_length_mqar.png", "recall_vs_state_mqar_T64.png"]
  assert all(os.path.getsize(p) > 0 for p in paths)
