"""Helpers every experiment shares: run metadata, XLA's memory accounting, timing, tables, plots and JSON files.

jax and matplotlib are imported inside the functions that need them, so that importing an experiment stays cheap
and a measurement subprocess can set ``XLA_FLAGS`` before jax starts.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def run_metadata() -> dict:
  """Where and when a run happened: date, command line, machine, Python / jax / jaxlib / flax versions, devices."""
  import jax
  device = jax.devices()[0]

  def version(package: str) -> str | None:
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None
  return dict(date=time.strftime("%Y-%m-%d %H:%M"), argv=list(sys.argv), machine=platform.platform(),
              processor=platform.processor(), cpu_count=os.cpu_count(), python=platform.python_version(),
              jax=jax.__version__, jaxlib=version("jaxlib"), flax=version("flax"), backend=jax.default_backend(),
              device=str(device), device_kind=device.device_kind, num_devices=jax.device_count())


def compiled_memory_mb(compiled: Any) -> float | None:
  """XLA's memory accounting of a compiled function in MiB: arguments + outputs - aliased + temporaries.

  An output that reuses a donated argument's buffer is counted in both ``argument_size_in_bytes`` and
  ``output_size_in_bytes``; ``alias_size_in_bytes`` is the size of those shared buffers, so it is subtracted once
  (a donated ``x -> 2 * x + 1`` of 4 MiB reports 4 MiB arguments, 4 MiB outputs, 4 MiB aliased: 4 MiB live, not 8).
  Without donation the aliased size is 0. None when the backend reports no analysis.
  """
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes) / 2**20


def attention_step(fn: Callable, mode: str, ct: Any) -> Callable:
  """The jitted function a benchmark times: ``fn(q, k, v, *rest)`` itself (``mode="fwd"``), or the gradient
  w.r.t. q, k, v of ``sum(fn(q, k, v, *rest) * ct)`` in float32 (``mode="fwd_bwd"``)."""
  import jax
  import jax.numpy as jnp
  if mode == "fwd":
    return jax.jit(fn)
  if mode != "fwd_bwd":
    raise ValueError(f"mode must be 'fwd' or 'fwd_bwd', got {mode!r}")
  return jax.jit(jax.grad(lambda q, k, v, *rest: (fn(q, k, v, *rest).astype(jnp.float32) * ct).sum(),
                          argnums=(0, 1, 2)))


def time_calls(call: Callable[[], Any], repeats: int, inner: int = 1) -> list[float]:
  """Seconds per call of ``repeats`` timed runs, each of ``inner`` back-to-back calls ending in
  ``block_until_ready`` (the calls queue on the device and run in order)."""
  import jax
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner - 1):
      call()
    jax.block_until_ready(call())
    times.append((time.perf_counter() - t0) / inner)
  return times


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str) -> str:
  """A markdown table; ``align`` has one letter per column, ``l`` (left) or ``r`` (right)."""
  if len(align) != len(header):
    raise ValueError(f"align={align!r} needs one letter per column of header={list(header)}")
  lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def new_figure(figsize: tuple[float, float], ncols: int = 1):
  """``(figure, axes)``: a matplotlib Figure on an Agg canvas (no pyplot, renders headless) with ``ncols`` axes."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, layout="constrained")
  FigureCanvasAgg(fig)
  return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def line_plot(ax, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
              title: str, logy: bool = False, ylim: tuple[float, float] | None = None, fontsize: float = 8) -> None:
  """One marked line per ``label: (x, y)`` against a log x axis (log y too with ``logy``), with grid and legend."""
  for label, (x, y) in series.items():
    ax.plot(x, y, "o-", label=label)
  ax.set(xscale="log", yscale="log" if logy else "linear", xlabel=xlabel, ylabel=ylabel, title=title)
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=fontsize)


def write_text(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def write_json(path: str, data: Any, indent: int = 1) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=indent)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
