"""A reproduction study in one command: K seeds trained, evaluated, stability-tested, reported.

  python -m sdseg_jax.reproduce --config configs/kvasir.py --seeds 3 --workdir DIR \
      [--protocol clean|official] [--ddim-steps 10,50] [--stability-runs 10] \
      [--export-dtype bfloat16|float32] [--seed-parallel auto|off] \
      [--config.data.root=/data/Kvasir-SEG ...]

For seed i (0..K-1) the run is trained in DIR/seed_<s> with config.seed = s = config.seed + i
(seed 0 is the plain `main` run of the same config), then scored on the test split by
`sdseg_jax.evaluate` (single step, and DDIM with each --ddim-steps value; HD95/ASSD included) and
by `sdseg_jax.stability` (--stability-runs noise seeds), on the checkpoint the protocol selects
(restored once per seed).
Every seed directory is an ordinary run directory: `evaluate`, `predict` and `stability` work on
it as on any other. DIR/report.md and DIR/report.json gather the numbers (sdseg_jax/repro).
Each seed's inference export (DIR/seed_<s>/export/inference.npz) is written in bfloat16 by
default, to share: the report lists its size and SHA-256.

Resumable: rerunning the command skips what is finished (a seed whose training reached
max_steps, an evaluation whose JSON names the current checkpoint) and resumes an interrupted
seed from its last checkpoint.

Seeds train side by side (`--seed-parallel auto`, the default) when the devices split evenly
into one lane per unfinished seed: ONE job, each seed on 1/K of the devices, so a v5e-32 trains
4 seeds in the time of one (sdseg_jax/seed_lanes.py). Otherwise, and on one device, they train
one after another. The protocol and config of DIR are fixed by its first run; a
rerun that changes them is refused. More seeds can be added later with a larger --seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from sdseg_jax import benchmark_env
from sdseg_jax import config_lib
from sdseg_jax import errors
from sdseg_jax import storage
from sdseg_jax.repro import markdown
from sdseg_jax.repro import protocols
from sdseg_jax.repro import report as report_lib

SINGLE_STEP = "single_step"
SEED_PARALLEL = ("auto", "off")


class ReproduceError(errors.UserFacingError, ValueError):
  """A reproduction directory or request that cannot be continued (message names the file)."""


def load_config(config_arg: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """`--config FILE[:variant]` plus `--config.a.b=v` overrides, as `main` reads them."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                  lock_config=True)
  try:
    values(["reproduce", f"--config={config_arg}", *overrides])
  except flags.Error as e:
    raise ReproduceError(f"--config {config_arg} {' '.join(overrides)}: {e}") from None
  return values.config


def sampler_name(ddim_steps: int) -> str:
  return SINGLE_STEP if ddim_steps == 0 else f"ddim{ddim_steps}"


def _read_json(path) -> Optional[Dict[str, Any]]:
  path = storage.path(path)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ReproduceError(f"{path}: not valid JSON ({e}); delete it to recompute") from None


def _write_json(path, data: Dict[str, Any]) -> None:
  storage.write_text_atomic(storage.path(path), json.dumps(data, indent=1, allow_nan=False))


def check_study(workdir, study: Dict[str, Any]) -> None:
  """Writes DIR/study.json on the first run; refuses a rerun with another protocol/config."""
  path = storage.path(workdir) / "study.json"
  previous = _read_json(path)
  if previous is None:
    _write_json(path, study)
    return
  for key in ("protocol", "config", "config_hash"):
    if previous.get(key) != study.get(key):
      raise ReproduceError(
          f"{path}: this study was started with {key}={previous.get(key)!r}, not "
          f"{study.get(key)!r}; use another --workdir (or the original settings)")


def train_seed(config: ml_collections.ConfigDict, seed_dir) -> Dict[str, Any]:
  """Trains (or resumes, or skips when finished) one seed; returns its train record."""
  import jax  # pylint: disable=g-import-not-at-top

  from sdseg_jax import train  # pylint: disable=g-import-not-at-top
  marker = storage.path(seed_dir) / "reproduce" / "train.json"
  record = _read_json(marker)
  if record is not None and record["steps"] >= config.train.max_steps:
    logging.info("%s: trained (%d steps), skipped", seed_dir, record["steps"])
    return record
  start = time.perf_counter()
  result = train.run(config, str(seed_dir))
  wall = time.perf_counter() - start + (record or {}).get("wall_seconds", 0.0)
  if result["step"] < config.train.max_steps:
    raise ReproduceError(f"{seed_dir}: training stopped at step {result['step']} of "
                         f"{config.train.max_steps}; rerun the command to resume")
  record = {"steps": int(result["step"]), "wall_seconds": wall,
            "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
            "precision": protocols.precision(config)}
  if jax.process_index() == 0:
    _write_json(marker, record)
  return record


def train_lanes(configs: Sequence[ml_collections.ConfigDict], seed_dirs: Sequence[Any]
                ) -> List[Dict[str, Any]]:
  """Trains unfinished seeds side by side in one job (sdseg_jax/seed_lanes.py); train records.

  Each seed's record counts the whole job's wall time on its 1/K of the devices, so the
  report's device-hours stay wall x devices.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from sdseg_jax import seed_lanes  # pylint: disable=g-import-not-at-top
  markers = [storage.path(d) / "reproduce" / "lanes.json" for d in seed_dirs]
  before = max(((_read_json(m) or {}).get("wall_seconds", 0.0) for m in markers), default=0.0)
  start = time.perf_counter()
  results = seed_lanes.run(configs, [str(d) for d in seed_dirs])
  wall = time.perf_counter() - start + before
  records = []
  for config, seed_dir, marker, result in zip(configs, seed_dirs, markers, results):
    if result["step"] < config.train.max_steps:
      raise ReproduceError(f"{seed_dir}: training stopped at step {result['step']} of "
                           f"{config.train.max_steps}; rerun the command to resume")
    record = {"steps": int(result["step"]), "wall_seconds": wall,
              "devices": jax.device_count() // len(configs), "seed_lanes": len(configs),
              "device_kind": jax.devices()[0].device_kind,
              "precision": protocols.precision(config)}
    if jax.process_index() == 0:
      _write_json(marker, {"wall_seconds": wall})
      _write_json(storage.path(seed_dir) / "reproduce" / "train.json", record)
    records.append(record)
  return records


def _lanes_can_resume(seed_dirs: Sequence[Any]) -> bool:
  """Seed lanes resume together: only when every unfinished seed is at the same step."""
  from sdseg_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  steps = set()
  for seed_dir in seed_dirs:
    folder = storage.path(seed_dir) / "checkpoints"
    steps.add(checkpoint_lib.Checkpointer(folder, read_only=True).latest_step()
              if folder.exists() else None)
  return len(steps) == 1


def export_record(seed_dir) -> Optional[Dict[str, Any]]:
  """Path, dtype, size and SHA-256 of a seed's inference export (None if it has none)."""
  from sdseg_jax import export  # pylint: disable=g-import-not-at-top
  path = storage.path(seed_dir) / "export" / "inference.npz"
  if not path.exists():
    return None
  return {"path": str(path), "dtype": export.load_inference(path)["weights_dtype"],
          "bytes": path.stat().length, "sha256": export.sha256(path)}


def score_seed(seed_dir, protocol: Dict[str, Any], ddim_steps: Sequence[int],
               stability_runs: int) -> tuple:
  """The seed's test-split scores: (evaluate JSON per sampler, stability JSON or None).

  The checkpoint the protocol selects is restored once; `sdseg_jax.evaluate` (single step and
  each DDIM setting, HD95/ASSD included) and `sdseg_jax.stability` (`stability_runs` noise
  seeds) score it exactly as their commands do, and their JSON in DIR/seed_<s>/reproduce/ is
  reused by a rerun when it names the same checkpoint step.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from sdseg_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sdseg_jax import restore  # pylint: disable=g-import-not-at-top
  from sdseg_jax import stability  # pylint: disable=g-import-not-at-top
  run = restore.load_run(str(seed_dir), protocol["checkpoint"])
  out = storage.path(seed_dir) / "reproduce"

  def cached_or(path, compute, table):
    result = _read_json(path)
    if result is not None and result["checkpoint"]["step"] == run.step:
      return result
    result = compute()
    evaluate.write_json(result, path)
    if jax.process_index() == 0:
      print(table(result))
    # The stored (JSON-safe) form, as a rerun reads it, on every process (process 0 writes).
    return json.loads(json.dumps(evaluate.json_safe(result)))

  evals = {sampler_name(s): cached_or(
      out / f"eval_{sampler_name(s)}.json",
      lambda s=s: evaluate.evaluate(run, protocol["test_split"], ddim_steps=s, distances=True,
                                    noise=protocol["noise"]),
      evaluate.format_table) for s in [0, *ddim_steps]}
  stable = None
  if stability_runs > 0:
    stable = cached_or(out / f"stability_{stability_runs}.json",
                       lambda: stability.stability(run, protocol["test_split"],
                                                   list(range(stability_runs))),
                       stability.format_table)
  return evals, stable


def environment(command: str) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {"python": platform.python_version(),
          "packages": {k: v for k, v in benchmark_env.package_versions().items() if v},
          "hardware": f"{len(devices)} x {devices[0].platform}:{devices[0].device_kind} "
                      f"({jax.process_count()} process(es)); host {platform.machine()} "
                      f"{platform.processor() or ''}".strip(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": command}


def run(config: ml_collections.ConfigDict, workdir: str, *, num_seeds: int, protocol_name: str,
        ddim_steps: Sequence[int], stability_runs: int, config_name: str,
        export_dtype: str = "bfloat16", seed_parallel: str = "auto",
        command: str = "") -> Dict[str, Any]:
  """The whole study; returns the report's JSON (also written to DIR/report.{json,md}).

  seed_parallel "auto" trains the unfinished seeds side by side in one job when the devices
  split evenly into one lane per seed (and the seeds are at the same step); "off" trains them
  one after another.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from sdseg_jax.seed_lanes import fits as seed_lanes_fit  # pylint: disable=g-import-not-at-top
  if seed_parallel not in SEED_PARALLEL:
    raise ReproduceError(f"seed_parallel must be one of {SEED_PARALLEL}, got {seed_parallel!r}")
  if num_seeds < 1:
    raise ReproduceError(f"--seeds must be >= 1, got {num_seeds}")
  workdir = storage.path(workdir)
  with config.unlocked():
    protocol = protocols.apply(config, protocol_name)
    config.checkpoint.export_dtype = export_dtype
  config_lib.validate(config)
  study = {"protocol": protocol_name, "config": config_name,
           "config_hash": protocols.config_hash(config)}
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    check_study(workdir, study)
  configs, seed_dirs = [], []
  for i in range(num_seeds):
    seed_config = ml_collections.ConfigDict(config.to_dict())
    seed_config.seed = int(config.seed) + i
    configs.append(seed_config)
    seed_dirs.append(workdir / f"seed_{seed_config.seed}")
  train_records = {}
  pending = [i for i, d in enumerate(seed_dirs)
             if (_read_json(d / "reproduce" / "train.json") or {}).get(
                 "steps", -1) < config.train.max_steps]
  if (seed_parallel == "auto" and seed_lanes_fit(len(pending), jax.device_count())
      and _lanes_can_resume([seed_dirs[i] for i in pending])):
    logging.info("training seeds %s side by side, %d devices each",
                 [configs[i].seed for i in pending], jax.device_count() // len(pending))
    records = train_lanes([configs[i] for i in pending], [seed_dirs[i] for i in pending])
    train_records = dict(zip(pending, records))
  seeds: List[Dict[str, Any]] = []
  for i, (seed_config, seed_dir) in enumerate(zip(configs, seed_dirs)):
    train_record = train_records.get(i) or train_seed(seed_config, seed_dir)
    evals, stable = score_seed(seed_dir, protocol, ddim_steps, stability_runs)
    seeds.append({"seed": seed_config.seed, "workdir": str(seed_dir), "train": train_record,
                  "evals": evals, "stability": stable, "export": export_record(seed_dir)})
  report = report_lib.build_report(dataset=config.data.name, config_name=config_name,
                                   protocol=protocol, seeds=seeds,
                                   environment=environment(command))
  if jax.process_index() == 0:
    _write_json(workdir / "report.json", report)
    storage.write_text_atomic(workdir / "report.md", markdown.render(report))
  return report


def _steps(text: str) -> List[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--ddim-steps takes integers like 10,50, got {text!r}"
                                     ) from None
  if any(v <= 0 for v in values):
    raise argparse.ArgumentTypeError(f"--ddim-steps values must be > 0 (the single step is "
                                     f"always evaluated), got {text!r}")
  return values


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, List[str]]:
  parser = argparse.ArgumentParser(prog="python -m sdseg_jax.reproduce", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="config file[:variant]")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
  parser.add_argument("--protocol", default="clean", choices=protocols.PROTOCOLS)
  parser.add_argument("--ddim-steps", type=_steps, default=[], help="e.g. 10,50")
  parser.add_argument("--stability-runs", type=int, default=10, help="0 = skip")
  parser.add_argument("--export-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="weights dtype of each seed's inference export (default bfloat16)")
  parser.add_argument("--seed-parallel", default="auto", choices=SEED_PARALLEL,
                      help="auto: train the seeds side by side in one job when the devices "
                           "split evenly into one lane per seed; off: one after another")
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides are "
                 f"--config.FIELD=VALUE)")
  return args, rest


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args, overrides = parse_args(argv)
  logging.getLogger().setLevel(logging.INFO)
  from sdseg_jax import distributed  # pylint: disable=g-import-not-at-top
  from sdseg_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  try:
    config = load_config(args.config, overrides)
    main_lib.configure_jax(config)
    distributed.initialize()
    report = run(config, args.workdir, num_seeds=args.seeds, protocol_name=args.protocol,
                 ddim_steps=args.ddim_steps, stability_runs=args.stability_runs,
                 config_name=args.config, export_dtype=args.export_dtype,
                 seed_parallel=args.seed_parallel,
                 command="python -m sdseg_jax.reproduce " + shlex.join(argv))
  except errors.UserFacingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(markdown.render(report))
  print(f"wrote {storage.path(args.workdir) / 'report.md'} and report.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
