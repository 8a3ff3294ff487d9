"""The reproduction report: per-seed and aggregated scores, beside the paper's figures.

`python -m sdseg_jax.reproduce` gathers, for every seed, the JSON that `evaluate` and
`stability` write (their own outputs, read back, so the report cannot disagree with them) and
hands them to `build_report`, which adds only statistics:

  * per seed: the evaluator's mean (copied), and a 95% bootstrap interval over the cases;
  * over seeds: mean and std (ddof=1) of the per-seed means, a 95% bootstrap interval over the
    seeds, and one over the cases (each case's score averaged over the seeds first, so that the
    interval describes case-to-case variation of the seed-averaged model).

Bootstrap intervals are scipy's percentile bootstrap with a fixed generator (seed 0, 9999
resamples): rerunning the report gives the same numbers. An interval needs at least two values;
with one seed the interval over seeds is reported as null ("n/a" in the markdown).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import scipy.stats

# Dice / IoU (%) of SDSeg as printed in the paper's comparison table, where we have them.
# REFUGE2 and CVC-ClinicDB are quoted from a later paper by the same group that reprints the
# table; we could not check them against the PDF here. The other datasets: not on record.
PAPER_FIGURES: Dict[str, Dict[str, float]] = {
    "refuge": {"dice": 88.7, "iou": 80.9},
    "cvc": {"dice": 93.6, "iou": 89.3},
}
PAPER_SOURCE = ("SDSeg paper (MICCAI 2024), Table 1, as reprinted by the LEAF paper (MICCAI 2025, "
                "same group); not checked against the SDSeg PDF")
PERCENT_METRICS = ("dice", "iou")  # fractions in the evaluator's JSON, percent in the report
METRICS = ("dice", "iou", "hd95", "assd")
BOOTSTRAP_RESAMPLES = 9999
CONFIDENCE = 0.95


def bootstrap_interval(values: Sequence[float], seed: int = 0) -> Optional[List[float]]:
  """95% percentile-bootstrap interval of the mean of the finite `values`; None if < 2."""
  data = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  if data.size < 2:
    return None
  if np.all(data == data[0]):  # scipy warns and returns NaN for a degenerate sample
    return [float(data[0]), float(data[0])]
  result = scipy.stats.bootstrap((data,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES,
                                 confidence_level=CONFIDENCE, method="percentile",
                                 rng=np.random.default_rng(seed))
  return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def _scale(metric: str, value: Optional[float]) -> Optional[float]:
  if value is None or not math.isfinite(value):
    return None
  return 100.0 * value if metric in PERCENT_METRICS else float(value)


def _case_values(evaluation: Mapping[str, Any], metric: str) -> Dict[str, float]:
  out = {}
  for case, values in evaluation["cases"].items():
    v = values.get(metric)
    if v is not None and math.isfinite(v):
      out[case] = float(v)
  return out


def summarize_sampler(evaluations: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
  """Per-seed and over-seed statistics of one sampler's evaluation JSONs (one per seed)."""
  metrics = [m for m in METRICS if m in evaluations[0]["mean"]]
  per_seed, over_seeds = [], {}
  for evaluation in evaluations:
    row = {}
    for m in metrics:
      cases = _case_values(evaluation, m)
      interval = bootstrap_interval(list(cases.values()))
      row[m] = {"mean": _scale(m, evaluation["mean"][m]),
                "ci_cases": None if interval is None else [_scale(m, v) for v in interval],
                "n_cases": len(cases)}
    per_seed.append(row)
  for m in metrics:
    means = [row[m]["mean"] for row in per_seed if row[m]["mean"] is not None]
    by_case: Dict[str, List[float]] = {}
    for evaluation in evaluations:
      for case, v in _case_values(evaluation, m).items():
        by_case.setdefault(case, []).append(v)
    case_means = [float(np.mean(v)) for v in by_case.values()]
    ci_cases = bootstrap_interval(case_means)
    over_seeds[m] = {
        "mean": float(np.mean(means)) if means else None,
        "std": float(np.std(means, ddof=1)) if len(means) >= 2 else None,
        "ci_seeds": bootstrap_interval(means),
        "ci_cases": None if ci_cases is None else [_scale(m, v) for v in ci_cases],
        "n_seeds": len(means), "n_cases": len(case_means)}
  return {"metrics": metrics, "per_seed": per_seed, "over_seeds": over_seeds}


def summarize_stability(results: Sequence[Optional[Mapping[str, Any]]]) -> Optional[Dict]:
  """Per-seed and over-seed stability figures (SSIM, MS-SSIM, PSNR, pairwise Dice, GT Dice)."""
  if not results or any(r is None for r in results):
    return None
  def pick(r):
    inst = r["instance"]
    return {"ssim": inst["ssim"]["mean"],
            "ms_ssim": None if r.get("ms_ssim_skipped") else inst["ms_ssim"]["mean"],
            "psnr": inst["psnr"]["mean"], "pairwise_dice": r["pairwise_dice"]["mean"],
            "gt_dice_mean": r["dice_across_runs"]["mean"],
            "gt_dice_std": r["dice_across_runs"]["std"]}
  per_seed = [pick(r) for r in results]
  over = {}
  for name in per_seed[0]:
    values = [row[name] for row in per_seed if row[name] is not None]
    over[name] = {"mean": float(np.mean(values)) if values else None,
                  "std": float(np.std(values, ddof=1)) if len(values) >= 2 else None}
  return {"runs": results[0]["runs"], "ms_ssim_skipped": results[0].get("ms_ssim_skipped"),
          "per_seed": per_seed, "over_seeds": over}


def build_report(*, dataset: str, config_name: str, protocol: Mapping[str, Any],
                 seeds: Sequence[Mapping[str, Any]], environment: Mapping[str, Any]
                 ) -> Dict[str, Any]:
  """The report's JSON. `seeds`: one dict per seed with "seed", "workdir", "train" (steps,
  wall_seconds, devices, precision), "evals" ({sampler name: evaluate JSON}), "stability"
  (stability JSON or None) and "export" (path, sha256, bytes, dtype, or None)."""
  samplers = list(seeds[0]["evals"])
  # Seeds trained side by side share one job's wall time.
  wall = sum(s["train"]["wall_seconds"] / s["train"].get("seed_lanes", 1) for s in seeds)
  device_hours = sum(s["train"]["wall_seconds"] * s["train"]["devices"] for s in seeds) / 3600
  return {
      "dataset": dataset, "config": config_name, "protocol": dict(protocol),
      "seeds": [s["seed"] for s in seeds],
      "paper": {"figures": PAPER_FIGURES.get(dataset), "source": PAPER_SOURCE},
      "results": {name: summarize_sampler([s["evals"][name] for s in seeds])
                  for name in samplers},
      "stability": summarize_stability([s.get("stability") for s in seeds]),
      "runs": [{k: s.get(k) for k in ("seed", "workdir", "train", "export")} for s in seeds],
      "cost": {"train_wall_seconds": wall, "train_device_hours": device_hours},
      "environment": dict(environment),
  }
