"""Tests for sdseg_jax.mask_io (reading/writing masks) and sdseg_jax.evaluate_folder."""

import json
import math
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
from PIL import Image
import pytest

from sdseg_jax import evaluate_folder as ef
from sdseg_jax import mask_io
from sdseg_jax import metrics


def _square(shape, top, left, side):
  mask = np.zeros(shape, bool)
  mask[top:top + side, left:left + side] = True
  return mask


# ----------------------------------------------------------------------------------------------
# mask_io: reading.


def test_read_png_jpg_rgb_and_special_codings(tmp_path):
  mask = _square((32, 32), 4, 6, 12)
  u8 = mask.astype(np.uint8) * 255
  Image.fromarray(u8).save(tmp_path / "a.png")
  Image.fromarray(u8).save(tmp_path / "a.jpg", quality=75)  # lossy: values near the edges blur
  red = np.zeros((32, 32, 3), np.uint8)
  red[..., 0] = u8
  Image.fromarray(red).save(tmp_path / "red.png")
  Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "zero_one.png")
  Image.fromarray((mask * 40000).astype(np.uint16)).save(tmp_path / "sixteen.png")
  Image.fromarray(np.where(mask, 0.9, 0.1).astype(np.float32)).save(tmp_path / "float.tif")
  pal = Image.fromarray(mask.astype(np.uint8), mode="L").convert("P")
  pal.save(tmp_path / "palette.png")
  for name in ["a.png", "a.jpg", "red.png", "zero_one.png", "sixteen.png", "float.tif",
               "palette.png"]:
    got = mask_io.read_mask(tmp_path / name)
    assert got.array.dtype == bool and got.array.shape == (32, 32), name
    np.testing.assert_array_equal(got.array, mask, err_msg=name)
    assert got.spacing is None and got.units == "pixels"


def test_half_range_threshold():
  assert mask_io.binarize_image(np.array([[127, 128]], np.uint8)).tolist() == [[False, True]]
  assert mask_io.binarize_image(np.array([[0.5, 0.51]])).tolist() == [[False, True]]
  assert mask_io.binarize_image(np.array([[32767, 32768]], np.uint16)).tolist() == [[False, True]]


def test_read_label_map(tmp_path):
  labels = np.zeros((10, 12), np.uint8)
  labels[2:4, 2:4] = 1
  labels[5:8, 5:9] = 3
  mask_io.write_label_png(tmp_path / "l.png", labels)
  got = mask_io.read_mask(tmp_path / "l.png", label_map=True)
  np.testing.assert_array_equal(got.array, labels)
  assert got.array.dtype == np.int64
  rgb = np.zeros((4, 4, 3), np.uint8)
  rgb[0, 0] = (255, 0, 0)
  Image.fromarray(rgb).save(tmp_path / "colour.png")
  with pytest.raises(mask_io.MaskReadError, match="colour.png"):
    mask_io.read_mask(tmp_path / "colour.png", label_map=True)


def test_read_errors_name_the_file(tmp_path):
  (tmp_path / "garbage.png").write_bytes(b"not an image at all")
  good = tmp_path / "good.png"
  Image.fromarray(np.full((64, 64), 255, np.uint8)).save(good)
  (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
  (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
  for name in ["garbage.png", "truncated.png", "bad.nii.gz", "missing.png"]:
    with pytest.raises(mask_io.MaskReadError, match=name.replace(".", r"\.")):
      mask_io.read_mask(tmp_path / name)
  with pytest.raises(mask_io.MaskReadError, match="unsupported"):
    mask_io.read_mask(tmp_path / "notes.txt")


def test_nifti_roundtrip_keeps_geometry(tmp_path):
  labels = np.zeros((6, 7, 5), np.int16)
  labels[1:4, 2:5, 1:3] = 2
  affine = np.diag([0.8, 0.7, 2.5, 1.0])
  affine[:3, 3] = (10.0, -5.0, 3.0)
  image = nib.Nifti1Image(labels, affine)
  image.header.set_xyzt_units("mm")
  nib.save(image, str(tmp_path / "gt.nii.gz"))
  got = mask_io.read_mask(tmp_path / "gt.nii.gz")
  assert got.array.shape == (6, 7, 5) and got.array.dtype == bool
  assert got.spacing == pytest.approx((0.8, 0.7, 2.5)) and got.units == "mm"
  lab = mask_io.read_mask(tmp_path / "gt.nii.gz", label_map=True)
  np.testing.assert_array_equal(lab.array, labels)
  mask_io.write_nifti(tmp_path / "pred.nii.gz", got.array, reference=tmp_path / "gt.nii.gz")
  back = nib.load(str(tmp_path / "pred.nii.gz"))
  np.testing.assert_allclose(back.affine, affine)
  assert back.header.get_zooms() == pytest.approx((0.8, 0.7, 2.5))
  assert back.header.get_xyzt_units()[0] == "mm"
  np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels > 0)
  mask_io.write_nifti(tmp_path / "p2.nii", got.array, reference=got)
  np.testing.assert_allclose(nib.load(str(tmp_path / "p2.nii")).affine, affine)


def test_write_png_mask_and_probability(tmp_path):
  mask = _square((8, 8), 1, 1, 3)
  mask_io.write_mask_png(tmp_path / "sub" / "m.png", mask)
  stored = np.array(Image.open(tmp_path / "sub" / "m.png"))
  assert stored.dtype == np.uint8 and set(np.unique(stored)) == {0, 255}
  probs = np.array([[0.0, 0.5], [1.0, 1.7]])
  mask_io.write_probability_png(tmp_path / "p.png", probs)
  assert np.array(Image.open(tmp_path / "p.png")).tolist() == [[0, 128], [255, 255]]
  mask_io.write_probability_png(tmp_path / "p_rgb.png", probs, rgb=True)
  assert np.array(Image.open(tmp_path / "p_rgb.png")).shape == (2, 2, 3)


def test_split_suffix():
  assert mask_io.split_suffix("dir/case.01.nii.gz") == ("case.01", ".nii.gz")
  assert mask_io.split_suffix("x.PNG") == ("x", ".png")


# ----------------------------------------------------------------------------------------------
# evaluate_folder.


def _make_2d_folders(tmp_path):
  pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
  pred_dir.mkdir(parents=True)
  gt_dir.mkdir(parents=True)
  cases = {
      "c1": (_square((40, 40), 5, 5, 10), _square((40, 40), 5, 7, 10)),
      "c2": (_square((40, 40), 10, 10, 20), _square((40, 40), 10, 10, 20)),
      "c3": (np.zeros((40, 40), bool), _square((40, 40), 1, 1, 4)),  # missed object
      "c4": (_square((40, 40), 1, 1, 4), np.zeros((40, 40), bool)),  # false positive, empty GT
  }
  for name, (pred, gt) in cases.items():
    mask_io.write_mask_png(pred_dir / f"{name}.png", pred)
    Image.fromarray(gt.astype(np.uint8) * 255).save(gt_dir / f"{name}.bmp")
  (pred_dir / "readme.txt").write_text("ignored")
  return pred_dir, gt_dir, cases


def test_evaluate_folder_values_and_json(tmp_path):
  pred_dir, gt_dir, cases = _make_2d_folders(tmp_path)
  out_json = tmp_path / "out" / "scores.json"
  rc = ef.main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--json", str(out_json)])
  assert rc == 0
  data = json.loads(out_json.read_text())
  assert set(data["cases"]) == set(cases)
  for name, (pred, gt) in cases.items():
    want = metrics.case_metrics(pred, gt)
    got = data["cases"][name]
    assert set(got) == {"dice", "iou", "hd95", "assd"}
    for key in ("dice", "iou"):
      assert got[key] == pytest.approx(want[key]) and 0.0 <= got[key] <= 1.0
    for key in ("hd95", "assd"):
      if math.isnan(want[key]):
        assert got[key] is None
      else:
        assert got[key] == pytest.approx(want[key])
  assert data["cases"]["c3"]["dice"] == 0.0 and data["cases"]["c4"]["dice"] == 1.0  # official
  assert data["empty_masks"] == {"c3": "pred", "c4": "gt"}
  assert data["mean"]["dice"] == pytest.approx(np.mean([data["cases"][n]["dice"] for n in cases]))
  assert data["mean"]["hd95"] == pytest.approx(
      np.mean([data["cases"][n]["hd95"] for n in ("c1", "c2")]))
  assert data["count"]["hd95"] == 2 and data["n_cases"] == 4
  assert data["distance_units"] == "pixels" and data["convention"] == "official"


def test_evaluate_folder_other_convention(tmp_path):
  pred_dir, gt_dir, _ = _make_2d_folders(tmp_path)
  result = ef.evaluate_folder(pred_dir, gt_dir, empty_convention="both_empty_is_one")
  assert result["cases"]["c4"]["dice"] == 0.0 and result["convention"] == "both_empty_is_one"


def test_missing_and_extra_predictions(tmp_path, capsys):
  pred_dir, gt_dir, _ = _make_2d_folders(tmp_path)
  (pred_dir / "c2.png").unlink()
  (pred_dir / "c3.png").unlink()
  with pytest.raises(ef.EvaluationError, match=r"2 of 4 .*c2\.bmp, c3\.bmp"):
    ef.evaluate_folder(pred_dir, gt_dir)
  assert ef.main(["--pred", str(pred_dir), "--gt", str(gt_dir)]) == 1
  assert "c2.bmp" in capsys.readouterr().err
  pred_dir2, gt_dir2, _ = _make_2d_folders(tmp_path / "second")
  mask_io.write_mask_png(pred_dir2 / "zz_extra.png", np.zeros((40, 40)))
  with pytest.warns(UserWarning, match="zz_extra"):
    result = ef.evaluate_folder(pred_dir2, gt_dir2)
  assert result["extra_predictions"] == ["zz_extra"]


def test_size_mismatch_names_both_files(tmp_path):
  pred_dir, gt_dir, _ = _make_2d_folders(tmp_path)
  mask_io.write_mask_png(pred_dir / "c1.png", np.zeros((40, 41)))
  with pytest.raises(ef.EvaluationError, match=r"c1\.png.*\(40, 41\).*c1\.bmp.*\(40, 40\)"):
    ef.evaluate_folder(pred_dir, gt_dir)


def test_duplicate_names_and_corrupt_file(tmp_path):
  pred_dir, gt_dir, _ = _make_2d_folders(tmp_path)
  mask_io.write_mask_png(pred_dir / "c1.jpg", np.zeros((40, 40)))
  with pytest.raises(ef.EvaluationError, match="c1.jpg"):
    ef.evaluate_folder(pred_dir, gt_dir)
  (pred_dir / "c1.jpg").unlink()
  (pred_dir / "c2.png").write_bytes(b"broken")
  assert ef.main(["--pred", str(pred_dir), "--gt", str(gt_dir)]) == 1


def test_nifti_folder_uses_header_spacing(tmp_path):
  pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
  pred_dir.mkdir()
  gt_dir.mkdir()
  gt = np.zeros((8, 8, 6), np.uint8)
  gt[2:5, 2:5, 1:3] = 1
  pred = np.zeros_like(gt)
  pred[2:5, 2:5, 2:4] = 1  # shifted one slice along axis 2 (2.5 mm)
  image = nib.Nifti1Image(gt, np.diag([0.5, 0.5, 2.5, 1.0]))
  image.header.set_xyzt_units("mm")
  nib.save(image, str(gt_dir / "vol1.nii.gz"))
  mask_io.write_nifti(pred_dir / "vol1.nii", pred, reference=gt_dir / "vol1.nii.gz")
  result = ef.evaluate_folder(pred_dir, gt_dir)
  assert result["distance_units"] == "mm"
  want = metrics.case_metrics(pred, gt, spacing=(0.5, 0.5, 2.5))
  assert result["cases"]["vol1"]["hd95"] == pytest.approx(want["hd95"])
  assert result["cases"]["vol1"]["hd95"] == pytest.approx(2.5)
  voxels = ef.evaluate_folder(pred_dir, gt_dir, use_spacing=False)
  assert voxels["cases"]["vol1"]["hd95"] == pytest.approx(1.0)
  assert voxels["distance_units"] == "pixels"


def test_evaluate_pairs_with_arrays():
  gt = _square((20, 20), 2, 2, 6)
  result = ef.evaluate_pairs([("a", gt, gt), ("b", np.zeros_like(gt), gt, (2.0, 2.0))])
  assert result["cases"]["a"]["dice"] == pytest.approx(1.0)
  assert math.isnan(result["cases"]["b"]["hd95"])
  assert result["distance_units"] == "mixed: pixels, spacing units"
  text = ef.format_table(result)
  assert "mean" in text and "n/a" in text


def test_cli_module_entry_point(tmp_path):
  pred_dir, gt_dir, _ = _make_2d_folders(tmp_path)
  proc = subprocess.run([sys.executable, "-m", "sdseg_jax.evaluate_folder", "--pred", str(pred_dir),
                         "--gt", str(gt_dir), "--json", str(tmp_path / "s.json")],
                        capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1],
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "mean" in proc.stdout and (tmp_path / "s.json").is_file()
  proc = subprocess.run([sys.executable, "-m", "sdseg_jax.evaluate_folder", "--pred",
                         str(tmp_path / "nope"), "--gt", str(gt_dir)], capture_output=True,
                        text=True, cwd=pathlib.Path(__file__).parents[1], timeout=120)
  assert proc.returncode == 1 and "nope" in proc.stderr
