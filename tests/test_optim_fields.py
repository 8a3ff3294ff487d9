"""Every config.optim field reaches the optimiser (test_optim.py uses the official values, which
are also optax's defaults, so a dropped b1/b2/eps would pass there). Found by mutation testing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from sdseg_jax import optim


def _adam_numpy(p, grads, lr, b1, b2, eps, wd):
  """torch.optim.AdamW, float64 (decoupled decay, bias-corrected moments)."""
  p, m, v = np.array(p, np.float64), 0.0, 0.0
  for t, g in enumerate(grads, start=1):
    p = p * (1.0 - lr * wd)
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    p = p - lr * (m / (1.0 - b1 ** t)) / (np.sqrt(v / (1.0 - b2 ** t)) + eps)
  return p


def test_b1_b2_eps_and_weight_decay_are_the_configured_ones():
  config = base.get_config()
  config.optim.update(base_lr=0.1, scale_lr=False, warmup_steps=0, weight_decay=0.2, b1=0.5,
                      b2=0.7, eps=0.3)
  tx = optim.make_optimizer(config)
  rng = np.random.default_rng(1)
  p0 = rng.normal(size=4).astype(np.float32)
  grads = [rng.normal(size=4).astype(np.float32) * 0.1 for _ in range(3)]
  params = {"w": jnp.asarray(p0)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = {"w": params["w"] + updates["w"]}
  want = _adam_numpy(p0, grads, 0.1, 0.5, 0.7, 0.3, 0.2)
  np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,dtype", [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_first_moment_dtype(name, dtype):
  config = base.get_config()
  config.optim.mu_dtype = name
  state = optim.make_optimizer(config).init({"w": jnp.zeros(3)})
  mus = [leaf for leaf in jax.tree_util.tree_leaves(state) if leaf.shape == (3,)]
  assert mus[0].dtype == dtype and mus[1].dtype == jnp.float32  # mu, then nu


def test_no_clipping_at_zero_and_clipping_when_positive():
  config = base.get_config()
  config.optim.update(base_lr=1.0, scale_lr=False, warmup_steps=0, weight_decay=0.0)
  params = {"w": jnp.zeros(2)}
  grads = {"w": jnp.array([3.0, 4.0])}
  state = optim.make_optimizer(config).init(params)
  _, state = optim.make_optimizer(config).update(grads, state, params)
  np.testing.assert_allclose(np.asarray(state[0].mu["w"]), [0.3, 0.4], rtol=1e-6)
  config.optim.grad_clip_norm = 2.5
  tx = optim.make_optimizer(config)
  _, clipped = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(clipped[1][0].mu["w"]), [0.15, 0.2], rtol=1e-6)


def test_peak_lr_and_warmup_use_the_configured_numbers():
  config = base.get_config()
  config.train.global_batch_size = 3
  config.optim.update(base_lr=0.5, scale_lr=True, warmup_steps=4, warmup_start_factor=0.2)
  assert optim.peak_learning_rate(config) == 1.5
  schedule = optim.learning_rate_schedule(config)
  for n, want in ((0, 0.3), (1, 0.6), (2, 0.9), (4, 1.5), (9, 1.5)):
    assert float(schedule(n)) == pytest.approx(want, rel=1e-6), n
  config.optim.warmup_steps = 1  # one warm-up step still starts at the start factor
  one_step = optim.learning_rate_schedule(config)
  assert float(one_step(0)) == pytest.approx(0.3) and float(one_step(1)) == pytest.approx(1.5)
  config.optim.warmup_steps = -1  # a negative warm-up also means none
  assert float(optim.learning_rate_schedule(config)(0)) == pytest.approx(1.5)


def test_ema_decay_is_float32_in_both_modes():
  assert optim.ema_decay(jnp.int32(3), 0.9).dtype == jnp.float32
  assert optim.ema_decay(jnp.int32(3), 0.9, use_num_updates=False).dtype == jnp.float32
  assert float(optim.ema_decay(jnp.int32(0), 0.9999)) == pytest.approx(0.1)
