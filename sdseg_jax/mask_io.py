"""Reading and writing segmentation masks, label maps and probability maps.

Why this module exists: evaluation must accept whatever the user (or another method) saved —
0/255 PNGs, JPEG masks with compression noise, RGB masks, 16-bit TIFFs, float maps, NIfTI
volumes — and turn each into the *same* boolean mask the metrics expect. The rules, in one place:

* 2D images (PNG/JPG/BMP/TIFF, via Pillow) are binarised at half their value range:
  uint8 > 127, uint16 (and Pillow's 32-bit "I" mode used for 16-bit files) > 32767,
  float > 0.5, bool/1-bit as is. Colour images are foreground where *any* colour channel passes
  (so red, green or white masks all work; alpha is ignored). Two exceptions, because thresholding
  would silently produce empty masks: integer images whose values are all in {0, 1} (0/1-coded
  masks) and palette ("P") images (values are class indices) are binarised with > 0.
* `label_map=True` returns the stored integer values instead (single-channel, or colour with equal
  channels).
* NIfTI (.nii/.nii.gz, via nibabel) is read as stored (no reorientation), binarised with > 0 (NIfTI
  masks are label volumes), with the voxel spacing from the header zooms, the spatial unit, the
  affine and the header, so that predictions can be written back aligned with their source.
* Every read failure raises `MaskReadError` naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import tempfile
from typing import Any, Optional, Union

import nibabel as nib
import numpy as np
from PIL import Image

from sdseg_jax import errors
from sdseg_jax import storage

PathLike = Union[str, pathlib.Path]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MASK_SUFFIXES = NIFTI_SUFFIXES + IMAGE_SUFFIXES


class MaskReadError(errors.UserFacingError, ValueError):
  """A mask file is missing, unreadable, corrupt or of an unsupported kind."""


@dataclasses.dataclass(frozen=True)
class LoadedMask:
  """A mask (bool) or label map (int) plus what is needed to measure and re-save it.

  spacing: voxel size per array axis (NIfTI only; None for 2D images = pixel units).
  units: "pixels" for images; the NIfTI spatial unit ("mm", "micron", "meter", or "unknown").
  affine/header: NIfTI geometry, None for images.
  """
  array: np.ndarray
  path: pathlib.Path
  spacing: Optional[tuple[float, ...]] = None
  units: str = "pixels"
  affine: Optional[np.ndarray] = None
  header: Any = None


def split_suffix(path: PathLike) -> tuple[str, str]:
  """Returns (name without mask suffix, lower-case suffix), treating ".nii.gz" as one suffix."""
  name = pathlib.Path(path).name
  lower = name.lower()
  for suffix in MASK_SUFFIXES:
    if lower.endswith(suffix):
      return name[:-len(suffix)], suffix
  return pathlib.Path(name).stem, pathlib.Path(name).suffix.lower()


def is_mask_file(path: PathLike) -> bool:
  """True for a regular file with one of the supported image/NIfTI suffixes."""
  path = pathlib.Path(path)
  return path.is_file() and split_suffix(path)[1] in MASK_SUFFIXES


# ----------------------------------------------------------------------------------------------
# Reading.


def _read_pillow(path: pathlib.Path) -> tuple[np.ndarray, str]:
  """Decodes an image fully (so truncated files fail here) and returns (array, Pillow mode)."""
  with Image.open(path) as image:
    image.load()
    mode = image.mode
    if mode in ("LA", "RGBA", "PA"):
      image = image.convert({"LA": "L", "RGBA": "RGB", "PA": "P"}[mode])
      mode = image.mode
    if mode not in ("1", "L", "P", "RGB", "I", "I;16", "I;16B", "I;16L", "F"):
      image = image.convert("RGB")
      mode = "RGB"
    return np.array(image), mode


def binarize_image(array: np.ndarray, mode: str = "") -> np.ndarray:
  """Thresholds an image array at half its value range (see module docstring) -> bool (H, W)."""
  array = np.asarray(array)
  if array.dtype == bool:
    fg = array
  elif mode == "P":
    fg = array > 0
  elif np.issubdtype(array.dtype, np.floating):
    fg = array > 0.5
  elif np.issubdtype(array.dtype, np.integer):
    if array.size and array.min() >= 0 and array.max() <= 1:
      fg = array > 0  # 0/1-coded mask: a half-range threshold would empty it
    elif array.dtype == np.uint8:
      fg = array > 127
    else:
      fg = array > 32767  # uint16, or Pillow's int32 "I" mode that 16-bit files decode to
  else:
    raise ValueError(f"unsupported image dtype {array.dtype}")
  return fg.any(axis=-1) if fg.ndim == 3 else fg


def _to_int_labels(array: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """Casts to int64, refusing float data that are not whole numbers (probabilities, intensities)."""
  array = np.asarray(array)
  if np.issubdtype(array.dtype, np.floating):
    if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
      raise MaskReadError(f"{path}: float data with non-integer values is not a label map")
  return array.astype(np.int64)


def _image_label_map(array: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """Single-channel class indices from an image (colour allowed only with equal channels)."""
  if array.ndim == 3:
    if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, array.shape[-1])):
      raise MaskReadError(f"{path}: colour image with differing channels cannot be read as a "
                          "label map (convert it to single-channel class indices first)")
    array = array[..., 0]
  return _to_int_labels(array, path)


def _read_image_mask(path: pathlib.Path, label_map: bool) -> LoadedMask:
  array, mode = _read_pillow(path)
  if label_map:
    return LoadedMask(_image_label_map(array, path), path)
  return LoadedMask(binarize_image(array, mode), path)


def _read_nifti_mask(path: pathlib.Path, label_map: bool) -> LoadedMask:
  image = nib.load(str(path))
  data = np.asanyarray(image.dataobj)  # as stored; no canonical reorientation
  spacing = tuple(float(z) for z in image.header.get_zooms()[:data.ndim])
  units = image.header.get_xyzt_units()[0] or "unknown"
  array = _to_int_labels(data, path) if label_map else np.asarray(data) > 0
  return LoadedMask(array, path, spacing, units, image.affine, image.header)


def read_mask(path: PathLike, label_map: bool = False) -> LoadedMask:
  """Reads a mask (bool) or, with label_map=True, a label map (int64) from an image or NIfTI file.

  Raises:
    MaskReadError: the file is missing, unreadable, corrupt or of an unsupported type.
  """
  path = pathlib.Path(path)
  suffix = split_suffix(path)[1]
  if suffix not in MASK_SUFFIXES:
    raise MaskReadError(f"{path}: unsupported mask file type {suffix!r} "
                        f"(supported: {', '.join(MASK_SUFFIXES)})")
  if not path.is_file():
    raise MaskReadError(f"{path}: no such file")
  try:
    if suffix in NIFTI_SUFFIXES:
      return _read_nifti_mask(path, label_map)
    return _read_image_mask(path, label_map)
  except MaskReadError:
    raise
  except Exception as e:  # Pillow/nibabel/zlib raise many types for corrupt files.
    raise MaskReadError(f"{path}: cannot read mask file ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Writing.


def _save_png(path: PathLike, image: Image.Image) -> None:
  """Encodes in memory (format from the suffix, PNG by default), then writes atomically to a
  local path or gs:// (storage.py)."""
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  encoded = io.BytesIO()
  image.save(encoded, format=Image.registered_extensions().get(suffix, "PNG"))
  storage.write_bytes_atomic(path, encoded.getvalue())


def write_mask_png(path: PathLike, mask: np.ndarray) -> None:
  """Writes a 2D mask (values > 0 are foreground) as an 8-bit 0/255 PNG, readable by any viewer."""
  mask = np.asarray(mask) > 0
  if mask.ndim != 2:
    raise ValueError(f"expected a 2D mask, got shape {mask.shape}")
  _save_png(path, Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))


def write_label_png(path: PathLike, labels: np.ndarray) -> None:
  """Writes a 2D label map of class indices (0..65535) as an 8- or 16-bit PNG."""
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f"expected a 2D label map, got shape {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() > 65535):
    raise ValueError("label values must lie in 0..65535 to be stored in a PNG")
  dtype = np.uint8 if (not labels.size or labels.max() <= 255) else np.uint16
  _save_png(path, Image.fromarray(labels.astype(dtype)))


def probability_to_uint8(probs: np.ndarray) -> np.ndarray:
  """Maps probabilities in [0, 1] to 0..255 (clipped, rounded to nearest)."""
  return np.round(np.clip(np.asarray(probs, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def write_probability_png(path: PathLike, probs: np.ndarray, rgb: bool = False) -> None:
  """Writes a 2D probability map as an 8-bit PNG (p*255); rgb=True replicates it to 3 channels.

  The RGB form matches the official `*-logits.png` files used by the stability protocol, whose
  reader converts to RGB anyway; both forms score identically there.
  """
  probs = np.asarray(probs)
  if probs.ndim != 2:
    raise ValueError(f"expected a 2D probability map, got shape {probs.shape}")
  u8 = probability_to_uint8(probs)
  image = Image.fromarray(np.stack([u8] * 3, axis=-1) if rgb else u8)
  _save_png(path, image)


def write_nifti(path: PathLike, array: np.ndarray, reference: Optional[Union[PathLike, Any]] = None,
                affine: Optional[np.ndarray] = None) -> None:
  """Writes a volume as NIfTI, copying affine and header from `reference` when given.

  Args:
    path: output .nii or .nii.gz file.
    array: data in the reference's stored axis order (e.g. a mask predicted from `read_mask`).
    reference: a NIfTI path, a nibabel image, or a `LoadedMask` of a NIfTI file; its affine,
      header (spacing, units, orientation codes) are preserved. The data type follows `array`.
    affine: used when there is no reference (default: identity).
  """
  array = np.asarray(array)
  if array.dtype == bool:
    array = array.astype(np.uint8)
  header = None
  if reference is not None:
    if isinstance(reference, LoadedMask):
      affine, header = reference.affine, reference.header
    else:
      ref = reference if hasattr(reference, "affine") else nib.load(str(reference))
      affine, header = ref.affine, ref.header
    if header is not None:
      header = header.copy()
      header.set_data_dtype(array.dtype)
  image = nib.Nifti1Image(array, np.eye(4) if affine is None else affine, header=header)
  target = storage.path(path)
  if not storage.is_remote(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, os.fspath(target))
    return
  with tempfile.TemporaryDirectory() as tmp:  # nibabel writes (and gzips) files by name
    local = os.path.join(tmp, target.name)
    nib.save(image, local)
    with open(local, "rb") as f:
      storage.write_bytes_atomic(target, f.read())
