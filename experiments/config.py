"""One configuration mechanism for every experiment: a frozen dataclass, named presets and absl flags.

An experiment's settings are a frozen dataclass whose fields are declared with :func:`setting` (default and help
text; ``choices``; ``aliases``, older flag names that keep working; ``flag=False`` for structured values that only
presets set). Presets are named dicts of field overrides. :func:`build` makes a config from a preset plus keyword
overrides (what tests and other scripts call); :func:`define_flags` defines one absl flag per field, and
``--preset`` when there are presets; :func:`from_flags` builds the config from parsed flags: the dataclass
defaults, then the preset, then every flag given on the command line. A script ends with
``config.run(main, Config, PRESETS)``, which calls ``main(config)``.

Where outputs go is not part of the experiment: a script that writes a directory ends with
``config.run(train_and_evaluate, Config, PRESETS, workdir=DEFAULT_DIR)``, which also defines ``--workdir`` and
calls ``train_and_evaluate(config, workdir)``, the function tests call with a small config and a temporary folder.

Flags can carry ``bool``, ``int``, ``float`` and ``str`` fields (optionally ``| None``) and ``tuple[X, ...]`` of
those, given on the command line as a comma-separated list (booleans as ``true`` / ``false``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app, flags

Presets = Mapping[str, Mapping[str, Any]]
_SCALARS = (bool, int, float, str)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[str] | None = None,
            aliases: Sequence[str] = (), flag: bool = True, default_factory: Any = dataclasses.MISSING) -> Any:
  """A config field: ``dataclasses.field`` with the flag's help text, allowed values and old names."""
  metadata = dict(help=help, choices=None if choices is None else tuple(choices), aliases=tuple(aliases), flag=flag)
  return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _flag_type(cls: type, field: dataclasses.Field) -> tuple[type, bool]:
  """``(item type, is a list)`` of a flag field; TypeError for a type no flag can carry."""
  tp = _field_types(cls)[field.name]
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    rest = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = rest[0] if len(rest) == 1 else tp
  if tp in _SCALARS:
    return tp, False
  args = typing.get_args(tp)
  if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS:
    return args[0], True
  raise TypeError(f"{cls.__name__}.{field.name}: no flag can carry the type {tp}; declare the field with "
                  "setting(..., flag=False)")


def flag_fields(cls: type) -> list[dataclasses.Field]:
  """The fields of ``cls`` that are command-line flags."""
  return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def _default(field: dataclasses.Field) -> Any:
  if field.default is not dataclasses.MISSING:
    return field.default
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return None


def _parse_item(text: str, item_type: type, name: str) -> Any:
  if item_type is bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"--{name}: {text!r} is not a boolean (true / false)")
  return item_type(text)


def define_flags(cls: type, presets: Presets | None = None, flag_values: flags.FlagValues = flags.FLAGS, *,
                 workdir: str | None = None) -> None:
  """Defines ``--preset`` (when there are presets), ``--workdir`` (when ``workdir``, its default, is given) and one
  flag per field of the dataclass ``cls``.

  Call it only when running as a script, so that importing an experiment never clashes with another's flags.
  """
  if workdir is not None and "workdir" in {f.name for f in dataclasses.fields(cls)}:
    raise ValueError(f"{cls.__name__} has a field 'workdir' and workdir={workdir!r} asks for a --workdir flag too; "
                     "keep the output directory out of the config")
  # Flags belong to the script's module (absl names __main__ by its path), so that --help lists them.
  kw = dict(flag_values=flag_values, module_name=sys.argv[0] if cls.__module__ == "__main__" else cls.__module__)
  if presets:
    default = "default" if "default" in presets else next(iter(presets))
    flags.DEFINE_enum("preset", default, list(presets), "Base configuration; the other flags override it.", **kw)
  if workdir is not None:
    flags.DEFINE_string("workdir", workdir, "Output directory (created if missing).", **kw)
  for f in flag_fields(cls):
    item_type, is_list = _flag_type(cls, f)
    default, help_text, choices = _default(f), f.metadata.get("help", ""), f.metadata.get("choices")
    if is_list:
      if choices:
        help_text += f" (from {', '.join(choices)})"
      flags.DEFINE_list(f.name, None if default is None else [str(x) for x in default], help_text, **kw)
    elif item_type is bool:
      flags.DEFINE_bool(f.name, default, help_text, **kw)
    elif item_type is int:
      flags.DEFINE_integer(f.name, default, help_text, **kw)
    elif item_type is float:
      flags.DEFINE_float(f.name, default, help_text, **kw)
    elif choices:
      flags.DEFINE_enum(f.name, default, list(choices), help_text, **kw)
    else:
      flags.DEFINE_string(f.name, default, help_text, **kw)
    for alias in f.metadata.get("aliases", ()):
      flags.DEFINE_alias(alias, f.name, **kw)


def _from_flag(cls: type, field: dataclasses.Field, value: Any) -> Any:
  """A parsed flag value as the field's value: lists become tuples of the item type, checked against choices."""
  item_type, is_list = _flag_type(cls, field)
  if not is_list or value is None:
    return value
  items = tuple(_parse_item(x, item_type, field.name) for x in value)
  choices = field.metadata.get("choices")
  bad = [x for x in items if choices and x not in choices]
  if bad:
    raise app.UsageError(f"--{field.name}: {bad} not among {list(choices)}")
  return items


def from_flags(cls: type, presets: Presets | None = None, flag_values: flags.FlagValues = flags.FLAGS) -> Any:
  """The config of the parsed command line: defaults, then ``--preset``, then the flags given explicitly."""
  overrides = {f.name: _from_flag(cls, f, flag_values[f.name].value) for f in flag_fields(cls)
               if flag_values[f.name].present}
  return build(cls, presets, flag_values["preset"].value if presets else None, **overrides)


def _wants_tuple(tp: Any) -> bool:
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    return any(_wants_tuple(a) for a in typing.get_args(tp))
  return tp is tuple or typing.get_origin(tp) is tuple


def build(cls: type, presets: Presets | None = None, preset: str | None = None, **overrides: Any) -> Any:
  """``cls`` with the preset's overrides, then ``overrides`` (lists given for tuple fields become tuples).

  Raises ValueError for an unknown preset or a field ``cls`` does not have.
  """
  values: dict[str, Any] = {}
  if preset is not None:
    if not presets or preset not in presets:
      raise ValueError(f"unknown preset={preset!r} for {cls.__name__}; choose from {list(presets or ())}")
    values.update(presets[preset])
  values.update(overrides)
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ValueError(f"unknown field(s) {unknown} for {cls.__name__}; its fields are {names}")
  for name, value in values.items():
    if isinstance(value, list) and _wants_tuple(_field_types(cls)[name]):
      values[name] = tuple(value)
  return cls(**values)


def run(main: Callable[..., Any], cls: type, presets: Presets | None = None, *, workdir: str | None = None) -> None:
  """A script's entry point: defines the flags of ``cls``, parses the command line and calls ``main(config)``, or
  with ``workdir`` (the default of ``--workdir``) ``main(config, workdir)``."""
  define_flags(cls, presets, workdir=workdir)

  def app_main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]} (settings are --name=value flags)")
    config = from_flags(cls, presets)
    if workdir is None:
      main(config)
    else:
      main(config, flags.FLAGS.workdir)
  app.run(app_main)
