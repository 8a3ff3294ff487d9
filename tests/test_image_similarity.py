"""Tests for sdseg_jax.image_similarity: skimage, a naive windowed reference, hand values."""

import math

import numpy as np
import pytest
from scipy import ndimage

from sdseg_jax import image_similarity as sim

BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _smooth_map(rng, shape, blur=3.0):
  """A probability-map-like image on the 0-255 scale (smooth blobs, saturated in places)."""
  noise = ndimage.gaussian_filter(rng.standard_normal(shape), blur)
  return np.clip(127.5 + 127.5 * noise / (2 * noise.std()), 0, 255)


def _naive_ssim_cs(x, y, data_range):
  """Explicit sliding-window SSIM/cs with 2D Gaussian weights (no scipy filtering)."""
  r = np.arange(-5, 6)
  w2 = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
  w2 /= w2.sum()
  win = lambda a: np.lib.stride_tricks.sliding_window_view(a, (11, 11))  # noqa: E731
  wx, wy = win(x), win(y)
  mean = lambda a: np.einsum("ijkl,kl->ij", a, w2)  # noqa: E731
  mx, my = mean(wx), mean(wy)
  vx = mean((wx - mx[..., None, None]) ** 2)
  vy = mean((wy - my[..., None, None]) ** 2)
  cxy = mean((wx - mx[..., None, None]) * (wy - my[..., None, None]))
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  cs = (2 * cxy + c2) / (vx + vy + c2)
  lum = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
  return (lum * cs).mean(), cs.mean()


def _naive_ms_ssim(x, y, data_range):
  sims, css = [], []
  for scale in range(5):
    if scale:
      x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))
      y = y.reshape(y.shape[0] // 2, 2, y.shape[1] // 2, 2).mean(axis=(1, 3))
    s, c = _naive_ssim_cs(x, y, data_range)
    sims.append(s)
    css.append(c)
  return np.prod(np.array(css[:-1]) ** np.array(BETAS[:-1])) * sims[-1] ** BETAS[-1]


def test_gaussian_kernel_has_11_taps():
  k = sim.gaussian_kernel_1d(1.5)
  assert k.size == 11 and k.sum() == pytest.approx(1.0) and np.argmax(k) == 5


def test_identical_images():
  rng = np.random.default_rng(0)
  x = _smooth_map(rng, (192, 192))
  assert sim.ssim(x, x) == pytest.approx(1.0)
  assert sim.ms_ssim(x, x) == pytest.approx(1.0)
  assert sim.psnr(x, x) == math.inf


def test_psnr_known_values():
  x = np.full((32, 32), 100.0)
  assert sim.psnr(x + 5, x) == pytest.approx(20 * math.log10(255 / 5))
  y = x.copy()
  y[0, 0] += 16.0  # MSE = 256 / 1024 = 0.25
  assert sim.psnr(y, x) == pytest.approx(10 * math.log10(255 ** 2 / 0.25))
  target = np.zeros((4, 4))
  target[0, 0] = 200.0  # inferred range = 200 (torchmetrics' data_range=None)
  assert sim.psnr(target + 2, target, data_range=None) == pytest.approx(20 * math.log10(200 / 2))


def test_ssim_matches_naive_window_reference():
  rng = np.random.default_rng(1)
  x = _smooth_map(rng, (40, 37))
  y = np.clip(x + 20 * rng.standard_normal(x.shape), 0, 255)
  want, _ = _naive_ssim_cs(x, y, 255.0)
  assert sim.ssim(x, y) == pytest.approx(want, abs=1e-12)
  assert sim.ssim(x, y, data_range=None) == pytest.approx(
      _naive_ssim_cs(x, y, max(np.ptp(x), np.ptp(y)))[0], abs=1e-12)


def test_ms_ssim_matches_naive_reference():
  rng = np.random.default_rng(2)
  x = _smooth_map(rng, (176, 192))
  y = np.clip(x + 25 * ndimage.gaussian_filter(rng.standard_normal(x.shape), 1.0), 0, 255)
  want = _naive_ms_ssim(x, y, 255.0)
  assert sim.ms_ssim(x, y) == pytest.approx(want, abs=1e-12)
  assert 0.5 < want < 1.0


def test_ms_ssim_constant_offset_reduces_to_coarse_luminance():
  # With y = x + c every cs term is exactly 1, so MS-SSIM = ssim(coarsest)**beta_5.
  rng = np.random.default_rng(3)
  x = _smooth_map(rng, (256, 256)) * 0.8
  y = x + 30.0
  coarse = lambda a: a.reshape(16, 16, 16, 16).mean(axis=(1, 3))  # noqa: E731
  want = sim.ssim(coarse(x), coarse(y)) ** BETAS[-1]
  assert sim.ms_ssim(x, y) == pytest.approx(want, rel=1e-10)


def test_ms_ssim_rejects_small_images():
  with pytest.raises(ValueError, match="too small"):
    sim.ms_ssim(np.zeros((100, 256)), np.zeros((100, 256)))


def test_multichannel_is_channel_mean():
  rng = np.random.default_rng(4)
  x = np.stack([_smooth_map(rng, (48, 48)) for _ in range(3)])
  y = np.clip(x + 10 * rng.standard_normal(x.shape), 0, 255)
  per_channel = [sim.ssim(x[c], y[c]) for c in range(3)]
  assert sim.ssim(x, y) == pytest.approx(np.mean(per_channel), abs=1e-12)


def test_ssim_matches_skimage():
  metrics_mod = pytest.importorskip("skimage.metrics")
  rng = np.random.default_rng(5)
  for shape in [(64, 64), (256, 256), (50, 71)]:
    x = _smooth_map(rng, shape)
    y = np.clip(x + 15 * rng.standard_normal(shape), 0, 255)
    want = metrics_mod.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=255)
    assert sim.ssim(x, y) == pytest.approx(want, abs=1e-10)
    # uint8-quantised maps as the protocol reads them from PNG.
    xq, yq = np.round(x).astype(np.uint8), np.round(y).astype(np.uint8)
    want_q = metrics_mod.structural_similarity(xq.astype(float), yq.astype(float),
                                               gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False, data_range=255)
    assert sim.ssim(xq, yq) == pytest.approx(want_q, abs=1e-10)
  assert sim.psnr(y, x) == pytest.approx(
      metrics_mod.peak_signal_noise_ratio(x, y, data_range=255), abs=1e-10)


def test_instance_stability_protocol():
  rng = np.random.default_rng(6)
  base = _smooth_map(rng, (2, 192, 192))  # two test images
  runs = np.stack([base, base, np.zeros_like(base), np.clip(base + 10.0, 0, 255)])
  runs[:, 1] = 0.0  # image 1: empty reference -> skipped entirely
  runs[3, 1] = base[1]
  out = sim.instance_stability(runs, reference=0, data_range=255.0)
  offset = runs[3, 0]
  assert out["n_images_ssim"] == out["n_images_psnr"] == 1
  # Run 1 is identical (SSIM 1, skipped for PSNR); run 2 is all zero (skipped).
  assert out["ssim"] == pytest.approx((1.0 + sim.ssim(offset, base[0])) / 2)
  assert out["ms_ssim"] == pytest.approx((1.0 + sim.ms_ssim(offset, base[0])) / 2)
  assert out["psnr"] == pytest.approx(sim.psnr(offset, base[0]))


def test_pairwise_dice_spread_and_uncertainty():
  masks = np.zeros((3, 4, 4), bool)
  masks[0, :2] = True
  masks[1, :2] = True
  masks[2, :1] = True
  out = sim.pairwise_dice_spread(masks)
  assert out["n_pairs"] == 3
  assert out["max"] == pytest.approx(1.0)
  assert out["min"] == pytest.approx(2 * 4 / 12)
  assert out["mean"] == pytest.approx((1 + 2 * (8 / 12)) / 3)
  assert math.isnan(sim.pairwise_dice_spread(masks[:1])["mean"])
  probs = np.stack([np.zeros((2, 2)), np.ones((2, 2))])
  np.testing.assert_allclose(sim.uncertainty_map(probs), np.full((2, 2), 0.5))


# Values of the hand-written SSIM/PSNR (scipy filters) that scikit-image replaced, on real
# Kvasir-SEG masks and images at 256x256: the replacement must reproduce them.
# Per case: ssim, ms_ssim, psnr of (blurred mask, mask) at range 255, then the same three of
# (blurred RGB image, RGB image) with the inferred range (data_range=None).
_BEFORE_SKIMAGE = {
    "cju0qkwl35piu0993l0dewei2": (0.8838743988718712, 0.9508856454901466, 21.25343052177715,
                                  0.7325680889485742, 0.9372765333537189, 26.719596601531855),
    "cju0qoxqj9q6s0835b43399p4": (0.8826584920516372, 0.9483584830683008, 21.31741237243782,
                                  0.9277001371037246, 0.9874281041073717, 34.8180844882144),
}


@pytest.mark.parametrize("name", sorted(_BEFORE_SKIMAGE))
def test_real_images_keep_their_values(shared_data, name):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageFilter  # pylint: disable=g-import-not-at-top
  root = shared_data / "Kvasir-SEG"
  mask = Image.open(root / "masks" / f"{name}.jpg").convert("L").resize((256, 256),
                                                                        Image.NEAREST)
  image = Image.open(root / "images" / f"{name}.jpg").convert("RGB").resize((256, 256),
                                                                            Image.BILINEAR)
  chw = lambda im: np.asarray(im).transpose(2, 0, 1).astype(np.float64)  # noqa: E731
  target, preds = np.asarray(mask, np.float64), np.asarray(
      mask.filter(ImageFilter.GaussianBlur(4)), np.float64)
  rgb = chw(image)
  rgb_blurred = chw(Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8)).filter(
      ImageFilter.GaussianBlur(1.5)))
  got = (sim.ssim(preds, target), sim.ms_ssim(preds, target), sim.psnr(preds, target),
         sim.ssim(rgb_blurred, rgb, None), sim.ms_ssim(rgb_blurred, rgb, None),
         sim.psnr(rgb_blurred, rgb, None))
  np.testing.assert_allclose(got, _BEFORE_SKIMAGE[name], rtol=1e-12)


def test_ms_ssim_components_agree_with_skimage_ssim():
  # One scale with beta 1 is plain SSIM: the hand-written statistics behind MS-SSIM must give
  # skimage's value, including for stacks and inferred ranges.
  metrics_mod = pytest.importorskip("skimage.metrics")
  rng = np.random.default_rng(7)
  x = np.stack([_smooth_map(rng, (40, 52)) for _ in range(2)])
  y = np.clip(x + 12 * rng.standard_normal(x.shape), 0, 255)
  for data_range in (255.0, 180.0):
    want = metrics_mod.structural_similarity(x, y, channel_axis=0, data_range=data_range,
                                             gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False)
    assert sim.ms_ssim(x, y, data_range, betas=(1.0,)) == pytest.approx(want, abs=1e-12)
