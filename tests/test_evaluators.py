"""The evaluator plug-ins' shared pieces: registry, host gather, per-case ledger, noise draw."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sdseg_jax import evaluators
from sdseg_jax import inference
from sdseg_jax.evaluators import common
from sdseg_jax.models import sdseg
from tests import trained_run


def test_registry_knows_the_plugins_and_rejects_unknown_names():
  for name in evaluators.NAMES:
    assert issubclass(evaluators.get(name), common.Evaluator)
  with pytest.raises(ValueError, match="unknown evaluator type 'dise'; known types: dice, "
                                       "multiclass, stability"):
    evaluators.get("dise")


def test_default_evals_reproduce_the_single_dice_evaluator():
  config = base.get_config()
  assert evaluators.specs(config) == {"eval": {
      "type": "dice", "noise_seed": config.eval.noise_seed,
      "empty_convention": config.eval.empty_convention, "num_panels": config.eval.num_panels,
      "noise": "per_image"}}
  with config.unlocked():  # a run directory written before config.evals existed
    del config["evals"]
  assert list(evaluators.specs(config)) == ["eval"]


@pytest.mark.parametrize("entry, message", [
    ({"type": "dise"}, "unknown evaluator type 'dise'"),
    ({"kind": "dice"}, r"config.evals.val has no 'type'"),
    ({"type": "dice", "runs": 3}, r"config.evals.val \(type 'dice'\).*runs"),
])
def test_bad_evals_entries_name_the_field(entry, message):
  config = base.get_config()
  with config.unlocked():
    config.evals = {"val": entry}
  with pytest.raises(ValueError, match=message):
    evaluators.specs(config)


def test_options_reach_the_evaluator():
  config = base.get_config()
  with config.unlocked():
    config.evals = {"eval": {"type": "dice"}, "stab": {"type": "stability", "runs": 3}}
  specs = evaluators.specs(config)
  assert specs["stab"] == {"type": "stability", "runs": 3, "noise_seed": 0,
                           "empty_convention": "official"}


def test_gather_strings_round_trips_across_processes(monkeypatch):
  names = ["case_0", "bäckerei/ü", "x" * 200, ""]
  assert common.gather_strings(np.array(names)) == names  # one process: nothing is sent
  # Two processes whose gather is the identity (one process's rows): the byte encoding path.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(common.multihost_utils, "process_allgather", lambda x, tiled: x)
  got = common.gather_strings(np.array(names))
  assert got == ["case_0", "bäckerei/ü", "x" * common.NAME_BYTES, ""]


def _rows(case, slices, valid):
  return common.BatchRows(valid=np.flatnonzero(valid), case=list(case), slice=np.array(slices))


def test_case_counts_sum_volumes_and_stack_slices_in_order():
  ledger = common.CaseCounts(keep_masks=True)
  masks = np.arange(4)[:, None, None] * np.ones((4, 2, 2), int)  # row k is all k
  counts = np.array([[1, 2, 3], [10, 20, 30], [100, 200, 300], [7, 7, 7]])
  ledger.add(_rows(["vol", "img", "vol", "pad"], [5, -1, 2, 0], [1, 1, 1, 0]), counts,
             masks, masks)
  ledger.add(_rows(["vol"], [3], [1]), counts[:1] * 1000, masks[3:], masks[3:])
  assert ledger.cases() == ["img", "vol"] and ledger.dimension == "3d"
  np.testing.assert_array_equal(ledger.totals["vol"], [1101, 2202, 3303])
  np.testing.assert_array_equal(ledger.totals["img"], [10, 20, 30])
  pred, gt = ledger.masks("vol")
  assert pred.shape == (3, 2, 2) and list(pred[:, 0, 0]) == [2, 3, 0]  # slices 2, 3, 5
  assert ledger.masks("img")[0].shape == (2, 2)
  assert common.dice_iou(ledger.totals["img"], "official") == pytest.approx(
      {"dice": 2 * 10 / (20 + 30 + 1e-10), "iou": 10 / (40 + 1e-10)})


def test_the_noise_draw_equals_the_draws_it_replaced():
  model = sdseg.build(trained_run.tiny_config().model)
  s, c = model.latent_size, model.latent_channels
  key = jax.random.fold_in(jax.random.key(3), 7)
  # evaluator / evaluate / step / benchmark: one z_T per image from a batch key.
  old = jax.random.normal(key, (5, s, s, c), jnp.float32)
  np.testing.assert_array_equal(inference.draw_noise(model, key, 5), old)
  # predict / stability: one z_T per run from the seed, shared by every image.
  old_run = jax.random.normal(jax.random.key(11), (1, s, s, c), jnp.float32)
  np.testing.assert_array_equal(inference.run_noise(model, 11), old_run)
  assert inference.draw_noise(model, key, 5).dtype == jnp.float32


class _Fixed(common.Evaluator):
  SCALARS = ("dice", "iou")

  def __init__(self, dice):
    self.dice, self.calls = dice, []

  def run(self, params, vae_params, scale_factor):
    self.calls.append((params, scale_factor))
    return {"dice": self.dice, "iou": self.dice / 2, "num_cases": 3, "panels": []}


class _Writer:
  def __init__(self):
    self.rows = []

  def write(self, step, scalars):
    self.rows.append((step, dict(scalars)))


def test_training_runs_every_listed_evaluator_under_its_prefix(tmp_path):
  from sdseg_jax import train  # pylint: disable=g-import-not-at-top
  state = types.SimpleNamespace(ema_unet="ema", params={"unet": "live", "vision_encoder": "enc"},
                                scale_factor=0.5)
  evals = [("eval", _Fixed(0.8)), ("extra", _Fixed(0.4))]
  writer = _Writer()
  got = train.run_evaluators(evals, state, None, base.get_config(), tmp_path, writer, 10)
  assert got == {"eval/dice": 0.8, "eval/iou": 0.4, "extra/dice": 0.4, "extra/iou": 0.2}
  assert [sorted(row) for _, row in writer.rows] == [
      ["eval/dice", "eval/iou", "eval/seconds"], ["extra/dice", "extra/iou", "extra/seconds"]]
  # The EMA UNet with the live vision encoder, as the official evaluation.
  assert evals[0][1].calls == [({"unet": "ema", "vision_encoder": "enc"}, 0.5)]
