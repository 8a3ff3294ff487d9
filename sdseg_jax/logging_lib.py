"""Metric logging of the training loop: WORKDIR/metrics.jsonl and TensorBoard, process 0 only.

metrics.jsonl holds one JSON object per line with "step" and the metric names (train losses as
"train/<name>", evaluation as "eval/dice", "eval/iou"), flushed at every write so that a crash
loses nothing already logged and `plots.py` can read a live run.

In a gs:// workdir, where objects cannot be appended to, the file's lines are kept in memory and
the whole object is uploaded at every write (an upload is atomic; the file stays small: one line
per logged step). TensorBoard events go through tensorboardX's own gs:// writer.

`ProfileWindow` is the loop's optional `jax.profiler` trace (config.log.profile_*).
"""

import json
import math
from typing import Any, List, Mapping

from etils import epath
import jax
import numpy as np

from sdseg_jax import errors
from sdseg_jax import storage


class _JsonLines:
  """Append-only text lines, flushed at every append (append locally, re-upload on gs://)."""

  def __init__(self, path: epath.Path):
    self._path = path
    self._remote = storage.is_remote(path)
    self._lines: List[str] = []
    self._file = None
    if self._remote:
      if path.exists():
        self._lines = path.read_text().splitlines(keepends=True)
    else:
      path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(path, "a", encoding="utf-8")

  def append(self, line: str) -> None:
    if self._remote:
      self._lines.append(line)
      self._path.write_text("".join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class MetricWriter:
  """Writes scalars to metrics.jsonl and (optionally) TensorBoard; a no-op off process 0."""

  def __init__(self, workdir: storage.PathLike, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    workdir = storage.path(workdir)
    self._jsonl = _JsonLines(workdir / "metrics.jsonl")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    record = {"step": int(step)}
    record.update({k: (v if math.isfinite(v) else None) for k, v in clean.items()})
    self._jsonl.append(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class ProfileWindow:
  """A `jax.profiler` trace of train steps [start, start + num_steps) in WORKDIR/profile.

  Off when `start` < 0 (the default). Every process writes its own trace (named after its host)
  under WORKDIR/profile/plugins/profile/<run>/, which TensorBoard's profile plugin, XProf or
  Perfetto open. The trace stops once the last step of the window has finished on the device,
  so it holds whole steps, not just their asynchronous dispatch. A resumed run whose first step
  lies inside the window traces the rest of it.
  """

  def __init__(self, workdir: storage.PathLike, start: int, num_steps: int):
    self.directory = storage.path(workdir) / "profile"
    self._start, self._end = start, start + max(int(num_steps), 1)
    self._tracing = False

  def before_step(self, step: int, state: Any) -> None:
    """Called with the state that step `step` is about to consume (it is not donated yet)."""
    if self._tracing and step >= self._end:
      jax.block_until_ready(state)  # the window's last step, finished on the device
      self._stop()
    elif not self._tracing and 0 <= self._start <= step < self._end:
      jax.profiler.start_trace(str(self.directory))
      self._tracing = True

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._tracing, self._start = False, -1  # one window per run

  def __enter__(self) -> "ProfileWindow":
    return self

  def __exit__(self, *unused_exc_info) -> None:
    if self._tracing:  # the run ended (or failed) inside the window
      self._stop()


class TrainingDiverged(errors.UserFacingError, FloatingPointError):
  """Non-finite training metrics: the run stops, and nothing of that state is saved."""


def check_finite(metrics: Mapping[str, Any], step: int, last_good: str = "") -> None:
  """The NaN guard of the logging and checkpoint steps: stop rather than train or save garbage.

  The message names the step, the loss terms and the last good checkpoint (`last_good`), so a
  user knows what to resume from; the caller raises before saving, so that checkpoint stays the
  newest one.
  """
  values = {k: np.asarray(v) for k, v in metrics.items()}
  bad = sorted(k for k, v in values.items() if not np.all(np.isfinite(v)))
  if bad:
    terms = ", ".join(f"{k}={float(values[k]):.6g}" for k in sorted(values)
                      if k.startswith("loss") and values[k].size == 1)
    resume = (f"the last good checkpoint is {last_good}" if last_good
              else "no checkpoint was saved before it")
    raise TrainingDiverged(
        f"non-finite metrics at step {step}: {bad} ({terms}); this state was not saved and "
        f"{resume}. Lower the learning rate or check the input data.")
