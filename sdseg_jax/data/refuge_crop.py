r"""Disc-centred square crops of REFUGE fundus images (SDSeg trains on such crops).

  python -m sdseg_jax.data.refuge_crop --root REFUGE_DIR --out CROP_DIR [--crop_size 800] \
      [--centres centres.csv]

Writes CROP_DIR/images/<name>.png and CROP_DIR/masks/<name>.png (grey, official coding: 0 cup,
128 disc rim, 255 background), which `refuge.py` reads with `layout="cropped"`.

ORACLE CROP WARNING: without --centres the crop is centred on the ANNOTATED optic disc (the
centroid of the ground-truth disc mask), for test images too. That leaks ground-truth location
into the input: results on such crops are optimistic compared with a real pipeline, where a
disc detector (SDSeg used MNet_DeepCDR's U-Net) finds the centre. For fair test numbers give a
CSV of detected centres (`name,x,y` in pixels of the original image, header optional).

Crops that run past the image border are padded (image black, mask background).
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import numpy as np
from PIL import Image

from sdseg_jax.data import base
from sdseg_jax.data import refuge


def read_centres(path: pathlib.Path) -> dict[str, tuple[float, float]]:
  """`name,x,y` rows (a header row is skipped) -> {name: (x, y)}."""
  centres = {}
  with open(path, newline="") as f:
    for row in csv.reader(f):
      if len(row) < 3 or not row[0].strip():
        continue
      try:
        centres[pathlib.Path(row[0].strip()).stem] = (float(row[1]), float(row[2]))
      except ValueError:
        continue  # header
  return centres


def disc_centre(label_map: np.ndarray) -> tuple[float, float]:
  """(x, y) centroid of the annotated disc (labels >= 1): the oracle centre."""
  ys, xs = np.nonzero(label_map >= 1)
  if len(xs) == 0:
    raise base.DataError("mask has no optic disc: cannot centre the crop")
  return float(xs.mean()), float(ys.mean())


def crop(arr: np.ndarray, centre: tuple[float, float], size: int, fill: int) -> np.ndarray:
  """size x size window centred on (x, y), padded with `fill` outside the array."""
  x0 = int(round(centre[0])) - size // 2
  y0 = int(round(centre[1])) - size // 2
  out = np.full((size, size) + arr.shape[2:], fill, dtype=arr.dtype)
  h, w = arr.shape[:2]
  sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
  if sx1 > sx0 and sy1 > sy0:
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = arr[sy0:sy1, sx0:sx1]
  return out


def label_map_to_grey(label_map: np.ndarray) -> np.ndarray:
  """Inverse of the official coding: 0 bg -> 255, 1 rim -> 128, 2 cup -> 0."""
  return np.array([255, 128, 0], dtype=np.uint8)[label_map]


def make_crops(root: pathlib.Path, out: pathlib.Path, crop_size: int,
               centres: dict[str, tuple[float, float]] | None = None) -> int:
  """Crops every image/mask pair of the official layout; returns the number written."""
  pairs, _, _ = refuge.find_pairs(root, "official")
  (out / "images").mkdir(parents=True, exist_ok=True)
  (out / "masks").mkdir(parents=True, exist_ok=True)
  missing = [n for n in pairs if centres is not None and n not in centres]
  if missing:
    raise base.DataError(f"--centres has no row for {len(missing)} images: {missing[:10]}")
  for name, pair in pairs.items():
    image = base.read_rgb(pair.image)
    label_map = refuge.label_map_from_mask(base.read_array(pair.mask))
    centre = centres[name] if centres is not None else disc_centre(label_map)
    Image.fromarray(crop(image, centre, crop_size, 0)).save(out / "images" / f"{name}.png")
    Image.fromarray(label_map_to_grey(crop(label_map, centre, crop_size, 0))).save(
        out / "masks" / f"{name}.png")
  return len(pairs)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description="Disc-centred REFUGE crops. ORACLE CROP: without --centres the crop is "
                  "centred on the ANNOTATED disc (ground truth), which flatters test results; "
                  "pass detected centres with --centres for a fair protocol.")
  parser.add_argument("--root", required=True, type=pathlib.Path,
                      help="REFUGE download (official layout)")
  parser.add_argument("--out", required=True, type=pathlib.Path, help="output folder")
  parser.add_argument("--crop_size", type=int, default=800,
                      help="square crop side in original pixels (SDSeg's author: 600-800)")
  parser.add_argument("--centres", type=pathlib.Path, default=None,
                      help="CSV name,x,y of disc centres (e.g. from a detector); "
                           "default: oracle centre of the annotated disc")
  args = parser.parse_args(argv)
  centres = read_centres(args.centres) if args.centres else None
  if centres is None:
    print("refuge_crop: ORACLE crops centred on the annotated disc (see --help)",
          file=sys.stderr)
  n = make_crops(args.root, args.out, args.crop_size, centres)
  print(f"wrote {n} crops of {args.crop_size}x{args.crop_size} to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
