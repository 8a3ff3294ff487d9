"""`make_source(data_config, split, split_dir)`: the one entry point from configs to data sources.

Dispatches on `data_config.format`: "folder" reads the user's download directly (`folder.py`,
the zero-setup default); "tfds" reads the ArrayRecord files built by
`python -m sdseg_jax.data.tfds_build`. A TFDS build (data.format="tfds") may sit in a bucket
(data.tfds_data_dir=gs://): each host stages its ArrayRecord files to local disk once
(tfds_build.make_source). The run's split files (WORKDIR/splits) may be in a gs:// workdir.
"""

from __future__ import annotations

from sdseg_jax import errors
from sdseg_jax import storage
from sdseg_jax.data import folder
from sdseg_jax.data.splits import SPLITS

# Re-exported: the config check and the trainer ask the registry which datasets exist and
# where their data may live.
NAMES = folder.NAMES
check_location = folder.check_location


def make_source(data_config, split: str, split_dir: storage.PathLike):
  """Random-access source of raw records (see `base.py`) for `split` in train/val/test."""
  if split not in SPLITS:
    raise errors.ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
  fmt = data_config.get("format", "folder")
  if fmt == "folder" or data_config.name == "synthetic":
    return folder.make_source(data_config, split, split_dir)
  if fmt == "tfds":
    from sdseg_jax.data import tfds_build  # pylint: disable=g-import-not-at-top
    return tfds_build.make_source(data_config, split, storage.path(split_dir))
  raise errors.ConfigError(f"unknown data format {fmt!r} (folder | tfds)")
