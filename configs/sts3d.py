"""SDSeg on STS-3D tooth CBCT: 9 training / 3 test volumes, one training volume held out for
validation.

  python -m sdseg_jax.main --config configs/sts3d.py --workdir runs/sts3d \
      --config.data.root=/path/to/STS-3D
  python -m sdseg_jax.main --config configs/sts3d.py:h100 --workdir runs/sts3d_h100

Variants after the colon: runlocal (CPU smoke), gpu8, h100, h200, v5e8, v5e32, v5p8 (see
configs/base.py).
Needs the converted kl-f8 and LSUN-Churches weights in weights/ (README, "Official weights").
"""

from configs import base


def get_config(variant: str = ""):
  return base.benchmark_config("sts3d", "data/STS-3D", eval_every=5000, variant=variant,
                               train_steps=125_000)
