"""Per-class Dice/IoU of a class-embedding model (the official multi-class protocol).

Needs label-map ground truth (`config.data.target = "multiclass"`, e.g. BTCV). For every eval
batch the model is asked once per class (`inference.predict_labels`, one batched call) and the
argmax label map is compared with the truth class by class: (K, 3) pixel counts per example,
summed per case (per volume for 3D sets), then Dice per class per case, mean over cases, then
over classes 1..K-1 (`metrics.summarize_class_counts`). Noise as the Dice evaluator: one z_T
per image from fold_in(key(noise_seed), batch index).
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import numpy as np

from sdseg_jax import inference
from sdseg_jax import metrics as metrics_lib
from sdseg_jax import sharding as sharding_lib
from sdseg_jax.evaluators import common
from sdseg_jax.models import sdseg


class Evaluator(common.Evaluator):
  """Scores a class-embedding model class by class on an eval loader."""

  SCALARS = ("dice", "iou")

  def __init__(self, model: sdseg.SDSeg, mesh: jax.sharding.Mesh, loader: Any, *,
               noise_seed: int = 0, empty_convention: str = "official", ddim_steps: int = 0,
               ddim_eta: float = 1.0):
    if model.unet.num_classes is None:
      raise ValueError("the multiclass evaluator needs a class-embedding model "
                       "(config.model.unet.num_classes)")
    self.model, self.mesh, self.loader = model, mesh, loader
    self.noise_seed, self.empty_convention = noise_seed, empty_convention

    def labels_fn(params, vae_params, image, scale_factor, key):
      z_T = inference.draw_noise(model, key, image.shape[0])
      return inference.predict_labels(model, params, vae_params, image, z_T, scale_factor,
                                      ddim_steps=ddim_steps, ddim_eta=ddim_eta,
                                      rng=jax.random.fold_in(key, 1))["labels"]
    self._labels = jax.jit(labels_fn)

  def run(self, params: Any, vae_params: Any, scale_factor: Any) -> Dict[str, Any]:
    """{"dice", "iou" (means over classes), "per_class": {c: {...}}, "cases": {...}}."""
    k = self.model.unet.num_classes
    batch_sh = sharding_lib.batch_sharding(self.mesh)
    ledger = common.CaseCounts()
    key = jax.random.key(self.noise_seed)
    for index, batch in enumerate(self.loader):
      image = jax.make_array_from_process_local_data(batch_sh, np.asarray(batch["image"]))
      labels = common.gather(self._labels(params, vae_params, image, scale_factor,
                                          jax.random.fold_in(key, index)))
      gt = common.gather(batch["label"])
      counts = np.zeros((labels.shape[0], k, 3), np.int64)
      rows = common.BatchRows.of(batch)
      for row in rows.valid:
        counts[row] = metrics_lib.class_counts(labels[row], gt[row], k)
      ledger.add(rows, counts)
    return metrics_lib.summarize_class_counts(ledger.totals, self.empty_convention)
