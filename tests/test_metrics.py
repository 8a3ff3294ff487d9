"""Tests for sdseg_jax.metrics / surface_distance against hand answers and brute force."""

import itertools
import math

import numpy as np
import pytest

from sdseg_jax import metrics
from sdseg_jax import surface_distance as sd

# ----------------------------------------------------------------------------------------------
# Independent references (deliberately not using scipy.ndimage).


def _brute_surface(mask: np.ndarray) -> np.ndarray:
  """Foreground voxels with at least one face neighbour that is background or outside the array."""
  mask = np.asarray(mask, bool)
  padded = np.pad(mask, 1, constant_values=False)
  interior = np.ones_like(mask)
  for axis in range(mask.ndim):
    for step in (-1, 1):
      shifted = np.roll(padded, step, axis=axis)
      interior &= shifted[tuple(slice(1, -1) for _ in range(mask.ndim))]
  return mask & ~interior


def _brute_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
  """Explicit pairwise point distances between surface voxel sets, minimum over b."""
  spacing = np.ones(a.ndim) if spacing is None else np.asarray(spacing, float)
  pa = np.argwhere(_brute_surface(a)) * spacing
  pb = np.argwhere(_brute_surface(b)) * spacing
  return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def _brute_hd95_assd(a, b, spacing=None):
  """Returns (hd95, pooled assd, asd a->b, hausdorff, mean-of-directed assd)."""
  d_ab, d_ba = _brute_directed(a, b, spacing), _brute_directed(b, a, spacing)
  pooled = (d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size)
  return (np.percentile(np.concatenate([d_ab, d_ba]), 95), pooled, d_ab.mean(),
          max(d_ab.max(), d_ba.max()), (d_ab.mean() + d_ba.mean()) / 2)


def _square(shape, top, left, side):
  mask = np.zeros(shape, bool)
  mask[top:top + side, left:left + side] = True
  return mask


# ----------------------------------------------------------------------------------------------
# Dice / IoU.


@pytest.mark.parametrize(
    "p_count,g_count,overlap,convention,want_dice,want_iou",
    [
        (0, 0, 0, "official", 0.0, 0.0),
        (5, 0, 0, "official", 1.0, 0.0),
        (0, 5, 0, "official", 0.0, 0.0),
        (0, 0, 0, "both_empty_is_one", 1.0, 1.0),
        (5, 0, 0, "both_empty_is_one", 0.0, 0.0),
        (0, 5, 0, "both_empty_is_one", 0.0, 0.0),
    ])
def test_dice_iou_empty_conventions(p_count, g_count, overlap, convention, want_dice, want_iou):
  pred = np.zeros(20, np.uint8)
  gt = np.zeros(20, np.uint8)
  pred[:p_count] = 255
  gt[10:10 + g_count] = 1
  assert metrics.dice(pred, gt, convention) == want_dice
  assert metrics.iou(pred, gt, convention) == want_iou


def test_dice_iou_overlap_values_and_binarisation():
  pred = np.zeros((8, 8))
  gt = np.zeros((8, 8))
  pred[0:4, 0:4] = 0.3  # any value > 0 counts as foreground, as in the official code
  gt[2:6, 0:4] = 7
  # |P| = |G| = 16, |P∩G| = 8, |P∪G| = 24.
  assert metrics.dice(pred, gt) == pytest.approx(16 / 32, abs=1e-9)
  assert metrics.iou(pred, gt) == pytest.approx(8 / 24, abs=1e-9)
  assert metrics.dice(pred, gt, "both_empty_is_one") == pytest.approx(0.5)
  assert metrics.iou(pred, -gt) == 0.0  # negative values are background


def test_dice_rejects_bad_input():
  with pytest.raises(ValueError, match="shape"):
    metrics.dice(np.zeros((3, 3)), np.zeros((3, 4)))
  with pytest.raises(ValueError, match="empty_convention"):
    metrics.dice(np.zeros(3), np.zeros(3), "nope")


# ----------------------------------------------------------------------------------------------
# Surfaces and distances: hand-made cases.


def test_surface_definition():
  cube = np.zeros((5, 5, 5), bool)
  cube[1:4, 1:4, 1:4] = True
  surf = sd.surface(cube)
  assert surf.sum() == 26 and not surf[2, 2, 2]  # face-connected erosion keeps only the centre
  full = np.ones((4, 5), bool)
  assert sd.surface(full).sum() == 4 * 5 - 2 * 3  # array border counts as background
  np.testing.assert_array_equal(sd.surface(cube), _brute_surface(cube))


def test_identical_masks_have_zero_distance():
  mask = _square((20, 20), 4, 5, 8)
  assert metrics.hd95(mask, mask) == 0.0
  assert metrics.assd(mask, mask) == 0.0


def test_single_pixels():
  a = np.zeros((10, 10), bool)
  b = np.zeros((10, 10), bool)
  a[1, 1] = True
  b[4, 5] = True
  assert metrics.hd95(a, b) == pytest.approx(5.0)
  assert metrics.assd(a, b) == pytest.approx(5.0)
  assert metrics.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(math.sqrt(36 + 16))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_square_shifted_by_k(k):
  a = _square((30, 40), 5, 5, 12)
  b = _square((30, 40), 5, 5 + k, 12)
  assert metrics.hausdorff(a, b) == pytest.approx(k)
  # Every point of a's left column (rows 1..10) is exactly k away from b's left column.
  d_ab = sd.directed_surface_distances(a, b)
  assert np.sum(np.isclose(d_ab, k)) >= 12 - 2
  want = _brute_hd95_assd(a, b)
  assert metrics.hd95(a, b) == pytest.approx(want[0])
  assert metrics.assd(a, b) == pytest.approx(want[1])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_grown_square(k):
  inner = _square((40, 40), 10, 10, 10)
  outer = _square((40, 40), 10 - k, 10 - k, 10 + 2 * k)
  # Every surface point of the inner square is exactly k from the outer border (straight out).
  assert metrics.asd(inner, outer) == pytest.approx(k)
  assert metrics.asd(outer, inner) > k  # the outer corners are farther than k
  # The farthest point: the outer corner, diagonal to the inner corner.
  assert metrics.hausdorff(inner, outer) == pytest.approx(math.sqrt(2) * k)


def test_rings():
  # A one-pixel-wide ring is all surface, and equals the surface of the filled square: the
  # distances are 0 although the overlap is poor, which is what "surface distance" means.
  filled = _square((30, 30), 5, 5, 20)
  thin_ring = filled & ~_square((30, 30), 6, 6, 18)
  assert metrics.hd95(thin_ring, filled) == 0.0
  assert metrics.assd(thin_ring, filled) == 0.0
  assert metrics.dice(thin_ring, filled) < 0.4
  # A 3-wide ring adds an inner border 2 px inside the outer border.
  thick_ring = filled & ~_square((30, 30), 8, 8, 14)
  # Inner border: the ring pixels 4-adjacent to the hole, i.e. a 16-side square outline without
  # its 4 corners (a corner's face neighbours are all ring pixels).
  n_outer, n_inner = 4 * 20 - 4, 4 * 16 - 4 - 4
  assert metrics.asd(thick_ring, filled) == pytest.approx(2 * n_inner / (n_outer + n_inner))
  assert metrics.asd(filled, thick_ring) == 0.0
  # Pooled: (2 n_inner + 0) / (n_outer + n_inner + n_outer); mean of directed: asd/2.
  assert metrics.assd(thick_ring, filled) == pytest.approx(2 * n_inner / (2 * n_outer + n_inner))
  assert metrics.assd(thick_ring, filled, assd_mode="mean_of_directed") == pytest.approx(
      n_inner / (n_outer + n_inner))
  assert metrics.hd95(thick_ring, filled) == pytest.approx(2.0)


def test_anisotropic_3d():
  a = np.zeros((6, 8, 8), bool)
  b = np.zeros((6, 8, 8), bool)
  a[1:3, 2:6, 2:6] = True
  b[2:4, 2:6, 2:6] = True  # shifted by one slice along axis 0
  assert metrics.hausdorff(a, b) == pytest.approx(1.0)
  assert metrics.hausdorff(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(3.0)
  assert metrics.hausdorff(a, b, spacing=(3.0, 0.5, 0.5)) == pytest.approx(3.0)
  p = np.zeros((5, 5, 5), bool)
  q = np.zeros((5, 5, 5), bool)
  p[0, 0, 0] = True
  q[2, 3, 0] = True
  assert metrics.hd95(p, q, spacing=(2.5, 1, 1)) == pytest.approx(math.sqrt(25 + 9))
  assert metrics.assd(p, q, spacing=(2.5, 1, 1)) == pytest.approx(math.sqrt(25 + 9))


def test_empty_masks_give_nan_and_status():
  empty = np.zeros((6, 6), bool)
  mask = _square((6, 6), 1, 1, 3)
  for a, b, status in [(empty, empty, "both"), (empty, mask, "pred"), (mask, empty, "gt")]:
    assert math.isnan(metrics.hd95(a, b)) and math.isnan(metrics.assd(a, b))
    assert metrics.empty_status(a, b) == status
  assert metrics.empty_status(mask, mask) is None


def test_case_metrics_and_per_class():
  gt = np.zeros((16, 16), np.uint8)
  pred = np.zeros((16, 16), np.uint8)
  gt[2:6, 2:6] = 1
  pred[2:6, 2:6] = 1
  gt[8:12, 8:12] = 2
  pred[9:13, 8:12] = 2
  out = metrics.per_class(pred, gt, num_classes=4)
  assert sorted(out) == [1, 2, 3]
  assert out[1] == {"dice": pytest.approx(1.0), "iou": pytest.approx(1.0), "hd95": 0.0, "assd": 0.0}
  assert out[2]["dice"] == pytest.approx(2 * 12 / 32)
  assert out[2]["hd95"] == pytest.approx(1.0)
  assert out[3]["dice"] == 0.0 and math.isnan(out[3]["hd95"])  # class absent in both


# ----------------------------------------------------------------------------------------------
# Brute-force agreement on random masks (2D and anisotropic 3D).


@pytest.mark.parametrize("seed,shape,spacing", [
    (0, (12, 12), None), (1, (15, 9), None), (2, (10, 13), (0.7, 1.9)),
    (3, (6, 7, 5), None), (4, (6, 7, 5), (2.5, 0.8, 1.1)), (5, (9, 9), (1.0, 1.0)),
])
def test_distances_match_brute_force(seed, shape, spacing):
  rng = np.random.default_rng(seed)
  for density_a, density_b in itertools.product((0.15, 0.5), (0.3, 0.7)):
    a = rng.random(shape) < density_a
    b = rng.random(shape) < density_b
    a.flat[0] = True  # guarantee non-empty
    b.flat[-1] = True
    want_hd95, want_assd, want_asd, want_hd, want_mean_of_directed = _brute_hd95_assd(a, b, spacing)
    assert metrics.hd95(a, b, spacing) == pytest.approx(want_hd95, abs=1e-9)
    assert metrics.assd(a, b, spacing) == pytest.approx(want_assd, abs=1e-9)
    assert metrics.asd(a, b, spacing) == pytest.approx(want_asd, abs=1e-9)
    assert metrics.hausdorff(a, b, spacing) == pytest.approx(want_hd, abs=1e-9)
    assert metrics.hd95_assd(a, b, spacing) == pytest.approx((want_hd95, want_assd), abs=1e-9)
    assert metrics.assd(a, b, spacing, assd_mode="mean_of_directed") == pytest.approx(
        want_mean_of_directed, abs=1e-9)


def test_matches_medpy():
  """Black-box cross-check against medpy, the definition the issue names (requirements.txt)."""
  from medpy.metric import binary  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  for shape, spacing in [((20, 20), None), ((8, 9, 10), (2.0, 0.5, 1.0))]:
    a = rng.random(shape) < 0.3
    b = rng.random(shape) < 0.4
    assert metrics.hd95(a, b, spacing) == pytest.approx(binary.hd95(a, b, spacing), abs=1e-9)
    assert metrics.assd(a, b, spacing) == pytest.approx(binary.assd(a, b, spacing), abs=1e-9)


# ----------------------------------------------------------------------------------------------
# Aggregation.


def test_summarize_is_nan_aware():
  cases = {
      "a": {"dice": 1.0, "hd95": 2.0},
      "b": {"dice": 0.5, "hd95": float("nan")},
      "c": {"dice": 0.0, "hd95": 4.0},
  }
  out = metrics.summarize(cases)
  assert out["mean"]["dice"] == pytest.approx(0.5)
  assert out["std"]["dice"] == pytest.approx(np.std([1.0, 0.5, 0.0]))
  assert out["mean"]["hd95"] == pytest.approx(3.0)
  assert out["count"] == {"dice": 3, "hd95": 2}
  assert out["n_cases"] == {"dice": 3, "hd95": 3}
  none_defined = metrics.summarize({"x": {"hd95": float("nan")}})
  assert math.isnan(none_defined["mean"]["hd95"]) and none_defined["count"]["hd95"] == 0
