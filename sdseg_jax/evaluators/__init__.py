"""Evaluators as plug-ins, in the manner of big_vision's `evaluators/`.

Each module here defines one `Evaluator(model, mesh, loader, **options)` with
`run(params, vae_params, scale_factor) -> dict` and `scalars(result)`:

  dice        Dice/IoU per case (optionally HD95/ASSD), single step or DDIM: the paper's score,
              what training ranks checkpoints by and what `python -m sdseg_jax.evaluate` prints.
  multiclass  per-class Dice/IoU of a class-embedding model (label-map ground truth).
  stability   the paper's stability protocol over M noise seeds (`python -m sdseg_jax.stability`).

`common` holds what they share (host gather, per-case counts, scores). Training runs the
evaluators that `config.evals` lists: {prefix: {"type": <module>, **options}}; the default
{"eval": {"type": "dice"}} logs eval/dice and eval/iou, the metric "best" checkpoints use.
Modules are imported by name on first use, so a run pays only for the evaluators it lists.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Dict, List, Mapping, Tuple

NAMES = ("dice", "multiclass", "stability")


def get(name: str) -> type:
  """The Evaluator class of plug-in `name`; a ValueError naming the known ones otherwise."""
  if name not in NAMES:
    raise ValueError(f"unknown evaluator type {name!r}; known types: {', '.join(NAMES)}")
  return importlib.import_module(f"sdseg_jax.evaluators.{name}").Evaluator


def specs(config: Any) -> Dict[str, Dict[str, Any]]:
  """{prefix: {"type", **options}} from `config.evals` (checked), with the eval defaults.

  Every evaluator gets config.eval.noise_seed and config.eval.empty_convention; the "dice"
  evaluator also config.eval.num_panels and config.eval.noise. Options in the entry override them.
  """
  entries = config.get("evals", None)
  if entries is None:
    entries = {"eval": {"type": "dice"}}
  out = {}
  for prefix, entry in dict(entries).items():
    entry = dict(entry)
    kind = entry.pop("type", None)
    if kind is None:
      raise ValueError(f"config.evals.{prefix} has no 'type' (one of {', '.join(NAMES)})")
    options = {"noise_seed": config.eval.noise_seed,
               "empty_convention": config.eval.empty_convention}
    if kind == "dice":
      options["num_panels"] = config.eval.num_panels
      options["noise"] = config.eval.get("noise", "per_image")
    options.update(entry)
    try:  # an option the evaluator does not take fails here, before any training
      inspect.signature(get(kind)).bind(None, None, None, **options)
    except TypeError as e:
      raise ValueError(f"config.evals.{prefix} (type {kind!r}): {e}") from e
    out[str(prefix)] = {"type": kind, **options}
  return out


def from_config(config: Any, model: Any, mesh: Any, loader: Any) -> List[Tuple[str, Any]]:
  """[(prefix, evaluator)] of `config.evals`, all scoring `loader` (config.eval.split)."""
  built = []
  for prefix, spec in specs(config).items():
    options: Mapping[str, Any] = {k: v for k, v in spec.items() if k != "type"}
    built.append((prefix, get(spec["type"])(model, mesh, loader, **options)))
  return built
