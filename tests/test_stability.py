"""`python -m sdseg_jax.stability`: identical runs are perfectly stable, different seeds are not."""

import json

import numpy as np
from PIL import Image
import pytest

from sdseg_jax import image_similarity
from sdseg_jax import restore
from sdseg_jax import stability
from sdseg_jax.evaluators import stability as protocol
from tests import trained_run


@pytest.fixture(scope="module")
def run():
  return restore.load_run(trained_run.workdir(), "last")


def test_identical_seeds_are_perfectly_stable(run):
  result = stability.stability(run, "val", seeds=[0, 0, 0])
  assert result["n_images"] == 8 and result["runs"] == 3
  assert result["instance"]["ssim"]["n_images"] == 8  # no all-zero reference maps
  assert result["instance"]["ssim"]["mean"] == pytest.approx(1.0, abs=1e-9)
  assert result["instance"]["psnr"]["n_images"] == 0  # identical pairs are skipped
  assert result["pairwise_dice"]["mean"] == 1.0
  assert result["pairwise_dice"]["std"] == 0.0
  assert result["dice_across_runs"]["std"] == 0.0


def test_different_seeds_and_json(run, tmp_path, capsys):
  out, unc = tmp_path / "stability.json", tmp_path / "uncertainty"
  assert stability.main(["--workdir", str(run.workdir), "--checkpoint", "last", "--split", "val",
                         "--seeds", "0,1,2", "--json", str(out),
                         "--uncertainty-dir", str(unc)]) == 0
  table = capsys.readouterr().out
  assert "SSIM vs run 0" in table and "skipped" in table
  result = json.loads(out.read_text())
  assert {"workdir", "split", "checkpoint", "seeds", "reference_seed", "runs", "map_size",
          "n_images", "instance", "ms_ssim_skipped", "pairwise_dice", "dice_per_run",
          "dice_across_runs", "images", "protocol"} <= set(result)
  assert result["seeds"] == [0, 1, 2] and len(result["dice_per_run"]) == 3
  assert result["instance"]["ssim"]["mean"] < 1.0
  assert result["instance"]["psnr"]["n_images"] > 0
  assert result["pairwise_dice"]["mean"] <= 1.0
  # 32 px maps are too small for 5-scale MS-SSIM: skipped, and the reason is recorded.
  assert "176" in result["ms_ssim_skipped"] and result["instance"]["ms_ssim"]["mean"] is None
  assert set(result["images"]) == {f"synthetic_val_{i:05d}" for i in range(8)}
  pngs = sorted(unc.glob("*.png"))
  assert len(pngs) == 8
  with Image.open(pngs[0]) as im:
    assert im.size == (trained_run.SIZE, trained_run.SIZE)


def test_too_few_runs(run):
  with pytest.raises(ValueError, match="at least 2 runs"):
    stability.stability(run, "val", seeds=[0])


def test_per_image_rules_match_instance_stability():
  rng = np.random.default_rng(0)
  size = protocol.MS_SSIM_MIN_SIZE
  base = rng.uniform(0, 255, (3, size, size)).round()
  runs = np.stack([base, base + rng.normal(0, 8, base.shape), base.copy()]).clip(0, 255)
  runs[:, 1] = 0.0          # an all-zero reference: image skipped
  runs[2, 2] = runs[0, 2]   # an identical pair: skipped for PSNR only
  runs = runs.round()
  want = image_similarity.instance_stability(runs)
  per_image = [protocol.image_stability(runs[:, n]) for n in range(runs.shape[1])]
  for name in ("ssim", "ms_ssim", "psnr"):
    values = [p[name] for p in per_image if p[name] is not None]
    assert len(values) == want[f"n_images_{name}"]
    assert np.mean(values) == pytest.approx(want[name], rel=1e-12)
  assert protocol.ms_ssim_skip_reason(size) is None
  assert "too small" in protocol.ms_ssim_skip_reason(size - 1)
