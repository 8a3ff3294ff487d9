"""The SDSeg training loop, readable top to bottom.

  config -> mesh -> data -> weights (VAE, UNet, vision encoder) -> state + shardings
  -> compiled step -> loop (log, evaluate, checkpoint) -> export

A workdir that already holds a checkpoint is resumed: the state AND the data iterator are
restored, so the resumed run sees exactly the batches an uninterrupted run would have seen.
SIGTERM (preemptible TPUs, SLURM requeue) finishes the current step, saves and exits cleanly.

The workdir and every config.init.* weight file may be local or gs:// (see storage.py); a bucket
that is missing, unreachable or read-only stops the run before anything is written.
"""

import contextlib
import logging
import signal
import time
from typing import Any, Dict, Iterator, Optional

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdseg_jax import checkpoint as checkpoint_lib
from sdseg_jax import config_lib
from sdseg_jax import evaluators
from sdseg_jax import export
from sdseg_jax import logging_lib
from sdseg_jax import optim
from sdseg_jax import restore
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import state as state_lib
from sdseg_jax import step as step_lib
from sdseg_jax import storage
from sdseg_jax import vae_pretrain
from sdseg_jax.data import pipeline
from sdseg_jax.data import registry
from sdseg_jax.evaluators import common as evaluators_common
from sdseg_jax.models import model_config
from sdseg_jax.models import sdseg
from sdseg_jax.weights import artifacts
from sdseg_jax.weights import loading


class StopRequest:
  """Turns SIGTERM into a flag checked between steps (all hosts stop at the same step)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del frame
      logging.warning("signal %d received: saving a checkpoint and stopping", signum)
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some test runners): no handler
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))


def split_dir(workdir: epath.Path) -> epath.Path:
  return workdir / "splits"


def check_storage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Every gs:// location of the run is usable, or a StorageError/DataError naming it.

  Runs before anything is written, so a typo or a missing bucket never leaves a half-started
  run behind (nor a local `gs:` folder: `storage.path` rejects malformed URLs).
  """
  storage.check_bucket(workdir, write=True)
  for field in ("vae", "unet", "sdseg"):
    value = config.init.get(field)
    if value:
      storage.check_bucket(storage.path(value), write=False)
  registry.check_location(config.data)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
  """Checks the config, its evaluators and its storage; writes WORKDIR/config.json."""
  workdir = storage.path(workdir)
  config_lib.validate(config)
  evaluators.specs(config)  # an unknown evaluator type or option stops the run here
  check_storage(config, workdir)
  if jax.process_index() == 0:
    config_lib.dump(config, workdir)
  return workdir


def train_loader(config: ml_collections.ConfigDict, workdir: epath.Path, process_index: int,
                 process_count: int) -> Any:
  """The run's endless, resumable training iterator (this process's share of each batch)."""
  return pipeline.make_train_loader(
      config.data, split_dir=split_dir(workdir),
      global_batch_size=config.train.global_batch_size, process_index=process_index,
      process_count=process_count, seed=config.seed, worker_count=config.data.worker_count,
      num_classes=model_config.num_classes(config.model))


def compute_scale_factor(model: sdseg.SDSeg, vae_params: Any, mask: jax.Array,
                         rng: jax.Array) -> float:
  """Official scale_by_std: 1 / std of posterior samples of the first batch's masks (ddof 1)."""
  z = jax.jit(lambda v, m, k: model.encode_mask(v, m, jnp.float32(1.0), k))(vae_params, mask,
                                                                            rng)
  return float(1.0 / jnp.std(z, ddof=1))


def load_frozen_vae(config, model, workdir, mesh, abstract_vae, vae_sh, rng) -> Any:
  """The frozen VAE: converted kl-f8, a converted SDSeg checkpoint, or the demo's pretraining."""
  path, what = vae_pretrain.frozen_vae_source(config, workdir)
  if path.is_file() or path != vae_pretrain.saved_path(workdir):  # configured files must exist
    return loading.place(loading.read(str(path), "vae", abstract_vae, what), vae_sh)
  logging.info("no kl-f8 weights configured: pre-training the VAE on the training %s for %d "
               "steps", "images and masks" if config.init.pretrain_vae_images else "masks",
               config.init.pretrain_vae_steps)
  vae = jax.jit(lambda k: model.init(k)[1], out_shardings=vae_sh)(rng)
  batches = pipeline.make_train_loader(
      config.data, split_dir=split_dir(workdir),
      global_batch_size=config.init.pretrain_vae_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      seed=config.seed + 1000, worker_count=config.data.worker_count)
  vae = vae_pretrain.pretrain_vae(model, vae, batches, steps=config.init.pretrain_vae_steps,
                                  learning_rate=config.init.pretrain_vae_lr, mesh=mesh,
                                  rng=jax.random.fold_in(rng, 1),
                                  with_images=config.init.pretrain_vae_images)
  # The VAE is replicated: every process holds a full copy on its first local device.
  host = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), vae)
  if jax.process_index() == 0:
    artifacts.save(path, {"vae": host}, {"kind": "pretrained_vae",
                                          "steps": config.init.pretrain_vae_steps})
  return vae


def initial_params(config, model, abstract_params, param_sh, vae_params, rng) -> Any:
  """Trainable params: SDSeg checkpoint, or kl-f8 encoder copy + (LSUN) UNet, else random."""
  params = jax.jit(lambda k: model.init(k)[0], out_shardings=param_sh)(rng)
  if config.init.sdseg:
    for key in ("unet", "vision_encoder"):
      abstract, shardings = abstract_params[key], param_sh[key]
      # Official multi-class fine-tune: a BINARY SDSeg checkpoint + a random class embedding.
      fresh = key == "unet" and restore.lacks_label_emb(config.init.sdseg, abstract)
      if fresh:
        abstract = {k: v for k, v in abstract.items() if k != optim.LABEL_EMB}
        shardings = {k: v for k, v in shardings.items() if k != optim.LABEL_EMB}
      loaded = loading.place(
          loading.read(config.init.sdseg, key, abstract, f"SDSeg {key}"), shardings)
      if fresh:
        loaded[optim.LABEL_EMB] = params[key][optim.LABEL_EMB]
      params[key] = loaded
    return params
  # The vision encoder starts as a copy of the (frozen) VAE encoder; its 1x1 `out` stays random.
  params["vision_encoder"]["encoder"] = jax.jit(
      lambda e: jax.tree_util.tree_map(jnp.copy, e),
      out_shardings=param_sh["vision_encoder"]["encoder"])(vae_params["encoder"])
  if config.init.unet:
    params["unet"] = loading.place(
        loading.read(config.init.unet, "unet", abstract_params["unet"], "LDM UNet"),
        param_sh["unet"])
  else:
    logging.warning("config.init.unet is empty: the UNet starts from random weights (the paper "
                    "starts from LSUN-Churches)")
  return params


@contextlib.contextmanager
def finish_saves_on_error(ckpt: checkpoint_lib.Checkpointer) -> Iterator[None]:
  """On any error in the loop, lets an in-flight async save commit before the error propagates.

  Otherwise the interpreter shuts down under orbax's writer threads, and the checkpoint being
  written (the last good one, when the loop stops on a diverged step) is left half-written.
  """
  try:
    yield
  except BaseException:
    ckpt.close()
    raise


def last_good(ckpt: checkpoint_lib.Checkpointer) -> str:
  """Where a resume would start from: the newest saved step's folder, or "" if none."""
  step = ckpt.latest_step()
  return "" if step is None else f"{ckpt.directory}/{step} (step {step})"


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) a run in `workdir` up to config.train.max_steps; returns final metrics."""
  workdir = prepare(config, workdir)

  # ---- mesh and model ---------------------------------------------------------------------------
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.global_batch_size_check(config.train.global_batch_size, mesh)
  model = sdseg.build(config.model)
  tx = optim.make_optimizer(config)  # AdamW, label_emb at a scaled lr if multi-class
  rng = jax.random.key(config.seed)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # ---- data -------------------------------------------------------------------------------------
  if config.data.check_before_training:
    from sdseg_jax.data import check  # pylint: disable=g-import-not-at-top
    check.quick_check(config.data, split_dir(workdir))
  train_iter = train_loader(config, workdir, jax.process_index(), jax.process_count())
  eval_loader = pipeline.make_eval_loader(
      config.data, config.eval.split, split_dir=split_dir(workdir),
      batch_size=config.eval.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  evals = evaluators.from_config(config, model, mesh, eval_loader)  # config.evals

  # ---- abstract state and shardings ------------------------------------------------------------
  layout = sharding_lib.train_layout(model, tx, mesh, config.mesh.strategy)
  abstract_params, param_sh = layout.params, layout.param_shardings
  abstract_vae, vae_sh = layout.vae, layout.vae_shardings
  abstract_state, state_sh = layout.state, layout.state_shardings
  create = lambda p, s: state_lib.create(p, tx, jax.random.fold_in(rng, 7), s)
  abstract_state_sh = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sh)

  # ---- weights and state: resume, or initialise --------------------------------------------------
  vae_params = load_frozen_vae(config, model, workdir, mesh, abstract_vae, vae_sh,
                         jax.random.fold_in(rng, 1))
  ckpt = checkpoint_lib.Checkpointer(
      workdir / "checkpoints", keep_last=config.checkpoint.keep_last,
      keep_best=config.checkpoint.keep_best, async_save=config.checkpoint.async_save)
  first_batch = None
  if ckpt.latest_step() is not None:
    state, data_state, _ = ckpt.restore(abstract_state_sh)
    if data_state is not None:
      pipeline.restore_train_state(train_iter, data_state,
                                   str(ckpt.directory / str(ckpt.latest_step())))
    logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
  else:
    params = initial_params(config, model, abstract_params, param_sh, vae_params,
                             jax.random.fold_in(rng, 2))
    first_batch = next(train_iter)
    scale = config.scale_factor
    if config.init.sdseg and scale <= 0:
      scale = float(artifacts.load(config.init.sdseg)[0]["scale_factor"])
    if scale <= 0:
      mask = sharding_lib.host_batch_to_global({"mask": first_batch["mask"]}, mesh)["mask"]
      scale = compute_scale_factor(model, vae_params, mask, jax.random.fold_in(rng, 3))
    logging.info("latent scale factor %.6g", scale)
    state = jax.jit(create, out_shardings=state_sh)(params, jnp.float32(scale))

  # ---- the compiled step ---------------------------------------------------------------------
  abstract_vae_sh = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_vae, vae_sh)
  train_step, stats = step_lib.compile_train_step(
      model, tx, config, mesh, abstract_state_sh, state_sh, abstract_vae_sh, vae_sh,
      config.data.image_size)
  logging.info("train step compiled in %.1f s %s", stats["compile_seconds"],
               {k: v for k, v in stats.items() if k != "compile_seconds"})

  # ---- the loop -------------------------------------------------------------------------------
  writer = logging_lib.MetricWriter(workdir, config.log.tensorboard)
  writer.write(int(state.step), {"compile/train_step_seconds": stats["compile_seconds"]})
  progress = progress_bar(config, int(state.step))
  last_eval: Dict[str, Any] = {}
  start_step = int(state.step)
  tick, tick_step = time.perf_counter(), start_step
  profile = logging_lib.ProfileWindow(workdir, config.log.profile_start_step,
                                      config.log.profile_steps)
  with StopRequest() as stop, finish_saves_on_error(ckpt), profile:
    for step in range(start_step, config.train.max_steps):
      profile.before_step(step, state)
      batch = first_batch if first_batch is not None else next(train_iter)
      first_batch = None
      batch = sharding_lib.host_batch_to_global(batch, mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, batch, vae_params)
      done = step + 1
      final = done == config.train.max_steps
      if done % config.log.every_steps == 0 or final:
        metrics = jax.device_get(metrics)
        logging_lib.check_finite(metrics, done, last_good(ckpt))
        now = time.perf_counter()
        rate = (done - tick_step) * config.train.global_batch_size / max(now - tick, 1e-9)
        tick, tick_step = now, done
        scalars = {f"train/{k}": v for k, v in metrics.items()}
        scalars["train/images_per_second"] = rate
        writer.write(done, scalars)
        if progress is not None:
          progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", img_s=f"{rate:.1f}")
      if progress is not None:
        progress.update(1)
      stopping = stop.agreed()
      ckpt_metrics = None
      if done % config.eval.every_steps == 0 or final:
        last_eval = run_evaluators(evals, state, vae_params, config, workdir, writer, done)
        ckpt_metrics = last_eval
      if done % config.checkpoint.every_steps == 0 or final or stopping:
        # Never save a diverged state: the previous checkpoint stays the newest one.
        metrics = jax.device_get(metrics)
        logging_lib.check_finite(metrics, done, last_good(ckpt))
        ckpt.save(done, state, data_state=train_iter.get_state(), metrics=ckpt_metrics,
                  extra={"scale_factor": float(state.scale_factor)}, force=stopping)
      if stopping:
        break
  if progress is not None:
    progress.close()
  ckpt.wait_until_finished()

  # ---- export and curves ---------------------------------------------------------------------
  if int(state.step) >= config.train.max_steps:
    export_finished(config, workdir, state)
  ckpt.close()
  writer.close()
  return {"step": int(state.step), **last_eval}


def export_finished(config: ml_collections.ConfigDict, workdir: epath.Path,
                    state: state_lib.TrainState) -> None:
  """A finished run's inference export (WORKDIR/export/inference.npz) and training curves."""
  export.export_inference(
      workdir / "export" / "inference.npz", unet_params=state.ema_unet,
      vision_encoder_params=state.params["vision_encoder"],
      scale_factor=float(state.scale_factor), model_config_json=config.model.to_json(),
      vae_reference=str(vae_pretrain.frozen_vae_source(config, workdir)[0]),
      dtype=config.checkpoint.get("export_dtype", "float32"))
  if jax.process_index() == 0:
    from sdseg_jax import plots  # pylint: disable=g-import-not-at-top
    plots.plot_training_curves(workdir / "metrics.jsonl", workdir / "curves.png")


def run_evaluators(evals, state, vae_params, config, workdir, writer, step) -> Dict[str, float]:
  """Runs the config's evaluators with the EMA UNet and the live vision encoder (as the
  official); returns their scalars as {"<prefix>/<name>": value} (what checkpoints rank by)."""
  params = {"unet": state.ema_unet, "vision_encoder": state.params["vision_encoder"]}
  scalars: Dict[str, float] = {}
  for prefix, evaluator in evals:
    start = time.perf_counter()
    result = evaluator.run(params, vae_params, state.scale_factor)
    values = {f"{prefix}/{k}": v for k, v in evaluator.scalars(result).items()}
    writer.write(step, {**values, f"{prefix}/seconds": time.perf_counter() - start})
    scalars.update(values)
    path = evaluators_common.write_panels(
        result.get("panels", []), workdir / "panels" / f"step_{step:07d}.png")
    logging.info("step %d: %s on %s %s cases%s", step,
                 " ".join(f"{k} {v:.4f}" for k, v in values.items()),
                 result.get("num_cases", len(result.get("cases", {}))), config.eval.split,
                 f" (panels: {path})" if path else "")
  return scalars


def progress_bar(config, initial: int) -> Optional[Any]:
  if not config.log.progress_bar or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=config.train.max_steps, initial=initial, unit="step", dynamic_ncols=True,
              desc="train")
