"""Tests for sdseg_jax.plots: the PNG is written, is a real image, and bad lines are tolerated."""

import json
import math

import numpy as np
from PIL import Image
import pytest

from sdseg_jax import plots


def _write_log(path, n=40, truncated_tail=True):
  lines = []
  for step in range(0, n * 50, 50):
    record = {"step": step, "train/loss": 1.0 / (1 + step / 100),
              "train/loss_noise": 0.5 / (1 + step), "train/loss_latent": 0.3 / (1 + step / 10)}
    if step % 500 == 0:
      record.update({"eval/dice": 0.5 + step / 10000, "eval/iou": 0.4 + step / 10000})
    lines.append(json.dumps(record))
  lines.insert(3, json.dumps({"step": 125, "train/lr": 1e-5}))  # partial record
  text = "\n".join(lines) + "\n"
  if truncated_tail:
    text += '{"step": 9999, "train/lo'
  path.write_text(text)


def test_reader_tolerates_truncated_last_line(tmp_path):
  log = tmp_path / "metrics.jsonl"
  _write_log(log)
  records = plots.read_metrics_jsonl(log)
  assert len(records) == 41 and records[-1]["step"] == 1950
  steps, values = plots._series(records, "eval/dice")
  assert steps == [0.0, 500.0, 1000.0, 1500.0]
  assert all(math.isfinite(v) for v in values)


def test_reader_warns_on_bad_middle_line(tmp_path):
  log = tmp_path / "metrics.jsonl"
  log.write_text('{"step": 1, "train/loss": 2}\n{oops\n{"step": 2, "train/loss": NaN}\n')
  with pytest.warns(UserWarning, match="line 2"):
    records = plots.read_metrics_jsonl(log)
  assert [r["step"] for r in records] == [1, 2]
  assert plots._series(records, "train/loss") == ([1.0], [2.0])  # NaN dropped


def test_plot_writes_nontrivial_png(tmp_path):
  log = tmp_path / "metrics.jsonl"
  _write_log(log)
  out = plots.plot_training_curves(log, tmp_path / "figs" / "curves.png")
  assert out.is_file() and out.stat().st_size > 10_000
  with Image.open(out) as image:
    assert image.format == "PNG" and image.size == (1200, 450)
    pixels = np.asarray(image.convert("L"))
  assert pixels.std() > 5  # not a blank canvas


def test_cli_writes_curves_png(tmp_path, capsys):
  _write_log(tmp_path / "metrics.jsonl", truncated_tail=False)
  assert plots.main(["--workdir", str(tmp_path)]) == 0
  assert (tmp_path / "curves.png").stat().st_size > 10_000
  assert plots.main(["--workdir", str(tmp_path / "missing")]) == 1
  assert "metrics.jsonl" in capsys.readouterr().err


def test_plot_with_no_eval_data(tmp_path):
  log = tmp_path / "metrics.jsonl"
  log.write_text('{"step": 0, "train/loss": 1.0}\n{"step": 10, "train/loss": 0.5}\n')
  out = plots.plot_training_curves(log, tmp_path / "c.png")
  assert out.stat().st_size > 5_000
