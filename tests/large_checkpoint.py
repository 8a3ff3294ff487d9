"""Multi-GB PyTorch-Lightning checkpoints written without torch, and the reader's peak memory.

A training checkpoint of official SDSeg holds its weights under "state_dict" and, beside them,
the AdamW moments of every trainable parameter under "optimizer_states" (about as large again).
`write_lightning_checkpoint` writes that layout storage by storage (never more than one chunk in
memory), each tensor filled with its own constant so that a reader's result can be checked.

`peak_rss` runs a reader in a fresh child process and reports its peak resident memory
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) next to the bytes of the weights it returned.

Benchmark (full-size SDSeg, the key names and shapes of the official checkpoint manifest; the
figure is in BENCHMARKS.md):

  python -m tests.large_checkpoint --manifest ../shared/fixtures/official-sdseg/\
manifest_sdseg_trained_checkpoint.json --out /tmp/sdseg_full.ckpt --convert configs/kvasir.py
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Mapping
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any
import zipfile

import numpy as np

from tests import torch_format

_CHUNK_BYTES = 16 << 20
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def fill_value(index: int) -> float:
  """The constant every element of the `index`-th storage holds (exact in float32)."""
  return float(index % 4093) - 2046.0


def _write_record(zf: zipfile.ZipFile, name: str, dtype: np.dtype, numel: int,
                  value: float) -> None:
  chunk = max(1, _CHUNK_BYTES // dtype.itemsize)
  with zf.open(name, "w", force_zip64=True) as f:
    for start in range(0, numel, chunk):
      f.write(np.full(min(chunk, numel - start), value, dtype).tobytes())


def write_lightning_checkpoint(path: pathlib.Path, weights: Mapping[str, tuple[int, ...]],
                               trainable: tuple[str, ...],
                               exact: Mapping[str, np.ndarray] | None = None
                               ) -> dict[str, float]:
  """Writes {"state_dict": weights, "optimizer_states": AdamW moments, ...} like Lightning.

  Args:
    path: the .ckpt file to write.
    weights: state_dict key -> shape (float32 tensors, one storage each).
    trainable: key prefixes of the parameters the optimizer holds moments for.
    exact: small tensors written with these values instead (e.g. the schedule's `betas`).

  Returns:
    state_dict key -> the value all its elements hold (keys of `exact` excepted).
  """
  exact = exact or {}
  specs: dict[str, tuple[int, Any]] = {}  # storage key -> (numel, value or exact array)
  state_dict = collections.OrderedDict()
  values = {}
  for i, (key, shape) in enumerate(weights.items()):
    storage = str(len(specs))
    if key in exact:
      specs[storage] = (int(np.prod(shape, dtype=np.int64)),
                        np.asarray(exact[key], np.float32).reshape(shape))
    else:
      specs[storage] = (int(np.prod(shape, dtype=np.int64)), fill_value(i))
      values[key] = fill_value(i)
    state_dict[key] = torch_format.TensorView(storage, tuple(shape))
  moments = {}
  params = [k for k in weights if k.startswith(trainable)]
  for index, key in enumerate(params):
    entry = {"step": 1000.0}
    for name in ("exp_avg", "exp_avg_sq"):
      storage = str(len(specs))
      specs[storage] = (int(np.prod(weights[key], dtype=np.int64)), fill_value(len(specs)))
      entry[name] = torch_format.TensorView(storage, tuple(weights[key]))
    moments[index] = entry
  obj = collections.OrderedDict(
      epoch=99, global_step=10000, state_dict=state_dict,
      optimizer_states=[{"state": moments, "param_groups": [{
          "lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
          "amsgrad": False, "params": list(range(len(params)))}]}])
  placeholders = {k: np.broadcast_to(np.float32(0), (n,)) for k, (n, _) in specs.items()}
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", torch_format.dumps(obj, placeholders))
    zf.writestr("archive/byteorder", "little")
    for storage, (numel, value) in specs.items():
      if isinstance(value, np.ndarray):
        zf.writestr(f"archive/data/{storage}", value.tobytes())
      else:
        _write_record(zf, f"archive/data/{storage}", np.dtype(np.float32), numel, value)
    zf.writestr("archive/version", "3\n")
  return values


_READER = textwrap.dedent("""
    import json, resource, sys
    from sdseg_jax.weights import torch_pickle
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = torch_pickle.load_state_dict(sys.argv[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    probe = {k: float(v.reshape(-1)[0]) for k, v in list(state.items())[::97]}
    print(json.dumps({"baseline_bytes": before, "peak_bytes": peak, "tensors": len(state),
                      "kept_bytes": sum(v.nbytes for v in state.values()), "probe": probe}))
""")


def peak_rss(path: pathlib.Path) -> dict[str, Any]:
  """Peak RSS of `torch_pickle.load_state_dict(path)` in a fresh process (bytes).

  baseline_bytes: the child's peak after importing the reader, before reading;
  kept_bytes: the bytes of the returned weights; probe: first element of some of them.
  """
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
  result = subprocess.run([sys.executable, "-c", _READER, str(path)], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=600, check=True)
  return json.loads(result.stdout)


def _convert_peak(config: str, checkpoint: pathlib.Path, out: pathlib.Path) -> dict[str, Any]:
  """Peak RSS of the convert CLI (`--kind sdseg`) on `checkpoint`, in a child process."""
  code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
          "try:\n  runpy.run_module('sdseg_jax.convert', run_name='__main__')\n"
          "finally:\n  print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"
          " * 1024, file=sys.stderr)\n")
  result = subprocess.run(
      [sys.executable, "-c", code, "sdseg_jax.convert", "--config", config, "--kind", "sdseg",
       "--checkpoint", str(checkpoint), "--out", str(out)],
      capture_output=True, text=True, cwd=REPO_ROOT, timeout=3600, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT)))
  if result.returncode:
    raise RuntimeError(f"convert failed ({result.returncode}):\n{result.stderr[-3000:]}")
  peak = [int(line.split()[1]) for line in result.stderr.splitlines()
          if line.startswith("PEAK_RSS")]
  return {"peak_bytes": peak[-1], "summary": result.stdout.strip().splitlines()[0]}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--manifest", required=True,
                      help="official checkpoint manifest: state_dict key -> shape (JSON)")
  parser.add_argument("--out", required=True, help="where to write the generated .ckpt")
  parser.add_argument("--convert", default="",
                      help="also run `python -m sdseg_jax.convert --kind sdseg` with this "
                           "config on the file")
  parser.add_argument("--keep", action="store_true", help="keep the generated files")
  args = parser.parse_args(argv)
  manifest = json.loads(pathlib.Path(args.manifest).read_text())
  weights = {k: tuple(v["shape"] if isinstance(v, Mapping) else v) for k, v in manifest.items()}
  out = pathlib.Path(args.out)
  # What the converter checks: the schedule of the official config, a positive latent scale.
  from sdseg_jax import diffusion  # pylint: disable=g-import-not-at-top
  betas = diffusion.make_schedule().betas  # the official linear schedule (configs/base.py)
  write_lightning_checkpoint(out, weights, ("model.diffusion_model.", "cond_stage_model."),
                             exact={"betas": betas, "scale_factor": np.float32(0.18215)})
  report = {"file_bytes": out.stat().st_size, "reader": peak_rss(out)}
  report["reader"].pop("probe")
  if args.convert:
    npz = out.with_suffix(".npz")
    report["convert"] = _convert_peak(args.convert, out, npz)
    if not args.keep:
      npz.unlink()
  if not args.keep:
    out.unlink()
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
