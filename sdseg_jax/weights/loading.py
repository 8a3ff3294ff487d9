"""Places converted weights (artifacts.py files) onto the mesh with the target shardings.

Every process reads the same file and contributes the shards its devices own
(`make_array_from_callback`), so this works unchanged on one device, 8 devices or a pod.
"""

from typing import Any

import jax
import numpy as np

from sdseg_jax import errors
from sdseg_jax import storage
from sdseg_jax.weights import artifacts

MISSING_WEIGHTS_HELP = """\
{path}: converted {what} weights not found.
The official SDSeg recipe starts from public Latent Diffusion weights:
  * kl-f8 autoencoder: https://ommer-lab.com/files/latent-diffusion/kl-f8.zip (model.ckpt)
  * LSUN-Churches LDM: https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip (model.ckpt)
Convert them once (no torch needed):
  python -m sdseg_jax.convert --config CONFIG --kind autoencoder \\
      --checkpoint kl-f8/model.ckpt --out {vae_hint}
  python -m sdseg_jax.convert --config CONFIG --kind ldm_unet \\
      --checkpoint lsun_churches/model.ckpt --out {unet_hint}
and point config.init.vae / config.init.unet at the .npz files. Without downloads, use
--config.init.pretrain_vae_steps=N (trains the VAE on the masks, as configs/demo.py does)."""


def missing_weights_message(path: str, what: str) -> str:
  return MISSING_WEIGHTS_HELP.format(path=path, what=what, vae_hint="weights/kl-f8.npz",
                                     unet_hint="weights/lsun_churches_unet.npz")


def read(path: str, key: str, abstract: Any, what: str) -> Any:
  """Reads subtree `key` of an artifact and checks it against the abstract tree."""
  if not storage.path(path).is_file():
    raise errors.MissingFileError(missing_weights_message(path, what))
  tree, meta = artifacts.load(path)
  if key not in tree:
    raise artifacts.ArtifactError(f"{path}: holds {sorted(tree)} (converted as "
                                  f"--kind {meta.get('kind')}), not the {what} weights '{key}'")
  artifacts.check_fits(tree[key], abstract, what, path)
  return tree[key]


def place(tree: Any, shardings: Any) -> Any:
  """Host numpy tree (identical on every process) -> global arrays with the given shardings."""
  def put(array, sharding):
    array = np.asarray(array, np.float32)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
  return jax.tree_util.tree_map(put, tree, shardings)
