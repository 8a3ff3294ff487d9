"""Base configuration of sdseg_jax: every field, with the official SDSeg values as defaults.

The per-benchmark configs (refuge.py, cvc.py, kvasir.py, btcv.py, sts3d.py) and demo.py start
from `get_config()` here and change only what differs. Any field can be overridden from the
command line, and a typo is an error because the config is locked:

  python -m sdseg_jax.main --config configs/kvasir.py --workdir runs/kvasir \
      --config.train.max_steps=20000 --config.model.compute_dtype=bfloat16
"""

import ml_collections

from sdseg_jax.data import configs as data_configs
from sdseg_jax.models import model_config


def data_block(name: str, root: str = "") -> ml_collections.ConfigDict:
  """`config.data` for a dataset: its reader fields plus the training pipeline's."""
  data = data_configs.get_data_config(name, root)
  # grain worker processes per host (0 = read in the training process).
  data.worker_count = 2
  # Run the quick (header-level) integrity check of the dataset before training starts.
  data.check_before_training = True
  # The built-in synthetic dataset (configs/demo.py): generated on the fly, deterministic.
  data.synthetic = ml_collections.ConfigDict(
      dict(num_train=2000, num_val=64, num_test=64, size=256, seed=0))
  return data


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Global seed (official main.py: 23): parameters init, noise, timesteps, dropout, data order.
  config.seed = 23

  # ---- model: the official YAML field names (ddconfig / unet_config) ----------------------------
  config.model = model_config.model_config()

  # ---- data (fields of each dataset: sdseg_jax/data/configs.py) ---------------------------------
  config.data = data_block("synthetic")

  # ---- initial weights --------------------------------------------------------------------------
  config.init = ml_collections.ConfigDict()
  # Converted kl-f8 autoencoder (python -m sdseg_jax.convert --kind autoencoder ...): the frozen
  # VAE and the vision encoder's initial encoder. Required unless `pretrain_vae` is used.
  config.init.vae = ""
  # Converted LDM UNet (lsun_churches256, --kind ldm_unet): widened to 8 input channels.
  # Empty = random UNet init (allowed, but the paper starts from LSUN-Churches).
  config.init.unet = ""
  # A converted full SDSeg checkpoint (--kind sdseg) to start from instead (fine-tuning).
  config.init.sdseg = ""
  # Stand-in for kl-f8 where it cannot be downloaded (demo, tests): train the configured VAE on
  # the training masks for this many steps before SDSeg training. 0 = off.
  config.init.pretrain_vae_steps = 0
  config.init.pretrain_vae_lr = 1e-3
  config.init.pretrain_vae_batch_size = 16

  # Latent scale factor s (z0 = s * sample). <= 0: 1/std of the first training batch's mask
  # latents (official scale_by_std); stored in checkpoints.
  config.scale_factor = -1.0

  # ---- training ---------------------------------------------------------------------------------
  config.train = ml_collections.ConfigDict()
  # Global batch size (official: 4 on one GPU), split over all devices of all hosts.
  config.train.global_batch_size = 4
  config.train.max_steps = 100_000
  # Weight of the latent estimation loss (lambda = 1 in the paper).
  config.train.latent_loss_weight = 1.0
  # Use the posterior sample (official) or its mean as the mask latent target.
  config.train.sample_posterior = True

  # ---- optimiser (official: AdamW(wd 0.01), lr = base_lr x global batch, linear warm-up) --------
  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 1e-5
  # Multiply base_lr by the global batch size (official --scale_lr, default on).
  config.optim.scale_lr = True
  config.optim.weight_decay = 0.01
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  # LambdaLinearScheduler: factor 1e-6 -> 1 linearly over warmup_steps, then constant.
  config.optim.warmup_steps = 10_000
  config.optim.warmup_start_factor = 1e-6
  # Global-norm gradient clipping (0 = off, as the official code).
  config.optim.grad_clip_norm = 0.0
  # Adam first-moment dtype (float32, or bfloat16 to save memory).
  config.optim.mu_dtype = "float32"

  # ---- EMA of the UNet: decay_n = min(decay, (1 + n) / (10 + n)) --------------------------------
  config.ema = ml_collections.ConfigDict(dict(decay=0.9999, use_num_updates=True))

  # ---- device mesh and sharding ----------------------------------------------------------------
  config.mesh = ml_collections.ConfigDict()
  # Mesh shape over (data, fsdp); -1 takes the remaining devices.
  config.mesh.data = -1
  config.mesh.fsdp = 1
  # "dp": replicate parameters and optimizer state; "fsdp": shard them over the fsdp axis.
  config.mesh.strategy = "dp"

  # ---- evaluation during training (EMA UNet, single step, on the VALIDATION split) -------------
  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 2000
  config.eval.split = "val"
  # Per-host evaluation batch size.
  config.eval.batch_size = 8
  # Seed of the noise z_T (one draw per image, fixed across evaluations).
  config.eval.noise_seed = 0
  # Number of image|truth|prediction|probability panels written as PNG at each evaluation.
  config.eval.num_panels = 4
  # Dice convention: "official" (both empty -> 0) or "both_empty_is_one".
  config.eval.empty_convention = "official"

  # ---- checkpoints ----------------------------------------------------------------------------
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 2000
  # Keep the last N checkpoints plus the best by eval/dice.
  config.checkpoint.keep_last = 3
  config.checkpoint.keep_best = True
  config.checkpoint.async_save = True

  # ---- logging --------------------------------------------------------------------------------
  config.log = ml_collections.ConfigDict()
  config.log.every_steps = 50
  config.log.tensorboard = True
  # Progress bar on stderr (process 0 only).
  config.log.progress_bar = True
  # Optional profiler trace window [start, start + steps) written to WORKDIR/profile.
  config.log.profile_start_step = -1
  config.log.profile_steps = 5
  return config
