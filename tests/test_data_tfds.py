"""TFDS (ArrayRecord, no TensorFlow) copies yield exactly the folder sources' records."""

import sys

import numpy as np
import pytest

from sdseg_jax.data import base
from sdseg_jax.data import configs
from sdseg_jax.data import pipeline
from sdseg_jax.data import registry
from sdseg_jax.data import splits
from sdseg_jax.data import tfds_build
from tests import test_data_fakes as fakes


def _assert_same_records(a, b):
  assert len(a) == len(b)
  for i in range(len(a)):
    ra, rb = a[i], b[i]
    assert set(ra) == set(rb)
    for k in ra:
      if isinstance(ra[k], np.ndarray):
        assert ra[k].dtype == rb[k].dtype
        np.testing.assert_array_equal(ra[k], rb[k])
      else:
        assert ra[k] == rb[k]


def kvasir_links(shared_data, folder, n: int = 6):
  """folder/Kvasir-SEG: the first `n` real image/mask pairs, as symlinks (nothing copied)."""
  src = shared_data / "Kvasir-SEG"
  root = folder / "Kvasir-SEG"
  for sub in ("images", "masks"):
    (root / sub).mkdir(parents=True)
  for p in sorted((src / "images").iterdir())[:n]:
    (root / "images" / p.name).symlink_to(p)
    (root / "masks" / p.name).symlink_to(src / "masks" / p.name)
  return root


@pytest.fixture
def kvasir_subset(shared_data, tmp_path):
  """A 6-pair Kvasir-SEG folder of symlinks to the real files."""
  root = kvasir_links(shared_data, tmp_path)
  c = configs.get_data_config("kvasir", str(root))
  c.val_size, c.test_size = 1, 2
  c.tfds_data_dir = str(tmp_path / "tfds")
  return c


def test_kvasir_tfds_equals_folder(kvasir_subset, tmp_path):
  c = kvasir_subset
  tfds_build.build(c, tmp_path / "build_splits")
  t = c.copy_and_resolve_references()
  t.format = "tfds"
  for s in splits.SPLITS:
    _assert_same_records(registry.make_source(c, s, tmp_path / "build_splits"),
                         registry.make_source(t, s, tmp_path / "run_splits"))
  # The build's split lists seeded the new run's split_dir.
  assert ((tmp_path / "run_splits" / "test.txt").read_text() ==
          (tmp_path / "build_splits" / "test.txt").read_text())
  batch = next(pipeline.make_train_loader(t, split_dir=tmp_path / "run_splits",
                                          global_batch_size=2, process_index=0,
                                          process_count=1, seed=0, worker_count=0))
  assert batch["image"].shape == (2, 256, 256, 3)
  assert "tensorflow" not in sys.modules


def test_tfds_refuses_other_splits_and_missing_builds(kvasir_subset, tmp_path):
  c = kvasir_subset
  t = c.copy_and_resolve_references()
  t.format = "tfds"
  with pytest.raises(base.DataError, match="tfds_build"):
    registry.make_source(t, "train", tmp_path / "splits")
  tfds_build.build(c, tmp_path / "splits")
  other = tmp_path / "other"
  other.mkdir()
  for s in splits.SPLITS:
    (other / f"{s}.txt").write_text("")
  with pytest.raises(base.DataError, match="differs"):
    registry.make_source(t, "train", other)


def test_volume_tfds_equals_folder(tmp_path):
  root = tmp_path / "sts"
  fakes.write_sts3d(root, [1, 2, 10])
  split_dir = tmp_path / "splits"
  split_dir.mkdir()
  for s, names in {"train": ["Teeth_0001_0000"], "val": ["Teeth_0002_0000"],
                   "test": ["Teeth_0010_0000"]}.items():
    (split_dir / f"{s}.txt").write_text(names[0] + "\n")
  c = configs.get_data_config("sts3d", str(root))
  c.tfds_data_dir = str(tmp_path / "tfds")
  tfds_build.build(c, split_dir)
  t = c.copy_and_resolve_references()
  t.format = "tfds"
  _assert_same_records(registry.make_source(c, "test", split_dir),
                       registry.make_source(t, "test", split_dir))
