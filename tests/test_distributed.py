"""Tests for sdseg_jax.distributed: launch detection, and a real two-process CPU job.

The detection tests never call jax.distributed.initialize (the test process already has its
backend); the two-process test runs in fresh subprocesses, exactly as launch/multinode.sh does.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

from sdseg_jax import distributed

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]",
              "SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}


def _plan(env, has_tpu_chip=False):
  return distributed.plan_launch(env, has_tpu_chip=has_tpu_chip)


def test_default_is_single_process():
  plan = _plan({})
  assert plan.mode == "single" and not plan.init_kwargs


@pytest.mark.parametrize("given", [
    ("SDSEG_COORDINATOR_ADDRESS",),
    ("SDSEG_NUM_PROCESSES", "SDSEG_PROCESS_ID"),
    ("SDSEG_COORDINATOR_ADDRESS", "SDSEG_PROCESS_ID"),
])
def test_partial_explicit_env_names_missing_vars(given):
  values = {"SDSEG_COORDINATOR_ADDRESS": "10.0.0.1:1234", "SDSEG_NUM_PROCESSES": "2",
            "SDSEG_PROCESS_ID": "0"}
  env = {k: values[k] for k in given}
  with pytest.raises(RuntimeError) as e:
    _plan(env)
  for missing in set(values) - set(given):
    assert missing in str(e.value)


def test_explicit_env_wins_over_slurm():
  env = dict(SLURM_STEP, SDSEG_COORDINATOR_ADDRESS="h0:1234", SDSEG_NUM_PROCESSES="2",
             SDSEG_PROCESS_ID="1", SDSEG_LOCAL_DEVICE_IDS="0,1")
  plan = _plan(env)
  assert plan.mode == "explicit"
  assert plan.init_kwargs == dict(coordinator_address="h0:1234", num_processes=2, process_id=1,
                                  cluster_detection_method="deactivate", local_device_ids=[0, 1])


@pytest.mark.parametrize("env, fragment", [
    (dict(SDSEG_COORDINATOR_ADDRESS="nohostport", SDSEG_NUM_PROCESSES="2", SDSEG_PROCESS_ID="0"),
     "HOST:PORT"),
    (dict(SDSEG_COORDINATOR_ADDRESS="h:1", SDSEG_NUM_PROCESSES="two", SDSEG_PROCESS_ID="0"),
     "SDSEG_NUM_PROCESSES='two'"),
    (dict(SDSEG_COORDINATOR_ADDRESS="h:1", SDSEG_NUM_PROCESSES="2", SDSEG_PROCESS_ID="2"),
     "SDSEG_PROCESS_ID=2"),
    (dict(SDSEG_DISTRIBUTED="maybe"), "SDSEG_DISTRIBUTED"),
])
def test_invalid_explicit_values_raise(env, fragment):
  with pytest.raises(RuntimeError, match=fragment.replace("(", r"\(")):
    _plan(env)


def test_slurm_single_task_is_single_process():
  env = dict(SLURM_STEP, SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0")
  assert _plan(env).mode == "single"


def test_slurm_multi_task_uses_jax_autodetection():
  plan = _plan(SLURM_STEP)
  assert plan.mode == "slurm" and plan.init_kwargs == {}


def test_slurm_one_visible_gpu_per_task_pins_ordinal_zero():
  plan = _plan(dict(SLURM_STEP, CUDA_VISIBLE_DEVICES="3"))
  assert plan.init_kwargs == {"local_device_ids": [0]}


def test_slurm_without_srun_is_an_error():
  env = dict(SLURM_STEP)
  del env["SLURM_STEP_NODELIST"]  # Inside the batch script, outside any srun step.
  with pytest.raises(RuntimeError, match="SLURM_STEP_NODELIST.*srun"):
    _plan(env)


def test_distributed_off_forces_single():
  assert _plan(dict(SLURM_STEP, SDSEG_DISTRIBUTED="off")).mode == "single"


@pytest.mark.parametrize("env", [
    {"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"},
    {"TPU_PROCESS_ADDRESSES": "10.0.0.2:8476,10.0.0.3:8476"},
    {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"},
    {"MEGASCALE_NUM_SLICES": "2"},
])
def test_tpu_multihost_env(env):
  plan = _plan(env)
  assert plan.mode == "tpu" and plan.init_kwargs == {}


def test_tpu_single_host_env_is_single():
  assert _plan({"TPU_WORKER_HOSTNAMES": "localhost", "MEGASCALE_NUM_SLICES": "1"}).mode == "single"


def test_tpu_flag_needs_tpu_hardware():
  assert _plan({"SDSEG_TPU_MULTIHOST": "1"}, has_tpu_chip=True).mode == "tpu"
  with pytest.raises(RuntimeError, match="no Cloud TPU chip"):
    _plan({"SDSEG_TPU_MULTIHOST": "1"}, has_tpu_chip=False)


def test_tpu_env_ignored_when_platform_is_cpu():
  env = {"TPU_WORKER_HOSTNAMES": "a,b", "JAX_PLATFORMS": "cpu"}
  assert _plan(env).mode == "single"


def test_initialize_single_process_returns_topology(monkeypatch):
  def fail(**kwargs):
    raise AssertionError(f"jax.distributed.initialize must not be called: {kwargs}")
  monkeypatch.setattr(distributed.jax.distributed, "initialize", fail)
  distributed._reset_for_tests()
  try:
    info = distributed.initialize({})
    assert info == distributed.initialize({})  # Idempotent.
  finally:
    distributed._reset_for_tests()
  assert info.mode == "single" and info.is_coordinator
  assert (info.process_index, info.process_count) == (0, 1)
  assert info.device_count == info.local_device_count == 8  # conftest's emulated devices.


def test_initialize_failure_is_wrapped_with_context(monkeypatch):
  def fail(**kwargs):
    raise ValueError("connection refused")
  monkeypatch.setattr(distributed.jax.distributed, "initialize", fail)
  monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)
  env = dict(SDSEG_COORDINATOR_ADDRESS="h0:1234", SDSEG_NUM_PROCESSES="2", SDSEG_PROCESS_ID="1")
  distributed._reset_for_tests()
  with pytest.raises(RuntimeError, match="'explicit' launch.*connection refused.*process 0"):
    distributed.initialize(env)
  distributed._reset_for_tests()


# ------------------------------------------------------------------------------------------------
# A real two-process job on localhost.
# ------------------------------------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import json, sys
    from sdseg_jax import distributed
    info = distributed.initialize()
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    # Each process contributes its local rows: process p holds rows [10p, 10p+1] (one per device).
    local = np.arange(jax.local_device_count(), dtype=np.float32) + 10.0 * info.process_index
    global_x = jax.make_array_from_process_local_data(sharding, local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(global_x)
    gathered = multihost_utils.process_allgather(jnp.asarray([info.process_index]))
    # The result goes to its own file: native libraries (Gloo) print to the same stdout/stderr
    # without newlines, so parsing the console output is racy.
    with open(sys.argv[1], "w") as f:
      f.write(json.dumps(dict(
        mode=info.mode, process_index=info.process_index, process_count=info.process_count,
        local=info.local_device_count, devices=info.device_count,
        global_shape=list(global_x.shape), total=float(total),
        gathered=np.asarray(gathered).ravel().tolist())))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_cpu_job(tmp_path):
  """Two real processes, 2 emulated CPU devices each: a cross-process sum and allgather."""
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  port = _free_port()
  base_env = {k: v for k, v in os.environ.items()
              if not k.startswith(("SDSEG_", "SLURM_", "TPU_", "MEGASCALE_", "JAX_"))}
  base_env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                  PYTHONPATH=str(REPO_ROOT), SDSEG_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                  SDSEG_NUM_PROCESSES="2", SDSEG_INIT_TIMEOUT="60")
  result_paths = [tmp_path / f"result{pid}.json" for pid in range(2)]
  procs = []
  for pid, result_path in enumerate(result_paths):
    env = dict(base_env, SDSEG_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, str(script), str(result_path)],
                                  env=env, cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  results = []
  try:
    for p, result_path in zip(procs, result_paths):
      out, _ = p.communicate(timeout=120)
      assert p.returncode == 0, out
      results.append(json.loads(result_path.read_text()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, r in enumerate(results):
    assert r["mode"] == "explicit"
    assert (r["process_index"], r["process_count"]) == (pid, 2)
    assert (r["local"], r["devices"]) == (2, 4)
    assert r["global_shape"] == [4]
    assert r["total"] == 0 + 1 + 10 + 11  # Needs both processes' data: a real collective.
    assert r["gathered"] == [0, 1]
