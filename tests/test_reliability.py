"""Failures users meet in long runs, each through `python -m sdseg_jax.main` in a subprocess.

  SIGKILL           a run checkpointing every step is killed (no handler runs) while the async
                    save of a randomly chosen step is in flight; the previous checkpoint is
                    untouched and restores, the rerun of the same command resumes from it, and
                    at step 4 the state (params, Adam moments, EMA, step, PRNG key) and the
                    data-iterator position are bit-identical to an uninterrupted run;
  8 -> 4 devices,   the reference resumed on 4 devices, and the two-process job, against runs
  2 processes       that differ only in the order of float reductions (tolerance explained at
                    MAX_RELATIVE_MISMATCH);
  disk full         the checkpoint folder is on a tmpfs (a private mount namespace, so no root
                    is needed where user namespaces are allowed) that is filled up once the
                    first checkpoint is committed: the second save fails, the run stops with
                    one error line saying "no space left on device", naming the step that failed
                    and the complete one a rerun resumes from, and that one restores;
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
from tests.test_multiprocess_train import job  # noqa: F401  (the two-process job, shared)
from tests.test_train_loop import reference  # noqa: F401  (the uninterrupted run, shared)
from tests.test_train_loop import resharded  # noqa: F401  (8 -> 4 devices resume, shared)

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


# The killed run saves (and keeps) every step and evaluates only at the end (evaluation never
# changes the trajectory: it draws from its own key; test_train_loop checks that the cadence does
# not matter). It trains 6 steps, 2 more than the reference: its steps 1-4 must equal the
# reference's bit for bit, and its steps 5-6 are the 8-device reference continuation of
# test_train_loop's `resharded` run (steps 5-6 on 4 devices). The learning rate is constant after
# the (absent) warm-up, so max_steps changes nothing before step 4.
KILL_RUN_STEPS = 6
KILL_RUN_FLAGS = ("--config.checkpoint.every_steps=1", "--config.eval.every_steps=1000",
                  f"--config.checkpoint.keep_last={KILL_RUN_STEPS}",
                  f"--config.train.max_steps={KILL_RUN_STEPS}")


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
def killed_run(tmp_path_factory, reference) -> pathlib.Path:  # noqa: F811 (fixture)
  """workdir/../killed_logs/: kill.json (seed, chosen and killed step), kill.log, resume.log."""
  def produce(workdir: pathlib.Path) -> None:
    seed = int(os.environ.get("SDSEG_KILL_SEED", time.time_ns() % 10**6))
    # Steps 2-4: the resume must come before step 4, where the reference is compared.
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
  assert 2 <= killed <= loop.MAX_STEPS, where
  # The step in flight never became a checkpoint; its unfinished folder was left behind...
  assert record["committed"] == list(range(1, killed)), (record, where)
  assert [n.split(".")[0] for n in record["tmp"]] == [str(killed)], (record, where)
  # ...and the step before it is byte for byte what was committed before the kill.
  assert record["digest_after_kill"] == record["digest"], where
  resume_log = (killed_run.parent / "killed_logs" / "resume.log").read_text()
  assert re.search(rf"resumed from \S+ at step {killed - 1}\b", resume_log), where
  # The rerun removed the leftover and saved every later step.
  assert not _tmp_dirs(killed_run / "checkpoints"), where
  assert _committed_steps(killed_run) == list(range(1, KILL_RUN_STEPS + 1)), where


def _assert_states_equal(a, b, where: str) -> None:
  leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
  leaves_b = jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y, err_msg=f"{jax.tree_util.keystr(path)} {where}")


def test_sigkill_and_rerun_end_bit_identical_to_an_uninterrupted_run(killed_run, reference):  # noqa: F811
  """Steps 3 and 4 (the reference's checkpoints): params, Adam moments, EMA, step, PRNG key
  and data position equal. Step 4 is always trained after the resume; step 3 is the surviving
  checkpoint when the kill hit the save of step 4."""
  record = _kill_record(killed_run)
  where = f"(killed in the save of step {record['killed']}, SDSEG_KILL_SEED={record['seed']})"
  for step in (3, loop.MAX_STEPS):
    ref_state, ref_data, _ = loop.restore_checkpoint(reference, step=step)
    run_state, run_data, _ = loop.restore_checkpoint(killed_run, step=step)
    assert ref_data == run_data == {"next_index": step}, where
    _assert_states_equal(run_state, ref_state, f"step {step} {where}")
  # The losses of every step, those trained again after the resume included, are the same.
  ref_loss = {r["step"]: r["train/loss"] for r in loop.read_metrics(reference)
              if "train/loss" in r}
  run_loss = {r["step"]: r["train/loss"] for r in loop.read_metrics(killed_run)
              if "train/loss" in r and r["step"] <= loop.MAX_STEPS}
  assert run_loss == ref_loss, where


# ---- resharded resume and the two-process job, against a reference -------------------------


def _update_mismatch(a, b, start, where: str) -> dict:
  """How far run `a` is from the reference `b`, measured against b's update since `start`.

  For each float field of the state (params, EMA UNet): the relative L2 distance
  ||a - b|| / ||b - start|| and the fraction of elements further apart than 1e-6; other leaves
  (step, PRNG key) must be equal.
  """
  out = {}
  for field in ("params", "ema_unet"):
    x, y, y0 = (np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                                for leaf in jax.tree_util.tree_leaves(getattr(s, field))])
                for s in (a, b, start))
    out[field] = {"relative": float(np.linalg.norm(x - y) / np.linalg.norm(y - y0)),
                  "fraction_apart": float(np.mean(np.abs(x - y) > 1e-6)),
                  "max_apart": float(np.max(np.abs(x - y)))}
  np.testing.assert_array_equal(a.step, b.step, err_msg=where)
  np.testing.assert_array_equal(a.rng, b.rng, err_msg=where)
  return out


# Tolerances of a run whose only difference is the order of floating-point reductions (the
# gradient mean over 4 instead of 8 devices, or over two processes' devices through gloo).
# Adam makes max-abs differences meaningless: its first updates are about lr * sign(gradient),
# so an element whose gradient is at rounding level may move by +lr in one run and -lr in the
# other (up to 2 lr per step). What rounding cannot do is move many elements: so the whole
# update must agree to 1% in L2 and at most 0.5% of the elements may differ by more than 1e-6.
# Measured on 2026-12-02: 8 -> 4 devices 0.09% in L2 and 0.015% of the elements; 2 processes vs
# 1 0.05% and 0.068%. A lost step, a state restored into the wrong leaves or a data shard in the
# wrong rows moves far more (global batch rows in another order: 240% in L2, 33% of elements).
MAX_RELATIVE_MISMATCH = 1e-2
MAX_FRACTION_APART = 5e-3


def _assert_reduction_order_only(report: dict, where: str) -> None:
  for field, numbers in report.items():
    assert numbers["relative"] < MAX_RELATIVE_MISMATCH, (field, report, where)
    assert numbers["fraction_apart"] < MAX_FRACTION_APART, (field, report, where)


def test_resume_on_4_devices_matches_the_8_device_run(resharded, killed_run):  # noqa: F811
  """Steps 5-6 on 4 devices from the reference's step-4 checkpoint vs the same steps on 8."""
  start, _, _ = loop.restore_checkpoint(killed_run, step=loop.MAX_STEPS)
  state4, data4, extra4 = loop.restore_checkpoint(resharded, step=KILL_RUN_STEPS)
  state8, data8, extra8 = loop.restore_checkpoint(killed_run, step=KILL_RUN_STEPS)
  assert data4 == data8 == {"next_index": KILL_RUN_STEPS}
  assert extra4["scale_factor"] == extra8["scale_factor"]
  report = _update_mismatch(state4, state8, start, "8 -> 4 devices")
  print("8 -> 4 devices, steps 5-6:", report)
  _assert_reduction_order_only(report, "8 -> 4 devices")


@pytest.fixture(scope="module")
def single_process_twin(tmp_path_factory, job) -> pathlib.Path:  # noqa: F811 (fixture)
  """The two-process job's command run as ONE process on 8 devices, from the job's VAE.

  The job pre-trains its own VAE, and those 5 Adam steps already differ by reduction order
  (see MAX_RELATIVE_MISMATCH): starting from the same VAE isolates the training steps.
  """
  from tests import test_multiprocess_train as mp  # pylint: disable=g-import-not-at-top

  def produce(workdir: pathlib.Path) -> None:
    workdir.mkdir(parents=True)
    shutil.copy(job / "pretrained_vae.npz", workdir / "pretrained_vae.npz")
    log = workdir.parent / "single_process_twin.log"
    rc = loop._run(loop.main_command(workdir, f"--config.train.max_steps={mp.STEPS}",
                                     "--config.checkpoint.every_steps=1"),
                   loop.subprocess_env(tmp_path_factory, 8), log)
    loop._check_rc(rc, log)
  return loop.shared_run(tmp_path_factory, "single_process_twin", produce)


def test_two_process_job_matches_a_single_process_run(job, single_process_twin):  # noqa: F811
  from tests import test_multiprocess_train as mp  # pylint: disable=g-import-not-at-top
  two, _, extra2 = loop.restore_checkpoint(job, step=mp.STEPS, restore_data_state=False)
  one, _, extra1 = loop.restore_checkpoint(single_process_twin, step=mp.STEPS)
  start, _, _ = loop.restore_checkpoint(single_process_twin, step=mp.STEPS - 1)
  assert abs(extra2["scale_factor"] - extra1["scale_factor"]) <= 1e-6 * extra1["scale_factor"]
  losses = [{r["step"]: r["train/loss"] for r in loop.read_metrics(w) if "train/loss" in r}
            for w in (job, single_process_twin)]
  assert losses[0].keys() == losses[1].keys() == set(range(1, mp.STEPS + 1))
  for step in losses[1]:
    assert losses[0][step] == pytest.approx(losses[1][step], rel=1e-5), step
  report = _update_mismatch(two, one, start, "2 processes vs 1")
  print("2 processes vs 1 process, step 2 (update of step 2):", report)
  _assert_reduction_order_only(report, "2 processes vs 1")


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


def _skip_or_fail(message: str) -> None:
  """Skips on a user's machine; fails where SDSEG_REQUIRE_TMPFS=1 says the mount must work."""
  if os.environ.get("SDSEG_REQUIRE_TMPFS") == "1":
    pytest.fail(message)
  pytest.skip(message)


def _private_mount_prefix() -> List[str]:
  """A command prefix under which `mount -t tmpfs` works and is seen by that process only."""
  if shutil.which("unshare") is None:
    _skip_or_fail("the disk-full test needs util-linux `unshare` (a private mount namespace)")
  for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
    probe = subprocess.run(prefix + ["sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode == 0:
      return prefix
  _skip_or_fail("no private tmpfs mount possible here (neither root nor user namespaces): "
                f"{probe.stderr.strip()}")


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_says_so(
    tmp_path, tmp_path_factory, reference):  # noqa: F811 (fixture)
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
