"""STS-3D tooth CBCT (MICCAI 2023 STS challenge, `labelled.zip`), binary teeth masks.

Layout: `ROOT/[labelled/]image/Teeth_NNNN_0000.nii.gz` + `ROOT/[labelled/]label/<same name>`
(also `images/`+`labels/`). Volume names are the file stems, e.g. `Teeth_0001_0000`.

Intensities: window W1200/L500 (clip [-100, 1100]) then per-volume min-max of the clipped volume
to [0, 1], as SDSeg's preprocessing, for train and test alike.

Deliberate deviations from the official code
(docs/method.md#one-sts-3d-preprocessing-for-all-splits):
  * the same preprocessing for train and test: SDSeg cleaned training labels only (components
    < 64 voxels removed, masked by image != min) and skipped constant slices in training only.
    Here labels are binarised (> 0) everywhere; `clean_labels=True` removes components smaller
    than 64 voxels (26-connectivity) in every split, and no slice is skipped (the constant
    slices outside the field of view are simply easy background examples);
  * the `"class id"` key bug does not exist here (records carry no class id);
  * a held-out validation split: SDSeg validated on its 3 test volumes. "sdseg" keeps its test
    volumes (Teeth_0010..0012) and trains on Teeth_0001..0009 minus `val_size` (seeded)
    validation volumes.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
from scipy import ndimage

from sdseg_jax import errors
from sdseg_jax.data import splits as splits_lib
from sdseg_jax.data import volumes

TRAIN_IDS = tuple(f"Teeth_{i:04d}_0000" for i in range(1, 10))
TEST_IDS = tuple(f"Teeth_{i:04d}_0000" for i in range(10, 13))
MIN_COMPONENT = 64


def binarise_labels(label: np.ndarray, clean: bool) -> np.ndarray:
  """Teeth mask {0, 1}; with `clean`, drops 26-connected components under 64 voxels."""
  mask = label > 0.5
  if clean:
    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n:
      sizes = np.bincount(components.ravel())
      keep = sizes >= MIN_COMPONENT
      keep[0] = False
      mask = keep[components]
  return mask.astype(np.uint8)


def find_cases(root: pathlib.Path) -> tuple[dict[str, volumes.Case], list[str], list[str]]:
  """(cases by name, images without label, labels without image)."""
  for d in (root / "labelled", root):
    for img_dir, lab_dir in (("image", "label"), ("images", "labels")):
      if (d / img_dir).is_dir() and (d / lab_dir).is_dir():
        imgs, labels = volumes.list_nifti(d / img_dir), volumes.list_nifti(d / lab_dir)
        cases = {n: volumes.Case(n, str(imgs[n]), str(labels[n])) for n in imgs if n in labels}
        return (cases, [str(imgs[n]) for n in imgs if n not in labels],
                [str(labels[n]) for n in labels if n not in imgs])
  raise volumes.DataError(f"no STS-3D volumes under {root}: expected [labelled/]image/*.nii.gz "
                          f"and [labelled/]label/*.nii.gz")


def propose_split(data_config, names: list[str] | None = None) -> dict[str, list[str]]:
  del names  # fixed published volume lists
  if data_config.split != "sdseg":
    raise errors.ConfigError(f"unknown STS-3D split scheme {data_config.split!r} (sdseg)")
  out = splits_lib.seeded_partition(list(TRAIN_IDS), {"val": int(data_config.val_size)},
                                    int(data_config.split_seed))
  out["test"] = list(TEST_IDS)
  return out


def make_source(data_config, split: str, split_dir: pathlib.Path) -> volumes.VolumeSliceSource:
  cases, _, _ = find_cases(pathlib.Path(data_config.root))
  info = {"dataset": "sts3d", "split": data_config.split, "seed": int(data_config.split_seed),
          "val_size": int(data_config.val_size)}
  splits = splits_lib.resolve_splits(split_dir, list(cases),
                                     lambda: propose_split(data_config, list(cases)), info)
  level, width = float(data_config.window_level), float(data_config.window_width)
  window = volumes.Window(level - width / 2, level + width / 2, minmax=True)
  clean = bool(data_config.get("clean_labels", False))
  cache = volumes.cache_dir(data_config, split_dir)
  return volumes.VolumeSliceSource(
      [cases[n] for n in splits[split]], cache, window,
      functools.partial(binarise_labels, clean=clean), label_key=f"sts3d:clean={clean}")
