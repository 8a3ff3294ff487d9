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
