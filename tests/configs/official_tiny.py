"""The tiny architecture of the official fixtures as a run config (for the convert CLI tests).

Sizes are read from $SDSEG_OFFICIAL_FIXTURES/tiny_config.json (default ../shared/...), never
hard-coded, so the tests follow regenerated fixtures.
"""

import json
import os
import pathlib

from configs import base
from sdseg_jax.models import model_config


def get_config():
  root = pathlib.Path(__file__).resolve().parents[2]
  fixtures = pathlib.Path(os.environ.get(
      "SDSEG_OFFICIAL_FIXTURES", root.parent / "shared" / "fixtures" / "official-sdseg"))
  tiny = json.loads((fixtures / "tiny_config.json").read_text())
  unet = {k: v for k, v in tiny["unet"].items() if k != "use_fp16"}
  config = base.get_config()
  config.model = model_config.model_config(
      tiny["vae_ddconfig"], unet, embed_dim=tiny["vae_ddconfig"]["z_channels"],
      vision_embed_dim=tiny["vision_encoder_embed_dim"],
      timesteps=tiny["schedule"]["timesteps"], linear_start=tiny["schedule"]["linear_start"],
      linear_end=tiny["schedule"]["linear_end"])
  config.data.image_size = tiny["vae_ddconfig"]["resolution"]
  return config
