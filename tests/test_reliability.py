"""Failures users meet in long runs, each through `python -m sdseg_jax.main` in a subprocess.

  corrupt image     a dataset with an undecodable image stops in the pre-training check, before
                    step 0 and before the VAE pre-training, naming the file;
  corrupt mid-run   an image truncated after the check (the loader reads files lazily, every
                    epoch) stops the run with the file named, exit 2, and the last checkpoint
                    complete and restorable;

The runs use configs/tiny.py's model (tests/configs/tiny_folder.py for a folder dataset) and the
helpers of tests/test_train_loop.py (emulated CPU devices, a shared compilation cache).
"""

import pathlib
import signal
import subprocess
import sys
import time
from typing import List

import jax
import numpy as np
from PIL import Image
import pytest

from tests import test_train_loop as loop

FOLDER_CONFIG = "tests/configs/tiny_folder.py"


def _write_folder_dataset(root: pathlib.Path, count: int = 24) -> pathlib.Path:
  """A Kvasir-SEG layout of `count` 40 x 40 PNG pairs (random images, rectangle masks)."""
  rng = np.random.default_rng(0)
  for sub in ("images", "masks"):
    (root / sub).mkdir(parents=True)
  for i in range(count):
    mask = np.zeros((40, 40), np.uint8)
    mask[8 + i % 8:30, 4 + i % 12:28] = 255
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(
        root / "images" / f"case{i:02d}.png")
    Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
  return root


def _folder_command(workdir: pathlib.Path, root: pathlib.Path, *overrides: str) -> List[str]:
  return [sys.executable, "-m", "sdseg_jax.main", "--config", FOLDER_CONFIG, "--workdir",
          str(workdir), f"--config.data.root={root}", *overrides]


def _error_lines(text: str) -> List[str]:
  return [line for line in text.splitlines() if line.startswith("error: ")]


def _committed_steps(workdir: pathlib.Path) -> List[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() \
      else []


# ---- corrupt data ----------------------------------------------------------------------------


def test_corrupt_image_stops_the_run_before_step_0_naming_the_file(tmp_path, tmp_path_factory):
  root = _write_folder_dataset(tmp_path / "Kvasir-SEG")
  bad = root / "images" / "case05.png"
  bad.write_bytes(bad.read_bytes()[:8])  # the PNG signature only: no readable header
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  rc = loop._run(_folder_command(workdir, root), loop.subprocess_env(tmp_path_factory, 8), log)
  text = log.read_text()
  loop._check_rc(rc, log, expected=2)
  error = _error_lines(text)
  assert len(error) == 1 and "Traceback" not in text, text[-3000:]
  assert "failed the integrity check" in error[0] and str(bad) in text, text[-3000:]
  # Stopped by the check itself: before the VAE pre-training (which reads the same files) and
  # before anything was trained or saved.
  assert "pre-training the VAE" not in text
  assert not (workdir / "pretrained_vae.npz").exists()
  assert not loop.train_steps(loop.read_metrics(workdir))
  assert not (workdir / "checkpoints").exists()


def test_image_truncated_mid_run_stops_naming_it_and_keeps_the_last_checkpoint(
    tmp_path, tmp_path_factory):
  root = _write_folder_dataset(tmp_path / "Kvasir-SEG")
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  env = loop.subprocess_env(tmp_path_factory, 8)
  with open(log, "w") as out:
    proc = subprocess.Popen(_folder_command(workdir, root), stdout=out, stderr=subprocess.STDOUT,
                            env=env, cwd=loop.REPO_ROOT)
    try:
      deadline = time.monotonic() + loop.RUN_TIMEOUT
      while not loop.train_steps(loop.read_metrics(workdir)):
        assert proc.poll() is None, f"exited ({proc.returncode}) before a step:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no train step logged before the timeout"
        time.sleep(0.02)
      # Paused while the file is cut, so the truncation lands while the run is in step 1-2.
      proc.send_signal(signal.SIGSTOP)
      train_names = (workdir / "splits" / "train.txt").read_text().split()
      bad = root / "images" / f"{train_names[0]}.png"
      bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])  # header intact, pixels cut
      truncated_after = loop.train_steps(loop.read_metrics(workdir))[-1]
      proc.send_signal(signal.SIGCONT)
      rc = proc.wait(timeout=loop.RUN_TIMEOUT)
    finally:
      if proc.poll() is None:
        proc.kill()
  text = log.read_text()
  loop._check_rc(rc, log, expected=2)
  error = _error_lines(text)
  assert len(error) == 1 and "Traceback" not in text, text[-3000:]
  assert str(bad) in error[0] and "truncated" in error[0], error[0]
  # 16 training images, batch 8: the file is read again within the next epoch (2 steps).
  steps = loop.train_steps(loop.read_metrics(workdir))
  assert steps == list(range(1, steps[-1] + 1)) and steps[-1] <= truncated_after + 3, steps
  # Every finished step was checkpointed, the newest one completely (nothing left in flight).
  assert _committed_steps(workdir)[-1] == steps[-1]
  assert not [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  state, data_state, _ = loop.restore_checkpoint(workdir)
  assert int(state.step) == steps[-1] and data_state == {"next_index": steps[-1]}
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))
