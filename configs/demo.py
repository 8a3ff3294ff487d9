"""The laptop demo: a small SDSeg on the built-in synthetic polyp dataset, CPU-friendly.

  python -m sdseg_jax.main --config configs/demo.py --workdir runs/demo

Nothing is downloaded. The frozen VAE, which in the paper is the public kl-f8 autoencoder, is
replaced by the same architecture at a small width pre-trained for a few hundred steps on the
training masks (config.init.pretrain_vae_steps). Then SDSeg trains exactly as on the real
benchmarks (vision encoder + UNet, L1 noise + L1 latent loss, EMA UNet, single-step evaluation
on the validation split). Rerun with a larger --config.train.max_steps to continue training.
"""

from configs import base
from sdseg_jax.models import model_config


def get_config():
  config = base.get_config()
  size = 64
  config.model = model_config.model_config(
      ddconfig=dict(ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1, resolution=size),
      unet_config=dict(image_size=size // 8, model_channels=64, channel_mult=[1, 2],
                       attention_resolutions=[2], num_res_blocks=1, num_heads=4,
                       dropout=0.0),
      vision_dropout=0.0)
  config.data.image_size = size
  config.data.synthetic.size = size
  config.data.synthetic.num_train = 4096
  config.data.synthetic.num_val = 64
  config.data.worker_count = 0
  config.init.pretrain_vae_steps = 300
  config.init.pretrain_vae_lr = 2e-3
  config.train.global_batch_size = 16
  config.train.max_steps = 1200
  # A small model from scratch learns fastest with a larger step and a short warm-up.
  config.optim.base_lr = 3e-4
  config.optim.scale_lr = False
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.0
  config.ema.decay = 0.995
  config.eval.every_steps = 400
  config.eval.batch_size = 32
  config.checkpoint.every_steps = 400
  config.log.every_steps = 50
  return config
