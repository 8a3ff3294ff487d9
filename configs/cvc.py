"""SDSeg on CVC-ClinicDB (612 colonoscopy frames; seeded 492/60/60 split).

  python -m sdseg_jax.main --config configs/cvc.py --workdir runs/cvc \
      --config.data.root=/path/to/CVC-ClinicDB
  python -m sdseg_jax.main --config configs/cvc.py:h100 --workdir runs/cvc_h100

Variants after the colon: runlocal (CPU smoke), gpu8, h100, h200, v5e8, v5e32, v5p8 (see
configs/base.py).
Needs the converted kl-f8 and LSUN-Churches weights in weights/ (README, "Official weights").
"""

from configs import base


def get_config(variant: str = ""):
  return base.benchmark_config("cvc", "data/CVC-ClinicDB", eval_every=2000, variant=variant)
