"""Builds the tiny official-fixture models and loads the official fixture checkpoints.

Every size comes from the fixture folder's `tiny_config.json`, so the parity tests also pass on
fixtures regenerated with other tiny sizes.
"""

import functools
import json
import pathlib
from typing import Any, Dict, Tuple

import jax

from sdseg_jax.models import model_config
from sdseg_jax.models import sdseg
from sdseg_jax.weights import convert
from sdseg_jax.weights import torch_pickle


def tiny_model_config(fixtures: pathlib.Path, num_classes=None):
  tiny = json.loads((fixtures / "tiny_config.json").read_text())
  unet = {k: v for k, v in tiny["unet"].items() if k != "use_fp16"}
  unet["use_checkpoint"] = False
  if num_classes is not None:
    unet["num_classes"] = num_classes
  sched = tiny["schedule"]
  return model_config.model_config(
      tiny["vae_ddconfig"], unet, embed_dim=tiny["vae_ddconfig"]["z_channels"],
      vision_embed_dim=tiny["vision_encoder_embed_dim"], timesteps=sched["timesteps"],
      linear_start=sched["linear_start"], linear_end=sched["linear_end"])


def tiny_config_json(fixtures: pathlib.Path) -> Dict[str, Any]:
  return json.loads((fixtures / "tiny_config.json").read_text())


@functools.lru_cache(maxsize=None)
def abstract_params(fixtures: pathlib.Path, num_classes=None) -> Tuple[sdseg.SDSeg, Any, Any]:
  model = sdseg.build(tiny_model_config(fixtures, num_classes))
  params, vae = jax.eval_shape(model.init, jax.random.key(0))
  return model, params, vae


@functools.lru_cache(maxsize=None)
def state_dict(path: pathlib.Path) -> Dict[str, Any]:
  return torch_pickle.state_dict_from_checkpoint(torch_pickle.load_torch_checkpoint(path), path)


def load_trained(fixtures: pathlib.Path, use_ema: bool):
  """The tiny official SDSeg training checkpoint as (model, converted trees, report)."""
  model, params, vae = abstract_params(fixtures)
  trees, report = convert.convert_sdseg(
      state_dict(fixtures / "tiny_sdseg_trained.ckpt"), params["unet"],
      params["vision_encoder"], vae, use_ema=use_ema, schedule_betas=model.schedule.betas)
  return model, trees, report
