"""The laptop demo: a small SDSeg on the built-in synthetic polyp dataset, CPU-friendly.

  python -m sdseg_jax.main --config configs/demo.py --workdir runs/demo

Nothing is downloaded. The frozen VAE, which in the paper is the public kl-f8 autoencoder, is
replaced by the same architecture at a small width pre-trained for a few hundred steps on the
training masks (config.init.pretrain_vae_steps). Then SDSeg trains exactly as on the real
benchmarks (vision encoder + UNet, L1 noise + L1 latent loss, EMA UNet, single-step evaluation
on the validation split). Rerun with a larger --config.train.max_steps to continue training.
"""

from configs import base


def get_config():
  config = base.get_config()
  base.use_small_model(config, size=64)
  config.data.synthetic.size = 64
  config.data.synthetic.num_train = 4096
  config.data.synthetic.num_val = 64
  config.log.every_steps = 50
  # Budget: under 10 minutes on a 2-core CPU, install included (measured in BENCHMARKS.md).
  # The two cores run as two data-parallel JAX devices: XLA CPU keeps one core busy with the
  # small convolutions of this model, so splitting the batch is 1.3-1.5x faster.
  config.mesh.cpu_devices = -1
  config.init.pretrain_vae_steps = 200
  config.init.pretrain_vae_batch_size = 8
  config.train.max_steps = 600
  # A shorter EMA horizon (about 100 steps) than the small-model default, so that the weights
  # evaluated after a few hundred steps are not dominated by the early ones.
  config.ema.decay = 0.99
  config.eval.every_steps = config.checkpoint.every_steps = 200
  return config
