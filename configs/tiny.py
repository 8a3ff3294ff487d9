"""A miniature SDSeg for tests and CPU smoke runs: every jitted function compiles in seconds.

  python -m sdseg_jax.main --config configs/tiny.py --workdir /tmp/tiny
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      JAX_DISABLE_MOST_OPTIMIZATIONS=1 \
      python -m sdseg_jax.main --config configs/tiny.py --workdir /tmp/tiny \
      --config.train.max_steps=8 --config.mesh.fsdp=2 --config.mesh.strategy=fsdp

(JAX_DISABLE_MOST_OPTIMIZATIONS=1 cuts XLA's CPU compile time, which dominates a run of a model
this small, about threefold; the tests set it.)

The architecture is SDSeg's (kl-style VAE, vision encoder with the VAE-encoder architecture, LDM
UNet with concat conditioning, attention and scale-shift ResBlocks, dropout) at the smallest width
that still exercises every code path: 32 x 32 images, a two-level VAE (32 -> 16 x 16 latents) and
a two-level UNet with one attention level. Several leaves exceed sharding.FSDP_MIN_SIZE, so the
fsdp strategy shards some parameters and replicates others. The frozen VAE is pre-trained for a
few steps on the synthetic masks (the stand-in for kl-f8). There is no warm-up and the learning
rate is large enough that one step visibly changes the trainable parameters, which the step
tests rely on. The batch of 8 splits evenly over 8, 4 or 2 x 4 emulated CPU devices; log, eval
and checkpoint cadences are short so that a 4-step run passes through all of them.
"""

from configs import base
from sdseg_jax.models import model_config

IMAGE_SIZE = 32


def get_config(variant: str = ""):
  config = base.get_config()
  size = IMAGE_SIZE
  config.model = model_config.model_config(
      ddconfig=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=size),
      # Dropout stays on (as in SDSeg) so that the equivalence tests also cover the dropout RNG.
      unet_config=dict(image_size=size // 2, model_channels=32, channel_mult=[1, 2],
                       attention_resolutions=[2], num_res_blocks=1, num_heads=2,
                       dropout=0.1),
      vision_dropout=0.1)

  config.data.image_size = size
  config.data.synthetic.size = size
  config.data.synthetic.num_train = 64
  config.data.synthetic.num_val = 8
  config.data.synthetic.num_test = 8
  config.data.worker_count = 0
  config.data.read_threads = 1
  config.data.prefetch = 1

  config.init.pretrain_vae_steps = 5
  config.init.pretrain_vae_batch_size = 8

  config.train.global_batch_size = 8
  config.train.max_steps = 4
  config.optim.base_lr = 1e-3
  config.optim.scale_lr = False
  # No warm-up: its first step would use lr x 1e-6, too small to move float32 parameters.
  config.optim.warmup_steps = 0
  config.ema.decay = 0.9

  config.eval.every_steps = 2
  config.eval.batch_size = 8
  config.eval.num_panels = 2
  config.checkpoint.every_steps = 2
  config.checkpoint.keep_last = 3
  config.checkpoint.async_save = True
  config.log.every_steps = 1
  config.log.tensorboard = False
  config.log.progress_bar = False
  base.apply_precision(config, base.settings_only(variant))
  return config
