"""SDSeg must learn: a small synthetic run reaches a stated Dice and its loss falls.

Every other training test runs a handful of steps and checks plumbing, so a model that never
learns (a wrong loss sign, a detached condition, a broken schedule or optimizer) would pass
them. This one trains tests/configs/learning.py end to end through `python -m sdseg_jax.main`
(VAE pre-training on the masks, 150 SDSeg steps, single-step evaluation on 32 validation cases).
Measured on the 2-core CI machine: validation Dice 0.838 (2026-12-02).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
MIN_DICE = 0.8


def test_small_synthetic_run_learns(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # the config's own CPU devices, not the test session's 8
  proc = subprocess.run([sys.executable, "-m", "sdseg_jax.main", "--config",
                         "tests/configs/learning.py", "--workdir", str(workdir)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == 15
  early, late = np.mean(losses[:3]), np.mean(losses[-3:])
  assert late < 0.6 * early, f"loss did not fall: first three {losses[:3]}, last {losses[-3:]}"
  dice = [r["eval/dice"] for r in records if "eval/dice" in r]
  assert dice and dice[-1] >= MIN_DICE, f"validation Dice {dice} < {MIN_DICE}"
