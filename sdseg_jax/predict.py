"""Label-free inference with a trained run on a folder (or one file) of images or volumes.

  python -m sdseg_jax.predict --workdir DIR --input PATH --output DIR
      [--checkpoint best|last|STEP|export] [--tta none|flip] [--batch-size 8] [--seed 0]
      [--threshold 0.5]

Inputs: PNG / JPG / TIFF / BMP images (8-bit, grey or colour) and NIfTI volumes (.nii, .nii.gz).
What happens to each, and why:
  * 2D: resized to the model size with the run's interpolation (as in training), predicted with
    one reverse step, and the probability is upsampled (bilinear) back to the ORIGINAL size and
    thresholded THERE, so masks align with the input pixel for pixel (thresholding first and
    upsampling a binary mask would give blocky edges).
  * 3D: axial slices (the last voxel axis, the training slicing) are windowed with the run's
    dataset rule (BTCV: fixed HU window; STS-3D: CBCT window + per-volume min-max; other runs:
    per-volume min-max), predicted in batches, upsampled to the in-plane size and stacked back.
    Outputs are written with the input's affine and header, so spacing, orientation and origin
    are preserved and the masks overlay the scan in any viewer.
  * Class-embedding runs write label maps (argmax of the upsampled class probabilities) instead
    of binary masks; the probability map is then the foreground probability 1 - p(background).
Noise: one z_T per run from --seed, shared by every image (the official protocol), so a result
does not depend on the batch size. --tta flip averages the probabilities of the identity,
horizontal-flip and vertical-flip views with the flips undone (one batched call).

Outputs under --output: masks/<name>.png|.nii[.gz] (0/255 PNG or uint8 NIfTI; label maps for
multi-class runs), probabilities/<name>.png|.nii[.gz] (uint8 p*255 PNG, float32 NIfTI),
overlays/<name>.png (2D only) and predictions.json (inputs, sizes, run and settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import pathlib
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from etils import epath
import jax
import numpy as np
from PIL import Image

from sdseg_jax import inference
from sdseg_jax import mask_io
from sdseg_jax import restore
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import storage
from sdseg_jax.data import base as data_base
from sdseg_jax.data import transforms
from sdseg_jax.data import volumes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
TTA_CHOICES = ("none", "flip")


class PredictError(ValueError):
  """An input cannot be predicted (missing, unreadable, unsupported); the message names it."""


# ---- inputs --------------------------------------------------------------------------------------


def _suffix(path: pathlib.Path) -> str:
  lower = path.name.lower()
  for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
    if lower.endswith(suffix):
      return suffix
  return ""


def _stem(path: pathlib.Path) -> str:
  return path.name[:-len(_suffix(path))] if _suffix(path) else path.stem


def list_inputs(path: pathlib.Path) -> List[pathlib.Path]:
  """The supported files of a folder (sorted, not recursive, hidden files skipped) or one file."""
  path = pathlib.Path(path)
  if path.is_file():
    if not _suffix(path):
      raise PredictError(f"{path}: unsupported file type (supported: "
                         f"{', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)})")
    return [path]
  if not path.is_dir():
    raise PredictError(f"{path}: no such file or directory")
  files = [p for p in sorted(path.iterdir())
           if p.is_file() and not p.name.startswith(".") and _suffix(p)]
  if not files:
    raise PredictError(f"{path}: no PNG/JPG/TIFF/BMP images or NIfTI volumes found")
  stems: Dict[str, pathlib.Path] = {}
  for p in files:
    if _stem(p) in stems:
      raise PredictError(f"{stems[_stem(p)]} and {p} would write the same outputs "
                         f"({_stem(p)!r}); rename one")
    stems[_stem(p)] = p
  return files


def read_image(path: pathlib.Path) -> np.ndarray:
  """uint8 RGB (H, W, 3) of an image file; PredictError naming the file if it is unreadable."""
  try:
    image = data_base.read_rgb(path)
  except Exception as e:  # Pillow/tifffile raise many types for corrupt files.
    raise PredictError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
  if image.ndim != 3 or min(image.shape[:2]) < 1:
    raise PredictError(f"{path}: not a 2D image (shape {image.shape})")
  return image


def read_volume(path: pathlib.Path) -> Tuple[Any, np.ndarray]:
  """(nibabel image, float32 3D data) of a NIfTI file; trailing singleton axes dropped."""
  import nibabel  # pylint: disable=g-import-not-at-top
  try:
    nii = nibabel.load(str(path))
    data = np.asarray(nii.dataobj, dtype=np.float32)
  except Exception as e:  # nibabel/zlib raise many types for corrupt files.
    raise PredictError(f"{path}: cannot read NIfTI volume ({type(e).__name__}: {e})") from e
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise PredictError(f"{path}: expected a 3D volume, got shape {data.shape}")
  return nii, data


def volume_window(data_config) -> Tuple[float, float, bool]:
  """(lo, hi, per-volume min-max) of the run's dataset, as `data/volumes.py` applies it.

  lo/hi = +-inf means "no clip" (runs on 2D datasets: per-volume min-max of the raw values).
  """
  name = data_config.name
  if name == "btcv":
    return float(data_config.hu_min), float(data_config.hu_max), False
  if name == "sts3d":
    level, width = float(data_config.window_level), float(data_config.window_width)
    return level - width / 2, level + width / 2, True
  return -np.inf, np.inf, True


def window_slices(data: np.ndarray, window: Tuple[float, float, bool]) -> np.ndarray:
  """3D volume -> (Z, X, Y) float32 slices in [0, 1] (the training slicing and windowing)."""
  lo, hi, minmax = window
  clipped = np.clip(data, lo, hi)
  a, b = (float(clipped.min()), float(clipped.max())) if minmax else (lo, hi)
  x = (clipped - a) / max(b - a, 1e-6)
  return np.clip(np.moveaxis(x, -1, 0), 0.0, 1.0).astype(np.float32)


def to_model(image: np.ndarray, size: int, interpolation: str) -> np.ndarray:
  """uint8 RGB or float [0, 1] (H, W[, 3]) -> float32 (size, size, 3) in [-1, 1]."""
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return transforms.image_to_model(transforms.resize_image(image, size, interpolation))


def upsample(probs: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
  """(S, S, C) probabilities -> (H, W, C), bilinear per channel (Pillow, as the data resizes)."""
  if probs.shape[:2] == tuple(shape):
    return probs.astype(np.float32)
  h, w = shape
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(probs[..., c], np.float32))
                      .resize((w, h), Image.Resampling.BILINEAR)) for c in range(probs.shape[-1])]
  return np.clip(np.stack(chans, axis=-1), 0.0, 1.0)


# ---- the predictor -----------------------------------------------------------------------------


class Predictor:
  """Model-size images (n, S, S, 3) -> class probabilities (n, S, S, C), in jitted batches.

  The batch is padded to a fixed size (a multiple of the local devices), so there is ONE
  compilation whatever the number of inputs, and split over the devices.
  """

  def __init__(self, run: restore.Run, batch_size: int = 8, tta: str = "none", seed: int = 0):
    if tta not in TTA_CHOICES:
      raise ValueError(f"--tta must be one of {TTA_CHOICES}, got {tta!r}")
    if batch_size <= 0:
      raise ValueError(f"--batch-size must be positive, got {batch_size}")
    devices = jax.local_device_count()
    self.batch_size = -(-int(batch_size) // devices) * devices
    self.run = run
    fn = (inference.class_probabilities_flip_tta if tta == "flip"
          else inference.class_probabilities)
    self._fn = run.jit(f"predict/{tta}", lambda: functools.partial(fn, run.model))
    self._sharding = sharding_lib.batch_sharding(run.mesh)
    self._z_T = inference.run_noise(run.model, seed)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
      x = jax.make_array_from_process_local_data(self._sharding, chunk)
      probs = self._fn(self.run.params, self.run.vae_params, self.run.scale_factor, x, self._z_T)
      out.append(np.asarray(probs)[:len(chunk) - pad])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _decide(probs: np.ndarray, threshold: float) -> Tuple[np.ndarray, np.ndarray]:
  """(..., C) probabilities -> (mask or label map (uint8), foreground probability float32)."""
  fg = np.asarray(inference.foreground(probs), np.float32)
  if probs.shape[-1] == 1:
    return (fg > threshold).astype(np.uint8), fg
  return np.argmax(probs, axis=-1).astype(np.uint8), fg


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """Input RGB with the predicted foreground tinted red (label maps: any non-zero class)."""
  fg = (mask > 0)[..., None]
  red = np.array([255, 0, 0], np.float32)
  return np.where(fg, (1 - alpha) * image + alpha * red, image).round().astype(np.uint8)


@dataclasses.dataclass
class _Pending:
  path: pathlib.Path
  image: np.ndarray


def predict(run: restore.Run, inputs: Sequence[pathlib.Path], output: storage.PathLike, *,
            batch_size: int = 8, tta: str = "none", seed: int = 0, threshold: float = 0.5,
            progress: bool = True) -> Dict[str, Any]:
  """Predicts every input and writes masks, probabilities and overlays; returns the manifest."""
  if jax.process_count() > 1:
    raise PredictError("predict runs in a single process (each would read every input)")
  output = storage.path(output)
  predictor = Predictor(run, batch_size, tta, seed)
  size = run.model.image_size
  interpolation = run.config.data.get("interpolation", "bilinear")
  window = volume_window(run.config.data)
  records: List[Dict[str, Any]] = []
  bar = _progress(inputs, progress)

  def flush(pending: List[_Pending]) -> None:
    if not pending:
      return
    batch = np.stack([to_model(p.image, size, interpolation) for p in pending])
    for p, probs in zip(pending, predictor(batch)):
      mask, fg = _decide(upsample(probs, p.image.shape[:2]), threshold)
      name = _stem(p.path)
      if probs.shape[-1] == 1:
        mask_io.write_mask_png(output / "masks" / f"{name}.png", mask)
      else:
        mask_io.write_label_png(output / "masks" / f"{name}.png", mask)
      mask_io.write_probability_png(output / "probabilities" / f"{name}.png", fg)
      png = io.BytesIO()
      Image.fromarray(overlay(p.image, mask)).save(png, format="PNG")
      storage.write_bytes_atomic(output / "overlays" / f"{name}.png", png.getvalue())
      records.append({"input": str(p.path), "kind": "image", "size": list(p.image.shape[:2]),
                      "mask": str(output / "masks" / f"{name}.png"),
                      "foreground_pixels": int((mask > 0).sum())})
      if bar is not None:
        bar.update(1)
    pending.clear()

  pending: List[_Pending] = []
  for path in inputs:
    if _suffix(path) in NIFTI_SUFFIXES:
      flush(pending)
      records.append(_predict_volume(path, predictor, output, size, interpolation, window,
                                     threshold, bar))
      continue
    pending.append(_Pending(path, read_image(path)))
    if len(pending) == predictor.batch_size:
      flush(pending)
  flush(pending)
  if bar is not None:
    bar.close()
  manifest = {"workdir": str(run.workdir), "checkpoint": run.checkpoint, "step": run.step,
              "tta": tta, "seed": seed, "threshold": threshold, "model_size": size,
              "outputs": records}
  storage.write_text_atomic(output / "predictions.json", json.dumps(manifest, indent=1))
  return manifest


def _predict_volume(path: pathlib.Path, predictor: Predictor, output: epath.Path, size: int,
                    interpolation: str, window, threshold: float, bar) -> Dict[str, Any]:
  nii, data = read_volume(path)
  slices = window_slices(data, window)
  probs = []
  for start in range(0, len(slices), predictor.batch_size):
    chunk = slices[start:start + predictor.batch_size]
    model_in = np.stack([to_model(s, size, interpolation) for s in chunk])
    probs += [upsample(p, data.shape[:2]) for p in predictor(model_in)]
    if bar is not None:
      bar.update(len(chunk))
  probs = np.stack(probs, axis=2)  # (X, Y, Z, C): slices back on the last axis
  mask, fg = _decide(probs, threshold)
  suffix = _suffix(path)
  name = _stem(path)
  mask_io.write_nifti(output / "masks" / f"{name}{suffix}", mask, reference=nii)
  mask_io.write_nifti(output / "probabilities" / f"{name}{suffix}", fg.astype(np.float32),
                      reference=nii)
  return {"input": str(path), "kind": "volume", "size": list(data.shape),
          "mask": str(output / "masks" / f"{name}{suffix}"),
          "foreground_pixels": int((mask > 0).sum()),
          "window": {"lo": window[0] if np.isfinite(window[0]) else None,
                     "hi": window[1] if np.isfinite(window[1]) else None,
                     "per_volume_minmax": window[2]}}


def _progress(inputs: Sequence[pathlib.Path], enabled: bool):
  """tqdm bar over images/slices (volume slice counts from the headers only)."""
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  total = 0
  for path in inputs:
    if _suffix(path) in NIFTI_SUFFIXES:
      try:
        total += volumes.header_shape(path)[2]
      except Exception:  # an unreadable header is reported when the volume is read
        pass
    else:
      total += 1
  return tqdm(total=total, unit="img", dynamic_ncols=True, desc="predict")


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m sdseg_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="run directory of sdseg_jax.main")
  parser.add_argument("--input", required=True, help="image/volume file or folder")
  parser.add_argument("--output", required=True, help="output folder")
  parser.add_argument("--checkpoint", default="best", help=restore.CHECKPOINT_CHOICES)
  parser.add_argument("--tta", default="none", choices=TTA_CHOICES)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0, help="noise seed")
  parser.add_argument("--threshold", type=float, default=0.5)
  parser.add_argument("--no-progress", action="store_true")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  try:
    output = storage.path(args.output)
    storage.check_bucket(output, write=True)  # before any work: the output must be writable
    if storage.is_remote(args.input):
      raise PredictError(f"--input {args.input}: inputs are read from local disk; copy them "
                         f"first (gcloud storage cp -r {args.input} LOCAL_DIR); --workdir and "
                         "--output may be gs:// paths")
    inputs = list_inputs(pathlib.Path(args.input))
    run = restore.load_run(args.workdir, args.checkpoint)
    manifest = predict(run, inputs, output, batch_size=args.batch_size,
                       tta=args.tta, seed=args.seed, threshold=args.threshold,
                       progress=not args.no_progress)
  except (PredictError, restore.RestoreError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {len(manifest['outputs'])} predictions to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
