"""Kvasir-SEG (1000 colonoscopy frames, binary polyp masks) from the official folder layout.

Layout (`kvasir-seg.zip`): `ROOT/images/<id>.jpg` and `ROOT/masks/<id>.jpg` (same id). Masks are
JPEGs with compression noise and are thresholded at > 128 as in the official loader. Sizes vary
per image (332..1920 wide), each mask has its image's size.

Split schemes (`data_config.split`):
  "sdseg"       800/100/100 like the paper's code, but from a SEEDED permutation of the SORTED
                ids instead of an unsorted glob (not reproducible,
                docs/method.md#reproducible-splits).
  "medico2020"  the dataset authors' MediaEval-2020 880/120 split: its 120 are the test set and
                `val_size` ids drawn (seeded) from its 880 are the validation set, so model
                selection never sees test images. The lists come from `ROOT/splits/medico2020`
                or `data_config.split_lists_dir`.
"""

from __future__ import annotations

import pathlib

from sdseg_jax import errors
from sdseg_jax.data import base
from sdseg_jax.data import splits as splits_lib

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def find_pairs(root: pathlib.Path):
  """(pairs by id, images without mask, masks without image)."""
  return base.match_pairs(root / "images", root / "masks", IMAGE_EXTS, IMAGE_EXTS)


def _read_list(path: pathlib.Path) -> list[str]:
  if not path.exists():
    raise base.DataError(f"split list not found: {path}")
  return sorted(pathlib.Path(name).stem for name in path.read_text().split() if name)


def propose_split(data_config, names: list[str]) -> dict[str, list[str]]:
  scheme, seed = data_config.split, int(data_config.split_seed)
  if scheme == "sdseg":
    return splits_lib.seeded_partition(
        names, {"test": int(data_config.test_size), "val": int(data_config.val_size)}, seed)
  if scheme == "medico2020":
    lists = pathlib.Path(data_config.get("split_lists_dir") or
                         pathlib.Path(data_config.root) / "splits" / "medico2020")
    train, test = _read_list(lists / "train.txt"), _read_list(lists / "val.txt")
    out = splits_lib.seeded_partition(train, {"val": int(data_config.val_size)}, seed)
    out["test"] = test
    return out
  raise errors.ConfigError(f"unknown Kvasir-SEG split scheme {scheme!r} (sdseg | medico2020)")


def make_source(data_config, split: str, split_dir: pathlib.Path) -> base.PairedImageSource:
  root = pathlib.Path(data_config.root)
  pairs, _, _ = find_pairs(root)
  names = sorted(pairs)
  info = {"dataset": "kvasir", "split": data_config.split, "seed": int(data_config.split_seed),
          "val_size": int(data_config.val_size), "test_size": int(data_config.test_size)}
  splits = splits_lib.resolve_splits(split_dir, names, lambda: propose_split(data_config, names),
                                     info)
  return base.PairedImageSource([pairs[n] for n in splits[split]], base.binary_mask_fn)
