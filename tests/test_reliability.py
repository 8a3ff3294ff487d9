"""Failures users meet in long runs, each through `python -m sdseg_jax.main` in a subprocess.

  SIGKILL           a run checkpointing every step is killed (no handler runs) while the async
                    save of a randomly chosen step is in flight; the previous checkpoint is
                    untouched and restores, the rerun of the same command resumes from it, and
                    at the final step the state (params, Adam moments, EMA, step, PRNG key) and
                    the data-iterator position are bit-identical to an uninterrupted run;
  disk full         the checkpoint folder is on a tmpfs (a private mount namespace, so no root
                    is needed where user namespaces are allowed) that is filled up once the
                    first checkpoint is committed: the second save fails, the run stops with one error line saying "no space
                    left on device", naming the step that failed and the complete one a rerun
                    resumes from, and that one restores;
  corrupt image     a dataset with an undecodable image stops in the pre-training check, before
                    step 0 and before the VAE pre-training, naming the file;
  corrupt mid-run   an image truncated after the check (the loader reads files lazily, every
                    epoch) stops the run with the file named, exit 2, and the last checkpoint
                    complete and restorable;

The runs use configs/tiny.py's model (tests/configs/tiny_folder.py for a folder dataset) and the
helpers of tests/test_train_loop.py (emulated CPU devices, a shared compilation cache).
"""

import hashlib
import json
import os
import pathlib
import random
import re
import shutil
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
from tests.test_train_loop import reference  # noqa: F401  (the uninterrupted run, shared)

FOLDER_CONFIG = "tests/configs/tiny_folder.py"


def _tree_digest(folder: pathlib.Path) -> str:
  """sha256 over every file (relative name and bytes) under `folder`."""
  digest = hashlib.sha256()
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()


def _tmp_dirs(checkpoints: pathlib.Path) -> List[str]:
  """orbax's unfinished step folders, `<step>.orbax-checkpoint-tmp-<n>`."""
  return sorted(p.name for p in checkpoints.iterdir() if ".orbax-checkpoint-tmp" in p.name) \
      if checkpoints.is_dir() else []


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


# ---- SIGKILL ---------------------------------------------------------------------------------


# The killed run saves every step and evaluates only at the end (evaluation never changes the
# trajectory: it draws from its own key; test_train_loop checks that the cadence does not matter).
KILL_RUN_FLAGS = ("--config.checkpoint.every_steps=1", "--config.eval.every_steps=1000")


def _kill_during_save(proc: subprocess.Popen, checkpoints: pathlib.Path, first: int
                      ) -> tuple:
  """SIGKILLs `proc` while orbax writes step `first` (or a later one, if that save committed
  before the poll saw it); returns (killed step, digest of the step before, as committed)."""
  deadline = time.monotonic() + loop.RUN_TIMEOUT
  step = first
  while True:
    assert proc.poll() is None, f"the run exited ({proc.returncode}) before the kill"
    assert time.monotonic() < deadline, "no checkpoint save seen before the timeout"
    if any(name.startswith(f"{step}.orbax-checkpoint-tmp") for name in _tmp_dirs(checkpoints)):
      proc.send_signal(signal.SIGSTOP)  # frozen: nothing moves while the state is looked at
      if any(n.startswith(f"{step}.") for n in _tmp_dirs(checkpoints)):
        digest = _tree_digest(checkpoints / str(step - 1))
        proc.kill()
        proc.wait(timeout=60)
        return step, digest
      proc.send_signal(signal.SIGCONT)  # committed in between: take the next save
    if (checkpoints / str(step)).is_dir():
      step += 1
      assert step <= loop.MAX_STEPS, "every save committed before the poll saw one in flight"
    time.sleep(0.002)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, reference) -> pathlib.Path:
  """workdir/../killed_logs/: kill.json (seed, chosen and killed step), kill.log, resume.log."""
  def produce(workdir: pathlib.Path) -> None:
    seed = int(os.environ.get("SDSEG_KILL_SEED", time.time_ns() % 10**6))
    chosen = random.Random(seed).choice(range(2, loop.MAX_STEPS + 1))
    print(f"SIGKILL during the save of step {chosen} (SDSEG_KILL_SEED={seed})")
    logs = workdir.parent / "killed_logs"
    logs.mkdir(exist_ok=True)
    workdir.mkdir(parents=True)
    # The reference's pre-trained VAE (the same 5 seeded steps would give the same weights).
    shutil.copy(reference / "pretrained_vae.npz", workdir / "pretrained_vae.npz")
    env = loop.subprocess_env(tmp_path_factory, 8)
    checkpoints = workdir / "checkpoints"
    with open(logs / "kill.log", "w") as out:
      proc = subprocess.Popen(loop.main_command(workdir, *KILL_RUN_FLAGS), stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=loop.REPO_ROOT)
      try:
        killed, digest = _kill_during_save(proc, checkpoints, chosen)
      finally:
        if proc.poll() is None:
          proc.kill()
    after_kill = {"seed": seed, "chosen": chosen, "killed": killed, "digest": digest,
                  "committed": _committed_steps(workdir), "tmp": _tmp_dirs(checkpoints),
                  "digest_after_kill": _tree_digest(checkpoints / str(killed - 1))}
    (logs / "kill.json").write_text(json.dumps(after_kill))
    rc = loop._run(loop.main_command(workdir, *KILL_RUN_FLAGS), env, logs / "resume.log")
    loop._check_rc(rc, logs / "resume.log")
  return loop.shared_run(tmp_path_factory, "killed", produce)


def _kill_record(workdir: pathlib.Path) -> dict:
  return json.loads((workdir.parent / "killed_logs" / "kill.json").read_text())


def test_sigkill_during_an_async_save_leaves_the_previous_checkpoint_intact(killed_run):
  record = _kill_record(killed_run)
  killed, seed = record["killed"], record["seed"]
  where = f"(killed in the save of step {killed}, SDSEG_KILL_SEED={seed})"
  # The step in flight never became a checkpoint; its unfinished folder was left behind...
  assert record["committed"] == list(range(1, killed)), (record, where)
  assert [n.split(".")[0] for n in record["tmp"]] == [str(killed)], (record, where)
  # ...and the step before it is byte for byte what was committed before the kill.
  assert record["digest_after_kill"] == record["digest"], where
  resume_log = (killed_run.parent / "killed_logs" / "resume.log").read_text()
  assert re.search(rf"resumed from \S+ at step {killed - 1}\b", resume_log), where
  # The rerun removed the leftover and saved every later step.
  assert not _tmp_dirs(killed_run / "checkpoints"), where
  assert _committed_steps(killed_run)[-1] == loop.MAX_STEPS


def test_sigkill_and_rerun_end_bit_identical_to_an_uninterrupted_run(killed_run, reference):
  record = _kill_record(killed_run)
  where = f"(killed in the save of step {record['killed']}, SDSEG_KILL_SEED={record['seed']})"
  ref_state, ref_data, _ = loop.restore_checkpoint(reference, step=loop.MAX_STEPS)
  run_state, run_data, _ = loop.restore_checkpoint(killed_run, step=loop.MAX_STEPS)
  assert ref_data == run_data == {"next_index": loop.MAX_STEPS}, where
  ref_leaves = jax.tree_util.tree_leaves(ref_state)
  run_leaves = jax.tree_util.tree_flatten_with_path(run_state)[0]
  assert len(ref_leaves) == len(run_leaves)
  for (path, a), b in zip(run_leaves, ref_leaves):
    np.testing.assert_array_equal(a, b, err_msg=f"{jax.tree_util.keystr(path)} {where}")
  # The losses of the steps trained after the resume are the reference's too.
  ref_loss = {r["step"]: r["train/loss"] for r in loop.read_metrics(reference)
              if "train/loss" in r}
  run_loss = {r["step"]: r["train/loss"] for r in loop.read_metrics(killed_run)
              if "train/loss" in r}
  assert run_loss == ref_loss, where
  # When the surviving checkpoint is one the reference also saved (step 3), it is equal too.
  if record["killed"] - 1 == 3:
    before, _, _ = loop.restore_checkpoint(reference, step=3)
    for a, b in zip(jax.tree_util.tree_leaves(before),
                    jax.tree_util.tree_leaves(loop.restore_checkpoint(killed_run, step=3)[0])):
      np.testing.assert_array_equal(a, b, err_msg=where)


# ---- disk full -------------------------------------------------------------------------------


# Run inside a private mount namespace: a tmpfs holds the run's checkpoint folder (a symlink
# points there); once step 1 is committed, a filler file takes all the space that is left, so
# the save of step 2 meets a full disk. What the tmpfs held is copied out before it vanishes.
_TMPFS_SCRIPT = """
set -u
mount -t tmpfs -o size=256m tmpfs "$SDSEG_TMPFS" || exit 97
mkdir "$SDSEG_TMPFS/checkpoints"
( while [ ! -d "$SDSEG_TMPFS/checkpoints/1" ]; do sleep 0.005; done
  dd if=/dev/zero of="$SDSEG_TMPFS/filler" bs=64k 2> /dev/null ) &
"$@"
rc=$?
cp -a "$SDSEG_TMPFS/checkpoints/." "$SDSEG_TMPFS_COPY/"
exit $rc
"""


def _private_mount_prefix() -> List[str]:
  """A command prefix under which `mount -t tmpfs` works and is seen by that process only."""
  if shutil.which("unshare") is None:
    pytest.skip("the disk-full test needs util-linux `unshare` (a private mount namespace)")
  for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
    probe = subprocess.run(prefix + ["sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode == 0:
      return prefix
  pytest.skip("no private tmpfs mount possible here (neither root nor user namespaces): "
              f"{probe.stderr.strip()}")


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_says_so(
    tmp_path, tmp_path_factory, reference):
  prefix = _private_mount_prefix()
  workdir, copy, log = tmp_path / "run", tmp_path / "copy" / "checkpoints", tmp_path / "run.log"
  tmpfs = tmp_path / "tmpfs"
  for folder in (workdir, copy, tmpfs):
    folder.mkdir(parents=True)
  (workdir / "checkpoints").symlink_to(tmpfs / "checkpoints")
  shutil.copy(reference / "pretrained_vae.npz", workdir / "pretrained_vae.npz")
  env = dict(loop.subprocess_env(tmp_path_factory, 8), SDSEG_TMPFS=str(tmpfs),
             SDSEG_TMPFS_COPY=str(copy))
  rc = loop._run(prefix + ["sh", "-c", _TMPFS_SCRIPT, "tmpfs"]
                 + loop.main_command(workdir, *KILL_RUN_FLAGS), env, log)
  text = log.read_text()
  loop._check_rc(rc, log, expected=2)
  error = _error_lines(text)
  assert len(error) == 1, text[-3000:]
  checkpoints = workdir / "checkpoints"
  assert f"{checkpoints}/2: saving checkpoint step 2 failed: no space left on device" in error[0]
  assert f"newest complete checkpoint is {checkpoints}/1 (step 1)" in error[0], error[0]
  # An async write's error surfaces at the next save call: the run stops in step 2 or 3.
  assert loop.train_steps(loop.read_metrics(workdir))[-1] in (2, 3)
  # What the full disk held: step 1 complete, step 2 only as orbax's unfinished folder.
  assert _committed_steps(copy.parent) == [1]
  state, data_state, _ = loop.restore_checkpoint(copy.parent)
  assert int(state.step) == 1 and data_state == {"next_index": 1}
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))
