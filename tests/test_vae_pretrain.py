"""The kl-f8 stand-in: the pre-training loss written out in numpy, and that training on images and
masks reduces the reconstruction error of both (the vision encoder starts as its encoder)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from sdseg_jax import sharding as sharding_lib
from sdseg_jax import vae_pretrain
from sdseg_jax.data import synthetic
from sdseg_jax.models import sdseg
from tests import trained_run

SIZE = trained_run.SIZE


def _model_and_vae():
  model = sdseg.build(trained_run.tiny_config().model)
  vae = jax.jit(lambda k: model.vae.init(k, jnp.zeros((1, SIZE, SIZE, 3)))["params"])(
      jax.random.key(0))
  return model, vae


def _masks(n, offset=0):
  """Synthetic polyp masks in {-1, 1}, 3 channels, as SDSeg encodes them."""
  masks = [synthetic.generate(0, "train", offset + i, SIZE)["mask"] for i in range(n)]
  binary = np.stack([(m > 0).astype(np.float32) for m in masks])
  return np.repeat(binary[..., None] * 2.0 - 1.0, 3, axis=-1)


def _images(n, offset=0):
  """The synthetic RGB images that go with `_masks(n, offset)`, in [-1, 1] as the pipeline's."""
  return np.stack([synthetic.generate(0, "train", offset + i, SIZE)["image"]
                   for i in range(n)]).astype(np.float32) / 127.5 - 1.0


def test_loss_is_l1_sum_per_sample_plus_weighted_kl():
  model, vae = _model_and_vae()
  mask = jnp.asarray(_masks(2))
  rng = jax.random.key(3)
  loss, aux = vae_pretrain._loss(vae, mask, rng, vae=model.vae)  # pylint: disable=protected-access

  moments = np.asarray(model.vae.apply({"params": vae}, mask, method=model.vae.encode_moments),
                       np.float64)
  mean, logvar = np.split(moments, 2, axis=-1)
  logvar = np.clip(logvar, -30.0, 20.0)
  sample = np.asarray(model.vae.apply({"params": vae}, mask, method=model.vae.encode)
                      .sample(rng), np.float64)
  recon = np.asarray(model.vae.apply({"params": vae}, jnp.asarray(sample, jnp.float32),
                                     method=model.vae.decode), np.float64)
  rec = np.abs(recon - np.asarray(mask)).sum() / 2
  kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1.0 - logvar).sum() / 2
  np.testing.assert_allclose(float(aux["kl"]), kl, rtol=1e-4)
  np.testing.assert_allclose(float(loss), rec + 1e-6 * kl, rtol=1e-5)
  np.testing.assert_allclose(float(aux["rec_l1_mean"]), rec / np.prod(mask.shape[1:]),
                             rtol=1e-5)


def test_each_step_trains_on_images_and_masks_half_and_half():
  batch = {"image": _images(4), "mask": _masks(4)}
  np.testing.assert_array_equal(vae_pretrain.autoencoder_batch(batch),
                                np.concatenate([batch["image"][:2], batch["mask"][2:]]))


def test_pretraining_on_images_and_masks_reduces_the_mask_reconstruction_error(monkeypatch):
  model, vae = _model_and_vae()
  # One device: the 8 emulated test devices would only multiply the CPU compile time.
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  held_out = jnp.asarray(_masks(8, offset=1000))

  def error(params):
    posterior = model.vae.apply({"params": params}, held_out, method=model.vae.encode)
    recon = model.vae.apply({"params": params}, posterior.mean, method=model.vae.decode)
    return float(jnp.mean(jnp.abs(recon - held_out)))

  # With images, every step's input must come from `autoencoder_batch`, not the masks alone.
  inputs = []

  def recording_autoencoder_batch(batch):
    inputs.append(autoencoder_batch(batch))
    return inputs[-1]

  autoencoder_batch = vae_pretrain.autoencoder_batch
  monkeypatch.setattr(vae_pretrain, "autoencoder_batch", recording_autoencoder_batch)
  before = error(vae)
  images, masks = _images(64), _masks(64)
  batches = ({"image": images[i % 8 * 8:(i % 8 + 1) * 8], "mask": masks[i % 8 * 8:(i % 8 + 1) * 8]}
             for i in itertools.count())
  trained = vae_pretrain.pretrain_vae(model, vae, batches, steps=40, learning_rate=2e-3,
                                      mesh=mesh, rng=jax.random.key(1), with_images=True)
  assert len(inputs) == 40
  after = error(trained)
  assert after < 0.5 * before, (before, after)
