"""data/transforms.py element by element, against hand-written arrays and Pillow itself.

test_data_pipeline.py runs the transforms inside grain loaders on the shared Kvasir data; here
each rule is pinned with numbers (value maps, resize methods, flip axes, the flip coins, the
multi-class target), numpy-only and well under a second, so this file is also the
mutation-testing subset of transforms.py.
"""

import numpy as np
from PIL import Image
import pytest

from sdseg_jax.data import transforms

LABELS = np.array([[0, 1, 2], [2, 0, 1]], np.uint8)


def test_binary_target_rules():
  np.testing.assert_array_equal(transforms.binary_target(LABELS, "foreground"),
                                [[0, 1, 1], [1, 0, 1]])
  np.testing.assert_array_equal(transforms.binary_target(LABELS, "multiclass"),
                                [[0, 1, 1], [1, 0, 1]])
  np.testing.assert_array_equal(transforms.binary_target(LABELS, "cup"), [[0, 0, 1], [1, 0, 0]])
  np.testing.assert_array_equal(transforms.binary_target(LABELS, "disc"), [[0, 1, 1], [1, 0, 1]])
  for target in ("foreground", "cup", "disc"):
    assert transforms.binary_target(LABELS, target).dtype == np.uint8
  with pytest.raises(ValueError, match=r"unknown target 'rim'; expected one of \('foreground', "
                                       r"'cup', 'disc', 'multiclass'\)"):
    transforms.binary_target(LABELS, "rim")


def _uint8_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("interpolation,method", [
    ("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR),
    ("nearest", Image.Resampling.NEAREST)])
def test_resize_image_is_pillow_with_the_named_method(interpolation, method):
  image = _uint8_image(9, 7)
  got = transforms.resize_image(image, 4, interpolation)
  want = np.asarray(Image.fromarray(image).resize((4, 4), method))
  assert got.dtype == np.uint8 and got.shape == (4, 4, 3)
  np.testing.assert_array_equal(got, want)
  floats = image.astype(np.float32) / 255.0
  got = transforms.resize_image(floats, 4, interpolation)
  want = np.stack([np.asarray(Image.fromarray(floats[..., c], mode="F").resize((4, 4), method))
                   for c in range(3)], axis=-1)
  assert got.shape == (4, 4, 3)
  np.testing.assert_allclose(got, np.clip(want, 0.0, 1.0), atol=1e-6)


def test_float_resize_is_clipped_to_the_unit_range():
  image = np.zeros((8, 8, 3), np.float32)
  image[:, :4] = 1.0  # bicubic overshoots on both sides of a step: -0.046 and 1.046
  got = transforms.resize_image(image, 5, "bicubic")
  assert got.min() == 0.0 and got.max() == 1.0
  assert got[:, 1].min() == 1.0 and got[:, 3].max() == 0.0


def test_resize_is_a_no_op_at_the_target_size():
  image = _uint8_image(4, 4)
  assert transforms.resize_image(image, 4, "bicubic") is image
  assert transforms.resize_mask(LABELS[:, :2], 2) is not None
  square = np.zeros((3, 3), np.uint8)
  assert transforms.resize_mask(square, 3) is square


def test_resize_mask_is_nearest_neighbour():
  mask = np.array([[0, 1], [2, 3]], np.uint8)
  np.testing.assert_array_equal(transforms.resize_mask(mask, 4),
                                [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
  step = np.zeros((4, 4), np.uint8)
  step[:, :2] = 9  # Pillow's default (bicubic) would invent a label 5 at the edge
  resized = transforms.resize_mask(step, 7)
  assert set(np.unique(resized)) == {0, 9}
  np.testing.assert_array_equal(resized, np.asarray(
      Image.fromarray(step).resize((7, 7), Image.Resampling.NEAREST)))


def test_image_to_model_value_maps_and_channels():
  u8 = np.array([[[0, 255, 51]]], np.uint8)
  np.testing.assert_allclose(transforms.image_to_model(u8), [[[-1.0, 1.0, 51 / 127.5 - 1.0]]],
                             rtol=1e-6)
  f = np.array([[[0.0, 1.0, 0.25]]], np.float32)
  np.testing.assert_allclose(transforms.image_to_model(f), [[[-1.0, 1.0, -0.5]]])
  gray = np.array([[0, 255]], np.uint8)
  out = transforms.image_to_model(gray)
  assert out.shape == (1, 2, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[0, 1], [1.0, 1.0, 1.0])
  single = np.array([[[0.5]]], np.float64)
  out = transforms.image_to_model(single)
  assert out.shape == (1, 1, 3) and out.dtype == np.float32 and (out == 0.0).all()


def test_target_to_model():
  out = transforms.target_to_model(np.array([[0, 1], [3, 0]], np.uint8))
  assert out.shape == (2, 2, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[..., 0], [[-1, 1], [1, -1]])
  np.testing.assert_array_equal(out[..., 2], out[..., 0])


def _record(size=6):
  image = _uint8_image(size, size, seed=1)
  mask = np.zeros((size, size), np.uint8)
  mask[1:3, 2:5] = 2
  mask[4, 0] = 1
  return {"image": image, "mask": mask, "name": "a_001", "case": "a", "slice": 1}


def test_preprocess_train_element():
  record = _record()
  out = transforms.Preprocess(6, target="cup").map(record)
  assert set(out) == {"image", "mask"}
  np.testing.assert_allclose(out["image"], record["image"] / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(out["mask"][..., 1], np.where(record["mask"] == 2, 1.0, -1.0))
  labelled = transforms.Preprocess(6, keep_label=True).map(record)
  assert set(labelled) == {"image", "mask", "label"}
  assert labelled["label"].dtype == np.uint8
  np.testing.assert_array_equal(labelled["label"], record["mask"])
  np.testing.assert_array_equal(labelled["mask"][..., 0], np.where(record["mask"] > 0, 1.0, -1.0))


def test_preprocess_resizes_with_the_configured_method():
  record = _record(8)
  out = transforms.Preprocess(4, interpolation="bilinear").map(record)
  want = np.asarray(Image.fromarray(record["image"]).resize((4, 4), Image.Resampling.BILINEAR))
  np.testing.assert_allclose(out["image"], want / 127.5 - 1.0, atol=1e-6)
  default = transforms.Preprocess(4).map(record)
  want = np.asarray(Image.fromarray(record["image"]).resize((4, 4), Image.Resampling.BICUBIC))
  np.testing.assert_allclose(default["image"], want / 127.5 - 1.0, atol=1e-6)
  assert out["mask"].shape == (4, 4, 3)


def test_preprocess_eval_element():
  record = _record()
  out = transforms.Preprocess(6, target="disc", train=False).map(record)
  assert set(out) == {"image", "label", "name", "case", "slice"}
  np.testing.assert_array_equal(out["label"], (record["mask"] >= 1).astype(np.uint8))
  assert out["label"].dtype == np.uint8
  assert out["name"] == "a_001" and out["case"] == "a"
  assert out["slice"] == 1 and out["slice"].dtype == np.int32
  multi = transforms.Preprocess(6, target="multiclass", train=False).map(record)
  np.testing.assert_array_equal(multi["label"], record["mask"])


def test_preprocess_rejects_unknown_settings():
  with pytest.raises(ValueError, match="unknown interpolation 'lanczos'"):
    transforms.Preprocess(8, interpolation="lanczos")
  with pytest.raises(ValueError, match=r"unknown target 'rim'; expected one of"):
    transforms.Preprocess(8, target="rim")
  p = transforms.Preprocess("8")
  assert p.image_size == 8 and p.interpolation == "bicubic" and p.target == "foreground"
  assert p.train is True and p.keep_label is False


def test_flip_axes_and_keys():
  x = np.arange(6).reshape(2, 3)
  element = {"image": x, "mask": x + 10, "label": x + 20, "name": "n"}
  h = transforms.flip(element, True, False)
  np.testing.assert_array_equal(h["image"], [[2, 1, 0], [5, 4, 3]])
  np.testing.assert_array_equal(h["label"], [[22, 21, 20], [25, 24, 23]])
  v = transforms.flip(element, False, True)
  np.testing.assert_array_equal(v["mask"], [[13, 14, 15], [10, 11, 12]])
  both = transforms.flip(element, True, True)
  np.testing.assert_array_equal(both["image"], [[5, 4, 3], [2, 1, 0]])
  assert h["image"].flags["C_CONTIGUOUS"] and both["mask"].flags["C_CONTIGUOUS"]
  assert h["name"] == "n" and element["image"] is x  # the input element is not modified
  none = transforms.flip({"image": x}, False, False)
  np.testing.assert_array_equal(none["image"], x)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("p,vertical", [(0.5, True), (0.5, False), (0.3, True)])
def test_random_flips_draw_two_coins_below_p(seed, p, vertical):
  x = np.arange(6).reshape(2, 3)
  got = transforms.RandomFlips(p, vertical).random_map({"image": x},
                                                       np.random.default_rng(seed))
  h, v = np.random.default_rng(seed).random(2) < p
  want = x[:, ::-1] if h else x
  want = want[::-1] if (v and vertical) else want
  np.testing.assert_array_equal(got["image"], want)


def test_random_flips_defaults_and_extremes():
  x = np.arange(6).reshape(2, 3)
  flips = transforms.RandomFlips()
  assert flips.p == 0.5 and flips.vertical is True
  always = transforms.RandomFlips(1.0).random_map({"image": x}, np.random.default_rng(0))
  np.testing.assert_array_equal(always["image"], x[::-1, ::-1])
  never = transforms.RandomFlips(0.0).random_map({"image": x}, np.random.default_rng(0))
  np.testing.assert_array_equal(never["image"], x)


def test_class_target_replaces_the_label_by_one_class_mask():
  label = np.array([[0, 2], [2, 0]], np.uint8)
  element = {"image": np.zeros((2, 2, 3), np.float32), "label": label}
  seen = set()
  for seed in range(20):
    out = transforms.ClassTarget(3).random_map(element, np.random.default_rng(seed))
    assert set(out) == {"image", "mask", "class_id"} and "label" in element
    assert out["class_id"].dtype == np.int32
    k = int(out["class_id"])
    seen.add(k)
    want = (label != 0) if k == 0 else (label == k)
    np.testing.assert_array_equal(out["mask"][..., 0], np.where(want, 1.0, -1.0))
  assert seen == {0, 2}
  with pytest.raises(ValueError, match="label value 2 >= model.unet.num_classes=2"):
    transforms.ClassTarget("2").random_map(element, np.random.default_rng(0))
