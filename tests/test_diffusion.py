"""diffusion.py against the LDM/SDSeg formulas written out in float64 numpy.

Nothing here reuses the module's own maths for the expected values: the schedule is rebuilt from
LDM's `make_beta_schedule("linear")` definition, and q_sample, x0 recovery, the loss, the
single-step predictor and DDIM are transcribed from their equations. Shapes are tiny, so the
whole file runs in a few seconds (it is also the mutation-testing subset of diffusion.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdseg_jax import diffusion


def _ldm_linear(timesteps, start, end):
  """LDM make_beta_schedule("linear"): float64 betas and their cumulative alpha product."""
  betas = np.linspace(np.sqrt(start), np.sqrt(end), timesteps, dtype=np.float64) ** 2
  return betas, np.cumprod(1.0 - betas)


def _rand(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_default_schedule_is_sdseg_linear_1000_steps():
  schedule = diffusion.make_schedule()
  betas, abar = _ldm_linear(1000, 0.0015, 0.0155)
  assert schedule.num_timesteps == 1000
  assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == np.float32
  np.testing.assert_allclose(schedule.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(schedule.alphas_cumprod, abar, rtol=1e-6)
  assert schedule.betas[0] == pytest.approx(0.0015, rel=1e-6)
  assert schedule.betas[-1] == pytest.approx(0.0155, rel=1e-6)


def test_schedule_arguments_are_used():
  schedule = diffusion.make_schedule(10, linear_start=1e-4, linear_end=0.2)
  betas, abar = _ldm_linear(10, 1e-4, 0.2)
  np.testing.assert_allclose(schedule.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(schedule.alphas_cumprod, abar, rtol=1e-6)


def test_derived_coefficients():
  schedule = diffusion.make_schedule(20, 1e-3, 0.3)
  abar = schedule.alphas_cumprod.astype(np.float64)
  for got, want in ((schedule.sqrt_alphas_cumprod, np.sqrt(abar)),
                    (schedule.sqrt_one_minus_alphas_cumprod, np.sqrt(1.0 - abar)),
                    (schedule.sqrt_recip_alphas_cumprod, 1.0 / np.sqrt(abar)),
                    (schedule.sqrt_recipm1_alphas_cumprod, np.sqrt((1.0 - abar) / abar))):
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.fixture(scope="module")
def schedule():
  return diffusion.make_schedule(20, 1e-3, 0.3)


@pytest.fixture(scope="module")
def arrays():
  """z0, noise, eps_hat (B, 2, 3, 4) and distinct per-sample timesteps."""
  shape = (3, 2, 3, 4)
  return _rand(0, shape), _rand(1, shape), _rand(2, shape), np.array([0, 7, 19], np.int32)


def test_q_sample(schedule, arrays):
  z0, noise, _, t = arrays
  abar = schedule.alphas_cumprod.astype(np.float64)[t][:, None, None, None]
  want = np.sqrt(abar) * z0 + np.sqrt(1.0 - abar) * noise
  got = diffusion.q_sample(schedule, jnp.asarray(z0), jnp.asarray(t), jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_predict_x0_inverts_q_sample_and_is_float32(schedule, arrays):
  z0, noise, eps, t = arrays
  abar = schedule.alphas_cumprod.astype(np.float64)[t][:, None, None, None]
  z_t = (np.sqrt(abar) * z0 + np.sqrt(1.0 - abar) * noise).astype(np.float32)
  want = (z_t - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
  got = diffusion.predict_x0_from_eps(schedule, jnp.asarray(z_t), jnp.asarray(t), jnp.asarray(eps))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # with the true noise the clean latent comes back
  back = diffusion.predict_x0_from_eps(schedule, jnp.asarray(z_t), jnp.asarray(t),
                                       jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(back), z0, atol=1e-4)
  low = diffusion.predict_x0_from_eps(schedule, jnp.asarray(z_t, jnp.bfloat16), jnp.asarray(t),
                                      jnp.asarray(eps, jnp.bfloat16))
  assert low.dtype == jnp.float32


@pytest.mark.parametrize("latent_weight", [None, 0.25])
def test_sdseg_loss_is_l1_noise_plus_weighted_l1_latent(schedule, arrays, latent_weight):
  z0, noise, eps, t = arrays
  abar = schedule.alphas_cumprod.astype(np.float64)[t][:, None, None, None]
  z_t = (np.sqrt(abar) * z0 + np.sqrt(1.0 - abar) * noise).astype(np.float32)
  z0_hat = (z_t - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
  loss_noise = np.mean(np.abs(noise - eps))
  loss_latent = np.mean(np.abs(z0_hat - z0))
  kwargs = {} if latent_weight is None else {"latent_weight": latent_weight}
  weight = 1.0 if latent_weight is None else latent_weight
  loss, terms = diffusion.sdseg_loss(schedule, jnp.asarray(z0), jnp.asarray(z_t), jnp.asarray(t),
                                     jnp.asarray(noise), jnp.asarray(eps), **kwargs)
  assert set(terms) == {"loss", "loss_noise", "loss_latent"}
  np.testing.assert_allclose(float(terms["loss_noise"]), loss_noise, rtol=1e-5)
  np.testing.assert_allclose(float(terms["loss_latent"]), loss_latent, rtol=1e-5)
  np.testing.assert_allclose(float(loss), loss_noise + weight * loss_latent, rtol=1e-5)
  assert float(terms["loss"]) == float(loss)
  assert loss.dtype == jnp.float32


def test_sdseg_loss_casts_low_precision_inputs_to_float32(schedule, arrays):
  z0, noise, eps, t = arrays
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  loss, terms = diffusion.sdseg_loss(schedule, bf(z0), bf(z0), jnp.asarray(t), bf(noise), bf(eps))
  assert loss.dtype == terms["loss_noise"].dtype == terms["loss_latent"].dtype == jnp.float32
  ref = np.mean(np.abs(np.asarray(bf(noise), np.float32) - np.asarray(bf(eps), np.float32)))
  np.testing.assert_allclose(float(terms["loss_noise"]), ref, rtol=1e-6)


def test_single_step_calls_the_denoiser_once_at_the_last_timestep(schedule, arrays):
  _, z_T, _, _ = arrays
  calls = []

  def eps_fn(z, t):
    calls.append((t.shape, t.dtype, np.asarray(t)))
    return 0.5 * z + 0.01 * t.astype(jnp.float32)[:, None, None, None]

  got = diffusion.single_step(schedule, eps_fn, jnp.asarray(z_T))
  assert len(calls) == 1
  shape, dtype, t = calls[0]
  assert shape == (3,) and dtype == jnp.int32 and (t == 19).all()
  abar = float(schedule.alphas_cumprod[19])
  eps = 0.5 * z_T + 0.01 * 19
  want = (z_T - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_ddim_timesteps_are_ldm_uniform():
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 50), np.arange(0, 1000, 20) + 1)
  np.testing.assert_array_equal(diffusion.ddim_timesteps(20, 4), [1, 6, 11, 16])
  np.testing.assert_array_equal(diffusion.ddim_timesteps(20, 1), [1])
  np.testing.assert_array_equal(diffusion.ddim_timesteps(20, 20), np.arange(1, 21))
  for bad in (0, 21):
    with pytest.raises(ValueError, match=r"DDIM steps must be in \[1, 20\], got " + str(bad)):
      diffusion.ddim_timesteps(20, bad)


def _ddim_reference(schedule, eps_fn, z_T, steps, eta, rng):
  """DDIMSampler's p_sample_ddim loop in float64; the same jax.random noise draws."""
  c = schedule.num_timesteps // steps
  taus = np.arange(0, schedule.num_timesteps, c) + 1
  abar = schedule.alphas_cumprod.astype(np.float64)
  x = np.asarray(z_T, np.float64)
  key = rng
  for idx in reversed(range(len(taus))):
    a_t = abar[taus[idx]]
    a_prev = abar[taus[idx - 1]] if idx > 0 else abar[0]
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
    eps = eps_fn(x, np.full((x.shape[0],), taus[idx]))
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    key, sub = jax.random.split(key)
    noise = np.asarray(jax.random.normal(sub, x.shape, jnp.float32), np.float64)
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * noise
  return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_matches_the_ldm_sampler(schedule, arrays, eta):
  _, z_T, _, _ = arrays
  eps_np = lambda x, t: 0.3 * x + 0.02 * t[:, None, None, None]  # noqa: E731

  def eps_jax(x, t):
    assert t.dtype == jnp.int32 and t.shape == (3,)  # timesteps index tables: integers
    return 0.3 * x + 0.02 * t.astype(jnp.float32)[:, None, None, None]

  rng = jax.random.key(3)
  want = _ddim_reference(schedule, eps_np, z_T, 4, eta, rng)
  got = diffusion.ddim_sample(schedule, eps_jax, jnp.asarray(z_T), 4, eta, rng)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
