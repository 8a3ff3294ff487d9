"""A gs:// workdir end to end, against a real GCS JSON-API server (fake-gcs-server, 127.0.0.1).

Runs (each once per pytest session, shared by the xdist workers through the server's shared
filesystem root, see tests/gcs_server.py):
  gcs_run   `python -m sdseg_jax.main --config configs/tiny.py --workdir gs://test-bucket/run`
            with test_train_loop's SIGTERM cadence: stopped with SIGTERM after its first logged
            step, then rerun with the same command, which resumes from the bucket. It keeps one
            checkpoint (keep_last=1, keep_best off), so the stop step's checkpoint must be
            garbage-collected on the bucket, and it writes TensorBoard events too. The processes
            run in an empty folder, which must stay empty: nothing may land in a local `gs:`
            folder.
The final state and export are downloaded and compared bit for bit with test_train_loop's
uninterrupted local `reference` run; evaluate and predict then read the run from the bucket,
and a TFDS ArrayRecord build in the bucket feeds a short training run. Bad storage input fails
before any training, naming the path.
"""

import json
import pathlib
import subprocess
import sys
from typing import Any, Dict, List, Sequence

import jax
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from sdseg_jax import export
from sdseg_jax.data import tfds_build
from sdseg_jax.weights import artifacts
from tests import gcs_server as gcs_lib
from tests import test_data_tfds
from tests import test_train_loop as loop
from tests.test_train_loop import reference  # noqa: F401  pylint: disable=unused-import

BUCKET = gcs_lib.BUCKET
RUN = f"gs://{BUCKET}/run"
RUN_FLAGS = loop.SIGTERM_RUN_FLAGS + ("--config.checkpoint.keep_last=1",
                                      "--config.checkpoint.keep_best=false",
                                      "--config.log.tensorboard=true")
MAX_STEPS = loop.MAX_STEPS
BAD_INPUT_TIMEOUT = 120


def _key(url: str) -> str:
  """gcsfs object key of a gs:// URL."""
  return url[len("gs://"):]


def _env(tmp_path_factory, server: gcs_lib.GcsServer, devices: int = 8) -> Dict[str, str]:
  env = loop.subprocess_env(tmp_path_factory, devices)
  env.update(server.env)
  return env


def _main(workdir: str, *flags: str) -> List[str]:
  # An absolute config path: the processes run in an empty folder, not the repository.
  return [sys.executable, "-m", "sdseg_jax.main", "--config",
          str(loop.REPO_ROOT / "configs" / "tiny.py"), "--workdir", workdir, *flags]


def _bucket_metrics(fs, workdir: str) -> List[Dict[str, Any]]:
  try:
    text = fs.cat_file(f"{_key(workdir)}/metrics.jsonl").decode()
  except FileNotFoundError:
    return []
  records = []
  for line in text.splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return records


def _checkpoint_steps(fs, workdir: str) -> List[int]:
  fs.invalidate_cache()
  try:
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{_key(workdir)}/checkpoints",
                                                             detail=False)]
  except FileNotFoundError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def _listing(fs, workdir: str) -> List[str]:
  fs.invalidate_cache()
  prefix = _key(workdir) + "/"
  return sorted(p[len(prefix):] for p in fs.find(prefix))


def _download(fs, workdir: str, dest: pathlib.Path) -> None:
  for name in _listing(fs, workdir):
    target = dest / name
    target.parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(f"{_key(workdir)}/{name}", str(target))


def _run(cmd: Sequence[str], env: Dict[str, str], cwd: pathlib.Path, log: pathlib.Path,
         timeout: float = loop.RUN_TIMEOUT) -> int:
  with open(log, "w") as out:
    return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                          timeout=timeout, check=False).returncode


@pytest.fixture(scope="module")
def gcs_run(tmp_path_factory, gcs_server) -> pathlib.Path:
  """Local folder of the bucket run: logs, cwd/ (must stay empty), download/ (the final run)."""
  def produce(local: pathlib.Path) -> None:
    local.mkdir(parents=True)
    cwd = local / "cwd"
    cwd.mkdir()
    fs = gcs_server.filesystem()
    if fs.exists(_key(RUN)):  # a failed earlier attempt
      fs.rm(_key(RUN), recursive=True)
    env = _env(tmp_path_factory, gcs_server)
    with open(local / "stop.log", "w") as out:
      proc = subprocess.Popen(_main(RUN, *RUN_FLAGS), stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=cwd)
      try:
        loop.stop_after_first_logged_step(proc, lambda: _bucket_metrics(fs, RUN))
        rc = proc.wait(timeout=loop.RUN_TIMEOUT)
      finally:
        if proc.poll() is None:
          proc.kill()
    loop._check_rc(rc, local / "stop.log")  # pylint: disable=protected-access
    (local / "stopped_metrics.json").write_text(json.dumps(_bucket_metrics(fs, RUN)))
    (local / "checkpoints_after_stop.json").write_text(json.dumps(_checkpoint_steps(fs, RUN)))
    rc = _run(_main(RUN, *RUN_FLAGS), env, cwd, local / "resume.log")
    loop._check_rc(rc, local / "resume.log")  # pylint: disable=protected-access
    (local / "listing.json").write_text(json.dumps(_listing(fs, RUN)))
    _download(fs, RUN, local / "download")
  return loop.shared_run(tmp_path_factory, "gcs_run", produce)


# ---- training into the bucket -------------------------------------------------------------------


def test_run_writes_to_the_bucket_and_nothing_locally(gcs_run):
  assert list((gcs_run / "cwd").iterdir()) == []  # no `gs:` folder, nothing at all
  assert not (loop.REPO_ROOT / "gs:").exists()
  listing = json.loads((gcs_run / "listing.json").read_text())
  for name in ("config.json", "metrics.jsonl", "pretrained_vae.npz", "curves.png",
               "export/inference.npz", "panels/step_0000002.png", "panels/step_0000004.png",
               f"checkpoints/{MAX_STEPS}/commit_success.txt"):
    assert name in listing, (name, listing)
  assert any(n.startswith("tensorboard/events.out.tfevents.") for n in listing), listing
  assert not [n for n in listing if ".sdseg_write_probe" in n or n.endswith(".tmp")], listing
  config = json.loads((gcs_run / "download" / "config.json").read_text())
  assert config["train"]["max_steps"] == MAX_STEPS


def test_sigterm_saves_to_the_bucket_and_old_checkpoints_are_collected(gcs_run):
  stopped = loop.train_steps(json.loads((gcs_run / "stopped_metrics.json").read_text()))
  assert stopped and stopped[-1] < MAX_STEPS
  assert "signal 15 received" in (gcs_run / "stop.log").read_text()
  # The stop forced a save of its step into the bucket; keep_last=1 then removed it there.
  assert json.loads((gcs_run / "checkpoints_after_stop.json").read_text()) == [stopped[-1]]
  listing = json.loads((gcs_run / "listing.json").read_text())
  steps = sorted({int(n.split("/")[1]) for n in listing
                  if n.startswith("checkpoints/") and n.split("/")[1].isdigit()})
  assert steps == [MAX_STEPS]
  resume = (gcs_run / "resume.log").read_text()
  assert f"resumed from {RUN}/checkpoints at step {stopped[-1]}" in resume, resume[-3000:]
  assert "pre-training the VAE" not in resume  # the VAE saved in the bucket is reused


def test_bucket_run_matches_an_uninterrupted_local_run(reference, gcs_run):  # noqa: F811
  """Bit for bit: losses, final state (params, EMA, Adam moments) and export."""
  local = gcs_run / "download"
  ref_loss = {r["step"]: r["train/loss"] for r in loop.read_metrics(reference)
              if "train/loss" in r}
  run_loss = {r["step"]: r["train/loss"] for r in loop.read_metrics(local) if "train/loss" in r}
  assert run_loss == ref_loss
  ref_state, _, _ = loop.restore_checkpoint(reference, step=MAX_STEPS)
  run_state, run_data, _ = loop.restore_checkpoint(local, step=MAX_STEPS)
  assert run_data == {"next_index": MAX_STEPS}
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(run_state)[0],
                          jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  ref_export = export.load_inference(reference / "export" / "inference.npz")
  run_export = export.load_inference(local / "export" / "inference.npz")
  assert run_export["scale_factor"] == ref_export["scale_factor"]
  assert run_export["vae_reference"] == f"{RUN}/pretrained_vae.npz"
  assert run_export["vae_sha256"]  # hashed through the bucket
  for key in ("unet_params", "vision_encoder_params"):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(run_export[key])[0],
                            jax.tree_util.tree_leaves(ref_export[key])):
      np.testing.assert_array_equal(a, b, err_msg=f"{key}{jax.tree_util.keystr(path)}")


# ---- reading the run from the bucket ------------------------------------------------------------


def test_evaluate_and_predict_read_the_run_from_the_bucket(gcs_run, gcs_server, tmp_path,
                                                           tmp_path_factory):
  fs = gcs_server.filesystem()
  env = _env(tmp_path_factory, gcs_server)
  log = tmp_path / "evaluate.log"
  rc = _run([sys.executable, "-m", "sdseg_jax.evaluate", "--workdir", RUN, "--checkpoint",
             "last", "--split", "test"], env, tmp_path, log)
  loop._check_rc(rc, log)  # pylint: disable=protected-access
  written = [n for n in _listing(fs, RUN) if n.startswith("eval/") and n.endswith(".json")]
  assert len(written) == 1, written
  result = json.loads(fs.cat_file(f"{_key(RUN)}/{written[0]}"))
  assert result["checkpoint"]["step"] == MAX_STEPS, result["checkpoint"]
  assert result["checkpoint"]["source"] == f"{RUN}/checkpoints/{MAX_STEPS}"
  assert 0.0 <= result["mean"]["dice"] <= 1.0, result["mean"]

  inputs = tmp_path / "inputs"
  inputs.mkdir()
  rng = np.random.default_rng(0)
  for name, shape in (("a", (40, 48, 3)), ("b", (32, 32, 3))):
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(inputs / f"{name}.png")
  out = f"gs://{BUCKET}/predictions"
  log = tmp_path / "predict.log"
  rc = _run([sys.executable, "-m", "sdseg_jax.predict", "--workdir", RUN, "--checkpoint",
             "export", "--input", str(inputs), "--output", out, "--no-progress"],
            env, tmp_path, log)
  loop._check_rc(rc, log)  # pylint: disable=protected-access
  listing = _listing(fs, out)
  for name in ("predictions.json", "masks/a.png", "masks/b.png", "probabilities/a.png",
               "overlays/b.png"):
    assert name in listing, listing
  manifest = json.loads(fs.cat_file(f"{_key(out)}/predictions.json"))
  assert manifest["workdir"] == RUN and manifest["checkpoint"] == "export"
  with fs.open(f"{_key(out)}/masks/a.png", "rb") as f:
    assert Image.open(f).size == (48, 40)  # the input's own size
  assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluate.log", "inputs", "predict.log"]


def test_stability_plots_and_convert_write_to_the_bucket(gcs_run, gcs_server, official_fixtures,
                                                       tmp_path, tmp_path_factory):
  fs = gcs_server.filesystem()
  env = _env(tmp_path_factory, gcs_server)
  out = f"gs://{BUCKET}/outputs"
  log = tmp_path / "stability.log"
  rc = _run([sys.executable, "-m", "sdseg_jax.stability", "--workdir", RUN, "--checkpoint",
             "last", "--split", "test", "--runs", "2", "--json", f"{out}/stability.json",
             "--uncertainty-dir", f"{out}/uncertainty"], env, tmp_path, log)
  loop._check_rc(rc, log)  # pylint: disable=protected-access
  summary = json.loads(fs.cat_file(f"{_key(out)}/stability.json"))
  assert summary["images"], summary.keys()
  uncertainty = [n for n in _listing(fs, out) if n.startswith("uncertainty/")]
  assert len(uncertainty) == len(summary["images"]), uncertainty

  log = tmp_path / "plots.log"
  rc = _run([sys.executable, "-m", "sdseg_jax.plots", "--workdir", RUN, "--out",
             f"{out}/curves.png"], env, tmp_path, log)
  loop._check_rc(rc, log)  # pylint: disable=protected-access
  assert fs.cat_file(f"{_key(out)}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"

  env["SDSEG_OFFICIAL_FIXTURES"] = str(official_fixtures)
  log = tmp_path / "convert.log"
  rc = _run([sys.executable, "-m", "sdseg_jax.convert", "--config",
             str(loop.REPO_ROOT / "tests" / "configs" / "official_tiny.py"), "--kind",
             "autoencoder", "--checkpoint", str(official_fixtures / "tiny_klf8_autoencoder.ckpt"),
             "--out", f"{out}/klf8.npz"], env, tmp_path, log)
  loop._check_rc(rc, log)  # pylint: disable=protected-access
  local = tmp_path / "klf8.npz"
  fs.invalidate_cache()  # gcsfs lists `outputs/` from its cache otherwise
  fs.get_file(f"{_key(out)}/klf8.npz", str(local))
  tree, meta = artifacts.load(local)
  assert meta["kind"] == "autoencoder" and "vae" in tree
  assert not [p for p in tmp_path.iterdir() if p.name.startswith("gs:")]


# ---- bad input ----------------------------------------------------------------------------------


def _without_credentials(env: Dict[str, str], home: pathlib.Path) -> Dict[str, str]:
  """No emulator, no key file, no gcloud login, not on GCE: what a fresh laptop has."""
  env = {k: v for k, v in env.items()
         if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                   "GOOGLE_AUTH_TOKEN_FOR_TESTING", "FSSPEC_GCS_TOKEN",
                   "GOOGLE_APPLICATION_CREDENTIALS")}
  env.update(HOME=str(home), CLOUDSDK_CONFIG=str(home / "gcloud"), NO_GCE_CHECK="True")
  return env


@pytest.mark.parametrize("case, workdir, flags, message", [
    ("missing bucket", "gs://no-such-bucket-sdseg/run", (),
     "bucket gs://no-such-bucket-sdseg does not exist"),
    ("typo", "gs:/test-bucket/typo", (), "did you mean 'gs://test-bucket/typo'"),
    ("no credentials", "gs://test-bucket/nocreds", (), "no Google Cloud credentials found"),
    ("folder data in a bucket", "gs://test-bucket/folder_data",
     ("--config.data.name=kvasir", "--config.data.root=gs://test-bucket/Kvasir-SEG"),
     "gcloud storage cp -r gs://test-bucket/Kvasir-SEG"),
])
def test_bad_storage_input_fails_before_training(case, workdir, flags, message, gcs_server,
                                                 tmp_path, tmp_path_factory):
  env = _env(tmp_path_factory, gcs_server)
  if case == "no credentials":
    env = _without_credentials(env, tmp_path / "home")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  result = subprocess.run(_main(workdir, *flags), capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=BAD_INPUT_TIMEOUT, check=False)
  assert result.returncode == 2, (case, result.returncode, result.stderr[-3000:])
  error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert error, result.stderr[-3000:]
  assert message in error[-1], error[-1]
  named = workdir if case != "folder data in a bucket" else "gs://test-bucket/Kvasir-SEG"
  assert named in error[-1], error[-1]
  assert "compiled" not in result.stderr and "pre-training" not in result.stderr
  assert list(cwd.iterdir()) == []  # no local fallback, no `gs:` folder
  fs = gcs_server.filesystem()
  if case != "missing bucket":
    assert _listing(fs, workdir.replace("gs:/test", "gs://test")) == []  # nothing written


# ---- an ArrayRecord build in the bucket ---------------------------------------------------------


def test_tfds_build_in_the_bucket_feeds_training(gcs_server, shared_data, tmp_path,
                                                 tmp_path_factory):
  """A 6-image Kvasir-SEG ArrayRecord build, copied into the bucket, trains a tiny run."""
  root = test_data_tfds.kvasir_links(shared_data, tmp_path)
  fields = {"name": "kvasir", "split": "sdseg", "val_size": 1, "test_size": 2}
  data = tiny.get_config().data.copy_and_resolve_references()
  for k, v in fields.items():
    data[k] = v
  data.root = str(root)
  data.tfds_data_dir = str(tmp_path / "tfds")
  tfds_build.build(data, tmp_path / "build_splits")
  fs = gcs_server.filesystem()
  remote = f"gs://{BUCKET}/tfds"
  if fs.exists(_key(remote)):
    fs.rm(_key(remote), recursive=True)
  for p in sorted((tmp_path / "tfds").rglob("*")):  # what `gcloud storage cp -r` does
    if p.is_file():
      fs.put_file(str(p), f"{_key(remote)}/{p.relative_to(tmp_path / 'tfds').as_posix()}")
  workdir = f"gs://{BUCKET}/tfds_run"
  if fs.exists(_key(workdir)):
    fs.rm(_key(workdir), recursive=True)
  env = _env(tmp_path_factory, gcs_server)
  cache = tmp_path / "tfds_cache"  # where each host stages the build
  flags = [f"--config.data.{k}={v}" for k, v in fields.items()] + [
      "--config.data.format=tfds", f"--config.data.tfds_data_dir={remote}",
      f"--config.data.tfds_cache_dir={cache}",
      "--config.data.root=/nonexistent/not-read-with-tfds", "--config.train.max_steps=1"]
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  log = tmp_path / "tfds_run.log"
  rc = _run(_main(workdir, *flags), env, cwd, log)
  loop._check_rc(rc, log)  # pylint: disable=protected-access
  listing = _listing(fs, workdir)
  assert "checkpoints/1/commit_success.txt" in listing and "export/inference.npz" in listing
  # The run's split files (seeded from the build) are in the bucket workdir.
  built = (tmp_path / "build_splits" / "train.txt").read_text()
  assert fs.cat_file(f"{_key(workdir)}/splits/train.txt").decode() == built
  staged = list((cache / BUCKET / "tfds").rglob("*.array_record*"))
  assert staged, "the build was not staged to local disk"
  assert list(cwd.iterdir()) == []
