"""Checkpointer: resharding restore, retention, data state, corruption, crashes, inference bundle.

States are tiny (a few floats per leaf) so every test is I/O- and orbax-bound, not compute-bound;
nothing here is jitted.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax
import grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from sdseg_jax import checkpoint
from sdseg_jax import export
from sdseg_jax.checkpoint import Checkpointer
from sdseg_jax.checkpoint import CheckpointError
from sdseg_jax.weights import artifacts

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  rng: jax.Array


def _mesh(shape, names, n=None):
  devices = np.array(jax.devices()[:n or int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, names)


def _specs(sharded: P) -> TrainState:
  """Per-leaf PartitionSpecs: 'w' is sharded with `sharded`, everything else replicated."""
  params = {"w": sharded, "b": P()}
  return TrainState(
      step=P(), params=params, ema_params=params,
      opt_state=(optax.ScaleByAdamState(count=P(), mu=params, nu=params),
                 optax.EmptyState(), optax.EmptyState()),
      rng=P())


def _make_state(mesh: Mesh, sharded: P, seed: int = 0, step: int = 7) -> TrainState:
  w = jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4) + seed
  params = {"w": w, "b": jnp.full((3,), 0.5 + seed, jnp.float32)}
  opt_state = optax.adamw(1e-3).init(params)
  # Make the optimizer moments non-trivial so a mix-up between leaves would be visible.
  opt_state = (opt_state[0]._replace(count=jnp.int32(step),
                                     mu=jax.tree.map(lambda x: x * 2, params),
                                     nu=jax.tree.map(lambda x: x * 3, params)),
               *opt_state[1:])
  state = TrainState(step=jnp.int32(step), params=params,
                     ema_params=jax.tree.map(lambda x: x + 1, params), opt_state=opt_state,
                     rng=jax.random.key(seed))
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state,
                      _specs(sharded))


def _abstract(state: TrainState, mesh: Mesh, sharded: P) -> TrainState:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
      state, _specs(sharded))


def _assert_state_equal(got: TrainState, want: TrainState) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jnp.issubdtype(got.rng.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(got.rng), jax.random.key_data(want.rng))
  for g, w in zip(jax.tree.leaves(got.replace(rng=None)), jax.tree.leaves(want.replace(rng=None))):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.fixture(scope="module")
def mesh8():
  return _mesh((8, 1), ("data", "model"))


@pytest.fixture(scope="module")
def saved8(tmp_path_factory, mesh8):
  """One checkpoint saved from an (8, 1) mesh with 'w' sharded over 'data'."""
  directory = tmp_path_factory.mktemp("saved8")
  state = _make_state(mesh8, P("data"))
  with Checkpointer(directory) as ckpt:
    ckpt.save(7, state, extra={"scale_factor": 0.18215, "config": {"ch": 32}})
  return directory, state


@pytest.mark.parametrize("target", ["1d_4dev", "2x4"])
def test_restore_reshards_onto_smaller_and_2d_mesh(saved8, target):
  directory, saved = saved8
  if target == "1d_4dev":
    mesh, sharded = _mesh((4,), ("data",)), P("data")
  else:
    mesh, sharded = _mesh((2, 4), ("data", "model")), P("data", "model")
  abstract = _abstract(saved, mesh, sharded)
  with Checkpointer(directory) as ckpt:
    state, data_state, extra = ckpt.restore(abstract)
  _assert_state_equal(state, saved)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert got.sharding == want.sharding
  assert data_state is None
  assert extra == {"scale_factor": 0.18215, "config": {"ch": 32}}


def test_async_save_survives_donated_state(tmp_path, mesh8):
  """`save` returns after the device-to-host copy, so the loop may donate the state at once."""
  state = _make_state(mesh8, P("data"), seed=3)
  expected = jax.tree.map(np.asarray, state.replace(rng=None))
  expected_key = np.asarray(jax.random.key_data(state.rng))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    for leaf in jax.tree.leaves(state):
      leaf.delete()
    ckpt.wait_until_finished()
    restored, _, _ = ckpt.restore(_abstract(_make_state(mesh8, P("data")), mesh8, P("data")))
  for g, w in zip(jax.tree.leaves(restored.replace(rng=None)), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(g), w)
  np.testing.assert_array_equal(jax.random.key_data(restored.rng), expected_key)


def test_retention_keeps_last_n_and_best(tmp_path, mesh8):
  dice = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.4, 5: 0.5}
  with Checkpointer(tmp_path, keep_last=2) as ckpt:
    for step, d in dice.items():
      ckpt.save(step, _make_state(mesh8, P("data"), step=step), metrics={"eval/dice": d})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2
    assert ckpt.latest_step() == 5
    # A checkpoint without the metric still counts towards "last" and pushes out step 4.
    ckpt.save(6, _make_state(mesh8, P("data"), step=6), metrics={"train/loss": 0.1})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 5, 6]
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 5, 6]

  # A fresh Checkpointer (a resumed run) sees the same steps and ranks from the stored metrics.
  with Checkpointer(tmp_path, keep_last=2) as ckpt:
    assert ckpt.best_step() == 2
    abstract = _abstract(_make_state(mesh8, P("data")), mesh8, P("data"))
    best, _, _ = ckpt.restore(abstract, step="best")
    assert int(best.step) == 2
    latest, _, _ = ckpt.restore(abstract, step="latest")
    assert int(latest.step) == 6
    at5, _, _ = ckpt.restore(abstract, step=5)
    _assert_state_equal(at5, _make_state(mesh8, P("data"), step=5))


def test_best_mode_min_and_without_keep_best(tmp_path, mesh8):
  with Checkpointer(tmp_path / "min", keep_last=1, best_metric="eval/loss",
                    best_mode="min") as ckpt:
    for step, loss in [(1, 0.5), (2, 0.1), (3, 0.7)]:
      ckpt.save(step, _make_state(mesh8, P("data"), step=step), metrics={"eval/loss": loss})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.best_step() == 2
  with Checkpointer(tmp_path / "nobest", keep_last=1, keep_best=False) as ckpt:
    for step, d in [(1, 0.9), (2, 0.1)]:
      ckpt.save(step, _make_state(mesh8, P("data"), step=step), metrics={"eval/dice": d})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2]


def test_data_state_round_trip(tmp_path, mesh8):
  """A real grain iterator resumes where it stopped; raw bytes states round-trip unchanged."""
  dataset = grain.MapDataset.range(20).shuffle(seed=1).to_iter_dataset()
  iterator = iter(dataset)
  _ = [next(iterator) for _ in range(5)]
  state = _make_state(mesh8, P("data"))
  abstract = _abstract(state, mesh8, P("data"))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, data_state=iterator.get_state())
    expected_next = [next(iterator) for _ in range(3)]
    raw = b'{"workers": [1, 2]}\x00\xff'
    ckpt.save(2, state, data_state=raw)
    ckpt.wait_until_finished()
    _, data_state, _ = ckpt.restore(abstract, step=1)
    resumed = iter(dataset)
    resumed.set_state(data_state)
    assert [next(resumed) for _ in range(3)] == expected_next
    _, data_state, _ = ckpt.restore(abstract, step=2)
    assert data_state == raw
    _, skipped, _ = ckpt.restore(abstract, step=2, restore_data_state=False)
    assert skipped is None
  assert (tmp_path / "1" / "data" / "process_0-of-1.json").is_file()


def test_restore_errors_name_the_step(tmp_path, mesh8):
  state = _make_state(mesh8, P("data"))
  abstract = _abstract(state, mesh8, P("data"))
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
      ckpt.restore(abstract)
    ckpt.save(3, state)
    ckpt.wait_until_finished()
    with pytest.raises(CheckpointError, match="step 4 not found"):
      ckpt.restore(abstract, step=4)
    with pytest.raises(CheckpointError, match="no checkpoint carries the metric"):
      ckpt.restore(abstract, step="best")
    with pytest.raises(ValueError, match="need a target sharding"):
      ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract))
    # Saving the same step again is a no-op; forcing it must not overwrite.
    ckpt.save(3, _make_state(mesh8, P("data"), seed=9))
    with pytest.raises(CheckpointError, match="already exists"):
      ckpt.save(3, state, force=True)
    restored, _, _ = ckpt.restore(abstract)
    _assert_state_equal(restored, state)


@pytest.mark.parametrize("change", ["shape", "extra_leaf", "missing_leaf"])
def test_incompatible_abstract_state(saved8, mesh8, change):
  directory, saved = saved8
  abstract = _abstract(saved, mesh8, P("data"))
  rep = NamedSharding(mesh8, P())
  if change == "shape":
    params = dict(abstract.params, b=jax.ShapeDtypeStruct((5,), jnp.float32, sharding=rep))
    expected = r"shape mismatch params/b: checkpoint \(3,\) vs expected \(5,\)"
  elif change == "extra_leaf":
    params = dict(abstract.params, c=jax.ShapeDtypeStruct((2,), jnp.float32, sharding=rep))
    expected = "missing from the checkpoint.*params/c"
  else:
    params = {"w": abstract.params["w"]}
    expected = "unexpected leaves in the checkpoint.*params/b"
  with Checkpointer(directory) as ckpt:
    with pytest.raises(CheckpointError, match=expected) as info:
      ckpt.restore(abstract.replace(params=params))
  assert f"{directory / '7'}: step 7" in str(info.value)


# After a failed read, orbax/tensorstore may post a callback to an already closed asyncio loop;
# that is noise from their threads, not a lost error (the CheckpointError is asserted).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete_manifest", "truncate_data", "delete_meta"])
def test_corrupted_checkpoint_raises(tmp_path, mesh8, damage):
  state = _make_state(mesh8, P("data"))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(4, state, extra={"a": 1})
  step_dir = tmp_path / "4"
  if damage == "delete_manifest":
    (step_dir / "state" / "manifest.ocdbt").unlink()
  elif damage == "truncate_data":
    data_files = [p for p in (step_dir / "state").rglob("*")
                  if p.is_file() and p.parent.name == "d"]
    assert data_files
    for p in data_files:
      p.write_bytes(p.read_bytes()[:7])
  else:
    (step_dir / "meta" / "metadata").unlink()
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=f"{step_dir}.*step 4"):
      ckpt.restore(_abstract(state, mesh8, P("data")))


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp
    from sdseg_jax import checkpoint

    directory = sys.argv[1]
    state = {"w": jnp.arange(6.0), "step": jnp.int32(1)}
    ckpt = checkpoint.Checkpointer(directory)
    ckpt.save(1, state, data_state=b"one")
    ckpt.wait_until_finished()

    # Die like SIGKILL/preemption in the middle of step 2: array writes have been started, the
    # data-iterator item is being written, and nothing gets a chance to clean up.
    def die(self):
      os._exit(17)
    checkpoint._DataStateHolder.get_state = die
    ckpt.save(2, {"w": jnp.arange(6.0) * 2, "step": jnp.int32(2)}, data_state=b"two")
    ckpt.wait_until_finished()
    os._exit(0)
""")


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  result = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 17, result.stderr[-3000:]
  leftovers = [p.name for p in tmp_path.iterdir() if "tmp" in p.name]
  assert leftovers, f"the crash did not happen mid-save: {sorted(os.listdir(tmp_path))}"

  mesh = _mesh((8,), ("data",))
  abstract = {"w": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(mesh, P())),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    state, data_state, _ = ckpt.restore(abstract)
    np.testing.assert_array_equal(state["w"], np.arange(6.0))
    assert data_state == b"one"
    # The interrupted step can be saved again, and the temporary directory is gone.
    ckpt.save(2, jax.tree.map(lambda x: x + 0, state))
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2]
  assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]


def test_failed_save_raises_and_keeps_previous(tmp_path, mesh8, monkeypatch):
  state = _make_state(mesh8, P("data"))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    ckpt.wait_until_finished()

    def fail(self):
      raise OSError("disk full")
    monkeypatch.setattr(checkpoint._DataStateHolder, "get_state", fail)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"/2: saving checkpoint step 2 failed: write failed \(OSError: disk "
                             r"full\); the newest complete checkpoint is \S+/1 \(step 1\)"):
      ckpt.save(2, state, data_state=b"x")
      ckpt.wait_until_finished()
  monkeypatch.undo()
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    restored, _, _ = ckpt.restore(_abstract(state, mesh8, P("data")))
    _assert_state_equal(restored, state)


def test_export_inference_round_trip(tmp_path, mesh8):
  unet = {"conv": {"kernel": jax.device_put(jnp.ones((8, 3), jnp.bfloat16),
                                            NamedSharding(mesh8, P("data"))),
                   "bias": jnp.arange(3.0)}}
  encoder = {"proj": {"kernel": jnp.full((2, 2), 0.25)}}
  vae_file = tmp_path / "vae.npz"
  vae_file.write_bytes(b"vae weights")
  config = json.dumps({"model_channels": 32})
  bundle = tmp_path / "export" / "inference.npz"
  export.export_inference(bundle, unet_params=unet, vision_encoder_params=encoder,
                              scale_factor=0.18215, model_config_json=config,
                              vae_reference=str(vae_file))
  assert [p.name for p in bundle.parent.iterdir()] == ["inference.npz"]  # no temporaries
  loaded = export.load_inference(bundle)
  np.testing.assert_array_equal(loaded["unet_params"]["conv"]["kernel"], np.ones((8, 3)))
  assert loaded["unet_params"]["conv"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(loaded["unet_params"]["conv"]["bias"], np.arange(3.0))
  np.testing.assert_array_equal(loaded["vision_encoder_params"]["proj"]["kernel"],
                                np.full((2, 2), 0.25))
  assert loaded["scale_factor"] == pytest.approx(0.18215)
  assert json.loads(loaded["model_config_json"]) == {"model_channels": 32}
  assert loaded["vae_reference"] == str(vae_file)
  assert loaded["vae_sha256"] == hashlib.sha256(b"vae weights").hexdigest()


def test_load_inference_errors(tmp_path):
  with pytest.raises(CheckpointError, match="not found"):
    export.load_inference(tmp_path / "missing.npz")
  other = tmp_path / "weights.npz"
  artifacts.save(other, {"a": np.zeros(2)}, {"source": "convert"})
  with pytest.raises(CheckpointError, match="not an sdseg_jax inference bundle"):
    export.load_inference(other)
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip")
  with pytest.raises(CheckpointError, match="garbage.npz"):
    export.load_inference(garbage)
  with pytest.raises(ValueError, match="not valid JSON"):
    export.export_inference(tmp_path / "x.npz", unet_params={}, vision_encoder_params={},
                                scale_factor=1.0, model_config_json="{oops",
                                vae_reference="vae")


def test_read_only_subtree_restore_reads_only_what_is_asked(saved8, mesh8):
  directory, saved = saved8
  tmp = directory / "9.orbax-checkpoint-tmp-1234"  # a save still in flight elsewhere
  tmp.mkdir()
  replicated = NamedSharding(mesh8, P())
  wanted = {"ema_params": {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=replicated)},
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
  with Checkpointer(directory, read_only=True) as ckpt:
    assert ckpt.all_steps() == [7]
    got = ckpt.restore_subtree(wanted, 7)
  assert set(got) == {"ema_params", "step"} and set(got["ema_params"]) == {"w"}
  np.testing.assert_array_equal(np.asarray(got["ema_params"]["w"]),
                                np.asarray(saved.ema_params["w"]))
  assert int(got["step"]) == 7 and got["ema_params"]["w"].sharding == replicated
  assert tmp.is_dir()  # read-only: the other writer's temporary directory is left alone
  tmp.rmdir()
  wrong = {"ema_params": {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=replicated),
                          "gamma": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=replicated)}}
  with Checkpointer(directory, read_only=True) as ckpt:
    with pytest.raises(CheckpointError, match=r"/7: step 7 does not fit.*missing.*ema_params/"
                                              r"gamma.*ema_params/w: checkpoint \(16, 4\)"):
      ckpt.restore_subtree(wrong, 7)
