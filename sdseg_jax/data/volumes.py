"""Axial-slice access to NIfTI volumes (BTCV, STS-3D) through a decoded-volume cache.

Training samples random axial slices of compressed `.nii.gz` volumes. Decompressing a whole
volume for every slice would make the input pipeline minutes per epoch, and keeping all volumes
in every worker's memory costs gigabytes. So each volume is decoded ONCE into
`cache_dir/<case>-<fingerprint>.{image,label}.npy` (slices first, uncompressed) and slices are
then read through `np.load(mmap_mode="r")`, which touches only the slice's bytes. This plays the
role of SDSeg's own preprocessing scripts (which wrote one file per slice) without a separate
manual step. The fingerprint covers the source files (path, size, mtime) and the label
preprocessing, so a changed download or setting never reuses a stale cache.

Intensity windowing is applied at read time from the raw stored values (exact, and the window
can change without re-decoding); the statistics a window needs (per-volume min/max of the
clipped volume for STS-3D) are computed once and kept in the cache's JSON sidecar.

Orientation: slices are taken along the LAST voxel axis of the NIfTI array (axial for both
datasets) and keep the stored in-plane voxel order; image and label share it, which is all the
segmentation protocol needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Callable, Optional

import numpy as np

from sdseg_jax import storage
from sdseg_jax.data.base import DataError
from sdseg_jax.data.base import Record

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def cache_dir(data_config, split_dir: storage.PathLike) -> pathlib.Path:
  """The decoded-volume cache: data.volume_cache_dir, else WORKDIR/volume_cache.

  The cache is memory-mapped, so it is always a local folder: for a gs:// workdir the default
  is ~/.cache/sdseg_jax/volume_cache/BUCKET/PATH on each host.
  """
  configured = str(data_config.get("volume_cache_dir") or "")
  if configured:
    if storage.is_remote(configured):
      raise DataError(f"data.volume_cache_dir={configured}: the volume cache is memory-mapped "
                      "and must be a local folder")
    return pathlib.Path(configured)
  workdir = storage.path(split_dir).parent
  if storage.is_remote(workdir):
    return (pathlib.Path.home() / ".cache" / "sdseg_jax" / "volume_cache" /
            os.fspath(workdir)[len("gs://"):])
  return pathlib.Path(os.fspath(workdir)) / "volume_cache"


def strip_nifti(name: str) -> str | None:
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return None


def list_nifti(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """{stem: path} of the NIfTI files in `folder`, sorted."""
  out = {}
  for p in sorted(folder.iterdir()):
    stem = strip_nifti(p.name)
    if stem is not None and p.is_file() and not p.name.startswith("."):
      out[stem] = p
  return out


def header_shape(path: str | pathlib.Path) -> tuple[int, ...]:
  """Voxel shape from the NIfTI header only (no decompression of the data)."""
  import nibabel  # pylint: disable=g-import-not-at-top
  return tuple(int(s) for s in nibabel.load(str(path)).shape)


def load_nifti(path: str | pathlib.Path) -> np.ndarray:
  """Whole volume with the header's scaling applied; raw integer dtype kept when unscaled."""
  import nibabel  # pylint: disable=g-import-not-at-top
  arr = np.asanyarray(nibabel.load(str(path)).dataobj)
  return np.asarray(arr)


@dataclasses.dataclass(frozen=True)
class Case:
  """One labelled volume on disk."""
  name: str
  image: str
  label: str


@dataclasses.dataclass(frozen=True)
class Window:
  """Intensity window -> [0, 1]: clip to [lo, hi], then either the fixed map (x - lo)/(hi - lo)
  or, with `minmax`, the per-volume min-max of the clipped volume (STS-3D's convention).

  `map_range` (a, b) replaces (lo, hi) in the fixed map and keeps values outside [0, 1]: the
  official BTCV training slices (clip [-175, 250] HU, then (x + 125) / 400, i.e. [-0.125, 0.94]
  before the [-1, 1] scaling). Only the `official` reproduction protocol uses it. Not part of
  the repr, which keys the decoded-volume cache: the cache holds raw volumes.
  """
  lo: float
  hi: float
  minmax: bool = False
  map_range: Optional[tuple[float, float]] = dataclasses.field(default=None, repr=False)


def _fingerprint(case: Case, label_key: str) -> str:
  h = hashlib.sha1(label_key.encode())
  for p in (case.image, case.label):
    st = os.stat(p)
    h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
  return h.hexdigest()[:12]


def _save_atomic(path: pathlib.Path, arr: np.ndarray) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
  np.save(tmp, arr)
  os.replace(tmp, path)


class VolumeSliceSource:
  """Random-access source of axial slices of labelled volumes (raw-record contract).

  Args:
    cases: the volumes of one split.
    cache_dir: where decoded volumes are kept (shared by processes; writes are atomic).
    window: intensity window applied at read time.
    label_fn: raw label volume (integer array) -> uint8 label map volume; must be a picklable
      callable (module-level function or functools.partial of one).
    label_key: text that identifies `label_fn`'s behaviour (part of the cache fingerprint).
  """

  def __init__(self, cases: list[Case], cache_dir: pathlib.Path, window: Window,
               label_fn: Callable[[np.ndarray], np.ndarray], label_key: str):
    self._cases = list(cases)
    self._cache_dir = pathlib.Path(cache_dir)
    self._window = window
    self._label_fn = label_fn
    self._label_key = f"{label_key}|window={window}"
    self._meta = [self._prepare(c) for c in self._cases]
    self._index = [(ci, z) for ci, meta in enumerate(self._meta)
                   for z in range(meta["shape"][0])]
    self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  # -- cache --------------------------------------------------------------------------------------
  def _paths(self, case: Case) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    stem = f"{case.name}-{_fingerprint(case, self._label_key)}"
    return tuple(self._cache_dir / f"{stem}{ext}" for ext in (".image.npy", ".label.npy", ".json"))

  def _prepare(self, case: Case) -> dict:
    image_path, label_path, meta_path = self._paths(case)
    if meta_path.exists():
      return json.loads(meta_path.read_text())
    image, label = load_nifti(case.image), load_nifti(case.label)
    if image.shape != label.shape or image.ndim != 3:
      raise DataError(f"{case.label}: label shape {label.shape} != image shape {image.shape} "
                      f"of {case.image} (expected matching 3D volumes)")
    if not np.issubdtype(image.dtype, np.integer):
      image = image.astype(np.float32)
    label_map = self._label_fn(label)
    self._cache_dir.mkdir(parents=True, exist_ok=True)
    # Slices first, so one slice is one contiguous block of the memory-mapped file.
    _save_atomic(image_path, np.ascontiguousarray(np.moveaxis(image, -1, 0)))
    _save_atomic(label_path, np.ascontiguousarray(np.moveaxis(label_map, -1, 0)))
    clipped = np.clip(image, self._window.lo, self._window.hi)
    meta = {"case": case.name, "shape": [int(image.shape[2]), int(image.shape[0]),
                                         int(image.shape[1])],
            "vmin": float(clipped.min()), "vmax": float(clipped.max())}
    tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)
    return meta

  def _arrays(self, ci: int) -> tuple[np.ndarray, np.ndarray]:
    if ci not in self._open:
      image_path, label_path, _ = self._paths(self._cases[ci])
      self._open[ci] = (np.load(image_path, mmap_mode="r"), np.load(label_path, mmap_mode="r"))
    return self._open[ci]

  def __getstate__(self):
    # Memory maps are per process: a worker re-opens them lazily.
    state = dict(self.__dict__)
    state["_open"] = {}
    return state

  # -- source -------------------------------------------------------------------------------------
  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> Record:
    ci, z = self._index[index]
    image, label = self._arrays(ci)
    w, meta = self._window, self._meta[ci]
    lo, hi = (meta["vmin"], meta["vmax"]) if w.minmax else (w.map_range or (w.lo, w.hi))
    x = np.clip(np.asarray(image[z], dtype=np.float32), w.lo, w.hi)
    x = (x - lo) / max(hi - lo, 1e-6)
    if w.map_range is None:
      x = np.clip(x, 0.0, 1.0)
    case = self._cases[ci].name
    return {"image": np.repeat(x[..., None], 3, axis=-1),
            "mask": np.array(label[z], dtype=np.uint8),
            "name": f"{case}_slice{z:03d}", "case": case, "slice": int(z)}

  @property
  def cases(self) -> list[Case]:
    return list(self._cases)

  def case_slices(self) -> dict[str, int]:
    """{volume: number of slices}: what a volume-level evaluation reassembles."""
    return {c.name: m["shape"][0] for c, m in zip(self._cases, self._meta)}

  def __repr__(self) -> str:
    return f"VolumeSliceSource(volumes={len(self._cases)}, slices={len(self)})"
