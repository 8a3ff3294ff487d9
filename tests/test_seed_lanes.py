"""The seed-lane layout (sharding.make_seed_mesh, map_lanes, lanes_to_global) on 8 CPU devices.

The end-to-end check (a seed trained in a lane equals the same seed trained alone) is in
tests/test_reproduce.py; these are the pieces, cheap enough to pin each rule.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdseg_jax import errors
from sdseg_jax import seed_lanes
from sdseg_jax import sharding as sharding_lib
from sdseg_jax.data import pipeline


def test_seed_mesh_splits_the_devices_into_equal_lanes():
  mesh = sharding_lib.make_seed_mesh({"data": -1, "fsdp": 2}, 2, jax.devices()[:8])
  assert dict(mesh.shape) == {"seed": 2, "data": 2, "fsdp": 2}
  assert len({d.id for d in mesh.devices.flat}) == 8
  with pytest.raises(errors.ConfigError, match="8 devices cannot be split into 3 equal"):
    sharding_lib.make_seed_mesh({"data": -1, "fsdp": 1}, 3, jax.devices()[:8])
  assert seed_lanes.fits(2, 8) and seed_lanes.fits(4, 8)
  assert not seed_lanes.fits(3, 8) and not seed_lanes.fits(1, 8)


def test_batch_size_is_checked_per_lane():
  mesh = sharding_lib.make_seed_mesh({"data": -1, "fsdp": 1}, 2, jax.devices()[:8])
  sharding_lib.global_batch_size_check(4, mesh)  # 4 devices per lane
  with pytest.raises(errors.ConfigError, match="devices \\(4\\).*of each seed lane"):
    sharding_lib.global_batch_size_check(6, mesh)


def test_lane_processes_follow_the_device_order():
  device = lambda p: types.SimpleNamespace(process_index=p)
  # 4 hosts x 2 chips, 2 lanes: each lane on two hosts, in row order.
  grid = np.array([[[device(1)], [device(1)], [device(0)], [device(0)]],
                   [[device(2)], [device(2)], [device(3)], [device(3)]]], dtype=object)
  mesh = types.SimpleNamespace(devices=grid)
  assert sharding_lib.lane_processes(mesh, 0) == [1, 0]
  assert sharding_lib.lane_processes(mesh, 1) == [2, 3]


def test_map_lanes_runs_each_lane_on_its_own_slice():
  """A per-lane 1x1 convolution (what vmap turns into a grouped convolution, which XLA:CPU
  partitions wrongly over the lanes) and a shared argument, against each lane computed alone."""
  mesh = sharding_lib.make_seed_mesh({"data": -1, "fsdp": 1}, 2, jax.devices()[:8])
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 4, 4, 32)).astype(np.float32)
  w = rng.normal(size=(2, 1, 1, 32, 64)).astype(np.float32)
  bias = rng.normal(size=(64,)).astype(np.float32)

  def conv(w, x, b):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  lanes = sharding_lib.map_lanes(conv, mesh, (True, True, False))
  batch = sharding_lib.lanes_to_global({0: {"x": x[0]}, 1: {"x": x[1]}}, 2, mesh)["x"]
  assert batch.sharding.spec == sharding_lib.batch_sharding(mesh).spec
  got = jax.jit(lanes)(jax.device_put(w, sharding_lib.per_lane(mesh)), batch, jnp.asarray(bias))
  for k in range(2):
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(conv(w[k], x[k], bias)),
                               rtol=1e-5, atol=1e-5)


def test_a_lane_not_on_this_process_cannot_resume_alone(tmp_path):
  with pytest.raises(pipeline.DataError, match="held no part of this run"):
    pipeline.restore_train_state(None, dict(pipeline.LANE_NOT_ON_THIS_PROCESS), str(tmp_path))
