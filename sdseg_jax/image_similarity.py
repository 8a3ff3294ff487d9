"""Image-similarity metrics for SDSeg's stability evaluation (SSIM, MS-SSIM, PSNR) and spreads.

The paper's instance-level stability protocol (`scripts/stability_evaluation.ipynb`) compares the
probability maps (p*255 saved as uint8 PNGs, read back as float on the 0-255 scale) of 10 inference
runs with torchmetrics 0.7 metric classes at their defaults. SSIM and PSNR come from scikit-image,
whose settings below reproduce torchmetrics' without a torch dependency; MS-SSIM has no
scikit-image counterpart and is written here from the same per-scale statistics:

* SSIM: 11-tap Gaussian window (sigma 1.5; 11 = 2*int(3.5*sigma+0.5)+1), k1 = 0.01, k2 = 0.03,
  population (not sample) covariances, SSIM map averaged over the "valid" region only (a border of 5
  pixels is dropped, so the padding mode is irrelevant): skimage's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
* MS-SSIM: 5 scales with betas (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2x2 average pooling
  between scales (odd trailing rows/columns dropped, like `avg_pool2d`), result
  prod_{j<5} cs_j**beta_j * ssim_5**beta_5 with cs_j/ssim_j the valid-region means at scale j.
  No normalisation by default (negative cs then yields NaN, as in torchmetrics with
  `normalize=None`); `normalize="relu"` clamps at 0 like newer torchmetrics defaults.
* PSNR: 10*log10(data_range**2 / MSE) (skimage's `peak_signal_noise_ratio`); +inf for identical
  inputs (the protocol skips those pairs).

data_range: torchmetrics 0.7 defaults to `data_range=None`, which *infers* the range per call: for
SSIM/MS-SSIM max(preds.max()-preds.min(), target.max()-target.min()) (MS-SSIM re-infers it at every
scale), for PSNR target.max()-target.min(). Our primitives default to the fixed, well-defined 255 of
uint8 maps; pass `data_range=None` for torchmetrics' inference. `instance_stability`, which
reproduces the notebook's numbers, uses the inference by default. For maps that reach both 0 and
255 (typical confident predictions) the two choices coincide.
"""

from __future__ import annotations

import itertools
from typing import Literal, Optional, Sequence

import numpy as np
from scipy import ndimage
from skimage import metrics as skimage_metrics

from sdseg_jax import metrics

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
DataRange = Optional[float]


def gaussian_kernel_1d(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
  """Normalised sampled Gaussian with radius int(truncate*sigma+0.5) (11 taps for sigma 1.5)."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  return kernel / kernel.sum()


def _as_image_pair(preds: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  preds = np.asarray(preds, dtype=np.float64)
  target = np.asarray(target, dtype=np.float64)
  if preds.shape != target.shape:
    raise ValueError(f"image shapes differ: {preds.shape} vs {target.shape}")
  if preds.ndim < 2:
    raise ValueError(f"expected (..., H, W) images, got shape {preds.shape}")
  return preds, target


def _infer_range(preds: np.ndarray, target: np.ndarray) -> float:
  """torchmetrics' data_range=None rule for SSIM: the larger of the two dynamic ranges."""
  return float(max(preds.max() - preds.min(), target.max() - target.min()))


def _local_mean(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Gaussian-weighted local mean over the last two axes, cropped to the valid region."""
  out = ndimage.correlate1d(x, kernel, axis=-2, mode="mirror")
  out = ndimage.correlate1d(out, kernel, axis=-1, mode="mirror")
  pad = (kernel.size - 1) // 2
  return out[..., pad:out.shape[-2] - pad, pad:out.shape[-1] - pad]


def ssim_components(preds: np.ndarray, target: np.ndarray, data_range: float,
                    sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Valid-region SSIM map and contrast-structure (cs) map over the last two axes.

  MS-SSIM needs the cs map, which skimage does not expose; `ssim` itself is skimage's, and the
  tests hold the two to the same values.
  """
  preds, target = _as_image_pair(preds, target)
  kernel = gaussian_kernel_1d(sigma)
  if min(preds.shape[-2:]) < kernel.size:
    raise ValueError(f"images {preds.shape[-2:]} are smaller than the {kernel.size}-tap window")
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  mu_x, mu_y = _local_mean(preds, kernel), _local_mean(target, kernel)
  var_x = _local_mean(preds * preds, kernel) - mu_x ** 2
  var_y = _local_mean(target * target, kernel) - mu_y ** 2
  cov = _local_mean(preds * target, kernel) - mu_x * mu_y
  cs_map = (2 * cov + c2) / (var_x + var_y + c2)
  ssim_map = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs_map
  return ssim_map, cs_map


def ssim(preds: np.ndarray, target: np.ndarray, data_range: DataRange = 255.0,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
  """Mean SSIM of two images (H, W) or stacks (..., H, W), e.g. RGB (3, H, W); 0-255 floats.

  A stack is the mean over its images (skimage's channel mean). data_range=None infers it as
  torchmetrics 0.7 does (see module docstring).
  """
  preds, target = _as_image_pair(preds, target)
  if data_range is None:
    data_range = _infer_range(preds, target)
  window = gaussian_kernel_1d(sigma).size
  if min(preds.shape[-2:]) < window:
    raise ValueError(f"images {preds.shape[-2:]} are smaller than the {window}-tap window")
  stack = lambda x: x.reshape(-1, *x.shape[-2:])  # pylint: disable=g-long-lambda
  return float(skimage_metrics.structural_similarity(
      stack(preds), stack(target), data_range=data_range, channel_axis=0,
      gaussian_weights=True, sigma=sigma, use_sample_covariance=False, K1=k1, K2=k2))


def _avg_pool2(x: np.ndarray) -> np.ndarray:
  """2x2 mean pooling over the last two axes, dropping an odd last row/column."""
  h, w = (x.shape[-2] // 2) * 2, (x.shape[-1] // 2) * 2
  x = x[..., :h, :w]
  return 0.25 * (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2])


def ms_ssim(preds: np.ndarray, target: np.ndarray, data_range: DataRange = 255.0,
            betas: Sequence[float] = MS_SSIM_BETAS, sigma: float = 1.5, k1: float = 0.01,
            k2: float = 0.03, normalize: Optional[Literal["relu", "simple"]] = None) -> float:
  """Multi-scale SSIM (Wang et al. 2003) of two images or stacks, torchmetrics-style.

  Needs the coarsest scale (H / 2**(len(betas)-1)) to be at least the window size (11), i.e.
  H, W >= 176 for 5 scales; 256x256 maps qualify.
  """
  preds, target = _as_image_pair(preds, target)
  window = gaussian_kernel_1d(sigma).size
  coarsest = min(preds.shape[-2:]) // 2 ** (len(betas) - 1)
  if coarsest < window:
    raise ValueError(f"images {preds.shape[-2:]} too small for {len(betas)}-scale MS-SSIM: the "
                     f"coarsest scale would be {coarsest} < window {window}")
  sims, css = [], []
  for scale in range(len(betas)):
    if scale:
      preds, target = _avg_pool2(preds), _avg_pool2(target)
    scale_range = _infer_range(preds, target) if data_range is None else data_range
    ssim_map, cs_map = ssim_components(preds, target, scale_range, sigma, k1, k2)
    sims.append(ssim_map.mean())
    css.append(cs_map.mean())
  sims, css = np.array(sims), np.array(css)
  if normalize == "relu":
    sims, css = np.maximum(sims, 0.0), np.maximum(css, 0.0)
  elif normalize == "simple":
    sims, css = (sims + 1) / 2, (css + 1) / 2
  elif normalize is not None:
    raise ValueError(f"normalize must be None, 'relu' or 'simple', got {normalize!r}")
  betas = np.asarray(betas, np.float64)
  with np.errstate(invalid="ignore"):
    return float(np.prod(css[:-1] ** betas[:-1]) * sims[-1] ** betas[-1])


def psnr(preds: np.ndarray, target: np.ndarray, data_range: DataRange = 255.0) -> float:
  """Peak signal-to-noise ratio in dB; +inf for identical inputs.

  data_range=None uses target.max() - target.min(), torchmetrics 0.7's inference.
  """
  preds, target = _as_image_pair(preds, target)
  if data_range is None:
    data_range = float(target.max() - target.min())
  with np.errstate(divide="ignore"):  # identical inputs: MSE 0 -> +inf, as documented
    return float(skimage_metrics.peak_signal_noise_ratio(target, preds, data_range=data_range))


def instance_stability(runs: np.ndarray, reference: int = 0,
                       data_range: DataRange = None) -> dict[str, float]:
  """SDSeg's instance-level stability: SSIM / MS-SSIM / PSNR of every run against a reference run.

  Args:
    runs: (M, N, H, W) or (M, N, C, H, W) maps on the 0-255 scale: M inference runs (seeds) of the
      same N test images.
    reference: index of the reference run (the notebook's "first glob result", intended seed 0).
    data_range: None (default) = torchmetrics 0.7 inference, as in the notebook; or e.g. 255.

  Returns:
    {"ssim", "ms_ssim", "psnr"}: per image the mean over the other runs, then the mean over images;
    plus "n_images_<metric>" counts. As in the notebook, images whose reference map is all zero are
    skipped, all-zero runs are skipped, and identical pairs are skipped for PSNR (infinite).
  """
  runs = np.asarray(runs, dtype=np.float64)
  if runs.ndim not in (4, 5):
    raise ValueError(f"expected (M, N, [C,] H, W) maps, got shape {runs.shape}")
  per_image: dict[str, list[float]] = {"ssim": [], "ms_ssim": [], "psnr": []}
  for n in range(runs.shape[1]):
    ref = runs[reference, n]
    if not ref.any():
      continue
    others = [runs[i, n] for i in range(runs.shape[0]) if i != reference and runs[i, n].any()]
    scores = {
        "ssim": [ssim(o, ref, data_range) for o in others],
        "ms_ssim": [ms_ssim(o, ref, data_range) for o in others],
        "psnr": [psnr(o, ref, data_range) for o in others if not np.array_equal(o, ref)],
    }
    for name, values in scores.items():
      if values:
        per_image[name].append(float(np.mean(values)))
  out: dict[str, float] = {}
  for name, values in per_image.items():
    out[name] = float(np.mean(values)) if values else float("nan")
    out[f"n_images_{name}"] = len(values)
  return out


def pairwise_dice_spread(masks: np.ndarray,
                         empty_convention: metrics.EmptyConvention = "both_empty_is_one"
                         ) -> dict[str, float]:
  """Agreement between N sampled masks of one image: stats of Dice over all unordered pairs.

  The default convention is the symmetric one (two empty samples agree perfectly): the official
  convention is asymmetric (non-empty vs empty scores 1 one way, 0 the other), which makes no sense
  between two samples.

  Returns {"mean", "std", "min", "max", "n_pairs"} (NaN stats when N < 2).
  """
  masks = np.asarray(masks) > 0
  values = [metrics.dice(masks[i], masks[j], empty_convention)
            for i, j in itertools.combinations(range(masks.shape[0]), 2)]
  if not values:
    nan = float("nan")
    return {"mean": nan, "std": nan, "min": nan, "max": nan, "n_pairs": 0}
  v = np.asarray(values)
  return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
          "max": float(v.max()), "n_pairs": int(v.size)}


def uncertainty_map(probs: np.ndarray) -> np.ndarray:
  """Per-pixel standard deviation (ddof=0) over N sampled probability maps (N, H, W) -> (H, W)."""
  probs = np.asarray(probs, dtype=np.float64)
  if probs.ndim < 2:
    raise ValueError(f"expected (N, ...) stacked maps, got shape {probs.shape}")
  return probs.std(axis=0)
