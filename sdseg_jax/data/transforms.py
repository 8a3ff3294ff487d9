"""NumPy-only grain transforms: raw record -> model-ready element.

`Preprocess` resizes (image bicubic/bilinear, mask nearest, both with Pillow, like the official
loaders), maps the image to float32 [-1, 1] with 3 channels and turns the label map into the
binary target of the task ({-1, +1}, 3 identical channels, the layout the kl-f8 VAE encodes).
`RandomFlips` applies the SAME horizontal/vertical flips to image and mask; as a grain
`RandomMap` its randomness comes from grain's per-element seeded rng, so a run is reproducible
and independent of the number of worker processes.

No TensorFlow here: transforms run in grain worker processes next to the JAX host process.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from PIL import Image

Element = dict[str, Any]

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

# Target rules: how a raw label map becomes the segmentation target.
#   foreground  any non-zero label (polyps, teeth, BTCV organ union)
#   cup / disc  REFUGE label map 0 background, 1 disc outside the cup, 2 cup
#   multiclass  "label" keeps the full label map (BTCV 9/14 classes); "mask" is the foreground
TARGETS = ("foreground", "cup", "disc", "multiclass")


def binary_target(label_map: np.ndarray, target: str) -> np.ndarray:
  """uint8 {0, 1} map of the task's foreground."""
  if target in ("foreground", "multiclass"):
    return (label_map > 0).astype(np.uint8)
  if target == "cup":
    return (label_map == 2).astype(np.uint8)
  if target == "disc":
    return (label_map >= 1).astype(np.uint8)
  raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")


def resize_image(image: np.ndarray, size: int, interpolation: str) -> np.ndarray:
  """Resizes uint8 RGB or float32 [0, 1] (H, W, 3) to (size, size, 3), same dtype."""
  if image.shape[:2] == (size, size):
    return image
  method = _INTERPOLATION[interpolation]
  if image.dtype == np.uint8:
    return np.asarray(Image.fromarray(image).resize((size, size), method))
  # Pillow resizes float images one channel at a time (mode "F").
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
                      .resize((size, size), method)) for c in range(image.shape[-1])]
  return np.clip(np.stack(chans, axis=-1), 0.0, 1.0)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of a uint8 label map, so no new label values appear."""
  if mask.shape == (size, size):
    return mask
  return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))


def image_to_model(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] or float [0, 1] -> float32 [-1, 1], 3 channels (grayscale replicated)."""
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 127.5 - 1.0
  return image.astype(np.float32) * 2.0 - 1.0


def target_to_model(binary: np.ndarray) -> np.ndarray:
  """{0, 1} (H, W) -> float32 (H, W, 3) in {-1, +1}."""
  return np.repeat(np.where(binary > 0, 1.0, -1.0).astype(np.float32)[..., None], 3, axis=-1)


class Preprocess(grain.transforms.Map):
  """Raw record -> {"image", "mask"} (train), {"image", "label", "name", "case", "slice"} (eval)."""

  def __init__(self, image_size: int, interpolation: str = "bicubic",
               target: str = "foreground", train: bool = True, keep_label: bool = False):
    if interpolation not in _INTERPOLATION:
      raise ValueError(f"unknown interpolation {interpolation!r}")
    if target not in TARGETS:
      raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    self.image_size = int(image_size)
    self.interpolation = interpolation
    self.target = target
    self.train = train
    # Train elements also carry the resized label map (for `ClassTarget`, multi-class runs).
    self.keep_label = keep_label

  def map(self, element: Element) -> Element:
    s = self.image_size
    image = image_to_model(resize_image(element["image"], s, self.interpolation))
    label_map = resize_mask(element["mask"], s)
    binary = binary_target(label_map, self.target)
    if self.train:
      out = {"image": image, "mask": target_to_model(binary)}
      if self.keep_label:
        out["label"] = label_map.astype(np.uint8)
      return out
    label = label_map if self.target == "multiclass" else binary
    return {"image": image, "label": label.astype(np.uint8), "name": str(element["name"]),
            "case": str(element["case"]), "slice": np.int32(element["slice"])}


def flip(element: Element, horizontal: bool, vertical: bool) -> Element:
  """Flips every spatial array of the element the same way (image, mask, label)."""
  out = dict(element)
  for key in ("image", "mask", "label"):
    if key in out:
      x = out[key]
      if horizontal:
        x = x[:, ::-1]
      if vertical:
        x = x[::-1]
      out[key] = np.ascontiguousarray(x)
  return out


class RandomFlips(grain.transforms.RandomMap):
  """Random horizontal and (optionally) vertical flips, each with probability `p`, shared by
  image and mask. Both coins are always drawn so the stream does not depend on `vertical`."""

  def __init__(self, p: float = 0.5, vertical: bool = True):
    self.p = float(p)
    self.vertical = bool(vertical)

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    h, v = rng.random(2) < self.p
    return flip(element, bool(h), bool(v) and self.vertical)


class ClassTarget(grain.transforms.RandomMap):
  """Multi-class training target (official `synapse.py` rule), seeded per element by grain.

  Replaces the element's "label" map by a binary "mask" for one class k drawn uniformly among
  the classes present ((label == k) for k > 0, the organ union (label != 0) for k = 0) and adds
  "class_id" (int32). The draw uses grain's per-element rng, not NumPy's global one, so the
  stream is reproducible and independent of worker processes (the official loader's workers
  shared one global RNG). Runs after `Preprocess(keep_label=True)` on the resized label map.
  """

  def __init__(self, num_classes: int):
    self.num_classes = int(num_classes)

  def random_map(self, element: Element, rng: np.random.Generator) -> Element:
    out = dict(element)
    k, target = sample_class(out.pop("label"), self.num_classes, rng)
    out["mask"] = target_to_model(target)
    out["class_id"] = np.int32(k)
    return out


def sample_class(label_map: np.ndarray, num_classes: int, rng: np.random.Generator
                 ) -> tuple[int, np.ndarray]:
  """One training target of the official multi-class loader, drawn with `rng`.

  k is uniform among the classes present in the slice (0 included when there is background);
  the binary target is (label == k) for k > 0 and (label != 0) for k = 0. Labels >= num_classes
  are an error (they would index past the class embedding).
  """
  present = np.unique(label_map)
  if present.size and int(present[-1]) >= num_classes:
    raise ValueError(f"label value {int(present[-1])} >= model.unet.num_classes={num_classes}")
  k = int(rng.choice(present)) if present.size else 0
  target = (label_map != 0) if k == 0 else (label_map == k)
  return k, target.astype(np.uint8)
