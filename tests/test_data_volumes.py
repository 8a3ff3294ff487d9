"""BTCV and STS-3D sources on small synthetic NIfTI volumes written by the tests."""

import numpy as np
import pytest

from sdseg_jax.data import base
from sdseg_jax.data import btcv
from sdseg_jax.data import check
from sdseg_jax.data import configs
from sdseg_jax.data import pipeline
from sdseg_jax.data import registry
from sdseg_jax.data import splits
from sdseg_jax.data import sts3d
from tests import test_data_fakes as fakes

BTCV_IDS = ["0001", "0005", "0006", "0007"]


@pytest.fixture(scope="module")
def btcv_setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("btcv")
  fakes.write_btcv(root, BTCV_IDS)
  run = tmp_path_factory.mktemp("run")
  split_dir = run / "splits"
  split_dir.mkdir()
  # The TransUNet split needs all 30 volumes; give this small set its own split files.
  for s, names in {"train": ["case0005", "case0006"], "val": ["case0007"],
                   "test": ["case0001"]}.items():
    (split_dir / f"{s}.txt").write_text("".join(f"{n}\n" for n in names))
  c = configs.get_data_config("btcv", str(root))
  return c, split_dir


def test_btcv_slices_windowing_and_synapse8_labels(btcv_setup):
  c, split_dir = btcv_setup
  src = registry.make_source(c, "train", split_dir)
  assert len(src) == 2 * 5 and src.case_slices() == {"case0005": 5, "case0006": 5}
  rec = src[7]
  assert rec["case"] == "case0006" and rec["slice"] == 2 and rec["name"] == "case0006_slice002"
  assert rec["image"].shape == (24, 20, 3) and rec["image"].dtype == np.float32
  # HU -125 -> 0, 275 -> 1, 75 -> 0.5 (one fixed window for every split).
  np.testing.assert_allclose(rec["image"][0, :3, 0], [0.0, 1.0, 0.5], atol=1e-6)
  # Slice 2 holds liver (6 -> 5) and esophagus (5 -> dropped).
  assert set(np.unique(rec["mask"])) == {0, 5}
  assert set(np.unique(src[8]["mask"])) == {0, 8}  # pancreas 11 -> 8


def test_btcv_all13_labels_and_pickling(btcv_setup, tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  c, split_dir = btcv_setup
  c = c.copy_and_resolve_references()
  c.labels = "all13"
  c.volume_cache_dir = str(tmp_path / "cache")
  src = registry.make_source(c, "train", split_dir)
  assert set(np.unique(src[7]["mask"])) == {0, 5, 6}
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[7]["mask"], src[7]["mask"])


def test_btcv_eval_loader_walks_whole_volumes(btcv_setup):
  c, split_dir = btcv_setup
  loader = pipeline.make_eval_loader(c, "test", split_dir=split_dir, batch_size=4,
                                     process_index=0, process_count=1)
  batches = list(loader)
  valid = np.concatenate([b["valid"] for b in batches])
  slices = np.concatenate([b["slice"] for b in batches])[valid]
  assert slices.tolist() == [0, 1, 2, 3, 4] and valid.sum() == 5 and len(valid) == 8
  assert {str(x) for b in batches for x in b["case"]} == {"case0001"}
  label = np.concatenate([b["label"] for b in batches])[valid]
  assert set(np.unique(label)) == {0, 1}  # binary 8-organ union
  assert label[1].sum() > 0 and label[0].sum() == 0


def test_btcv_transunet_split_proposal():
  c = configs.get_data_config("btcv", "")
  split = btcv.propose_split(c)
  assert len(split["test"]) == 12 and len(split["train"]) == 16 and len(split["val"]) == 2
  assert "case0008" in split["test"] and not set(split["val"]) & set(split["test"])


def test_btcv_missing_volume_in_split_is_an_error(btcv_setup, tmp_path):
  c, _ = btcv_setup
  with pytest.raises(base.DataError, match="case0002"):
    registry.make_source(c, "train", tmp_path / "splits")  # TransUNet split: 26 missing


def test_sts3d_window_minmax_split_and_cleaning(tmp_path):
  root = tmp_path / "sts"
  fakes.write_sts3d(root, [1, 2, 3, 10, 11, 12])
  split_dir = tmp_path / "run" / "splits"
  split_dir.mkdir(parents=True)
  for s, names in {"train": ["Teeth_0001_0000", "Teeth_0002_0000"], "val": ["Teeth_0003_0000"],
                   "test": ["Teeth_0010_0000", "Teeth_0011_0000", "Teeth_0012_0000"]}.items():
    (split_dir / f"{s}.txt").write_text("\n".join(names) + "\n")
  c = configs.get_data_config("sts3d", str(root))
  src = registry.make_source(c, "test", split_dir)
  assert len(src) == 12
  images = np.stack([src[i]["image"][..., 0] for i in range(4)])
  assert images.min() == 0.0 and images.max() == 1.0  # per-volume min-max after the window
  assert src[1]["mask"][15, 15] == 1 and set(np.unique(src[1]["mask"])) == {0, 1}
  c.clean_labels = True
  cleaned = registry.make_source(c, "test", split_dir)
  assert cleaned[1]["mask"][15, 15] == 0 and cleaned[1]["mask"][5, 5] == 1
  proposal = sts3d.propose_split(configs.get_data_config("sts3d", ""))
  assert len(proposal["train"]) == 8 and len(proposal["val"]) == 1
  assert proposal["test"] == ["Teeth_0010_0000", "Teeth_0011_0000", "Teeth_0012_0000"]
  assert not set(proposal["val"]) & set(proposal["test"])


def test_volume_check_finds_bad_volumes(tmp_path):
  root = tmp_path / "btcv"
  fakes.write_btcv(root, ["0001", "0002", "0003", "0004"])
  fakes.write_nifti(root / "Training" / "label" / "label0002.nii.gz",
                    np.zeros((24, 20, 5), np.int16))              # empty label volume
  fakes.write_nifti(root / "Training" / "label" / "label0003.nii.gz",
                    np.zeros((24, 20, 4), np.int16))              # shape mismatch
  fakes.write_nifti(root / "Training" / "label" / "label0004.nii.gz",
                    np.full((24, 20, 5), 20, np.int16))           # label out of range
  (root / "Training" / "img" / "img0009.nii.gz").write_bytes(b"not a nifti")  # no label
  good = root / "Training" / "img" / "img0001.nii.gz"
  data = good.read_bytes()
  fakes.write_nifti(root / "Training" / "label" / "label0005.nii.gz",
                    np.ones((24, 20, 5), np.int16))
  (root / "Training" / "img" / "img0005.nii.gz").write_bytes(data[: len(data) // 2])  # truncated
  report = check.check_dataset(configs.get_data_config("btcv", str(root)))
  bad = {p.path: p.reason for p in report.problems}
  lab = root / "Training" / "label"
  assert "empty label" in bad[str(lab / "label0002.nii.gz")]
  assert "shape" in bad[str(lab / "label0003.nii.gz")]
  assert "out of range" in bad[str(lab / "label0004.nii.gz")]
  assert "without label" in bad[str(root / "Training" / "img" / "img0009.nii.gz")]
  assert "decode" in bad[str(root / "Training" / "img" / "img0005.nii.gz")]
  assert str(good) not in bad
  assert any("not on disk" in p.reason for p in report.problems)  # TransUNet split incomplete
  assert set(splits.SPLITS) >= set(report.split_counts)
