"""The optimiser and EMA of the official SDSeg recipe, expressed with optax.

Official: torch AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every parameter), lr =
base_lr x global batch, `LambdaLinearScheduler` warm-up factor 1e-6 -> 1 over 10k steps then
constant, no gradient clipping; an EMA of the UNet only, with decay min(0.9999, (1+n)/(10+n)).
Class-embedding (multi-class) runs train the UNet's `label_emb` at 100x that learning rate, as
the official multi-class fine-tune configs (synapse-cls{9,14}-...-finetune.yaml).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdseg_jax.models import model_config


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """base_lr, multiplied by the global batch size when `optim.scale_lr` (official default)."""
  lr = config.optim.base_lr
  if config.optim.scale_lr:
    lr *= config.train.global_batch_size
  return lr


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from start_factor x lr to lr over warmup_steps, then constant.

  Exactly the official factor 1e-6 + (1 - 1e-6) n / 10000 at optimizer step n.
  """
  peak = peak_learning_rate(config)
  if config.optim.warmup_steps <= 0:
    return optax.constant_schedule(peak)
  return optax.linear_schedule(init_value=peak * config.optim.warmup_start_factor,
                               end_value=peak, transition_steps=config.optim.warmup_steps)


# `config.optim.label_emb_lr_scale` overrides it where the field exists.
LABEL_EMB_LR_SCALE = 100.0
LABEL_EMB = "label_emb"  # the UNet's class-embedding parameters (class-embedding models only)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The run's optimizer: `adamw`, with `label_emb` at a scaled learning rate.

  Binary runs get exactly `adamw(config)`. Class-embedding runs (config.model.unet.num_classes)
  get the same AdamW for every parameter except the UNet's `label_emb`, whose learning rate
  (and, AdamW being decoupled, weight-decay step) is LABEL_EMB_LR_SCALE times larger, as the
  official multi-class fine-tune recipe. Used by training, the AOT check and the benchmark.
  """
  if config.get("model", None) is None or model_config.num_classes(config.model) is None:
    return adamw(config)
  scale = float(config.optim.get("label_emb_lr_scale", LABEL_EMB_LR_SCALE))
  scaled = config.copy_and_resolve_references()
  scaled.optim.base_lr = config.optim.base_lr * scale
  return optax.multi_transform({"default": adamw(config), LABEL_EMB: adamw(scaled)},
                               _param_labels)


def _param_labels(params: Any) -> Any:
  """'label_emb' for the class embedding's parameters, 'default' for every other leaf."""
  def label(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return LABEL_EMB if LABEL_EMB in names else "default"
  return jax.tree_util.tree_map_with_path(label, params)


def adamw(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (decoupled decay on every parameter, as torch.optim.AdamW) + optional clipping."""
  mu_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.optim.mu_dtype]
  adamw = optax.adamw(
      learning_rate_schedule(config), b1=config.optim.b1, b2=config.optim.b2,
      eps=config.optim.eps, weight_decay=config.optim.weight_decay, mu_dtype=mu_dtype)
  if config.optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), adamw)
  return adamw


def ema_decay(num_updates: jax.Array, decay: float, use_num_updates: bool = True) -> jax.Array:
  """LitEma's decay for its n-th update (n counted from 1): min(decay, (1 + n) / (10 + n))."""
  if not use_num_updates:
    return jnp.float32(decay)
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
  """shadow <- shadow - (1 - decay) (shadow - param), the LitEma update, in float32."""
  return jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)
