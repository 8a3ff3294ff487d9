"""A built-in synthetic segmentation dataset: polyp-like blobs on textured backgrounds.

It lets the demo (and the tests) train and evaluate end to end on a laptop CPU with no download.
Every example is generated on the fly from (seed, split, index), so the source is random-access,
deterministic across runs and processes, and costs no disk. The task is deliberately not trivial:
the lesion is a smooth, rotated, slightly irregular blob whose colour differs from a textured,
vignetted background only moderately, and the background carries distractor spots that are not
part of the mask.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from sdseg_jax import errors

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Low-frequency texture: bilinear upsampling of a coarse random grid, in [0, 1]."""
  grid = rng.random((cells + 1, cells + 1))
  coords = np.linspace(0, cells, size)
  i0 = np.minimum(coords.astype(int), cells - 1)
  frac = coords - i0
  rows = grid[i0] * (1 - frac)[:, None] + grid[i0 + 1] * frac[:, None]
  return rows[:, i0] * (1 - frac)[None] + rows[:, i0 + 1] * frac[None]


def generate(seed: int, split: str, index: int, size: int) -> dict[str, Any]:
  """One raw record: uint8 RGB image (size, size, 3) and a {0, 1} uint8 mask."""
  rng = _rng(seed, split, index)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
  # Blob: a rotated ellipse whose radius wobbles with the angle (irregular outline).
  cy, cx = rng.uniform(0.3, 0.7, 2)
  ry, rx = rng.uniform(0.12, 0.26, 2)
  theta = rng.uniform(0, np.pi)
  dy, dx = yy - cy, xx - cx
  u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
  v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
  angle = np.arctan2(v, u)
  wobble = 1 + 0.12 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
  radius = np.sqrt(u ** 2 + v ** 2) / wobble
  mask = (radius < 1.0).astype(np.uint8)

  # Background: pinkish mucosa texture with vignetting and a few distractor spots.
  texture = _smooth_noise(rng, size, 6) * 0.6 + _smooth_noise(rng, size, 16) * 0.4
  vignette = 1 - 0.5 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) * 2
  base = np.array([0.78, 0.45, 0.40]) * rng.uniform(0.85, 1.1)
  image = base[None, None] * (0.75 + 0.35 * texture[..., None]) * vignette[..., None]
  for _ in range(rng.integers(2, 5)):
    sy, sx, sr = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.02, 0.05)
    spot = np.exp(-((yy - sy) ** 2 + (xx - sx) ** 2) / (2 * sr ** 2))
    image += 0.18 * spot[..., None] * np.array([1.0, 0.9, 0.8])

  # Lesion: redder and brighter, shaded like a dome, with its own texture.
  dome = np.clip(1 - radius, 0, 1) ** 0.5
  lesion_color = np.array([0.95, 0.35, 0.30]) * rng.uniform(0.9, 1.1)
  lesion = lesion_color[None, None] * (0.8 + 0.3 * dome[..., None]) * (
      0.9 + 0.2 * _smooth_noise(rng, size, 10)[..., None])
  alpha = np.clip((1.0 - radius) * 12, 0, 1)[..., None]  # soft edge, 1-2 pixels wide
  image = image * (1 - alpha) + lesion * alpha
  image += rng.normal(0, 0.02, image.shape)
  image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
  name = f"synthetic_{split}_{index:05d}"
  return {"image": image, "mask": mask, "name": name, "case": name, "slice": -1}


class SyntheticSource:
  """Random-access source (grain-compatible, picklable) of `generate` records."""

  def __init__(self, split: str, num_examples: int, size: int, seed: int):
    if split not in _SPLIT_IDS:
      raise errors.ConfigError(f"unknown split {split!r}")
    self.split, self.num_examples, self.size, self.seed = split, num_examples, size, seed

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    return generate(self.seed, self.split, int(index), self.size)

  def __repr__(self) -> str:
    return (f"SyntheticSource(split={self.split}, n={self.num_examples}, size={self.size}, "
            f"seed={self.seed})")


def make_source(data_config, split: str) -> SyntheticSource:
  """Source for `split`; sizes from `data_config.synthetic` (num_train/val/test, size, seed)."""
  syn = data_config.synthetic
  counts = {"train": syn.num_train, "val": syn.num_val, "test": syn.num_test}
  return SyntheticSource(split, int(counts[split]), int(syn.size), int(syn.seed))
