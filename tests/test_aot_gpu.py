"""`python -m sdseg_jax.aot --topology h100:8`: GPU nodes as compile-only XLA:GPU devices.

What runs everywhere (CI installs no CUDA wheels: about 5 GB): the topology strings, the shipped
GPU target descriptions against the chip table, the compile-only environment, and the one-line
error when jax's CUDA plugin is missing. The tiny-config compile needs the plugin
(requirements-gpu-aot.txt) and skips with a reason without it; the full-size figures are in
BENCHMARKS.md ("GPU (H100/H200)").
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

from sdseg_jax import aot
from sdseg_jax import compiled_cost
from sdseg_jax import gpu_targets

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def target_field(text: str, field: str) -> str:
  """One scalar field of a GpuTargetConfig text (first occurrence)."""
  match = re.search(rf"^\s*{field}:\s*(.+?)\s*$", text, re.MULTILINE)
  assert match is not None, field
  return match.group(1).strip('"')


@pytest.mark.parametrize("topology, expected", [("h100:8", ("h100", 8)), ("h100:1", ("h100", 1)),
                                                ("h200:1", ("h200", 1)), ("H200:8", ("h200", 8))])
def test_gpu_topologies_parse(topology, expected):
  assert gpu_targets.looks_like_gpu(topology)
  assert gpu_targets.parse_topology(topology) == expected


@pytest.mark.parametrize("topology, message", [
    ("h100:9", "'h100:9': 9 GPUs; one node has 1..8"),
    ("h100:0", "'h100:0': 0 GPUs; one node has 1..8"),
    ("a100:1", "unknown GPU 'a100' in topology 'a100:1': known GPUs are h100, h200"),
    ("h100:x", "'h100:x': the number of GPUs after the colon must be an integer 1..8"),
    ("h100:", "must be an integer"),
])
def test_bad_gpu_topologies_are_clear_errors(topology, message):
  """The aot entry point routes "name:count" to the GPU path and says what is wrong."""
  with pytest.raises(gpu_targets.GpuTargetError, match=re.escape(message)):
    aot.topology_devices(topology)


def test_tpu_slices_and_other_strings_do_not_take_the_gpu_path():
  for topology in ("v5e:2x4", "v4:2x2x1", "v5p:4x4x8", "v6e:2x4", "v5e-8", "h100", "h100x8"):
    assert not gpu_targets.looks_like_gpu(topology), topology
  with pytest.raises(aot.AotError, match=r"unknown topology 'h100x8'.*v5e:2x4.*h100:8"):
    aot.topology_devices("h100x8")


@pytest.mark.parametrize("name", sorted(gpu_targets.GPUS))
def test_target_files_match_the_chip_table(name):
  """The memory the compiler plans against, the device kind it reports and the bandwidth agree
  with compiled_cost.CHIPS (which `fits` and the roofline use)."""
  gpu = gpu_targets.GPUS[name]
  text = gpu_targets.target_config(name)
  memory = int(target_field(text, "device_memory_size"))
  assert memory == gpu.device_memory_bytes == gpu_targets.target_memory_bytes(text)
  kind = target_field(text, "name")
  assert target_field(text, "device_description_str") == kind
  chip = compiled_cost.CHIPS[kind]
  assert chip.name == name and chip.hbm_bytes == memory
  assert int(target_field(text, "memory_bandwidth")) == pytest.approx(
      chip.hbm_bytes_per_second, rel=1e-3)
  assert target_field(text, "core_count") == "132"  # GH100 SXM: 132 SMs, both GPUs
  assert re.search(r"cuda_compute_capability\s*{\s*major:\s*9\s*minor:\s*0\s*}", text)


def test_target_memory_sizes():
  """H100 SXM "80GB": 79.1 GiB usable; H200 "141GB": 141 GiB (the files' comments say why)."""
  h100, h200 = (gpu_targets.target_memory_bytes(gpu_targets.target_config(n))
                for n in ("h100", "h200"))
  assert h100 == 84_942_979_072 and h100 / 2 ** 30 == pytest.approx(79.1, abs=0.05)
  assert h200 == 151_397_597_184 and h200 / 2 ** 30 == pytest.approx(141.0, abs=0.05)


def test_target_files_ship_with_the_package():
  import tomllib  # pylint: disable=g-import-not-at-top
  pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
  patterns = pyproject["tool"]["setuptools"]["package-data"]["sdseg_jax.gpu_targets"]
  folder = REPO_ROOT / "sdseg_jax" / "gpu_targets"
  shipped = {p.name for pattern in patterns for p in folder.glob(pattern)}
  assert {gpu.target_file for gpu in gpu_targets.GPUS.values()} <= shipped


def test_prepare_environment_appends_the_compile_only_flags(monkeypatch):
  monkeypatch.setenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "0")
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d --xla_gpu_autotune_level=2")
  gpu_targets.prepare_environment()
  # The user's flags stay first and win (their autotune level is kept, not overridden).
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_dump_to=/tmp/d", "--xla_gpu_autotune_level=2", "--xla_gpu_enable_triton_gemm=false"]
  assert os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
  assert gpu_targets.report_fields("h100:1")["xla_flags"] == [
      "--xla_dump_to=/tmp/d", "--xla_gpu_autotune_level=2", "--xla_gpu_enable_triton_gemm=false"]
  monkeypatch.delenv("XLA_FLAGS")
  gpu_targets.prepare_environment()
  assert os.environ["XLA_FLAGS"].split() == list(gpu_targets.COMPILE_ONLY_XLA_FLAGS)


# Runs the command with jax's CUDA plugin hidden from the import system, so that the error is
# checked on machines with and without the plugin.
_WITHOUT_PLUGIN = """
import importlib.abc, runpy, sys
class HidePlugin(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "jax_plugins.xla_cuda12" or name.startswith("jax_plugins.xla_cuda12."):
      raise ModuleNotFoundError(name)
    return None
sys.meta_path.insert(0, HidePlugin())
sys.argv = ["aot"] + sys.argv[1:]
runpy.run_module("sdseg_jax.aot", run_name="__main__", alter_sys=True)
"""


def test_missing_cuda_plugin_is_a_one_line_error(tmp_path):
  out = tmp_path / "r.json"
  proc = subprocess.run(
      [sys.executable, "-c", _WITHOUT_PLUGIN, "--config", "configs/tiny.py", "--topology",
       "h100:8", "--json", str(out)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [
      "error: topology 'h100:8' needs jax's CUDA plugin, which is not installed: pip install -r "
      "requirements-gpu-aot.txt  (jax[cuda12]==0.10.2, about 5 GB; a separate venv is best)"]
  assert "Traceback" not in proc.stderr
  assert not out.exists()
  assert "jax[cuda12]==0.10.2" in (REPO_ROOT / "requirements-gpu-aot.txt").read_text()


def test_tiny_config_compiles_for_two_h100(tmp_path):
  """The real train step and inference, compiled by XLA:GPU for two compile-only H100s."""
  if not gpu_targets.cuda_plugin_installed():
    pytest.skip("jax's CUDA plugin is not installed (pip install -r requirements-gpu-aot.txt, "
                "about 5 GB; CI does not install it)")
  out = tmp_path / "h100.json"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the tests' emulated-CPU flags; the command adds the GPU ones
  proc = subprocess.run(
      [sys.executable, "-m", "sdseg_jax.aot", "--config", "configs/tiny.py", "--topology",
       "h100:2", "--json", str(out)],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["topology"] == "h100:2" and report["num_chips"] == 2
  assert report["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert report["hbm_bytes_per_chip"] == 84_942_979_072
  assert report["mesh"] == {"data": 2, "fsdp": 1} and report["compute_dtype"] == "bfloat16"
  assert report["xla_flags"] == list(gpu_targets.COMPILE_ONLY_XLA_FLAGS)
  assert report["gpu_target_config"] == "sdseg_jax/gpu_targets/h100_sxm.txtpb"
  for suite in ("train", "infer"):
    r = report[suite]
    assert not [k for k in compiled_cost.SUITE_KEYS if k not in r], suite
    assert r["fits"] is True and 0 < r["peak_bytes_per_chip"] < 2 ** 30
    assert r["temp_bytes_per_chip"] > 0 and r["per_chip_batch"] == 4
    # XLA:GPU gives no cost analysis: null with the reason, and the roofline says what it uses.
    assert r["flops_per_chip"] is None and r["bytes_accessed_per_chip"] is None
    assert "cost_analysis() is empty" in r["flops_note"]
    assert r["xla_optimal_seconds"] is None
    traffic = r["argument_bytes_per_chip"] + r["output_bytes_per_chip"]
    assert r["roofline_step_seconds"] == pytest.approx(max(
        r["model_flops_per_chip"] / report["peak_flops_per_chip"],
        traffic / report["hbm_bytes_per_second_per_chip"]))
    assert "model FLOPs" in r["roofline_note"]
    assert r["rematerialized_instructions"] == 0  # far below the memory limit
    assert 0 < r["estimated_mfu"] <= 1
  assert report["train"]["collectives"]["all-reduce"]["count"] > 0  # dp over 2 GPUs
  assert "XLA FLOPs n/a" in proc.stdout and "--xla_gpu_autotune_level=0" in proc.stdout


class _CompiledWithoutCostAnalysis:
  """What XLA:GPU's compile-only executable offers: a memory plan and HLO, no cost analysis."""

  def __init__(self, hlo: str):
    self._hlo = hlo

  def memory_analysis(self):
    return types.SimpleNamespace(argument_size_in_bytes=5 * 2 ** 30,
                                 output_size_in_bytes=4 * 2 ** 30,
                                 alias_size_in_bytes=4 * 2 ** 30, temp_size_in_bytes=20 * 2 ** 30,
                                 generated_code_size_in_bytes=0)

  def cost_analysis(self):
    return None

  def as_text(self):
    return self._hlo


# HLO text of XLA:GPU's h100 train step at batch 104, shortened: XLA names a recomputed
# instruction `<name>.remat`; definitions count, uses do not.
_REMAT_HLO = """
  %loop_transpose_fusion.48.remat = bf16[768,3,3,768]{3,2,1,0} fusion(%p.1), kind=kLoop
  %gte.remat = bf16[104,256,256,128]{3,2,1,0} get-tuple-element(%loop_compare_select_fusion.remat)
  %conv.2 = bf16[104,32,32,768]{3,2,1,0} custom-call(%gte.remat, %loop_transpose_fusion.48.remat)
  ROOT %tuple.remat2 = (f32[]) tuple(%conv.2)
  %loop_multiply_fusion.remat_like = f32[] fusion(%p.2)
"""


@pytest.mark.parametrize("model_gflop, bound", [(1216.0, "compute"), (1.0, "memory")])
def test_report_without_cost_analysis(model_gflop, bound):
  """XLA:GPU's case: XLA's counts are null with the reason; the roofline is built from the
  model FLOPs and the memory plan's argument + output bytes, whichever bound is larger."""
  chip = compiled_cost.CHIPS["NVIDIA H100 80GB HBM3"]
  r = compiled_cost.analyse(
      _CompiledWithoutCostAnalysis(_REMAT_HLO), chip=chip, num_chips=1, per_chip_batch=32,
      model_flops={"value": model_gflop * 1e9, "source": "test"}, compile_seconds=1.0)
  assert not [k for k in compiled_cost.SUITE_KEYS if k not in r]
  assert r["flops_per_chip"] is None and r["bytes_accessed_per_chip"] is None
  assert r["xla_to_model_flops"] is None and r["xla_optimal_seconds"] is None
  assert "cost_analysis() is empty" in r["flops_note"]
  assert r["bytes_accessed_note"] == r["flops_note"]
  compute = 32 * model_gflop * 1e9 / chip.peak_flops
  memory = 9 * 2 ** 30 / chip.hbm_bytes_per_second  # 5 GiB arguments + 4 GiB outputs
  assert (compute > memory) == (bound == "compute")
  assert r["roofline_step_seconds"] == pytest.approx(max(compute, memory))
  assert r["estimated_images_per_s_per_chip"] == pytest.approx(32 / max(compute, memory))
  assert r["estimated_mfu"] == pytest.approx(compute / max(compute, memory))
  assert r["peak_bytes_per_chip"] == 25 * 2 ** 30 and r["fits"] is True
  assert r["rematerialized_instructions"] == 3
