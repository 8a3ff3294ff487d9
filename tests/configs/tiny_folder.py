"""configs/tiny.py on a Kvasir-SEG folder layout: the reliability tests' corrupt-file runs.

  --config.data.root=DIR   a folder with images/<id>.png and masks/<id>.png (tests write one)

4 validation and 4 test images are drawn from the folder, the rest train. Evaluation runs only
at the end; the VAE pre-trains for one step (these runs test failure handling, not learning).
"""

from configs import base
from configs import tiny


def get_config():
  config = tiny.get_config()
  config.data = base.data_block("kvasir")
  config.data.image_size = tiny.IMAGE_SIZE
  config.data.val_size = 4
  config.data.test_size = 4
  config.data.worker_count = 0
  config.data.read_threads = 1
  config.data.prefetch = 1
  config.init.pretrain_vae_steps = 1
  config.train.max_steps = 12
  config.checkpoint.every_steps = 1
  config.eval.every_steps = 1000
  return config
