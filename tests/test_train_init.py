"""How a run's trainable weights start: the LDM UNet from config.init.unet, the vision encoder
as a copy of the frozen VAE encoder (the official SDSeg initialisation), and clear errors.

Uses the official tiny LDM checkpoint, converted here, so the expected values come from the
official file rather than from the code under test.
"""

from flax import traverse_util
import jax
import numpy as np
import pytest

from configs import base
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import train as train_lib
from sdseg_jax.weights import artifacts
from sdseg_jax.weights import convert
from tests import official_models


def _setup(official_fixtures, tmp_path):
  model, abstract_params, abstract_vae = official_models.abstract_params(official_fixtures)
  config = base.get_config()
  config.model = official_models.tiny_model_config(official_fixtures)
  state = official_models.state_dict(official_fixtures / "tiny_ldm_unet4ch.ckpt")
  unet, _ = convert.convert_ldm_unet(state, abstract_params["unet"])
  path = tmp_path / "ldm_unet.npz"
  artifacts.save(path, {"unet": unet}, {"kind": "ldm_unet"})
  vae, _ = convert.convert_autoencoder(
      official_models.state_dict(official_fixtures / "tiny_klf8_autoencoder.ckpt"),
      abstract_vae)
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  param_sh = sharding_lib.param_shardings(abstract_params, mesh, "dp")
  return model, config, state, path, vae, abstract_params, param_sh


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_unet_from_config_init_unet_and_encoder_copied_from_the_vae(official_fixtures,
                                                                     tmp_path):
  model, config, state, path, vae, abstract_params, param_sh = _setup(official_fixtures,
                                                                      tmp_path)
  config.init.unet = str(path)
  params = train_lib.initial_params(config, model, abstract_params, param_sh,
                                     vae, jax.random.key(0))
  unet = _flat(params["unet"])
  # Straight from the official tensors: the first input conv (OIHW -> HWIO, 4 latent channels
  # then 4 zero condition channels), a ResBlock conv and the output conv.
  src = state["model.diffusion_model.input_blocks.0.0.weight"]
  first = unet[("input_blocks_0_0", "kernel")]
  np.testing.assert_array_equal(first[:, :, :src.shape[1]], src.transpose(2, 3, 1, 0))
  assert not first[:, :, src.shape[1]:].any()
  np.testing.assert_array_equal(
      unet[("input_blocks_1_0", "in_layers_2", "kernel")],
      state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(unet[("out_2", "bias")],
                                state["model.diffusion_model.out.2.bias"])
  assert unet[("out_2", "kernel")].any()  # not the zero init: the file's values
  # Every leaf of the UNet equals the artifact's.
  stored = _flat(artifacts.load(path)[0]["unet"])
  assert unet.keys() == stored.keys()
  for key in unet:
    np.testing.assert_array_equal(unet[key], stored[key], err_msg=str(key))

  encoder, vae_encoder = _flat(params["vision_encoder"]["encoder"]), _flat(vae["encoder"])
  assert encoder.keys() == vae_encoder.keys()
  for key in encoder:
    np.testing.assert_array_equal(encoder[key], vae_encoder[key], err_msg=str(key))
  out = _flat(params["vision_encoder"])
  assert any(k[0] != "encoder" and v.any() for k, v in out.items())  # the 1x1 out conv: random


def test_without_config_init_unet_the_unet_is_random(official_fixtures, tmp_path):
  model, config, state, _, vae, abstract_params, param_sh = _setup(official_fixtures, tmp_path)
  config.init.unet = ""
  params = train_lib.initial_params(config, model, abstract_params, param_sh,
                                     vae, jax.random.key(0))
  first = np.asarray(params["unet"]["input_blocks_0_0"]["kernel"])
  src = state["model.diffusion_model.input_blocks.0.0.weight"].transpose(2, 3, 1, 0)
  assert not np.array_equal(first[:, :, :src.shape[2]], src)


def test_a_wrong_artifact_is_an_error_naming_the_file(official_fixtures, tmp_path):
  model, config, _, _, vae, abstract_params, param_sh = _setup(official_fixtures, tmp_path)
  wrong = tmp_path / "vae_only.npz"
  artifacts.save(wrong, {"vae": {"x": np.zeros(2, np.float32)}}, {"kind": "autoencoder"})
  config.init.unet = str(wrong)
  with pytest.raises(artifacts.ArtifactError, match="vae_only.npz"):
    train_lib.initial_params(config, model, abstract_params, param_sh, vae,
                              jax.random.key(0))
  config.init.unet = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    train_lib.initial_params(config, model, abstract_params, param_sh, vae,
                              jax.random.key(0))
