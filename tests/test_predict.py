"""`python -m sdseg_jax.predict`: sizes, NIfTI geometry, TTA, batching and errors."""

import json

import nibabel as nib
import numpy as np
from PIL import Image
import pytest
import tifffile

from sdseg_jax import predict
from sdseg_jax import restore
from sdseg_jax.data import synthetic
from tests import trained_run


@pytest.fixture(scope="module")
def run():
  return restore.load_run(trained_run.workdir(), "last")


def _image(index, height, width):
  record = synthetic.generate(0, "test", index, 48)
  return np.asarray(Image.fromarray(record["image"]).resize((width, height)))


def _affine():
  rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  affine = np.eye(4)
  affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.5])
  affine[:3, 3] = [12.5, -30.0, 7.0]
  return affine


def test_folder_of_images_and_a_volume(run, tmp_path, capsys):
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.fromarray(_image(0, 40, 56)).save(inputs / "wide.png")
  Image.fromarray(_image(1, 33, 33)[..., 0]).save(inputs / "grey.png")
  Image.fromarray(_image(2, 50, 30)).save(inputs / "photo.jpg", quality=95)
  tifffile.imwrite(inputs / "scan.tif", _image(3, 27, 45))
  (inputs / "notes.txt").write_text("ignored")
  volume = np.random.default_rng(0).normal(0, 50, (20, 24, 5)).astype(np.int16)
  nii = nib.Nifti1Image(volume, _affine())
  nii.header.set_xyzt_units("mm")
  nib.save(nii, str(inputs / "ct.nii.gz"))

  out = tmp_path / "out"
  assert predict.main(["--workdir", str(run.workdir), "--checkpoint", "last", "--input",
                       str(inputs), "--output", str(out), "--batch-size", "3",
                       "--no-progress"]) == 0
  assert "wrote 5 predictions" in capsys.readouterr().out
  for name, size in (("wide", (56, 40)), ("grey", (33, 33)), ("photo", (30, 50)),
                     ("scan", (45, 27))):
    for folder in ("masks", "probabilities", "overlays"):
      with Image.open(out / folder / f"{name}.png") as im:
        assert im.size == size, (folder, name)  # the ORIGINAL size (width, height)
    mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
    assert set(np.unique(mask)) <= {0, 255}
    prob = np.asarray(Image.open(out / "probabilities" / f"{name}.png"))
    # Thresholded at 0.5 on the upsampled probability (p*255 rounded, so allow the boundary).
    assert np.all((prob >= 128) | (mask == 0)) and np.all((prob <= 128) | (mask == 255))

  mask_nii = nib.load(str(out / "masks" / "ct.nii.gz"))
  prob_nii = nib.load(str(out / "probabilities" / "ct.nii.gz"))
  for written in (mask_nii, prob_nii):
    assert written.shape == volume.shape
    np.testing.assert_allclose(written.affine, _affine(), atol=1e-5)
    np.testing.assert_allclose(written.header.get_zooms(), (0.7, 0.8, 2.5), rtol=1e-6)
    assert written.header.get_xyzt_units()[0] == "mm"
  assert mask_nii.get_data_dtype() == np.uint8
  assert set(np.unique(np.asarray(mask_nii.dataobj))) <= {0, 1}
  probs = np.asarray(prob_nii.dataobj)
  assert probs.dtype == np.float32 and probs.min() >= 0 and probs.max() <= 1
  np.testing.assert_array_equal(np.asarray(mask_nii.dataobj), (probs > 0.5).astype(np.uint8))

  manifest = json.loads((out / "predictions.json").read_text())
  assert manifest["checkpoint"] == "last" and manifest["step"] == 4
  assert [o["kind"] for o in manifest["outputs"]].count("volume") == 1
  assert len(manifest["outputs"]) == 5


def test_written_outputs_equal_the_in_process_predictor(run, tmp_path):
  """The files are the model's predictions, recomputed here without the CLI's own I/O path.

  Preprocessing (Pillow bilinear resize, /127.5 - 1) and upsampling are written out in this test;
  only the model call goes through `predict.Predictor`.
  """
  inputs = tmp_path / "in"
  inputs.mkdir()
  originals = {"wide": _image(0, 40, 56), "tall": _image(5, 50, 30)}
  for name, image in originals.items():
    Image.fromarray(image).save(inputs / f"{name}.png")
  out = tmp_path / "out"
  assert predict.main(["--workdir", str(run.workdir), "--checkpoint", "last", "--input",
                       str(inputs), "--output", str(out), "--no-progress"]) == 0
  size = run.model.image_size
  model_in = np.stack([np.asarray(Image.fromarray(image).resize(
      (size, size), Image.Resampling.BILINEAR), np.float32) / 127.5 - 1.0
                       for image in originals.values()])
  probs = predict.Predictor(run, batch_size=8)(model_in)
  for (name, image), p in zip(originals.items(), probs):
    h, w = image.shape[:2]
    want = np.clip(np.asarray(Image.fromarray(np.ascontiguousarray(p[..., 0])).resize(
        (w, h), Image.Resampling.BILINEAR)), 0.0, 1.0)
    assert want.std() > 1e-3, name  # a constant map could not tell right from wrong here
    got = np.asarray(Image.open(out / "probabilities" / f"{name}.png"), np.float32) / 255.0
    np.testing.assert_allclose(got, want, atol=1.01 / 255, err_msg=name)
    mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
    decided = np.abs(want - 0.5) > 1e-3
    np.testing.assert_array_equal((mask[decided] == 255), want[decided] > 0.5, err_msg=name)
    tinted = np.any(np.asarray(Image.open(out / "overlays" / f"{name}.png")) != image, axis=-1)
    np.testing.assert_array_equal(tinted, mask == 255, err_msg=name)


def test_volume_windowing_follows_the_run_dataset():
  config = trained_run.tiny_config()
  data = np.array([[[-500.0, 0.0, 275.0, 1000.0]]])
  with config.data.unlocked():
    config.data.name = "btcv"
    config.data.hu_min, config.data.hu_max = -125.0, 275.0
  window = predict.volume_window(config.data)
  np.testing.assert_allclose(predict.window_slices(data, window)[:, 0, 0],
                             [0.0, 125 / 400, 1.0, 1.0])
  with config.data.unlocked():
    config.data.name = "synthetic"
  np.testing.assert_allclose(
      predict.window_slices(data, predict.volume_window(config.data))[:, 0, 0],
      [0.0, 500 / 1500, 775 / 1500, 1.0])


def test_flip_tta_undoes_the_flips(run):
  size = run.model.image_size
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
  plain = predict.Predictor(run, batch_size=8)
  tta = predict.Predictor(run, batch_size=8, tta="flip")
  got = tta(images)
  assert got.shape == (3, size, size, 1)
  identity = plain(images)
  h_view, v_view = plain(images[:, :, ::-1]), plain(images[:, ::-1])
  # The check has teeth only if the views' maps are not themselves symmetric (then undoing a
  # flip on the wrong axis, or not at all, would change the average).
  assert np.abs(h_view - h_view[:, :, ::-1]).max() > 1e-4
  assert np.abs(v_view - v_view[:, ::-1]).max() > 1e-4
  expected = (identity + h_view[:, :, ::-1] + v_view[:, ::-1]) / 3
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert got.min() >= 0.0 and got.max() <= 1.0


def test_prediction_does_not_depend_on_the_batch(run):
  size = run.model.image_size
  images = np.random.default_rng(2).uniform(-1, 1, (5, size, size, 3)).astype(np.float32)
  predictor = predict.Predictor(run, batch_size=8)
  together = predictor(images)
  alone = predictor(images[3:4])
  np.testing.assert_allclose(alone[0], together[3], atol=1e-5)


def test_upsample_is_bilinear_to_the_original_size():
  probs = np.zeros((4, 4, 1), np.float32)
  probs[:, 2:] = 1.0
  up = predict.upsample(probs, (8, 10))
  assert up.shape == (8, 10, 1)
  assert up[0, 0, 0] == 0.0 and up[0, -1, 0] == 1.0
  assert 0.0 < up[0, 5, 0] < 1.0  # interpolated edge, not a nearest-neighbour step
  assert predict.upsample(probs, (4, 4)).shape == (4, 4, 1)


def test_unreadable_input_is_named(run, tmp_path, capsys):
  inputs = tmp_path / "in"
  inputs.mkdir()
  Image.fromarray(_image(0, 32, 32)).save(inputs / "a.png")
  (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  assert predict.main(["--workdir", str(run.workdir), "--checkpoint", "last", "--input",
                       str(inputs), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "broken.png" in err and "cannot read image" in err


def test_input_errors(tmp_path):
  with pytest.raises(predict.PredictError, match="no such file"):
    predict.list_inputs(tmp_path / "missing")
  with pytest.raises(predict.PredictError, match="no PNG/JPG"):
    predict.list_inputs(tmp_path)
  (tmp_path / "x.png").write_bytes(b"")
  (tmp_path / "x.jpg").write_bytes(b"")
  with pytest.raises(predict.PredictError, match="same outputs"):
    predict.list_inputs(tmp_path)
  (tmp_path / "doc.pdf").write_bytes(b"")
  with pytest.raises(predict.PredictError, match="unsupported file type"):
    predict.list_inputs(tmp_path / "doc.pdf")
  (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
  with pytest.raises(predict.PredictError, match="bad.nii.gz"):
    predict.read_volume(tmp_path / "bad.nii.gz")
