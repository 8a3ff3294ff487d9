"""Integrity check on corrupted copies of real Kvasir-SEG files: every bad file is named."""

import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from sdseg_jax.data import base
from sdseg_jax.data import check
from sdseg_jax.data import configs


@pytest.fixture
def corrupted(shared_data, tmp_path):
  src = shared_data / "Kvasir-SEG"
  ids = sorted(p.stem for p in (src / "images").iterdir())[:6]
  root = tmp_path / "Kvasir-SEG"
  for sub in ("images", "masks"):
    (root / sub).mkdir(parents=True)
    for i in ids:
      shutil.copy(src / sub / f"{i}.jpg", root / sub / f"{i}.jpg")
  bad = {}
  # 1. truncated JPEG image (header intact, pixel data cut).
  p = root / "images" / f"{ids[0]}.jpg"
  p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
  bad["truncated"] = p
  # 2. image without mask.
  (root / "masks" / f"{ids[1]}.jpg").unlink()
  bad["no_mask"] = root / "images" / f"{ids[1]}.jpg"
  # 3. mask of the wrong size.
  p = root / "masks" / f"{ids[2]}.jpg"
  with Image.open(p) as im:
    im.resize((im.width // 2, im.height // 2)).save(p)
  bad["size"] = p
  # 4. non-binary mask (a grey ramp).
  p = root / "masks" / f"{ids[3]}.jpg"
  with Image.open(p) as im:
    w, h = im.size
  Image.fromarray(np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))).save(p)
  bad["grey"] = p
  # 5. mask without image.
  Image.new("L", (8, 8)).save(root / "masks" / "orphan.jpg")
  bad["no_image"] = root / "masks" / "orphan.jpg"
  c = configs.get_data_config("kvasir", str(root))
  c.val_size, c.test_size = 1, 1
  return c, bad


def test_full_check_names_every_bad_file(corrupted):
  c, bad = corrupted
  report = check.check_dataset(c)
  reasons = {}
  for prob in report.problems:
    reasons.setdefault(prob.path, []).append(prob.reason)
  assert any("decode" in r for r in reasons[str(bad["truncated"])])
  assert reasons[str(bad["no_mask"])] == ["image without mask"]
  assert any("size" in r for r in reasons[str(bad["size"])])
  assert any("not binary" in r for r in reasons[str(bad["grey"])])
  assert reasons[str(bad["no_image"])] == ["mask without image"]
  assert len(reasons) == 5


def test_quick_check_raises_naming_files(corrupted, tmp_path):
  c, bad = corrupted
  with pytest.raises(base.DataError) as e:
    check.quick_check(c, tmp_path / "splits")
  for key in ("no_mask", "size", "no_image"):  # header-level problems
    assert str(bad[key]) in str(e.value)


def test_check_cli_exit_codes(corrupted, shared_data):
  c, bad = corrupted
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  run = lambda root: subprocess.run(  # pylint: disable=g-long-lambda
      [sys.executable, "-m", "sdseg_jax.data.check", "--dataset", "kvasir", "--root", root,
       "--set", "val_size=1", "--set", "test_size=1"], capture_output=True, text=True, env=env)
  failed = run(c.root)
  assert failed.returncode == 1
  for path in bad.values():
    assert str(path) in failed.stdout
  assert check.main(["--dataset", "kvasir", "--root", str(shared_data / "Kvasir-SEG"),
                     "--quick"]) == 0
