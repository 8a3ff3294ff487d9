"""grain pipelines: sharding, determinism, resumable state, flips, eval padding."""

import numpy as np
import pytest

from sdseg_jax.data import configs
from sdseg_jax.data import pipeline
from sdseg_jax.data import transforms
from tests import test_data_fakes as fakes

N = 20


@pytest.fixture(scope="module")
def polyp_config(tmp_path_factory):
  root = fakes.write_polyp_set(tmp_path_factory.mktemp("polyp"), n=N)
  c = configs.get_data_config("kvasir", str(root))
  c.image_size = 16
  c.val_size = 0
  c.test_size = 5
  return c


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("run") / "splits"


def _loader(c, split_dir, **kw):
  args = dict(split_dir=split_dir, global_batch_size=4, process_index=0, process_count=1,
              seed=7, worker_count=0)
  args.update(kw)
  return pipeline.make_train_loader(c, **args)


def test_train_batch_shapes_and_ranges(polyp_config, split_dir):
  batch = next(_loader(polyp_config, split_dir))
  assert set(batch) == {"image", "mask"}
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (4, 16, 16, 3) and batch["mask"].dtype == np.float32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert set(np.unique(batch["mask"])) <= {-1.0, 1.0}
  np.testing.assert_array_equal(batch["mask"][..., 0], batch["mask"][..., 2])


def test_flips_are_shared_by_image_and_mask(polyp_config, split_dir):
  it = _loader(polyp_config, split_dir)
  patterns = set()
  for _ in range(5):
    batch = next(it)
    # Channel 0 of the fake image is the mask: they must agree pixel for pixel after flips.
    np.testing.assert_array_equal(batch["image"][..., 0] > 0, batch["mask"][..., 0] > 0)
    for m in batch["mask"][..., 0] > 0:
      patterns.add(m.tobytes())
  assert len(patterns) == 4  # all four flip combinations of the asymmetric shape occur


def test_process_shards_are_disjoint_and_cover_the_epoch(polyp_config, split_dir):
  train_size = N - 5
  # 15 samples, 2 processes x local batch 1 -> each epoch is split 8/7 across the interleaving;
  # over two processes the first 15 elements of the global order are exactly one epoch.
  seen = []
  for p in range(2):
    it = _loader(polyp_config, split_dir, global_batch_size=2, process_index=p, process_count=2)
    seen.append([fakes.sample_ids(next(it)["image"])[0] for _ in range(8)])
  epoch = sorted(seen[0][:8] + seen[1][:7])
  assert not set(seen[0][:8]) & set(seen[1][:7])
  train_ids = sorted(int(n[3:]) for n in (split_dir / "train.txt").read_text().split())
  assert epoch == train_ids and len(epoch) == train_size


def test_epochs_are_reshuffled_and_seed_is_deterministic(polyp_config, split_dir):
  def first(seed, count=30):
    it = _loader(polyp_config, split_dir, global_batch_size=1, seed=seed)
    return [fakes.sample_ids(next(it)["image"])[0] for _ in range(count)]
  a, b = first(3), first(3)
  assert a == b
  assert sorted(a[:15]) == sorted(a[15:30]) and a[:15] != a[15:30]
  assert first(4) != a


def test_state_restore_resumes_exactly(polyp_config, split_dir):
  it = _loader(polyp_config, split_dir)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = _loader(polyp_config, split_dir)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["mask"], want["mask"])


def test_worker_processes_give_the_same_stream_and_resume_exactly(polyp_config, split_dir):
  plain = _loader(polyp_config, split_dir)
  want = [next(plain) for _ in range(6)]
  ids = lambda batch: fakes.sample_ids(batch["image"])
  it = _loader(polyp_config, split_dir, worker_count=1)
  try:
    for expected in want[:3]:
      got = next(it)
      np.testing.assert_array_equal(got["image"], expected["image"])
      np.testing.assert_array_equal(got["mask"], expected["mask"])
    state = it.get_state()
  finally:
    it.close()
  # The state saved with workers resumes exactly at batch 3.
  for workers in (1,):
    resumed = _loader(polyp_config, split_dir, worker_count=workers)
    try:
      pipeline.restore_train_state(resumed, state, "ckpt/3")
      for expected in want[3:]:
        got = next(resumed)
        assert ids(got) == ids(expected), workers
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["mask"], expected["mask"])
    finally:
      if workers:
        resumed.close()
  # Without workers the saved structure differs: a clear error, not grain's bare KeyError.
  with pytest.raises(ValueError, match=r"ckpt/3: .*worker_count"):
    pipeline.restore_train_state(_loader(polyp_config, split_dir), state, "ckpt/3")


def test_eval_loader_pads_with_valid_flags(polyp_config, split_dir):
  seen = []
  for p in range(2):
    loader = pipeline.make_eval_loader(polyp_config, "test", split_dir=split_dir, batch_size=2,
                                       process_index=p, process_count=2)
    assert len(loader) == 2  # 5 samples -> 2 steps of 2 x 2
    batches = list(loader)
    assert len(batches) == 2
    for b in batches:
      assert b["image"].shape == (2, 16, 16, 3) and b["label"].shape == (2, 16, 16)
      assert b["label"].dtype == np.uint8 and b["valid"].dtype == bool
      assert b["slice"].tolist() == [-1, -1]
      seen += [str(n) for n, v in zip(b["name"], b["valid"]) if v]
    assert list(loader)[0]["name"].tolist() == batches[0]["name"].tolist()  # re-iterable
  test_names = (split_dir / "test.txt").read_text().split()
  assert sorted(seen) == sorted(test_names)


def test_eval_has_no_flips(polyp_config, split_dir):
  b = next(iter(pipeline.make_eval_loader(polyp_config, "test", split_dir=split_dir,
                                          batch_size=5, process_index=0, process_count=1)))
  np.testing.assert_array_equal(b["label"] > 0, b["image"][..., 0] > 0)
  assert b["label"][0, 2, 1] == 1  # the L-shape's corner stays top-left


def test_target_rules():
  label_map = np.array([[0, 1], [2, 0]], np.uint8)
  np.testing.assert_array_equal(transforms.binary_target(label_map, "cup"), [[0, 0], [1, 0]])
  np.testing.assert_array_equal(transforms.binary_target(label_map, "disc"), [[0, 1], [1, 0]])
  np.testing.assert_array_equal(transforms.binary_target(label_map, "foreground"),
                                [[0, 1], [1, 0]])
  with pytest.raises(ValueError):
    transforms.binary_target(label_map, "nope")


def test_float_images_map_to_unit_range():
  p = transforms.Preprocess(8, "bilinear", "multiclass", train=False)
  image = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
  mask = np.zeros((16, 16), np.uint8)
  mask[:8] = 3
  out = p.map({"image": image, "mask": mask, "name": "v_slice001", "case": "v", "slice": 1})
  assert out["image"].dtype == np.float32 and -1 <= out["image"].min() <= out["image"].max() <= 1
  assert set(np.unique(out["label"])) == {0, 3}  # multiclass keeps the label map
  assert out["slice"] == 1 and out["case"] == "v"


def test_horizontal_only_and_no_flips(polyp_config, split_dir):
  def patterns(flips):
    c = polyp_config.copy_and_resolve_references()
    c.flips = flips
    it = _loader(c, split_dir)
    return {m.tobytes() for _ in range(5) for m in next(it)["mask"][..., 0] > 0}
  assert len(patterns("h")) == 2 and len(patterns("none")) == 1
