"""Our Flax SDSeg reproduces the official PyTorch modules' outputs (float32) and key layouts.

References come from `tiny_reference*.npz`, produced by the official modules with the fixture
checkpoints (see ../shared/fixtures/official-sdseg/SOURCE.md). Tolerance: max abs error
<= 1e-4 x max |ref|.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdseg_jax import diffusion
from sdseg_jax.models import layers
from sdseg_jax.models import model_config
from sdseg_jax.models import sdseg
from sdseg_jax.weights import convert
from tests import official_models

RTOL_OF_MAX = 1e-4


def nhwc(x):
  return np.moveaxis(np.asarray(x), 1, -1)


def assert_matches(name, got, ref, errors=None):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, f"{name}: shape {got.shape} vs reference {ref.shape}"
  err = float(np.max(np.abs(got - ref)))
  bound = RTOL_OF_MAX * float(np.max(np.abs(ref)))
  if errors is not None:
    errors[name] = (err, bound)
  assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def ref(official_fixtures):
  return dict(np.load(official_fixtures / "tiny_reference.npz"))


# Both forms of each alternative layer (models/layers.py, `Kernels`) must reproduce the official
# outputs: "auto" picks between them per backend.
KERNEL_FORMS = [layers.Kernels(norm="channel_sums", upsample="folded"),
                layers.Kernels(norm="flax", upsample="repeat")]


@pytest.fixture(scope="module", params=KERNEL_FORMS, ids=lambda k: f"{k.norm}-{k.upsample}")
def online(official_fixtures, request):
  model, trees, report = official_models.load_trained(official_fixtures, use_ema=False)
  kernels = request.param
  model = dataclasses.replace(model, vae=model.vae.clone(kernels=kernels),
                              vision_encoder=model.vision_encoder.clone(kernels=kernels),
                              unet=model.unet.clone(kernels=kernels))
  return model, trees, report


@pytest.fixture(scope="module")
def computed(official_fixtures, ref, online):
  """Every reference quantity recomputed by sdseg_jax from the official weights."""
  model, trees, _ = online
  vae_ae, _ = convert.convert_autoencoder(
      official_models.state_dict(official_fixtures / "tiny_klf8_autoencoder.ckpt"),
      official_models.abstract_params(official_fixtures)[2])
  params = {"unet": trees["unet"], "vision_encoder": trees["vision_encoder"]}
  s = jnp.float32(ref["scale_factor"])
  t = jnp.asarray(ref["t"], jnp.int32)
  noise = nhwc(ref["noise"])
  out = {}
  out["encoder_moments"] = jax.jit(
      lambda v, x: model.vae.apply({"params": v}, x, method=model.vae.encode_moments))(
          vae_ae, nhwc(ref["mask3"]))
  out["z0"] = model.encode_mask(vae_ae, nhwc(ref["mask3"]), s)
  out["decoded"] = model.decode(vae_ae, out["z0"], s)
  out["cond"] = model.encode_image(params, nhwc(ref["image"]))
  out["z_t"] = diffusion.q_sample(model.schedule, out["z0"], t, noise)
  out["eps"] = model.denoise(params["unet"], out["z_t"], out["cond"], t)
  out["z0_hat"] = diffusion.predict_x0_from_eps(model.schedule, out["z_t"], t, out["eps"])
  out["loss"] = diffusion.sdseg_loss(model.schedule, out["z0"], out["z_t"], t, noise,
                                     out["eps"])[0]
  pred = model.predict(params, vae_ae, nhwc(ref["image"]), noise, s)
  out["z0_single"] = pred["latent"]
  out["decoded_single"] = model.decode(vae_ae, pred["latent"], s)
  out["prob_single"] = pred["prob"]
  out["pred_single"] = pred["mask"]
  t999 = jnp.full((noise.shape[0],), model.schedule.num_timesteps - 1, jnp.int32)
  out["eps_single"] = model.denoise(params["unet"], noise, out["cond"], t999)
  return out


def test_schedule_matches_official(official_fixtures, ref):
  model, _, _ = official_models.abstract_params(official_fixtures)
  np.testing.assert_allclose(model.schedule.betas, ref["betas"], rtol=1e-6)
  np.testing.assert_allclose(model.schedule.alphas_cumprod, ref["alphas_cumprod"], rtol=1e-6)


@pytest.mark.parametrize("name", [
    "encoder_moments", "z0", "decoded", "cond", "z_t", "eps", "z0_hat", "loss", "eps_single",
    "z0_single", "decoded_single", "prob_single"])
def test_reference_array(name, ref, computed):
  want = ref[name]
  got = computed[name]
  if want.ndim == 4:
    want = nhwc(want)
  assert_matches(name, got, want)


def test_single_step_prediction(ref, computed):
  prob = ref["prob_single"]
  decided = np.abs(prob - 0.5) > 1e-3
  assert decided.mean() > 0.5, "too few confidently decided pixels to test the threshold"
  np.testing.assert_array_equal(np.asarray(computed["pred_single"])[decided],
                                ref["pred_single"].astype(bool)[decided])


def test_ema_unet(official_fixtures, ref, computed):
  ema_ref = np.load(official_fixtures / "tiny_reference_ema.npz")["eps_ema"]
  model, trees, report = official_models.load_trained(official_fixtures, use_ema=True)
  t = jnp.asarray(ref["t"], jnp.int32)
  eps = model.denoise(trees["unet"], computed["z_t"], computed["cond"], t)
  assert_matches("eps_ema", eps, nhwc(ema_ref))
  assert not np.allclose(eps, computed["eps"]), "EMA and online UNets must differ here"
  assert any(k.startswith("model.diffusion_model.") for k in report.ignored)


def test_class_embed_unet(official_fixtures, ref, computed):
  cfg = official_models.tiny_config_json(official_fixtures)
  k = cfg["unet_class_embed_num_classes"]
  model, params, _ = official_models.abstract_params(official_fixtures, num_classes=k)
  state = official_models.state_dict(official_fixtures / "tiny_unet_class_embed.ckpt")
  report = convert.ConversionReport("class_embed")
  unet = convert.map_module(state, "model.diffusion_model.", params["unet"], "unet", report)
  eps = model.denoise(unet, computed["z_t"], computed["cond"], jnp.asarray(ref["t"], jnp.int32),
                      jnp.asarray(ref["cls"], jnp.int32))
  assert_matches("eps_class_embed", eps, nhwc(ref["eps_class_embed"]))


def test_ldm_unet_is_widened_with_zero_condition_channels(official_fixtures):
  _, params, _ = official_models.abstract_params(official_fixtures)
  state = official_models.state_dict(official_fixtures / "tiny_ldm_unet4ch.ckpt")
  unet, report = convert.convert_ldm_unet(state, params["unet"])
  kernel = unet["input_blocks_0_0"]["kernel"]  # HWIO
  src = state["model.diffusion_model.input_blocks.0.0.weight"]
  np.testing.assert_array_equal(kernel[:, :, :src.shape[1], :], src.transpose(2, 3, 1, 0))
  assert not np.any(kernel[:, :, src.shape[1]:, :])
  assert any(k.startswith("first_stage_model.") for k in report.ignored)
  assert all(k in report.mapped or k in report.ignored for k in state)


# ---- full-size key manifests ------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_size():
  model = sdseg.build(model_config.model_config())
  params, vae = jax.eval_shape(model.init, jax.random.key(0))
  return model, params, vae


def manifest_state(path):
  """A manifest {key: shape} as a state_dict of zero-strided placeholders (no memory)."""
  shapes = json.loads(path.read_text())
  return {k: np.broadcast_to(np.float32(0), tuple(s)) for k, s in shapes.items()}


def test_manifest_klf8_autoencoder(official_fixtures, full_size):
  state = manifest_state(official_fixtures / "manifest_klf8_autoencoder.json")
  _, report = convert.convert_autoencoder(state, full_size[2])
  assert len(report.mapped) == len(state) and not report.ignored


def test_manifest_lsun_churches_unet(official_fixtures, full_size):
  state = manifest_state(official_fixtures / "manifest_lsun_churches256_unet.json")
  _, report = convert.convert_ldm_unet(state, full_size[1]["unet"])
  assert len(report.mapped) == len(state)
  assert report.notes and "4 -> 8" in report.notes[0]


@pytest.mark.parametrize("use_ema", [True, False])
def test_manifest_sdseg_trained_checkpoint(official_fixtures, full_size, use_ema):
  model, params, vae = full_size
  state = manifest_state(official_fixtures / "manifest_sdseg_trained_checkpoint.json")
  trees, report = convert.convert_sdseg(state, params["unet"], params["vision_encoder"], vae,
                                        use_ema=use_ema)
  assert set(report.mapped) | set(report.ignored) == set(state)
  assert not set(report.mapped) & set(report.ignored)
  n_unet = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(trees["unet"]))
  counts = json.loads((official_fixtures / "parameter_counts.json").read_text())
  assert n_unet == counts["unet_8ch"]


def test_parameter_counts(official_fixtures, full_size):
  counts = json.loads((official_fixtures / "parameter_counts.json").read_text())
  _, params, vae = full_size
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
  assert count(params["unet"]) == counts["unet_8ch"]
  assert count(vae) == counts["vae"]
  assert count(params["vision_encoder"]) == counts["vision_encoder"]
