"""Loads a trained run's inference weights: what evaluate, predict and stability all start from.

A run directory (written by `sdseg_jax.train`) holds config.json, checkpoints/<step>/ (orbax
train states) and, once training finished, export/inference.npz. Inference needs the EMA UNet,
the LIVE vision encoder (the official evaluation uses the EMA only for the UNet), the latent
scale factor of the run and the frozen VAE, which is never checkpointed but referenced: by
config.init.vae, config.init.sdseg or WORKDIR/pretrained_vae.npz (the demo's pre-trained VAE),
or, for the export bundle, by the bundle's own `vae_reference` (checked by SHA-256). From a
training checkpoint only those leaves are read (orbax partial restore through a read-only
`checkpoint.Checkpointer`): the optimizer and the full train state are never built.

`--checkpoint` selects the weights: "best" (by the in-training validation Dice), "last" (the
newest step), an integer step, or "export" (the bundle). Every failure is a `RestoreError`
whose message names the missing directory/file and what to do about it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Optional, Union

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdseg_jax import checkpoint as checkpoint_lib
from sdseg_jax import config_lib
from sdseg_jax import errors
from sdseg_jax import export
from sdseg_jax import optim
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import storage
from sdseg_jax import vae_pretrain
from sdseg_jax.models import sdseg
from sdseg_jax.weights import artifacts
from sdseg_jax.weights import loading

EXPORT = "export"
BEST_METRIC = "eval/dice"  # what train.py ranks checkpoints by
CHECKPOINT_CHOICES = "best | last | STEP | export"


class RestoreError(errors.UserFacingError, ValueError):
  """A run directory, checkpoint or weights file cannot be used; the message says which."""


@dataclasses.dataclass
class Run:
  """Everything inference needs, placed on `mesh` (parameters replicated).

  params: {"unet": EMA UNet, "vision_encoder": live encoder}. checkpoint: the label used in
  output file names ("best", "last", "750", "export"); step: the resolved training step (None
  for a bundle that does not record it); source: the directory or file the weights came from.
  """
  workdir: epath.Path
  config: ml_collections.ConfigDict
  model: sdseg.SDSeg
  mesh: jax.sharding.Mesh
  params: Any
  vae_params: Any
  scale_factor: jax.Array
  checkpoint: str
  step: Optional[int]
  source: str
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def num_classes(self) -> Optional[int]:
    return self.model.unet.num_classes

  def jit(self, name: str, build: Callable[[], Callable]) -> Callable:
    """The jitted function `name`, built once per Run, so repeated predictions or protocols
    on the same weights (tests, several seeds) compile once."""
    if name not in self._jitted:
      self._jitted[name] = jax.jit(build())
    return self._jitted[name]


def parse_checkpoint(value: Union[str, int]) -> Union[str, int]:
  """"best" | "last"/"latest" | "export" | an integer step (as int)."""
  text = str(value).strip().lower()
  if text in ("best", EXPORT):
    return text
  if text in ("last", "latest"):
    return "last"
  try:
    step = int(text)
  except ValueError:
    raise RestoreError(f"--checkpoint must be {CHECKPOINT_CHOICES}, got {value!r}") from None
  if step < 0:
    raise RestoreError(f"--checkpoint step must be >= 0, got {step}")
  return step


def inference_mesh() -> jax.sharding.Mesh:
  """All devices on the data axis: parameters replicated, batches split over devices."""
  return sharding_lib.make_mesh({"data": -1, "fsdp": 1})


def lacks_label_emb(path: str, abstract_unet: Mapping[str, Any]) -> bool:
  """True when the model has a class embedding but the SDSeg weights file at `path` has none.

  That is the official fine-tune start (a binary checkpoint; label_emb stays random). Reads
  only the npz directory. A missing or unreadable file returns False, so the loader reports it.
  """
  if optim.LABEL_EMB not in abstract_unet:
    return False
  try:
    # Local or gs:// (ranged reads of the zip directory only).
    with storage.path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
      return not any(k.startswith(f"unet/{optim.LABEL_EMB}/") for k in npz.files)
  except (OSError, ValueError):
    return False


def _read(path: epath.Path, key: str, abstract: Any, what: str) -> Any:
  try:
    return loading.read(str(path), key, abstract, what)
  except (FileNotFoundError, artifacts.ArtifactError) as e:
    raise RestoreError(str(e)) from e


def _restore_weights(ckpt_dir: epath.Path, choice: Union[str, int],
                     abstract_weights: Any) -> tuple[Any, int]:
  """Reads the inference subtree of one train state through a READ-ONLY `Checkpointer`.

  Read-only: a writable manager removes unfinished `*.orbax-checkpoint-tmp-*` directories when
  it opens, which would break the save of a training run still writing into the directory.
  Only the leaves of `abstract_weights` are read (orbax partial restore): no optimizer, no full
  train state, so restoring costs the inference weights' memory, not the state's.
  """
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, best_metric=BEST_METRIC, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise RestoreError(f"{ckpt_dir}: no finished checkpoint")
    if choice == "best":
      step = ckpt.best_step()
      if step is None:
        raise RestoreError(f"{ckpt_dir}: no checkpoint carries {BEST_METRIC!r}, so there is "
                           f"no 'best' step; use --checkpoint last or one of {steps}")
    elif choice == "last":
      step = steps[-1]
    elif int(choice) not in steps:
      raise RestoreError(f"{ckpt_dir / str(choice)}: step {choice} not found; available "
                         f"steps: {steps}")
    else:
      step = int(choice)
    try:
      weights = ckpt.restore_subtree(abstract_weights, step)
    except checkpoint_lib.CheckpointError as e:
      raise RestoreError(f"{ckpt_dir / str(step)}: cannot restore step {step} for this run's "
                         f"config ({e})") from e
  finally:
    ckpt.close()
  return weights, int(step)


def load_run(workdir: storage.PathLike, checkpoint: Union[str, int] = "best",
             mesh: Optional[jax.sharding.Mesh] = None) -> Run:
  """Restores a run's inference weights (EMA UNet + live vision encoder + VAE + scale).

  Raises:
    RestoreError: missing workdir/config/checkpoint/VAE, or weights that do not fit.
  """
  try:
    workdir = storage.path(workdir)
    storage.check_bucket(workdir, write=False)
  except storage.StorageError as e:
    raise RestoreError(str(e)) from e
  if not workdir.is_dir():
    raise RestoreError(f"{workdir}: no such run directory")
  try:
    config = config_lib.load(workdir)
  except FileNotFoundError as e:
    raise RestoreError(str(e)) from e
  choice = parse_checkpoint(checkpoint)
  mesh = mesh or inference_mesh()
  replicated = sharding_lib.replicated(mesh)
  if choice == EXPORT:
    return _load_export(workdir, config, mesh)

  model = sdseg.build(config.model)
  abstract_params, abstract_vae = jax.eval_shape(model.init, jax.random.key(0))
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir():
    raise RestoreError(f"{ckpt_dir}: no checkpoints directory; has this run trained yet?")
  # The TrainState fields inference needs (same names and nesting as state.TrainState).
  wanted = {"ema_unet": abstract_params["unet"],
            "params": {"vision_encoder": abstract_params["vision_encoder"]},
            "scale_factor": jax.ShapeDtypeStruct((), jnp.float32)}
  wanted = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), wanted)
  weights, step = _restore_weights(ckpt_dir, choice, wanted)
  params = {"unet": weights["ema_unet"], "vision_encoder": weights["params"]["vision_encoder"]}
  vae_file = vae_pretrain.frozen_vae_source(config, workdir)[0]
  vae_sh = jax.tree_util.tree_map(lambda _: replicated, abstract_vae)
  vae_params = loading.place(_read(vae_file, "vae", abstract_vae, "frozen VAE"), vae_sh)
  label = choice if isinstance(choice, str) else str(choice)
  return Run(workdir=workdir, config=config, model=model, mesh=mesh, params=params,
             vae_params=vae_params, scale_factor=weights["scale_factor"], checkpoint=label,
             step=int(step), source=str(ckpt_dir / str(step)))


def _load_export(workdir: epath.Path, config: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh) -> Run:
  """The bundle's model config and weights; the VAE from its recorded reference."""
  path = workdir / "export" / "inference.npz"
  if not path.is_file():
    raise RestoreError(f"{path}: no inference export (it is written when training reaches "
                       f"config.train.max_steps); use --checkpoint best|last|STEP instead")
  try:
    bundle = export.load_inference(path)
  except checkpoint_lib.CheckpointError as e:
    raise RestoreError(str(e)) from e
  model_config = ml_collections.ConfigDict(json.loads(bundle["model_config_json"]))
  model = sdseg.build(model_config)
  abstract_params, abstract_vae = jax.eval_shape(model.init, jax.random.key(0))
  replicated = sharding_lib.replicated(mesh)
  for key, what in (("unet", "unet_params"), ("vision_encoder", "vision_encoder_params")):
    try:
      artifacts.check_fits(bundle[what], abstract_params[key], f"exported {key}", path)
    except artifacts.ArtifactError as e:
      raise RestoreError(str(e)) from e
  params = loading.place({"unet": bundle["unet_params"],
                          "vision_encoder": bundle["vision_encoder_params"]},
                         jax.tree_util.tree_map(lambda _: replicated, abstract_params))
  vae_file = storage.path(bundle["vae_reference"])
  if not vae_file.is_file():  # e.g. the run directory was moved
    vae_file = vae_pretrain.frozen_vae_source(config, workdir)[0]
  sha = bundle["vae_sha256"]
  if sha and vae_file.is_file() and export.sha256(vae_file) != sha:
    raise RestoreError(f"{vae_file}: this VAE is not the one {path} was exported with "
                       f"(SHA-256 differs); decoding with another VAE gives wrong masks")
  vae_sh = jax.tree_util.tree_map(lambda _: replicated, abstract_vae)
  vae_params = loading.place(_read(vae_file, "vae", abstract_vae, "frozen VAE"), vae_sh)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = model_config
  return Run(workdir=workdir, config=config, model=model, mesh=mesh, params=params,
             vae_params=vae_params,
             scale_factor=jax.device_put(jnp.float32(bundle["scale_factor"]), replicated),
             checkpoint=EXPORT, step=None, source=str(path))
