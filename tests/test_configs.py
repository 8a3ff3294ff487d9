"""Every shipped config loads, passes validation and builds its model; typos are rejected."""

import importlib.util
import math
import pathlib

import jax
import pytest

from configs import base
from sdseg_jax import config_lib
from sdseg_jax.models import sdseg

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ("kvasir", "cvc", "refuge", "btcv", "sts3d")


def load(name: str):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", BENCHMARKS)
@pytest.mark.parametrize("variant", base.VARIANTS)
def test_benchmark_configs_validate(name, variant):
  config = load(name).get_config(variant)
  config_lib.validate(config)
  assert config.data.name == name
  assert config.eval.split == "val"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_configs_hold_the_official_recipe(name):
  config = load(name).get_config()
  assert config.train.global_batch_size == 4
  assert config.optim.base_lr == 1e-5 and config.optim.scale_lr
  assert config.optim.weight_decay == 0.01 and config.optim.warmup_steps == 10_000
  assert config.ema.decay == 0.9999 and config.train.latent_loss_weight == 1.0
  model = sdseg.build(config.model)
  params, vae = jax.eval_shape(model.init, jax.random.key(0))
  count = lambda t: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(t))
  assert count(params["unet"]) == 294_973_828 and count(vae) == 83_653_863


def test_demo_config_is_small_and_self_contained():
  config = load("demo").get_config()
  config_lib.validate(config)
  assert config.data.name == "synthetic" and config.init.pretrain_vae_steps > 0
  assert not config.init.vae and not config.init.unet


def test_unknown_variant_and_locked_fields():
  with pytest.raises(ValueError, match="unknown config variant"):
    load("kvasir").get_config("tpu9000")
  config = base.get_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.train.max_stepz = 3


def test_invalid_values_name_the_field():
  config = load("kvasir").get_config()
  config.eval.split = "test"
  with pytest.raises(config_lib.ConfigError, match="config.eval.split"):
    config_lib.validate(config)
  config = load("kvasir").get_config()
  config.data.image_size = 128
  with pytest.raises(config_lib.ConfigError, match="config.model.vae.resolution"):
    config_lib.validate(config)


@pytest.mark.parametrize("variant", sorted(base.TPU_PRESETS))
def test_tpu_presets_are_what_the_compiler_checked(variant):
  """Each TPU preset is exactly a configuration whose train step and inference XLA:TPU compiled
  and found to fit (`python -m sdseg_jax.aot`, recorded in benchmarks/aot/): a preset changed
  without a new compile fails here."""
  import json  # pylint: disable=g-import-not-at-top
  topology, devices, per_device, remat = base.TPU_PRESETS[variant]
  record = REPO / "benchmarks" / "aot" / f"refuge_{variant}_{topology.replace(':', '-')}.json"
  assert record.is_file(), f"no compile recorded for {variant}: {record}"
  report = json.loads(record.read_text())
  config = load("refuge").get_config(variant)
  assert report["topology"] == topology and report["num_chips"] == devices
  assert report["global_batch_size"] == config.train.global_batch_size == devices * per_device
  assert report["strategy"] == config.mesh.strategy
  assert report["mesh"] == {"data": devices, "fsdp": 1} and config.mesh.fsdp == 1
  assert report["compute_dtype"] == config.model.compute_dtype == "bfloat16"
  assert report.get("use_checkpoint", False) == config.model.unet.use_checkpoint == remat
  for suite in ("train", "infer"):
    assert report[suite]["fits"], (variant, suite)
    assert report[suite]["per_chip_batch"] == per_device
