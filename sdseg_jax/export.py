"""The standalone inference bundle: one npz with the EMA UNet, the vision encoder and the scale.

Written by training when it reaches config.train.max_steps (WORKDIR/export/inference.npz) and
read by `restore.load_run(..., "export")`. It holds no optimizer state and NOT the frozen VAE
(hundreds of MB, shared by all runs): only a reference to the VAE file and, when that is a file,
its SHA-256, so a load can detect a swapped VAE. Params are nested mappings of arrays.

Weights dtype (`config.checkpoint.export_dtype`): "float32" (default), or "bfloat16", which halves
the file (full size: 329 M parameters, 1.32 GB -> 0.66 GB, against the official 5.46 GB
checkpoint) for sharing results. bfloat16 arrays are stored as their uint16 bit patterns (npz
and numpy know no bfloat16) and widened back to float32 on load; the metadata says which.
"""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
import json
import os
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sdseg_jax import storage
from sdseg_jax.checkpoint import CheckpointError
from sdseg_jax.weights import artifacts

_INFERENCE_FORMAT = "sdseg_jax.inference"
_INFERENCE_VERSION = 1
EXPORT_DTYPES = ("float32", "bfloat16")


def _to_host(tree: Any) -> Any:
  """Gathers (possibly multi-host sharded) arrays to full numpy arrays on every process.

  bfloat16 is widened to float32 (exact) because the npz bundle is read with numpy alone.
  """
  def leaf_to_host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    x = np.asarray(x)
    if x.dtype == jnp.bfloat16:
      x = x.astype(np.float32)
    return x
  return jax.tree_util.tree_map(leaf_to_host, tree)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
  """Float arrays -> bfloat16 (round to nearest even) stored as uint16 bits; others unchanged."""
  if np.issubdtype(x.dtype, np.floating):
    return x.astype(ml_dtypes.bfloat16).view(np.uint16)
  return x


def _from_bf16_bits(x: np.ndarray) -> np.ndarray:
  return x.view(ml_dtypes.bfloat16).astype(np.float32) if x.dtype == np.uint16 else x


def sha256(path: epath.Path) -> str:
  """Hex SHA-256 of a local or gs:// file (a buffered reader either way)."""
  with path.open("rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def export_inference(path: os.PathLike | str,
                     *,
                     unet_params: Mapping[str, Any],
                     vision_encoder_params: Mapping[str, Any],
                     scale_factor: float,
                     model_config_json: str,
                     vae_reference: str,
                     dtype: str = "float32") -> None:
  """Writes the small standalone inference bundle: one npz file, atomically.

  It holds the (EMA) UNet and vision-encoder parameters, the latent scale factor and the model
  config, but NOT the frozen VAE weights (hundreds of MB, shared by all runs) and no optimizer
  state: only `vae_reference` (a path or name) and, when it is a local file, its SHA-256 so a
  later load can detect a swapped VAE. Params are nested mappings of arrays (linen-style dicts).

  All processes must call this (sharded params are gathered collectively); process 0 writes.
  """
  try:
    json.loads(model_config_json)
  except (TypeError, json.JSONDecodeError) as e:
    raise ValueError(f"model_config_json is not valid JSON: {e}") from e
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
  tree = {"unet": _to_host(unet_params), "vision_encoder": _to_host(vision_encoder_params)}
  if dtype == "bfloat16":
    tree = jax.tree_util.tree_map(_bf16_bits, tree)
  if jax.process_index() == 0:
    vae_file = storage.path(vae_reference)
    meta = {
        "format": _INFERENCE_FORMAT,
        "version": _INFERENCE_VERSION,
        "scale_factor": float(scale_factor),
        "model_config_json": model_config_json,
        "vae_reference": str(vae_reference),
        "vae_sha256": sha256(vae_file) if vae_file.is_file() else None,
        "weights_dtype": dtype,
    }
    artifacts.save(path, tree, meta)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"sdseg_jax.export_inference:{path}")


def load_inference(path: os.PathLike | str) -> dict[str, Any]:
  """Reads a bundle written by `export_inference`.

  Returns:
    dict with unet_params, vision_encoder_params (nested dicts of numpy arrays), scale_factor,
    model_config_json, vae_reference, vae_sha256 (None if the VAE was not a local file).

  Raises:
    CheckpointError: naming the file, if it is missing, unreadable or not an inference bundle.
  """
  try:
    tree, meta = artifacts.load(path)
  except artifacts.ArtifactError as e:
    raise CheckpointError(f"inference bundle {e}") from e
  if meta.get("format") != _INFERENCE_FORMAT:
    raise CheckpointError(f"{path}: not an sdseg_jax inference bundle "
                          f"(format {meta.get('format')!r})")
  if meta.get("version") != _INFERENCE_VERSION:
    raise CheckpointError(f"{path}: inference bundle version {meta.get('version')!r}, this code "
                          f"reads version {_INFERENCE_VERSION}")
  missing = [k for k in ("unet", "vision_encoder") if k not in tree]
  missing += [k for k in ("scale_factor", "model_config_json", "vae_reference") if k not in meta]
  if missing:
    raise CheckpointError(f"{path}: inference bundle is missing {missing}")
  if meta.get("weights_dtype", "float32") == "bfloat16":
    tree = jax.tree_util.tree_map(_from_bf16_bits, tree)
  return {
      "weights_dtype": meta.get("weights_dtype", "float32"),
      "unet_params": tree["unet"],
      "vision_encoder_params": tree["vision_encoder"],
      "scale_factor": float(meta["scale_factor"]),
      "model_config_json": meta["model_config_json"],
      "vae_reference": meta["vae_reference"],
      "vae_sha256": meta.get("vae_sha256"),
  }
