"""experiments/config.py: configs from presets, overrides and absl flags; every documented command line parses."""

import dataclasses
import shlex

import pytest
from absl import app, flags

from experiments import (analyze_heads, bench_kernels, compare, decode_bench, extrapolation, mask_agreement, scaling,
                         seq2seq_alignment, tune_blocks)
from experiments import config as config_lib
from experiments.config import setting


@dataclasses.dataclass(frozen=True)
class Toy:
  steps: int = setting(10, "Steps.", aliases=("num_steps",))
  lr: float | None = setting(None, "Learning rate.")
  name: str = setting("a", "Name.", choices=("a", "b"))
  fast: bool = setting(False, "Fast.")
  seeds: tuple[int, ...] = setting((0,), "Seeds.")
  causal: tuple[bool, ...] = setting((False,), "Causal settings.")
  kinds: tuple[str, ...] = setting(("x",), "Kinds.", choices=("x", "y"))
  table: dict = setting(help="Not a flag.", flag=False, default_factory=dict)


TOY_PRESETS = {"small": dict(steps=2, seeds=[1, 2]), "default": {}}


def parse(cls, presets, command_line: str, workdir=None):
  fv = flags.FlagValues()
  config_lib.define_flags(cls, presets, fv, workdir=workdir)
  fv(["prog", *shlex.split(command_line)])
  return config_lib.from_flags(cls, presets, fv), fv


def test_build_applies_the_preset_then_the_overrides():
  assert config_lib.build(Toy) == Toy()
  small = config_lib.build(Toy, TOY_PRESETS, "small")
  assert small.steps == 2 and small.seeds == (1, 2)          # lists become tuples
  assert config_lib.build(Toy, TOY_PRESETS, "small", steps=5, table={"k": 1}) == Toy(steps=5, seeds=(1, 2),
                                                                                       table={"k": 1})


def test_build_rejects_unknown_fields_and_presets():
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['stpes'\] for Toy; its fields are \['steps'"):
    config_lib.build(Toy, TOY_PRESETS, "small", stpes=3)
  with pytest.raises(ValueError, match=r"unknown preset='huge' for Toy; choose from \['small', 'default'\]"):
    config_lib.build(Toy, TOY_PRESETS, "huge")
  with pytest.raises(ValueError, match="unknown field"):
    config_lib.build(Toy, {"bad": dict(learning_rate=1.0)}, "bad")


def test_flags_override_the_preset_only_where_given():
  config, fv = parse(Toy, TOY_PRESETS, "")
  assert config == Toy() and fv.preset == "default"
  config, _ = parse(Toy, TOY_PRESETS, "--preset=small")
  assert config == Toy(steps=2, seeds=(1, 2))
  # A flag given explicitly wins over the preset even when it equals the dataclass default.
  config, _ = parse(Toy, TOY_PRESETS, "--preset=small --steps=10 --lr=0.5 --name=b --fast --causal=false,true "
                                      "--kinds=y,x")
  assert config == Toy(steps=10, lr=0.5, name="b", fast=True, seeds=(1, 2), causal=(False, True), kinds=("y", "x"))
  config, _ = parse(Toy, None, "--num_steps=7 --seeds=3,4")      # an old name still works
  assert config.steps == 7 and config.seeds == (3, 4)


def test_bad_flag_values_are_refused():
  with pytest.raises(flags.IllegalFlagValueError):
    parse(Toy, None, "--name=c")
  with pytest.raises(app.UsageError, match=r"--kinds: \['z'\] not among \['x', 'y'\]"):
    parse(Toy, None, "--kinds=x,z")
  with pytest.raises(ValueError, match="--causal: 'maybe' is not a boolean"):
    parse(Toy, None, "--causal=maybe")
  with pytest.raises(flags.UnrecognizedFlagError):
    parse(Toy, None, "--table=1")                               # flag=False fields are not flags


def test_workdir_is_a_flag_outside_the_config():
  config, fv = parse(Toy, TOY_PRESETS, "--preset=small", workdir="/tmp/toy")
  assert config == Toy(steps=2, seeds=(1, 2)) and fv.workdir == "/tmp/toy"
  config, fv = parse(Toy, TOY_PRESETS, "--workdir=out/toy --steps=3", workdir="/tmp/toy")
  assert config == Toy(steps=3) and fv.workdir == "out/toy"
  with pytest.raises(flags.UnrecognizedFlagError):
    parse(Toy, TOY_PRESETS, "--workdir=out/toy")                # only scripts that write a directory have it

  @dataclasses.dataclass(frozen=True)
  class WithDir:
    workdir: str = setting("/tmp/a", "Output directory.")
  with pytest.raises(ValueError, match="WithDir has a field 'workdir' and workdir='/tmp/b' asks for a --workdir"):
    config_lib.define_flags(WithDir, None, flags.FlagValues(), workdir="/tmp/b")


def test_a_field_no_flag_can_carry_must_say_so():
  @dataclasses.dataclass(frozen=True)
  class Bad:
    table: dict = dataclasses.field(default_factory=dict)
  with pytest.raises(TypeError, match=r"Bad.table: no flag can carry .* setting\(\.\.\., flag=False\)"):
    config_lib.define_flags(Bad, None, flags.FlagValues())


# name: (config class, presets, --workdir's default or None where the script has no --workdir)
EXPERIMENTS = {
    "compare": (compare.CompareConfig, compare.PRESETS, compare.WORKDIR),
    "scaling": (scaling.ScalingConfig, None, None),
    "bench_kernels": (bench_kernels.BenchConfig, None, None),
    "tune_blocks": (tune_blocks.TuneConfig, None, None),
    "mask_agreement": (mask_agreement.MaskAgreementConfig, None, None),
    "seq2seq_alignment": (seq2seq_alignment.Config, seq2seq_alignment.PRESETS, seq2seq_alignment.WORKDIR),
    "analyze_heads": (analyze_heads.HeadsConfig, analyze_heads.PRESETS, analyze_heads.WORKDIR),
    "extrapolation": (extrapolation.Config, extrapolation.PRESETS, extrapolation.WORKDIR),
    "decode_bench": (decode_bench.DecodeBenchConfig, decode_bench.PRESETS, decode_bench.WORKDIR),
}

# The command lines of README.md, docs/*.md, the module docstrings and gpu_check.sh, with what they must mean
# (``workdir``: the --workdir flag, which is not a config field).
DOCUMENTED = [
    ("compare", "", dict(tasks=None, steps=None, d_models=None, resume=True, workdir="/tmp/attention_jax_compare",
                         task_lens={"mqar": (32, 64)}, mqar_kv_pairs=8, variants=("softmax", "linear_elu", "favor"))),
    ("compare", "--preset=smoke", dict(variants=("softmax", "linear_elu"), mqar_vocab=64)),
    ("compare", "--preset=full --workdir=runs/full", dict(workdir="runs/full", mqar_vocab=256,
                                                          task_lens={"mqar": (64, 128, 256), "selective_copy": (256,),
                                                                     "listops": (512,), "induction": (256,)})),
    ("compare", "--tasks=mqar --variants=softmax,linear_elu --seq_lens=64,128 --steps=3000",
     dict(tasks=("mqar",), variants=("softmax", "linear_elu"), seq_lens=(64, 128), steps=3000)),
    ("compare", "--preset=full --tasks=mqar --variants=bigbird", dict(tasks=("mqar",), variants=("bigbird",),
                                                                      listops_train=20000)),
    ("compare", "--preset=full --tasks=listops,selective_copy --variants=bigbird",
     dict(tasks=("listops", "selective_copy"), variants=("bigbird",), task_train={"listops": dict(
         steps=3000, lr=1e-3, target_accuracy=None)})),
    ("compare", "--preset=full --workdir=/out/compare --budget_s=320", dict(budget_s=320.0, workdir="/out/compare")),
    ("compare", "--preset=zoology --workdir=runs/zoology", dict(workdir="runs/zoology", d_models=(64, 128, 256),
                                                              seeds=(0, 1, 2), resume=True, mqar_vocab=128)),
    ("compare", "--preset=zoology --seq_lens=64 --mqar_kv_pairs=8 --d_models=64,128 "
     "--variants=softmax,local,linear_elu,favor:64,based,retnet,gla,deltanet --workdir=runs/zoology_cpu",
     dict(seq_lens=(64,), mqar_kv_pairs=8, d_models=(64, 128), workdir="runs/zoology_cpu",
          variants=("softmax", "local", "linear_elu", "favor:64", "based", "retnet", "gla", "deltanet"))),
    ("bench_kernels", "--implementations=xla,retnet,gla,deltanet,deltanet@recurrent,linear_elu --seq_lens=16384 "
     "--causal=true --modes=fwd_bwd --batch=1 --heads=1 --head_dim=64 --dtype=float32",
     dict(implementations=("xla", "retnet", "gla", "deltanet", "deltanet@recurrent", "linear_elu"), seq_lens=(16384,),
          causal=(True,), batch=1, heads=1, head_dim=64, dtype="float32")),
    ("compare", "--preset=zoology --noresume --d_models=64 --variants=based,deltanet",
     dict(resume=False, d_models=(64,), variants=("based", "deltanet"), task_lens={"mqar": (64, 128)})),
    ("scaling", "--variants=xla,blockwise,linear_elu,local:256 --seq_lens=1024,4096,16384",
     dict(variants=("xla", "blockwise", "linear_elu", "local:256"), seq_lens=(1024, 4096, 16384),
          modes=("fwd", "fwd_bwd"))),
    ("scaling", "--variants=xla,blockwise --seq_lens=1024,4096,16384,65536 --modes=fwd,fwd_bwd --repeats=3 "
     "--out=docs/scaling_blockwise_cpu.json", dict(repeats=3, out="docs/scaling_blockwise_cpu.json")),
    ("scaling", "--variants=xla,linear_elu,linear_relu,favor --causal --seq_lens=4096,8192 --modes=fwd_bwd "
     "--max_dense_gb=10 --out=x.json", dict(causal=True, modes=("fwd_bwd",), max_dense_gb=10.0)),
    ("scaling", "--variants=favor,linear_elu,linear_relu --seq_lens=4096,16384 --modes=fwd_bwd --repeats=3",
     dict(variants=("favor", "linear_elu", "linear_relu"), causal=False, batch=1, heads=1, head_dim=64)),
    ("scaling", "--variants=ring --devices=1,2,4,8 --seq_lens=16384 --modes=fwd_bwd --out=docs/scaling_ring_cpu.json",
     dict(devices=(1, 2, 4, 8), seq_lens=(16384,))),
    ("bench_kernels", "", dict(causal=(False, True), padding=(0.0,), mask_modes=("structured",), batch=2)),
    ("bench_kernels", "--implementations=pallas,cudnn,jax_pallas_tuned --seq_lens=16384,4096 --repeats=5",
     dict(implementations=("pallas", "cudnn", "jax_pallas_tuned"), seq_lens=(16384, 4096), repeats=5)),
    ("bench_kernels", "--implementations=pallas --sweep --seq_lens=16384 --modes=fwd --causal=false,true",
     dict(sweep=True, modes=("fwd",), causal=(False, True))),
    ("bench_kernels", "--implementations=pallas,cudnn --causal=true --padding=0,0.25 --mask_modes=structured,dense "
     "--seq_lens=4096 --out=/tmp/bench_masks.json", dict(causal=(True,), padding=(0.0, 0.25),
                                                         mask_modes=("structured", "dense"))),
    ("bench_kernels", "--implementations=pallas_tpu,xla --seq_lens=256 --batch=1 --heads=2 --head_dim=128 "
     "--dtype=float32 --repeats=1", dict(batch=1, heads=2, head_dim=128, dtype="float32", repeats=1)),
    ("bench_kernels", "--summarize=/tmp/bench.json", dict(summarize="/tmp/bench.json")),
    ("bench_kernels", "--budget_s=45 --implementations=pallas,cudnn --seq_lens=16384 --mask_modes=structured,dense "
     "--causal=false --padding=0.25 --batch=1 --heads=2 --head_dim=16 --repeats=5 --out=/o/m.json",
     dict(budget_s=45.0, causal=(False,), padding=(0.25,), head_dim=16)),
    ("tune_blocks", "--out=/tmp/tune.json --budget_s=300", dict(budget_s=300.0, head_dims=(128, 64, 256, 32))),
    ("tune_blocks", "--budget_s=90 --head_dims=128,64 --dtypes=bfloat16 --out=/o/tune.json",
     dict(head_dims=(128, 64), dtypes=("bfloat16",))),
    ("tune_blocks", "--summarize=/tmp/tune.json", dict(summarize="/tmp/tune.json")),
    ("tune_blocks", "--head_dims=128,64,256,32 --dtypes=float32 --out=/o/tune_f32.json",
     dict(dtypes=("float32",), wide_seq_len=2048, budget_s=0.0)),
    ("bench_kernels", "--implementations=pallas_tpu,xla,blockwise --seq_lens=4096,16384 --out=/tmp/bench_tpu.json",
     dict(implementations=("pallas_tpu", "xla", "blockwise"), dtype="bfloat16", modes=("fwd", "fwd_bwd"))),
    ("mask_agreement", "", dict(batch=2, seq_len=200, heads=4, kv_heads=2, head_dim=64, padding=0.25,
                                implementations=("pallas", "pallas_tpu"))),
    ("mask_agreement", "--kernels=pallas", dict(implementations=("pallas",))),
    ("seq2seq_alignment", "--workdir=/tmp/seq2seq", dict(workdir="/tmp/seq2seq", steps=1000, max_len=24)),
    ("seq2seq_alignment", "--preset=full --workdir=docs/seq2seq", dict(steps=1500, max_len=30, seeds=(0, 1),
                                                                       workdir="docs/seq2seq")),
    ("seq2seq_alignment", "--preset=smoke", dict(workdir="/tmp/seq2seq_alignment", steps=30)),
    ("seq2seq_alignment", "--preset=smoke --num_steps=5 --learning_rate=0.1 --attentions=none,luong_dot",
     dict(steps=5, lr=0.1, attentions=("none", "luong_dot"), hidden=16)),
    ("analyze_heads", "--workdir=/tmp/heads", dict(task="induction", seq_len=32, reuse=False)),
    ("analyze_heads", "--task=mqar --seq_len=64 --workdir=/tmp/heads_mqar", dict(task="mqar", seq_len=64,
                                                                                  workdir="/tmp/heads_mqar")),
    ("analyze_heads", "", dict(workdir="/tmp/analyze_heads", reuse=False)),
    ("analyze_heads", "--workdir=/tmp/heads --reuse", dict(reuse=True, workdir="/tmp/heads")),
    ("extrapolation", "", dict(seeds=(0,), train_len=32, eval_factors=(1, 2, 4),
                               workdir="/tmp/attention_jax_extrapolation")),
    ("extrapolation", "--preset=smoke", dict(train_len=8, steps=4)),
    ("extrapolation", "--preset=full --workdir=docs/results/extrapolation", dict(seeds=(0, 1, 2),
                                                                                 workdir="docs/results/extrapolation")),
    ("scaling", "--variants=flex:none,flex:window=256,flex:causal,dpa:causal,flex:docs=16 --seq_lens=16384 "
     "--modes=fwd_bwd --out=docs/scaling_flex_cpu.json", dict(variants=("flex:none", "flex:window=256", "flex:causal",
                                                                       "dpa:causal", "flex:docs=16"),
                                                             flex_block_size=128, modes=("fwd_bwd",))),
    ("bench_kernels", "--implementations=pallas,flex --causal=true --seq_lens=16384 --repeats=5",
     dict(implementations=("pallas", "flex"), causal=(True,))),
    ("bench_kernels", "--implementations=flex,flex:window=1024 --causal=true --seq_lens=32768 --repeats=5",
     dict(implementations=("flex", "flex:window=1024"), seq_lens=(32768,))),
    ("bench_kernels", "--implementations=mosaic,pallas,cudnn --seq_lens=16384,4096",
     dict(implementations=("mosaic", "pallas", "cudnn"), modes=("fwd", "fwd_bwd"), seq_lens=(16384, 4096))),
    ("decode_bench", "--workdir=runs/decode_cpu", dict(workdir="runs/decode_cpu", batch=1, heads=8, kv_heads=1,
                                                       head_dim=64, dtype="float32", sweep_context=32768)),
    ("decode_bench", "--implementations=jax_nn,xla,blockwise,pallas_tpu --dtype=bfloat16",
     dict(implementations=("jax_nn", "xla", "blockwise", "pallas_tpu"), dtype="bfloat16")),
    ("decode_bench", "--preset=gpu --workdir=runs/decode_gpu", dict(batch=8, heads=32, kv_heads=8, head_dim=128,
                                                                    dtype="bfloat16", sweep_context=65536)),
]


@pytest.mark.parametrize("name,command_line,expected", DOCUMENTED, ids=[f"{n} {c}" for n, c, _ in DOCUMENTED])
def test_documented_command_lines_parse(name, command_line, expected):
  cls, presets, workdir = EXPERIMENTS[name]
  config, fv = parse(cls, presets, command_line, workdir)
  expected = dict(expected)
  if "workdir" in expected:
    assert fv.workdir == expected.pop("workdir")
  assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_has_help_and_valid_presets(name):
  cls, presets, workdir = EXPERIMENTS[name]
  fv = flags.FlagValues()
  config_lib.define_flags(cls, presets, fv, workdir=workdir)
  help_text = fv.module_help(cls.__module__)          # what --help prints when the module runs as a script
  assert ("--workdir" in help_text) == (workdir is not None)
  assert "workdir" not in {f.name for f in dataclasses.fields(cls)}
  for f in config_lib.flag_fields(cls):
    name = f"--[no]{f.name}" if fv[f.name].boolean else f"--{f.name}"
    assert name in help_text and f.metadata["help"], f.name
  for preset in presets or ():
    assert isinstance(config_lib.build(cls, presets, preset), cls)
