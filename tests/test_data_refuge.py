"""REFUGE on a small synthetic copy of the official layout, and the disc-crop tool."""

import shutil

import numpy as np
from PIL import Image
import pytest

from sdseg_jax.data import check
from sdseg_jax.data import configs
from sdseg_jax.data import pipeline
from sdseg_jax.data import refuge
from sdseg_jax.data import refuge_crop
from sdseg_jax.data import registry
from sdseg_jax.data import splits
from tests import test_data_fakes as fakes


@pytest.fixture(scope="module")
def refuge_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("REFUGE")
  fakes.write_refuge(root)
  return root


def test_official_layout_splits_and_label_map(refuge_root, tmp_path):
  c = configs.get_data_config("refuge", str(refuge_root))
  src = {s: registry.make_source(c, s, tmp_path / "splits") for s in splits.SPLITS}
  assert src["train"].names == ["g0001", "n0001"]
  assert src["val"].names == ["V0001", "V0002"] and src["test"].names == ["T0001", "T0002"]
  rec = src["train"][0]
  assert rec["image"].shape == (60, 64, 3)
  assert rec["mask"][25, 20] == 2 and rec["mask"][25, 28] == 1 and rec["mask"][0, 0] == 0


def test_sdseg_scheme_holds_out_validation_from_train(refuge_root, tmp_path):
  c = configs.get_data_config("refuge", str(refuge_root))
  c.split, c.val_size = "sdseg", 1
  src = {s: registry.make_source(c, s, tmp_path / "splits") for s in splits.SPLITS}
  assert len(src["train"]) == 3 and len(src["val"]) == 1
  assert src["test"].names == ["T0001", "T0002"]


def test_oracle_crops_are_centred_on_the_disc_and_readable(refuge_root, tmp_path, capsys):
  out = tmp_path / "crops"
  assert refuge_crop.main(["--root", str(refuge_root), "--out", str(out),
                           "--crop_size", "16"]) == 0
  assert "ORACLE" in capsys.readouterr().err
  c = configs.get_data_config("refuge", str(out))
  src = registry.make_source(c, "test", tmp_path / "splits")
  rec = src[0]
  assert rec["image"].shape == (16, 16, 3)
  assert rec["mask"][8, 8] == 2  # the cup is at the crop centre
  label = pipeline_label(c, tmp_path / "splits")
  assert label.max() == 1 and label[:, 8, 8].all()  # cup target


def pipeline_label(c, split_dir):
  c.image_size = 16
  return next(iter(pipeline.make_eval_loader(c, "test", split_dir=split_dir, batch_size=2,
                                             process_index=0, process_count=1)))["label"]


def test_csv_centres_and_padding(refuge_root, tmp_path):
  csv = tmp_path / "centres.csv"
  names = fakes.write_refuge(tmp_path / "unused")
  csv.write_text("name,x,y\n" + "".join(f"{n}.jpg,2,2\n" for n in names))
  refuge_crop.main(["--root", str(refuge_root), "--out", str(tmp_path / "crops"),
                    "--crop_size", "10", "--centres", str(csv)])
  mask = np.asarray(Image.open(tmp_path / "crops" / "masks" / "g0001.png"))
  image = np.asarray(Image.open(tmp_path / "crops" / "images" / "g0001.png"))
  assert mask.shape == (10, 10) and (mask[:3] == 255).all()  # padded rows are background
  assert (image[:3] == 0).all()


def test_mnet_rgb_mask_coding():
  rgb = np.zeros((2, 2, 3), np.uint8)
  rgb[0, 0] = (255, 255, 0)  # disc and cup
  rgb[0, 1] = (255, 0, 0)    # disc only
  np.testing.assert_array_equal(refuge.label_map_from_mask(rgb), [[2, 1], [0, 0]])


def test_refuge_check_rejects_wrong_mask_coding(refuge_root, tmp_path):
  root = tmp_path / "bad"
  shutil.copytree(refuge_root, root)
  path = root / "Test400" / "T0001.jpg"
  path.unlink()
  bmp = root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / "V0001.bmp"
  Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (60, 1))).save(bmp)
  report = check.check_dataset(configs.get_data_config("refuge", str(root)))
  bad = {p.path: p.reason for p in report.problems}
  assert "not a REFUGE mask" in bad[str(bmp)]
  assert "mask without image" in bad[str(root / "REFUGE-Test-GT" / "Disc_Cup_Masks" /
                                         "T0001.bmp")]
