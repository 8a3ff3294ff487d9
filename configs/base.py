"""Base configuration of sdseg_jax: every field, with the official SDSeg values as defaults.

The per-benchmark configs (refuge.py, cvc.py, kvasir.py, btcv.py, sts3d.py) and demo.py start
from `get_config()` here and change only what differs. Any field can be overridden from the
command line, and a typo is an error because the config is locked:

  python -m sdseg_jax.main --config configs/kvasir.py --workdir runs/kvasir \
      --config.train.max_steps=20000 --config.model.compute_dtype=bfloat16
"""

import ml_collections

from sdseg_jax import errors
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


# Converted public weights (see `python -m sdseg_jax.convert --help` and the README).
KL_F8_WEIGHTS = "weights/kl-f8.npz"
LSUN_CHURCHES_UNET_WEIGHTS = "weights/lsun_churches_unet.npz"

# TPU slices: (aot topology, devices, examples per device, remat); data-parallel with replicated
# state, bf16. Chosen from XLA:TPU's compiles (`python -m sdseg_jax.aot`; BENCHMARKS.md, "TPU
# ahead-of-time compile", estimates). On v5e-8: dp beat fsdp (74.7 vs 59.3 img/s/chip at 8 per
# chip); 16 per chip beat 8 (102.6 img/s/chip, 11.9 of 16 GiB), because the per-step optimizer
# and EMA traffic is shared by more examples; 32 per chip fits only with the UNet blocks
# rematerialised (`model.unet.use_checkpoint`) and is faster still (122.7 img/s/chip, 12.7 GiB).
# The global batch is capped at 256 because the recipe scales the learning rate with it
# (1e-5 x batch: 2.6e-3 at 256, against the paper's 4e-5) and nothing larger has been tried.
# Each preset's both suites compiled and fit (benchmarks/aot/refuge_<variant>_<topology>.json;
# tests/test_configs.py).
TPU_PRESETS = {
    "v5e8": ("v5e:2x4", 8, 32, True),     # v5e-8, 16 GiB/chip
    "v5e32": ("v5e:4x8", 32, 8, False),   # v5e-32, 8 hosts
    "v5p8": ("v5p:2x2x1", 4, 64, False),  # v5p-8 = 4 chips, 95 GiB/chip
}
VARIANTS = ("", "runlocal", "gpu8", "h100", "h200", *TPU_PRESETS, "cpu_small")
# Precision settings, added after a comma to any variant (`configs/kvasir.py:h100,paper`):
#   "paper"  float32 convolutions and matmuls at full precision, as the official training
#            (fp32; no bf16 passes on TPU, no TF32 on GPU). Several times slower on
#            accelerators: fp32 matmuls run at a fraction of the bf16 rate.
PRECISIONS = ("paper",)


def split_variant(variant: str) -> tuple[str, tuple[str, ...]]:
  """"h100,paper" -> ("h100", ("paper",)); rejects unknown hardware variants and settings."""
  hardware, *settings = variant.split(",")
  if hardware not in VARIANTS:
    raise errors.ConfigError(f"unknown config variant {hardware!r}; expected one of {VARIANTS}")
  for setting in settings:
    if setting not in PRECISIONS:
      raise errors.ConfigError(f"unknown config setting {setting!r} in {variant!r}; expected "
                               f"one of {PRECISIONS} after the variant, e.g. 'h100,paper'")
  return hardware, tuple(settings)


def settings_only(variant: str) -> tuple[str, ...]:
  """The settings of a config without hardware variants (demo.py, tiny.py): "" or "paper"."""
  settings = tuple(s for s in variant.split(",") if s)
  for setting in settings:
    if setting not in PRECISIONS:
      raise errors.ConfigError(f"unknown config setting {setting!r}; this config takes only "
                       f"{PRECISIONS}")
  return settings


def apply_precision(config: ml_collections.ConfigDict, settings: tuple[str, ...]) -> None:
  """The "paper" setting: float32 compute at "highest" matmul/conv precision."""
  if "paper" in settings:
    config.model.compute_dtype = "float32"
    config.model.precision = "highest"


def small_model(size: int = 64) -> ml_collections.ConfigDict:
  """A CPU-sized SDSeg (demo and `cpu_small`): 32-channel f=4 autoencoder, 64-channel UNet.

  At 64x64 an f=8 latent (8x8) cannot hold a mask outline well enough for Dice > 0.9, so the
  small autoencoder has three levels: 64x64 masks -> 16x16x4 latents.
  """
  return model_config.model_config(
      ddconfig=dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, resolution=size),
      unet_config=dict(image_size=size // 4, model_channels=64, channel_mult=[1, 2],
                       attention_resolutions=[2], num_res_blocks=1, num_heads=4, dropout=0.0),
      vision_dropout=0.0)


def use_small_model(config: ml_collections.ConfigDict, size: int = 64) -> None:
  """Switches a config to `small_model` with a VAE pre-trained on the masks (no downloads)."""
  config.model = small_model(size)
  config.data.image_size = size
  config.init.vae = ""
  config.init.unet = ""
  # Budget: the demo runs in about 7 minutes on a 2-core CPU (BENCHMARKS.md).
  config.init.pretrain_vae_steps = 200
  config.init.pretrain_vae_batch_size = 8
  config.init.pretrain_vae_lr = 1e-3
  config.train.global_batch_size = 16
  config.train.max_steps = 600
  # A small model from scratch learns fastest with a larger step and a short warm-up.
  config.optim.base_lr = 3e-4
  config.optim.scale_lr = False
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.0
  # A short EMA horizon (about 100 steps), so that the weights evaluated after a few hundred
  # steps are not dominated by the early ones.
  config.ema.decay = 0.99
  config.eval.every_steps = config.checkpoint.every_steps = 200
  config.eval.batch_size = 32
  config.data.worker_count = 0
  # XLA CPU runs this model's small convolutions on about one core; one data-parallel JAX
  # device per core is 1.3-1.5x faster. No effect on GPU/TPU.
  config.mesh.cpu_devices = -1


def benchmark_config(dataset: str, root: str, eval_every: int, variant: str = "",
                     train_steps: int = 100_000) -> ml_collections.ConfigDict:
  """The official SDSeg recipe on one benchmark, plus hardware variants selected by `variant`.

    ""          the paper's setting: global batch 4 (lr = 1e-5 x 4), fp32, 1 device
    "runlocal"  a CPU smoke run: batch 2, 10 steps, evaluation on 8 validation cases
    "gpu8"      8 GPUs, 4 per GPU (global 32, lr scaled to 3.2e-4 as the official --scale_lr)
    "h100"      one H100: 32 per chip in bf16 (XLA:GPU plans 25.0 of 79.1 GiB; BENCHMARKS.md)
    "h200"      one H200 (141 GB): 64 per chip in bf16 (XLA:GPU plans 44.6 GiB; BENCHMARKS.md)
    "v5e8"      a v5e-8 slice: 32 per chip in bf16, UNet blocks rematerialised
    "v5e32"     a v5e-32 pod slice (8 hosts): 8 per chip in bf16
    "v5p8"      a v5p-8 slice (4 chips): 64 per chip in bf16
                (TPU variants: data-parallel, chosen from XLA:TPU's compiles; TPU_PRESETS)
    "cpu_small" the demo's small model at 64x64 on the real data, VAE pre-trained on its masks
  A precision setting may follow after a comma ("h100,paper", see PRECISIONS).
  """
  variant, settings = split_variant(variant)
  config = get_config()
  config.data = data_block(dataset, root)
  config.init.vae = KL_F8_WEIGHTS
  config.init.unet = LSUN_CHURCHES_UNET_WEIGHTS
  config.eval.every_steps = eval_every
  config.checkpoint.every_steps = eval_every
  # The official configs set no length; the official checkpoints do (STS-3D 125k steps, BTCV
  # binary 70k) and the author's "at most ~100k steps" covers the rest
  # (docs/method.md#a-training-length).
  config.train.max_steps = train_steps
  if variant == "runlocal":
    config.train.global_batch_size = 2
    config.train.max_steps = 10
    config.eval.every_steps = config.checkpoint.every_steps = 5
    config.eval.batch_size = 2
    config.log.every_steps = 1
    config.data.worker_count = 0
  elif variant == "gpu8":
    config.train.global_batch_size = 32
  elif variant == "h100":
    config.train.global_batch_size = 32
    config.model.compute_dtype = "bfloat16"
    config.eval.batch_size = 32
  elif variant == "h200":
    # Twice the H100 batch: XLA:GPU plans 44.6 GiB, which leaves half the card free even next to
    # the PyTorch baseline in the benchmark's process, and the per-step optimizer traffic halves.
    config.train.global_batch_size = 64
    config.model.compute_dtype = "bfloat16"
    config.eval.batch_size = 64
  elif variant == "cpu_small":
    use_small_model(config)
    # Within the 30-minute CPU budget of the Kvasir-SEG ablation (BENCHMARKS.md, "Real
    # Kvasir-SEG, CPU-sized model"): 1400 steps, about 16 min. The demo keeps its 7-minute 600.
    config.train.max_steps = 1400
  elif variant in TPU_PRESETS:
    _, devices, per_device, remat = TPU_PRESETS[variant]
    config.train.global_batch_size = devices * per_device
    config.model.unet.use_checkpoint = remat
    config.model.compute_dtype = "bfloat16"
    config.mesh.data, config.mesh.fsdp = -1, 1
    config.mesh.strategy = "dp"
  apply_precision(config, settings)
  return config


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
  # Pre-train on batches of half images, half masks (a general autoencoder, as kl-f8, whose
  # encoder also starts the vision encoder). Off: on Kvasir-SEG cpu_small and the learning test
  # it scored lower than masks only (BENCHMARKS.md, "Real Kvasir-SEG, CPU-sized model").
  config.init.pretrain_vae_images = False

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
  # CPU only: split the host CPU into this many JAX devices, so that data parallelism spreads the
  # batch over the cores (XLA CPU runs small convolutions on about one core). -1 = one per core,
  # rounded down to a divisor of the global batch size; 0 = JAX's default (one CPU device).
  # Ignored when XLA_FLAGS already sets --xla_force_host_platform_device_count.
  config.mesh.cpu_devices = 0

  # ---- evaluation during training (EMA UNet, single step, on the VALIDATION split) -------------
  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 2000
  config.eval.split = "val"
  # Per-host evaluation batch size.
  config.eval.batch_size = 8
  # Seed of the noise z_T (one draw per image, fixed across evaluations).
  config.eval.noise_seed = 0
  # "per_image": each image its own z_T (fixed across evaluations); "shared": one z_T per
  # evaluation, reused for every image (the official `log_dice`; reproduction protocol
  # `official`).
  config.eval.noise = "per_image"
  # Allow config.eval.split="test", i.e. the official code's model selection on the test split.
  # Refused otherwise; set only by `sdseg_jax.reproduce --protocol official`.
  config.eval.select_on_test = False
  # Number of image|truth|prediction|probability panels written as PNG at each evaluation.
  config.eval.num_panels = 4
  # Dice convention: "official" (both empty -> 0) or "both_empty_is_one".
  config.eval.empty_convention = "official"
  # Evaluators run every eval.every_steps on eval.split, keyed by the prefix of their logged
  # metrics: {prefix: {"type": dice | multiclass | stability, **options}} (sdseg_jax/evaluators).
  # "eval/dice" (from the default below) ranks the checkpoints kept as "best".
  config.evals = ml_collections.ConfigDict({"eval": {"type": "dice"}})

  # ---- checkpoints ----------------------------------------------------------------------------
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 2000
  # Keep the last N checkpoints plus the best by eval/dice.
  config.checkpoint.keep_last = 3
  config.checkpoint.keep_best = True
  config.checkpoint.async_save = True
  # Weights dtype of WORKDIR/export/inference.npz, written when training ends: "float32", or
  # "bfloat16" (half the size, for sharing; masks agree with float32 on >= 99.5% of pixels).
  config.checkpoint.export_dtype = "float32"

  # ---- logging --------------------------------------------------------------------------------
  config.log = ml_collections.ConfigDict()
  config.log.every_steps = 50
  config.log.tensorboard = True
  # Progress bar on stderr (process 0 only).
  config.log.progress_bar = True
  # Optional jax.profiler trace of the train steps [start, start + steps) in WORKDIR/profile
  # (TensorBoard's profile plugin / XProf / Perfetto read it); -1: no trace.
  config.log.profile_start_step = -1
  config.log.profile_steps = 5
  return config
