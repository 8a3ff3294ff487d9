"""optim.py against hand-derived numbers and a numpy transcription of torch.optim.AdamW.

Nothing here calls optax to compute an expected value: the references are the official recipe's
formulas (LambdaLinearScheduler warm-up, lr x global batch, LitEma's decay rule) written out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sdseg_jax import optim


def _config(**optim_fields):
  config = base.get_config()
  config.train.global_batch_size = 4
  for key, value in optim_fields.items():
    setattr(config.optim, key, value)
  return config


def test_peak_lr_is_base_lr_times_global_batch_when_scaled():
  assert optim.peak_learning_rate(_config(base_lr=1e-5)) == pytest.approx(4e-5)
  assert optim.peak_learning_rate(_config(base_lr=1e-5, scale_lr=False)) == pytest.approx(1e-5)


def test_warmup_is_the_official_linear_factor_then_constant():
  config = _config(base_lr=1e-5, warmup_steps=10_000, warmup_start_factor=1e-6)
  schedule = optim.learning_rate_schedule(config)
  peak = 4e-5
  for n in (0, 1, 2_500, 9_999, 10_000, 10_001, 250_000):
    factor = 1e-6 + (1.0 - 1e-6) * min(n, 10_000) / 10_000
    # float32 schedule arithmetic: exact to a few ulps of the peak
    assert float(schedule(n)) == pytest.approx(peak * factor, rel=1e-5, abs=peak * 3e-7), n
  no_warmup = optim.learning_rate_schedule(_config(base_lr=1e-5, warmup_steps=0))
  assert float(no_warmup(0)) == float(no_warmup(123)) == pytest.approx(peak)


def _torch_adamw(params, grads_per_step, lrs, b1, b2, eps, wd):
  """torch.optim.AdamW's update rule (decoupled decay before the Adam step), float64."""
  p = np.array(params, np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t, (g, lr) in enumerate(zip(grads_per_step, lrs), start=1):
    p = p * (1.0 - lr * wd)
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    m_hat, v_hat = m / (1.0 - b1 ** t), v / (1.0 - b2 ** t)
    p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
  return p


@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.5])
def test_adamw_matches_torch_rule_with_warmup(weight_decay):
  config = _config(base_lr=0.05, scale_lr=False, warmup_steps=3, warmup_start_factor=0.1,
                   weight_decay=weight_decay)
  tx = optim.make_optimizer(config)
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(5,)).astype(np.float32)
  grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(5)]
  params = {"w": jnp.asarray(p0)}
  opt_state = tx.init(params)
  for g in grads:
    updates, opt_state = tx.update({"w": jnp.asarray(g)}, opt_state, params)
    params = jax.tree_util.tree_map(lambda a, u: a + u, params, updates)
  lrs = [0.05 * (0.1 + 0.9 * min(n, 3) / 3) for n in range(5)]
  want = _torch_adamw(p0, grads, lrs, 0.9, 0.999, 1e-8, weight_decay)
  np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_by_global_norm():
  tx = optim.make_optimizer(_config(base_lr=1.0, scale_lr=False, warmup_steps=0,
                                    weight_decay=0.0, grad_clip_norm=1.0))
  params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
  state = tx.init(params)
  # Adam's first step is sign-like whatever the scale, so look at the clipped first moment.
  _, state = tx.update({"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}, state, params)
  adam_state = state[1][0]
  np.testing.assert_allclose(np.asarray(adam_state.mu["a"]), [0.1 * 0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(adam_state.mu["b"]), [0.1 * 0.8], rtol=1e-6)


def test_ema_decay_rule():
  for n, want in ((1, 2 / 11), (2, 3 / 12), (10, 11 / 20), (89_990, 0.9999), (10 ** 6, 0.9999)):
    assert float(optim.ema_decay(jnp.int32(n), 0.9999)) == pytest.approx(want, rel=1e-6), n
  assert float(optim.ema_decay(jnp.int32(1), 0.9999, use_num_updates=False)) == pytest.approx(
      0.9999)
  assert float(optim.ema_decay(jnp.int32(5), 0.3)) == pytest.approx(0.3)


def test_ema_update_moves_the_shadow_towards_the_params():
  shadow = {"w": jnp.array([1.0, -2.0])}
  params = {"w": jnp.array([3.0, 2.0])}
  got = optim.ema_update(shadow, params, jnp.float32(0.75))
  np.testing.assert_allclose(np.asarray(got["w"]), [0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 2])
