"""restore.load_run: inference weights straight from a training checkpoint, no optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdseg_jax import checkpoint as checkpoint_lib
from sdseg_jax import config_lib
from sdseg_jax import optim
from sdseg_jax import restore
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import state as state_lib
from sdseg_jax.models import sdseg
from tests import trained_run


def _full_state(workdir, step):
  """The whole TrainState of `step`, restored the way a resume does (optimizer included)."""
  config = config_lib.load(workdir)
  model = sdseg.build(config.model)
  mesh = restore.inference_mesh()
  tx = optim.make_optimizer(config)
  abstract_params, _ = jax.eval_shape(model.init, jax.random.key(0))
  abstract = jax.eval_shape(lambda p: state_lib.create(p, tx, jax.random.key(0), 1.0),
                            abstract_params)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding_lib.replicated(mesh)), abstract)
  with checkpoint_lib.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
    return ckpt.restore(abstract, step=step, restore_data_state=False)[0]


def test_inference_weights_restore_without_the_optimizer(monkeypatch):
  # The run was written by train.run, i.e. a checkpoint of today's layout (full TrainState).
  workdir = trained_run.workdir()
  def forbidden(*args, **kwargs):
    raise AssertionError("restoring inference weights must not build the optimizer or state")
  with monkeypatch.context() as patch:
    patch.setattr(optim, "make_optimizer", forbidden)
    patch.setattr(state_lib, "create", forbidden)
    run = restore.load_run(workdir, "last")
  state = _full_state(workdir, run.step)
  jax.tree_util.tree_map(np.testing.assert_array_equal, run.params["unet"], state.ema_unet)
  jax.tree_util.tree_map(np.testing.assert_array_equal, run.params["vision_encoder"],
                         state.params["vision_encoder"])
  assert float(run.scale_factor) == float(state.scale_factor)
  # The EMA UNet, not the live one (they differ after training steps).
  assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: bool(jnp.array_equal(a, b)), run.params["unet"], state.params["unet"])))


def test_a_checkpoint_of_another_model_is_named(tmp_path):
  workdir = trained_run.workdir()
  config = config_lib.load(workdir)
  with config.unlocked():
    config.model.unet.model_channels = 64  # not what the checkpoint holds
  moved = tmp_path / "run"
  config_lib.dump(config, moved)
  (moved / "checkpoints").symlink_to(workdir / "checkpoints")
  with pytest.raises(restore.RestoreError, match=r"checkpoints/4: cannot restore step 4 .*"
                                                 r"shape mismatch"):
    restore.load_run(moved, "last")
