"""The pieces every evaluator shares: host gather, the per-case count ledger, per-case scores.

An evaluator's jitted step returns small per-example arrays (pixel counts, or probability maps
when the protocol needs them) sharded over the batch. The host loop is then always the same:

  gather the arrays and the batch's "valid"/"case"/"slice"/"name" columns from every process
  -> keep the valid rows (padding rows of the last batch are not examples)
  -> sum the counts per case (a case is one image for 2D sets, one volume for 3D sets)
  -> Dice/IoU (and HD95/ASSD) per case, then their means over cases.

`gather`, `gather_strings` and `BatchRows` are that first part; `CaseCounts` the second and
`dice_iou` / `mean_or_nan` the third. The noise z_T every evaluator feeds the model is drawn by
`inference.draw_noise`, the one function for it (training evaluation, evaluate, stability,
predict and the benchmark all use it).
"""

from __future__ import annotations

import abc
import dataclasses
import io
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdseg_jax import metrics as metrics_lib
from sdseg_jax import storage

# Case and image names cross the hosts as fixed-width UTF-8 bytes; longer names are truncated.
NAME_BYTES = 128


class Evaluator(abc.ABC):
  """What every evaluator plug-in offers (see `sdseg_jax.evaluators`).

  Built as `Evaluator(model, mesh, loader, **options)`; `run(params, vae_params,
  scale_factor)` scores the loader with inference weights ({"unet": EMA UNet,
  "vision_encoder": live encoder}) and returns a result dict; `scalars(result)` is what training
  logs (as "<prefix>/<name>") and ranks checkpoints by.
  """

  SCALARS: Tuple[str, ...] = ()

  @abc.abstractmethod
  def run(self, params: Any, vae_params: Any, scale_factor: Any) -> Dict[str, Any]:
    """Scores the evaluator's loader with these inference weights."""

  def scalars(self, result: Mapping[str, Any]) -> Dict[str, float]:
    return {name: float(result[name]) for name in self.SCALARS}


def gather(x: Any) -> np.ndarray:
  """One array (global jax.Array or this process's numpy rows) as the global numpy array.

  Rows are in global batch order: process 0's rows first, as `process_allgather(tiled=True)`.
  """
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_strings(values: Sequence[Any]) -> List[str]:
  """All processes' strings (e.g. case names) in global batch order.

  Strings cannot cross processes as arrays, so each is sent as NAME_BYTES of UTF-8 (longer
  names are cut there). With one process nothing is sent.
  """
  if jax.process_count() == 1:
    return [str(v) for v in values]
  encoded = np.array([str(v).encode()[:NAME_BYTES].ljust(NAME_BYTES, b"\0") for v in values])
  as_bytes = np.frombuffer(encoded.tobytes(), np.uint8).reshape(len(values), NAME_BYTES)
  return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in gather(as_bytes)]


@dataclasses.dataclass
class BatchRows:
  """The global view of one eval batch's bookkeeping columns (every process sees all rows).

  valid: indices of the real (non-padding) rows; case/name: per-row strings; slice: per-row slice
  index (-1 for a 2D image).
  """
  valid: np.ndarray
  case: List[str]
  slice: np.ndarray
  name: Optional[List[str]] = None

  @classmethod
  def of(cls, batch: Mapping[str, Any], with_names: bool = False) -> BatchRows:
    meta = multihost_utils.process_allgather(
        {"valid": batch["valid"], "slice": batch["slice"]}, tiled=True)
    return cls(valid=np.flatnonzero(np.asarray(meta["valid"])),
               case=gather_strings(batch["case"]), slice=np.asarray(meta["slice"]),
               name=gather_strings(batch["name"]) if with_names else None)

  @property
  def volumetric(self) -> bool:
    """True when a valid row is a slice of a volume (3D set)."""
    return bool(np.any(self.slice[self.valid] >= 0))


class CaseCounts:
  """Per-case sums of count arrays, e.g. (3,) |P∩G|, |P|, |G|, (K, 3) per class, (M, 3) per run.

  Summing counts (not scores) over a volume's slices is what makes per-volume scoring exact;
  the slices may arrive in any order and from any process. With `keep_masks`, the binary
  prediction and truth of every row are also kept, stacked in slice order by `masks(case)`, for
  the distance metrics that need the whole volume.
  """

  def __init__(self, keep_masks: bool = False):
    self.totals: Dict[str, np.ndarray] = {}
    self.volumetric = False
    self._keep_masks = keep_masks
    self._masks: Dict[str, List[Tuple[int, np.ndarray, np.ndarray]]] = {}

  def add(self, rows: BatchRows, counts: np.ndarray, pred: Optional[np.ndarray] = None,
          gt: Optional[np.ndarray] = None) -> None:
    """Adds `counts[row]` (global rows, as `rows`) to the row's case, for each valid row."""
    self.volumetric = self.volumetric or rows.volumetric
    for row in rows.valid:
      case = rows.case[row]
      self.totals[case] = self.totals.get(case, 0) + np.asarray(counts[row]).astype(np.int64)
      if self._keep_masks:
        self._masks.setdefault(case, []).append((int(rows.slice[row]), pred[row], gt[row]))

  def cases(self) -> List[str]:
    return sorted(self.totals)

  def masks(self, case: str) -> Tuple[np.ndarray, np.ndarray]:
    """(prediction, truth) of a case: one image, or a volume's slices stacked in slice order."""
    ordered = sorted(self._masks[case], key=lambda item: item[0])
    if ordered[0][0] < 0:  # 2D images carry slice -1
      return ordered[0][1], ordered[0][2]
    return np.stack([m for _, m, _ in ordered]), np.stack([m for _, _, m in ordered])

  @property
  def dimension(self) -> str:
    return "3d" if self.volumetric else "2d"


def binary_counts(pred: jax.Array, label: jax.Array) -> jax.Array:
  """(B, 3) |P∩G|, |P|, |G| per example of boolean predictions vs labels (> 0 = foreground)."""
  gt = label > 0
  return jnp.stack([jnp.sum(pred & gt, axis=(1, 2)), jnp.sum(pred, axis=(1, 2)),
                    jnp.sum(gt, axis=(1, 2))], axis=-1)


def dice_iou(counts: np.ndarray, empty_convention: str) -> Dict[str, float]:
  """Dice and IoU of one case's (3,) counts, with the chosen empty-mask convention."""
  inter, p, g = (int(v) for v in counts)
  return {"dice": metrics_lib.dice_from_counts(inter, p, g, empty_convention),
          "iou": metrics_lib.iou_from_counts(inter, p, g, empty_convention)}


def mean_or_nan(values: Sequence[float]) -> float:
  """Mean of the finite values (NaN-aware, e.g. undefined distances), NaN when there is none."""
  array = np.asarray(values, np.float64)
  finite = array[np.isfinite(array)]
  return float(finite.mean()) if finite.size else float("nan")


def write_panels(panels: List[np.ndarray], path: epath.Path) -> Optional[epath.Path]:
  """Stacks the panel strips vertically into one PNG (process 0 only; local or gs://)."""
  if not panels or jax.process_index() != 0:
    return None
  png = io.BytesIO()
  Image.fromarray(np.concatenate(panels, axis=0)).save(png, format="PNG")
  storage.write_bytes_atomic(path, png.getvalue())
  return path
