"""Fast checks of sdseg_jax.benchmark on a tiny model: both suites run and the JSON has its schema.

The full-size model is far too slow for the test suite, so a tiny config (32x32, 32 channels)
stands in, for one iteration each. The JAX part always runs; the PyTorch baseline part runs with
small diffusers modules whenever torch and diffusers are importable (they are optional:
requirements-bench.txt); without them it is skipped on a user's clone and fails under `.ci/run`
(SDSEG_REQUIRE_TORCH=1), which installs them.
"""

import importlib.util
import json
import os
import pathlib

import jax
import pytest

from configs import base
from sdseg_jax import benchmark
from sdseg_jax.models import model_config

SIZE = 32
_HAVE_TORCH = (importlib.util.find_spec("torch") is not None
               and importlib.util.find_spec("diffusers") is not None)


def _tiny_config():
  config = base.get_config()
  config.model = model_config.model_config(
      ddconfig=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=SIZE),
      unet_config=dict(image_size=SIZE // 2, model_channels=32, channel_mult=[1, 2],
                       attention_resolutions=[2], num_res_blocks=1, num_heads=2, dropout=0.0))
  config.data.image_size = SIZE
  return config


def _check_entry(entry, suite, batch):
  assert entry["suite"] == suite and entry["batch"] == batch
  assert entry["images_per_s"] > 0 and entry["median_s"] > 0
  assert entry["iters"] == 1 and len(entry["times_s"]) == 1


def test_full_size_detection():
  assert benchmark.is_full_size(base.get_config())
  assert not benchmark.is_full_size(_tiny_config())
  # How the model is computed (layer forms, remat, dtype) leaves its FLOPs unchanged.
  config = base.get_config()
  config.model.norm_impl, config.model.upsample_impl = "flax", "repeat"
  config.model.attention_impl, config.model.compute_dtype = "cudnn", "bfloat16"
  config.model.unet.use_checkpoint = True
  assert benchmark.is_full_size(config)
  config.model.unet.num_res_blocks = 3
  assert not benchmark.is_full_size(config)


def test_map_microbatches_equals_one_call():
  x = jax.numpy.arange(24.0).reshape(6, 4)
  fn = lambda a, b: (a * 2 + b).sum(axis=-1)
  expected = fn(x, x)
  for microbatch in (0, 1, 2, 3, 6):
    got = jax.jit(lambda a, b, m=microbatch: benchmark.map_microbatches(fn, m, a, b))(x, x)
    assert (got == expected).all()
  with pytest.raises(ValueError, match="multiple"):
    benchmark.map_microbatches(fn, 4, x, x)
  assert benchmark.resolve_microbatch(None, "cpu") == 1
  assert benchmark.resolve_microbatch(None, "gpu") == 0
  assert benchmark.resolve_microbatch(2, "gpu") == 2


def test_mfu_basis():
  info = {"peak_tflops": {"bfloat16": 989.4, "float32": 494.7}}
  # 1056 inference images/s is 100% of an H100's dense bf16 peak
  # (docs/performance.md#throughput-ceilings).
  assert benchmark.mfu(1056.0, "infer", "bfloat16", info) == pytest.approx(1.0, rel=1e-3)
  assert benchmark.mfu(1056.0, "infer", "bfloat16", info, full_size=False) is None
  assert benchmark.mfu(1.0, "train", "bfloat16", {"peak_tflops": None}) is None
  cpu = benchmark.device_info(measure_cpu_peak=False)
  assert cpu["platform"] == "cpu" and "peak_basis" in cpu


def test_jax_suites_and_json_schema(tmp_path: pathlib.Path):
  partials = []
  report = benchmark.run(_tiny_config(), ["infer", "train"], [2], ["float32"], warmup=1,
                         iters=1, microbatches=[None, 0], command="test",
                         log=lambda _: None, partial=partials.append)
  assert report["complete"] and partials and not partials[0]["complete"]
  path = tmp_path / "report.json"
  path.write_text(json.dumps(report))
  report = json.loads(path.read_text())
  assert set(report) >= {"jax", "torch", "ratio", "device", "command", "date"}
  assert report["torch"] is None and report["ratio"] is None
  jax_block = report["jax"]
  assert jax_block["images_per_s"] > 0
  # "auto" micro-batching is one image per chunk on CPU; 0 is the whole batch at once.
  assert jax_block["headline"] == {"suite": "infer", "batch": 2, "dtype": "float32",
                                   "microbatch": 1}
  assert jax_block["compile_s"] > 0
  infer, infer_whole, train = jax_block["results"]
  assert (infer["microbatch"], infer_whole["microbatch"]) == (1, 0)
  _check_entry(infer, "infer", 2)
  _check_entry(infer_whole, "infer", 2)
  _check_entry(train, "train", 2)
  for entry in (infer, infer_whole, train):
    assert entry["compile_s"] > 0
    assert entry["memory"]["peak_bytes"] > 0 and entry["memory"]["peak_source"]
    assert entry["mfu"] is None  # a tiny model has no measured FLOP count
  assert train["final_loss"] == pytest.approx(train["final_loss"])  # finite, not NaN
  assert report["device"]["platform"] == jax.default_backend()
  assert "| jax | infer | 2 | float32 |" in benchmark.format_table(report)


def _require_torch() -> None:
  """Skips on a user's clone without the optional baseline; `.ci/run` makes that a failure."""
  if _HAVE_TORCH:
    return
  message = "torch/diffusers not installed (optional: pip install -r requirements-bench.txt)"
  if os.environ.get("SDSEG_REQUIRE_TORCH") == "1":
    pytest.fail(message + " but SDSEG_REQUIRE_TORCH=1")
  pytest.skip(message)


def test_torch_baseline_in_the_same_run(monkeypatch):
  _require_torch()
  import diffusers  # pylint: disable=g-import-not-at-top

  from sdseg_jax import benchmark_torch  # pylint: disable=g-import-not-at-top

  # Shrink the baseline the same way as the JAX model; the functions read these at call time.
  monkeypatch.setattr(benchmark_torch, "IMAGE_SIZE", SIZE)
  monkeypatch.setattr(benchmark_torch, "_VAE_BLOCKS", (32, 64))

  def small_unet():
    return diffusers.UNet2DModel(
        sample_size=SIZE // 2, in_channels=8, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16,
        norm_num_groups=32)

  monkeypatch.setattr(benchmark_torch, "_build_unet", small_unet)
  modules = benchmark_torch.build_modules("cpu")
  report = benchmark.run(_tiny_config(), ["infer"], [1, 2], ["float32"], warmup=0, iters=1,
                         baseline="torch", torch_device="cpu", torch_modules=modules,
                         command="test", log=lambda _: None)
  torch_block = report["torch"]
  assert torch_block["images_per_s"] > 0
  assert torch_block["headline"] == {"suite": "infer", "batch": 2, "dtype": "fp32"}
  assert [r["batch"] for r in torch_block["results"]] == [1, 2]
  assert report["ratio"] == pytest.approx(
      report["jax"]["images_per_s"] / torch_block["images_per_s"])
  assert {(r["batch"], r["same_dtype"]) for r in report["ratios"]} == {(1, True), (2, True)}
  json.dumps(report)  # serialisable
