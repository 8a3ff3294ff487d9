"""models/sdseg.py: how the three networks are built from config.model and composed.

The networks themselves are checked against the official PyTorch outputs in
test_official_parity.py; this file pins the glue around them, cheaply: `build` must pass every
config field to the right module (checked field by field on the built dataclasses, no compile),
and the stages (`init`, `encode_mask`, `encode_image`, `denoise`, `decode`, `predict`) are run on
stand-in Flax modules small enough that the expected outputs are written by hand in numpy.
"""

import functools
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdseg_jax import diffusion
from sdseg_jax import errors
from sdseg_jax.models import model_config
from sdseg_jax.models import sdseg
from sdseg_jax.models import vae as vae_lib

# ---- build -------------------------------------------------------------------------------------

DDCONFIG = dict(double_z=False, z_channels=3, resolution=48, in_channels=2, out_ch=5, ch=16,
                ch_mult=[1, 2, 4], num_res_blocks=3, attn_resolutions=[12], dropout=0.1)
UNET = dict(image_size=12, in_channels=7, out_channels=5, model_channels=24,
            attention_resolutions=[2, 4], num_res_blocks=3, channel_mult=[1, 3], num_heads=3,
            num_head_channels=8, num_heads_upsample=2, use_scale_shift_norm=False,
            resblock_updown=False, conv_resample=False, use_new_attention_order=True,
            dropout=0.3, use_checkpoint=True, num_classes=6)


def _config(**overrides):
  cfg = model_config.model_config(DDCONFIG, dict(UNET, **overrides.pop("unet", {})),
                                  embed_dim=5, vision_embed_dim=2, vision_dropout=0.25,
                                  timesteps=30, linear_start=1e-3, linear_end=0.04)
  cfg.compute_dtype = "float32"
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def test_build_passes_every_field_to_its_module():
  model = sdseg.build(_config(compute_dtype="bfloat16", precision="high",
                              attention_impl="cudnn"))
  shared = dict(ch=16, ch_mult=(1, 2, 4), num_res_blocks=3, attn_resolutions=(12,),
                resolution=48, z_channels=3, double_z=False, dtype=jnp.bfloat16,
                precision=jax.lax.Precision.HIGH, attention_impl="cudnn")
  for name, want in dict(shared, dropout=0.1, in_channels=2, out_ch=5, embed_dim=5).items():
    assert getattr(model.vae, name) == want, name
  for name, want in dict(shared, dropout=0.25, embed_dim=2).items():
    assert getattr(model.vision_encoder, name) == want, name
  unet_want = dict(
      image_size=12, in_channels=7, out_channels=5, model_channels=24,
      attention_resolutions=(2, 4), num_res_blocks=3, channel_mult=(1, 3), num_heads=3,
      num_head_channels=8, num_heads_upsample=2, use_scale_shift_norm=False,
      resblock_updown=False, conv_resample=False, use_new_attention_order=True, num_classes=6,
      dropout=0.3, remat_blocks=True, dtype=jnp.bfloat16, precision=jax.lax.Precision.HIGH,
      attention_impl="cudnn")
  for name, want in unet_want.items():
    assert getattr(model.unet, name) == want, name
  assert isinstance(model.vae.ch_mult, tuple) and isinstance(model.unet.channel_mult, tuple)
  assert model.image_size == 48 and model.latent_size == 12 and model.latent_channels == 5
  betas = np.linspace(np.sqrt(1e-3), np.sqrt(0.04), 30) ** 2
  np.testing.assert_allclose(model.schedule.betas, betas, rtol=1e-6)


def test_build_defaults_for_optional_fields():
  cfg = _config()
  for key in ("num_heads_upsample", "num_classes", "use_checkpoint", "use_spatial_transformer"):
    del cfg.unet[key]
  for key in ("compute_dtype", "precision", "attention_impl"):
    del cfg[key]
  model = sdseg.build(cfg)
  assert model.unet.num_heads_upsample == -1 and model.unet.num_classes is None
  assert model.unet.remat_blocks is False
  assert model.unet.dtype == model.vae.dtype == jnp.float32  # "auto" on the CPU test backend
  assert model.unet.precision is None and model.vision_encoder.precision is None
  assert model.unet.attention_impl is None
  highest = sdseg.build(_config(precision="highest"))
  assert highest.vae.precision == jax.lax.Precision.HIGHEST
  assert sdseg.build(_config(compute_dtype="float16")).unet.dtype == jnp.float16


def test_build_rejects_inconsistent_configs():
  with pytest.raises(ValueError, match=r"model\.unet\.use_spatial_transformer=True "
                                       r"\(cross-attention\) is not part of SDSeg"):
    sdseg.build(_config(unet={"use_spatial_transformer": True}))
  assert sdseg.build(_config(unet={"use_spatial_transformer": False})).unet.in_channels == 7
  with pytest.raises(ValueError, match=r"model\.unet\.in_channels=8 must equal the mask latent "
                                       r"channels \(5\) \+ condition channels \(2\)"):
    sdseg.build(_config(unet={"in_channels": 8}))


def test_resolve_compute_dtype():
  for backend in ("gpu", "cuda", "rocm", "tpu"):
    assert sdseg.resolve_compute_dtype("auto", backend) == "bfloat16"
  assert sdseg.resolve_compute_dtype("auto", "cpu") == "float32"
  assert sdseg.resolve_compute_dtype("auto") == "float32"  # the tests run on CPU
  for name in ("float32", "bfloat16", "float16"):
    assert sdseg.resolve_compute_dtype(name, "tpu") == name
  with pytest.raises(ValueError, match=r"unknown compute_dtype 'fp8'; expected 'auto' or one of "
                                       r"\['bfloat16', 'float16', 'float32'\]"):
    sdseg.resolve_compute_dtype("fp8")


def test_mask_probability_is_the_channel_mean_of_the_clipped_map():
  decoded = jnp.array([[[[-3.0, -1.0, 0.0], [1.0, 3.0, 0.5]]]], jnp.bfloat16)
  got = sdseg.mask_probability(decoded)
  assert got.shape == (1, 1, 2) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), [[[(0 + 0 + 0.5) / 3, (1 + 1 + 0.75) / 3]]])


def test_init_shapes_follow_the_config_even_when_condition_and_latent_widths_differ():
  """The UNet input is concat[z_t (embed_dim), c (vision_embed_dim)]; init used to assume the
  two widths are equal (2 x embed_dim), which build() accepts otherwise. Traced only."""
  cfg = model_config.model_config(
      dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16),
      dict(image_size=8, model_channels=32, channel_mult=[1], attention_resolutions=[],
           num_res_blocks=1, num_heads=1, in_channels=7), embed_dim=4, vision_embed_dim=3)
  cfg.compute_dtype = "float32"
  params, vae_params = jax.eval_shape(sdseg.build(cfg).init, jax.random.key(0))
  assert params["unet"]["input_blocks_0_0"]["kernel"].shape == (3, 3, 7, 32)
  assert vae_params["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 32)  # RGB masks
  assert params["vision_encoder"]["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 32)


# ---- composition, on stand-in networks ---------------------------------------------------------
# Latents are the even pixels of the input (factor 2, len(ch_mult) = 2); everything is linear,
# so each stage's output is a one-line numpy formula.


class StubVAE(nn.Module):
  ch_mult: tuple = (1, 2)
  embed_dim: int = 2

  def setup(self):
    self.w = self.param("w", lambda k: jax.random.uniform(k, (), minval=1.5, maxval=2.5))

  def __call__(self, x):
    return self.decode(self.encode(x).mode())

  def encode(self, x):
    mean = x[:, ::2, ::2, :self.embed_dim] * self.w
    logvar = jnp.full_like(mean, np.log(0.25))  # std 0.5
    return vae_lib.DiagonalGaussian(jnp.concatenate([mean, logvar], -1))

  def decode(self, z):
    up = jnp.repeat(jnp.repeat(z, 2, axis=1), 2, axis=2)
    return jnp.concatenate([up, up[..., :1]], -1) * self.w


class StubEncoder(nn.Module):
  embed_dim: int = 2

  @nn.compact
  def __call__(self, image, train=False):
    v = self.param("v", lambda k: jax.random.uniform(k, (), minval=0.5, maxval=1.0))
    c = image[:, ::2, ::2, 1:1 + self.embed_dim] * v
    if train:
      c = c + jax.random.normal(self.make_rng("dropout"), c.shape)
    return c


class StubUNet(nn.Module):
  num_classes: Optional[int] = None

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    u = self.param("u", lambda k, n: jax.random.uniform(k, (n,), minval=-1, maxval=1),
                   x.shape[-1])
    out = (x * u).reshape(x.shape[:-1] + (2, -1)).sum(-1) + t[:, None, None, None] / 100.0
    if y is not None:
      out = out + self.param("emb", nn.initializers.ones, (4,))[y][:, None, None, None]
    if train:
      out = out + jax.random.normal(self.make_rng("dropout"), out.shape)
    return out


def _stub_model(num_classes=None, timesteps=50):
  return sdseg.SDSeg(vae=StubVAE(), vision_encoder=StubEncoder(),
                     unet=StubUNet(num_classes=num_classes),
                     schedule=diffusion.make_schedule(timesteps, 1e-3, 0.2), image_size=8)


@pytest.fixture(scope="module")
def model():
  return _stub_model()


@pytest.fixture(scope="module")
def params(model):
  return model.init(jax.random.key(0))


def _image(seed=0, b=2):
  return np.random.default_rng(seed).uniform(-1, 1, (b, 8, 8, 3)).astype(np.float32)


def test_init_gives_each_network_its_own_key_and_the_latent_input(model, params):
  trainable, vae_params = params
  assert set(trainable) == {"unet", "vision_encoder"}
  k_vae, k_enc, k_unet = jax.random.split(jax.random.key(0), 3)
  image = jnp.zeros((1, 8, 8, 3))
  assert float(vae_params["w"]) == float(StubVAE().init(k_vae, image)["params"]["w"])
  assert float(trainable["vision_encoder"]["v"]) == float(
      StubEncoder().init(k_enc, image)["params"]["v"])
  unet_want = StubUNet().init(k_unet, jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,), jnp.int32))
  np.testing.assert_array_equal(trainable["unet"]["u"], unet_want["params"]["u"])
  assert trainable["unet"]["u"].shape == (4,)  # [z_t, c]: 2 x latent channels
  assert model.latent_size == 4 and model.latent_channels == 2


def test_init_passes_class_labels_when_the_unet_has_classes():
  trainable, _ = _stub_model(num_classes=4).init(jax.random.key(1))
  assert trainable["unet"]["emb"].shape == (4,)


def test_encode_mask_is_the_scaled_posterior_mean_or_a_sample(model, params):
  _, vae_params = params
  mask = _image(1)
  w = float(vae_params["w"])
  mean = mask[:, ::2, ::2, :2] * w
  got = model.encode_mask(vae_params, jnp.asarray(mask), jnp.float32(0.3))
  np.testing.assert_allclose(np.asarray(got), 0.3 * mean, rtol=1e-6)
  key = jax.random.key(5)
  sampled = model.encode_mask(vae_params, jnp.asarray(mask), jnp.float32(0.3), key)
  noise = np.asarray(jax.random.normal(key, mean.shape))
  np.testing.assert_allclose(np.asarray(sampled), 0.3 * (mean + 0.5 * noise), rtol=1e-5,
                             atol=1e-6)


def test_encode_image_uses_dropout_only_in_training(model, params):
  trainable, _ = params
  image = _image(2)
  v = float(trainable["vision_encoder"]["v"])
  want = image[:, ::2, ::2, 1:3] * v
  np.testing.assert_allclose(np.asarray(model.encode_image(trainable, jnp.asarray(image))), want,
                             rtol=1e-6)
  # Flax derives the dropout stream from the key; same key, same draw; another key, another.
  noise = [np.asarray(model.encode_image(trainable, jnp.asarray(image), train=True,
                                         rng=jax.random.key(k))) - want for k in (7, 7, 8)]
  np.testing.assert_array_equal(noise[0], noise[1])
  assert 0.5 < noise[0].std() < 2 and np.abs(noise[0] - noise[2]).min() > 0


def _unet_numpy(u, z_t, cond, t):
  x = np.concatenate([z_t, cond], -1) * np.asarray(u)
  return x.reshape(x.shape[:-1] + (2, -1)).sum(-1) + np.asarray(t)[:, None, None, None] / 100.0


def test_denoise_concatenates_latent_then_condition_in_float32(model, params):
  trainable, _ = params
  rng = np.random.default_rng(3)
  z_t, cond = rng.normal(size=(2, 4, 4, 2)), rng.normal(size=(2, 4, 4, 2))
  t = np.array([3, 40], np.int32)
  got = model.denoise(trainable["unet"], jnp.asarray(z_t, jnp.float32),
                      jnp.asarray(cond, jnp.bfloat16), jnp.asarray(t))
  assert got.dtype == jnp.float32
  cond_bf16 = np.asarray(jnp.asarray(cond, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(got), _unet_numpy(trainable["unet"]["u"], z_t, cond_bf16,
                                                          t), rtol=1e-5, atol=1e-5)
  noise = [np.asarray(model.denoise(trainable["unet"], jnp.asarray(z_t, jnp.float32),
                                    jnp.asarray(cond_bf16), jnp.asarray(t), train=True,
                                    rng=jax.random.key(k)) - got) for k in (9, 9, 10)]
  np.testing.assert_allclose(noise[0], noise[1], atol=1e-6)
  assert 0.5 < noise[0].std() < 2 and np.abs(noise[0] - noise[2]).min() > 0


def test_denoise_passes_class_labels():
  model = _stub_model(num_classes=4)
  trainable, _ = model.init(jax.random.key(1))
  z = jnp.zeros((2, 4, 4, 2))
  got = model.denoise(trainable["unet"], z, z, jnp.zeros((2,), jnp.int32), jnp.array([1, 3]))
  np.testing.assert_allclose(np.asarray(got), 1.0)


def test_decode_unscales_the_latent(model, params):
  _, vae_params = params
  z0 = np.random.default_rng(4).normal(size=(1, 4, 4, 2)).astype(np.float32)
  got = model.decode(vae_params, jnp.asarray(z0), jnp.float32(0.5))
  up = np.repeat(np.repeat(z0 / 0.5, 2, axis=1), 2, axis=2)
  want = np.concatenate([up, up[..., :1]], -1) * float(vae_params["w"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_predict_is_one_denoiser_call_at_the_last_step_then_decode(model, params):
  trainable, vae_params = params
  image = _image(5)
  z_T = np.random.default_rng(6).normal(size=(2, 4, 4, 2)).astype(np.float32)
  out = model.predict(trainable, vae_params, jnp.asarray(image), jnp.asarray(z_T),
                      jnp.float32(0.4))
  assert set(out) == {"prob", "mask", "latent"}
  cond = image[:, ::2, ::2, 1:3] * float(trainable["vision_encoder"]["v"])
  t = np.full((2,), 49)
  eps = _unet_numpy(trainable["unet"]["u"], z_T, cond, t)
  abar = float(model.schedule.alphas_cumprod[49])
  z0 = (z_T - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
  np.testing.assert_allclose(np.asarray(out["latent"]), z0, rtol=1e-4, atol=1e-4)
  latent = model.predict_latent(trainable["unet"], jnp.asarray(cond), jnp.asarray(z_T))
  np.testing.assert_allclose(np.asarray(latent), z0, rtol=1e-4, atol=1e-4)
  up = np.repeat(np.repeat(z0 / 0.4, 2, axis=1), 2, axis=2)
  decoded = np.concatenate([up, up[..., :1]], -1) * float(vae_params["w"])
  prob = np.clip((decoded + 1) / 2, 0, 1).mean(-1)
  np.testing.assert_allclose(np.asarray(out["prob"]), prob, rtol=1e-4, atol=1e-4)
  decided = np.abs(prob - 0.5) > 1e-3
  np.testing.assert_array_equal(np.asarray(out["mask"])[decided], (prob > 0.5)[decided])
  assert 0 < (prob > 0.5).mean() < 1
  # a decoded map of exactly 0 is probability 0.5: background (the threshold is strict)
  tie = model.predict(trainable, {"w": jnp.float32(0.0)}, jnp.asarray(image), jnp.asarray(z_T),
                      jnp.float32(0.4))
  assert (np.asarray(tie["prob"]) == 0.5).all() and not np.asarray(tie["mask"]).any()


def test_predict_latent_passes_class_labels():
  model = _stub_model(num_classes=4)
  trainable, _ = model.init(jax.random.key(1))
  z = jnp.zeros((2, 4, 4, 2))
  with_y = model.predict_latent(trainable["unet"], z, z, jnp.array([1, 2]))
  abar = float(model.schedule.alphas_cumprod[49])
  eps = 1.0 + 49 / 100.0
  np.testing.assert_allclose(np.asarray(with_y), -np.sqrt(1 - abar) * eps / np.sqrt(abar),
                             rtol=1e-5)


# ---- gradient checkpointing (`use_checkpoint`) --------------------------------------------------

def test_use_checkpoint_recomputes_unet_blocks_with_the_same_gradients():
  """`use_checkpoint` wraps every residual and attention block in `nn.remat`: the gradients
  (dropout included) are those of the plain UNet, and the backward pass really recomputes."""
  from sdseg_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  fields = dict(image_size=4, in_channels=4, out_channels=4, model_channels=32,
                attention_resolutions=(1,), num_res_blocks=1, channel_mult=(1,), num_heads=2,
                dropout=0.3)
  plain, remat = (unet_lib.UNet(**fields, remat_blocks=flag) for flag in (False, True))
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
  t = jnp.array([3, 900])
  params = plain.init(jax.random.key(1), x, t)
  # The zero-initialised output conv would make every other gradient zero.
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)

  def loss(model, p):
    out = model.apply(p, x, t, train=True, rngs={"dropout": jax.random.key(2)})
    return jnp.sum(out ** 2)

  grads = {m: jax.jit(jax.grad(functools.partial(loss, m)))(params) for m in (plain, remat)}
  # Biases right before a one-channel-per-group GroupNorm have a true gradient of 0 (round-off
  # only), so the tolerance is relative to the largest gradient.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads[plain]))
  for g_plain, g_remat in zip(jax.tree_util.tree_leaves(grads[plain]),
                              jax.tree_util.tree_leaves(grads[remat])):
    np.testing.assert_allclose(g_remat, g_plain, rtol=1e-4, atol=1e-6 * scale)
  jaxprs = {m: str(jax.make_jaxpr(jax.grad(functools.partial(loss, m)))(params))
            for m in (plain, remat)}
  assert "remat" not in jaxprs[plain] and "checkpoint" not in jaxprs[plain]
  # One checkpointed call per block: residual + attention down, 2 residual + attention in the
  # middle, 2 x (residual + attention) up.
  blocks = len(re.findall(r"\b(?:remat\d*|checkpoint)\[", jaxprs[remat]))
  assert blocks == 9, blocks


def test_resolve_kernels_auto_explicit_and_unknown():
  from sdseg_jax.models import layers  # pylint: disable=g-import-not-at-top
  cfg = _config()
  assert sdseg.resolve_kernels(cfg, backend="cpu") == layers.Kernels("channel_sums", "folded")
  for backend in ("cpu", "tpu", "gpu"):
    assert sdseg.resolve_kernels(cfg, backend=backend) == sdseg._AUTO_KERNELS.get(
        backend, sdseg._AUTO_KERNELS["cpu"])
  cfg.norm_impl, cfg.upsample_impl = "flax", "repeat"
  assert sdseg.resolve_kernels(cfg, backend="tpu") == layers.Kernels("flax", "repeat")
  model = sdseg.build(cfg)
  assert model.vae.kernels == model.vision_encoder.kernels == model.unet.kernels == \
      layers.Kernels("flax", "repeat")
  cfg.norm_impl = "batch"
  with pytest.raises(errors.ConfigError, match="unknown norm kernel 'batch'"):
    sdseg.resolve_kernels(cfg)
  cfg.norm_impl, cfg.upsample_impl = "auto", "bilinear"
  with pytest.raises(errors.ConfigError, match="unknown upsample kernel 'bilinear'"):
    sdseg.build(cfg)
