"""Converted-weight artifacts: one `.npz` file of float32 arrays plus a JSON metadata entry.

A flat npz (paths joined by '/') is readable by numpy alone, needs no pickle (loaded with
`allow_pickle=False`) and is written atomically (temporary file + rename locally, one upload on
gs://), so an interrupted conversion never leaves a half-written artifact behind.
"""

import json
import os
from typing import Any, Dict, Mapping, Tuple

from flax import traverse_util
import numpy as np

from sdseg_jax import errors
from sdseg_jax import storage

_META_KEY = "__meta__"


class ArtifactError(errors.UserFacingError, ValueError):
  """A converted-weights file is missing, corrupt or does not fit the configured model."""


def save(path: os.PathLike, tree: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  """Writes `tree` (nested dicts of arrays) and `meta` (JSON-serialisable) atomically."""
  arrays = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
  arrays[_META_KEY] = np.frombuffer(json.dumps(dict(meta)).encode(), np.uint8)
  with storage.open_atomic(path) as f:  # streamed: no in-memory copy of the whole file
    np.savez(f, **arrays)


def load(path: os.PathLike) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Reads an artifact written by `save`: (tree of numpy arrays, metadata)."""
  path = storage.path(path)
  if not path.is_file():
    raise ArtifactError(f"{path}: converted weights not found")
  try:
    with np.load(storage.read_bytes(path), allow_pickle=False) as npz:
      flat = {key: npz[key] for key in npz.files}
  except Exception as e:  # zipfile/numpy raise several types for corrupt files.
    raise ArtifactError(f"{path}: not a readable sdseg_jax weights file ({e})") from None
  if _META_KEY not in flat:
    raise ArtifactError(f"{path}: no metadata; not written by sdseg_jax.convert")
  meta = json.loads(flat.pop(_META_KEY).tobytes().decode())
  return traverse_util.unflatten_dict(flat, sep="/"), meta


def check_fits(tree: Any, abstract: Any, what: str, path: os.PathLike) -> None:
  """Raises ArtifactError unless `tree` has exactly the structure and shapes of `abstract`."""
  got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
  want = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if tuple(got[k]) != want[k])
  if missing or unexpected or wrong:
    details = []
    if missing:
      details.append(f"missing {missing[:3]}")
    if unexpected:
      details.append(f"unexpected {unexpected[:3]}")
    if wrong:
      details.append("shape mismatch " + ", ".join(
          f"{k}: file {tuple(got[k])} vs model {want[k]}" for k in wrong[:3]))
    raise ArtifactError(f"{path}: {what} weights do not fit the configured model: "
                        + "; ".join(details))
