"""One tiny trained run per test process, shared by the evaluate/predict/stability tests.

Training even a miniature SDSeg costs tens of seconds on CPU, so the run is made once (lazily,
by the first test that needs it) and reused; it lives in a temporary directory removed at exit.
The model is the demo's architecture at 32 px (two-level VAE, 16 x 16 latents, a two-level
UNet with attention), trained for 4 steps with evaluations (and so checkpoints with a Dice) at
steps 2 and 4, then exported. Its frozen VAE is a RANDOMLY initialised one given as
config.init.vae (the demo pre-trains it, which would double the compile time here): the masks
are meaningless, the plumbing is what these tests check.
"""

import atexit
import functools
import pathlib
import shutil
import tempfile
from typing import Optional

import ml_collections

from configs import base
from sdseg_jax.models import model_config

SIZE = 32


def tiny_config(num_classes: Optional[int] = None) -> ml_collections.ConfigDict:
  """A 32 px SDSeg on the synthetic set that trains 4 steps in seconds."""
  config = base.get_config()
  unet = dict(image_size=SIZE // 2, model_channels=32, channel_mult=[1, 2],
              attention_resolutions=[2], num_res_blocks=1, num_heads=2, dropout=0.0)
  if num_classes is not None:
    unet["num_classes"] = num_classes
  config.model = model_config.model_config(
      ddconfig=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=SIZE),
      unet_config=unet, vision_dropout=0.0)
  config.data.image_size = SIZE
  config.data.synthetic.size = SIZE
  config.data.synthetic.num_train = 64
  config.data.synthetic.num_val = 8
  config.data.synthetic.num_test = 8
  config.data.worker_count = 0
  config.data.read_threads = 1
  config.data.prefetch = 1
  config.data.check_before_training = False
  config.init.pretrain_vae_steps = 5
  config.init.pretrain_vae_batch_size = 8
  config.train.global_batch_size = 8
  config.train.max_steps = 4
  config.optim.base_lr = 1e-3
  config.optim.scale_lr = False
  config.optim.warmup_steps = 2
  config.ema.decay = 0.9
  config.eval.every_steps = 2
  config.eval.batch_size = 8
  config.eval.num_panels = 0
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  config.log.every_steps = 2
  config.log.tensorboard = False
  config.log.progress_bar = False
  return config


def random_vae(path: pathlib.Path, config: ml_collections.ConfigDict) -> pathlib.Path:
  """Writes a randomly initialised VAE of `config.model` as a converted-weights artifact."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from sdseg_jax.models import sdseg  # pylint: disable=g-import-not-at-top
  from sdseg_jax.weights import artifacts  # pylint: disable=g-import-not-at-top
  model = sdseg.build(config.model)
  image = jax.numpy.zeros((1, SIZE, SIZE, 3))
  vae = jax.jit(lambda k: model.vae.init(k, image)["params"])(jax.random.key(1))
  artifacts.save(path, {"vae": jax.tree_util.tree_map(np.asarray, vae)}, {"kind": "random_vae"})
  return path


def train(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> pathlib.Path:
  from sdseg_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from sdseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.ensure_absl_flags_parsed()
  train_lib.run(config, str(workdir))
  return workdir


@functools.lru_cache(maxsize=None)
def workdir() -> pathlib.Path:
  """The shared binary run (trained on first use)."""
  root = pathlib.Path(tempfile.mkdtemp(prefix="sdseg_eval_tests_"))
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  config = tiny_config()
  config.init.vae = str(random_vae(root / "random_vae.npz", config))
  config.init.pretrain_vae_steps = 0
  config.log.profile_start_step, config.log.profile_steps = 1, 1  # test_logging_lib reads it
  return train(root / "run", config)
