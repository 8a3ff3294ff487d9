"""Command line: convert an official PyTorch checkpoint into sdseg_jax weights (torch-free).

  python -m sdseg_jax.convert --config configs/kvasir.py --kind autoencoder \
      --checkpoint models/first_stage_models/kl-f8/model.ckpt --out weights/kl-f8.npz
  python -m sdseg_jax.convert --config configs/kvasir.py --kind ldm_unet \
      --checkpoint models/ldm/lsun_churches256/model.ckpt --out weights/lsun_churches_unet.npz
  python -m sdseg_jax.convert --config configs/kvasir.py --kind sdseg [--noema] \
      --checkpoint logs/.../checkpoints/epoch=...ckpt --out weights/sdseg_kvasir.npz

The checkpoint is read without torch and without executing pickled code. Every tensor is mapped
onto the configured model or ignored for a stated reason; a missing, unexpected or mis-shaped
tensor is an error naming the key. Prints the tensors mapped/ignored and parameter counts.
"""

import json
import math
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from sdseg_jax import errors
from sdseg_jax import storage
from sdseg_jax.models import sdseg
from sdseg_jax.weights import artifacts
from sdseg_jax.weights import convert
from sdseg_jax.weights import torch_pickle

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (model sizes).",
                                          lock_config=True)
_KIND = flags.DEFINE_enum("kind", None, ["autoencoder", "ldm_unet", "sdseg"],
                          "What the checkpoint holds.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Official PyTorch .ckpt file.")
_OUT = flags.DEFINE_string("out", None, "Output .npz file.")
_EMA = flags.DEFINE_boolean("ema", True, "For --kind sdseg: use the EMA UNet (as the official "
                            "evaluation does); --noema takes the online UNet.")
flags.mark_flags_as_required(["config", "kind", "checkpoint", "out"])


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def convert_file(model_cfg, kind: str, checkpoint: str, out: str, use_ema: bool = True) -> str:
  """Converts one checkpoint and writes the artifact; returns the printable summary."""
  model = sdseg.build(model_cfg)
  params, vae = jax.eval_shape(model.init, jax.random.key(0))
  state = torch_pickle.load_state_dict(checkpoint)  # optimizer state etc. is never read
  prefixed_vae = any(k.startswith("first_stage_model.") for k in state) and not any(
      k.startswith("encoder.") for k in state)
  if kind == "autoencoder":
    if prefixed_vae:
      raise convert.ConversionError(
          f"{checkpoint}: this is a full LDM/SDSeg checkpoint, not the kl-f8 autoencoder file; "
          "use --kind sdseg or --kind ldm_unet")
    tree, report = convert.convert_autoencoder(state, vae, source=checkpoint)
    tree = {"vae": tree}
  elif kind == "ldm_unet":
    unet, report = convert.convert_ldm_unet(state, params["unet"], source=checkpoint)
    tree = {"unet": unet}
  else:
    tree, report = convert.convert_sdseg(state, params["unet"], params["vision_encoder"], vae,
                                         use_ema=use_ema, schedule_betas=model.schedule.betas,
                                         source=checkpoint)
  meta = {"kind": kind, "source": str(checkpoint), "use_ema": use_ema if kind == "sdseg" else None,
          "model": json.loads(model_cfg.to_json()), "mapped": len(report.mapped),
          "ignored": len(report.ignored)}
  artifacts.save(out, tree, meta)
  lines = [report.summary()]
  for name, sub in tree.items():
    if isinstance(sub, dict):
      lines.append(f"  {name:15s} {count(sub):>13,d} parameters")
  if "scale_factor" in tree:
    lines.append(f"  scale_factor    {float(tree['scale_factor']):.6g}")
  lines.append(f"wrote {out}")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  try:
    # --out may be gs://; an unusable bucket fails here, before the (slow) conversion.
    storage.check_bucket(storage.path(_OUT.value).parent, write=True)
    print(convert_file(_CONFIG.value.model, _KIND.value, _CHECKPOINT.value, _OUT.value,
                       _EMA.value))
  except (errors.UserFacingError, OSError) as e:  # OSError: an unreadable/unwritable path
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
