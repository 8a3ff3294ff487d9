"""End-to-end training runs of `python -m sdseg_jax.main --config configs/tiny.py` as subprocesses.

Each run is a real process on emulated CPU devices (XLA_FLAGS device count 8, or 4 for the
resharding resume), exactly as a user starts it, so these tests cover the CLI, config locking,
data, VAE pre-training, the compiled step, evaluation, checkpoint/resume, SIGTERM and export.

Runs (each done once per pytest session, see `shared_run`):
  reference  4 uninterrupted steps on 8 devices, evaluating and checkpointing every 3 steps
             (so at 3 and at the final step 4);
  sigterm    the same 4 steps evaluating every 2 steps and checkpointing only at the end, stopped
             with SIGTERM right after the first logged step, then the same command again, which
             resumes from the checkpoint that the stop forced;
  resharded  a copy of the reference workdir continued to step 6 on 4 devices.
Comparing `sigterm` with `reference` checks that a stop/resume and the eval/checkpoint cadence
leave the training trajectory bit for bit unchanged: the per-step key is fold_in(key, step), the
data iterator position is checkpointed, and evaluation draws from its own fixed key.

Compile time dominates a run this small, so subprocesses run with JAX_DISABLE_MOST_OPTIMIZATIONS
and share one persistent compilation cache (SDSEG_COMPILATION_CACHE, or a session temp dir).
"""

import contextlib
import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from sdseg_jax import checkpoint as checkpoint_lib
from sdseg_jax import distributed
from sdseg_jax import export
from sdseg_jax import optim
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import state as state_lib
from sdseg_jax.models import sdseg

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 600
MAX_STEPS = tiny.get_config().train.max_steps  # 4
# The stop lands on step 1 or 2, never on a checkpoint step: the save at the stop is forced.
SIGTERM_RUN_FLAGS = ("--config.eval.every_steps=2",
                     f"--config.checkpoint.every_steps={MAX_STEPS}")


# ---- helpers shared with test_multiprocess_train.py -------------------------------------------


def session_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """A directory shared by every xdist worker of this pytest session (or the basetemp)."""
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "sdseg_train_runs"
  root.mkdir(parents=True, exist_ok=True)
  return root


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def shared_run(tmp_path_factory: pytest.TempPathFactory, name: str,
               produce: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """Runs `produce(workdir)` once per session, whichever xdist worker asks first.

  pytest -n auto distributes single tests, so a module-scoped fixture would start the same
  expensive training run in every worker that got one of its tests. A file lock in the
  session-wide temp dir makes the others wait for, then reuse, the first worker's workdir.
  """
  root = session_dir(tmp_path_factory)
  workdir, done = root / name, root / f"{name}.done"
  with _file_lock(root / f"{name}.lock"):
    if not done.exists():
      if workdir.exists():  # a failed attempt of another worker: start afresh
        shutil.rmtree(workdir)
      produce(workdir)
      done.touch()
  return workdir


def subprocess_env(tmp_path_factory: pytest.TempPathFactory, devices: Optional[int],
                   single_process: bool = True) -> Dict[str, str]:
  """Environment of a training subprocess: CPU, `devices` emulated devices, fast compiles."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SDSEG_COORDINATOR", "SDSEG_NUM_PROCESSES", "SDSEG_PROCESS_ID"))}
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  if not env["XLA_FLAGS"]:
    del env["XLA_FLAGS"]
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  env.setdefault("SDSEG_COMPILATION_CACHE", str(session_dir(tmp_path_factory) / "xla_cache"))
  if single_process:
    env["SDSEG_DISTRIBUTED"] = "off"
  else:
    env.pop("SDSEG_DISTRIBUTED", None)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")]
                                                           if p])
  return env


def main_command(workdir: pathlib.Path, *overrides: str) -> List[str]:
  return [sys.executable, "-m", "sdseg_jax.main", "--config", "configs/tiny.py",
          "--workdir", str(workdir), *overrides]


def read_metrics(workdir: pathlib.Path) -> List[Dict[str, Any]]:
  """metrics.jsonl records; a line being written (no newline yet) is skipped."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return records


def train_steps(records: Sequence[Dict[str, Any]]) -> List[int]:
  return [r["step"] for r in records if "train/loss" in r]


def tiny_abstract_state(mesh: jax.sharding.Mesh) -> Any:
  """Abstract train state of configs/tiny.py with dp shardings on `mesh` (nothing compiled)."""
  config = tiny.get_config()
  model = sdseg.build(config.model)
  tx = optim.make_optimizer(config)
  abstract_params, _ = jax.eval_shape(model.init, jax.random.key(0))
  abstract = jax.eval_shape(
      lambda p: state_lib.create(p, tx, jax.random.key(0), jnp.float32(1)), abstract_params)
  shardings = sharding_lib.param_shardings(abstract, mesh, config.mesh.strategy)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def restore_checkpoint(workdir: pathlib.Path, step: Optional[int] = None,
                       restore_data_state: bool = True) -> Any:
  """(state on host, data state, extra) of a run's checkpoint, restored onto 8 test devices."""
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  with checkpoint_lib.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
    state, data_state, extra = ckpt.restore(tiny_abstract_state(mesh), step=step,
                                            restore_data_state=restore_data_state)
  return jax.device_get(state), data_state, extra


def _run(cmd: Sequence[str], env: Dict[str, str], log: pathlib.Path) -> int:
  with open(log, "w") as out:
    return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                          timeout=RUN_TIMEOUT, check=False).returncode


def _check_rc(rc: int, log: pathlib.Path, expected: int = 0) -> None:
  if rc != expected:
    tail = "\n".join(log.read_text().splitlines()[-40:])
    raise AssertionError(f"{log.name}: exit code {rc} (expected {expected}); log tail:\n{tail}")


# ---- the shared runs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
  def produce(workdir: pathlib.Path) -> None:
    workdir.mkdir(parents=True)
    log = workdir.parent / "reference.log"
    rc = _run(main_command(workdir, "--config.eval.every_steps=3",
                           "--config.checkpoint.every_steps=3"),
              subprocess_env(tmp_path_factory, 8), log)
    _check_rc(rc, log)
  return shared_run(tmp_path_factory, "reference", produce)


def stop_after_first_logged_step(proc: subprocess.Popen,
                                 metrics: Callable[[], List[Dict[str, Any]]]) -> None:
  """SIGTERM as soon as `metrics()` (the run's metrics.jsonl records) shows a train step.

  The process is paused (SIGSTOP) the moment the step appears, so the signal reliably lands
  before the last step however loaded the machine is; it is delivered on SIGCONT. Shared with
  the gs:// workdir tests, which read the records from the bucket.
  """
  deadline = time.monotonic() + RUN_TIMEOUT
  while not train_steps(metrics()):
    if proc.poll() is not None:
      raise AssertionError(f"the run exited ({proc.returncode}) before logging a step")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError("no train step logged before the timeout")
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGSTOP)
  os.kill(proc.pid, signal.SIGTERM)
  os.kill(proc.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory) -> pathlib.Path:
  """workdir/stop.log: the SIGTERMed run; workdir/resume.log: the same command rerun."""
  def produce(workdir: pathlib.Path) -> None:
    workdir.mkdir(parents=True)
    env = subprocess_env(tmp_path_factory, 8)
    logs = workdir.parent / "sigterm"
    logs.mkdir(exist_ok=True)
    with open(logs / "stop.log", "w") as out:
      proc = subprocess.Popen(main_command(workdir, *SIGTERM_RUN_FLAGS), stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
      try:
        stop_after_first_logged_step(proc, lambda: read_metrics(workdir))
        rc = proc.wait(timeout=RUN_TIMEOUT)
      finally:
        if proc.poll() is None:
          proc.kill()
    _check_rc(rc, logs / "stop.log")
    stopped_at = train_steps(read_metrics(workdir))
    (logs / "stopped_metrics.json").write_text(json.dumps(read_metrics(workdir)))
    (logs / "checkpoints_after_stop.json").write_text(json.dumps(
        sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())))
    assert stopped_at and stopped_at[-1] < MAX_STEPS, f"not stopped mid-way: {stopped_at}"
    rc = _run(main_command(workdir, *SIGTERM_RUN_FLAGS), env, logs / "resume.log")
    _check_rc(rc, logs / "resume.log")
  workdir = shared_run(tmp_path_factory, "sigterm", produce)
  return workdir


def _sigterm_logs(workdir: pathlib.Path) -> pathlib.Path:
  return workdir.parent / "sigterm"


# ---- SIGTERM, resume, exactness ----------------------------------------------------------------


def test_sigterm_saves_a_complete_checkpoint_and_exits_cleanly(sigterm_run):
  logs = _sigterm_logs(sigterm_run)
  stopped = json.loads((logs / "stopped_metrics.json").read_text())
  stop_step = train_steps(stopped)[-1]
  assert 1 <= stop_step < MAX_STEPS
  assert "signal 15 received" in (logs / "stop.log").read_text()
  # The stop step was checkpointed although it is off the checkpoint cadence (a forced save).
  saved = json.loads((logs / "checkpoints_after_stop.json").read_text())
  assert saved == [stop_step], (saved, stop_step)
  state, data_state, extra = restore_checkpoint(sigterm_run, step=stop_step)
  assert int(state.step) == stop_step
  assert data_state == {"next_index": stop_step}, data_state  # batches consumed so far
  assert extra["scale_factor"] > 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))


def test_rerun_resumes_and_continues_the_metrics(sigterm_run):
  logs = _sigterm_logs(sigterm_run)
  stop_step = train_steps(json.loads((logs / "stopped_metrics.json").read_text()))[-1]
  resume_log = (logs / "resume.log").read_text()
  assert re.search(rf"resumed from \S+ at step {stop_step}\b", resume_log), resume_log[-2000:]
  assert "pre-training the VAE" not in resume_log  # the saved pretrained VAE is reused
  records = read_metrics(sigterm_run)
  assert train_steps(records) == list(range(1, MAX_STEPS + 1))
  assert [r["step"] for r in records if "eval/dice" in r] == [2, 4]
  assert (sigterm_run / "export" / "inference.npz").is_file()


def test_stop_and_resume_match_an_uninterrupted_run(reference, sigterm_run):
  """Bit for bit: same losses, same final state (params, EMA, Adam moments), same export."""
  ref_loss = {r["step"]: r["train/loss"] for r in read_metrics(reference) if "train/loss" in r}
  run_loss = {r["step"]: r["train/loss"] for r in read_metrics(sigterm_run) if "train/loss" in r}
  assert run_loss == ref_loss
  ref_state, ref_data, _ = restore_checkpoint(reference, step=MAX_STEPS)
  run_state, run_data, _ = restore_checkpoint(sigterm_run, step=MAX_STEPS)
  assert ref_data == run_data == {"next_index": MAX_STEPS}
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(run_state)[0],
                          jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  ref_export = export.load_inference(reference / "export" / "inference.npz")
  run_export = export.load_inference(sigterm_run / "export" / "inference.npz")
  assert run_export["scale_factor"] == ref_export["scale_factor"]
  for key in ("unet_params", "vision_encoder_params"):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(run_export[key])[0],
                            jax.tree_util.tree_leaves(ref_export[key])):
      np.testing.assert_array_equal(a, b, err_msg=f"{key}{jax.tree_util.keystr(path)}")


# ---- evaluation outputs -----------------------------------------------------------------------


def test_eval_metrics_and_panels_are_written(reference):
  records = read_metrics(reference)
  evals = [r for r in records if "eval/dice" in r]
  assert [r["step"] for r in evals] == [3, 4]
  for r in evals:
    assert 0.0 <= r["eval/dice"] <= 1.0 and 0.0 <= r["eval/iou"] <= r["eval/dice"] + 1e-9
  config = tiny.get_config()
  size = config.data.image_size
  for step in (3, 4):
    with Image.open(reference / "panels" / f"step_{step:07d}.png") as panel:
      # num_panels strips of image | truth | prediction | probability.
      assert panel.size == (4 * size, config.eval.num_panels * size)
  assert (reference / "curves.png").is_file()
  assert json.loads((reference / "config.json").read_text())["train"]["max_steps"] == MAX_STEPS
  assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir()
                if p.name.isdigit()) == [3, 4]


# ---- resume on another device count --------------------------------------------------------


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, reference) -> pathlib.Path:
  """The reference run's workdir (8 devices, step 4) continued to step 6 on 4 devices."""
  def produce(workdir: pathlib.Path) -> None:
    shutil.copytree(reference, workdir)
    log = workdir.parent / "resharded.log"
    # Four devices from the config (config.mesh.cpu_devices), not from XLA_FLAGS.
    rc = _run(main_command(workdir, f"--config.train.max_steps={MAX_STEPS + 2}",
                           "--config.mesh.cpu_devices=4"),
              subprocess_env(tmp_path_factory, None), log)
    _check_rc(rc, log)
  return shared_run(tmp_path_factory, "resharded", produce)


def test_checkpoint_from_8_devices_resumes_on_4(resharded):
  log = (resharded.parent / "resharded.log").read_text()
  assert "mesh {'data': 4, 'fsdp': 1} over 4 devices" in log
  assert re.search(rf"resumed from \S+ at step {MAX_STEPS}\b", log)
  records = read_metrics(resharded)
  assert train_steps(records) == list(range(1, MAX_STEPS + 3))
  assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
  state, data_state, _ = restore_checkpoint(resharded)
  assert int(state.step) == MAX_STEPS + 2
  assert data_state == {"next_index": MAX_STEPS + 2}


@pytest.mark.parametrize("requested, batch, cores, expected", [
    (0, 16, 2, 0),   # JAX's default
    (3, 16, 2, 3),   # an explicit count is taken as given
    (-1, 16, 2, 2),  # one per core
    (-1, 16, 6, 4),  # rounded down to a divisor of the batch
    (-1, 7, 4, 1),
])
def test_cpu_device_count(requested, batch, cores, expected):
  assert distributed.cpu_device_count(requested, batch, available_cores=cores) == expected


# ---- config errors ----------------------------------------------------------------------------


def test_config_typo_fails_naming_the_key(tmp_path, tmp_path_factory):
  workdir = tmp_path / "typo"
  result = subprocess.run(main_command(workdir, "--config.train.max_stepz=3"),
                          capture_output=True, text=True, env=subprocess_env(tmp_path_factory, 8),
                          cwd=REPO_ROOT, timeout=120, check=False)
  assert result.returncode != 0
  assert "max_stepz" in result.stderr
  assert not workdir.exists()  # nothing started


# ---- divergence ------------------------------------------------------------------------------


def test_non_finite_loss_stops_without_saving_and_names_the_last_good_checkpoint(
    tmp_path, tmp_path_factory):
  """A warm-up from 1e-6 to 1e30 keeps step 1 sane and blows the weights up at step 2.

  Step 2 is a checkpoint step but not a logging step: the guard before the save must stop the
  run there, with a one-line error naming the step, the loss terms and checkpoint 1.
  """
  workdir = tmp_path / "diverged"
  log = tmp_path / "diverged.log"
  rc = _run(main_command(workdir, "--config.optim.base_lr=1e30", "--config.optim.warmup_steps=2",
                         "--config.optim.warmup_start_factor=1e-36",
                         "--config.checkpoint.every_steps=1", "--config.log.every_steps=100",
                         "--config.eval.every_steps=100"),
            subprocess_env(tmp_path_factory, 8), log)
  text = log.read_text()
  _check_rc(rc, log, expected=2)
  error = [line for line in text.splitlines() if line.startswith("error: ")]
  assert len(error) == 1 and "Traceback" not in text, text[-3000:]
  assert "non-finite metrics at step 2" in error[0] and "loss=" in error[0], error[0]
  assert f"{workdir / 'checkpoints'}/1 (step 1)" in error[0], error[0]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [1]
  state, _, _ = restore_checkpoint(workdir)
  assert int(state.step) == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))
