"""`python -m sdseg_jax.aot`: the tiny config compiled by XLA:TPU for compile-only TPU slices.

Each test runs the command as a user does (a subprocess: its exit status and JSON are the
interface). They need libtpu (requirements-tpu.txt): without it they skip with a reason on a
user's clone, and fail under CI, which sets SDSEG_REQUIRE_TPU_COMPILER=1 and installs it.
A tiny-config compile for TPU takes about a minute on a 2-core machine, so each test compiles
only what it checks; the full-size figures are in BENCHMARKS.md.
"""

import concurrent.futures
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 2 ** 30

SUITE_KEYS = ("fits", "peak_bytes_per_chip", "argument_bytes_per_chip", "output_bytes_per_chip",
              "alias_bytes_per_chip", "temp_bytes_per_chip", "flops_per_chip",
              "model_flops_per_chip", "bytes_accessed_per_chip", "roofline_step_seconds",
              "xla_optimal_seconds", "estimated_images_per_s_per_chip", "estimated_mfu",
              "collectives", "compile_seconds")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute")


@pytest.fixture(scope="module", autouse=True)
def _need_libtpu():
  if importlib.util.find_spec("libtpu") is None:
    message = "libtpu is not installed: pip install -r requirements-tpu.txt"
    if os.environ.get("SDSEG_REQUIRE_TPU_COMPILER") == "1":
      pytest.fail(message + " (SDSEG_REQUIRE_TPU_COMPILER=1)")
    pytest.skip(message)


def aot(tmp_path: pathlib.Path, name: str, *args: str) -> tuple:
  """Runs the command; returns (exit status, stderr, JSON report or None)."""
  out = tmp_path / f"{name}.json"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the tests' emulated-CPU flags mean nothing to XLA:TPU
  proc = subprocess.run(
      [sys.executable, "-m", "sdseg_jax.aot", "--config", "configs/tiny.py", "--json", str(out),
       *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  report = json.loads(out.read_text()) if out.is_file() else None
  return proc.returncode, proc.stderr, report


def check_schema(report: dict, suites=("train", "infer")) -> None:
  for key in ("topology", "num_chips", "device_kind", "hbm_bytes_per_chip"):
    assert key in report, key
  assert report["device_kind"] == "TPU v5 lite"
  assert report["hbm_bytes_per_chip"] == 16 * GIB
  for suite in suites:
    r = report[suite]
    missing = [k for k in SUITE_KEYS if k not in r]
    assert not missing, (suite, missing)
    assert r["fits"] is True
    mem = (r["argument_bytes_per_chip"] + r["output_bytes_per_chip"]
           - r["alias_bytes_per_chip"] + r["temp_bytes_per_chip"])
    assert mem <= r["peak_bytes_per_chip"] < report["hbm_bytes_per_chip"]
    assert r["flops_per_chip"] > 0 and r["model_flops_per_chip"] > 0
    assert r["bytes_accessed_per_chip"] > 0
    # The roofline estimate is the larger of its compute and memory terms.
    peak_flops = report["peak_flops_per_chip"]
    compute = max(r["flops_per_chip"], r["model_flops_per_chip"]) / peak_flops
    memory = r["bytes_accessed_per_chip"] / report["hbm_bytes_per_second_per_chip"]
    assert r["roofline_step_seconds"] == pytest.approx(max(compute, memory))
    assert r["estimated_images_per_s_per_chip"] == pytest.approx(
        r["per_chip_batch"] / r["roofline_step_seconds"])
    assert 0 < r["estimated_mfu"] <= 1
    assert r["xla_optimal_seconds"] is None or r["xla_optimal_seconds"] > 0
    for name in COLLECTIVES:
      assert set(r["collectives"][name]) == {"count", "bytes"}
    assert r["compile_seconds"] > 0


def test_dp_and_fsdp_on_v5e_2x2(tmp_path):
  """Both strategies compile both suites; fsdp holds fewer argument bytes per chip; XLA's
  FLOPs grow with the per-chip batch (inference: no batch-independent work, so 2x batch is
  2x FLOPs)."""
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    dp_run = pool.submit(aot, tmp_path, "dp", "--topology", "v5e:2x2",
                         "--config.mesh.strategy=dp")
    fsdp_run = pool.submit(aot, tmp_path, "fsdp", "--topology", "v5e:2x2",
                           "--config.mesh.strategy=fsdp", "--config.mesh.data=1",
                           "--config.mesh.fsdp=4")
    double_run = pool.submit(aot, tmp_path, "dp16", "--topology", "v5e:2x2", "--suite", "infer",
                             "--config.train.global_batch_size=16")
    runs = [dp_run.result(), fsdp_run.result(), double_run.result()]
  for rc, err, _ in runs:
    assert rc == 0, err[-3000:]
  (_, _, dp), (_, _, fsdp), (_, _, double) = runs
  for report in (dp, fsdp):
    check_schema(report)
    assert report["num_chips"] == 4 and report["topology"] == "v5e:2x2"
  assert dp["mesh"] == {"data": 4, "fsdp": 1} and fsdp["mesh"] == {"data": 1, "fsdp": 4}
  for suite in ("train", "infer"):
    assert (fsdp[suite]["argument_bytes_per_chip"]
            < 0.8 * dp[suite]["argument_bytes_per_chip"]), suite
  # dp: gradients are all-reduced and nothing is gathered; fsdp gathers its sharded params.
  assert dp["train"]["collectives"]["all-reduce"]["count"] > 0
  assert dp["train"]["collectives"]["all-gather"]["count"] == 0
  assert fsdp["train"]["collectives"]["all-gather"]["count"] > 0
  assert fsdp["infer"]["collectives"]["all-gather"]["count"] > 0
  # Per-chip batch 2 -> 4.
  check_schema(double, suites=("infer",))
  small, large = dp["infer"], double["infer"]
  assert (small["per_chip_batch"], large["per_chip_batch"]) == (2, 4)
  assert large["flops_per_chip"] / small["flops_per_chip"] == pytest.approx(2.0, rel=0.05)
  assert large["model_flops_per_chip"] == pytest.approx(2 * small["model_flops_per_chip"])


def test_multi_host_v5e_4x4(tmp_path):
  """A 4-host slice compiles the same global program (global batch split over 16 chips)."""
  rc, err, report = aot(tmp_path, "pod", "--topology", "v5e:4x4", "--suite", "train",
                        "--config.train.global_batch_size=16")
  assert rc == 0, err[-3000:]
  check_schema(report, suites=("train",))
  assert report["num_chips"] == 16 and report["num_hosts"] == 4
  assert report["train"]["per_chip_batch"] == 1
  assert report["train"]["collectives"]["all-reduce"]["count"] > 0


def test_a_preset_that_does_not_fit_exits_non_zero(tmp_path):
  """A 4096-channel UNet needs far more than 16 GiB: XLA refuses, the command says so."""
  rc, err, report = aot(tmp_path, "huge", "--topology", "v5e:2x2", "--suite", "infer",
                        "--config.model.unet.model_channels=4096")
  assert rc == 1, err[-3000:]
  assert report["infer"]["fits"] is False
  assert "exceeds available HBM" in report["infer"]["error"]
  peak = report["infer"]["peak_bytes_per_chip"]
  assert peak > 0.9 * report["hbm_bytes_per_chip"]
  assert "infer does not fit" in err
  assert f"peak {peak / GIB:.2f} GiB" in err and "16.0 GiB HBM" in err


def test_unknown_topology_is_a_clear_error(tmp_path):
  rc, err, report = aot(tmp_path, "bad", "--topology", "v5e-8")
  assert rc == 2 and report is None
  assert "unknown topology 'v5e-8'" in err and "v5e:2x4" in err


def test_attention_kernel_comparison_on_the_tiny_model(tmp_path):
  """`python -m sdseg_jax.bench.tpu_attention`: every attention call of the train step and of
  inference, compiled for one v5e chip with XLA's attention and with the Pallas kernel."""
  out = tmp_path / "attention.json"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "sdseg_jax.bench.tpu_attention", "--config", "configs/tiny.py",
       "--topology", "v5e:2x2", "--json", str(out)],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["per_chip_batch"] == 2 and report["device_kind"] == "TPU v5 lite"
  rows = {(r["suite"], tuple(r["q_shape"]), r["kernel"]): r for r in report["rows"]}
  # The tiny model: the VAE mid-block attends over the 16x16 latent (256 tokens, one head of
  # 64), the UNet over 8x8 (64 tokens, two heads of 32); once per network in each suite.
  vae_call, unet_call = (2, 256, 1, 64), (2, 64, 2, 32)
  for suite in ("train", "infer"):
    assert {shape for (s, shape, _) in rows if s == suite} == {vae_call, unet_call}
    for kernel in ("xla", "pallas"):
      assert rows[(suite, vae_call, kernel)]["flops"] > 0
    assert rows[(suite, unet_call, "xla")]["flops"] > 0
    assert "not a multiple of the kernel's 128-row block" in rows[
        (suite, unet_call, "pallas")]["error"]
  # The backward pass costs more than the forward pass.
  assert rows[("train", vae_call, "xla")]["flops"] > rows[("infer", vae_call, "xla")]["flops"]
  assert "train/pallas" in report["roofline_seconds_summed"]
  assert "estimate" in proc.stdout


def test_per_device_figures_split_a_chip_between_its_tensorcores():
  """libtpu describes a v4 chip's two TensorCores as two devices: each gets half the chip."""
  import types  # pylint: disable=g-import-not-at-top

  from sdseg_jax import aot as aot_lib  # pylint: disable=g-import-not-at-top
  from sdseg_jax import compiled_cost  # pylint: disable=g-import-not-at-top
  device = lambda kind, x: types.SimpleNamespace(device_kind=kind, coords=[x, 0, 0])
  v4 = [device("TPU v4", x) for x in (0, 0, 1, 1)]
  assert aot_lib.devices_per_chip(v4) == 2
  chip, core = compiled_cost.CHIPS["TPU v4"], aot_lib.device_figures(v4)
  assert core.hbm_bytes == chip.hbm_bytes // 2 == 16 * GIB
  assert core.peak_flops == chip.peak_flops / 2
  assert core.hbm_bytes_per_second == chip.hbm_bytes_per_second / 2
  v5e = [device("TPU v5 lite", x) for x in range(4)]
  assert aot_lib.devices_per_chip(v5e) == 1
  assert aot_lib.device_figures(v5e) == compiled_cost.CHIPS["TPU v5 lite"]
