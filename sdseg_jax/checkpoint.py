"""Training checkpoints (orbax); the standalone inference bundle is `sdseg_jax.export`.

A training checkpoint is one orbax step directory `<directory>/<step>/` with three items:

  state/   the train-state pytree (params, EMA params, optimizer state, step, PRNG key), written
           by `StandardSave` as sharded tensorstore/OCDBT arrays. Restore reads it straight into
           the shardings of an *abstract* state built for the CURRENT mesh, so a run saved on 8
           devices resumes on 4, on a (2, 4) mesh or on another host count. Typed PRNG keys
           (`jax.random.key`) are stored by orbax as their key data and rewrapped on restore.
  data/    the grain iterator state, one `process_<i>-of-<n>.json` per process (grain's own orbax
           handler), because every process reads a different shard of the data.
  meta/    small JSON: the caller's `extra` (scale_factor, config, ...) and all `metrics`.
  metrics/ orbax's copy of the metrics when they contain `best_metric` (used for "best").

Why these choices:
  * Atomicity comes from orbax: a step is written into `<step>.orbax-checkpoint-tmp-*` and renamed
    (or, on object stores, marked by `commit_success.txt`) only after every item of every process
    is complete. Listing ignores temporary directories, and leftovers of a crashed save are removed
    in the background by the next `Checkpointer` on the directory (at the latest before its first
    save), so a crash mid-save leaves the previous checkpoint as the latest restorable one.
  * Retention is an orbax preservation policy, `LatestN(keep_last)` OR `BestN(n=1)`: the newest
    `keep_last` steps survive whatever their metrics, and the best step by `best_metric` is never
    deleted. A checkpoint saved without that metric counts only towards "last".
  * Restore checks the stored tree structure and shapes against the abstract state *before*
    reading arrays, and turns every failure (missing or truncated files, wrong structure, wrong
    shapes, missing data state) into `CheckpointError` naming the step directory. A resume must
    never silently fall back to training from scratch.
  * Frozen weights (the VAE) are not part of the train state, so they are never checkpointed.

Inference reads (evaluate, predict, stability) open the directory with `read_only=True` and
`restore_subtree`: orbax's partial restore reads only the requested leaves (EMA UNet, vision
encoder, scale factor), so neither the optimizer nor a full train state is built, and a run
still writing into the directory is not disturbed (no cleanup of its temporary directories).

Multi-host: every process must call `save`, `restore`, `wait_until_finished` and `close` with
the same arguments, in the same order. Orbax synchronises the processes, each process writes the
array shards it owns and its own data-iterator file, and only the primary process (0) writes
the JSON metadata (`meta`, `metrics`, orbax's step metadata).

Async saves: with `async_save=True`, `save` returns once device arrays are copied to host memory,
and the files are written in a background thread; the caller may then donate or overwrite the
state. A process that exits (for example on SIGTERM) before `wait_until_finished()`/`close()` loses
only the step in flight; call `close()` on shutdown and use `reached_preemption` to save on
preemption notices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
import json
import math
import os
import re
from typing import Any

from absl import logging
from etils import epath
import grain.checkpoint as grain_checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp

from sdseg_jax import errors
from sdseg_jax import storage
from sdseg_jax import tree_fit
from sdseg_jax.checkpoint_data import DataStateHolder as _DataStateHolder

_STATE = "state"
_DATA = "data"
_META = "meta"


class CheckpointError(errors.UserFacingError, ValueError):
  """A checkpoint is missing, corrupt, unfinished, or does not fit the requested state."""


def _as_abstract(leaf: Any) -> Any:
  """Concrete arrays are accepted as targets too; orbax only needs shape, dtype and sharding."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


def _describe(error: Exception, limit: int = 600) -> str:
  """One-line cause for a CheckpointError; tensorstore errors embed kilobytes of spec JSON (the
  full error stays attached as `__cause__`)."""
  text = f"{type(error).__name__}: {error}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _json_metric(value: Any) -> Any:
  """Metrics may be device or numpy scalars; the metrics files are JSON."""
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class Checkpointer:
  """Saves and restores train state + data-iterator state + JSON metadata with orbax.

  Usage (every process runs the same code)::

    with Checkpointer(workdir / "ckpt", keep_last=3) as ckpt:
      if ckpt.latest_step() is not None:
        state, data_state, extra = ckpt.restore(abstract_state)
        if data_state is not None:
          train_iter.set_state(data_state)
      ...
      ckpt.save(step, state, data_state=train_iter.get_state(),
                metrics={"eval/dice": dice}, extra={"scale_factor": sf})
  """

  def __init__(self,
               directory: os.PathLike | str,
               *,
               keep_last: int = 3,
               keep_best: bool = True,
               best_metric: str = "eval/dice",
               best_mode: str = "max",
               async_save: bool = True,
               read_only: bool = False):
    """`read_only`: for inference; never writes, deletes or cleans up anything (a training run
    may be saving into the same directory), and only `restore_subtree` reads the state."""
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1 (the latest step is needed to resume), "
                       f"got {keep_last}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self._directory = storage.path(directory)  # local or gs:// (orbax writes through tensorstore)
    self._writing_step: int | None = None  # the newest step whose save was started
    self._best_metric = best_metric
    self._best_mode = best_mode

    # Best is always *tracked* (so `best_step()` works and orbax writes the metrics item); it is
    # only *preserved* beyond the last `keep_last` steps when keep_best is set.
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep_last)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=self._metric_value, reverse=(best_mode == "min"), n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=self._metric_value,
        best_mode=best_mode,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save and not read_only,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=options,
        item_handlers={
            # Same files as StandardCheckpointHandler; the PyTree handler can read a subtree.
            _STATE: ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler(),
            _DATA: grain_checkpoint.CheckpointHandler(),
            _META: ocp.JsonCheckpointHandler(),
        },
    )

  def _metric_value(self, metrics: Mapping[str, Any]) -> float:
    # Orbax only receives metrics that contain a finite `best_metric` (see `save`).
    return float(metrics[self._best_metric])

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def latest_step(self) -> int | None:
    """Newest step, or None when the directory holds no finished checkpoint.

    Includes a step whose async save is still in flight (`restore` waits for it to commit).
    """
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Step with the best `best_metric` among kept checkpoints, or None if none has it."""
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    """Committed steps, ascending; temporary (unfinished) step directories are not listed."""
    return sorted(self._manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a preemption notice has been agreed (multi-host jobs)."""
    return self._manager.reached_preemption(step)

  def save(self,
           step: int,
           state: Any,
           *,
           data_state: Any = None,
           metrics: Mapping[str, Any] | None = None,
           extra: Mapping[str, Any] | None = None,
           force: bool = False) -> None:
    """Starts saving `state` (and the optional data state and metadata) as `step`.

    Args:
      step: training step; steps must increase. A step not after the latest saved one is skipped
        (logged) unless `force`, which still refuses to overwrite an existing step.
      state: the train-state pytree of jax.Arrays (any sharding).
      data_state: `iterator.get_state()` of this process's grain iterator (bytes, str or a
        JSON-serialisable value); each process stores its own.
      metrics: scalar metrics; `best_metric`, when present and finite, ranks the checkpoint.
      extra: small JSON-serialisable metadata returned by `restore` (scale_factor, config, ...).
      force: save even if orbax's save-decision policy would skip this step.

    With `async_save`, files are written in the background; errors of that write surface from
    the next `save`, `wait_until_finished` or `close`.
    """
    step = int(step)
    metrics = {str(k): _json_metric(v) for k, v in (metrics or {}).items()}
    extra = dict(extra or {})
    try:
      json.dumps(extra)
      json.dumps(metrics)
    except TypeError as e:
      raise ValueError(f"save(step={step}): extra/metrics must be JSON-serialisable: {e}") from e
    ranked = metrics.get(self._best_metric)
    rank_metrics = None
    if isinstance(ranked, (int, float)) and math.isfinite(ranked):
      rank_metrics = {self._best_metric: float(ranked)}

    items = {
        _STATE: ocp.args.StandardSave(state),
        _META: ocp.args.JsonSave({"extra": extra, "metrics": metrics}),
    }
    if data_state is not None:
      items[_DATA] = grain_checkpoint.CheckpointSave(_DataStateHolder(data_state))
    try:
      with self._writing(step):
        saved = self._manager.save(step, args=ocp.args.Composite(**items),
                                   metrics=rank_metrics, force=force)
    except ocp.checkpoint_manager.StepAlreadyExistsError as e:
      raise CheckpointError(f"{self._step_dir(step)}: step {step} already exists; checkpoints "
                            "are never overwritten") from e
    self._writing_step = step
    if not saved:
      logging.info("Checkpoint save of step %d skipped (latest step is %s).", step,
                   self.latest_step())

  def _step_dir(self, step: int) -> epath.Path:
    return self._directory / str(step)

  def _resolve_step(self, step: int | str | None) -> int:
    if step is None or step == "latest":
      resolved = self.latest_step()
      if resolved is None:
        raise CheckpointError(f"{self._directory}: no finished checkpoint to restore")
      return resolved
    if step == "best":
      resolved = self.best_step()
      if resolved is None:
        raise CheckpointError(f"{self._directory}: no checkpoint carries the metric "
                              f"{self._best_metric!r}, so there is no 'best' step")
      return resolved
    if isinstance(step, str):
      raise ValueError(f"step must be an int, None, 'latest' or 'best', got {step!r}")
    if int(step) not in self.all_steps():
      raise CheckpointError(f"{self._step_dir(int(step))}: step {step} not found; available "
                            f"steps: {self.all_steps()}")
    return int(step)

  def _check_fits(self, step: int, abstract_state: Any, subtree: bool = False) -> None:
    """Stored tree (structure and shapes) vs the abstract state, from metadata only: every
    difference with its path (`tree_fit`), before orbax reads any array."""
    where = self._step_dir(step)
    try:
      stored = self._manager.item_metadata(step)[_STATE]
    except Exception as e:  # Missing/corrupt metadata surfaces as various orbax/OS errors.
      raise CheckpointError(f"{where}: cannot read the state metadata of step {step} "
                            f"({_describe(e)})") from e
    if stored is None:
      raise CheckpointError(f"{where}: step {step} has no readable '{_STATE}' item")
    details = tree_fit.mismatches(getattr(stored, "tree", stored), abstract_state,
                                  subtree=subtree)
    if details:
      raise CheckpointError(f"{where}: step {step} does not fit the requested state: "
                            + "; ".join(details))

  def restore(self,
              abstract_state: Any,
              *,
              step: int | str | None = None,
              restore_data_state: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """Restores a checkpoint into the shardings of `abstract_state`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `sharding` set for the CURRENT mesh
        (concrete jax.Arrays are accepted and only their shape/dtype/sharding are used). Dtypes
        may differ from the stored ones; orbax casts.
      step: None or "latest", "best" (by `best_metric`), or an int step.
      restore_data_state: set False to skip the iterator state, e.g. after changing the number of
        processes (each process's data state is stored under its process index and count).

    Returns:
      (state, data_state or None, extra dict).

    Raises:
      CheckpointError: naming the step directory, if the step is missing, unfinished, corrupt or
        does not fit `abstract_state`.
    """
    # A step whose async save is still in flight is listed but not yet committed.
    self._manager.wait_until_finished()
    step = self._resolve_step(step)
    where = self._step_dir(step)
    abstract_state = jax.tree_util.tree_map(_as_abstract, abstract_state)
    unsharded = [jax.tree_util.keystr(p) for p, leaf in
                 jax.tree_util.tree_flatten_with_path(abstract_state)[0]
                 if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None]
    if unsharded:
      raise ValueError(f"abstract_state leaves need a target sharding for the current mesh; "
                       f"missing for {unsharded[:3]} ({len(unsharded)} leaves)")
    self._check_fits(step, abstract_state)
    has_data = (where / _DATA).is_dir()
    holder = _DataStateHolder()
    items = {_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}
    if has_data and restore_data_state:
      items[_DATA] = grain_checkpoint.CheckpointRestore(holder)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Corruption surfaces as OSError, ValueError, tensorstore errors...
      raise CheckpointError(f"{where}: failed to restore step {step} ({_describe(e)})") from e
    meta = restored[_META]
    if not isinstance(meta, Mapping) or "extra" not in meta:
      raise CheckpointError(f"{where}: step {step} has malformed '{_META}' metadata: {meta!r}")
    data_state = holder.value if (has_data and restore_data_state) else None
    return restored[_STATE], data_state, dict(meta["extra"])

  def restore_subtree(self, abstract_subtree: Any, step: int) -> Any:
    """Reads only the leaves of `abstract_subtree` (same nesting as the saved state, as dicts,
    e.g. {"ema_unet": ..., "scale_factor": ...}) of `step`, into their shardings.

    Orbax partial restore: the other leaves (optimizer moments, live UNet, ...) are never read.
    Raises CheckpointError naming the step directory when a leaf is missing or misshapen.
    """
    where = self._step_dir(step)
    self._check_fits(step, abstract_subtree, subtree=True)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args,
                                         partial_restore=True)}))
    except Exception as e:  # Corruption surfaces as OSError, ValueError, tensorstore errors...
      raise CheckpointError(f"{where}: failed to restore step {step} ({_describe(e)})") from e
    return restored[_STATE]

  def wait_until_finished(self) -> None:
    """Blocks until the in-flight async save is committed (re-raises its error, if any)."""
    with self._writing(None):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the in-flight save and releases orbax's threads."""
    with self._writing(None):
      self._manager.close()

  @contextlib.contextmanager
  def _writing(self, step: int | None) -> Iterator[None]:
    """Turns a failed write (this step's, or the async one in flight) into a CheckpointError.

    The error says which step failed, why in one line (a full disk or quota is named as such),
    and which complete checkpoint a rerun resumes from: orbax commits a step only after all of
    it is written, so a failed save never replaces the previous checkpoint.
    """
    try:
      yield
    except ocp.checkpoint_manager.StepAlreadyExistsError:
      raise
    except Exception as e:  # tensorstore/OS/orbax errors of any type
      text = str(e)
      # An async write's error surfaces in a later call; its temporary folder names its step.
      named = re.search(r"[/\\](\d+)\.orbax-checkpoint-tmp", text)
      failed = int(named.group(1)) if named else (self._writing_step if step is None else step)
      if "No space left on device" in text or "os_error_code='28'" in text:
        cause = "no space left on device"
      elif "Disk quota exceeded" in text or "os_error_code='122'" in text:
        cause = "disk quota exceeded"
      else:
        cause = "write failed"
      committed = sorted(int(p.name) for p in self._directory.iterdir()
                         if p.name.isdigit() and failed is not None and int(p.name) != failed)
      resume = (f"the newest complete checkpoint is {self._step_dir(committed[-1])} (step "
                f"{committed[-1]})" if committed else "no complete checkpoint exists yet")
      raise CheckpointError(
          f"{self._step_dir(failed) if failed is not None else self._directory}: saving "
          f"checkpoint step {failed} failed: {cause} ({_describe(e, 300)}); {resume}, and a "
          f"rerun resumes from it once the problem is fixed") from e

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
