"""The laptop demo: a small SDSeg on the built-in synthetic polyp dataset, CPU-friendly.

  python -m sdseg_jax.main --config configs/demo.py --workdir runs/demo

Nothing is downloaded. The frozen VAE, which in the paper is the public kl-f8 autoencoder, is
replaced by the same architecture at a small width pre-trained for a few hundred steps on the
training masks (config.init.pretrain_vae_steps). Then SDSeg trains exactly as on the real
benchmarks (vision encoder + UNet, L1 noise + L1 latent loss, EMA UNet, single-step evaluation
on the validation split). Rerun with a larger --config.train.max_steps to continue training.
"""

from configs import base


def get_config(variant: str = ""):
  config = base.get_config()
  base.use_small_model(config, size=64)
  config.data.synthetic.size = 64
  config.data.synthetic.num_train = 4096
  config.data.synthetic.num_val = 64
  config.log.every_steps = 50
  base.apply_precision(config, base.settings_only(variant))
  return config
