r"""Dataset integrity check, in the spirit of nnU-Net's --verify_dataset_integrity.

  python -m sdseg_jax.data.check --dataset kvasir --root /data/Kvasir-SEG [--split_dir DIR]
      [--quick] [--config.field=value ...]

Counts samples per split, finds images without masks and masks without images, unreadable or
truncated files, image/mask size mismatches, masks that are not binary (or labels out of range,
or the wrong REFUGE coding) and empty volumes. Prints a summary and exits 1 naming every bad
file, 0 when the data is clean. `--quick` reads headers only (what training runs).

`quick_check(data_config, split_dir)` is that header-level pass as a function: training calls it
before building loaders, so a broken download fails in a second with the file named, not an hour
into training inside a grain worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Any

import numpy as np

from sdseg_jax import storage
from sdseg_jax.data import base
from sdseg_jax.data import configs
from sdseg_jax.data import splits as splits_lib
from sdseg_jax.data import volumes

BINARY_SETS = ("kvasir", "cvc")
VOLUME_SETS = ("btcv", "sts3d")
# A binary mask image may have a few grey pixels (JPEG noise, anti-aliased edges); more than this
# fraction of pixels strictly between 32 and 223 means it is not a black/white mask.
MAX_GREY_FRACTION = 0.01


@dataclasses.dataclass
class Problem:
  path: str
  reason: str


@dataclasses.dataclass
class Report:
  dataset: str
  root: str
  num_found: int = 0
  split_counts: dict[str, int] = dataclasses.field(default_factory=dict)
  split_slices: dict[str, int] = dataclasses.field(default_factory=dict)
  problems: list[Problem] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not self.problems

  def add(self, path: Any, reason: str) -> None:
    self.problems.append(Problem(str(path), reason))

  def summary(self) -> str:
    unit = "volumes" if self.dataset in VOLUME_SETS else "pairs"
    lines = [f"dataset {self.dataset}   root {self.root}",
             f"{'split':<8}{unit:>10}" + (f"{'slices':>10}" if self.split_slices else "")]
    for s in splits_lib.SPLITS:
      row = f"{s:<8}{self.split_counts.get(s, 0):>10}"
      if self.split_slices:
        row += f"{self.split_slices.get(s, 0):>10}"
      lines.append(row)
    lines.append(f"{unit} found: {self.num_found}   bad files: "
                 f"{len({p.path for p in self.problems})}")
    lines += [f"note: {n}" for n in self.notes]
    lines += [f"BAD {p.path}: {p.reason}" for p in self.problems]
    lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
    return "\n".join(lines)


def _find(data_config):
  """(items by name, image files without mask, mask files without image) of the dataset."""
  root, name = pathlib.Path(data_config.root), data_config.name
  if not root.is_dir():
    raise base.DataError(f"dataset root not found: {root}")
  if name == "kvasir":
    from sdseg_jax.data import kvasir as module  # pylint: disable=g-import-not-at-top
    return module, *module.find_pairs(root)
  if name == "cvc":
    from sdseg_jax.data import cvc as module  # pylint: disable=g-import-not-at-top
    return module, *module.find_pairs(root)
  if name == "refuge":
    from sdseg_jax.data import refuge as module  # pylint: disable=g-import-not-at-top
    return module, *module.find_pairs(root, data_config.get("layout", "auto"))
  if name == "btcv":
    from sdseg_jax.data import btcv as module  # pylint: disable=g-import-not-at-top
    return module, *module.find_cases(root)
  if name == "sts3d":
    from sdseg_jax.data import sts3d as module  # pylint: disable=g-import-not-at-top
    return module, *module.find_cases(root)
  raise ValueError(f"no integrity check for dataset {name!r}")


# -- per-file checks -------------------------------------------------------------------------------

def _check_mask_values(dataset: str, path: str, arr: np.ndarray, report: Report) -> bool:
  """Returns whether the mask has foreground; records a problem if its values are wrong."""
  if dataset == "refuge":
    if arr.ndim == 3 and not np.array_equal(arr[..., 0], arr[..., 1]):
      rg = arr[..., :2]
      bad = np.mean(np.minimum(rg, 255 - rg) > 16)
      coding = "RGB disc/cup (0 or 255 per channel)"
    else:
      grey = (arr if arr.ndim == 2 else arr[..., 0]).astype(np.int16)
      bad = np.mean(np.min(np.abs(grey[..., None] - np.array([0, 128, 255])), axis=-1) > 16)
      coding = "grey 0 cup / 128 disc / 255 background"
    if bad > MAX_GREY_FRACTION:
      report.add(path, f"not a REFUGE mask ({coding}): {bad:.1%} of pixels off the coding")
    from sdseg_jax.data import refuge  # pylint: disable=g-import-not-at-top
    return bool(refuge.label_map_from_mask(arr).any())
  grey = arr if arr.ndim == 2 else arr[..., 0]
  frac = float(np.mean((grey > 32) & (grey < 224)))
  if frac > MAX_GREY_FRACTION:
    report.add(path, f"mask is not binary: {frac:.1%} of pixels are grey (32..223)")
  return bool(base.threshold_mask(grey).any())


def _check_pair(dataset: str, pair: base.Pair, full: bool, report: Report) -> bool | None:
  sizes = {}
  for key in ("image", "mask"):
    path = getattr(pair, key)
    try:
      sizes[key] = base.image_size(path)
    except Exception as e:  # pylint: disable=broad-except
      report.add(path, f"unreadable {key} header ({type(e).__name__}: {e})")
  if len(sizes) == 2 and sizes["image"] != sizes["mask"]:
    report.add(pair.mask, f"mask size {sizes['mask']} != image size {sizes['image']} "
                          f"({pair.image})")
  if not full or len(sizes) < 2:
    return None
  try:
    base.read_rgb(pair.image)
  except Exception as e:  # pylint: disable=broad-except
    report.add(pair.image, f"cannot decode image ({type(e).__name__}: {e})")
  try:
    mask = base.read_array(pair.mask)
  except Exception as e:  # pylint: disable=broad-except
    report.add(pair.mask, f"cannot decode mask ({type(e).__name__}: {e})")
    return None
  return _check_mask_values(dataset, pair.mask, mask, report)


def _check_case(dataset: str, case: volumes.Case, full: bool, report: Report) -> int:
  """Returns the number of slices (0 when unreadable)."""
  shapes = {}
  for key in ("image", "label"):
    path = getattr(case, key)
    try:
      shapes[key] = volumes.header_shape(path)
    except Exception as e:  # pylint: disable=broad-except
      report.add(path, f"unreadable NIfTI header ({type(e).__name__}: {e})")
  if len(shapes) < 2:
    return 0
  if len(shapes["image"]) != 3 or shapes["image"] != shapes["label"]:
    report.add(case.label, f"label shape {shapes['label']} != image shape {shapes['image']} "
                           f"({case.image}); both must be the same 3D grid")
    return 0
  if min(shapes["image"]) == 0:
    report.add(case.image, f"empty volume (shape {shapes['image']})")
    return 0
  if full:
    try:
      volumes.load_nifti(case.image)
    except Exception as e:  # pylint: disable=broad-except
      report.add(case.image, f"cannot decode volume ({type(e).__name__}: {e})")
    try:
      label = volumes.load_nifti(case.label)
    except Exception as e:  # pylint: disable=broad-except
      report.add(case.label, f"cannot decode label volume ({type(e).__name__}: {e})")
    else:
      top = 13 if dataset == "btcv" else None
      if not np.all(np.equal(np.mod(label, 1), 0)):
        report.add(case.label, "label volume has non-integer values")
      elif label.min() < 0 or (top is not None and label.max() > top):
        report.add(case.label, f"labels out of range [0, {top or 'inf'}]: "
                               f"[{label.min()}, {label.max()}]")
      elif not label.any():
        report.add(case.label, "empty label volume (no foreground voxel)")
  return shapes["image"][-1]


# -- dataset level ---------------------------------------------------------------------------------

def check_dataset(data_config, split_dir: pathlib.Path | None = None,
                  full: bool = True) -> Report:
  """Checks every sample of the dataset (full decode, or headers only with full=False)."""
  report = Report(data_config.name, str(data_config.root))
  try:
    module, items, orphans_a, orphans_b = _find(data_config)
  except base.DataError as e:
    report.add(data_config.root, str(e))
    return report
  report.num_found = len(items)
  volume_set = data_config.name in VOLUME_SETS
  for path in orphans_a:
    report.add(path, "image without " + ("label" if volume_set else "mask"))
  for path in orphans_b:
    report.add(path, ("label" if volume_set else "mask") + " without image")

  slices, empty = {}, []
  for name, item in items.items():
    if volume_set:
      slices[name] = _check_case(data_config.name, item, full, report)
    elif _check_pair(data_config.name, item, full, report) is False:
      empty.append(name)
  if empty:
    report.notes.append(f"{len(empty)} masks have no foreground (e.g. {empty[:5]})")

  names = sorted(items)
  try:
    if split_dir is not None and (storage.path(split_dir) / "train.txt").exists():
      split = splits_lib.read_split_files(split_dir)
      splits_lib._validate(split_dir, split, names)  # pylint: disable=protected-access
    else:
      split = module.propose_split(data_config, names)
      missing = sorted(n for s in split.values() for n in s if n not in items)
      if missing:
        report.add(data_config.root, f"the {data_config.split!r} split needs samples that are "
                                     f"not on disk: {missing[:20]}")
  except (base.DataError, ValueError) as e:
    report.add(split_dir or data_config.root, str(e))
  else:
    report.split_counts = {s: len(split.get(s, [])) for s in splits_lib.SPLITS}
    if volume_set:
      report.split_slices = {s: sum(slices.get(n, 0) for n in split.get(s, []))
                             for s in splits_lib.SPLITS}
  return report


def quick_check(data_config, split_dir: pathlib.Path) -> Report:
  """Header-level check of a folder dataset before training; raises DataError naming bad files.

  No-op for the synthetic set and for format="tfds" (the build already decoded every file).
  """
  if data_config.name == "synthetic" or data_config.get("format", "folder") != "folder":
    return Report(data_config.name, str(data_config.get("root", "")))
  report = check_dataset(data_config, split_dir, full=False)
  if not report.ok:
    raise base.DataError(f"dataset {data_config.name} at {data_config.root} failed the "
                         f"integrity check:\n" + "\n".join(f"  {p.path}: {p.reason}"
                                                           for p in report.problems))
  return report


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", required=True, choices=("kvasir", "cvc", "refuge", "btcv",
                                                           "sts3d"))
  parser.add_argument("--root", required=True, help="the dataset's download folder")
  parser.add_argument("--split_dir", default=None,
                      help="check these split files against the data (default: propose the "
                           "configured split in memory)")
  parser.add_argument("--quick", action="store_true", help="headers only, no full decode")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a data-config field, e.g. --set split=medico2020")
  args = parser.parse_args(argv)
  data_config = configs.get_data_config(args.dataset, args.root)
  for item in args.set:
    key, _, value = item.partition("=")
    current = data_config[key]
    data_config[key] = type(current)(value) if not isinstance(current, bool) else (
        value.lower() in ("1", "true", "yes"))
  report = check_dataset(data_config, pathlib.Path(args.split_dir) if args.split_dir else None,
                         full=not args.quick)
  print(report.summary())
  return 0 if report.ok else 1


if __name__ == "__main__":
  sys.exit(main())
