"""The folder source: each dataset read from its own download layout, never from a TFDS build.

Kept apart from `registry` (which dispatches between this and the TFDS format) because the TFDS
builders read their records through it too: registry -> tfds_build -> folder, with no cycle.
Dataset modules are imported lazily so that e.g. a Kvasir run never imports nibabel.

Where the data may live: a folder layout (PNG/JPG/TIFF/NIfTI read by PIL and nibabel, listed
and opened at random) must be on local disk; a `gs://` data.root fails in `check_location` with
the copy command.
"""

from __future__ import annotations

import importlib

from sdseg_jax import errors
from sdseg_jax import storage
from sdseg_jax.data.base import DataError

NAMES = ("kvasir", "cvc", "refuge", "btcv", "sts3d", "synthetic")


def check_location(data_config) -> None:
  """Folder layouts must be local; a gs:// TFDS build must be in a reachable bucket.

  Raises:
    DataError: a gs:// data.root with a folder layout (says how to copy it).
    storage.StorageError: a malformed gs:// path, a missing bucket or missing credentials.
  """
  if data_config.name == "synthetic":
    return
  fmt = data_config.get("format", "folder")
  root = str(data_config.get("root") or "")
  if fmt == "folder" and root:
    storage.path(root)  # rejects mistyped URLs such as gs:/bucket/data
    if storage.is_remote(root):
      local = f"/data/{storage.path(root).name}"
      raise DataError(
          f"data.root={root}: the {data_config.name} folder layout is read from local disk "
          f"(PIL/nibabel, random access), not from a bucket. Copy it to every host first, e.g. "
          f"`gcloud storage cp -r {root} /data/` and --config.data.root={local}, or build an "
          f"ArrayRecord copy once (python -m sdseg_jax.data.tfds_build) and train with "
          f"data.format='tfds' and data.tfds_data_dir=gs://...")
  tfds_dir = str(data_config.get("tfds_data_dir") or "")
  if fmt == "tfds" and tfds_dir:
    storage.check_bucket(storage.path(tfds_dir), write=False)


def make_source(data_config, split: str, split_dir: storage.PathLike):
  """Source reading the dataset's own folder layout (never TFDS)."""
  name = data_config.name
  if name not in NAMES:
    raise errors.ConfigError(f"unknown dataset {name!r}; expected one of {NAMES}")
  if name == "synthetic":
    from sdseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.make_source(data_config, split)
  check_location(data_config)
  module = importlib.import_module(f"sdseg_jax.data.{name}")
  return module.make_source(data_config, split, storage.path(split_dir))
