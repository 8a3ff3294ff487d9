"""A reproduction study in one command: K seeds trained, evaluated, stability-tested, reported.

  python -m sdseg_jax.reproduce --config configs/kvasir.py --seeds 3 --workdir DIR \
      [--protocol clean|official] [--ddim-steps 10,50] [--stability-runs 10] \
      [--export-dtype bfloat16|float32] [--config.data.root=/data/Kvasir-SEG ...]

For seed i (0..K-1) the run is trained in DIR/seed_<s> with config.seed = s = config.seed + i
(seed 0 is the plain `main` run of the same config), then scored on the test split by
`sdseg_jax.evaluate` (single step, and DDIM with each --ddim-steps value; HD95/ASSD included) and
by `sdseg_jax.stability` (--stability-runs noise seeds), on the checkpoint the protocol selects.
Every seed directory is an ordinary run directory: `evaluate`, `predict` and `stability` work on
it as on any other. DIR/report.md and DIR/report.json gather the numbers (sdseg_jax/repro).
Each seed's inference export (DIR/seed_<s>/export/inference.npz) is written in bfloat16 by
default, to share: the report lists its size and SHA-256.

Resumable: rerunning the command skips what is finished (a seed whose training reached
max_steps, an evaluation whose JSON names the current checkpoint) and resumes an interrupted
seed from its last checkpoint. The protocol and config of DIR are fixed by its first run; a
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


def export_record(seed_dir) -> Optional[Dict[str, Any]]:
  """Path, dtype, size and SHA-256 of a seed's inference export (None if it has none)."""
  from sdseg_jax import export  # pylint: disable=g-import-not-at-top
  path = storage.path(seed_dir) / "export" / "inference.npz"
  if not path.exists():
    return None
  return {"path": str(path), "dtype": export.load_inference(path)["weights_dtype"],
          "bytes": path.stat().length, "sha256": export.sha256(path)}


def _current_step(seed_dir, checkpoint: str) -> Optional[int]:
  from sdseg_jax import restore  # pylint: disable=g-import-not-at-top
  return restore.load_run(str(seed_dir), checkpoint).step


def evaluate_seed(seed_dir, ddim_steps: int, protocol: Dict[str, Any], step: Optional[int]
                  ) -> Dict[str, Any]:
  """`sdseg_jax.evaluate` on the test split (its JSON, reused when it names `step`)."""
  from sdseg_jax import evaluate  # pylint: disable=g-import-not-at-top
  path = storage.path(seed_dir) / "reproduce" / f"eval_{sampler_name(ddim_steps)}.json"
  result = _read_json(path)
  if result is not None and result["checkpoint"]["step"] == step:
    return result
  argv = ["--workdir", str(seed_dir), "--split", protocol["test_split"], "--checkpoint",
          protocol["checkpoint"], "--ddim-steps", str(ddim_steps), "--hd95", "--json", str(path)]
  argv += ["--noise", protocol["noise"]]
  if evaluate.main(argv) != 0:
    raise ReproduceError(f"{seed_dir}: evaluate {' '.join(argv)} failed (see above)")
  return _read_json(path)


def stability_seed(seed_dir, runs: int, protocol: Dict[str, Any], step: Optional[int]
                   ) -> Optional[Dict[str, Any]]:
  """`sdseg_jax.stability` with `runs` noise seeds (its JSON, reused when it names `step`)."""
  if runs <= 0:
    return None
  from sdseg_jax import stability  # pylint: disable=g-import-not-at-top
  path = storage.path(seed_dir) / "reproduce" / f"stability_{runs}.json"
  result = _read_json(path)
  if result is not None and result["checkpoint"]["step"] == step:
    return result
  argv = ["--workdir", str(seed_dir), "--split", protocol["test_split"], "--checkpoint",
          protocol["checkpoint"], "--runs", str(runs), "--json", str(path)]
  if stability.main(argv) != 0:
    raise ReproduceError(f"{seed_dir}: stability {' '.join(argv)} failed (see above)")
  return _read_json(path)


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
        export_dtype: str = "bfloat16", command: str = "") -> Dict[str, Any]:
  """The whole study; returns the report's JSON (also written to DIR/report.{json,md})."""
  import jax  # pylint: disable=g-import-not-at-top
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
  seeds: List[Dict[str, Any]] = []
  for i in range(num_seeds):
    seed_config = ml_collections.ConfigDict(config.to_dict())
    seed_config.seed = int(config.seed) + i
    seed_dir = workdir / f"seed_{seed_config.seed}"
    train_record = train_seed(seed_config, seed_dir)
    step = _current_step(seed_dir, protocol["checkpoint"])
    evals = {sampler_name(s): evaluate_seed(seed_dir, s, protocol, step)
             for s in [0, *ddim_steps]}
    seeds.append({"seed": seed_config.seed, "workdir": str(seed_dir), "train": train_record,
                  "evals": evals, "stability": stability_seed(seed_dir, stability_runs,
                                                              protocol, step),
                  "export": export_record(seed_dir)})
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
                 command="python -m sdseg_jax.reproduce " + shlex.join(argv))
  except errors.UserFacingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(markdown.render(report))
  print(f"wrote {storage.path(args.workdir) / 'report.md'} and report.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
