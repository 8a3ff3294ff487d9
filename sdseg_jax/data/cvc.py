"""CVC-ClinicDB (612 colonoscopy frames 384x288, binary polyp masks).

Layouts read (first match wins):
  ROOT/Original/N.tif + ROOT/Ground Truth/N.tif     official release (TIFF, read with tifffile:
                                                    its RGB frames are tagged BlackIsZero, which
                                                    Pillow cannot open)
  ROOT/Original/N.png + ROOT/Ground Truth/N.png     Kaggle PNG copy given as ROOT (SDSeg's layout)
  ROOT/PNG/{Original,Ground Truth}, ROOT/TIF/...    the Kaggle download as a whole (PNG preferred)
Masks are thresholded at > 128 (a few grey values sit at the edges).

Split schemes (`data_config.split`):
  "sdseg"   492/60/60 as in the paper's code, but from a seeded permutation of the sorted frame
            numbers (the code sliced an unsorted glob). Frame-level: frames of one video can land
            in train and test, as in the original.
  "frames"  by frame number: the last `test_size` frames are test and the `val_size` frames before
            them validation. Frames are stored in video order, so this keeps most videos whole on
            one side. With test_size=62 it has PraNet's 550/62 sizes; PraNet's exact list of 62
            test frames is not reproduced (it is not available here).
"""

from __future__ import annotations

import pathlib

from sdseg_jax import errors
from sdseg_jax.data import base
from sdseg_jax.data import splits as splits_lib

EXTS = (".tif", ".tiff", ".png", ".bmp", ".jpg")
MASK_DIR = "Ground Truth"


def find_layout(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(image folder, mask folder) of whichever supported layout `root` holds."""
  for sub in ("", "PNG", "TIF"):
    base_dir = root / sub if sub else root
    if (base_dir / "Original").is_dir() and (base_dir / MASK_DIR).is_dir():
      return base_dir / "Original", base_dir / MASK_DIR
  raise base.DataError(f"no CVC-ClinicDB layout under {root}: expected 'Original/' and "
                       f"'{MASK_DIR}/' (or PNG/... or TIF/...)")


def find_pairs(root: pathlib.Path):
  images, masks = find_layout(root)
  return base.match_pairs(images, masks, EXTS, EXTS)


def _frame_number(name: str) -> tuple[int, str]:
  return (int(name), name) if name.isdigit() else (1 << 30, name)


def propose_split(data_config, names: list[str]) -> dict[str, list[str]]:
  scheme = data_config.split
  val, test = int(data_config.val_size), int(data_config.test_size)
  if scheme == "sdseg":
    return splits_lib.seeded_partition(names, {"test": test, "val": val},
                                       int(data_config.split_seed))
  if scheme == "frames":
    ordered = sorted(names, key=_frame_number)
    if val + test > len(ordered):
      raise base.DataError(f"val {val} + test {test} > {len(ordered)} frames")
    cut_test, cut_val = len(ordered) - test, len(ordered) - test - val
    return {"train": ordered[:cut_val], "val": ordered[cut_val:cut_test],
            "test": ordered[cut_test:]}
  raise errors.ConfigError(f"unknown CVC-ClinicDB split scheme {scheme!r} (sdseg | frames)")


def make_source(data_config, split: str, split_dir: pathlib.Path) -> base.PairedImageSource:
  pairs, _, _ = find_pairs(pathlib.Path(data_config.root))
  names = sorted(pairs)
  info = {"dataset": "cvc", "split": data_config.split, "seed": int(data_config.split_seed),
          "val_size": int(data_config.val_size), "test_size": int(data_config.test_size)}
  splits = splits_lib.resolve_splits(split_dir, names, lambda: propose_split(data_config, names),
                                     info)
  return base.PairedImageSource([pairs[n] for n in splits[split]], base.binary_mask_fn)
