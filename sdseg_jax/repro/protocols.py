"""Evaluation protocols of a reproduction: ours (`clean`) and the official code's (`official`).

`clean` is what every config does by default: splits proposed from SORTED file names with a
seed and recorded in the workdir, the checkpoint selected on the validation split, one fixed
noise per image. `official` redoes what the official SDSeg code did, so that its numbers can be
compared apples to apples with the paper, flaws included:

  * model selection on the TEST split (the official `val_avg_dice` monitor reads the test set);
  * REFUGE2: trained on all 800 images of Training400 + Validation400 (nothing held out);
  * one noise z_T drawn per evaluation run and reused for every image (the official `log_dice`);
  * BTCV: training slices clipped to [-175, 250] HU and mapped by (x + 125) / 400, test volumes
    clipped to [-125, 275] and min-max normalised per volume.

What the official code did and we cannot redo: its CVC/Kvasir splits came from an unsorted
`glob` (they depend on the file system), so both protocols use our seeded splits there.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List

import ml_collections

from sdseg_jax import errors
from sdseg_jax.models import sdseg

PROTOCOLS = ("clean", "official")

OFFICIAL_FLAWS = (
    "the checkpoint is selected on the TEST split, so the test score is optimistically biased",
    "one noise z_T per evaluation run is shared by every image (the official log_dice), so a "
    "run's score depends on a single draw",
)
_DATASET_FLAWS = {
    "refuge": "REFUGE2 trains on Training400 + Validation400 (800 images), nothing held out",
    "btcv": "BTCV training and test intensities differ (train: clip [-175, 250] HU, "
            "(x + 125) / 400; test: clip [-125, 275], per-volume min-max)",
}

# What `clean` changes against the official code, per dataset (all datasets share the first).
_CLEAN_DEVIATIONS = [
    "splits from sorted file names with a seed, written to WORKDIR/splits (official: unsorted "
    "glob for CVC/Kvasir)",
    "checkpoint selected on the validation split (official: on the test split)",
    "one fixed noise z_T per image, the same at every evaluation (official: one per run)",
]
_CLEAN_DATASET_DEVIATIONS = {
    "refuge": ["REFUGE2 challenge split: train Training400, validate on Validation400, test "
               "Test400 (official: train on 800, select on the test set)"],
    "btcv": ["BTCV: one HU window [-125, 275] mapped linearly to [0, 1] for train AND test "
             "(official: different train and test intensities)"],
    "sts3d": ["STS-3D: the same label preprocessing for train and test, no slice skipped, and "
              "validation volumes held out of training",
              "STS-3D: the official `\"class id\"` key bug is not reproduced"],
}


def apply(config: ml_collections.ConfigDict, protocol: str) -> Dict[str, Any]:
  """Sets `config` (unlocked) up for `protocol`; returns the protocol's description."""
  if protocol not in PROTOCOLS:
    raise errors.ConfigError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
  dataset = config.data.name
  flaws: List[str] = []
  if protocol == "official":
    config.eval.split = "test"
    config.eval.select_on_test = True
    config.eval.noise = "shared"
    if dataset == "refuge":
      config.data.split = "sdseg"
      config.data.val_size = 0
    if dataset == "btcv":
      config.data.intensity = "official"
    flaws = list(OFFICIAL_FLAWS) + ([_DATASET_FLAWS[dataset]] if dataset in _DATASET_FLAWS
                                    else [])
    deviations = ["CVC/Kvasir: our seeded splits (the official unsorted glob cannot be redone)"]
  else:
    deviations = list(_CLEAN_DEVIATIONS) + _CLEAN_DATASET_DEVIATIONS.get(dataset, [])
  return {
      "name": protocol,
      "flaws": flaws,
      "selection_split": str(config.eval.split),
      "test_split": "test",
      "checkpoint": "best",
      "noise": str(config.eval.noise),
      "precision": precision(config),
      "choices": [f"dataset {dataset}, data split scheme {config.data.get('split') or '-'}",
                  f"checkpoint selected on the {config.eval.split} split by Dice, EMA UNet",
                  f"evaluation noise: {config.eval.noise}",
                  f"{config.train.max_steps} training steps, global batch "
                  f"{config.train.global_batch_size}"],
      "deviations": deviations,
  }


def precision(config: ml_collections.ConfigDict) -> str:
  """The compute precision the run uses on THIS machine ("auto" resolved), in words."""
  dtype = sdseg.resolve_compute_dtype(str(config.model.compute_dtype))
  matmul = str(config.model.get("precision", "default"))
  if dtype == "float32" and matmul == "highest":
    return "float32, highest matmul precision (the paper's fp32 training)"
  return f"{dtype} compute, {matmul} matmul precision"


def config_hash(config: ml_collections.ConfigDict) -> str:
  """Identifies the study's config (the seed excluded): a rerun must not change it."""
  values = config.to_dict()
  values.pop("seed", None)
  return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
