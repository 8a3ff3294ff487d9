"""`make_source(data_config, split, split_dir)`: the one entry point from configs to data sources.

Dispatches on `data_config.name` and `data_config.format` ("folder": read the user's download
directly, the zero-setup default; "tfds": read the ArrayRecord files built by
`python -m sdseg_jax.data.tfds_build`). Dataset modules are imported lazily so that e.g. a
Kvasir run never imports nibabel.
"""

from __future__ import annotations

import importlib
import pathlib

from sdseg_jax.data.splits import SPLITS

NAMES = ("kvasir", "cvc", "refuge", "btcv", "sts3d", "synthetic")


def folder_source(data_config, split: str, split_dir: pathlib.Path):
  """Source reading the dataset's own folder layout (never TFDS)."""
  name = data_config.name
  if name not in NAMES:
    raise ValueError(f"unknown dataset {name!r}; expected one of {NAMES}")
  if name == "synthetic":
    from sdseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.make_source(data_config, split)
  module = importlib.import_module(f"sdseg_jax.data.{name}")
  return module.make_source(data_config, split, pathlib.Path(split_dir))


def make_source(data_config, split: str, split_dir: pathlib.Path):
  """Random-access source of raw records (see `base.py`) for `split` in train/val/test."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  fmt = data_config.get("format", "folder")
  if fmt == "folder" or data_config.name == "synthetic":
    return folder_source(data_config, split, split_dir)
  if fmt == "tfds":
    from sdseg_jax.data import tfds_build  # pylint: disable=g-import-not-at-top
    return tfds_build.make_source(data_config, split, pathlib.Path(split_dir))
  raise ValueError(f"unknown data format {fmt!r} (folder | tfds)")
