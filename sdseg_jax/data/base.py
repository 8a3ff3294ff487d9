"""Raw-record contract, image readers and the paired-image source shared by the 2D datasets.

Every data source in this package is a grain-compatible random-access source: `__len__` and
`__getitem__(i)` returning one raw record, and picklable (it holds only paths and small lists),
so grain worker processes can rebuild it. A raw record is

  {"image": uint8 (H, W, 3) RGB, or float32 (H, W, 3) in [0, 1] for windowed CT/CBCT slices,
   "mask": uint8 (H, W) label map, 0 = background ({0, 1} for binary sets),
   "name": str, unique id of the sample (image id, or "<volume>_slice<k>"),
   "case": str, image id for 2D sets, volume id for 3D sets,
   "slice": int, -1 for 2D sets}

Keeping decoding (here) apart from resizing/normalisation (`transforms.py`) is what lets the TFDS
source store exactly these records and be checked against the folder source bit for bit.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from sdseg_jax import errors

Record = dict[str, Any]

# Mask binarisation threshold of the official SDSeg loaders (`mask > 128`).
MASK_THRESHOLD = 128


class DataError(errors.UserFacingError, ValueError):
  """A dataset on disk does not match what a source expects; the message names the files."""


def _open_tiff(path: pathlib.Path) -> np.ndarray:
  # The official CVC-ClinicDB TIFFs are 3-sample images tagged "BlackIsZero", which Pillow
  # refuses to identify; tifffile reads them (and every other baseline TIFF) as plain arrays.
  try:
    import tifffile  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the environment.
    raise ImportError("reading .tif files needs the `tifffile` package "
                      "(pip install tifffile)") from e
  return np.asarray(tifffile.imread(str(path)))


def read_array(path: str | pathlib.Path) -> np.ndarray:
  """Decodes an image file into a uint8 array (H, W) or (H, W, C), whatever its format.

  A file that cannot be decoded is a DataError naming it. Training reads files lazily, epoch
  after epoch, so a file that passed the pre-training check can still be truncated or deleted
  later (a sync job, a full disk); the decoders' own errors ("image file is truncated") do not
  say which of thousands of files it was.
  """
  path = pathlib.Path(path)
  try:
    if path.suffix.lower() in (".tif", ".tiff"):
      arr = _open_tiff(path)
    else:
      with Image.open(path) as im:
        # Palette and 16-bit files are rare in these datasets; normalise them to L/RGB.
        if im.mode not in ("L", "RGB", "RGBA"):
          im = im.convert("RGB" if "A" in im.mode or im.mode == "P" else "L")
        arr = np.asarray(im)
  except ImportError:
    raise
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
    raise DataError(f"{path}: cannot read or decode the file ({type(e).__name__}: {e}); "
                    "is it truncated or corrupt?") from e
  if arr.dtype != np.uint8:
    raise DataError(f"{path}: expected 8-bit pixels, got {arr.dtype}")
  return arr


def read_rgb(path: str | pathlib.Path) -> np.ndarray:
  """Reads an image as uint8 (H, W, 3) RGB; grayscale is replicated, alpha dropped."""
  arr = read_array(path)
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  return np.ascontiguousarray(arr[..., :3])


def threshold_mask(gray: np.ndarray, threshold: int = MASK_THRESHOLD) -> np.ndarray:
  """Binary {0, 1} uint8 mask from a grey mask; JPEG/TIFF masks carry noise at the edges."""
  return (gray > threshold).astype(np.uint8)


def image_size(path: str | pathlib.Path) -> tuple[int, int]:
  """(width, height) from the file header only, without decoding pixels (fast integrity checks)."""
  path = pathlib.Path(path)
  if path.suffix.lower() in (".tif", ".tiff"):
    import tifffile  # pylint: disable=g-import-not-at-top
    with tifffile.TiffFile(str(path)) as tif:
      shape = tif.pages[0].shape
    return int(shape[1]), int(shape[0])
  with Image.open(path) as im:
    return im.size


@dataclasses.dataclass(frozen=True)
class Pair:
  """One 2D sample on disk."""
  name: str
  image: str
  mask: str


class PairedImageSource:
  """Random-access source over (image file, mask file) pairs of a 2D dataset.

  `mask_fn` turns the decoded grey/RGB mask array into the label map (e.g. a > 128 threshold, or
  REFUGE's grey-level coding); it must be a module-level function so the source pickles.
  """

  def __init__(self, pairs: Sequence[Pair], mask_fn: Callable[[np.ndarray], np.ndarray]):
    self._pairs = list(pairs)
    self._mask_fn = mask_fn

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> Record:
    pair = self._pairs[index]
    image = read_rgb(pair.image)
    mask = self._mask_fn(read_array(pair.mask))
    if mask.shape != image.shape[:2]:
      raise DataError(f"{pair.mask}: mask size {mask.shape[::-1]} != image size "
                      f"{image.shape[1::-1]} of {pair.image}")
    return {"image": image, "mask": mask, "name": pair.name, "case": pair.name, "slice": -1}

  @property
  def pairs(self) -> list[Pair]:
    return list(self._pairs)

  @property
  def names(self) -> list[str]:
    return [p.name for p in self._pairs]

  def __repr__(self) -> str:
    return f"{type(self).__name__}(n={len(self)})"


def binary_mask_fn(arr: np.ndarray) -> np.ndarray:
  """Mask function of the binary polyp sets: first channel > 128."""
  return threshold_mask(arr if arr.ndim == 2 else arr[..., 0])


def match_pairs(image_dir: pathlib.Path, mask_dir: pathlib.Path, image_exts: Sequence[str],
                mask_exts: Sequence[str]) -> tuple[dict[str, Pair], list[str], list[str]]:
  """Pairs images and masks by file stem, SORTED by name.

  Returns (pairs by name, image files without mask, mask files without image); the two lists
  let the integrity check name every orphan instead of silently dropping it.
  """
  def index(folder: pathlib.Path, exts: Sequence[str]) -> dict[str, pathlib.Path]:
    if not folder.is_dir():
      raise DataError(f"folder not found: {folder}")
    found = {}
    for p in sorted(folder.iterdir()):
      if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
        found[p.stem] = p
    return found

  images, masks = index(image_dir, image_exts), index(mask_dir, mask_exts)
  pairs = {n: Pair(n, str(images[n]), str(masks[n])) for n in sorted(images) if n in masks}
  no_mask = [str(images[n]) for n in sorted(images) if n not in masks]
  no_image = [str(masks[n]) for n in sorted(masks) if n not in images]
  return pairs, no_mask, no_image
