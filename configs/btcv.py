"""SDSeg on BTCV/Synapse abdominal CT, binary union of the 8 TransUNet organs (18/12 volumes).

  python -m sdseg_jax.main --config configs/btcv.py --workdir runs/btcv \
      --config.data.root=/path/to/BTCV
  python -m sdseg_jax.main --config configs/btcv.py:h100 --workdir runs/btcv_h100

Variants after the colon: runlocal (CPU smoke), gpu8, h100, h200, v5e8, v5e32, v5p8 (see
configs/base.py).
Needs the converted kl-f8 and LSUN-Churches weights in weights/ (README, "Official weights").
"""

from configs import base


def get_config(variant: str = ""):
  return base.benchmark_config("btcv", "data/BTCV", eval_every=5000, variant=variant,
                               train_steps=70_000)
