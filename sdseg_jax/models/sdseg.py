"""SDSeg composed from its three networks, as pure functions over explicit parameter trees.

Trainable parameters are `{"unet": ..., "vision_encoder": ...}`; the frozen VAE's parameters are
a separate tree so that they can be replicated, excluded from gradients and never checkpointed.

    image --vision encoder--> c ;  mask --frozen VAE enc--> z0 = s * sample
    eps_hat = UNet(concat[z_t, c], t) ;  z0_hat from eps_hat ;  mask_hat = VAE dec(z0_hat / s)
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from sdseg_jax import diffusion
from sdseg_jax import errors
from sdseg_jax.models import layers
from sdseg_jax.models import unet as unet_lib
from sdseg_jax.models import vae as vae_lib
from sdseg_jax.models import vision_encoder as vision_encoder_lib

Params = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_PRECISIONS = {"default": None, "high": jax.lax.Precision.HIGH,
               "highest": jax.lax.Precision.HIGHEST}


def _ddconfig(cfg: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The official `ddconfig` fields the Flax modules use (in_channels is implied by the input)."""
  return dict(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=tuple(cfg.attn_resolutions), dropout=cfg.dropout,
              resolution=cfg.resolution, z_channels=cfg.z_channels, double_z=cfg.double_z)


@dataclasses.dataclass(frozen=True)
class SDSeg:
  """The SDSeg model: module definitions plus the diffusion schedule."""
  vae: vae_lib.AutoencoderKL
  vision_encoder: vision_encoder_lib.VisionEncoder
  unet: unet_lib.UNet
  schedule: diffusion.Schedule
  image_size: int

  @property
  def latent_size(self) -> int:
    return self.image_size // 2 ** (len(self.vae.ch_mult) - 1)

  @property
  def latent_channels(self) -> int:
    return self.vae.embed_dim

  # ---- initialisation ------------------------------------------------------------------------
  def init(self, rng: jax.Array) -> Tuple[Params, Params]:
    """Random (PyTorch-default-statistics) parameters: (trainable params, vae params)."""
    k_vae, k_enc, k_unet = jax.random.split(rng, 3)
    image = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    s = self.latent_size
    # The UNet sees concat[z_t, c]: mask-latent channels plus condition channels.
    channels = self.latent_channels + self.vision_encoder.embed_dim
    latent = jnp.zeros((1, s, s, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = None if self.unet.num_classes is None else jnp.zeros((1,), jnp.int32)
    vae_params = self.vae.init(k_vae, image)["params"]
    enc_params = self.vision_encoder.init(k_enc, image)["params"]
    unet_params = self.unet.init(k_unet, latent, t, y)["params"]
    return {"unet": unet_params, "vision_encoder": enc_params}, vae_params

  # ---- the four stages -------------------------------------------------------------------------
  def encode_mask(self, vae_params: Params, mask: jax.Array, scale_factor: jax.Array,
                  rng: Optional[jax.Array] = None) -> jax.Array:
    """Mask (B, R, R, 3) in {-1, 1} -> scaled latent; a posterior sample if rng, else the mean."""
    posterior = self.vae.apply({"params": vae_params}, mask, method=self.vae.encode)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return scale_factor * z

  def encode_image(self, params: Params, image: jax.Array, train: bool = False,
                   rng: Optional[jax.Array] = None) -> jax.Array:
    """Image (B, R, R, 3) in [-1, 1] -> condition c (B, r, r, embed_dim)."""
    rngs = {"dropout": rng} if train else {}
    return self.vision_encoder.apply({"params": params["vision_encoder"]}, image, train,
                                     rngs=rngs)

  def denoise(self, unet_params: Params, z_t: jax.Array, cond: jax.Array, t: jax.Array,
              y: Optional[jax.Array] = None, train: bool = False,
              rng: Optional[jax.Array] = None) -> jax.Array:
    """eps_hat = UNet(concat[z_t, c], t[, y]); the concat order is [noisy latent, condition]."""
    x = jnp.concatenate([z_t.astype(jnp.float32), cond.astype(jnp.float32)], axis=-1)
    rngs = {"dropout": rng} if train else {}
    return self.unet.apply({"params": unet_params}, x, t, y, train, rngs=rngs)

  def decode(self, vae_params: Params, z0: jax.Array, scale_factor: jax.Array) -> jax.Array:
    """Scaled latent -> decoded image (B, R, R, 3), roughly in [-1, 1]."""
    return self.vae.apply({"params": vae_params}, z0 / scale_factor, method=self.vae.decode)

  # ---- inference -------------------------------------------------------------------------------
  def predict_latent(self, unet_params: Params, cond: jax.Array, z_T: jax.Array,
                     y: Optional[jax.Array] = None) -> jax.Array:
    """Single-step inference in latent space: one UNet call at t = T-1 from noise z_T."""
    return diffusion.single_step(
        self.schedule, lambda z, t: self.denoise(unet_params, z, cond, t, y), z_T)

  def predict(self, params: Params, vae_params: Params, image: jax.Array, z_T: jax.Array,
              scale_factor: jax.Array) -> Dict[str, jax.Array]:
    """Image -> mask probability (B, R, R) and binary mask, with a single reverse step.

    `params["unet"]` should hold the EMA weights for evaluation, as the official code does.
    """
    cond = self.encode_image(params, image)
    z0 = self.predict_latent(params["unet"], cond, z_T)
    prob = mask_probability(self.decode(vae_params, z0, scale_factor))
    return {"prob": prob, "mask": prob > 0.5, "latent": z0}


def mask_probability(decoded: jax.Array) -> jax.Array:
  """Channel mean of clip((x + 1) / 2, 0, 1): the official 'logits' map in [0, 1]."""
  return jnp.mean(jnp.clip((decoded.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0), axis=-1)


def resolve_compute_dtype(name: str, backend: Optional[str] = None) -> str:
  """"auto" -> "bfloat16" on GPU/TPU and "float32" on CPU; explicit names pass through.

  bf16 halves activation memory and runs the convs on tensor cores / the MXU, but CPU XLA has
  no fast bf16 convolutions, so the backend picks. Resolved when the model is built, i.e. on the
  machine that runs it (an exported config that says "auto" adapts to where it is loaded).
  """
  if name != "auto":
    if name not in _DTYPES:
      raise errors.ConfigError(f"unknown compute_dtype {name!r}; expected 'auto' or one of "
                               f"{sorted(_DTYPES)}")
    return name
  backend = backend or jax.default_backend()
  return "bfloat16" if backend in ("gpu", "cuda", "rocm", "tpu") else "float32"


# The faster layer forms per backend, for `norm_impl` / `upsample_impl` = "auto". CPU: measured
# (BENCHMARKS.md, "What was tried for CPU speed"); TPU: XLA:TPU's step-time estimates
# (BENCHMARKS.md, "Layer choices"); other backends keep the CPU choice until measured.
_AUTO_KERNELS = {
    "cpu": layers.Kernels(norm="channel_sums", upsample="folded"),
    "tpu": layers.Kernels(norm="channel_sums", upsample="folded"),
}


def resolve_kernels(model_config: ml_collections.ConfigDict,
                    backend: Optional[str] = None) -> layers.Kernels:
  """`config.model.norm_impl` / `upsample_impl` -> the layer forms; "auto" picks per backend."""
  auto = _AUTO_KERNELS.get(backend or jax.default_backend(), _AUTO_KERNELS["cpu"])
  norm = model_config.get("norm_impl", "auto")
  upsample = model_config.get("upsample_impl", "auto")
  try:
    return layers.Kernels(norm=auto.norm if norm == "auto" else norm,
                          upsample=auto.upsample if upsample == "auto" else upsample)
  except ValueError as e:
    raise errors.ConfigError(f"config.model: {e} (or 'auto')") from None


def build(model_config: ml_collections.ConfigDict) -> SDSeg:
  """Builds the model from `config.model` (official YAML field names; see configs/base.py)."""
  dtype = _DTYPES[resolve_compute_dtype(model_config.get("compute_dtype", "auto"))]
  precision = _PRECISIONS[model_config.get("precision", "default")]
  attention_impl = model_config.get("attention_impl", None)
  common = dict(dtype=dtype, precision=precision, attention_impl=attention_impl,
                kernels=resolve_kernels(model_config))
  vae_cfg, enc_cfg, unet_cfg = model_config.vae, model_config.vision_encoder, model_config.unet
  if unet_cfg.get("use_spatial_transformer", False):
    raise errors.ConfigError(
        "model.unet.use_spatial_transformer=True (cross-attention) is not part of "
        "SDSeg, which conditions by concatenation; set it to False")
  vae = vae_lib.AutoencoderKL(**_ddconfig(vae_cfg), in_channels=vae_cfg.in_channels,
                              out_ch=vae_cfg.out_ch, embed_dim=vae_cfg.embed_dim, **common)
  enc_dd = _ddconfig(vae_cfg)
  enc_dd["dropout"] = enc_cfg.dropout
  vision_encoder = vision_encoder_lib.VisionEncoder(**enc_dd, embed_dim=enc_cfg.embed_dim,
                                                    **common)
  unet = unet_lib.UNet(
      image_size=unet_cfg.image_size, in_channels=unet_cfg.in_channels,
      out_channels=unet_cfg.out_channels, model_channels=unet_cfg.model_channels,
      attention_resolutions=tuple(unet_cfg.attention_resolutions),
      num_res_blocks=unet_cfg.num_res_blocks, channel_mult=tuple(unet_cfg.channel_mult),
      num_heads=unet_cfg.num_heads, num_head_channels=unet_cfg.num_head_channels,
      num_heads_upsample=unet_cfg.get("num_heads_upsample", -1),
      use_scale_shift_norm=unet_cfg.use_scale_shift_norm,
      resblock_updown=unet_cfg.resblock_updown, conv_resample=unet_cfg.conv_resample,
      use_new_attention_order=unet_cfg.use_new_attention_order,
      num_classes=unet_cfg.get("num_classes", None), dropout=unet_cfg.dropout,
      remat_blocks=unet_cfg.get("use_checkpoint", False), **common)
  schedule = diffusion.make_schedule(model_config.schedule.timesteps,
                                     model_config.schedule.linear_start,
                                     model_config.schedule.linear_end)
  if unet.in_channels != vae.embed_dim + vision_encoder.embed_dim:
    raise errors.ConfigError(
        f"model.unet.in_channels={unet.in_channels} must equal the mask latent "
        f"channels ({vae.embed_dim}) + condition channels "
        f"({vision_encoder.embed_dim})")
  return SDSeg(vae=vae, vision_encoder=vision_encoder, unet=unet, schedule=schedule,
               image_size=vae_cfg.resolution)
