"""step.train_step's values, on a model small enough to write the SDSeg step out by hand.

test_train_step.py checks the real compiled step across meshes (equivalence, shardings,
donation); it cannot tell whether the step computes the right thing. Here the model is a
duck-typed stand-in whose stages are linear functions with explicit noise draws, and the
expected new state comes from the SDSeg training step written out independently: the documented
key derivation (fold_in(key, step), split into posterior / t / noise / encoder / UNet keys),
q_sample and the L1 noise + weighted L1 latent loss from their formulas, gradients of that
written-out loss, AdamW with the official warm-up, and LitEma's decay rule. Small shapes; the
whole file takes seconds, which also makes it the mutation-testing subset of step.py.
"""

import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from sdseg_jax import diffusion
from sdseg_jax import optim
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import state as state_lib
from sdseg_jax import step as step_lib

T = 50
B = 2
R = 8


class LinearModel:
  """The SDSeg stages the step calls, as linear maps with explicit noise (vae["w"] scales the
  mask latent, params["vision_encoder"]["v"] the condition, params["unet"]["a"/"b"] mix them,
  plus t / 100 so that the timestep must reach the denoiser)."""

  def __init__(self, num_classes=None):
    self.schedule = diffusion.make_schedule(T, 1e-3, 0.2)
    self.unet = types.SimpleNamespace(num_classes=num_classes)
    self.calls = []

  def encode_mask(self, vae_params, mask, scale_factor, rng=None):
    self.calls.append(("encode_mask", rng is None))
    z = mask[:, ::2, ::2, :2] * vae_params["w"]
    if rng is not None:
      z = z + 0.5 * jax.random.normal(rng, z.shape)
    return scale_factor * z

  def encode_image(self, params, image, train=False, rng=None):
    self.calls.append(("encode_image", train))
    c = image[:, ::2, ::2, 1:3] * params["vision_encoder"]["v"]
    return c + 0.1 * jax.random.normal(rng, c.shape)

  def denoise(self, unet_params, z_t, cond, t, y=None, train=False, rng=None):
    self.calls.append(("denoise", train, y is None))
    eps = z_t * unet_params["a"] + cond * unet_params["b"] + 0.05 * jax.random.normal(
        rng, z_t.shape) + 0.01 * t[:, None, None, None]
    if y is not None:
      eps = eps + 0.1 * y[:, None, None, None]
    return eps


def _config(sample_posterior=True, latent_loss_weight=0.5, use_num_updates=True):
  config = base.get_config()
  config.train.global_batch_size = B
  config.train.sample_posterior = sample_posterior
  config.train.latent_loss_weight = latent_loss_weight
  config.optim.base_lr = 0.01
  config.optim.scale_lr = True
  config.optim.warmup_steps = 10
  config.optim.warmup_start_factor = 0.1
  config.optim.weight_decay = 0.01
  config.ema.decay = 0.6
  config.ema.use_num_updates = use_num_updates
  return config


def _params():
  return {"unet": {"a": jnp.array([0.3, -0.2]), "b": jnp.array([0.7, 0.4])},
          "vision_encoder": {"v": jnp.float32(1.3)}}


def _batch(seed=0, class_id=None):
  rng = np.random.default_rng(seed)
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (B, R, R, 3)), jnp.float32),
           "mask": jnp.asarray(np.where(rng.random((B, R, R, 3)) < 0.4, 1.0, -1.0), jnp.float32)}
  if class_id is not None:
    batch["class_id"] = jnp.asarray(class_id, jnp.int32)
  return batch


VAE = {"w": jnp.float32(0.8)}


def _state(config, step=0):
  tx = optim.make_optimizer(config)
  state = state_lib.create(_params(), tx, jax.random.key(11), 0.3)
  # A shadow that differs from the params, so the EMA update is visible.
  state = state.replace(ema_unet={"a": jnp.array([0.1, 0.1]), "b": jnp.array([0.5, 0.5])})
  return state.replace(step=jnp.int32(step)), tx


def _reference(state, batch, config, class_id=None):
  """The SDSeg step written out: returns (params, ema_unet, opt_state, metrics)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  k_post, k_t, k_noise, k_enc, k_unet = jax.random.split(key, 5)
  z = batch["mask"][:, ::2, ::2, :2] * VAE["w"]
  if config.train.sample_posterior:
    z = z + 0.5 * jax.random.normal(k_post, z.shape)
  z0 = 0.3 * z
  t = jax.random.randint(k_t, (B,), 0, T)
  noise = jax.random.normal(k_noise, z0.shape, jnp.float32)
  betas = np.linspace(np.sqrt(1e-3), np.sqrt(0.2), T) ** 2
  abar = jnp.asarray(np.cumprod(1.0 - betas)[np.asarray(t)], jnp.float32)[:, None, None, None]
  z_t = jnp.sqrt(abar) * z0 + jnp.sqrt(1 - abar) * noise

  def loss_fn(params):
    cond = batch["image"][:, ::2, ::2, 1:3] * params["vision_encoder"]["v"]
    cond = cond + 0.1 * jax.random.normal(k_enc, cond.shape)
    eps = z_t * params["unet"]["a"] + cond * params["unet"]["b"]
    eps = eps + 0.05 * jax.random.normal(k_unet, z_t.shape) + 0.01 * t[:, None, None, None]
    if class_id is not None:
      eps = eps + 0.1 * jnp.asarray(class_id, jnp.float32)[:, None, None, None]
    z0_hat = (z_t - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)
    loss_noise = jnp.mean(jnp.abs(noise - eps))
    loss_latent = jnp.mean(jnp.abs(z0_hat - z0))
    loss = loss_noise + config.train.latent_loss_weight * loss_latent
    return loss, (loss_noise, loss_latent)

  (loss, (loss_noise, loss_latent)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  tx = optim.make_optimizer(config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  n = int(state.step) + 1
  decay = min(config.ema.decay, (1 + n) / (10 + n)) if config.ema.use_num_updates else 0.6
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_unet,
                               params["unet"])
  peak = 0.01 * B
  lr = peak * (0.1 + 0.9 * min(int(state.step), 10) / 10)
  sq = lambda tree: sum(float(jnp.sum(x ** 2)) for x in jax.tree_util.tree_leaves(tree))  # noqa
  metrics = dict(loss=loss, loss_noise=loss_noise, loss_latent=loss_latent,
                 grad_norm=np.sqrt(sq(grads)), param_norm=np.sqrt(sq(params)), learning_rate=lr,
                 ema_decay=decay)
  return params, ema, opt_state, metrics


def _assert_close(got, want, name):
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("step,sample_posterior,latent_loss_weight,use_num_updates",
                         [(0, True, 0.5, True), (4, False, 1.0, True), (23, True, 2.0, True),
                          (2, True, 2.0, False)])
def test_train_step_is_the_sdseg_step(step, sample_posterior, latent_loss_weight,
                                      use_num_updates):
  config = _config(sample_posterior, latent_loss_weight, use_num_updates)
  state, tx = _state(config, step)
  model = LinearModel()
  batch = _batch(step)
  new_state, metrics = step_lib.train_step(state, batch, VAE, model=model, tx=tx, config=config)
  params, ema, opt_state, want = _reference(state, batch, config)
  assert set(metrics) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(float(metrics[name]), float(value), rtol=2e-5, err_msg=name)
  _assert_close(new_state.params, params, "params")
  _assert_close(new_state.ema_unet, ema, "ema_unet")
  _assert_close(new_state.opt_state, opt_state, "opt_state")
  assert int(new_state.step) == step + 1
  np.testing.assert_array_equal(new_state.rng, state.rng)
  assert float(new_state.scale_factor) == pytest.approx(0.3)
  # the mask encoder samples the posterior only when asked; both networks run in train mode
  assert ("encode_mask", not sample_posterior) in model.calls
  assert ("encode_image", True) in model.calls and ("denoise", True, True) in model.calls


def test_class_ids_reach_the_unet():
  config = _config()
  state, tx = _state(config)
  model = LinearModel(num_classes=3)
  batch = _batch(1, class_id=[2, 0])
  new_state, metrics = step_lib.train_step(state, batch, VAE, model=model, tx=tx, config=config)
  params, _, _, want = _reference(state, batch, config, class_id=[2, 0])
  np.testing.assert_allclose(float(metrics["loss"]), float(want["loss"]), rtol=2e-5)
  _assert_close(new_state.params, params, "params")
  assert ("denoise", True, False) in model.calls


def test_gradients_do_not_flow_into_the_frozen_vae():
  config = _config()
  state, tx = _state(config)

  def loss_of_vae(w):
    _, metrics = step_lib.train_step(state, _batch(0), {"w": w}, model=LinearModel(), tx=tx,
                                     config=config)
    return metrics["loss"]

  assert float(jax.grad(loss_of_vae)(jnp.float32(0.8))) == 0.0


@pytest.mark.parametrize("num_classes", [None, 3])
def test_compiled_step_equals_the_python_step_and_reports_compile_stats(num_classes):
  config = _config()
  state, tx = _state(config, step=2)
  model = LinearModel(num_classes)
  batch = _batch(2, class_id=None if num_classes is None else [1, 2])
  want_state, want_metrics = step_lib.train_step(state, batch, VAE, model=model, tx=tx,
                                                 config=config)
  # Two devices, so the batch really is split and a wrong input sharding cannot pass unnoticed.
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 1}, jax.devices()[:2])
  replicated = sharding_lib.replicated(mesh)
  state_shardings = jax.tree_util.tree_map(lambda _: replicated, state)
  # one leaf split over the mesh (as FSDP does), which the compiler would not choose by itself
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  state_shardings = state_shardings.replace(
      params=dict(state_shardings.params, unet=dict(state_shardings.params["unet"], a=split)))
  vae_shardings = jax.tree_util.tree_map(lambda _: replicated, VAE)
  abstract = lambda tree: jax.tree_util.tree_map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  before = time.perf_counter()
  compiled, stats = step_lib.compile_train_step(
      model, tx, config, mesh, abstract(state), state_shardings, abstract(VAE), vae_shardings,
      image_size=R)
  assert 0 < stats["compile_seconds"] <= time.perf_counter() - before
  # the compiled step's contract: state/VAE laid out as given, batch split, metrics replicated
  (state_in_sh, batch_in_sh, vae_in_sh), _ = compiled.input_shardings
  state_out_sh, metrics_out_sh = compiled.output_shardings
  for got_sh in (state_in_sh, state_out_sh):
    for got, want in zip(jax.tree_util.tree_leaves(got_sh),
                         jax.tree_util.tree_leaves(state_shardings)):
      assert got.is_equivalent_to(want, 1), (got, want)
  assert state_out_sh.params["unet"]["a"].spec == jax.sharding.PartitionSpec("data")
  for got_sh in (vae_in_sh, metrics_out_sh):
    assert all(sh.is_fully_replicated for sh in jax.tree_util.tree_leaves(got_sh))
  assert all(sh == sharding_lib.batch_sharding(mesh)
             for sh in jax.tree_util.tree_leaves(batch_in_sh))
  assert stats["temp_bytes"] >= 0 and stats["argument_bytes"] > 0
  state_in = jax.device_put(jax.tree_util.tree_map(jnp.copy, state), state_shardings)
  batch_in = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
  got_state, got_metrics = compiled(state_in, batch_in, jax.device_put(VAE, replicated))
  _assert_close(got_state, want_state, "state")
  for name in want_metrics:
    np.testing.assert_allclose(float(got_metrics[name]), float(want_metrics[name]), rtol=2e-5)
  assert jax.tree_util.tree_leaves(state_in.params)[0].is_deleted()  # donated
  assert got_metrics["loss"].sharding.is_fully_replicated
  assert got_state.params["unet"]["a"].sharding == split
  with pytest.raises(ValueError):  # compiled for a batch split over the mesh, not one device
    compiled(got_state, jax.device_put(batch, jax.devices()[0]),
             jax.device_put(VAE, replicated))
