"""Checks of a training config that need no I/O and no JAX devices, run before anything starts.

ml_collections already rejects unknown keys (configs are locked); this catches values that are
individually valid but wrong for training, with a message that names the field.
"""

import json

import ml_collections

from sdseg_jax import errors
from sdseg_jax import storage
from sdseg_jax.data import registry

# Raised by `validate`; defined with the other user-facing errors so that low-level modules
# (sharding, models) raise it without importing this module.
ConfigError = errors.ConfigError


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid field."""
  def need(ok: bool, message: str) -> None:
    if not ok:
      raise ConfigError(message)

  need(config.data.name in registry.NAMES,
       f"config.data.name={config.data.name!r} is not one of {registry.NAMES}")
  need(config.data.name == "synthetic" or bool(config.data.root),
       f"config.data.root is empty: set it to the {config.data.name} download folder")
  need(config.train.global_batch_size > 0, "config.train.global_batch_size must be positive")
  need(config.train.max_steps > 0, "config.train.max_steps must be positive")
  need(config.eval.split in ("val", "test"), "config.eval.split must be 'val' or 'test'")
  need(config.eval.split != "test" or config.eval.get("select_on_test", False),
       "config.eval.split='test': model selection during training must never see the test "
       "split (the official code's bug); evaluate on test afterwards with sdseg_jax.evaluate "
       "(only the `official` reproduction protocol sets config.eval.select_on_test to redo it)")
  need(config.eval.get("noise", "per_image") in ("per_image", "shared"),
       "config.eval.noise must be 'per_image' or 'shared'")
  need(config.checkpoint.get("export_dtype", "float32") in ("float32", "bfloat16"),
       "config.checkpoint.export_dtype must be 'float32' or 'bfloat16'")
  need(config.mesh.strategy in ("dp", "fsdp"), "config.mesh.strategy must be 'dp' or 'fsdp'")
  need(config.mesh.cpu_devices >= -1,
       "config.mesh.cpu_devices must be -1 (one per core), 0 (JAX's default) or a count")
  need(config.model.compute_dtype in ("auto", "float32", "bfloat16", "float16"),
       "config.model.compute_dtype must be auto, float32, bfloat16 or float16")
  need(config.model.vae.resolution == config.data.image_size,
       f"config.model.vae.resolution ({config.model.vae.resolution}) must equal "
       f"config.data.image_size ({config.data.image_size})")
  latent = config.data.image_size // 2 ** (len(config.model.vae.ch_mult) - 1)
  need(config.model.unet.image_size == latent,
       f"config.model.unet.image_size ({config.model.unet.image_size}) must equal the latent "
       f"size {latent} (image_size / 2^(len(ch_mult)-1))")
  for section in ("eval", "checkpoint", "log"):
    need(config[section].every_steps > 0, f"config.{section}.every_steps must be positive")
  have_vae = bool(config.init.vae) or bool(config.init.sdseg) or config.init.pretrain_vae_steps > 0
  need(have_vae, "no VAE weights: set config.init.vae to the converted kl-f8 .npz (see "
       "`python -m sdseg_jax.convert --help`), config.init.sdseg to a converted SDSeg "
       "checkpoint, or config.init.pretrain_vae_steps > 0")


def dump(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> None:
  """Writes WORKDIR/config.json (the resolved config of the run, for humans and evaluate)."""
  storage.write_text_atomic(storage.path(workdir) / "config.json",
                            json.dumps(json.loads(config.to_json()), indent=1, sort_keys=True))


def load(workdir: storage.PathLike) -> ml_collections.ConfigDict:
  """The config a run was trained with (WORKDIR/config.json)."""
  path = storage.path(workdir) / "config.json"
  if not path.is_file():
    raise errors.MissingFileError(f"{path} not found: {workdir} is not an sdseg_jax run directory")
  return ml_collections.ConfigDict(json.loads(path.read_text()))
