"""REFUGE / REFUGE2 fundus images with optic disc + cup masks (SDSeg segments the CUP).

Layouts (`data_config.layout`, "auto" tries "cropped" then "official"):
  official  the challenge zips unpacked under ROOT, e.g.
              Training400/{Glaucoma,Non-Glaucoma}/g0001.jpg, n0001.jpg
              Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/g0001.bmp
              REFUGE-Validation400/V0001.jpg + REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp
              Test400/T0001.jpg + <any folder>/Disc_Cup_Masks/T0001.bmp
            Images are found recursively outside mask folders and paired with the
            `Disc_Cup_Masks` file of the same stem (names are unique across REFUGE), so the exact
            top-level folder names of the various mirrors do not matter.
            Mask coding: 0 cup, 128 disc outside the cup, 255 background.
  cropped   ROOT/images/<name>.png + ROOT/masks/<name>.png: disc-centred crops, from
            `python -m sdseg_jax.data.refuge_crop` (grey masks, official coding) or SDSeg's
            MNet_DeepCDR crops (RGB masks: R = 255 disc, G = 255 cup).
Both become the label map 0 background, 1 disc outside the cup, 2 cup; `target` picks "cup"
(default) or "disc". Full fundus images (official layout) are 2124x2056 / 1634x1634: SDSeg trains
on disc-centred crops, so make them first with `refuge_crop`.

Split schemes (by the REFUGE name prefix: g/n = Training400, V = Validation400, T = Test400):
  "challenge"  train g*/n* (400), val V* (400), test T* (400): the challenge's own split.
  "sdseg"      train = g*, n*, V* (800) minus `val_size` seeded images held out for validation,
               test T* (400). SDSeg itself validated on the test set
               (docs/method.md#model-selection-on-a-validation-split).
Names with another prefix (new REFUGE2 images) go to train.
"""

from __future__ import annotations

import pathlib

import numpy as np

from sdseg_jax import errors
from sdseg_jax.data import base
from sdseg_jax.data import splits as splits_lib

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif")
MASK_EXTS = (".bmp", ".png")
MASK_FOLDER = "Disc_Cup_Masks"


def label_map_from_mask(arr: np.ndarray) -> np.ndarray:
  """REFUGE mask -> label map {0 bg, 1 disc rim, 2 cup}.

  Grey masks use the official coding (cup 0, rim 128, bg 255; thresholds 100/200 as in
  MNet_DeepCDR's crop script); RGB masks use MNet's crop output (R disc, G cup).
  """
  if arr.ndim == 3 and not (np.array_equal(arr[..., 0], arr[..., 1]) and
                            np.array_equal(arr[..., 1], arr[..., 2])):
    disc, cup = arr[..., 0] > 127, arr[..., 1] > 127
  else:
    grey = arr if arr.ndim == 2 else arr[..., 0]
    disc, cup = grey < 200, grey < 100
  return (disc.astype(np.uint8) + (cup & disc).astype(np.uint8))


def _find_official(root: pathlib.Path):
  def is_mask_path(p: pathlib.Path) -> bool:
    return MASK_FOLDER in p.parts or any(s.endswith("-GT") or s.startswith("Annotation")
                                         for s in p.relative_to(root).parts[:-1])
  images, masks = {}, {}
  dups = []
  for p in sorted(root.rglob("*")):
    if not p.is_file() or p.name.startswith("."):
      continue
    suffix = p.suffix.lower()
    if MASK_FOLDER in p.parts and suffix in MASK_EXTS:
      found = masks
    elif suffix in IMAGE_EXTS and not is_mask_path(p):
      found = images
    else:
      continue
    if p.stem in found:
      dups.append(str(p))
    found.setdefault(p.stem, p)
  if dups:
    raise base.DataError(f"REFUGE names must be unique; duplicates: {dups[:10]}")
  pairs = {n: base.Pair(n, str(images[n]), str(masks[n])) for n in sorted(images) if n in masks}
  no_mask = [str(images[n]) for n in sorted(images) if n not in masks]
  no_image = [str(masks[n]) for n in sorted(masks) if n not in images]
  return pairs, no_mask, no_image


def find_pairs(root: pathlib.Path, layout: str = "auto"):
  """(pairs by name, images without mask, masks without image)."""
  cropped = (root / "images").is_dir() and (root / "masks").is_dir()
  if layout == "cropped" or (layout == "auto" and cropped):
    return base.match_pairs(root / "images", root / "masks", IMAGE_EXTS, MASK_EXTS)
  if layout in ("official", "auto"):
    found = _find_official(root)
    if not found[0] and not found[1]:
      raise base.DataError(f"no REFUGE images found under {root} (official or cropped layout)")
    return found
  raise errors.ConfigError(f"unknown REFUGE layout {layout!r} (auto | official | cropped)")


def _group(name: str) -> str:
  first = name[:1]
  return {"T": "test", "V": "val"}.get(first, "train")


def propose_split(data_config, names: list[str]) -> dict[str, list[str]]:
  groups = {s: sorted(n for n in names if _group(n) == s) for s in splits_lib.SPLITS}
  if data_config.split == "challenge":
    return groups
  if data_config.split == "sdseg":
    pool = groups["train"] + groups["val"]
    out = splits_lib.seeded_partition(pool, {"val": int(data_config.val_size)},
                                      int(data_config.split_seed))
    out["test"] = groups["test"]
    return out
  raise errors.ConfigError(f"unknown REFUGE split scheme {data_config.split!r} (challenge | sdseg)")


def make_source(data_config, split: str, split_dir: pathlib.Path) -> base.PairedImageSource:
  pairs, _, _ = find_pairs(pathlib.Path(data_config.root), data_config.get("layout", "auto"))
  names = sorted(pairs)
  info = {"dataset": "refuge", "split": data_config.split, "seed": int(data_config.split_seed),
          "val_size": int(data_config.val_size)}
  splits = splits_lib.resolve_splits(split_dir, names, lambda: propose_split(data_config, names),
                                     info)
  return base.PairedImageSource([pairs[n] for n in splits[split]], label_map_from_mask)
