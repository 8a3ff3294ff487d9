"""SDSeg on REFUGE2 optic cup (disc-centred crops; 400/400/400 challenge split).

  python -m sdseg_jax.main --config configs/refuge.py --workdir runs/refuge \
      --config.data.root=/path/to/REFUGE2
  python -m sdseg_jax.main --config configs/refuge.py:h100 --workdir runs/refuge_h100

Variants after the colon: runlocal (CPU smoke), gpu8, h100, h200, v5e8, v5e32, v5p8 (see
configs/base.py).
Needs the converted kl-f8 and LSUN-Churches weights in weights/ (README, "Official weights").
"""

from configs import base


def get_config(variant: str = ""):
  return base.benchmark_config("refuge", "data/REFUGE2", eval_every=2000, variant=variant)
