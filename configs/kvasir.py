"""SDSeg on Kvasir-SEG (1000 polyp images; bicubic resize; seeded 800/100/100 split).

  python -m sdseg_jax.main --config configs/kvasir.py --workdir runs/kvasir \
      --config.data.root=/path/to/Kvasir-SEG
  python -m sdseg_jax.main --config configs/kvasir.py:h100 --workdir runs/kvasir_h100

Variants after the colon: runlocal (CPU smoke), gpu8, h100, h200, v5e8, v5e32, v5p8 (see
configs/base.py).
Needs the converted kl-f8 and LSUN-Churches weights in weights/ (README, "Official weights").
"""

from configs import base


def get_config(variant: str = ""):
  return base.benchmark_config("kvasir", "data/Kvasir-SEG", eval_every=2000, variant=variant)
