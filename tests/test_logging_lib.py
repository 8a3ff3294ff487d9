"""MetricWriter: metrics.jsonl and the TensorBoard event file hold the same scalars.

The event file is read back here with its own framing (TFRecord: length, CRC, payload, CRC) and
the Event protobuf, not through the writer's code.
"""

import json
import math
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from sdseg_jax import logging_lib


def _read_events(folder):
  files = sorted(folder.glob("events.out.tfevents.*"))
  assert len(files) == 1, files
  data = files[0].read_bytes()
  events, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    payload = data[offset + 12:offset + 12 + length]
    offset += 12 + length + 4
    event = event_pb2.Event()
    event.ParseFromString(payload)
    events.append(event)
  return events


def test_jsonl_and_tensorboard_hold_the_same_scalars(tmp_path):
  writer = logging_lib.MetricWriter(tmp_path, tensorboard=True)
  writer.write(10, {"train/loss": np.float32(0.25), "train/lr": 1e-4})
  writer.write(20, {"train/loss": 0.125, "eval/dice": np.array(0.75)})
  writer.write(30, {"train/loss": float("nan")})
  writer.close()

  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records == [{"step": 10, "train/loss": 0.25, "train/lr": pytest.approx(1e-4)},
                     {"step": 20, "train/loss": 0.125, "eval/dice": 0.75},
                     {"step": 30, "train/loss": None}]  # JSON has no NaN: null

  scalars = {}
  for event in _read_events(tmp_path / "tensorboard"):
    for value in event.summary.value:
      scalars[(value.tag, event.step)] = value.simple_value
  assert set(scalars) == {("train/loss", 10), ("train/lr", 10), ("train/loss", 20),
                          ("eval/dice", 20), ("train/loss", 30)}
  assert scalars[("train/loss", 10)] == 0.25 and scalars[("eval/dice", 20)] == 0.75
  assert scalars[("train/lr", 10)] == pytest.approx(1e-4)
  assert math.isnan(scalars[("train/loss", 30)])  # TensorBoard keeps the NaN visible


def test_appends_across_restarts_and_tensorboard_is_optional(tmp_path):
  first = logging_lib.MetricWriter(tmp_path, tensorboard=False)
  first.write(1, {"a": 1.0})
  first.close()
  second = logging_lib.MetricWriter(tmp_path, tensorboard=False)
  second.write(2, {"a": 2.0})
  second.close()
  steps = [json.loads(line)["step"]
           for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2]  # a resumed run continues the file
  assert not (tmp_path / "tensorboard").exists()


def _traces(workdir):
  return sorted((workdir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_profile_window_traces_only_its_steps(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: calls.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  with logging_lib.ProfileWindow(tmp_path, 2, 3) as window:  # steps 2, 3 and 4
    for step in range(8):
      window.before_step(step, np.zeros(()))
      calls.append(step)
  assert calls == [0, 1, ("start", str(tmp_path / "profile")), 2, 3, 4, ("stop",), 5, 6, 7]
  calls.clear()
  with logging_lib.ProfileWindow(tmp_path, 2, 3) as window:  # resumed at step 3, ends at 4
    for step in range(3, 5):
      window.before_step(step, np.zeros(()))
  assert calls == [("start", str(tmp_path / "profile")), ("stop",)]
  calls.clear()
  with logging_lib.ProfileWindow(tmp_path, -1, 5) as window:  # off
    for step in range(4):
      window.before_step(step, np.zeros(()))
  assert not calls


def test_profile_window_writes_a_trace(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  step_fn = jax.jit(lambda x: x @ x + 1.0)
  state = jax.numpy.eye(64)
  with logging_lib.ProfileWindow(tmp_path, 1, 1) as window:
    for step in range(3):
      window.before_step(step, state)
      state = step_fn(state)
  assert len(_traces(tmp_path)) == 1


def test_training_writes_the_configured_trace():
  # The shared tiny run (tests/trained_run.py) traces its step 1 (config.log.profile_*).
  from tests import trained_run  # pylint: disable=g-import-not-at-top
  assert len(_traces(trained_run.workdir())) == 1
