r"""TFDS builders writing the raw records of each dataset as ArrayRecord, read back without TF.

  python -m sdseg_jax.data.tfds_build --dataset kvasir --root /data/Kvasir-SEG \
      --split_dir WORKDIR/splits --data_dir /data/tfds [--set field=value ...]

The user's download is the builder's `manual_dir`; the folder source (`registry.folder_source`)
produces the records, so the TFDS copy is by construction the same data: 2D images and label maps
as lossless PNG `Image` features, CT/CBCT slices as zlib `Tensor` float32 features (numpy images
would need TensorFlow's PNG encoder; PIL images and Tensor features do not). Generation order is
kept (`disable_shuffling`), so record i of a TFDS split is record i of the folder split.

Why bother when the folder source is the zero-setup default: one ArrayRecord file per split reads
fast from network/object storage, 3D datasets need no volume cache on the training hosts, and the
build runs the full decode once (any corrupt file fails the build, not a training run).

The build is keyed by the data fields that change the records (dataset, split scheme, seed,
labels, window...), and it stores the split lists it was built from; `make_source` with
`format="tfds"` checks them against the run's split_dir (or writes them there), so a run can never
read a build made from another split.

A build may live in a bucket (data.tfds_data_dir=gs://BUCKET/tfds): build it on local disk, copy
the folder up (`gcloud storage cp -r /data/tfds/* gs://BUCKET/tfds/`), and every host stages that
build's files to its local disk once (~/.cache/sdseg_jax/tfds/BUCKET/PATH, or
data.tfds_cache_dir) before reading. ArrayRecord's reader takes local file names only (given a
gs:// name it hangs instead of failing), so records are never read from the bucket directly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import uuid

import numpy as np
from PIL import Image

from sdseg_jax import storage
from sdseg_jax.data import base
from sdseg_jax.data import configs
from sdseg_jax.data import registry
from sdseg_jax.data import splits as splits_lib

# The data fields that change the stored records (resizing, augmentation and IO fields do not).
_KEY_FIELDS = ("name", "split", "split_seed", "val_size", "test_size", "layout", "labels",
               "hu_min", "hu_max", "window_level", "window_width", "clean_labels")
VOLUME_SETS = ("btcv", "sts3d")


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def config_key(data_config) -> str:
  fields = {k: data_config[k] for k in _KEY_FIELDS if k in data_config}
  return "k" + hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def _builder_class(name: str):
  """One registered builder class per dataset (tfds names datasets after the class)."""
  if name in _BUILDERS:
    return _BUILDERS[name]
  tfds = _tfds()
  volume = name in VOLUME_SETS

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, data_config=None, split_dir=None, **kwargs):
      self._data_config = data_config
      self._split_dir = split_dir
      super().__init__(**kwargs)

    def _info(self):
      f = tfds.features
      image = (f.Tensor(shape=(None, None), dtype=np.float32, encoding="zlib") if volume
               else f.Image(shape=(None, None, 3)))
      return tfds.core.DatasetInfo(
          builder=self, description=f"SDSeg {name} raw records (sdseg_jax.data)",
          disable_shuffling=True,  # record i of a split = record i of the folder source
          features=f.FeaturesDict({
              "image": image, "mask": f.Image(shape=(None, None, 1)), "name": f.Text(),
              "case": f.Text(), "slice": f.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in splits_lib.SPLITS
              if (self._split_dir / f"{s}.txt").read_text().strip()}

    def _generate_examples(self, split):
      source = registry.folder_source(self._data_config, split, self._split_dir)
      for i in range(len(source)):
        rec = source[i]
        image = rec["image"][..., 0] if volume else Image.fromarray(rec["image"])
        yield rec["name"], {"image": image, "mask": Image.fromarray(rec["mask"]),
                            "name": rec["name"], "case": rec["case"], "slice": rec["slice"]}

  _Builder.__name__ = _Builder.__qualname__ = f"Sdseg{name.capitalize()}"
  _Builder.name = f"sdseg_{name}"
  _BUILDERS[name] = _Builder
  return _Builder


_BUILDERS: dict = {}


def _builder(data_config, split_dir: pathlib.Path | None):
  tfds = _tfds()
  if not data_config.get("tfds_data_dir"):
    raise ValueError("format='tfds' needs data_config.tfds_data_dir")
  cls = _builder_class(data_config.name)
  return cls(data_config=data_config, split_dir=split_dir, data_dir=data_config.tfds_data_dir,
             config=tfds.core.BuilderConfig(name=config_key(data_config)),
             file_format="array_record")


def build(data_config, split_dir: pathlib.Path) -> pathlib.Path:
  """Builds (or finds) the ArrayRecord copy of the dataset; returns its folder."""
  if storage.is_remote(str(data_config.get("tfds_data_dir") or "")):
    raise base.DataError(
        f"--data_dir {data_config.tfds_data_dir}: build on local disk (ArrayRecord files are "
        "written by name), then copy the build up: `gcloud storage cp -r LOCAL_DATA_DIR/* "
        f"{data_config.tfds_data_dir}/` and train with data.tfds_data_dir="
        f"{data_config.tfds_data_dir}")
  split_dir = pathlib.Path(split_dir)
  registry.folder_source(data_config, "train", split_dir)  # resolves/writes the split files
  builder = _builder(data_config, split_dir)
  tfds = _tfds()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(data_config.root)))
  out = pathlib.Path(str(builder.data_path))
  for s in splits_lib.SPLITS:
    (out / f"split_{s}.txt").write_text((split_dir / f"{s}.txt").read_text())
  return out


class TfdsSource:
  """Raw-record view of one split of a TFDS build (same contract as the folder sources)."""

  def __init__(self, data_source, volume: bool):
    self._ds = data_source
    self._volume = volume

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> base.Record:
    ex = self._ds[index]
    image = ex["image"]
    if self._volume:
      image = np.repeat(np.asarray(image, np.float32)[..., None], 3, axis=-1)
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # pylint: disable=g-long-lambda
    return {"image": np.asarray(image), "mask": np.asarray(ex["mask"])[..., 0],
            "name": text(ex["name"]), "case": text(ex["case"]), "slice": int(ex["slice"])}

  def __repr__(self) -> str:
    return f"TfdsSource(n={len(self)})"


def _stage(data_config):
  """For a gs:// tfds_data_dir: copies the build to local disk; returns the config reading it.

  The local copy is current when its dataset_info.json equals the bucket's (a build of one
  config key only changes by a rebuild, which rewrites that file). dataset_info.json is copied
  last, and every file through a temporary name and a rename, so an interrupted or concurrent
  staging (two processes on one host) never leaves a copy that looks complete but is not.
  """
  remote_root = storage.path(data_config.tfds_data_dir)
  cache_root = pathlib.Path(data_config.get("tfds_cache_dir") or
                            pathlib.Path.home() / ".cache" / "sdseg_jax" / "tfds")
  local_config = data_config.copy_and_resolve_references()
  local_config.tfds_data_dir = str(cache_root / os.fspath(remote_root)[len("gs://"):])
  local = pathlib.Path(str(_builder(local_config, None).data_path))
  remote = remote_root.joinpath(*local.relative_to(local_config.tfds_data_dir).parts)
  info = remote / "dataset_info.json"
  if not info.exists():
    raise base.DataError(
        f"no TFDS build of {data_config.name} with these settings at {remote}; build it on local "
        f"disk (python -m sdseg_jax.data.tfds_build --dataset {data_config.name} --root ROOT "
        f"--split_dir SPLIT_DIR --data_dir LOCAL_DATA_DIR), then copy it up: `gcloud storage cp "
        f"-r LOCAL_DATA_DIR/* {remote_root}/`")
  wanted = info.read_bytes()
  local_info = local / "dataset_info.json"
  if local_info.exists() and local_info.read_bytes() == wanted:
    return local_config
  local.mkdir(parents=True, exist_ok=True)
  files = sorted((p for p in remote.iterdir() if p.name != info.name), key=lambda p: p.name)
  for source in files + [info]:
    tmp = local / f".{source.name}.{uuid.uuid4().hex}.tmp"
    with source.open("rb") as f_in, open(tmp, "wb") as f_out:
      while chunk := f_in.read(1 << 24):
        f_out.write(chunk)
    os.replace(tmp, local / source.name)
  return local_config


def make_source(data_config, split: str, split_dir: pathlib.Path) -> TfdsSource:
  """Source over a finished build; its stored split lists must match (or seed) split_dir."""
  if storage.is_remote(str(data_config.get("tfds_data_dir") or "")):
    data_config = _stage(data_config)
  builder = _builder(data_config, None)
  path = pathlib.Path(str(builder.data_path))
  command = (f"python -m sdseg_jax.data.tfds_build --dataset {data_config.name} --root ROOT "
             f"--split_dir {split_dir} --data_dir {data_config.tfds_data_dir}")
  if not (path / "dataset_info.json").exists():
    raise base.DataError(f"no TFDS build of {data_config.name} with these settings at {path}; "
                         f"build it with: {command}")
  split_dir = storage.path(split_dir)  # the run's split files may be in a gs:// workdir
  for s in splits_lib.SPLITS:
    built, run = path / f"split_{s}.txt", split_dir / f"{s}.txt"
    if run.exists() and run.read_text() != built.read_text():
      raise base.DataError(f"{run} differs from the split the TFDS build at {path} was made "
                           f"from ({built}); rebuild or use that build's split files")
  if not (split_dir / "train.txt").exists():
    split_dir.mkdir(parents=True, exist_ok=True)
    for s in splits_lib.SPLITS:
      (split_dir / f"{s}.txt").write_text((path / f"split_{s}.txt").read_text())
  if split not in builder.info.splits:
    raise base.DataError(f"split {split!r} is empty in the TFDS build at {path}")
  return TfdsSource(builder.as_data_source(split=split), data_config.name in VOLUME_SETS)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", required=True, choices=("kvasir", "cvc", "refuge", "btcv",
                                                           "sts3d"))
  parser.add_argument("--root", required=True, help="the dataset's download (manual_dir)")
  parser.add_argument("--split_dir", required=True, help="run's split files (reused/written)")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a data-config field (same as the training config)")
  args = parser.parse_args(argv)
  data_config = configs.get_data_config(args.dataset, args.root)
  data_config.tfds_data_dir = args.data_dir
  for item in args.set:
    key, _, value = item.partition("=")
    data_config[key] = type(data_config[key])(value)
  out = build(data_config, pathlib.Path(args.split_dir))
  print(f"built {out}; train with data.format='tfds', data.tfds_data_dir='{args.data_dir}'")
  return 0


if __name__ == "__main__":
  sys.exit(main())
