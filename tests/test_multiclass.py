"""Multi-class (class-embedding) SDSeg: inference rule, class sampling, training, scoring."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdseg_jax import benchmark
from sdseg_jax import checkpoint as checkpoint_lib
from sdseg_jax import config_lib
from sdseg_jax import evaluate
from sdseg_jax import inference
from sdseg_jax import metrics
from sdseg_jax import optim
from sdseg_jax import restore
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import state as state_lib
from sdseg_jax import step as step_lib
from sdseg_jax.data import pipeline
from sdseg_jax.data import transforms
from sdseg_jax.models import sdseg
from tests import trained_run

K = 3
SIZE = trained_run.SIZE


def _label_map(index: int) -> np.ndarray:
  """Two blobs of different classes (1 left, 2 right); some maps hold only one of them."""
  yy, xx = np.mgrid[0:SIZE, 0:SIZE]
  label = np.zeros((SIZE, SIZE), np.uint8)
  shift = index % 4
  if index % 3 != 2:
    label[(yy - 10 - shift) ** 2 + (xx - 9) ** 2 < 30] = 1
  if index % 3 != 1:
    label[(yy - 20) ** 2 + (xx - 22 - shift) ** 2 < 40] = 2
  return label


def _records(n: int):
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8),
           "mask": _label_map(i), "name": f"m{i}", "case": f"m{i}", "slice": -1}
          for i in range(n)]


def _class_dataset(n: int, seed: int = 5):
  prep = transforms.Preprocess(SIZE, "bilinear", target="multiclass", train=True,
                               keep_label=True)
  return grain.MapDataset.source(_records(n)).map(prep).random_map(
      transforms.ClassTarget(K), seed=seed)


def _config():
  config = trained_run.tiny_config(num_classes=K)
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 0.0
  return config


# ---- inference ---------------------------------------------------------------------------------


def test_background_negation_rule():
  # Two pixels, K = 3 raw decoded maps. Pixel 0: "any organ" (class 0's target) is high and
  # class 1 beats class 2 -> label 1. Pixel 1: "any organ" is low -> background.
  maps = jnp.array([[[[0.9, -0.9]]],     # class 0 (organ union)
                    [[[0.8, -0.8]]],     # class 1
                    [[[-0.5, -0.7]]]])   # class 2
  probs = inference.scores_to_probabilities(maps)
  assert probs.shape == (1, 1, 2, K)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(jnp.argmax(probs, -1), [[[1, 0]]])
  np.testing.assert_allclose(probs[0, 0, 1], jax.nn.softmax(jnp.array([0.9, -0.8, -0.7])),
                             rtol=1e-6)
  # Without the negation pixel 0 would be called background: the rule matters.
  assert int(jnp.argmax(maps[:, 0, 0, 0])) == 0


@pytest.fixture(scope="module")
def tiny_model():
  model = sdseg.build(_config().model)
  params, vae = jax.jit(model.init)(jax.random.key(0))
  return model, params, vae


@pytest.fixture(scope="module")
def trained_like_model(tiny_model):
  """The tiny model with random non-zero weights everywhere.

  `init` zero-initialises the UNet's output conv, so eps = 0 and every class decodes to the
  same map: a test on init weights cannot see ignored or permuted class ids.
  """
  model = tiny_model[0]
  params, vae = benchmark.random_params(model, seed=3)
  return model, params, vae


def test_predict_labels_is_one_batched_pass_per_class(trained_like_model):
  model, params, vae = trained_like_model
  image = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, 3), minval=-1, maxval=1)
  z_T = jax.random.normal(jax.random.key(2), (2, model.latent_size, model.latent_size,
                                              model.latent_channels))
  scale = jnp.float32(0.5)
  out = jax.jit(lambda p, v, x, z: inference.predict_labels(model, p, v, x, z, scale))(
      params, vae, image, z_T)
  assert out["labels"].shape == (2, SIZE, SIZE) and out["labels"].dtype == jnp.int32
  assert out["probs"].shape == (2, SIZE, SIZE, K)
  assert int(out["labels"].min()) >= 0 and int(out["labels"].max()) < K

  @jax.jit
  def one_class(p, v, x, z, k):
    cond = model.encode_image(p, x)
    z0 = model.predict_latent(p["unet"], cond, z, jnp.full((x.shape[0],), k, jnp.int32))
    return jnp.mean(model.decode(v, z0, scale), axis=-1)

  separate = jnp.stack([one_class(params, vae, image, z_T, k) for k in range(K)])
  # The class id must change the map, or the comparisons below could not see a wrong class.
  for a in range(K):
    for b in range(a + 1, K):
      assert float(jnp.abs(separate[a] - separate[b]).max()) > 1e-2, (a, b)
  np.testing.assert_allclose(out["maps"], separate, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(out["labels"], jnp.argmax(
      inference.scores_to_probabilities(separate), -1))


# ---- training data -----------------------------------------------------------------------------


def test_sample_class_rules():
  label = _label_map(0)
  seen = set()
  for seed in range(30):
    k, target = transforms.sample_class(label, K, np.random.default_rng(seed))
    seen.add(k)
    want = (label != 0) if k == 0 else (label == k)
    np.testing.assert_array_equal(target, want.astype(np.uint8))
  assert seen == {0, 1, 2}
  only_one = _label_map(1)  # background + class 1
  assert {transforms.sample_class(only_one, K, np.random.default_rng(s))[0]
          for s in range(20)} == {0, 1}
  with pytest.raises(ValueError, match="num_classes=2"):
    transforms.sample_class(label, 2, np.random.default_rng(0))


def test_class_target_is_seeded_per_element():
  ds = _class_dataset(12)
  first = [(int(e["class_id"]), e["mask"].copy()) for e in ds]
  again = [(int(e["class_id"]), e["mask"]) for e in _class_dataset(12)]
  for (k1, m1), (k2, m2) in zip(first, again):
    assert k1 == k2
    np.testing.assert_array_equal(m1, m2)
  assert len({k for k, _ in first}) > 1
  for i, (k, mask) in enumerate(first):
    label = _label_map(i)
    assert k in np.unique(label)
    want = (label != 0) if k == 0 else (label == k)
    np.testing.assert_array_equal(mask[..., 0] > 0, want)
    assert set(np.unique(mask)) <= {-1.0, 1.0}
  element = ds[0]
  assert "label" not in element and element["class_id"].dtype == np.int32


def test_train_loader_carries_class_ids():
  config = trained_run.tiny_config()
  pipeline.ensure_absl_flags_parsed()
  loader = pipeline.make_train_loader(config.data, split_dir=None, global_batch_size=8,
                                      process_index=0, process_count=1, seed=0, worker_count=0,
                                      num_classes=2)
  batch = next(loader)
  assert batch["class_id"].shape == (8,) and batch["class_id"].dtype == np.int32
  assert set(batch["class_id"].tolist()) <= {0, 1}
  assert batch["mask"].shape == (8, SIZE, SIZE, 3)


def test_label_emb_learning_rate_is_scaled():
  config = _config()
  tx = optim.make_optimizer(config)
  params = {"unet": {"label_emb": {"embedding": jnp.zeros((K, 4))},
                     "time_embed_0": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}},
            "vision_encoder": {"out": {"kernel": jnp.zeros((1, 1, 8, 4))}}}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  lr = config.optim.base_lr
  # Adam's first update is lr * g / (|g| + eps) = lr per element for a unit gradient.
  for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    scale = optim.LABEL_EMB_LR_SCALE if "label_emb" in jax.tree_util.keystr(path) else 1.0
    np.testing.assert_allclose(np.asarray(leaf), -lr * scale, rtol=1e-5)
  # Binary runs keep the plain optimizer (and so the checkpoint layout of binary runs).
  assert not isinstance(optim.make_optimizer(trained_run.tiny_config()).init(params),
                        optax.MultiTransformState)


# ---- training step, checkpoint, restore, evaluation ---------------------------------------------


def test_train_step_restore_and_foreground_eval(tiny_model, tmp_path):
  model, params, vae = tiny_model
  config = _config()
  mesh = sharding_lib.make_mesh(config.mesh)
  tx = optim.make_optimizer(config)
  rng = jax.random.key(0)
  abstract_params, abstract_vae = jax.eval_shape(model.init, rng)
  create = lambda p, s: state_lib.create(p, tx, jax.random.fold_in(rng, 7), s)
  abstract_state = jax.eval_shape(create, abstract_params, jnp.float32(1))
  state_sh = sharding_lib.param_shardings(abstract_state, mesh, "dp")
  vae_sh = jax.tree_util.tree_map(lambda _: sharding_lib.replicated(mesh), abstract_vae)
  with_sh = lambda tree, sh: jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  train_step, _ = step_lib.compile_train_step(
      model, tx, config, mesh, with_sh(abstract_state, state_sh), state_sh,
      with_sh(abstract_vae, vae_sh), vae_sh, SIZE)
  state = jax.jit(create, out_shardings=state_sh)(params, jnp.float32(0.5))
  before = jax.tree_util.tree_map(np.asarray, state.params["unet"])

  elements = [_class_dataset(8)[i] for i in range(8)]
  batch = {k: np.stack([e[k] for e in elements]) for k in ("image", "mask", "class_id")}
  state, metrics = train_step(state, sharding_lib.host_batch_to_global(batch, mesh),
                              jax.device_put(vae, vae_sh))
  assert np.isfinite(float(metrics["loss"]))

  # LDM zero-initialises the UNet's output conv and every ResBlock's second conv, so the class
  # embedding (added to the time embedding before those convs) gets gradients from step 3 on.
  for _ in range(2):
    state, metrics = train_step(state, sharding_lib.host_batch_to_global(batch, mesh),
                                jax.device_put(vae, vae_sh))
    assert np.isfinite(float(metrics["loss"]))
  after = np.asarray(state.params["unet"]["label_emb"]["embedding"])
  assert np.abs(after - before["label_emb"]["embedding"]).max() > 0

  # A checkpoint of this state restores through restore.load_run (multi_transform opt state),
  # and the evaluator scores the class-embedding model on the foreground.
  workdir = tmp_path / "run"
  with config.unlocked():
    config.init.vae = str(trained_run.random_vae(tmp_path / "vae.npz", config))
  config_lib.dump(config, workdir)
  with checkpoint_lib.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
    ckpt.save(1, state, metrics={"eval/dice": 0.5})
  run = restore.load_run(workdir, "best")
  assert run.num_classes == K and run.step == 1
  np.testing.assert_array_equal(np.asarray(run.params["unet"]["label_emb"]["embedding"]),
                                np.asarray(state.ema_unet["label_emb"]["embedding"]))
  result = evaluate.evaluate(run, "val")
  assert result["n_cases"] == 8 and 0.0 <= result["mean"]["dice"] <= 1.0


def test_fine_tune_from_a_binary_checkpoint_keeps_a_random_label_emb(tiny_model, tmp_path):
  from sdseg_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from sdseg_jax.weights import artifacts  # pylint: disable=g-import-not-at-top
  model, params, vae = tiny_model
  binary_unet = {k: v for k, v in params["unet"].items() if k != optim.LABEL_EMB}
  path = tmp_path / "binary_sdseg.npz"
  host = lambda t: jax.tree_util.tree_map(np.asarray, t)
  artifacts.save(path, {"unet": host(binary_unet), "vision_encoder": host(
      params["vision_encoder"]), "vae": host(vae)}, {"kind": "sdseg", "scale_factor": 0.5})
  config = _config()
  config.init.sdseg = str(path)
  assert restore.lacks_label_emb(str(path), params["unet"])
  mesh = sharding_lib.make_mesh(config.mesh)
  abstract_params, _ = jax.eval_shape(model.init, jax.random.key(0))
  param_sh = sharding_lib.param_shardings(abstract_params, mesh, "dp")
  got = train_lib.initial_params(config, model, abstract_params, param_sh, vae,
                                  jax.random.key(9))
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         host({k: got["unet"][k] for k in binary_unet}), host(binary_unet))
  emb = np.asarray(got["unet"][optim.LABEL_EMB]["embedding"])
  assert emb.shape == params["unet"][optim.LABEL_EMB]["embedding"].shape
  assert not np.array_equal(emb, params["unet"][optim.LABEL_EMB]["embedding"])


# ---- scoring ---------------------------------------------------------------------------------


def test_per_class_dice_and_volume_aggregation():
  gt = _label_map(0)
  pred = gt.copy()
  pred[pred == 2] = 0  # class 2 missed entirely
  scores = metrics.per_class_dice(pred, gt, K)
  assert set(scores) == {1, 2}
  assert scores[1]["dice"] == pytest.approx(1.0) and scores[2]["dice"] == 0.0
  # Per volume: slices' counts are summed before the Dice, then cases, then classes averaged.
  counts = {"vol": metrics.class_counts(pred, gt, K) + metrics.class_counts(gt, gt, K),
            "img": metrics.class_counts(gt, gt, K)}
  summary = metrics.summarize_class_counts(counts)
  inter, p, g = counts["vol"][2]
  vol_dice2 = 2 * inter / (p + g)
  assert summary["cases"]["vol"]["dice_2"] == pytest.approx(vol_dice2)
  assert summary["per_class"][2]["dice"] == pytest.approx((vol_dice2 + 1.0) / 2)
  assert summary["dice"] == pytest.approx((1.0 + (vol_dice2 + 1.0) / 2) / 2)
