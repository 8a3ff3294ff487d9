"""The command lines report the project's own errors in one line and let bugs show a traceback.

`sdseg_jax.errors.UserFacingError` is the one class the CLIs catch; a RuntimeError (or a bare
ValueError) raised from deep inside is a bug, and hiding its traceback behind `error: ...` would
make it undiagnosable. Both paths are driven through the real entry points with an internal
function replaced.
"""

import os
import subprocess
import sys

from PIL import Image
import pytest

from sdseg_jax import aot
from sdseg_jax import checkpoint
from sdseg_jax import config_lib
from sdseg_jax import errors
from sdseg_jax import evaluate_folder
from sdseg_jax import logging_lib
from sdseg_jax import mask_io
from sdseg_jax import plots
from sdseg_jax import predict
from sdseg_jax import restore
from sdseg_jax import storage
from sdseg_jax.data import base
from sdseg_jax.weights import artifacts
from sdseg_jax.weights import convert
from sdseg_jax.weights import torch_pickle
from tests.conftest import REPO_ROOT

# `python -m sdseg_jax.main` with train.run replaced by one that raises the given exception.
_MAIN_WITH_FAILING_RUN = """
import sys
from absl import app
from sdseg_jax import errors, main, train

def run(config, workdir):
  raise {exception}

train.run = run
sys.argv = ["sdseg_jax.main", "--config", "configs/tiny.py", "--workdir", sys.argv[1]]
app.run(main.main)
"""


def _main_failing_with(exception: str, workdir) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", SDSEG_DISTRIBUTED="off",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-c", _MAIN_WITH_FAILING_RUN.format(exception=exception),
                         str(workdir)], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                        timeout=120, check=False)


def test_main_reports_a_user_error_in_one_line(tmp_path):
  result = _main_failing_with('errors.ConfigError("config.train.lr must be positive")',
                              tmp_path / "run")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert lines == ["error: config.train.lr must be positive"], result.stderr[-3000:]


def test_main_shows_the_traceback_of_a_bug(tmp_path):
  # A bare ValueError from inside is a bug too (main once caught every ValueError).
  result = _main_failing_with('ValueError("internal bug")', tmp_path / "run")
  assert result.returncode not in (0, 2), result.stderr[-3000:]
  assert "Traceback (most recent call last)" in result.stderr
  assert "ValueError: internal bug" in result.stderr
  assert not any(line.startswith("error: ") for line in result.stderr.splitlines())


def test_argparse_clis_catch_only_user_facing_errors(tmp_path, monkeypatch, capsys):
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.new("RGB", (8, 8)).save(inputs / "a.png")
  args = ["--workdir", str(tmp_path), "--input", str(inputs), "--output", str(tmp_path / "o")]

  def fail_with(exception):
    def load_run(*unused_args, **unused_kwargs):
      raise exception
    monkeypatch.setattr(restore, "load_run", load_run)

  fail_with(restore.RestoreError("no checkpoints here"))
  assert predict.main(args) == 2
  assert capsys.readouterr().err.strip() == "error: no checkpoints here"
  fail_with(RuntimeError("internal bug"))
  with pytest.raises(RuntimeError, match="internal bug"):
    predict.main(args)

  def check_bucket(path, write):
    raise storage.StorageError(f"{path}: bucket missing")
  monkeypatch.setattr(storage, "check_bucket", check_bucket)
  assert plots.main(["--workdir", str(tmp_path)]) == 1
  assert capsys.readouterr().err.startswith("error: ")


def test_every_error_class_of_the_package_is_user_facing():
  # The classes whose messages the CLIs print; each still is the built-in it refines.
  classes = [aot.AotError, checkpoint.CheckpointError, config_lib.ConfigError, base.DataError,
             evaluate_folder.EvaluationError, mask_io.MaskReadError, predict.PredictError,
             restore.RestoreError, storage.StorageError, artifacts.ArtifactError,
             convert.ConversionError, torch_pickle.CheckpointFormatError,
             logging_lib.TrainingDiverged, errors.MissingFileError]
  for cls in classes:
    assert issubclass(cls, errors.UserFacingError), cls
  assert issubclass(errors.MissingFileError, FileNotFoundError)
  assert issubclass(logging_lib.TrainingDiverged, FloatingPointError)
