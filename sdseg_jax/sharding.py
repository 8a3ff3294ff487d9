"""The device mesh and every sharding decision of sdseg_jax, in one place.

Mesh axes are ("data", "fsdp"). The batch is split over both axes. Parameters follow one of two
tactics chosen in `config.mesh.strategy`:
  * "dp":   every parameter (and optimizer moment) replicated: plain data parallelism;
  * "fsdp": each large parameter sharded along its largest dimension divisible by the fsdp axis
            size (ZeRO-3 style; the optimizer state follows the parameters).
The frozen VAE is always replicated explicitly. Nothing outside this module names mesh axes.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import jax
from jax.experimental import mesh_utils
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from sdseg_jax import errors
from sdseg_jax import state as state_lib

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated under FSDP: sharding them saves nothing.
FSDP_MIN_SIZE = 2 ** 14


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple:
  """Resolves one -1 entry so that data * fsdp == num_devices; errors name the numbers."""
  shape = [data, fsdp]
  if shape.count(-1) > 1:
    raise errors.ConfigError("at most one of config.mesh.data / config.mesh.fsdp may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise errors.ConfigError(f"{num_devices} devices cannot be split into a mesh with "
                               f"data={data}, fsdp={fsdp}")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise errors.ConfigError(
        f"mesh data={shape[0]} x fsdp={shape[1]} needs {math.prod(shape)} devices, "
        f"but {num_devices} are available")
  return tuple(shape)


def make_mesh(mesh_config: Mapping[str, Any], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A (data, fsdp) mesh over all devices (all hosts), laid out for the interconnect."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(int(mesh_config["data"]), int(mesh_config["fsdp"]), len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)  # e.g. a subset of a TPU slice
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  if fsdp_size == 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(abstract_tree: Any, mesh: Mesh, strategy: str) -> Any:
  """NamedSharding for every leaf of an abstract parameter (or optimizer-state) tree."""
  if strategy not in ("dp", "fsdp"):
    raise errors.ConfigError(f"unknown config.mesh.strategy {strategy!r}; expected 'dp' or 'fsdp'")
  fsdp_size = mesh.shape["fsdp"] if strategy == "fsdp" else 1
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, _fsdp_spec(x.shape, fsdp_size)), abstract_tree)


def global_batch_size_check(global_batch_size: int, mesh: Mesh) -> None:
  if global_batch_size % (mesh.size) or global_batch_size % jax.process_count():
    raise errors.ConfigError(
        f"global batch size {global_batch_size} must be divisible by the number "
        f"of devices ({mesh.size}) and processes ({jax.process_count()})")


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Host-local numpy arrays (this process's share) -> global batch-sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class TrainLayout:
  """Abstract (shape-only) trainable params, frozen VAE and train state, with their shardings."""
  params: Any
  param_shardings: Any
  vae: Any
  vae_shardings: Any
  state: Any
  state_shardings: Any


def train_layout(model: Any, tx: Any, mesh: Mesh, strategy: str) -> TrainLayout:
  """How a run's state lies on the mesh: what `train.run` restores into and the AOT check compiles.

  Nothing is computed: shapes come from `jax.eval_shape` of the model's init and of
  `state.create`, so this is cheap at full size and on compile-only devices.
  """
  key = jax.random.key(0)  # shapes only: the values never exist
  abstract_params, abstract_vae = jax.eval_shape(model.init, key)
  abstract_state = jax.eval_shape(lambda p: state_lib.create(p, tx, key, jnp.float32(1)),
                                  abstract_params)
  return TrainLayout(
      params=abstract_params,
      param_shardings=param_shardings(abstract_params, mesh, strategy),
      vae=abstract_vae,
      vae_shardings=jax.tree_util.tree_map(lambda _: replicated(mesh), abstract_vae),
      state=abstract_state,
      state_shardings=param_shardings(abstract_state, mesh, strategy))
