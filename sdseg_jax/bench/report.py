"""One benchmark run: JAX and the PyTorch baseline on the same batch sizes, merged into a report.

The baseline runs in the same process on the same batch sizes, so both stacks see the same
machine state; `rounds` alternates the two stacks several times, which matters on a shared
machine whose load changes during the run. The report is the JSON that `python -m
sdseg_jax.benchmark --json` writes; `format_table` is the summary BENCHMARKS.md tables are copied
from.
"""

import datetime
import os
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import ml_collections

from sdseg_jax.bench import jax_runners
from sdseg_jax.bench import machine
from sdseg_jax.bench import torch_runner as torch_lib


def _merge_rounds(results: List[Dict[str, Any]]) -> Dict[str, Any]:
  """One entry from several rounds of the same (suite, batch, dtype): median over all times."""
  merged = dict(results[-1])
  times = [t for r in results for t in r["times_s"]]
  median = statistics.median(times)
  merged.update(times_s=times, iters=len(times), median_s=median, rounds=len(results),
                images_per_s=merged["batch"] / median, s_per_image=median / merged["batch"],
                round_images_per_s=[r["images_per_s"] for r in results],
                load_before=results[0]["load_before"])
  if "compile_s" in merged:
    merged["compile_s"] = results[0]["compile_s"]
  if "cpu_s_per_image" in merged:
    merged["cpu_s_per_image"] = statistics.median(r["cpu_s_per_image"] for r in results)
  return merged


def run(config: ml_collections.ConfigDict, suites: Sequence[str], batches: Sequence[int],
        dtypes: Sequence[str], *, warmup: int = 2, iters: int = 5, rounds: int = 1,
        baseline: Optional[str] = None, torch_dtypes: Optional[Sequence[str]] = None,
        torch_device: Optional[str] = None, torch_threads: int = 0, torch_modules: Any = None,
        microbatches: Sequence[Optional[int]] = (None,), command: str = "",
        log: Callable[[str], None] = print,
        partial: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
  """Runs every (suite, batch, dtype) for JAX and the baseline; returns the JSON report.

  The headline figure (top-level "images_per_s" of "jax" and "torch") is the first suite, the
  largest batch and the first dtype (and inference microbatch setting) of each stack.
  `partial`, if given, receives the report so far after every batch size, so a run cut short
  by a time limit still leaves its finished measurements behind.
  """
  info = machine.device_info()
  log(f"device: {info['device_kind']} ({info['platform']}), peak basis: {info['peak_basis']}")
  torch_runner = None
  if baseline == "torch":
    if not machine.is_full_size(config) and torch_modules is None:
      log("warning: the PyTorch baseline is the full-size model, the JAX one is not: the "
          "ratio compares different models")
    torch_runner = torch_lib.TorchBaseline(torch_device, torch_threads, torch_modules)
    if torch_dtypes is None:
      torch_dtypes = ["fp32"] if torch_runner.device == "cpu" else ["fp32", "bf16"]
  elif baseline:
    raise ValueError(f"unknown baseline {baseline!r}; expected 'torch'")
  batches = sorted(set(batches))  # ascending: device peak memory is a process-wide maximum
  jax_results: List[Dict[str, Any]] = []
  torch_results: List[Dict[str, Any]] = []
  for suite in suites:
    variants = [(d, m) for d in dtypes for m in (microbatches if suite == "infer" else [None])]
    for dtype, microbatch in variants:
      if suite == "infer":
        runner = jax_runners.JaxInference(config, dtype, microbatch=microbatch)
      else:
        runner = jax_runners.JaxTrain(config, dtype)
      for batch in batches:
        jax_rounds, torch_rounds = [], {d: [] for d in (torch_dtypes or [])}
        for r in range(rounds):
          res = runner.measure(batch, warmup if r == 0 else min(warmup, 1), iters, info)
          jax_rounds.append(res)
          log(_line("jax", res))
          if torch_runner is not None and (dtype, microbatch) == variants[0]:
            for tdtype in torch_dtypes:
              tres = torch_runner.measure(suite, batch, tdtype,
                                          warmup if r == 0 else min(warmup, 1), iters, info)
              torch_rounds[tdtype].append(tres)
              log(_line("torch", tres))
              torch_runner.release()
        jax_results.append(_merge_rounds(jax_rounds))
        torch_results.extend(_merge_rounds(v) for v in torch_rounds.values() if v)
        if partial is not None:
          partial(dict(_report(jax_results, torch_results, suites, torch_runner, info, command,
                               warmup, iters, rounds, config), complete=False))
      del runner
  return dict(_report(jax_results, torch_results, suites, torch_runner, info, command, warmup,
                      iters, rounds, config), complete=True)


def _report(jax_results, torch_results, suites, torch_runner, info, command, warmup, iters,
            rounds, config) -> Dict[str, Any]:
  """The JSON report of the measurements so far."""
  report = {"jax": _stack_block(jax_results, suites[0], {"jax": jax.__version__}),
            "torch": (_stack_block(torch_results, suites[0], torch_runner.version)
                      if torch_runner is not None else None),
            "device": info, "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_end": machine.load_average(),
            "settings": {"warmup": warmup, "iters": iters, "rounds": rounds,
                         "image_size": config.model.vae.resolution,
                         "xla_flags": os.environ.get("XLA_FLAGS", "")}}
  report["ratios"] = _ratios(jax_results, torch_results)
  head = report["jax"].get("headline")
  report["ratio"] = None
  if report["torch"] and head:
    report["ratio"] = _headline_ratio(report["ratios"], head)
  return report


def _line(stack: str, r: Dict[str, Any]) -> str:
  mem = r.get("memory", {}).get("peak_bytes")
  compile_s = r.get("compile_s")
  return (f"[{stack:5s}] {r['suite']:5s} batch {r['batch']:3d} {r['dtype']:8s} "
          f"{r['images_per_s']:9.3f} img/s  {r['median_s']:8.3f} s/step"
          + (f"  compile {compile_s:6.1f} s" if compile_s is not None else "")
          + (f"  mem {mem / 2**30:6.2f} GiB" if mem else "")
          + f"  load {r.get('load_before')}->{r.get('load_after')}")


def _stack_block(results: List[Dict[str, Any]], suite: str,
                 version: Dict[str, Any]) -> Dict[str, Any]:
  block: Dict[str, Any] = {"images_per_s": None, "headline": None, "version": version,
                           "results": results}
  chosen = [r for r in results if r["suite"] == suite]
  if chosen:
    first = (chosen[0]["dtype"], chosen[0].get("microbatch"))
    best = max((r for r in chosen if (r["dtype"], r.get("microbatch")) == first),
               key=lambda r: r["batch"])
    block["images_per_s"] = best["images_per_s"]
    block["headline"] = {"suite": suite, "batch": best["batch"], "dtype": best["dtype"]}
    if "microbatch" in best:
      block["headline"]["microbatch"] = best["microbatch"]
    block["compile_s"] = best.get("compile_s")
  return block


def _ratios(jax_results, torch_results) -> List[Dict[str, Any]]:
  """JAX / PyTorch images/s for every (suite, batch) measured by both, same dtype first."""
  out = []
  for j in jax_results:
    for t in torch_results:
      if (t["suite"], t["batch"]) == (j["suite"], j["batch"]):
        out.append({"suite": j["suite"], "batch": j["batch"], "jax_dtype": j["dtype"],
                    "jax_microbatch": j.get("microbatch"),
                    "torch_dtype": t["dtype"],
                    "same_dtype": torch_lib.TORCH_NAME[j["dtype"]] == t["dtype"],
                    "ratio": j["images_per_s"] / t["images_per_s"]})
  return out


def _headline_ratio(ratios, head) -> Optional[float]:
  same = [r for r in ratios if (r["suite"], r["batch"], r["jax_dtype"], r["jax_microbatch"]) ==
          (head["suite"], head["batch"], head["dtype"], head.get("microbatch"))]
  same.sort(key=lambda r: not r["same_dtype"])  # matching precision first
  return same[0]["ratio"] if same else None


def format_table(report: Dict[str, Any]) -> str:
  """A readable summary of a report (also what BENCHMARKS.md tables are copied from)."""
  lines = [f"device: {report['device']['device_kind']} x{report['device']['num_devices']} "
           f"({report['device']['cpu_model']}), jax {report['device']['jax']}"
           + (f", torch {report['torch']['version']['torch']}" if report["torch"] else ""),
           f"MFU basis: {report['device']['peak_basis']}",
           "| stack | suite | batch | dtype | microbatch | img/s | s/img | compile s | "
           "peak mem GiB | MFU | TFLOP/s | load 1m before/after |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for stack in ("jax", "torch"):
    if not report.get(stack):
      continue
    for r in report[stack]["results"]:
      mem = r.get("memory", {}).get("peak_bytes")
      lb, la = r.get("load_before"), r.get("load_after")
      lines.append(
          f"| {stack} | {r['suite']} | {r['batch']} | {r['dtype']} | "
          f"{r.get('microbatch', '-') or 'whole'} | {r['images_per_s']:.3f} | "
          f"{r['s_per_image']:.3f} | "
          + (f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-") + " | "
          + (f"{mem / 2**30:.2f}" if mem else "-") + " | "
          + (f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a") + " | "
          + (f"{r['achieved_tflops']:.3f}" if r.get("achieved_tflops") else "-") + " | "
          + f"{lb[0] if lb else '?'} / {la[0] if la else '?'} |")
  for r in report.get("ratios", []):
    mb = r.get("jax_microbatch")
    lines.append(f"JAX/PyTorch {r['suite']} batch {r['batch']} ({r['jax_dtype']}"
                 + (f", microbatch {mb}" if mb else "") + f" vs {r['torch_dtype']}): "
                 f"{r['ratio']:.2f}x")
  return "\n".join(lines)
