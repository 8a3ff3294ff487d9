"""grain input pipelines: an infinite, checkpointable train stream and a finite eval pass.

Both return HOST-LOCAL numpy batches: every process builds the same index sequence and reads
only its own share, and the training code assembles global arrays from the per-host pieces.

Train: a seeded shuffle of the whole split that is redrawn every epoch (grain's epoch-aware
`shuffle` over an endless `repeat`), seeded flips keyed on the GLOBAL element index, then
global batch k is elements [k*B, (k+1)*B) of that stream, of which process `p` of `P` reads the
rows [k*B + p*b, k*B + (p+1)*b) (b = B/P). So the P processes together read each epoch exactly
once, none reads what another does, the global batch (assembled in process order) is row for row
the batch of a single-process run, and the stream does not depend on the worker count.
The returned `grain.DatasetIterator` has `get_state()` / `set_state()` (and works with
`grain.checkpoint.CheckpointSave/Restore` in orbax), so a restored run sees the same batches.

Eval: no shuffle, no flips; the split is padded to a multiple of `batch_size * process_count` so
every process runs the same number of equally shaped batches (static shapes for jit, matching
collectives across hosts); padded rows repeat the first sample and carry `valid = False`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import grain
import numpy as np

from sdseg_jax import errors
from sdseg_jax import storage
from sdseg_jax.data import registry
from sdseg_jax.data import transforms
from sdseg_jax.data.base import DataError

Batch = dict[str, np.ndarray]


def ensure_absl_flags_parsed() -> None:
  """grain 0.2.17/0.2.18 reads absl flags in worker processes and raises
  `UnparsedFlagAccessError` when the program never parsed them (pytest, notebooks, scripts
  without `absl.app.run`). Marking them parsed keeps every flag at its default, which is what
  such programs get anyway; programs run under `app.run` are left untouched."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _preprocess(data_config, train: bool, keep_label: bool = False) -> transforms.Preprocess:
  return transforms.Preprocess(
      image_size=int(data_config.image_size),
      interpolation=data_config.get("interpolation", "bicubic"),
      target=data_config.get("target", "foreground"),
      train=train, keep_label=keep_label)


def make_train_loader(data_config, *, split_dir: storage.PathLike, global_batch_size: int,
                      process_index: int, process_count: int, seed: int,
                      worker_count: int,
                      num_classes: int | None = None) -> grain.DatasetIterator:
  """Infinite iterator of host-local train batches {"image", "mask"}: f32 (b, S, S, 3).

  b = global_batch_size // process_count. Reads `data_config` fields image_size, interpolation,
  target, flip_prob, flips, read_threads, prefetch (and the source's own fields).
  With `num_classes` (class-embedding runs) the mask is the binary target of one class drawn
  per element (`transforms.ClassTarget`) and the batch also carries "class_id" int32 (b,).
  """
  if global_batch_size % process_count:
    raise errors.ConfigError(f"global batch {global_batch_size} is not divisible by "
                             f"{process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  local_batch = global_batch_size // process_count
  source = registry.make_source(data_config, "train", split_dir)
  if len(source) < process_count:
    raise DataError(f"train split has {len(source)} samples for {process_count} processes")

  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds.map(_preprocess(data_config, train=True, keep_label=num_classes is not None))
  if num_classes is not None:
    # Its own stream (seed + 2): the class draw does not shift the flips' randomness.
    ds = ds.random_map(transforms.ClassTarget(num_classes), seed=seed + 2)
  flip_prob = float(data_config.get("flip_prob", 0.5))
  flips = data_config.get("flips", "hv")
  if flips not in ("hv", "h", "none"):
    raise errors.ConfigError(f"data.flips must be hv | h | none, got {flips!r}")
  if flip_prob > 0 and flips != "none":
    # A different stream than the shuffle's: seed + 1 (both derive from the run seed).
    ds = ds.random_map(transforms.RandomFlips(flip_prob, vertical=flips == "hv"), seed=seed + 1)
  # Batching the random-access dataset (not the iterator) fixes local batch k of process p to
  # elements [(k*P + p)*b, (k*P + p + 1)*b): row block p of global batch k, the rows a single
  # process would put there (so per-row noise and timesteps meet the same examples on any
  # process count). Worker processes (which take whole batches in turn) and read threads change
  # only the speed, never the stream.
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  threads = int(data_config.get("read_threads", 4))
  prefetch = int(data_config.get("prefetch", 2))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=max(prefetch, threads)))
  if worker_count > 0:
    ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch))
  return iter(it)


# What a multi-host seed-lane job saves as the data position of a run on a process that holds none
# of that run's devices (every process must write the same checkpoint items).
LANE_NOT_ON_THIS_PROCESS = {"seed_lane": "not on this process"}


def restore_train_state(iterator: grain.DatasetIterator, state: Any, source: str) -> None:
  """`iterator.set_state(state)`, with an error that says why a saved state does not fit.

  grain's state layout depends on the pipeline's shape: an iterator with worker processes
  (`config.data.worker_count > 0`) saves another structure than one without, and restoring one
  into the other fails deep inside grain with a bare KeyError.
  """
  if state == LANE_NOT_ON_THIS_PROCESS:
    raise DataError(
        f"{source}: this process held no part of this run when a seed-lane job saved it "
        "(sdseg_jax/seed_lanes.py), so there is no data position to resume from; resume it "
        "with the job's original number of processes (python -m sdseg_jax.reproduce)")
  try:
    iterator.set_state(state)
  except (KeyError, ValueError, TypeError, IndexError) as e:
    raise DataError(
        f"{source}: the saved data-iterator state does not fit this data pipeline "
        f"({type(e).__name__}: {e}). It was written with other data settings, most likely a "
        "different config.data.worker_count (0 vs > 0); resume with the run's original data "
        "settings (see config.json in the workdir).") from e


class _EvalElement(grain.transforms.Map):
  """Global eval index -> preprocessed element with `valid` (indices past the end are padding)."""

  def __init__(self, source: Any, preprocess: transforms.Preprocess):
    self.source = source
    self.preprocess = preprocess

  def map(self, index: int) -> dict[str, Any]:
    n = len(self.source)
    element = self.preprocess.map(self.source[index if index < n else 0])
    element["valid"] = np.bool_(index < n)
    return element


class EvalLoader:
  """Finite, re-iterable sequence of host-local eval batches with static shapes.

  Each batch: "image" f32 (b, S, S, 3), "label" uint8 (b, S, S), "name"/"case" str arrays,
  "slice" int32 (b,), "valid" bool (b,). `len()` is the number of batches, the same on every
  process.
  """

  def __init__(self, source: Any, preprocess: transforms.Preprocess, batch_size: int,
               process_index: int, process_count: int, read_threads: int = 4):
    self.num_examples = len(source)
    per_step = batch_size * process_count
    self.num_batches = max(1, math.ceil(self.num_examples / per_step))
    ds = grain.MapDataset.range(self.num_batches * per_step)[process_index::process_count]
    self._ds = ds.map(_EvalElement(source, preprocess)).batch(batch_size)
    self._read_options = grain.ReadOptions(num_threads=read_threads,
                                           prefetch_buffer_size=2 * read_threads)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Batch]:
    return iter(self._ds.to_iter_dataset(self._read_options))


def make_eval_loader(data_config, split: str, *, split_dir: storage.PathLike, batch_size: int,
                     process_index: int, process_count: int) -> EvalLoader:
  """Deterministic pass over `split` (no flips, no shuffle), padded, with a `valid` mask.

  `batch_size` is PER PROCESS (host-local); the global eval batch is batch_size * process_count.
  """
  source = registry.make_source(data_config, split, split_dir)
  return EvalLoader(source, _preprocess(data_config, train=False), batch_size, process_index,
                    process_count, int(data_config.get("read_threads", 4)))
