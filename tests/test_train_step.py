"""The compiled train step on 8 emulated CPU devices: equivalence, shardings, donation, reuse.

Everything is built from the library pieces that `train.run` uses (sharding.make_mesh,
param_shardings, state.create, step.compile_train_step) on configs/tiny.py, not through main.py,
so a failure points at the step rather than at the loop around it.

Equivalence. One global batch and one initial state are fed to the step compiled for a single
device and for the meshes (8, 1) "dp" and (4, 2) "fsdp". The loss and every leaf of the updated
state must agree to rtol 1e-5 / atol 1e-6 (see `_assert_trees_close` for why that holds, and
`Setup` for the Adam eps this needs). The RNG streams (timesteps, noise, posterior sample,
dropout) are the same under any sharding because jax_threefry_partitionable is on, as main.py
sets it.

Shardings. The PartitionSpec of every state leaf, of the VAE and of the batch is compared with
tests/goldens/train_state_shardings.json, so a change of sharding tactics shows up as a diff in
review. After a deliberate change, regenerate the golden and commit it with the change:

  SDSEG_UPDATE_GOLDENS=1 python -m pytest -q tests/test_train_step.py -k golden

That run rewrites the file and FAILS on purpose (and is refused when CI is set), so a golden is
never accepted in the same run that wrote it; review `git diff`, then rerun normally.

(`write_sharding_golden` below is the helper that writes it).

Compile time dominates on CPU, so the initial weights are drawn with numpy from the abstract
shapes instead of jit-compiling the model's init, XLA optimisations are turned down for this
module, and each step is compiled once per module and shared between tests.
"""

import json
import math
import os
import pathlib
from typing import Any, Callable, Dict, Iterator, Tuple

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import tiny
from sdseg_jax import optim
from sdseg_jax import sharding as sharding_lib
from sdseg_jax import state as state_lib
from sdseg_jax import step as step_lib
from sdseg_jax.data import pipeline
from sdseg_jax.models import sdseg

GOLDEN = pathlib.Path(__file__).parent / "goldens" / "train_state_shardings.json"
# (mesh data, mesh fsdp, strategy): the layouts of the golden and of the equivalence test.
LAYOUTS = ((8, 1, "dp"), (4, 2, "fsdp"))
RTOL, ATOL = 1e-5, 1e-6


def _layout_name(layout: Tuple[int, int, str]) -> str:
  data, fsdp, strategy = layout
  return f"{strategy}_{data}x{fsdp}"


@pytest.fixture(scope="module", autouse=True)
def _fast_compile() -> Iterator[None]:
  """Unoptimised XLA compiles this module's steps ~3x faster; restored for other modules."""
  previous = {k: jax.config.values[k] for k in ("jax_disable_most_optimizations",
                                                "jax_threefry_partitionable")}
  jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_threefry_partitionable", True)  # what main.configure_jax sets
  yield
  for key, value in previous.items():
    jax.config.update(key, value)


class Setup:
  """The tiny model, optimizer, a host copy of the initial state, VAE params and one batch."""

  def __init__(self, split_dir: pathlib.Path):
    self.config = tiny.get_config()
    # Some parameters have a gradient that is exactly zero in exact arithmetic (conv biases
    # followed by a GroupNorm with one channel per group, attention key biases under softmax), so
    # what the step computes for them is rounding noise (~1e-8) that differs between layouts.
    # Adam's first step, lr * g / (|g| + eps), turns noise above eps = 1e-8 into +-lr: the layouts
    # would then differ by up to 2e-3 on exactly those leaves. eps = 1e-3 keeps the update a
    # smooth function of the gradient, so comparing updated parameters compares gradients.
    self.config.optim.eps = 1e-3
    self.model = sdseg.build(self.config.model)
    self.tx = optim.make_optimizer(self.config)
    self.abstract_params, self.abstract_vae = jax.eval_shape(self.model.init, jax.random.key(0))
    rng = np.random.default_rng(0)
    params = _numpy_init(self.abstract_params, rng)
    self.vae = _numpy_init(self.abstract_vae, rng)
    self.create = lambda p: state_lib.create(p, self.tx, jax.random.key(1), 0.8)
    self.abstract_state = jax.eval_shape(self.create, self.abstract_params)
    self.state = jax.device_get(jax.jit(self.create)(params))
    loader = pipeline.make_train_loader(
        self.config.data, split_dir=split_dir,
        global_batch_size=self.config.train.global_batch_size, process_index=0,
        process_count=1, seed=0, worker_count=0)
    self.batch = next(loader)

  def shardings(self, mesh: jax.sharding.Mesh, strategy: str) -> Tuple[Any, Any]:
    """(state shardings, VAE shardings) exactly as train.run derives them."""
    state_sh = sharding_lib.param_shardings(self.abstract_state, mesh, strategy)
    vae_sh = jax.tree_util.tree_map(lambda _: sharding_lib.replicated(mesh), self.abstract_vae)
    return state_sh, vae_sh


def _numpy_init(abstract: Any, rng: np.random.Generator) -> Any:
  """Fan-in-scaled random weights (norm scales near 1) without compiling the model's init.

  Unlike the model's init, no output layer is zero, so every parameter gets a gradient.
  """
  def init(path, leaf):
    name = str(path[-1].key)
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name == "bias" or len(leaf.shape) < 2:
      value = 0.1 * rng.standard_normal(leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
    return value.astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(init, abstract)


class Compiled:
  """One layout's mesh, shardings and AOT-compiled step (compiled once, reused by all tests)."""

  def __init__(self, setup: Setup, data: int, fsdp: int, strategy: str):
    devices = jax.devices()[:data * fsdp]
    self.setup = setup
    self.mesh = sharding_lib.make_mesh({"data": data, "fsdp": fsdp}, devices)
    self.state_sh, self.vae_sh = setup.shardings(self.mesh, strategy)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    abstract_state = jax.tree_util.tree_map(with_sharding, setup.abstract_state, self.state_sh)
    abstract_vae = jax.tree_util.tree_map(with_sharding, setup.abstract_vae, self.vae_sh)
    self.step, self.stats = step_lib.compile_train_step(
        setup.model, setup.tx, setup.config, self.mesh, abstract_state, self.state_sh,
        abstract_vae, self.vae_sh, setup.config.data.image_size)

  def inputs(self) -> Tuple[Any, Dict[str, jax.Array], Any]:
    """Fresh device copies of (state, batch, vae): the step donates the state it is given."""
    state = jax.device_put(self.setup.state, self.state_sh)
    vae = jax.device_put(self.setup.vae, self.vae_sh)
    batch = sharding_lib.host_batch_to_global(self.setup.batch, self.mesh)
    return state, batch, vae


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
  return Setup(tmp_path_factory.mktemp("splits"))


@pytest.fixture(scope="module")
def compiled(setup) -> Callable[[int, int, str], Compiled]:
  """compiled(data, fsdp, strategy) -> Compiled, memoised for the module."""
  cache: Dict[Tuple[int, int, str], Compiled] = {}

  def get(data: int, fsdp: int, strategy: str) -> Compiled:
    key = (data, fsdp, strategy)
    if key not in cache:
      cache[key] = Compiled(setup, *key)
    return cache[key]
  return get


def _assert_trees_close(actual: Any, expected: Any, what: str) -> None:
  """Leafwise allclose at rtol 1e-5 / atol 1e-6, naming the worst leaves on failure.

  The layouts differ only in how float32 sums are split and ordered (the loss's batch mean and
  the gradient all-reduce over 8 devices versus one), which moves the loss by ~1e-7 relative and
  the updated parameters by at most ~3e-7 absolute (measured), so 1e-6 leaves a 3x margin while
  a real error (a wrong shard, a missing all-reduce, another RNG stream) moves parameters by
  O(lr) = 1e-3. This needs the larger Adam eps of `Setup` (see there).
  """
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_e], f"{what}: tree structures differ"
  failures = []
  for (path, a), (_, e) in zip(flat_a, flat_e):
    a, e = np.asarray(a), np.asarray(e)
    if not np.allclose(a, e, rtol=RTOL, atol=ATOL):
      err = np.max(np.abs(a.astype(np.float64) - e) / (ATOL + RTOL * np.abs(e)))
      failures.append((err, jax.tree_util.keystr(path)))
  assert not failures, (f"{what}: {len(failures)} leaves differ beyond rtol {RTOL}/atol {ATOL}; "
                        f"worst (error / tolerance): {sorted(failures)[-3:]}")


# ---- 1 device == (8, 1) dp == (4, 2) fsdp ------------------------------------------------------


def test_step_matches_single_device_and_keeps_shardings(compiled):
  """One test for all layouts: split across xdist workers, each would recompile the reference."""
  one = compiled(1, 1, "dp")
  reference_state, reference_metrics = jax.device_get(one.step(*one.inputs()))
  assert np.isfinite(reference_metrics["loss"])
  for layout in LAYOUTS:
    sharded = compiled(*layout)
    new_state, metrics = sharded.step(*sharded.inputs())
    name = _layout_name(layout)
    np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"], rtol=RTOL, atol=ATOL,
                               err_msg=name)
    _assert_trees_close(jax.device_get(metrics), reference_metrics, f"{name} metrics")
    _assert_trees_close(jax.device_get(new_state), reference_state, f"{name} updated state")
    # The updated state comes back in the shardings it went in with (what donation reuses).
    for (path, leaf), expected in zip(jax.tree_util.tree_flatten_with_path(new_state)[0],
                                      jax.tree_util.tree_leaves(sharded.state_sh)):
      assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (
          f"{name} {jax.tree_util.keystr(path)}: {leaf.sharding} != {expected}")


# ---- shardings -----------------------------------------------------------------------------


def sharding_specs(setup: Setup, layout: Tuple[int, int, str]) -> Dict[str, Any]:
  """{"state": {path: spec}, "vae": {path: spec}, "batch": spec} of a layout."""
  data, fsdp, strategy = layout
  mesh = sharding_lib.make_mesh({"data": data, "fsdp": fsdp}, jax.devices()[:data * fsdp])
  state_sh, vae_sh = setup.shardings(mesh, strategy)
  table = lambda tree: {jax.tree_util.keystr(p): s.spec
                        for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return {"state": table(state_sh), "vae": table(vae_sh),
          "batch": sharding_lib.batch_sharding(mesh).spec}


def _golden_entry(specs: Dict[str, Any]) -> Dict[str, Any]:
  """JSON form of `sharding_specs`: one "PartitionSpec(...)" string per leaf (one line each)."""
  return {"state": {k: str(v) for k, v in specs["state"].items()},
          "vae": {k: str(v) for k, v in specs["vae"].items()},
          "batch": str(specs["batch"])}


def write_sharding_golden(setup: Setup, path: pathlib.Path = GOLDEN) -> None:
  """Regenerates the golden from the current sharding rules (one entry per layout)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  golden = {_layout_name(layout): _golden_entry(sharding_specs(setup, layout))
            for layout in LAYOUTS}
  path.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


def test_shardings_match_golden(setup):
  if os.environ.get("SDSEG_UPDATE_GOLDENS") == "1":
    # A golden written from the code under test proves nothing by itself: never in CI, and the
    # run that rewrites it fails, so the new file is reviewed (git diff) before a test passes.
    if os.environ.get("CI"):
      pytest.fail("SDSEG_UPDATE_GOLDENS=1 is refused under CI: goldens are regenerated by hand")
    write_sharding_golden(setup)
    pytest.fail(f"rewrote {GOLDEN}; review `git diff` and rerun without SDSEG_UPDATE_GOLDENS")
  golden = json.loads(GOLDEN.read_text())
  assert sorted(golden) == sorted(_layout_name(layout) for layout in LAYOUTS)
  for layout in LAYOUTS:
    name = _layout_name(layout)
    actual, expected = _golden_entry(sharding_specs(setup, layout)), golden[name]
    for part in ("state", "vae"):
      changed = sorted(k for k in set(actual[part]) | set(expected[part])
                       if actual[part].get(k) != expected[part].get(k))
      assert not changed, (
          f"{name} {part}: {len(changed)} leaves differ from {GOLDEN.name}, e.g. "
          f"{[(k, actual[part].get(k), expected[part].get(k)) for k in changed[:3]]}; if the "
          "change is intended, regenerate the golden (see the module docstring)")
    assert actual["batch"] == expected["batch"] == str(P(("data", "fsdp")))


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_name)
def test_sharding_rules(setup, layout):
  """The intent behind the golden, spelled out: what dp and fsdp mean for each leaf."""
  _, fsdp, strategy = layout
  specs = sharding_specs(setup, layout)
  assert all(spec == P() for spec in specs["vae"].values()), "the frozen VAE must be replicated"
  abstract = {jax.tree_util.keystr(p): x for p, x in
              jax.tree_util.tree_flatten_with_path(setup.abstract_state)[0]}
  sharded = 0
  for path, spec in specs["state"].items():
    shape = abstract[path].shape
    if strategy == "dp" or math.prod(shape) < sharding_lib.FSDP_MIN_SIZE:
      assert spec == P(), f"{path} {shape} should be replicated, got {spec}"
    elif spec != P():
      assert list(spec).count("fsdp") == 1 and set(spec) <= {None, "fsdp"}, (path, spec)
      axis = list(spec).index("fsdp")
      assert shape[axis] % fsdp == 0, f"{path}: dim {axis} of {shape} not divisible by {fsdp}"
      sharded += 1
    else:
      assert all(d % fsdp for d in shape), f"{path} {shape} is large and divisible: shard it"
  if strategy == "fsdp":
    assert sharded > 0, "no leaf is sharded under fsdp: the tiny config no longer exercises it"
  # Adam moments and the EMA follow their parameters; counters stay replicated.
  params = {k[len(".params"):]: v for k, v in specs["state"].items() if k.startswith(".params")}
  for path, spec in specs["state"].items():
    if not path.startswith((".ema_unet", ".opt_state")):
      continue
    if "['" not in path:
      assert spec == P(), f"{path}: scalars (counts) stay replicated"
      continue
    suffix = path[path.index("['"):]
    if path.startswith(".ema_unet"):
      suffix = "['unet']" + suffix
    assert spec == params[suffix], f"{path} {spec} != params{suffix} {params[suffix]}"


# ---- what a step changes, keeps and donates, and that it is never recompiled ------------------


def test_fsdp_step_updates_params_keeps_vae_donates_state_and_never_recompiles(setup, compiled):
  """Four properties of one (4, 2) fsdp step and three more, in one test so that they share
  its compilation whichever xdist worker runs it."""
  sharded = compiled(4, 2, "fsdp")
  state, batch, vae = sharded.inputs()
  new_state, _ = sharded.step(state, batch, vae)

  # Trainable params (and the EMA that follows them) move; the step counter advances; the
  # stored key is the run's key (per-step keys are derived from it and the step).
  for tree, old, what in ((new_state.params, setup.state.params, "params"),
                          (new_state.ema_unet, setup.state.ema_unet, "ema_unet")):
    unchanged = [jax.tree_util.keystr(p) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0],
        jax.tree_util.tree_leaves(old)) if np.array_equal(a, b)]
    assert not unchanged, f"{what}: {len(unchanged)} leaves did not move, e.g. {unchanged[:3]}"
  assert int(new_state.step) == 1
  np.testing.assert_array_equal(jax.device_get(new_state.rng), setup.state.rng)

  # The frozen VAE (and the batch) are neither donated nor changed.
  for (path, leaf), host in zip(jax.tree_util.tree_flatten_with_path(vae)[0],
                                jax.tree_util.tree_leaves(setup.vae)):
    assert not leaf.is_deleted(), f"VAE leaf {jax.tree_util.keystr(path)} was donated"
    np.testing.assert_array_equal(np.asarray(leaf), host)
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(batch))

  # The input state was donated: all of its buffers are gone.
  leaves = jax.tree_util.tree_leaves(state)
  alive = [x for x in leaves if not x.is_deleted()]
  assert not alive, f"{len(alive)} of {len(leaves)} donated state buffers are still alive"

  # Three more steps reuse the compiled executable: no tracing, lowering or XLA compile.
  events = []
  watched = ("/jax/core/compile/jaxpr_trace_duration",
             "/jax/core/compile/jaxpr_to_mlir_module_duration",
             "/jax/core/compile/backend_compile_duration")

  def listener(event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event in watched:
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    losses = []
    for _ in range(3):
      new_state, metrics = sharded.step(new_state, batch, vae)
      losses.append(float(metrics["loss"]))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not events, f"the compiled step triggered compilation: {events}"
  assert int(new_state.step) == 4
  assert all(np.isfinite(losses)), losses
  # An AOT-compiled step refuses, rather than silently recompiles for, another input shape.
  bigger = {k: np.concatenate([v, v]) for k, v in setup.batch.items()}
  with pytest.raises((TypeError, ValueError)):
    sharded.step(new_state, sharding_lib.host_batch_to_global(bigger, sharded.mesh), vae)
