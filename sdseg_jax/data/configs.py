"""Default `config.data` blocks per dataset (the fields the data layer reads, with defaults).

configs/*.py may copy these blocks; the CLIs (check, tfds_build, benchmark_input) and the tests
build their configs here so there is one list of fields.
"""

from __future__ import annotations

import ml_collections

from sdseg_jax import errors


def _common(name: str, root: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = name                  # kvasir | cvc | refuge | btcv | sts3d | synthetic
  c.root = root                  # the dataset's download folder (sdseg_jax/data/README.md)
  c.format = "folder"            # folder: read the download directly; tfds: ArrayRecord build
  c.tfds_data_dir = ""           # where tfds_build wrote the ArrayRecord files (format=tfds)
  c.tfds_cache_dir = ""          # local copy of a gs:// tfds_data_dir ("": ~/.cache/sdseg_jax/tfds)
  c.image_size = 256             # model resolution S (images and masks S x S)
  c.interpolation = "bilinear"   # image resize filter (masks are always nearest)
  c.target = "foreground"        # foreground | cup | disc | multiclass (transforms.TARGETS)
  c.split = ""                   # split scheme, dataset-specific (see each module)
  c.split_seed = 23              # seed of the proposed split (SDSeg's seed)
  c.val_size = 0                 # validation samples/volumes (held out from train, never test)
  c.test_size = 0                # test samples (schemes that draw the test set)
  c.flip_prob = 0.5              # probability of each random flip (train only)
  c.flips = "hv"                 # hv: horizontal + vertical flips | h: horizontal only | none
  c.read_threads = 4             # grain read threads per process / worker
  c.prefetch = 2                 # batches buffered per grain worker process
  return c


def get_data_config(name: str, root: str = "") -> ml_collections.ConfigDict:
  """The default data block of `name`; callers override fields as needed."""
  c = _common(name, root)
  if name == "kvasir":
    c.interpolation = "bicubic"  # the official Kvasir loader resizes images bicubic
    c.split = "sdseg"            # sdseg (800/100/100 seeded) | medico2020 (880->780+100 / 120)
    c.val_size = 100
    c.test_size = 100
    c.split_lists_dir = ""       # medico2020 lists; "" = ROOT/splits/medico2020
  elif name == "cvc":
    c.split = "sdseg"            # sdseg (492/60/60 seeded, frame level) | frames (by number)
    c.val_size = 60
    c.test_size = 60             # 62 with split=frames gives the PraNet-sized 550/62
  elif name == "refuge":
    c.target = "cup"             # SDSeg segments the optic cup
    c.split = "challenge"        # challenge (400/400/400) | sdseg (train+val400 -> train, T test)
    c.val_size = 0               # sdseg scheme: images of the 800 held out for validation
    c.layout = "auto"            # auto | official (Training400/...) | cropped (images/, masks/)
  elif name == "btcv":
    c.split = "transunet"        # TransUNet 18 train / 12 test volumes
    c.val_size = 2               # training volumes held out (seeded) for model selection
    c.labels = "synapse8"        # synapse8 (9-class map, 8 organs) | all13 (14-class map)
    c.hu_min = -125.0            # HU window used for train AND test (SDSeg's test window)
    c.hu_max = 275.0
    c.intensity = "clean"        # clean (the window above) | official (train != test, btcv.py)
    c.volume_cache_dir = ""      # decoded-volume cache; "" = <split_dir>/../volume_cache
  elif name == "sts3d":
    c.split = "sdseg"            # train Teeth_0001..0009 (minus val), test Teeth_0010..0012
    c.val_size = 1               # training volumes held out (seeded) for model selection
    c.window_level = 500.0       # CBCT window W1200/L500 -> clip [-100, 1100]
    c.window_width = 1200.0
    c.clean_labels = False       # drop label components < 64 voxels (train and test alike)
    c.flips = "h"                # the official STS-3D loader flips horizontally only
    c.volume_cache_dir = ""      # decoded-volume cache; "" = <split_dir>/../volume_cache
  elif name == "synthetic":
    pass
  else:
    raise errors.ConfigError(f"unknown dataset {name!r}")
  return c
