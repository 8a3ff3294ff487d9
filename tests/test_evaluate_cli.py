"""`python -m sdseg_jax.evaluate` and `sdseg_jax.restore` on a tiny trained run."""

import json
import math
import os
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sdseg_jax import config_lib
from sdseg_jax import evaluate
from sdseg_jax import metrics
from sdseg_jax import restore
from sdseg_jax import sharding as sharding_lib
from sdseg_jax.evaluators import common as evaluators_common
from sdseg_jax.evaluators import dice as evaluator_lib
from tests import trained_run

REPO = trained_run.pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir():
  return trained_run.workdir()


def _training_eval(workdir, step):
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if record.get("step") == step and "eval/dice" in record:
      return record
  raise AssertionError(f"no eval at step {step}")


def test_single_step_and_ddim_json(workdir, capsys):
  rc = evaluate.main(["--workdir", str(workdir), "--split", "val", "--checkpoint", "last",
                      "--ddim-steps", "0,2", "--hd95"])
  assert rc == 0
  out = capsys.readouterr().out
  assert "mean (8 cases)" in out and "DDIM 2 steps" in out

  single = json.loads((workdir / "eval" / "val_last.json").read_text())
  ddim = json.loads((workdir / "eval" / "val_last_ddim2.json").read_text())
  for result in (single, ddim):
    assert {"workdir", "split", "checkpoint", "dataset", "sampler", "convention", "dimension",
            "case_unit", "n_cases", "mean", "std", "count", "cases", "seconds",
            "distance_units"} <= set(result)
    assert result["split"] == "val" and result["n_cases"] == 8
    assert result["checkpoint"] == {"requested": "last", "step": 4,
                                    "source": str(workdir / "checkpoints" / "4")}
    assert result["dimension"] == "2d" and result["case_unit"] == "image"
    assert result["convention"] == "official"
    assert set(result["mean"]) == {"dice", "iou", "hd95", "assd"}
    for case in result["cases"].values():
      assert set(case) == {"dice", "iou", "hd95", "assd"}
      assert 0.0 <= case["dice"] <= 1.0 and 0.0 <= case["iou"] <= 1.0
      assert case["hd95"] is None or case["hd95"] >= 0.0
    dice = [c["dice"] for c in result["cases"].values()]
    assert math.isclose(result["mean"]["dice"], float(np.mean(dice)), abs_tol=1e-12)
  assert single["sampler"]["kind"] == "single_step" and single["sampler"]["steps"] == 1
  assert ddim["sampler"] == {**ddim["sampler"], "kind": "ddim", "steps": 2, "eta": 1.0}
  # The offline evaluation reproduces the in-training one (same weights, noise, batches), and
  # the comparison can see wrong weights: the cases differ from one another and the step-2
  # evaluation differs from the step-4 one by far more than the tolerance.
  assert single["mean"]["dice"] == pytest.approx(_training_eval(workdir, 4)["eval/dice"],
                                                 abs=1e-6)
  assert single["std"]["dice"] > 1e-3
  assert abs(_training_eval(workdir, 2)["eval/dice"] - single["mean"]["dice"]) > 1e-4


def test_export_equals_last_checkpoint(workdir, tmp_path):
  out = tmp_path / "export.json"
  assert evaluate.main(["--workdir", str(workdir), "--split", "val", "--checkpoint", "export",
                        "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["checkpoint"]["requested"] == "export"
  assert result["checkpoint"]["step"] is None
  # The bundle holds the final EMA UNet and live encoder, i.e. the last checkpoint's weights:
  # case by case equal to step 4, and not to step 2 (so a stale export would fail).
  assert result["mean"]["dice"] == pytest.approx(_training_eval(workdir, 4)["eval/dice"],
                                                 abs=1e-6)
  assert abs(_training_eval(workdir, 2)["eval/dice"] - result["mean"]["dice"]) > 1e-4
  last = tmp_path / "last.json"
  assert evaluate.main(["--workdir", str(workdir), "--split", "val", "--checkpoint", "last",
                        "--json", str(last)]) == 0
  by_case = json.loads(last.read_text())["cases"]
  assert set(by_case) == set(result["cases"])
  for name, case in result["cases"].items():
    assert case["dice"] == pytest.approx(by_case[name]["dice"], abs=1e-6), name


def test_checkpoint_selection(workdir):
  best = restore.load_run(workdir, "best")
  assert best.step in (2, 4) and best.checkpoint == "best"
  step2 = restore.load_run(workdir, 2)
  assert step2.step == 2 and step2.checkpoint == "2"
  last = restore.load_run(workdir, "latest")
  assert last.step == 4
  assert float(last.scale_factor) > 0
  # Inference uses the EMA UNet, not the raw one: read both from the checkpoint on disk with
  # orbax directly (independent of restore.py); the run's EMA decay makes them differ.
  stored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "state")
  flat = lambda tree: {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}
  restored, ema, raw = (flat(last.params["unet"]), flat(stored["ema_unet"]),
                        flat(stored["params"]["unet"]))
  assert restored.keys() == ema.keys() == raw.keys()
  for key in restored:
    np.testing.assert_array_equal(restored[key], ema[key], err_msg=str(key))
  assert any(not np.array_equal(ema[k], raw[k]) for k in restored)
  for key, value in flat(last.params["vision_encoder"]).items():  # the live encoder
    np.testing.assert_array_equal(value, flat(stored["params"]["vision_encoder"])[key])
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(step2.params["unet"]), jax.tree_util.tree_leaves(
          last.params["unet"])))


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "99"], "step 99 not found"),
    (["--checkpoint", "sometimes"], "--checkpoint must be"),
    (["--ddim-steps", "-1"], "--ddim-steps must be >= 0"),
])
def test_clear_errors(workdir, capsys, args, message):
  assert evaluate.main(["--workdir", str(workdir), "--split", "val"] + args) == 2
  assert message in capsys.readouterr().err


def test_missing_workdir_and_config(tmp_path, capsys):
  assert evaluate.main(["--workdir", str(tmp_path / "nope")]) == 2
  assert "no such run directory" in capsys.readouterr().err
  assert evaluate.main(["--workdir", str(tmp_path)]) == 2
  assert "config.json not found" in capsys.readouterr().err
  config_lib.dump(trained_run.tiny_config(), tmp_path)
  assert evaluate.main(["--workdir", str(tmp_path), "--checkpoint", "export"]) == 2
  assert "no inference export" in capsys.readouterr().err
  assert evaluate.main(["--workdir", str(tmp_path)]) == 2
  assert "no checkpoints directory" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-m", "sdseg_jax.evaluate", "--workdir",
                         str(tmp_path / "missing")], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=120)
  assert proc.returncode == 2
  assert "no such run directory" in proc.stderr


class _VolumeLoader:
  """Eval batches of one 3D case whose slices arrive out of order, plus a 2D case.

  The prediction of a slice is encoded in the image (channel 0 > 0), so the stub step below
  makes the evaluator's stacking and per-volume scoring checkable without a model.
  """

  def __init__(self, pred, gt, order):
    self.pred, self.gt, self.order = pred, gt, order

  def __iter__(self):
    z, h, w = self.pred.shape
    rows = [("vol", int(k), self.pred[k], self.gt[k]) for k in self.order]
    rows.append(("img", -1, self.pred[4], self.gt[3]))
    rows += [rows[0][:1] + (0,) + rows[0][2:]] * (-len(rows) % 8)  # padding rows
    valid = [True] * (len(self.order) + 1) + [False] * (len(rows) - len(self.order) - 1)
    for start in range(0, len(rows), 8):
      chunk = rows[start:start + 8]
      image = np.stack([np.where(p, 1.0, -1.0) for _, _, p, _ in chunk])
      yield {"image": np.repeat(image[..., None], 3, -1).astype(np.float32),
             "label": np.stack([g for _, _, _, g in chunk]).astype(np.uint8),
             "case": np.array([c for c, _, _, _ in chunk]),
             "name": np.array([f"{c}_{k}" for c, k, _, _ in chunk]),
             "slice": np.array([k for _, k, _, _ in chunk], np.int32),
             "valid": np.array(valid[start:start + 8])}


def _stub_counts(params, vae_params, image, label, scale_factor, noise_key, **kwargs):
  del params, vae_params, scale_factor, noise_key, kwargs
  prob = (image[..., 0] > 0).astype(jnp.float32)
  return evaluators_common.binary_counts(prob > 0.5, label), prob


def test_evaluator_stacks_volume_slices_in_order(monkeypatch):
  rng = np.random.default_rng(0)
  z, size = 11, 16
  gt = np.zeros((z, size, size), bool)
  gt[2:9, 4:12, 3:10] = True
  pred = np.roll(gt, 1, axis=0) | (rng.random(gt.shape) > 0.97)
  monkeypatch.setattr(evaluator_lib, "_predict_counts", _stub_counts)
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  loader = _VolumeLoader(pred, gt, rng.permutation(z))
  result = evaluator_lib.Evaluator(None, mesh, loader, distances=True).run(
      {}, {}, jnp.float32(1))
  assert result["dimension"] == "3d" and result["num_cases"] == 2
  want = metrics.case_metrics(pred, gt)
  for name in ("dice", "iou", "hd95", "assd"):
    assert result["cases"]["vol"][name] == pytest.approx(want[name], abs=1e-9)
  assert result["cases"]["img"]["hd95"] == pytest.approx(metrics.hd95(pred[4], gt[3]))
  assert result["hd95"] == pytest.approx(
      np.mean([result["cases"][c]["hd95"] for c in ("vol", "img")]))
