"""The smallest SDSeg that must LEARN on CPU: the learning test's config (tests/test_learning.py).

The synthetic polyp set at 32 px, a two-level autoencoder (32 -> 16 x 16 x 4 latents) pre-trained
on the masks as the frozen VAE, and a two-level UNet without attention. Sized so that the whole
run (VAE pre-training, SDSeg training, evaluation) takes well under a minute on two cores while
reaching a validation Dice that an untrained or broken model cannot.
"""

from configs import base
from sdseg_jax.models import model_config

SIZE = 32


def get_config():
  config = base.get_config()
  config.model = model_config.model_config(
      ddconfig=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=SIZE),
      unet_config=dict(image_size=SIZE // 2, model_channels=32, channel_mult=[1, 2],
                       attention_resolutions=[], num_res_blocks=1, num_heads=2, dropout=0.0),
      vision_dropout=0.0)
  config.data.image_size = SIZE
  config.data.synthetic.size = SIZE
  config.data.synthetic.num_train = 512
  config.data.synthetic.num_val = 32
  config.data.synthetic.num_test = 8
  config.data.worker_count = 0
  config.data.read_threads = 1
  config.data.prefetch = 1
  config.data.check_before_training = False
  config.init.vae = ""
  config.init.unet = ""
  config.init.pretrain_vae_steps = 80
  config.init.pretrain_vae_batch_size = 16
  config.init.pretrain_vae_lr = 3e-3
  config.train.global_batch_size = 16
  config.train.max_steps = 150
  config.optim.base_lr = 2e-3
  config.optim.scale_lr = False
  config.optim.warmup_steps = 10
  config.optim.weight_decay = 0.0
  config.ema.decay = 0.9
  config.eval.every_steps = 150
  config.eval.batch_size = 32
  config.eval.num_panels = 0
  config.checkpoint.every_steps = 150
  config.checkpoint.async_save = False
  config.log.every_steps = 10
  config.log.tensorboard = False
  config.log.progress_bar = False
  config.mesh.cpu_devices = -1
  return config
