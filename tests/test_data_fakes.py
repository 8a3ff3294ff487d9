"""Small on-disk datasets in the official layouts, written by the data tests (no tests here).

Real BTCV, STS-3D and REFUGE data is not available to the tests, and the pipeline tests need
samples whose identity survives decoding, resizing and flips; these writers make both.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image


def write_polyp_set(root: pathlib.Path, n: int = 20, size: tuple[int, int] = (40, 30),
                    mask_ext: str = ".png") -> pathlib.Path:
  """Kvasir layout (images/, masks/) of `n` samples.

  Image i: channel 1 is the constant 10 * i (identifies the sample after any flip or resize),
  channel 0 is 255 exactly where the mask is (an asymmetric L-shape, so flips are visible and
  image/mask agreement can be checked after augmentation).
  """
  w, h = size
  (root / "images").mkdir(parents=True, exist_ok=True)
  (root / "masks").mkdir(parents=True, exist_ok=True)
  for i in range(n):
    mask = np.zeros((h, w), np.uint8)
    mask[2:h // 2, 2:6] = 255
    mask[h // 2 - 4:h // 2, 2:w // 2] = 255
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = mask
    image[..., 1] = 10 * i
    image[..., 2] = 77
    Image.fromarray(image).save(root / "images" / f"img{i:03d}.png")
    Image.fromarray(mask).convert("RGB").save(root / "masks" / f"img{i:03d}{mask_ext}")
  return root


def sample_ids(images: np.ndarray) -> list[int]:
  """Recovers write_polyp_set's sample index from model-space images (b, S, S, 3)."""
  g = (images[..., 1].mean(axis=(1, 2)) + 1.0) * 127.5
  return [int(round(v / 10.0)) for v in g]


def write_nifti(path: pathlib.Path, arr: np.ndarray) -> None:
  import nibabel  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  nibabel.save(nibabel.Nifti1Image(arr, np.eye(4)), str(path))


def write_btcv(root: pathlib.Path, ids: list[str], shape=(24, 20, 5), seed: int = 0) -> None:
  """Synapse RawData layout: Training/img/imgNNNN.nii.gz + Training/label/labelNNNN.nii.gz."""
  rng = np.random.default_rng(seed)
  for i in ids:
    img = rng.integers(-1000, 1000, shape).astype(np.int16)
    img[0, 0, :] = -125  # known HU values for the windowing test
    img[0, 1, :] = 275
    img[0, 2, :] = 75
    lab = np.zeros(shape, np.int16)
    lab[4:10, 4:10, 1:3] = 6   # liver -> synapse8 label 5
    lab[12:16, 3:8, 2] = 5     # esophagus: not one of the 8 organs
    lab[15:20, 12:18, 3] = 11  # pancreas -> 8
    write_nifti(root / "Training" / "img" / f"img{i}.nii.gz", img)
    write_nifti(root / "Training" / "label" / f"label{i}.nii.gz", lab)


def write_sts3d(root: pathlib.Path, ids: list[int], shape=(20, 18, 4), seed: int = 0) -> None:
  """STS labelled.zip layout: labelled/image/Teeth_NNNN_0000.nii.gz + labelled/label/..."""
  rng = np.random.default_rng(seed)
  for i in ids:
    img = rng.uniform(-500, 2000, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[3:9, 3:9, :] = 1
    lab[15, 15, 1] = 1  # a 1-voxel speck, removed by clean_labels
    name = f"Teeth_{i:04d}_0000.nii.gz"
    write_nifti(root / "labelled" / "image" / name, img)
    write_nifti(root / "labelled" / "label" / name, lab)


def write_refuge(root: pathlib.Path, size=(64, 60)) -> list[str]:
  """Official REFUGE layout with 2 train (g/n), 2 validation (V) and 2 test (T) images.

  Masks use the official coding (0 cup, 128 disc rim, 255 background); the disc of image k is
  centred at (20 + k, 25) so crops can be checked.
  """
  w, h = size
  layout = {
      "g0001": ("Training400/Glaucoma", "Annotation-Training400/Disc_Cup_Masks/Glaucoma"),
      "n0001": ("Training400/Non-Glaucoma", "Annotation-Training400/Disc_Cup_Masks/Non-Glaucoma"),
      "V0001": ("REFUGE-Validation400", "REFUGE-Validation400-GT/Disc_Cup_Masks"),
      "V0002": ("REFUGE-Validation400", "REFUGE-Validation400-GT/Disc_Cup_Masks"),
      "T0001": ("Test400", "REFUGE-Test-GT/Disc_Cup_Masks"),
      "T0002": ("Test400", "REFUGE-Test-GT/Disc_Cup_Masks"),
  }
  yy, xx = np.mgrid[:h, :w]
  for k, (name, (img_dir, mask_dir)) in enumerate(layout.items()):
    cx, cy = 20 + k, 25
    r2 = (xx - cx) ** 2 + (yy - cy) ** 2
    mask = np.full((h, w), 255, np.uint8)
    mask[r2 <= 100] = 128
    mask[r2 <= 25] = 0
    image = np.stack([np.full((h, w), 50 + k, np.uint8), 255 - mask, mask], axis=-1)
    (root / img_dir).mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / img_dir / f"{name}.jpg", quality=100)
    Image.fromarray(mask).save(root / mask_dir / f"{name}.bmp")
  return list(layout)
