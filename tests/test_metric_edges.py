"""Edge cases of surface_distance.py and metrics.py that the value tests of test_metrics.py miss.

Empty masks for every distance, bad spacings and modes (error messages included), the
directed-distance contract (empty -> a (0,) float64 array), and the official Dice/IoU
conventions at their boundaries. Found by mutation testing (TESTING.md); numpy-level, < 1 s.
"""

import math
import warnings

import numpy as np
import pytest

from sdseg_jax import metrics
from sdseg_jax import surface_distance as sd


def _square(shape, top, left, side):
  mask = np.zeros(shape, bool)
  mask[top:top + side, left:left + side] = True
  return mask


EMPTY = np.zeros((6, 6), bool)
MASK = _square((6, 6), 1, 1, 3)


@pytest.mark.parametrize("fn", [sd.hd95, sd.hausdorff, sd.asd, sd.assd])
@pytest.mark.parametrize("a,b", [(EMPTY, EMPTY), (EMPTY, MASK), (MASK, EMPTY)])
def test_every_distance_is_nan_when_a_mask_is_empty(fn, a, b):
  assert math.isnan(fn(a, b))


def test_hd95_assd_is_nan_pair_when_a_mask_is_empty():
  for a, b in [(EMPTY, EMPTY), (EMPTY, MASK), (MASK, EMPTY)]:
    hd, sd_ = sd.hd95_assd(a, b)
    assert math.isnan(hd) and math.isnan(sd_)


@pytest.mark.parametrize("a,b", [(EMPTY, EMPTY), (EMPTY, MASK), (MASK, EMPTY)])
def test_directed_distances_of_an_empty_side_are_an_empty_float64_array(a, b):
  out = sd.directed_surface_distances(a, b)
  assert out.shape == (0,) and out.dtype == np.float64


def test_directed_distances_are_float64_per_surface_voxel():
  out = sd.directed_surface_distances(MASK, _square((6, 6), 1, 2, 3))
  assert out.dtype == np.float64
  assert out.shape == (8,)  # the 3x3 square has 8 border pixels


def test_shape_mismatch_and_bad_spacing_are_errors_that_say_why():
  with pytest.raises(ValueError, match=r"shape mismatch: \(6, 6\) vs \(6, 7\)"):
    sd.directed_surface_distances(MASK, np.zeros((6, 7), bool))
  for bad in ((0.0, 1.0), (1.0, -2.0)):
    with pytest.raises(ValueError, match="spacing must be positive"):
      sd.hd95(MASK, MASK, spacing=bad)
  with pytest.raises(ValueError, match="assd_mode must be one of"):
    sd.assd(MASK, _square((6, 6), 2, 2, 3), assd_mode="median")


def test_integer_and_scalar_spacings_are_accepted():
  shifted = _square((6, 6), 1, 2, 3)
  assert sd.hd95(MASK, shifted, spacing=(2, 3)) == pytest.approx(3.0)
  assert sd.hd95(MASK, shifted, spacing=2) == pytest.approx(2.0)


# ---- metrics.py: Dice/IoU counts, case and per-class scores, aggregation --------------------


def test_official_formulas_keep_the_1e10_smoothing_term_exactly():
  # 2|P∩G| / (|P| + |G| + 1e-10) and |P∩G| / (|P∪G| + 1e-10), as slice2seg.py computes them
  assert metrics.dice_from_counts(1, 1, 1) == 2.0 / (2 + 1e-10)
  assert metrics.dice_from_counts(3, 4, 5) == 6.0 / (9 + 1e-10)
  assert metrics.iou_from_counts(1, 1, 1) == 1.0 / (1 + 1e-10)
  assert metrics.iou_from_counts(3, 4, 5) == 3.0 / (6 + 1e-10)
  assert metrics.dice_from_counts(3, 4, 5, "both_empty_is_one") == 6.0 / 9
  assert metrics.iou_from_counts(3, 4, 5, "both_empty_is_one") == 3.0 / 6
  assert metrics.iou_from_counts(0, 0, 0, "both_empty_is_one") == 1.0
  assert metrics.iou_from_counts(0, 3, 0, "both_empty_is_one") == 0.0
  assert metrics.dice_from_counts(0, 1, 1) == 0.0  # both non-empty, disjoint
  assert metrics.dice_from_counts(0, 0, 1) == 0.0 and metrics.dice_from_counts(0, 1, 0) == 1.0


def test_counts_binarise_and_reject_bad_input_with_the_reason():
  assert metrics.dice(np.array([0.5, 0, -1]), np.array([2, 0, 3])) == 2.0 / (3 + 1e-10) * 1
  with pytest.raises(ValueError, match=r"prediction shape \(3,\) != ground-truth shape \(4,\)"):
    metrics.iou(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match=r"empty_convention must be one of \('official', "
                                       r"'both_empty_is_one'\), got 'nope'"):
    metrics.iou(np.zeros(3), np.zeros(3), "nope")
  with pytest.raises(ValueError, match="empty_convention must be one of"):
    metrics.dice_from_counts(1, 1, 1, "nope")


def test_case_metrics_pass_spacing_convention_and_assd_mode_on():
  pred = _square((8, 8), 1, 1, 3)
  gt = _square((8, 8), 1, 1, 5)
  got = metrics.case_metrics(pred, gt, spacing=(2.0, 1.0), assd_mode="mean_of_directed")
  d_pg = sd.directed_surface_distances(pred, gt, (2.0, 1.0))
  d_gp = sd.directed_surface_distances(gt, pred, (2.0, 1.0))
  assert got["assd"] == pytest.approx((d_pg.mean() + d_gp.mean()) / 2)
  assert got["assd"] != pytest.approx(np.concatenate([d_pg, d_gp]).mean())
  assert got["hd95"] == pytest.approx(np.percentile(np.concatenate([d_pg, d_gp]), 95))
  assert got["dice"] == 18.0 / (34 + 1e-10) and got["iou"] == 9.0 / (25 + 1e-10)
  assert set(got) == {"dice", "iou", "hd95", "assd"}
  empty = np.zeros((8, 8), bool)
  both_empty = metrics.case_metrics(empty, empty, empty_convention="both_empty_is_one")
  assert both_empty["dice"] == 1.0 and both_empty["iou"] == 1.0
  assert math.isnan(both_empty["hd95"]) and math.isnan(both_empty["assd"])


def test_per_class_passes_its_arguments_to_the_metric():
  gt = np.array([[1, 1, 0, 2]], np.uint8)
  pred = np.array([[1, 0, 0, 3]], np.uint8)
  calls = []

  def metric_fn(p, g, spacing, empty_convention):
    calls.append((p.tolist(), g.tolist(), spacing, empty_convention))
    return {"n": float(p.sum())}

  out = metrics.per_class(pred, gt, 4.0, spacing=(2.0, 3.0),
                          empty_convention="both_empty_is_one", metric_fn=metric_fn)
  assert out == {1: {"n": 1.0}, 2: {"n": 0.0}, 3: {"n": 1.0}}
  assert calls[0] == ([[True, False, False, False]], [[True, True, False, False]], (2.0, 3.0),
                      "both_empty_is_one")
  assert calls[1][1] == [[False, False, False, True]]
  default = metrics.per_class(pred, gt, 3, empty_convention="both_empty_is_one")
  assert default[2]["dice"] == 0.0 and default[1]["iou"] == 0.5
  with pytest.raises(ValueError, match=r"label map shapes differ: \(1, 4\) vs \(1, 3\)"):
    metrics.per_class(pred, gt[:, :3], 3)


def test_summarize_keeps_first_seen_order_and_skips_missing_values():
  cases = {"a": {"dice": 1.0, "iou": None}, "b": {"iou": 0.5, "hd95": 3.0}, "c": {"dice": 0.0}}
  out = metrics.summarize(cases)
  assert list(out["mean"]) == ["dice", "iou", "hd95"]
  assert out["n_cases"] == {"dice": 2, "iou": 1, "hd95": 1}
  assert out["count"] == {"dice": 2, "iou": 1, "hd95": 1}
  assert out["mean"]["dice"] == 0.5 and out["std"]["dice"] == 0.5  # population std
  assert out["mean"]["iou"] == 0.5 and out["std"]["iou"] == 0.0
  assert set(out) == {"mean", "std", "count", "n_cases"}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "mean of empty slice" noise for a never-defined metric
    nan_only = metrics.summarize({"x": {"hd95": float("nan")}, "y": {"hd95": float("inf")}})
  assert math.isnan(nan_only["mean"]["hd95"])
  assert math.isnan(nan_only["std"]["hd95"]) and nan_only["count"]["hd95"] == 0
  assert nan_only["n_cases"]["hd95"] == 2
  assert metrics.surface is sd.surface
