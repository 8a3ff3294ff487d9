"""`python -m sdseg_jax.reproduce`: numbers equal evaluate/stability, resumable, protocols.

The end-to-end test trains the tiny config (4 steps) for one seed, then seeds two more side by
side in one job (seed lanes), interrupted and finished by a rerun of the study with three seeds:
the first seed must not be retrained (its checkpoints keep their modification times), the
report's numbers must equal what `evaluate` and `stability` give for the same checkpoints when
run on their own, and a seed trained in a lane must equal the same seed trained alone.
"""

import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
import scipy.stats

from configs import base
from configs import tiny
from sdseg_jax import config_lib
from sdseg_jax import evaluate
from sdseg_jax import reproduce
from sdseg_jax import stability
from sdseg_jax.data import btcv
from sdseg_jax.data import volumes
from sdseg_jax.repro import markdown
from sdseg_jax.repro import protocols
from sdseg_jax.repro import report as report_lib


def _run(workdir: pathlib.Path, seeds: int, seed_parallel: str = "auto") -> dict:
  return reproduce.run(tiny.get_config(), str(workdir), num_seeds=seeds, protocol_name="clean",
                       ddim_steps=[2], stability_runs=2, config_name="configs/tiny.py",
                       seed_parallel=seed_parallel)


def _mtimes(folder: pathlib.Path) -> dict:
  return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """Seed 23 alone; then seeds 24 and 25 side by side (2 lanes of 4 emulated devices), stopped
  after step 2 and finished by the study command, which must not retrain seed 23."""
  from sdseg_jax import seed_lanes  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("study")
  _run(workdir, seeds=1, seed_parallel="off")
  first = _mtimes(workdir / "seed_23" / "checkpoints")
  half = []
  for seed in (24, 25):
    config = tiny.get_config()
    config.seed, config.train.max_steps = seed, 2
    half.append(config)
  seed_lanes.run(half, [str(workdir / f"seed_{c.seed}") for c in half])
  report = _run(workdir, seeds=3)
  return workdir, report, first


def test_a_second_run_adds_seeds_without_retraining_finished_ones(study):
  workdir, report, first = study
  assert report["seeds"] == [23, 24, 25]
  assert first and _mtimes(workdir / "seed_23" / "checkpoints") == first
  for seed in (23, 24, 25):
    assert json.loads((workdir / f"seed_{seed}" / "reproduce" / "train.json").read_text())[
        "steps"] == 4
  assert (workdir / "report.md").read_text().startswith("# SDSeg reproduction: synthetic")
  assert json.loads((workdir / "report.json").read_text())["seeds"] == [23, 24, 25]


@pytest.mark.parametrize("ddim_steps", [0, 2])
def test_report_equals_evaluate_on_the_same_checkpoints(study, tmp_path, ddim_steps):
  workdir, report, _ = study
  result = report["results"][reproduce.sampler_name(ddim_steps)]
  for i, seed in enumerate((23, 24, 25)):
    out = tmp_path / f"{seed}.json"
    assert evaluate.main(["--workdir", str(workdir / f"seed_{seed}"), "--split", "test",
                          "--ddim-steps", str(ddim_steps), "--hd95", "--json", str(out)]) == 0
    alone = json.loads(out.read_text())
    assert alone["n_cases"] == 8
    for m in ("dice", "iou", "hd95", "assd"):
      scale = 100.0 if m in ("dice", "iou") else 1.0
      assert result["per_seed"][i][m]["mean"] == pytest.approx(scale * alone["mean"][m],
                                                               rel=1e-12)
  means = [row["dice"]["mean"] for row in result["per_seed"]]
  assert result["over_seeds"]["dice"]["mean"] == pytest.approx(np.mean(means))
  assert result["over_seeds"]["dice"]["std"] == pytest.approx(np.std(means, ddof=1))


def test_report_equals_stability_on_the_same_checkpoints(study, tmp_path):
  workdir, report, _ = study
  for i, seed in enumerate((23, 24, 25)):
    out = tmp_path / f"{seed}.json"
    assert stability.main(["--workdir", str(workdir / f"seed_{seed}"), "--split", "test",
                           "--runs", "2", "--json", str(out)]) == 0
    alone = json.loads(out.read_text())
    row = report["stability"]["per_seed"][i]
    assert row["ssim"] == pytest.approx(alone["instance"]["ssim"]["mean"], rel=1e-12)
    assert row["pairwise_dice"] == pytest.approx(alone["pairwise_dice"]["mean"], rel=1e-12)
    assert row["gt_dice_mean"] == pytest.approx(alone["dice_across_runs"]["mean"], rel=1e-12)


def _logged(seed_dir: pathlib.Path) -> dict:
  rows = [json.loads(line) for line in (seed_dir / "metrics.jsonl").read_text().splitlines()]
  return {(r["step"], k): v for r in rows for k, v in r.items()
          if k.startswith(("train/", "eval/")) and not k.endswith(("_per_second", "seconds"))}


def test_seeds_side_by_side_equal_a_separate_run(study, tmp_path):
  """Seed 24 trained in a lane (stopped at step 2, resumed) against the same seed alone on all
  8 devices: every logged loss, gradient norm and validation score, the scale factor and the
  final weights, up to float round-off."""
  import jax  # pylint: disable=g-import-not-at-top

  from sdseg_jax import restore  # pylint: disable=g-import-not-at-top
  from sdseg_jax import train  # pylint: disable=g-import-not-at-top
  workdir, report, _ = study
  config = tiny.get_config()
  config.seed = 24
  train.run(config, str(tmp_path / "alone"))
  record = json.loads((workdir / "seed_24" / "reproduce" / "train.json").read_text())
  assert record["seed_lanes"] == 2 and record["devices"] == 4 and record["steps"] == 4
  alone, together = _logged(tmp_path / "alone"), _logged(workdir / "seed_24")
  assert sorted(together) == sorted(alone) and len(alone) > 20
  for key, value in alone.items():
    assert together[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  a = restore.load_run(str(tmp_path / "alone"), "last")
  b = restore.load_run(str(workdir / "seed_24"), "last")
  assert a.step == b.step == 4
  assert float(b.scale_factor) == pytest.approx(float(a.scale_factor), rel=1e-6)
  diff = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(
      jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)))
  norm = sum(float(np.sum(np.asarray(x) ** 2)) for x in jax.tree_util.tree_leaves(a.params))
  assert diff ** 0.5 < 1e-4 * norm ** 0.5
  # Two seeds in one job: its wall time counts once; each seed had half the devices.
  walls = {s: json.loads((workdir / f"seed_{s}" / "reproduce" / "train.json").read_text())[
      "wall_seconds"] for s in (23, 24, 25)}
  assert walls[24] == walls[25]
  assert report["cost"]["train_wall_seconds"] == pytest.approx(walls[23] + walls[24])


def test_rerun_with_another_protocol_is_refused(tmp_path):
  reproduce.check_study(tmp_path, {"protocol": "clean", "config": "configs/tiny.py",
                                   "config_hash": "x"})
  with pytest.raises(reproduce.ReproduceError, match="study.json.*protocol='clean'"):
    reproduce.run(tiny.get_config(), str(tmp_path), num_seeds=2, protocol_name="official",
                  ddim_steps=[], stability_runs=0, config_name="configs/tiny.py")
  assert not (tmp_path / "seed_23").exists()  # refused before any training


def test_selection_on_test_only_under_the_official_protocol():
  config = tiny.get_config()
  with config.unlocked():
    config.eval.split = "test"
  with pytest.raises(config_lib.ConfigError, match="never see the test split"):
    config_lib.validate(config)
  with config.unlocked():
    protocols.apply(config, "official")
  config_lib.validate(config)
  with config.unlocked():
    config.eval.noise = "one"
  with pytest.raises(config_lib.ConfigError, match="config.eval.noise"):
    config_lib.validate(config)


# ---- statistics ----------------------------------------------------------------------------------


def test_bootstrap_interval_is_scipys_percentile_bootstrap():
  values = [0.91, 0.85, 0.78, 0.95, 0.6, 0.88, 0.93]
  got = report_lib.bootstrap_interval(values)
  expected = scipy.stats.bootstrap((np.array(values),), np.mean, n_resamples=9999,
                                   method="percentile", rng=np.random.default_rng(0))
  assert got == [pytest.approx(expected.confidence_interval.low),
                 pytest.approx(expected.confidence_interval.high)]
  assert got[0] < np.mean(values) < got[1]
  assert report_lib.bootstrap_interval([0.5]) is None
  assert report_lib.bootstrap_interval([0.5, float("nan")]) is None
  assert report_lib.bootstrap_interval([0.5, 0.5, 0.5]) == [0.5, 0.5]


def _evaluation(cases: dict) -> dict:
  dice = [v["dice"] for v in cases.values()]
  return {"mean": {"dice": float(np.nanmean(dice))}, "cases": cases}


def test_over_seed_statistics_by_hand():
  a = _evaluation({"x": {"dice": 0.2}, "y": {"dice": 0.6}, "z": {"dice": 1.0}})
  b = _evaluation({"x": {"dice": 0.4}, "y": {"dice": 0.8}, "z": {"dice": float("nan")}})
  out = report_lib.summarize_sampler([a, b])
  assert out["per_seed"][0]["dice"]["mean"] == pytest.approx(60.0)
  assert out["per_seed"][1]["dice"]["mean"] == pytest.approx(60.0)
  assert out["per_seed"][1]["dice"]["n_cases"] == 2  # NaN cases are not counted
  over = out["over_seeds"]["dice"]
  assert over["mean"] == pytest.approx(60.0) and over["std"] == pytest.approx(0.0)
  # Over cases: case means across seeds are 0.3, 0.7, 1.0 (z only in seed a).
  expected = report_lib.bootstrap_interval([0.3, 0.7, 1.0])
  assert over["ci_cases"] == [pytest.approx(100 * expected[0]), pytest.approx(100 * expected[1])]
  assert over["n_cases"] == 3 and over["n_seeds"] == 2


def test_markdown_puts_the_official_flaws_first_and_the_paper_beside_ours():
  evaluation = _evaluation({"x": {"dice": 0.9}, "y": {"dice": 0.8}})
  evaluation["mean"]["iou"] = 0.7
  for case in evaluation["cases"].values():
    case["iou"] = 0.7
  config = base.benchmark_config("refuge", "/nowhere", eval_every=10)
  with config.unlocked():
    protocol = protocols.apply(config, "official")
  seed = {"seed": 23, "workdir": "w", "evals": {"single_step": evaluation}, "stability": None,
          "export": None, "train": {"steps": 1, "wall_seconds": 3600.0, "devices": 4}}
  report = report_lib.build_report(dataset="refuge", config_name="configs/refuge.py",
                                   protocol=protocol, seeds=[seed], environment={})
  assert report["cost"]["train_device_hours"] == pytest.approx(4.0)
  text = markdown.render(report)
  lines = text.splitlines()
  assert "official" in lines[2] and "TEST split" in lines[4]
  assert "| Dice (%) | 85.00 | n/a | n/a | [80.00, 90.00] | 88.7 |" in text
  assert "| IoU (%) | 70.00 |" in text and "| 80.9 |" in text


# ---- protocols and settings ----------------------------------------------------------------------


def test_official_protocol_settings():
  refuge = base.benchmark_config("refuge", "/nowhere", eval_every=10)
  with refuge.unlocked():
    p = protocols.apply(refuge, "official")
  assert (refuge.eval.split, refuge.eval.noise) == ("test", "shared")
  assert (refuge.data.split, refuge.data.val_size) == ("sdseg", 0)
  assert any("TEST split" in f for f in p["flaws"]) and any("800" in f for f in p["flaws"])
  clean = base.benchmark_config("refuge", "/nowhere", eval_every=10)
  with clean.unlocked():
    assert protocols.apply(clean, "clean")["flaws"] == []
  assert (clean.eval.split, clean.eval.noise, clean.data.split) == ("val", "per_image",
                                                                      "challenge")
  ct = base.benchmark_config("btcv", "/nowhere", eval_every=10)
  with ct.unlocked():
    protocols.apply(ct, "official")
  assert ct.data.intensity == "official"
  with pytest.raises(ValueError, match="unknown protocol"):
    protocols.apply(tiny.get_config(), "paper")


def test_official_btcv_intensities_are_the_official_formulas(tmp_path):
  hu = np.linspace(-400.0, 600.0, 2 * 3 * 7, dtype=np.float32).reshape(2, 3, 7)
  config = base.benchmark_config("btcv", "/nowhere", eval_every=10).data
  with config.unlocked():
    config.intensity = "official"
  train_w, test_w = btcv.intensity_window(config, "train"), btcv.intensity_window(config, "val")
  for window, expected_model_input in (
      # official training slices: clip [-175, 250], (x + 125) / 400 * 2 - 1
      (train_w, (np.clip(hu, -175, 250) + 125) / 400 * 2 - 1),
      # official test volumes: clip [-125, 275], per-volume min-max -> [0, 1] -> [-1, 1]
      (test_w, None)):
    got = _read_slices(tmp_path / str(window.lo), hu, window)
    if expected_model_input is None:
      c = np.clip(hu, -125, 275)
      expected_model_input = (c - c.min()) / (c.max() - c.min()) * 2 - 1
    np.testing.assert_allclose(got * 2 - 1, np.moveaxis(expected_model_input, -1, 0),
                               atol=1e-6)
  clean = btcv.intensity_window(base.benchmark_config("btcv", "/n", eval_every=1).data, "train")
  assert clean == volumes.Window(-125.0, 275.0) and clean.map_range is None


def _read_slices(folder: pathlib.Path, hu: np.ndarray, window: volumes.Window) -> np.ndarray:
  nib = pytest.importorskip("nibabel")
  folder.mkdir()
  for name, data in (("img", hu), ("label", np.zeros(hu.shape, np.uint8))):
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / f"{name}.nii.gz"))
  case = volumes.Case("case0001", str(folder / "img.nii.gz"), str(folder / "label.nii.gz"))
  source = volumes.VolumeSliceSource([case], folder / "cache", window, np.asarray, "raw")
  return np.stack([source[i]["image"][..., 0] for i in range(len(source))])


def test_paper_precision_setting_in_every_config():
  for name in ("refuge", "cvc", "kvasir", "btcv", "sts3d"):
    c = base.benchmark_config(name, "/n", eval_every=1, variant="h100,paper")
    assert (c.model.compute_dtype, c.model.precision) == ("float32", "highest")
    assert c.train.global_batch_size == 32  # the hardware variant still applies
    assert base.benchmark_config(name, "/n", eval_every=1, variant="h100").model.compute_dtype \
        == "bfloat16"
  from configs import demo  # pylint: disable=g-import-not-at-top
  assert demo.get_config("paper").model.precision == "highest"
  assert tiny.get_config("paper").model.compute_dtype == "float32"
  with pytest.raises(ValueError, match="unknown config setting 'fp16'"):
    base.benchmark_config("kvasir", "/n", eval_every=1, variant="h100,fp16")
  with pytest.raises(ValueError, match="unknown config variant"):
    base.benchmark_config("kvasir", "/n", eval_every=1, variant="paper2")
  paper = base.benchmark_config("refuge", "/n", eval_every=1, variant=",paper")
  assert "highest" in protocols.precision(paper)


def test_cli_rejects_unknown_flags_and_bad_steps(capsys):
  with pytest.raises(SystemExit):
    reproduce.main(["--config", "configs/tiny.py", "--workdir", "/tmp/x", "--bogus"])
  assert "unrecognized arguments: --bogus" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    reproduce.main(["--config", "configs/tiny.py", "--workdir", "/tmp/x", "--ddim-steps", "0"])
  assert "must be > 0" in capsys.readouterr().err


def test_training_lengths_follow_the_official_checkpoints():
  from configs import btcv as btcv_config  # pylint: disable=g-import-not-at-top
  from configs import kvasir  # pylint: disable=g-import-not-at-top
  from configs import sts3d  # pylint: disable=g-import-not-at-top
  assert sts3d.get_config().train.max_steps == 125_000  # epoch=199-step=124999.ckpt
  assert btcv_config.get_config().train.max_steps == 70_000  # epoch=126-step=69999.ckpt
  assert kvasir.get_config().train.max_steps == 100_000
  assert sts3d.get_config("runlocal").train.max_steps == 10  # variants still set their own


def test_shared_noise_is_one_draw_for_every_image(study):
  """`--noise shared` (the official protocol): the run's single z_T for every image, so the
  scores do not depend on the batch size, and equal a direct model.predict with that z_T."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from sdseg_jax import inference  # pylint: disable=g-import-not-at-top
  from sdseg_jax import metrics  # pylint: disable=g-import-not-at-top
  from sdseg_jax import restore  # pylint: disable=g-import-not-at-top
  workdir, _, _ = study
  run = restore.load_run(str(workdir / "seed_23"), "best")
  by_8 = evaluate.evaluate(run, "test", noise="shared", batch_size=8, seed=5)
  by_16 = evaluate.evaluate(run, "test", noise="shared", batch_size=16, seed=5)
  assert by_8["cases"] == by_16["cases"]
  assert "shared by every image" in by_8["sampler"]["noise"]
  per_image = evaluate.evaluate(run, "test", batch_size=8, seed=5)
  assert per_image["cases"] != by_8["cases"]
  batch = next(iter(evaluate.make_loader(run, "test", 8)))
  z_T = jnp.broadcast_to(inference.run_noise(run.model, 5), (8,) + inference.run_noise(
      run.model, 5).shape[1:])
  prob = jax.jit(run.model.predict)(run.params, run.vae_params, jnp.asarray(batch["image"]),
                                    z_T, run.scale_factor)["prob"]
  for row, case in enumerate(batch["case"]):
    if batch["valid"][row]:
      expected = metrics.dice(np.asarray(prob[row]) > 0.5, batch["label"][row])
      assert by_8["cases"][str(case)]["dice"] == pytest.approx(expected, abs=1e-6)


def test_exports_are_bf16_listed_with_their_hash_and_agree_with_float32(study):
  """Each seed's export is bfloat16 (half the bytes), its SHA-256 is in the report, and its
  masks agree with the float32 weights of the same step on >= 99.5% of pixels."""
  import hashlib  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from sdseg_jax import inference  # pylint: disable=g-import-not-at-top
  from sdseg_jax import restore  # pylint: disable=g-import-not-at-top
  workdir, report, _ = study
  for run_record in report["runs"]:
    record = run_record["export"]
    assert record["dtype"] == "bfloat16"
    path = pathlib.Path(record["path"])
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["bytes"] == path.stat().st_size
  seed_dir = str(workdir / "seed_23")
  f32, bf16 = restore.load_run(seed_dir, "last"), restore.load_run(seed_dir, "export")
  batch = next(iter(evaluate.make_loader(f32, "test", 8)))
  z_T = jax.numpy.broadcast_to(inference.run_noise(f32.model, 0), (8, *inference.run_noise(
      f32.model, 0).shape[1:]))
  masks = [np.asarray(jax.jit(r.model.predict)(r.params, r.vae_params, batch["image"], z_T,
                                               r.scale_factor)["mask"]) for r in (f32, bf16)]
  assert np.mean(masks[0] == masks[1]) >= 0.995
  for a, b in zip(jax.tree_util.tree_leaves(f32.params["unet"]),
                  jax.tree_util.tree_leaves(bf16.params["unet"])):
    np.testing.assert_array_equal(
        np.asarray(b), np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_bf16_export_halves_the_file_and_round_trips(tmp_path):
  from sdseg_jax import export  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  unet = {"conv": {"kernel": rng.normal(size=(64, 64, 3, 3)).astype(np.float32)}}
  encoder = {"proj": {"bias": rng.normal(size=(64,)).astype(np.float32)}}
  for dtype in ("float32", "bfloat16"):
    export.export_inference(tmp_path / f"{dtype}.npz", unet_params=unet,
                            vision_encoder_params=encoder, scale_factor=0.2,
                            model_config_json="{}", vae_reference="none", dtype=dtype)
  sizes = {d: (tmp_path / f"{d}.npz").stat().st_size for d in ("float32", "bfloat16")}
  assert sizes["bfloat16"] < 0.52 * sizes["float32"]
  back = export.load_inference(tmp_path / "bfloat16.npz")
  assert back["weights_dtype"] == "bfloat16"
  kernel = back["unet_params"]["conv"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
      kernel, unet["conv"]["kernel"].astype(ml_dtypes.bfloat16).astype(np.float32))
  assert export.load_inference(tmp_path / "float32.npz")["weights_dtype"] == "float32"
  with pytest.raises(ValueError, match="export dtype"):
    export.export_inference(tmp_path / "x.npz", unet_params=unet, vision_encoder_params=encoder,
                            scale_factor=0.2, model_config_json="{}", vae_reference="none",
                            dtype="float16")
