"""Metric logging of the training loop: WORKDIR/metrics.jsonl and TensorBoard, process 0 only.

metrics.jsonl holds one JSON object per line with "step" and the metric names (train losses as
"train/<name>", evaluation as "eval/dice", "eval/iou"), flushed at every write so that a crash
loses nothing already logged and `plots.py` can read a live run.
"""

import json
import math
import pathlib
from typing import Any, Mapping, Optional

import jax
import numpy as np


class MetricWriter:
  """Writes scalars to metrics.jsonl and (optionally) TensorBoard; a no-op off process 0."""

  def __init__(self, workdir: pathlib.Path, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    record = {"step": int(step)}
    record.update({k: (v if math.isfinite(v) else None) for k, v in clean.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    if self.active and self._tb is not None:
      self._tb.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  """The NaN guard of the logging steps: stop at once rather than train on garbage."""
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))]
  if bad:
    raise FloatingPointError(f"non-finite metrics at step {step}: {bad}; lower the learning "
                             "rate or check the input data")


def format_metrics(metrics: Mapping[str, Any], keys: Optional[list] = None) -> str:
  keys = keys or sorted(metrics)
  return " ".join(f"{k.split('/')[-1]}={float(np.asarray(metrics[k])):.4g}" for k in keys
                  if k in metrics)
