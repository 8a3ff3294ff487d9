"""Where the device time goes: a profiler trace of train steps and inference calls, reduced to ops.

  python -m sdseg_jax.benchmark_profile --batch 32 --dtype bfloat16 --steps 3 \
      --trace-dir /tmp/sdseg_trace --json top_ops.json --csv top_ops.csv

Compiles the benchmark's train step and single-step inference (`sdseg_jax.benchmark`, full-size
model, random weights) for one batch size, runs each once untraced, then records ONE
`jax.profiler` trace of `--steps` train steps followed by `--steps` inference calls. A raw trace
of the full model is tens of MB, too big to bring back from a lent machine, so it is reduced
where it was taken: device time summed per XLA op (the `hlo_op` of every kernel), the top
`--top` ops written as JSON and CSV with their module (train step or inference), call count and
share of the traced device time, plus the totals that show whether the device sat idle (busy
time against the traced window).

Op events are those that carry an `hlo_op` argument: GPU kernels on the `/device:GPU:N` stream
lines, TPU ops on `/device:TPU:N`, and, with no such device (CPU), the XLA CPU runtime's op
events of the host. Derived summary lines ("XLA Ops", "XLA Modules") and ops that enclose other ops
of their line (a CPU `while` around its body) are skipped, so that nothing is counted twice.
"""

import argparse
import collections
import csv
import gzip
import json
import os
import pathlib
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import jax

from sdseg_jax import benchmark
from sdseg_jax.bench import jax_runners
from sdseg_jax.bench import machine

# Trace lines that summarise the kernel lines below them; counting them would double the time.
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "XLA TraceMe", "Framework Name Scope",
                  "Framework Ops", "Source code", "Steps", "Launch Stats")


def find_trace(trace_dir: str) -> pathlib.Path:
  """The `*.trace.json.gz` of the newest trace under `trace_dir` (jax.profiler's layout)."""
  runs = sorted((pathlib.Path(trace_dir) / "plugins" / "profile").glob("*"),
                key=os.path.getmtime)
  for run in reversed(runs):
    found = sorted(run.glob("*.trace.json.gz"))
    if found:
      return found[0]
  raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}/plugins/profile")


def _leaves(ops: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """The ops that enclose no other op of their line (a CPU `while` op spans its body's ops)."""
  by_line: Dict[tuple, List[Dict[str, Any]]] = collections.defaultdict(list)
  for e in ops:
    by_line[(e.get("pid"), e.get("tid"))].append(e)
  leaves = []
  for line in by_line.values():
    line.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
    for e, following in zip(line, line[1:] + [None]):
      end = float(e["ts"]) + float(e.get("dur", 0.0))
      if following is None or float(following["ts"]) >= end:
        leaves.append(e)
  return leaves


def top_ops(trace: Dict[str, Any], top: int = 30) -> Dict[str, Any]:
  """Device time per XLA op of a Chrome-format trace (what jax.profiler writes), largest first."""
  events = trace.get("traceEvents", [])
  process_names: Dict[Any, str] = {}
  thread_names: Dict[Any, str] = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      process_names[e["pid"]] = e.get("args", {}).get("name", "")
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      thread_names[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
  devices = {pid for pid, name in process_names.items()
             if name.startswith("/device:") and "CPU" not in name.split(":")[1].upper()}
  source = "device" if devices else "host (no accelerator in the trace: XLA CPU op events)"

  def is_op(e: Dict[str, Any]) -> bool:
    if e.get("ph") != "X" or "hlo_op" not in e.get("args", {}):
      return False
    if devices and e.get("pid") not in devices:
      return False
    line = thread_names.get((e.get("pid"), e.get("tid")), "")
    return not line.startswith(_DERIVED_LINES)

  ops = _leaves([e for e in events if is_op(e)])
  per_op: Dict[tuple, Dict[str, Any]] = {}
  per_module: Dict[str, float] = collections.defaultdict(float)
  per_line: Dict[str, float] = collections.defaultdict(float)
  kernels: Dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
  for e in ops:
    args = e["args"]
    key = (args.get("hlo_module", "?"), args["hlo_op"])
    dur = float(e.get("dur", 0.0))
    entry = per_op.setdefault(key, {"module": key[0], "op": key[1], "device_us": 0.0,
                                    "count": 0})
    entry["device_us"] += dur
    entry["count"] += 1
    kernels[key][e.get("name", "")] += dur
    per_module[key[0]] += dur
    per_line[f"{process_names.get(e['pid'], e['pid'])} / "
             f"{thread_names.get((e['pid'], e.get('tid')), e.get('tid'))}"] += dur
  busy = sum(per_module.values())
  ranked = sorted(per_op.values(), key=lambda r: r["device_us"], reverse=True)
  rows = []
  for rank, r in enumerate(ranked[:top], 1):
    name, _ = kernels[(r["module"], r["op"])].most_common(1)[0]
    rows.append(dict(rank=rank, op=r["op"], module=r["module"],
                     device_us=round(r["device_us"], 3), count=r["count"],
                     pct_of_device_time=round(100 * r["device_us"] / busy, 2) if busy else None,
                     top_kernel=name if name != r["op"] else ""))
  kinds: Dict[str, float] = collections.defaultdict(float)
  for r in ranked:  # "convolution.70" and "convolution.12" are both "convolution"
    kinds[re.sub(r"[.\d]+$", "", r["op"])] += r["device_us"]
  start = min((float(e["ts"]) for e in ops), default=0.0)
  end = max((float(e["ts"]) + float(e.get("dur", 0.0)) for e in ops), default=0.0)
  return {"source": source, "num_op_events": len(ops), "num_distinct_ops": len(per_op),
          "device_busy_us": round(busy, 3), "op_window_us": round(end - start, 3),
          "busy_fraction_of_window": round(busy / (end - start), 4) if end > start else None,
          "modules": {m: round(us, 3) for m, us in
                      sorted(per_module.items(), key=lambda kv: -kv[1])},
          "lines": {k: round(v, 3) for k, v in sorted(per_line.items(), key=lambda kv: -kv[1])},
          "op_kinds": [{"kind": k, "device_us": round(us, 3),
                        "pct_of_device_time": round(100 * us / busy, 2) if busy else None}
                       for k, us in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]],
          "top_ops": rows}


def write_csv(rows: List[Dict[str, Any]], path: str) -> None:
  fields = ["rank", "op", "module", "device_us", "count", "pct_of_device_time", "top_kernel"]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


def profile(config_path: Optional[str], batch: int, dtype: str, steps: int, trace_dir: str,
            top: int = 30, log=print) -> Dict[str, Any]:
  """Compiles, warms up, traces `steps` train steps + `steps` inference calls, reduces."""
  config = benchmark.load_config(config_path or benchmark.DEFAULT_CONFIG)
  timings: Dict[str, Any] = {}
  start = time.perf_counter()
  train = jax_runners.JaxTrain(config, dtype)
  train_step = train.call(batch)
  infer = jax_runners.JaxInference(config, dtype)
  infer_call = infer.call(batch)
  jax.block_until_ready(train_step())
  jax.block_until_ready(infer_call())
  timings["compile_and_warmup_s"] = round(time.perf_counter() - start, 3)
  log(f"compiled and warmed up in {timings['compile_and_warmup_s']} s; tracing "
      f"{steps} train steps + {steps} inference calls at batch {batch} ({train.dtype})")
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("train", step_num=i):
        jax.block_until_ready(train_step())
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("infer", step_num=i):
        jax.block_until_ready(infer_call())
  timings["traced_wall_s"] = round(time.perf_counter() - start, 3)
  path = find_trace(trace_dir)
  start = time.perf_counter()
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  report = top_ops(trace, top)
  timings["reduce_s"] = round(time.perf_counter() - start, 3)
  report.update(trace_file=str(path), trace_bytes=path.stat().st_size, batch=batch,
                dtype=train.dtype, steps={"train": steps, "infer": steps},
                device=machine.device_info(measure_cpu_peak=False), timings=timings,
                config=config_path or benchmark.DEFAULT_CONFIG)
  return report


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=None, help="config file (default configs/base.py)")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
  parser.add_argument("--steps", type=int, default=3, help="traced train steps (and calls)")
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--trace-dir", required=True, help="where jax.profiler writes the trace")
  parser.add_argument("--json", default=None, help="write the reduced profile here")
  parser.add_argument("--csv", default=None, help="write the top ops as CSV here")
  args = parser.parse_args(argv)
  report = profile(args.config, args.batch, args.dtype, args.steps, args.trace_dir, args.top,
                   log=lambda m: print(m, flush=True))
  report["command"] = "python -m sdseg_jax.benchmark_profile " + " ".join(
      sys.argv[1:] if argv is None else list(argv))
  busy = report["device_busy_us"]
  print(f"{report['source']}: {report['num_op_events']} op events, busy {busy / 1e3:.1f} ms "
        f"of a {report['op_window_us'] / 1e3:.1f} ms window; by module: "
        + ", ".join(f"{m} {us / 1e3:.1f} ms" for m, us in report["modules"].items()), flush=True)
  for r in report["top_ops"]:
    print(f"{r['rank']:3d} {r['pct_of_device_time'] or 0:6.2f}% {r['device_us'] / 1e3:9.3f} ms "
          f"x{r['count']:<4d} {r['module']}/{r['op']}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  if args.csv:
    write_csv(report["top_ops"], args.csv)
  return report


if __name__ == "__main__":
  main()
