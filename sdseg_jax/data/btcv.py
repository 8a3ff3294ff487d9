"""BTCV / Synapse multi-organ abdominal CT (30 labelled volumes, labels 0..13).

Layouts: the official `RawData.zip` (`[Abdomen/][RawData/]Training/{img,label}/imgNNNN.nii.gz`,
`labelNNNN.nii.gz`), a folder with `img/` and `label/`, or one folder holding both
`img*.nii.gz` and `label*.nii.gz` (SDSeg's `test_vol/`). Volume names follow TransUNet:
`caseNNNN` (same number as `imgNNNN`).

Labels (`data_config.labels`):
  "synapse8"  TransUNet's 8 organs as 1..8 (spleen 1, right kidney 2, left kidney 3,
              gallbladder 4, liver 6->5, stomach 7->6, aorta 8->7, pancreas 11->8), others 0.
  "all13"     all 13 organs as in the download (0..13).
`target="foreground"` (SDSeg's binary task) is the union of the mapped organs (8-organ union with
synapse8); `target="multiclass"` keeps the label map in the eval batches' "label".

Intensities (deliberate deviation, docs/method.md#one-btcv-intensity-window): SDSeg's training
slices are clipped to [-175, 250] HU and mapped to [-1.25, 0.875], its test volumes clipped to
[-125, 275] and min-max normalised. Here train AND test use one window,
[hu_min, hu_max] = [-125, 275] by default, mapped linearly to [0, 1] (then to [-1, 1] by the
transforms). A fixed map, not a per-volume min-max, so a slice's value never depends on the rest
of its volume. `intensity="official"`
restores the official pair (train and test differ) for the `official` reproduction protocol.

Split ("transunet"): TransUNet's 12 test volumes (0001 0002 0003 0004 0008 0022 0025 0029 0032
0035 0036 0038, also SDSeg's) and its 18 training volumes, of which `val_size` (seeded) are held
out for model selection: SDSeg selected its checkpoint on the test volumes
(docs/method.md#model-selection-on-a-validation-split).
Training and validation read axial slices; evaluation reassembles volumes from the "case" and
"slice" fields of the eval batches (every slice is kept, empty ones included, as in SDSeg).
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np

from sdseg_jax import errors
from sdseg_jax.data import splits as splits_lib
from sdseg_jax.data import volumes

TEST_IDS = ("0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035",
            "0036", "0038")
TRAIN_IDS = ("0005", "0006", "0007", "0009", "0010", "0021", "0023", "0024", "0026", "0027",
             "0028", "0030", "0031", "0033", "0034", "0037", "0039", "0040")
SYNAPSE8 = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
NUM_RAW_LABELS = 14  # 0 background + 13 organs


def map_labels(label: np.ndarray, scheme: str) -> np.ndarray:
  """Raw BTCV labels -> uint8 label map of the chosen class set."""
  raw = np.rint(label).astype(np.int64)
  if raw.min() < 0 or raw.max() >= NUM_RAW_LABELS:
    raise volumes.DataError(f"BTCV labels must lie in [0, 13], got [{raw.min()}, {raw.max()}]")
  if scheme == "all13":
    return raw.astype(np.uint8)
  if scheme == "synapse8":
    lut = np.zeros(NUM_RAW_LABELS, np.uint8)
    for src, dst in SYNAPSE8.items():
      lut[src] = dst
    return lut[raw]
  raise errors.ConfigError(f"unknown BTCV label scheme {scheme!r} (synapse8 | all13)")


def find_cases(root: pathlib.Path) -> tuple[dict[str, volumes.Case], list[str], list[str]]:
  """(cases by name, images without label, labels without image)."""
  candidates = [root, root / "Training", root / "RawData" / "Training",
                root / "Abdomen" / "RawData" / "Training"]
  for d in candidates:
    if (d / "img").is_dir() and (d / "label").is_dir():
      imgs, labels = volumes.list_nifti(d / "img"), volumes.list_nifti(d / "label")
      break
    if d.is_dir():
      files = volumes.list_nifti(d)
      imgs = {k: v for k, v in files.items() if k.startswith("img")}
      labels = {k: v for k, v in files.items() if k.startswith("label")}
      if imgs:
        break
  else:
    raise volumes.DataError(f"no BTCV volumes under {root}: expected Training/img/imgNNNN.nii.gz "
                            f"and Training/label/labelNNNN.nii.gz (or img/, label/)")
  def num(stem: str, prefix: str) -> str:
    return stem[len(prefix):]
  img_by = {f"case{num(k, 'img')}": v for k, v in imgs.items() if k.startswith("img")}
  lab_by = {f"case{num(k, 'label')}": v for k, v in labels.items() if k.startswith("label")}
  cases = {n: volumes.Case(n, str(img_by[n]), str(lab_by[n])) for n in sorted(img_by)
           if n in lab_by}
  no_label = [str(img_by[n]) for n in sorted(img_by) if n not in lab_by]
  no_image = [str(lab_by[n]) for n in sorted(lab_by) if n not in img_by]
  return cases, no_label, no_image


def propose_split(data_config, names: list[str] | None = None) -> dict[str, list[str]]:
  del names  # fixed published volume lists
  if data_config.split != "transunet":
    raise errors.ConfigError(f"unknown BTCV split scheme {data_config.split!r} (transunet)")
  out = splits_lib.seeded_partition([f"case{i}" for i in TRAIN_IDS],
                                    {"val": int(data_config.val_size)},
                                    int(data_config.split_seed))
  out["test"] = [f"case{i}" for i in TEST_IDS]
  return out


def cache_dir(data_config, split_dir) -> pathlib.Path:
  return volumes.cache_dir(data_config, split_dir)


# The official code's intensities (`intensity="official"`): training slices clipped to
# [-175, 250] HU and mapped by (x + 125) / 400 (not onto [0, 1]); test volumes clipped to
# [-125, 275] and min-max normalised per volume.
OFFICIAL_TRAIN_WINDOW = volumes.Window(-175.0, 250.0, map_range=(-125.0, 275.0))
OFFICIAL_TEST_WINDOW = volumes.Window(-125.0, 275.0, minmax=True)
INTENSITIES = ("clean", "official")


def intensity_window(data_config, split: str) -> volumes.Window:
  """The window of `split`: one fixed [hu_min, hu_max] map ("clean", the default) or the
  official code's train/test pair ("official", for the reproduction protocol of that name)."""
  intensity = data_config.get("intensity", "clean")
  if intensity == "official":
    return OFFICIAL_TRAIN_WINDOW if split == "train" else OFFICIAL_TEST_WINDOW
  if intensity != "clean":
    raise errors.ConfigError(f"data.intensity must be one of {INTENSITIES}, got {intensity!r}")
  return volumes.Window(float(data_config.hu_min), float(data_config.hu_max), minmax=False)


def make_source(data_config, split: str, split_dir: pathlib.Path) -> volumes.VolumeSliceSource:
  cases, _, _ = find_cases(pathlib.Path(data_config.root))
  info = {"dataset": "btcv", "split": data_config.split, "seed": int(data_config.split_seed),
          "val_size": int(data_config.val_size)}
  splits = splits_lib.resolve_splits(split_dir, list(cases),
                                     lambda: propose_split(data_config, list(cases)), info)
  scheme = data_config.get("labels", "synapse8")
  window = intensity_window(data_config, split)
  return volumes.VolumeSliceSource(
      [cases[n] for n in splits[split]], cache_dir(data_config, split_dir), window,
      functools.partial(map_labels, scheme=scheme), label_key=f"btcv:{scheme}")
