"""Tests for the lent-GPU tooling: the wheelhouse check, the profile reduction, the benchmark
script.

The GPU itself is not here, so these check everything around it: that the wheelhouse check
refuses an incomplete or ambiguous set, that the trace reduction counts each device op once,
and that `launch/device_benchmark.sh --dry-run` runs every step of the real script's flow on
CPU and leaves the files a lent machine would return.

The dry run takes minutes on 2 cores, so it runs where it matters, in CI's Python 3.12 /
jax 0.11.2 job (SDSEG_DEVICE_DRY_RUN=1). The download of the real wheelhouse and its install
into a clean Python 3.12 venv that holds the image's packages needs the registry and takes
minutes: it runs only with SDSEG_WHEELHOUSE_TEST=1 (see launch/README.md).
"""

import csv
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from configs import base
from sdseg_jax import benchmark_profile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / "launch"

_spec = importlib.util.spec_from_file_location("device_wheelhouse_check",
                                               LAUNCH / "device_wheelhouse_check.py")
wheelhouse_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wheelhouse_check)


# ------------------------------------------------------------------------------------------------
# The wheelhouse check
# ------------------------------------------------------------------------------------------------

def _wheel(folder: pathlib.Path, filename: str, requires=(), size: int = 0) -> pathlib.Path:
  """A minimal wheel: a METADATA with these Requires-Dist lines (and `size` bytes of padding)."""
  name, version = filename.split("-")[:2]
  path = folder / filename
  with zipfile.ZipFile(path, "w") as z:
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    z.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    if size:
      z.writestr("pad.bin", os.urandom(size))
  return path


def _problems(folder, pins_text, image_text="numpy==2.5.2\nabsl-py\n", max_mb=40.0):
  pins_file = folder / "pins.txt"
  pins_file.write_text(pins_text)
  image_file = folder / "image.txt"
  image_file.write_text(image_text)
  pins, omitted = wheelhouse_check.read_pins(pins_file)
  wheels = folder / "wh"
  return wheelhouse_check.check(wheels, pins, omitted, wheelhouse_check.read_image(image_file),
                                max_mb)


@pytest.fixture
def good_set(tmp_path):
  wheels = tmp_path / "wh"
  wheels.mkdir()
  _wheel(wheels, "grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl",
         ["absl-py", "array-record>=0.8.1; sys_platform != 'win32'", "numpy>=2",
          "pywin32; sys_platform == 'win32'", "extra-thing; extra == 'testing'"])
  _wheel(wheels, "array_record-0.8.6-cp312-cp312-manylinux2014_x86_64.whl", ["absl-py"])
  _wheel(wheels, "medpy-0.5.2-py3-none-any.whl", ["SimpleITK>=2.1", "numpy"])
  pins = "grain==0.2.18\narray-record==0.8.6\nmedpy==0.5.2\n# omit: SimpleITK too big\n"
  return tmp_path, wheels, pins


def test_wheelhouse_check_accepts_a_complete_set(good_set):
  folder, _, pins = good_set
  problems, notes = _problems(folder, pins)
  assert problems == []
  assert any("SimpleITK" in n and "omitted on purpose" in n for n in notes)


def test_wheelhouse_check_names_each_problem(good_set):
  folder, wheels, pins = good_set
  # A requirement neither in the set nor in the image, and one the image's version breaks:
  _wheel(wheels, "nibabel-5.4.2-py3-none-any.whl", ["packaging>=20", "numpy<2"])
  pins += "nibabel==5.4.2\n"
  problems, _ = _problems(folder, pins)
  assert any("nibabel==5.4.2 needs packaging>=20: neither" in p for p in problems), problems
  assert any("needs numpy<2, the image has numpy==2.5.2" in p for p in problems), problems
  # Two versions of one package, a wheel for another Python, a pin without a wheel:
  _wheel(wheels, "grain-0.2.17-cp312-cp312-manylinux_2_28_x86_64.whl", ["absl-py"])
  _wheel(wheels, "dm_tree-0.1.10-cp311-cp311-manylinux_2_28_x86_64.whl")
  pins += "dm-tree==0.1.10\ntermcolor==3.3.0\n"
  problems, _ = _problems(folder, pins, image_text="numpy==2.5.2\nabsl-py\npackaging\n")
  assert any(p.startswith("grain: 2 wheels") for p in problems), problems
  assert any("dm_tree-0.1.10-cp311" in p and "CPython 3.12" in p for p in problems), problems
  assert any("termcolor==3.3.0: pinned but no wheel" in p for p in problems), problems


def test_wheelhouse_check_size_and_image_shadowing(good_set):
  folder, wheels, pins = good_set
  _wheel(wheels, "numpy-2.4.6-cp312-cp312-manylinux_2_28_x86_64.whl", size=200_000)
  problems, _ = _problems(folder, pins + "numpy==2.4.6\n", max_mb=0.1)
  assert any("numpy: the image already has it" in p for p in problems), problems
  assert any("more than the 0.1 MB allowed" in p for p in problems), problems


def test_device_pins_match_the_requirement_files():
  """The wheelhouse carries the versions CI tests (requirements*.txt), not others."""
  pins, omitted = wheelhouse_check.read_pins(LAUNCH / "device_wheels.txt")
  tested = {}
  for name in ("requirements.txt", "requirements-bench.txt"):
    for line in (REPO_ROOT / name).read_text().splitlines():
      line = line.split("#", 1)[0].strip()
      if "==" in line:
        key, version = line.split("==")
        tested[wheelhouse_check.canonicalize_name(key)] = version
  for name in ("grain", "ml-collections", "tensorflow-datasets", "nibabel", "tensorboardx",
               "medpy", "diffusers"):
    assert str(pins[name]) == tested[name], name
  assert "simpleitk" in omitted
  image = wheelhouse_check.read_image(LAUNCH / "device_image_packages.txt")
  assert not set(pins) & set(image), "a pinned wheel would shadow the image's own package"


# ------------------------------------------------------------------------------------------------
# The profile reduction
# ------------------------------------------------------------------------------------------------

def _gpu_like_trace():
  """The shape of a GPU trace from jax.profiler: host, device streams, a derived 'XLA Ops' line."""
  meta = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 2, "tid": 10, "name": "thread_name", "args": {"name": "Stream #13"}},
      {"ph": "M", "pid": 2, "tid": 11, "name": "thread_name", "args": {"name": "Stream #14"}},
      {"ph": "M", "pid": 2, "tid": 12, "name": "thread_name", "args": {"name": "XLA Ops"}},
  ]

  def op(pid, tid, ts, dur, name, hlo_op, module="jit_train_step"):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name,
            "args": {"hlo_op": hlo_op, "hlo_module": module}}

  events = [
      op(2, 10, 0, 50, "sm90_xmma_fprop", "convolution.7"),
      op(2, 10, 60, 50, "sm90_xmma_fprop", "convolution.7"),
      op(2, 11, 0, 30, "loop_add_fusion", "add_fusion.3"),
      op(2, 10, 120, 20, "triton_softmax", "fusion.9", "jit__predict"),
      op(2, 12, 0, 500, "convolution.7", "convolution.7"),  # derived line: not counted
      op(1, 5, 0, 900, "host side", "convolution.7"),  # host: not counted when a device exists
      {"ph": "X", "pid": 2, "tid": 10, "ts": 200, "dur": 5, "name": "memcpy"},  # no hlo_op
  ]
  return {"traceEvents": meta + events}


def test_top_ops_counts_each_device_op_once():
  report = benchmark_profile.top_ops(_gpu_like_trace(), top=2)
  assert report["source"] == "device"
  assert report["num_op_events"] == 4
  assert report["device_busy_us"] == 150
  assert report["op_window_us"] == 140
  assert report["modules"] == {"jit_train_step": 130, "jit__predict": 20}
  first, second = report["top_ops"]
  assert (first["op"], first["device_us"], first["count"]) == ("convolution.7", 100, 2)
  assert first["top_kernel"] == "sm90_xmma_fprop" and first["pct_of_device_time"] == 66.67
  assert second["op"] == "add_fusion.3"
  assert report["op_kinds"][0] == {"kind": "convolution", "device_us": 100,
                                   "pct_of_device_time": 66.67}


def test_top_ops_on_cpu_skips_enclosing_ops():
  trace = {"traceEvents": [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 100, "name": "while.1",
       "args": {"hlo_op": "while.1", "hlo_module": "m"}},
      {"ph": "X", "pid": 1, "tid": 3, "ts": 10, "dur": 40, "name": "fusion.2",
       "args": {"hlo_op": "fusion.2", "hlo_module": "m"}},
      {"ph": "X", "pid": 1, "tid": 3, "ts": 60, "dur": 30, "name": "fusion.2",
       "args": {"hlo_op": "fusion.2", "hlo_module": "m"}},
  ]}
  report = benchmark_profile.top_ops(trace)
  assert report["source"].startswith("host")
  assert [(r["op"], r["device_us"]) for r in report["top_ops"]] == [("fusion.2", 70)]


# ------------------------------------------------------------------------------------------------
# launch/device_benchmark.sh
# ------------------------------------------------------------------------------------------------

def test_train_batches_are_the_config_presets():
  script = (LAUNCH / "device_benchmark.sh").read_text()
  full = re.search(r'full\)\n\s*infer_batches="([\d,]+)"; train_batches="([\d,]+)"', script)
  presets = [base.benchmark_config("synthetic", "", 100, v).train.global_batch_size
             for v in ("h100", "h200")]
  assert full and [int(b) for b in full.group(2).split(",")] == presets
  assert full.group(1) == "1,8,32,64"


def test_probe_refuses_a_missing_gpu(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "sdseg_jax.benchmark_env", "probe", "--json",
       str(tmp_path / "summary.json"), "--require-gpu"],
      capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
  assert result.returncode == 3
  assert "JAX backend is 'cpu', not 'gpu'" in result.stderr
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["stack"]["packages"]["jax"] and summary["steps"] == []


@pytest.mark.skipif(os.environ.get("SDSEG_DEVICE_DRY_RUN") != "1",
                    reason="six JAX processes, minutes on 2 cores: .ci/run runs it once, in the "
                           "Python 3.12 / jax 0.11.2 job (set SDSEG_DEVICE_DRY_RUN=1)")
def test_device_benchmark_dry_run(tmp_path):
  """Every step of the real flow on CPU; the files a lent machine returns, at most 8."""
  out = tmp_path / "out"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             PATH=f"{pathlib.Path(sys.executable).parent}:{env['PATH']}")
  result = subprocess.run(["bash", str(LAUNCH / "device_benchmark.sh"), "--dry-run", "--out",
                           str(out), "--python", sys.executable],
                          capture_output=True, text=True, env=env, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  files = sorted(p.name for p in out.iterdir())
  assert files == sorted(["summary.json", "smoke.json", "infer_bf16.json", "train_bf16.json",
                          "profile_top_ops.json", "profile_top_ops.csv", "infer_fp32.json",
                          "run.log"])
  summary = json.loads((out / "summary.json").read_text())
  assert summary["mode"] == "dry-run" and summary["stack"]["python"]
  steps = {s["step"]: s for s in summary["steps"]}
  assert list(steps) == ["probe", "smoke", "infer_bf16", "train_bf16", "profile", "infer_fp32"]
  assert all(s["status"] == "ok" for s in steps.values()), steps
  assert steps["infer_bf16"]["outputs"] == {"infer_bf16.json": {"complete": True}}
  infer = json.loads((out / "infer_bf16.json").read_text())
  assert [r["batch"] for r in infer["jax"]["results"]] == [2]
  assert {r["dtype"] for r in infer["jax"]["results"]} == {"bfloat16"}
  train = json.loads((out / "train_bf16.json").read_text())
  assert train["jax"]["results"][0]["suite"] == "train"
  profile = json.loads((out / "profile_top_ops.json").read_text())
  assert profile["steps"] == {"train": 3, "infer": 3}
  assert set(profile["modules"]) == {"jit_train_step", "jit__predict"}
  with open(out / "profile_top_ops.csv") as f:
    rows = list(csv.DictReader(f))
  assert 0 < len(rows) <= 30 and rows[0]["rank"] == "1"
  assert "=== done in" in result.stderr


def test_device_benchmark_stops_after_a_failed_smoke(tmp_path):
  """A broken set-up costs the smoke's minute, not the whole budget."""
  out = tmp_path / "out"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu")
  result = subprocess.run(["bash", str(LAUNCH / "device_benchmark.sh"), "--dry-run", "--out",
                           str(out), "--python", sys.executable, "--only", "smoke,infer_fp32",
                           "--budget", "5"],
                          capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 1
  summary = json.loads((out / "summary.json").read_text())
  assert [s["step"] for s in summary["steps"]] == ["probe", "smoke"]
  assert summary["steps"][1]["status"] == "skipped: budget spent"
  assert "the measurements were not started" in result.stderr


# ------------------------------------------------------------------------------------------------
# The real wheelhouse in a clean Python 3.12 venv holding the image's packages (slow, opt-in)
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("SDSEG_WHEELHOUSE_TEST") != "1",
                    reason="downloads ~21 MB of wheels and builds a Python 3.12 venv (minutes); "
                           "set SDSEG_WHEELHOUSE_TEST=1 (launch/README.md)")
def test_wheelhouse_installs_into_an_image_like_venv(tmp_path):
  python312 = os.environ.get("SDSEG_PYTHON312") or shutil.which("python3.12")
  assert python312, "set SDSEG_PYTHON312 to a Python 3.12 interpreter"
  wheels = tmp_path / "whl"
  subprocess.run(["bash", str(LAUNCH / "device_wheelhouse.sh"), "--dest", str(wheels),
                  "--python", python312], check=True, timeout=900)
  venv = tmp_path / "venv"
  subprocess.run([python312, "-m", "venv", str(venv)], check=True)
  py = str(venv / "bin" / "python")
  # The image's packages that sdseg_jax and the wheels import (versions: requirements-py312.txt).
  subprocess.run([py, "-m", "pip", "install", "-q", "-r",
                  str(REPO_ROOT / "launch" / "device_image_requirements.txt")],
                 check=True, timeout=900)
  site = tmp_path / "site"
  subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                  "--no-cache-dir", "--upgrade", "--target", str(site),
                  *map(str, sorted(wheels.glob("*.whl")))], check=True, timeout=300)
  code = ("import sdseg_jax.benchmark, sdseg_jax.benchmark_profile, sdseg_jax.benchmark_env\n"
          "import grain, ml_collections, nibabel, tensorboardX, medpy.metric.binary\n"
          "import tensorflow_datasets, diffusers\n"
          "from configs import base; base.get_config()\n"
          "import sys; missing = [m for m in ('grain', 'ml_collections', 'diffusers') "
          "if not sys.modules[m].__file__.startswith(sys.argv[1])]\n"
          "assert not missing, missing\n")
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  result = subprocess.run([py, "-c", code, str(site)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
