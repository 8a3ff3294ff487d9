"""Command line entry point: train (or resume) an SDSeg run.

  python -m sdseg_jax.main --config configs/demo.py --workdir runs/demo
  python -m sdseg_jax.main --config configs/kvasir.py --workdir runs/kvasir \
      --config.data.root=/data/Kvasir-SEG --config.init.vae=weights/kl-f8.npz \
      --config.init.unet=weights/lsun_churches_unet.npz

The same command runs on one CPU, one GPU, all GPUs of a node, or every host of a TPU pod /
SLURM job (multi-process launches are detected by `sdseg_jax.distributed`). Rerunning it on a
workdir that holds a checkpoint resumes; a larger --config.train.max_steps continues training.
"""

import logging
import os
import sys
from typing import Optional

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from sdseg_jax import distributed
from sdseg_jax import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, exports).")
flags.mark_flags_as_required(["config", "workdir"])


def configure_jax(config: Optional[ml_collections.ConfigDict] = None) -> None:
  """Process-wide JAX settings, before any backend starts.

  Partitionable RNG (sharding-independent random numbers), a persistent compilation cache so a
  resumed or repeated run skips most of its compile time, and the CPU device count of
  `config.mesh.cpu_devices` (only affects the CPU backend; GPU and TPU runs are unchanged).
  """
  jax.config.update("jax_threefry_partitionable", True)
  forced = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
  if config is not None and not forced:
    count = distributed.cpu_device_count(config.mesh.cpu_devices, config.train.global_batch_size)
    if count > 0:
      jax.config.update("jax_num_cpu_devices", count)
  cache = os.environ.get("SDSEG_COMPILATION_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "sdseg_jax", "xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax/grain/gcsfs (dozens of lines per checkpoint or file read);
  keeps their warnings."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = any(f"/{lib}/" in record.pathname
                for lib in ("orbax", "grain", "etils", "gcsfs", "fsspec"))
    return record.levelno >= logging.WARNING or not noisy


def main(argv) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  configure_jax(_CONFIG.value)
  distributed.initialize()
  from sdseg_jax import train  # pylint: disable=g-import-not-at-top
  try:
    result = train.run(_CONFIG.value, _WORKDIR.value)
  except errors.UserFacingError as e:  # anything else is a bug: let its traceback show
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("finished: %s", result)


if __name__ == "__main__":
  app.run(main)
