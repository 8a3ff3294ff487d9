"""report.json -> report.md: the same numbers, laid out for a reader and a paper's table."""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

_LABELS = {"dice": "Dice (%)", "iou": "IoU (%)", "hd95": "HD95 (px)", "assd": "ASSD (px)"}


def _num(value: Optional[float], digits: int = 2) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(values: Optional[Sequence[float]]) -> str:
  return "n/a" if values is None else f"[{values[0]:.2f}, {values[1]:.2f}]"


def _sampler_title(name: str) -> str:
  if name == "single_step":
    return "Single step (t = 999), the paper's setting"
  return f"DDIM, {name.removeprefix('ddim')} steps"


def _results_section(name: str, result: Mapping[str, Any], paper: Optional[Mapping[str, float]],
                     seeds: Sequence[int]) -> List[str]:
  metrics = result["metrics"]
  lines = [f"### {_sampler_title(name)}", "",
           "| metric | ours: mean over seeds | std over seeds | 95% CI over seeds "
           "| 95% CI over cases | paper |", "|---|---|---|---|---|---|"]
  for m in metrics:
    o = result["over_seeds"][m]
    on_record = paper.get(m) if paper else None
    lines.append(f"| {_LABELS[m]} | {_num(o['mean'])} | {_num(o['std'])} | "
                 f"{_interval(o['ci_seeds'])} | {_interval(o['ci_cases'])} | "
                 f"{_num(on_record, 1) if on_record is not None else 'not on record'} |")
  lines += ["", "Per seed (mean over cases, 95% CI over cases):", "",
            "| seed | " + " | ".join(_LABELS[m] for m in metrics) + " |",
            "|---|" + "---|" * len(metrics)]
  for seed, row in zip(seeds, result["per_seed"]):
    cells = [f"{_num(row[m]['mean'])} {_interval(row[m]['ci_cases'])}" for m in metrics]
    lines.append(f"| {seed} | " + " | ".join(cells) + " |")
  return lines + [""]


def _stability_section(stability: Optional[Mapping[str, Any]], seeds: Sequence[int]
                       ) -> List[str]:
  if stability is None:
    return ["## Stability", "", "Not run (--stability-runs 0).", ""]
  names = [("ssim", "SSIM"), ("ms_ssim", "MS-SSIM"), ("psnr", "PSNR (dB)"),
           ("pairwise_dice", "pairwise Dice"), ("gt_dice_mean", "GT Dice, mean over runs"),
           ("gt_dice_std", "GT Dice, std over runs")]
  lines = ["## Stability", "",
           f"{stability['runs']} single-step runs per seed, one noise per run shared by every "
           "image (the paper's protocol); maps compared with run 0.", ""]
  if stability["ms_ssim_skipped"]:
    lines += [f"MS-SSIM skipped: {stability['ms_ssim_skipped']}.", ""]
  lines += ["| | " + " | ".join(label for _, label in names) + " |",
            "|---|" + "---|" * len(names)]
  over = stability["over_seeds"]
  lines.append("| mean over seeds | " + " | ".join(_num(over[n]["mean"], 4) for n, _ in names)
               + " |")
  lines.append("| std over seeds | " + " | ".join(_num(over[n]["std"], 4) for n, _ in names)
               + " |")
  for seed, row in zip(seeds, stability["per_seed"]):
    lines.append(f"| seed {seed} | " + " | ".join(_num(row[n], 4) for n, _ in names) + " |")
  return lines + [""]


def render(report: Mapping[str, Any]) -> str:
  protocol = report["protocol"]
  seeds = report["seeds"]
  lines = [f"# SDSeg reproduction: {report['dataset']} ({report['config']})", ""]
  if protocol.get("flaws"):
    lines += ["**Protocol `official`: these numbers carry the official code's known flaws:**", ""]
    lines += [f"- {flaw}" for flaw in protocol["flaws"]] + [""]
  precision = protocol.get("precision", "")
  lines += [f"Protocol: `{protocol['name']}`. Seeds: {', '.join(map(str, seeds))}. "
            f"Precision: {precision}. Split scored: {protocol.get('test_split', 'test')}.", ""]
  lines += ["## Test results", ""]
  paper = report["paper"]["figures"]
  for name, result in report["results"].items():
    lines += _results_section(name, result, paper, seeds)
  lines += [f"Paper figures: {report['paper']['source']}." if paper else
            "Paper figures: not on record for this dataset.", ""]
  lines += _stability_section(report["stability"], seeds)
  lines += ["## Protocol in effect", ""]
  lines += [f"- {item}" for item in protocol.get("choices", [])]
  lines += ["", "Deviations from the official code in effect:", ""]
  lines += [f"- {item}" for item in protocol.get("deviations", [])] + [""]
  lines += ["## Runs and exports", "", "| seed | steps | train wall (s) | devices | export | "
            "sha256 |", "|---|---|---|---|---|---|"]
  for run in report["runs"]:
    t, export = run["train"], run.get("export") or {}
    lines.append(f"| {run['seed']} | {t['steps']} | {t['wall_seconds']:.0f} | {t['devices']} | "
                 f"{export.get('path', 'none')} ({export.get('dtype', '-')}, "
                 f"{export.get('bytes', 0) / 2**20:.1f} MiB) | `{export.get('sha256', '-')}` |")
  cost = report["cost"]
  env = report["environment"]
  lines += ["", f"Training wall time {cost['train_wall_seconds']:.0f} s in all, "
            f"{cost['train_device_hours']:.3f} device-hours "
            f"(wall time x devices, summed over seeds).", "", "## Environment", "",
            f"- hardware: {env.get('hardware')}",
            f"- python {env.get('python')}; " + ", ".join(
                f"{k} {v}" for k, v in sorted(env.get("packages", {}).items()) if v),
            f"- date: {env.get('date')}; command: `{env.get('command')}`", ""]
  return "\n".join(lines)
