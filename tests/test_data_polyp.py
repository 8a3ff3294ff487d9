"""Kvasir-SEG (all 1000 real pairs) and the CVC-ClinicDB sample (PNG and TIFF layouts)."""

import pathlib

import numpy as np
import pytest

from sdseg_jax.data import base
from sdseg_jax.data import check
from sdseg_jax.data import configs
from sdseg_jax.data import cvc
from sdseg_jax.data import registry
from sdseg_jax.data import splits

# -- Kvasir-SEG ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kvasir_config(shared_data):
  return configs.get_data_config("kvasir", str(shared_data / "Kvasir-SEG"))


def test_kvasir_all_pairs_pass_header_check(kvasir_config, tmp_path):
  report = check.quick_check(kvasir_config, tmp_path / "splits")
  assert report.num_found == 1000 and report.ok
  assert report.split_counts == {"train": 800, "val": 100, "test": 100}


def test_kvasir_splits_disjoint_covering_and_reproducible(kvasir_config, tmp_path):
  sources = {s: registry.make_source(kvasir_config, s, tmp_path / "a") for s in splits.SPLITS}
  names = {s: src.names for s, src in sources.items()}
  assert [len(names[s]) for s in splits.SPLITS] == [800, 100, 100]
  everything = set().union(*map(set, names.values()))
  assert len(everything) == 1000
  assert all(n == sorted(n) for n in names.values())
  # A fresh split dir proposes the same split; the stored files are reused as-is.
  registry.make_source(kvasir_config, "train", tmp_path / "b")
  for s in splits.SPLITS:
    assert (tmp_path / "a" / f"{s}.txt").read_text() == (tmp_path / "b" / f"{s}.txt").read_text()


def test_kvasir_decoded_samples(kvasir_config, tmp_path):
  src = registry.make_source(kvasir_config, "test", tmp_path / "splits")
  for i in (0, 57, 99):
    rec = src[i]
    h, w = rec["mask"].shape
    assert rec["image"].shape == (h, w, 3) and rec["image"].dtype == np.uint8
    assert rec["mask"].dtype == np.uint8 and set(np.unique(rec["mask"])) == {0, 1}
    assert rec["slice"] == -1 and rec["case"] == rec["name"]


def test_kvasir_medico2020_split(kvasir_config, tmp_path):
  c = kvasir_config.copy_and_resolve_references()
  c.split = "medico2020"
  src = {s: registry.make_source(c, s, tmp_path / "splits") for s in splits.SPLITS}
  assert [len(src[s]) for s in splits.SPLITS] == [780, 100, 120]
  medico_val = (pathlib.Path(c.root) / "splits" / "medico2020" / "val.txt").read_text().split()
  assert src["test"].names == sorted(medico_val)


def test_stored_split_mismatch_is_an_error(kvasir_config, tmp_path):
  split_dir = tmp_path / "splits"
  registry.make_source(kvasir_config, "train", split_dir)
  other = kvasir_config.copy_and_resolve_references()
  other.split_seed = 1
  with pytest.raises(base.DataError, match="other settings"):
    registry.make_source(other, "train", split_dir)
  with open(split_dir / "test.txt", "a") as f:
    f.write("not_a_kvasir_id\n")
  with pytest.raises(base.DataError, match="not_a_kvasir_id"):
    registry.make_source(kvasir_config, "test", split_dir)


# -- CVC-ClinicDB ----------------------------------------------------------------------------------


def _cvc_config(root, **kw):
  c = configs.get_data_config("cvc", str(root))
  c.update(kw)
  return c


def test_cvc_png_and_tif_layouts_agree(shared_data, tmp_path):
  png = registry.make_source(_cvc_config(shared_data / "CVC-ClinicDB" / "PNG_sample",
                                         val_size=2, test_size=2), "train", tmp_path / "png")
  tif = registry.make_source(_cvc_config(shared_data / "CVC-ClinicDB" / "TIF_sample",
                                         val_size=1, test_size=1), "train", tmp_path / "tif")
  assert len(png) == 8 and len(tif) == 1
  rec_tif = tif[0]
  rec_png = png[png.names.index(rec_tif["name"])]
  assert rec_tif["image"].shape == (288, 384, 3)
  np.testing.assert_array_equal(rec_tif["image"], rec_png["image"])
  np.testing.assert_array_equal(rec_tif["mask"], rec_png["mask"])
  assert set(np.unique(rec_png["mask"])) == {0, 1}


def test_cvc_kaggle_root_and_frames_split(shared_data, tmp_path):
  # The Kaggle download holds PNG/ and TIF/ subfolders; point a small root at the sample.
  (tmp_path / "kaggle").mkdir()
  (tmp_path / "kaggle" / "PNG").symlink_to(shared_data / "CVC-ClinicDB" / "PNG_sample")
  images, masks = cvc.find_layout(tmp_path / "kaggle")
  assert images.name == "Original" and masks.name == "Ground Truth"
  c = _cvc_config(tmp_path / "kaggle", split="frames", val_size=2, test_size=3)
  src = {s: registry.make_source(c, s, tmp_path / "splits") for s in splits.SPLITS}
  assert src["test"].names == ["10", "11", "12"] and src["val"].names == ["8", "9"]
  assert sorted(src["train"].names, key=int) == [str(i) for i in range(1, 8)]


def test_cvc_check_cli_on_sample(shared_data, capsys):
  rc = check.main(["--dataset", "cvc", "--root", str(shared_data / "CVC-ClinicDB" / "TIF_sample"),
                   "--set", "val_size=1", "--set", "test_size=1"])
  assert rc == 0 and "OK" in capsys.readouterr().out
