"""The device mesh and every sharding decision of sdseg_jax, in one place.

Mesh axes are ("data", "fsdp"). The batch is split over both axes. Parameters follow one of two
tactics chosen in `config.mesh.strategy`:
  * "dp":   every parameter (and optimizer moment) replicated: plain data parallelism;
  * "fsdp": each large parameter sharded along its largest dimension divisible by the fsdp axis
            size (ZeRO-3 style; the optimizer state follows the parameters).
The frozen VAE is always replicated explicitly. Nothing outside this module names mesh axes.

Seed lanes (`make_seed_mesh`, sdseg_jax/seed_lanes.py): K independent runs side by side on one
mesh ("seed", "data", "fsdp"). Every array of the K runs gets a leading K axis split over "seed",
and inside a lane the single-run rules above apply unchanged.
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
SEED_AXIS = "seed"
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
  """Leading (batch) axis split over every device of the mesh; on a seed mesh the leading axis
  is the lane and the batch axis after it is split over each lane's devices."""
  if SEED_AXIS in mesh.axis_names:
    return NamedSharding(mesh, P(SEED_AXIS, BATCH_AXES))
  return NamedSharding(mesh, P(BATCH_AXES))


def per_lane(mesh: Mesh) -> NamedSharding:
  """One value per lane (metrics, scale factors): the leading K axis over "seed"."""
  return NamedSharding(mesh, P(SEED_AXIS))


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
  """The batch splits evenly over the devices and processes of a run (of each lane)."""
  if SEED_AXIS in mesh.axis_names:
    devices = mesh.size // mesh.shape[SEED_AXIS]
    processes = max(len(lane_processes(mesh, k)) for k in range(mesh.shape[SEED_AXIS]))
    what = "of each seed lane"
  else:
    devices, processes, what = mesh.size, jax.process_count(), ""
  if global_batch_size % devices or global_batch_size % processes:
    raise errors.ConfigError(
        f"global batch size {global_batch_size} must be divisible by the number "
        f"of devices ({devices}) and processes ({processes}){what and ' ' + what}")


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Host-local numpy arrays (this process's share) -> global batch-sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def make_seed_mesh(mesh_config: Mapping[str, Any], num_seeds: int,
                   devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ("seed", "data", "fsdp") mesh: `num_seeds` lanes, each a (data, fsdp) mesh as configured
  over 1/num_seeds of the devices (a lane is a contiguous block of the device layout)."""
  devices = list(jax.devices() if devices is None else devices)
  if num_seeds < 1 or len(devices) % num_seeds:
    raise errors.ConfigError(f"{len(devices)} devices cannot be split into {num_seeds} equal "
                             f"seed lanes")
  shape = (num_seeds, *mesh_shape(int(mesh_config["data"]), int(mesh_config["fsdp"]),
                                  len(devices) // num_seeds))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  axes = (SEED_AXIS, *AXES)
  return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))


def lane_processes(mesh: Mesh, lane: int) -> list[int]:
  """The processes holding lane `lane`'s devices, in the order its batch rows are laid out."""
  order: list[int] = []
  for device in mesh.devices[lane].flat:
    if device.process_index not in order:
      order.append(device.process_index)
  return order


def lane_shardings(single_run_shardings: Any, seed_mesh: Mesh) -> Any:
  """The single-run shardings of a tree, moved to the seed mesh behind a leading lane axis."""
  return jax.tree_util.tree_map(
      lambda s: NamedSharding(seed_mesh, P(SEED_AXIS, *s.spec)), single_run_shardings)


def map_lanes(fn: Any, mesh: Mesh, lane_args: Sequence[bool]) -> Any:
  """`fn` (one run's computation) applied to every lane of a seed mesh, in one program.

  Arguments flagged in `lane_args` carry a leading lane axis (each lane gets its own slice);
  the others are shared. Outputs get a leading lane axis. The lanes are a `shard_map` over
  "seed" only: inside, each lane runs exactly the single-run program, partitioned over its own
  (data, fsdp) devices by the usual shardings. (Not `vmap`: a vmapped 1x1 convolution with
  per-lane kernels becomes a grouped convolution that XLA:CPU's SPMD partitioner computes
  wrongly when the groups are split over devices, jax 0.10.2.)
  """
  def one_lane(*args):
    args = [jax.tree_util.tree_map(lambda x: x[0], a) if lane else a
            for a, lane in zip(args, lane_args)]
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], fn(*args))
  return jax.shard_map(one_lane, mesh=mesh,
                       in_specs=tuple(P(SEED_AXIS) if lane else P() for lane in lane_args),
                       out_specs=P(SEED_AXIS), axis_names={SEED_AXIS})


def lanes_to_global(lane_batches: Mapping[int, Mapping[str, np.ndarray]], num_seeds: int,
                    mesh: Mesh) -> dict:
  """{lane: this process's share of that lane's batch} -> global (K, B, ...) arrays.

  A process holds the lanes its devices belong to (all of them on one host) and, of each, the
  rows of its devices; the shares are stacked in lane order, which is the layout
  `make_array_from_process_local_data` expects for a contiguous block of the mesh.
  """
  sharding = batch_sharding(mesh)
  lanes = sorted(lane_batches)
  out = {}
  for key in lane_batches[lanes[0]]:
    local = np.stack([np.asarray(lane_batches[k][key]) for k in lanes])
    rows = local.shape[1] * len(lane_processes(mesh, lanes[0]))
    out[key] = jax.make_array_from_process_local_data(
        sharding, local, (num_seeds, rows, *local.shape[2:]))
  return out


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
