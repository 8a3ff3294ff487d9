"""Multi-process start-up: decide the launch kind and call `jax.distributed.initialize()` once.

`main.py` calls `initialize()` before anything else touches jax devices, because JAX refuses to
join a multi-process job once its backend exists. The decision is made from the environment only,
in this order:

1. explicit: `SDSEG_COORDINATOR_ADDRESS`, `SDSEG_NUM_PROCESSES`, `SDSEG_PROCESS_ID` (all three or
   none). Set by `launch/multinode.sh`; works on any cluster, and on one host for CPU tests.
2. slurm: `SLURM_NTASKS > 1`. JAX's own Slurm detection fills in coordinator, count and id; we
   only check first that the variables it reads exist, because the classic mistake (running
   `python` inside an sbatch script without `srun`) otherwise hangs or fails obscurely.
3. tpu: a Cloud TPU VM that is part of a multi-host slice or a multislice job (TPU_WORKER_HOSTNAMES
   / TPU_PROCESS_ADDRESSES with more than one host, MEGASCALE_* variables, or
   `SDSEG_TPU_MULTIHOST=1`, which `launch/tpu/run.sh` exports because on GCE TPU VMs the topology
   lives in the metadata server, not in the environment). JAX's TPU detection fills in the rest.
4. single: one process, no `jax.distributed.initialize()`.

`SDSEG_DISTRIBUTED=off` forces single-process mode (for example an interactive `salloc` shell with
several tasks where you really want one process); `SDSEG_DISTRIBUTED=auto` (default) detects.

Every failure raises a RuntimeError that says what was detected and how to fix it: a multi-process
job that silently falls back to one process per host trains N independent models on the same
checkpoint directory, which is far worse than a crash.
"""

from collections.abc import Mapping
import dataclasses
import os
from typing import Any, Literal, Optional

from absl import logging
import jax

Mode = Literal["single", "tpu", "slurm", "explicit"]

EXPLICIT_VARS = ("SDSEG_COORDINATOR_ADDRESS", "SDSEG_NUM_PROCESSES", "SDSEG_PROCESS_ID")
# The variables jax's Slurm cluster detection reads; all must exist inside an `srun` step.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # Cloud TPU chips show up as PCI devices of this vendor.


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  """What `initialize()` found; cheap to pass around and log."""
  mode: Mode
  process_index: int
  process_count: int
  local_device_count: int
  device_count: int
  platform: str
  coordinator_address: str | None = None

  @property
  def is_coordinator(self) -> bool:
    """Process 0 writes logs, metrics and config; every process saves/restores checkpoints."""
    return self.process_index == 0


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
  """The decision, before any JAX call: the mode and the kwargs for jax.distributed.initialize."""
  mode: Mode
  init_kwargs: Mapping[str, Any]
  reason: str  # Human-readable: which variables led here (used in logs and error messages).


_INFO: DistributedInfo | None = None


def _int_var(environ: Mapping[str, str], name: str) -> int:
  value = environ[name]
  try:
    return int(value)
  except ValueError:
    raise RuntimeError(f"{name}={value!r} is not an integer.") from None


def _plan_explicit(environ: Mapping[str, str]) -> LaunchPlan:
  """Explicit coordinator env: all three given, validated here so errors name the variable."""
  address = environ["SDSEG_COORDINATOR_ADDRESS"]
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise RuntimeError(
        f"SDSEG_COORDINATOR_ADDRESS={address!r} must be HOST:PORT (the address of process 0 and a "
        "free port every process can reach, e.g. 10.0.0.1:12345).")
  num_processes = _int_var(environ, "SDSEG_NUM_PROCESSES")
  process_id = _int_var(environ, "SDSEG_PROCESS_ID")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise RuntimeError(
        f"SDSEG_PROCESS_ID={process_id} must be in [0, SDSEG_NUM_PROCESSES={num_processes}).")
  kwargs: dict[str, Any] = dict(
      coordinator_address=address, num_processes=num_processes, process_id=process_id,
      # Without this, jax would still run its cluster auto-detection to fill local_device_ids and,
      # inside a Slurm allocation, pin each process to one GPU behind our back.
      cluster_detection_method="deactivate")
  if ids := environ.get("SDSEG_LOCAL_DEVICE_IDS"):
    kwargs["local_device_ids"] = [int(i) for i in ids.split(",")]
  return LaunchPlan("explicit", kwargs,
                    f"SDSEG_COORDINATOR_ADDRESS={address}, SDSEG_NUM_PROCESSES={num_processes}, "
                    f"SDSEG_PROCESS_ID={process_id}")


def _plan_slurm(environ: Mapping[str, str], ntasks: int) -> LaunchPlan:
  """Slurm step with several tasks: jax auto-detects, after we check its variables exist."""
  missing = [v for v in SLURM_VARS if v not in environ]
  if missing:
    raise RuntimeError(
        f"Detected a Slurm job with SLURM_NTASKS={ntasks} but {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not set, so this process is not one task of an "
        "srun step. Launch with `srun python -m sdseg_jax.main ...` (see "
        "launch/slurm/train.sbatch), or set SDSEG_DISTRIBUTED=off to run a single process.")
  kwargs: dict[str, Any] = {}
  # jax's Slurm detection pins local process i to CUDA ordinal i, which assumes every task sees all
  # GPUs of its node. With --gpus-per-task=1 each task sees exactly one GPU (ordinal 0), so ordinal
  # SLURM_LOCALID would not exist (jax-ml/jax#23452): use the one visible device instead.
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if len(visible) == 1 and "JAX_LOCAL_DEVICE_IDS" not in environ:
    kwargs["local_device_ids"] = [0]
  return LaunchPlan("slurm", kwargs,
                    f"SLURM_JOB_ID={environ['SLURM_JOB_ID']}, SLURM_NTASKS={ntasks}, "
                    f"SLURM_PROCID={environ['SLURM_PROCID']}")


def _has_tpu_chip(sys_pci: str = "/sys/bus/pci/devices") -> bool:
  """True on a Cloud TPU VM (a Google PCI device present); no network, no jax import side effect."""
  try:
    entries = os.listdir(sys_pci)
  except OSError:
    return False
  for entry in entries:
    try:
      with open(os.path.join(sys_pci, entry, "vendor")) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _tpu_multihost_reason(environ: Mapping[str, str], has_tpu_chip: bool) -> str | None:
  """Returns why this looks like a multi-host / multislice TPU job, or None."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.lower():
    return None  # The user asked for another backend (e.g. CPU tests on a TPU VM).
  for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    hosts = [h for h in environ.get(var, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return f"{var} lists {len(hosts)} hosts"
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "MEGASCALE_COORDINATOR_ADDRESS is set (multislice)"
  if environ.get("MEGASCALE_NUM_SLICES", "1").strip() not in ("", "0", "1"):
    return f"MEGASCALE_NUM_SLICES={environ['MEGASCALE_NUM_SLICES']} (multislice)"
  if environ.get("SDSEG_TPU_MULTIHOST") == "1":
    if not has_tpu_chip:
      raise RuntimeError(
          "SDSEG_TPU_MULTIHOST=1 is set but this machine has no Cloud TPU chip. Unset it, or run "
          "on the TPU VM workers (launch/tpu/run.sh).")
    return "SDSEG_TPU_MULTIHOST=1 on a Cloud TPU VM"
  return None


def plan_launch(environ: Mapping[str, str] | None = None, *,
                has_tpu_chip: bool | None = None) -> LaunchPlan:
  """Decides the launch kind from the environment; pure apart from reading /sys (testable).

  Args:
    environ: the environment to inspect (default: os.environ).
    has_tpu_chip: override of the Cloud TPU hardware probe (tests); None probes /sys.

  Returns:
    The LaunchPlan. Raises RuntimeError for inconsistent environments.
  """
  environ = os.environ if environ is None else environ
  switch = environ.get("SDSEG_DISTRIBUTED", "auto").strip().lower()
  if switch not in ("auto", "off"):
    raise RuntimeError(f"SDSEG_DISTRIBUTED={switch!r}: expected 'auto' (default) or 'off'.")

  explicit = [v for v in EXPLICIT_VARS if environ.get(v, "") != ""]
  if switch == "off":
    if explicit:
      raise RuntimeError(f"SDSEG_DISTRIBUTED=off contradicts {', '.join(explicit)}; unset one.")
    return LaunchPlan("single", {}, "SDSEG_DISTRIBUTED=off")

  # 1. Explicit coordinator env: all three or none.
  if explicit:
    missing = [v for v in EXPLICIT_VARS if v not in explicit]
    if missing:
      raise RuntimeError(
          f"Explicit multi-process launch is partially configured: {', '.join(explicit)} "
          f"set but {', '.join(missing)} missing. Set all three of {', '.join(EXPLICIT_VARS)} "
          "(launch/multinode.sh does this) or none of them.")
    return _plan_explicit(environ)

  # 2. Slurm with more than one task.
  if "SLURM_NTASKS" in environ:
    ntasks = _int_var(environ, "SLURM_NTASKS")
    if ntasks > 1:
      return _plan_slurm(environ, ntasks)

  # 3. Cloud TPU multi-host / multislice.
  if has_tpu_chip is None:
    has_tpu_chip = _has_tpu_chip()
  if reason := _tpu_multihost_reason(environ, has_tpu_chip):
    return LaunchPlan("tpu", {}, reason)

  # 4. One process.
  if "SLURM_NTASKS" in environ:
    return LaunchPlan("single", {}, "SLURM_NTASKS=1")
  return LaunchPlan("single", {}, "no multi-process environment detected")


def _fix_hint(plan: LaunchPlan) -> str:
  return {
      "explicit": ("Check that process 0 was started, that every process got the same "
                   "SDSEG_COORDINATOR_ADDRESS and SDSEG_NUM_PROCESSES and a distinct "
                   "SDSEG_PROCESS_ID, and that the port is reachable (firewall) and free."),
      "slurm": ("Launch every task with srun (launch/slurm/train.sbatch); the first node of "
                "SLURM_STEP_NODELIST must be reachable; set JAX_COORDINATOR_PORT if the default "
                "port derived from SLURM_JOB_ID is taken."),
      "tpu": ("Run the same command on every worker (launch/tpu/run.sh uses --worker=all) and "
              "free stale TPU holders first (launch/tpu/stop.sh)."),
  }.get(plan.mode, "")


def initialize(environ: Mapping[str, str] | None = None, *,
               initialization_timeout: int | None = None) -> DistributedInfo:
  """Joins the multi-process job if there is one; returns the topology. Idempotent.

  Must be the first thing that touches jax devices. A second call returns the first call's
  result without initialising again (jax allows only one initialize per process).

  Args:
    environ: the environment to inspect (default: os.environ).
    initialization_timeout: seconds to wait for all processes to connect; default
      `SDSEG_INIT_TIMEOUT` or jax's default (300 s).

  Returns:
    DistributedInfo describing this process's place in the job.

  Raises:
    RuntimeError: an inconsistent environment or a failed jax.distributed.initialize, with what
      was detected and how to fix it.
  """
  global _INFO
  if _INFO is not None:
    return _INFO
  environ = os.environ if environ is None else environ
  plan = plan_launch(environ)

  if plan.mode != "single":
    kwargs = dict(plan.init_kwargs)
    timeout = initialization_timeout or environ.get("SDSEG_INIT_TIMEOUT")
    if timeout:
      kwargs["initialization_timeout"] = int(timeout)
    # CPU backends need a cross-process collectives implementation (older jax had none by
    # default); gloo is the portable one. It only affects the CPU client, so it is harmless on
    # GPU/TPU, and an explicit user choice via JAX_CPU_COLLECTIVES_IMPLEMENTATION wins.
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in environ:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if jax.distributed.is_initialized():
      logging.warning("jax.distributed was already initialised by someone else; using it.")
    else:
      logging.info("Multi-process launch (%s: %s); calling jax.distributed.initialize(%s).",
                   plan.mode, plan.reason, kwargs)
      try:
        jax.distributed.initialize(**kwargs)
      except Exception as e:  # pylint: disable=broad-except  # Re-raised with context.
        raise RuntimeError(
            f"jax.distributed.initialize failed for a '{plan.mode}' launch ({plan.reason}): "
            f"{type(e).__name__}: {e}. {_fix_hint(plan)} If jax was used before this call, "
            "move sdseg_jax.distributed.initialize() to the very start of the program.") from e

  info = DistributedInfo(
      mode=plan.mode,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      local_device_count=jax.local_device_count(),
      device_count=jax.device_count(),
      platform=jax.default_backend(),
      coordinator_address=plan.init_kwargs.get("coordinator_address"),
  )
  expected = {"explicit": plan.init_kwargs.get("num_processes"),
              "slurm": environ.get("SLURM_NTASKS")}.get(plan.mode)
  if expected is not None and info.process_count != int(expected):
    # Processes that did not all join the same job would each train on the shared workdir.
    raise RuntimeError(
        f"'{plan.mode}' launch ({plan.reason}) expected {expected} processes but jax sees "
        f"{info.process_count}. {_fix_hint(plan)}")
  logging.info(
      "Topology: mode=%s process %d/%d, %d local / %d global %s devices (%s).", info.mode,
      info.process_index, info.process_count, info.local_device_count, info.device_count,
      info.platform, plan.reason)
  _INFO = info
  return info


def _reset_for_tests() -> None:
  """Forgets the cached result (tests only; cannot undo a real jax.distributed.initialize)."""
  global _INFO
  _INFO = None


def cpu_device_count(requested: int, global_batch_size: int,
                     available_cores: Optional[int] = None) -> int:
  """The number of CPU devices for `config.mesh.cpu_devices` (0 = leave JAX's default).

  -1 asks for one device per core, rounded down to a divisor of the global batch so that the
  data axis splits the batch evenly.
  """
  if requested >= 0:
    return requested
  cores = available_cores or len(os.sched_getaffinity(0))
  return max(n for n in range(1, cores + 1) if global_batch_size % n == 0)
