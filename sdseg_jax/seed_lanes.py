"""K seeds trained side by side in one job: one program, the state mapped over a "seed" axis.

A reproduction study trains one config with K seeds. On a slice with enough devices they need
not wait for each other: the mesh gets a leading "seed" axis of size K (each lane a (data, fsdp)
mesh over 1/K of the devices, sharding.make_seed_mesh), every array of the K runs gets a leading
K axis over it, and ONE compiled step, the single-run train step mapped over the lanes
(sharding.map_lanes), advances all K at once, so a v5e-32 trains 4 seeds in the time of one.
One program (rather than one sub-mesh per seed driven from K threads) keeps a multi-host job to
one sequence of collectives, in one order, on every host.

Lane k is the run `train.run(configs[k], workdirs[k])` would do: its own seed (parameter init,
data order, noise, dropout, the stand-in VAE's pre-training and the scale factor), its own data
iterator, evaluators, metrics, NaN guard and checkpoints in its own workdir. Checkpoints are
written in the single-run layout, so each workdir is an ordinary run directory: `main` resumes
it alone, `evaluate`, `predict` and `stability` read it. Results equal separate runs up to the
order of float reductions (tests/test_reproduce.py). All lanes step, evaluate and save at the
same steps; a lane that diverges stops every lane, each at its last good checkpoint.
"""

import contextlib
import dataclasses
import logging
import time
from typing import Any, Dict, List, Optional, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdseg_jax import checkpoint as checkpoint_lib
from sdseg_jax import errors
from sdseg_jax import evaluators
from sdseg_jax import logging_lib
from sdseg_jax import optim
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import state as state_lib
from sdseg_jax import step as step_lib
from sdseg_jax import train
from sdseg_jax.data import pipeline
from sdseg_jax.models import sdseg
from sdseg_jax.weights import artifacts


class SeedLaneError(errors.UserFacingError, ValueError):
  """Runs that cannot train side by side (the message says why and what to do instead)."""


def fits(num_seeds: int, device_count: int) -> bool:
  """Whether `num_seeds` runs can share `device_count` devices as equal lanes."""
  return num_seeds > 1 and device_count % num_seeds == 0


@dataclasses.dataclass
class _Lane:
  """One run of the job. `train_iter` is None on a process that holds none of its devices."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  rng: jax.Array
  vae: Any  # its frozen VAE on the single-run mesh (replicated)
  evals: list
  ckpt: checkpoint_lib.Checkpointer
  writer: logging_lib.MetricWriter
  train_iter: Optional[Any]


def _check_same_but_seed(configs: Sequence[ml_collections.ConfigDict]) -> None:
  def without_seed(config):
    values = config.to_dict()
    values.pop("seed")
    return values
  for config in configs[1:]:
    if without_seed(config) != without_seed(configs[0]):
      raise SeedLaneError("seed lanes train one config with several seeds; these configs "
                          "differ in more than `seed`")


def _stack(trees: Sequence[Any], shardings: Any) -> Any:
  return jax.jit(lambda *t: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *t),
                 out_shardings=shardings)(*trees)


def run(configs: Sequence[ml_collections.ConfigDict],
        workdirs: Sequence[str]) -> List[Dict[str, Any]]:
  """Trains (or resumes) len(configs) runs side by side; returns each run's final metrics."""
  num_seeds = len(configs)
  _check_same_but_seed(configs)
  config = configs[0]
  workdirs = [train.prepare(c, w) for c, w in zip(configs, workdirs)]

  # ---- meshes: a single run's over all devices (init, evaluation), and the lanes' -------------
  mesh = sharding_lib.make_mesh(config.mesh)
  seed_mesh = sharding_lib.make_seed_mesh(config.mesh, num_seeds)
  sharding_lib.global_batch_size_check(config.train.global_batch_size, seed_mesh)
  model = sdseg.build(config.model)
  tx = optim.make_optimizer(config)
  layout = sharding_lib.train_layout(model, tx, mesh, config.mesh.strategy)
  state_sh = layout.state_shardings
  lane_state_sh = sharding_lib.lane_shardings(state_sh, seed_mesh)
  abstract_state_sh = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), layout.state, state_sh)
  logging.info("%d seed lanes on mesh %s (%d processes)", num_seeds, dict(seed_mesh.shape),
               jax.process_count())

  # ---- each lane's data, evaluators, frozen VAE and checkpoints ---------------------------------
  lanes = [_make_lane(i, c, w, model, mesh, seed_mesh, layout)
           for i, (c, w) in enumerate(zip(configs, workdirs))]
  steps = [lane.ckpt.latest_step() for lane in lanes]
  if len(set(steps)) > 1:
    raise SeedLaneError(
        "seed lanes resume together, but their newest checkpoints are at different steps (" +
        ", ".join(f"{lane.workdir}: {s}" for lane, s in zip(lanes, steps)) +
        "); resume each one on its own with `python -m sdseg_jax.main --workdir DIR`")
  # The frozen VAE is shared when it is one file (kl-f8, a converted SDSeg checkpoint), per lane
  # when each run pre-trained its own stand-in.
  per_lane_vae = not (config.init.get("vae") or config.init.get("sdseg"))
  if per_lane_vae:
    vae = _stack([lane.vae for lane in lanes],
                 sharding_lib.lane_shardings(layout.vae_shardings, seed_mesh))
  else:
    vae = jax.device_put(lanes[0].vae, jax.tree_util.tree_map(
        lambda _: sharding_lib.replicated(seed_mesh), layout.vae_shardings))

  first_batch = None
  if steps[0] is not None:
    restored = []
    for lane in lanes:
      lane_state, data_state, _ = lane.ckpt.restore(abstract_state_sh)
      if lane.train_iter is not None and data_state is not None:
        where = str(lane.ckpt.directory / str(steps[0]))
        if data_state == pipeline.LANE_NOT_ON_THIS_PROCESS:
          raise SeedLaneError(f"{where}: this process held no part of this run when it was "
                              "saved; resume the job with the same number of processes")
        pipeline.restore_train_state(lane.train_iter, data_state, where)
      restored.append(lane_state)
    state = _stack(restored, lane_state_sh)
    del restored
    logging.info("resumed %d seed lanes at step %d", num_seeds, steps[0])
  else:
    params = _stack([train.initial_params(lane.config, model, layout.params,
                                          layout.param_shardings, lane.vae,
                                          jax.random.fold_in(lane.rng, 2)) for lane in lanes],
                    sharding_lib.lane_shardings(layout.param_shardings, seed_mesh))
    first_batch = _next_batch(lanes, num_seeds, seed_mesh)
    scales = _scale_factors(config, model, vae, per_lane_vae, first_batch["mask"], lanes,
                            seed_mesh)
    logging.info("latent scale factors %s", [f"{s:.6g}" for s in np.asarray(scales)])
    keys = jnp.stack([jax.random.key_data(jax.random.fold_in(lane.rng, 7)) for lane in lanes])
    create = sharding_lib.map_lanes(
        lambda p, k, s: state_lib.create(p, tx, jax.random.wrap_key_data(k), s), seed_mesh,
        (True, True, True))
    state = jax.jit(create, out_shardings=lane_state_sh)(params, keys, scales)

  # ---- the compiled step: the single-run step, mapped over the lanes --- -----------------------
  lane_abstract = lambda tree, sh: jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct((num_seeds, *x.shape), x.dtype, sharding=s), tree, sh)
  vae_sh = jax.tree_util.tree_map(lambda x: x.sharding, vae)
  abstract_vae = (lane_abstract(layout.vae, vae_sh) if per_lane_vae else
                  jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                           sharding=s),
                                         layout.vae, vae_sh))
  train_step, stats = step_lib.compile_train_step(
      model, tx, config, seed_mesh, lane_abstract(layout.state, lane_state_sh), lane_state_sh,
      abstract_vae, vae_sh, config.data.image_size, num_seeds=num_seeds,
      per_lane_vae=per_lane_vae)
  logging.info("seed-lane train step compiled in %.1f s", stats["compile_seconds"])
  take = jax.jit(lambda s, k: jax.tree_util.tree_map(lambda x: x[k], s),
                 out_shardings=state_sh)

  # ---- the loop -------------------------------------------------------------------------------
  start_step = int(state.step[0])
  for lane in lanes:
    lane.writer.write(start_step, {"compile/train_step_seconds": stats["compile_seconds"],
                                   "compile/seed_lanes": num_seeds})
  progress = train.progress_bar(config, start_step)
  last_eval: List[Dict[str, Any]] = [{} for _ in lanes]
  tick, tick_step = time.perf_counter(), start_step
  with train.StopRequest() as stop, _saves_finish_on_error(lanes):
    for step in range(start_step, config.train.max_steps):
      batch = first_batch if first_batch is not None else _next_batch(lanes, num_seeds,
                                                                        seed_mesh)
      first_batch = None
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, batch, vae)
      done = step + 1
      final = done == config.train.max_steps
      if done % config.log.every_steps == 0 or final:
        now = time.perf_counter()
        rate = (done - tick_step) * config.train.global_batch_size / max(now - tick, 1e-9)
        tick, tick_step = now, done
        _log(lanes, jax.device_get(metrics), done, rate)
        if progress is not None:
          progress.set_postfix(img_s_per_seed=f"{rate:.1f}")
      if progress is not None:
        progress.update(1)
      stopping = stop.agreed()
      evaluate = done % config.eval.every_steps == 0 or final
      save = done % config.checkpoint.every_steps == 0 or final or stopping
      if evaluate or save:
        if save:  # never save a diverged state: each lane's previous checkpoint stays newest
          _check_finite(lanes, jax.device_get(metrics), done)
        for k, lane in enumerate(lanes):
          lane_state = take(state, k)
          if evaluate:
            last_eval[k] = train.run_evaluators(lane.evals, lane_state, lane.vae, lane.config,
                                                lane.workdir, lane.writer, done)
          if save:
            data_state = (lane.train_iter.get_state() if lane.train_iter is not None
                          else pipeline.LANE_NOT_ON_THIS_PROCESS)
            lane.ckpt.save(done, lane_state, data_state=data_state,
                           metrics=last_eval[k] if evaluate else None,
                           extra={"scale_factor": float(lane_state.scale_factor)},
                           force=stopping)
      if stopping:
        break
  if progress is not None:
    progress.close()

  # ---- exports and curves ------------------------------------------------------------------------
  results = []
  for k, lane in enumerate(lanes):
    lane.ckpt.wait_until_finished()
    lane_state = take(state, k)
    if int(lane_state.step) >= config.train.max_steps:
      train.export_finished(lane.config, lane.workdir, lane_state)
    lane.ckpt.close()
    lane.writer.close()
    results.append({"step": int(lane_state.step), **last_eval[k]})
  return results


def _make_lane(index: int, config: ml_collections.ConfigDict, workdir: epath.Path,
               model: sdseg.SDSeg, mesh: jax.sharding.Mesh, seed_mesh: jax.sharding.Mesh,
               layout: sharding_lib.TrainLayout) -> _Lane:
  rng = jax.random.key(config.seed)
  if config.data.check_before_training:
    from sdseg_jax.data import check  # pylint: disable=g-import-not-at-top
    check.quick_check(config.data, train.split_dir(workdir))
  # A lane's batch rows lie on its own processes: each reads its share among those.
  holders = sharding_lib.lane_processes(seed_mesh, index)
  train_iter = None
  if jax.process_index() in holders:
    train_iter = train.train_loader(config, workdir, holders.index(jax.process_index()),
                                    len(holders))
  eval_loader = pipeline.make_eval_loader(
      config.data, config.eval.split, split_dir=train.split_dir(workdir),
      batch_size=config.eval.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  vae = train.load_frozen_vae(config, model, workdir, mesh, layout.vae, layout.vae_shardings,
                              jax.random.fold_in(rng, 1))
  ckpt = checkpoint_lib.Checkpointer(
      workdir / "checkpoints", keep_last=config.checkpoint.keep_last,
      keep_best=config.checkpoint.keep_best, async_save=config.checkpoint.async_save)
  return _Lane(config=config, workdir=workdir, rng=rng, vae=vae,
               evals=evaluators.from_config(config, model, mesh, eval_loader), ckpt=ckpt,
               writer=logging_lib.MetricWriter(workdir, config.log.tensorboard),
               train_iter=train_iter)


def _next_batch(lanes: Sequence[_Lane], num_seeds: int, seed_mesh: jax.sharding.Mesh) -> dict:
  shares = {k: next(lane.train_iter) for k, lane in enumerate(lanes)
            if lane.train_iter is not None}
  return sharding_lib.lanes_to_global(shares, num_seeds, seed_mesh)


def _scale_factors(config, model, vae, per_lane_vae, mask, lanes, seed_mesh) -> jax.Array:
  """Each lane's latent scale: the configured or checkpointed one, else scale_by_std of its
  first batch (train.compute_scale_factor, per lane)."""
  scale = config.scale_factor
  if config.init.sdseg and scale <= 0:
    scale = float(artifacts.load(config.init.sdseg)[0]["scale_factor"])
  if scale > 0:
    return jnp.full((len(lanes),), scale, jnp.float32)
  keys = jnp.stack([jax.random.key_data(jax.random.fold_in(lane.rng, 3)) for lane in lanes])

  def one(v, m, k):
    z = model.encode_mask(v, m, jnp.float32(1.0), jax.random.wrap_key_data(k))
    return 1.0 / jnp.std(z, ddof=1)
  per_lane = sharding_lib.map_lanes(one, seed_mesh, (per_lane_vae, True, True))
  return jax.jit(per_lane, out_shardings=sharding_lib.per_lane(seed_mesh))(vae, mask, keys)


def _log(lanes: Sequence[_Lane], metrics: Dict[str, np.ndarray], step: int,
         rate: float) -> None:
  _check_finite(lanes, metrics, step)
  for k, lane in enumerate(lanes):
    scalars = {f"train/{name}": value[k] for name, value in metrics.items()}
    scalars["train/images_per_second"] = rate
    lane.writer.write(step, scalars)


def _check_finite(lanes: Sequence[_Lane], metrics: Dict[str, np.ndarray], step: int) -> None:
  for k, lane in enumerate(lanes):
    logging_lib.check_finite({name: value[k] for name, value in metrics.items()}, step,
                             train.last_good(lane.ckpt))


def _saves_finish_on_error(lanes: Sequence[_Lane]) -> contextlib.ExitStack:
  """train.finish_saves_on_error for every lane's checkpointer."""
  stack = contextlib.ExitStack()
  for lane in lanes:
    stack.enter_context(train.finish_saves_on_error(lane.ckpt))
  return stack
