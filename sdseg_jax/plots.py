"""Training-curve plots from a workdir's metrics.jsonl.

  python -m sdseg_jax.plots --workdir DIR [--out FILE]   # writes DIR/curves.png by default

The trainer appends one JSON object per line ({"step": ..., "train/loss": ..., "eval/dice": ...});
lines may carry any subset of keys, and a run that is still writing (or was killed) can leave a
truncated last line. Plotting must never crash a training job or a monitoring script because of
that, so unreadable lines are skipped (silently for the last line, with a warning elsewhere).
Rendering uses matplotlib's object API with the Agg canvas: no display, no global pyplot state.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pathlib
import sys
from typing import Any, Optional, Sequence, Union
import warnings

from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sdseg_jax import errors
from sdseg_jax import storage

PathLike = storage.PathLike


def read_metrics_jsonl(path: PathLike) -> list[dict[str, Any]]:
  """Parses metrics.jsonl into records that have a numeric "step"; tolerates a truncated tail."""
  lines = [line for line in storage.path(path).read_text().splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if i != len(lines) - 1:  # a truncated last line is expected; anything else is worth a note
        warnings.warn(f"{path}: skipping unparsable line {i + 1}", stacklevel=2)
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
      records.append(record)
  return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
  """(steps, values) for one metric, keeping only finite numeric values."""
  steps, values = [], []
  for record in records:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      steps.append(float(record["step"]))
      values.append(float(value))
  return steps, values


def _metric_keys(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
  """Splits metric names into losses (any key with "loss") and evaluation scores ("eval/...")."""
  keys: list[str] = []
  for record in records:
    keys.extend(k for k in record if k != "step" and k not in keys)
  losses = sorted(k for k in keys if "loss" in k)
  scores = sorted(k for k in keys if k.startswith("eval/") and "loss" not in k)
  return losses, scores


def _draw_panel(ax, records, keys, title, ylabel, log_if_positive) -> None:
  drawn = False
  all_positive = True
  for key in keys:
    steps, values = _series(records, key)
    if not values:
      continue
    marker = "o" if len(values) < 30 else None
    ax.plot(steps, values, label=key, marker=marker, markersize=3, linewidth=1.2)
    all_positive &= min(values) > 0
    drawn = True
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if drawn:
    ax.legend(fontsize=8)
    if log_if_positive and all_positive:
      ax.set_yscale("log")  # diffusion losses fall over orders of magnitude
  else:
    ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)


def plot_training_curves(metrics_jsonl: PathLike, out_png: PathLike
                         ) -> Union[pathlib.Path, epath.Path]:
  """Draws the loss curves and the Dice/IoU (eval/*) curves side by side into a PNG.

  Returns the file written: a pathlib.Path for a local file, an epath.Path for gs://.
  """
  records = read_metrics_jsonl(metrics_jsonl)
  losses, scores = _metric_keys(records)
  fig = Figure(figsize=(12, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax_loss, ax_eval = fig.subplots(1, 2)
  _draw_panel(ax_loss, records, losses, "training losses", "loss", log_if_positive=True)
  _draw_panel(ax_eval, records, scores, "evaluation", "score", log_if_positive=False)
  fig.suptitle(str(storage.path(metrics_jsonl).parent.name or metrics_jsonl), fontsize=10)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  storage.write_bytes_atomic(out_png, png.getvalue())
  return storage.path(out_png) if storage.is_remote(out_png) else pathlib.Path(out_png)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sdseg_jax.plots",
                                   description="Plot DIR/metrics.jsonl into DIR/curves.png.")
  parser.add_argument("--workdir", required=True, help="training workdir with metrics.jsonl")
  parser.add_argument("--out", help="output PNG (default: WORKDIR/curves.png)")
  args = parser.parse_args(argv)
  try:
    workdir = storage.path(args.workdir)
    out = storage.path(args.out) if args.out else workdir / "curves.png"
    storage.check_bucket(workdir, write=False)
    storage.check_bucket(out.parent, write=True)
  except errors.UserFacingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  source = workdir / "metrics.jsonl"
  if not source.is_file():
    print(f"error: {source} not found", file=sys.stderr)
    return 1
  out = plot_training_curves(source, out)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
