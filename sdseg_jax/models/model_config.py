"""The `config.model` block: SDSeg's architecture in the official YAML field names.

Kept in the package (not only in configs/) because the checkpoint converter and the parity tests
build models from official YAML/JSON `ddconfig` + `unet_config` dicts as well.
"""

from typing import Any, Dict, Mapping, Optional

import ml_collections

from sdseg_jax import errors

# Official SDSeg sizes: configs/SDSeg/*.yaml (kl-f8 first stage, LSUN-Churches-sized UNet).
_KL_F8_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                       ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                       dropout=0.0)
_SDSEG_UNET = dict(image_size=32, in_channels=8, out_channels=4, model_channels=192,
                   attention_resolutions=[1, 2, 4, 8], num_res_blocks=2,
                   channel_mult=[1, 2, 2, 4, 4], num_heads=8, num_head_channels=-1,
                   num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
                   conv_resample=True, use_new_attention_order=False, dropout=0.2,
                   use_checkpoint=False, use_spatial_transformer=False, num_classes=None,
                   legacy=True, use_fp16=False)


def model_config(ddconfig: Optional[Mapping[str, Any]] = None,
                 unet_config: Optional[Mapping[str, Any]] = None, *, embed_dim: int = 4,
                 vision_embed_dim: int = 4, vision_dropout: float = 0.2,
                 timesteps: int = 1000, linear_start: float = 0.0015,
                 linear_end: float = 0.0155) -> ml_collections.ConfigDict:
  """Returns `config.model`; defaults are the official full-size SDSeg (binary) model.

  `ddconfig` and `unet_config` take the official YAML dicts verbatim (unknown keys are an
  error, missing keys keep the SDSeg values), so any official config is expressible.
  """
  vae = _merge(_KL_F8_DDCONFIG, ddconfig, "ddconfig")
  unet = _merge(_SDSEG_UNET, unet_config, "unet_config")
  cfg = ml_collections.ConfigDict()
  # The frozen kl-f8 autoencoder: its `ddconfig` plus `embed_dim` (latent channels).
  cfg.vae = ml_collections.ConfigDict(dict(vae, embed_dim=embed_dim))
  # The trainable vision encoder: the VAE encoder architecture with its own dropout (0.2 in
  # SDSeg, active only in training) and a 1x1 conv to `embed_dim` condition channels.
  cfg.vision_encoder = ml_collections.ConfigDict(
      dict(dropout=vision_dropout, embed_dim=vision_embed_dim))
  # The LDM UNet (`unet_config` of the official YAML). num_classes adds a class embedding.
  cfg.unet = ml_collections.ConfigDict(unet)
  # LDM "linear" schedule: betas = linspace(sqrt(start), sqrt(end), T)^2.
  cfg.schedule = ml_collections.ConfigDict(
      dict(timesteps=timesteps, linear_start=linear_start, linear_end=linear_end))
  # Compute dtype of convs/matmuls: "auto" (default: bfloat16 on GPU/TPU, float32 on CPU,
  # resolved by sdseg.build from jax.default_backend()), "float32" or "bfloat16". Params, GroupNorm
  # statistics, attention logits/softmax, the loss and the x0 recovery always stay float32
  # (docs/design.md#precision; bf16-vs-f32 tolerances in tests/test_precision.py).
  cfg.compute_dtype = "auto"
  # Matmul/conv precision: "default", "high" or "highest" (for parity checks on TPU/GPU).
  cfg.precision = "default"
  # Attention kernel: None (XLA) or "cudnn" (fused flash attention on NVIDIA GPUs, bf16 only).
  cfg.attention_impl = ml_collections.FieldReference(None, field_type=str)
  # How GroupNorm and the VAE decoder's nearest-upsample + 3x3 conv are computed; same
  # parameters and maths either way (models/layers.py, `Kernels`). "auto" takes the faster form
  # for the backend the model is built on (sdseg.resolve_kernels: measured on CPU, the XLA
  # compiler's estimate on TPU; BENCHMARKS.md, "Layer choices").
  cfg.norm_impl = "auto"        # or "channel_sums" / "flax"
  cfg.upsample_impl = "auto"    # or "folded" / "repeat"
  return cfg


def _merge(defaults: Dict[str, Any], given: Optional[Mapping[str, Any]],
           what: str) -> Dict[str, Any]:
  merged = dict(defaults)
  for key, value in (given or {}).items():
    if key not in defaults:
      raise errors.ConfigError(f"unknown {what} field {key!r}; known fields: {sorted(defaults)}")
    merged[key] = list(value) if isinstance(value, (list, tuple)) else value
  return merged


def num_classes(model_config: ml_collections.ConfigDict) -> Optional[int]:
  """config.model.unet.num_classes, or None for the binary (paper) model."""
  value = model_config.unet.get("num_classes", None)
  return None if value is None else int(value)
