"""Time and memory of `restore.load_run` on a demo-config checkpoint (BENCHMARKS.md).

  PYTHONPATH=. python benchmarks/restore_cost.py make DIR   # config.json, checkpoints/1, VAE
  PYTHONPATH=. python benchmarks/restore_cost.py load DIR   # one JSON line: seconds, peak RSS

`make` writes a full training checkpoint of configs/demo.py (random weights, AdamW state) with
`checkpoint.Checkpointer`, as training does; `load` restores its inference weights in a fresh
process and prints the wall time of `load_run` and how much the peak RSS grew during it. Run
`load` from two checkouts on the same DIR to compare restore paths.
"""

import json
import pathlib
import resource
import sys
import time


def make(workdir: pathlib.Path) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import demo  # pylint: disable=g-import-not-at-top
  from sdseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sdseg_jax import config_lib  # pylint: disable=g-import-not-at-top
  from sdseg_jax import optim  # pylint: disable=g-import-not-at-top
  from sdseg_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from sdseg_jax.models import sdseg  # pylint: disable=g-import-not-at-top
  from sdseg_jax.weights import artifacts  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  model = sdseg.build(config.model)
  params, vae = jax.jit(model.init)(jax.random.key(0))
  state = state_lib.create(params, optim.make_optimizer(config), jax.random.key(1), 0.5)
  config_lib.dump(config, workdir)
  artifacts.save(workdir / "pretrained_vae.npz",
                 {"vae": jax.tree_util.tree_map(np.asarray, vae)}, {"kind": "pretrained_vae"})
  with checkpoint.Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
    ckpt.save(1, state, metrics={"eval/dice": 0.5})
  size = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
  print(json.dumps({"trainable_params": size(params), "train_state_values": size(state)}))


def load(workdir: pathlib.Path) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from sdseg_jax import restore  # pylint: disable=g-import-not-at-top
  jax.numpy.zeros(1).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  run = restore.load_run(workdir, "last")
  jax.block_until_ready(run.params)
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({"load_run_seconds": round(seconds, 3), "peak_rss_mib": round(after / 1024, 1),
                    "peak_rss_growth_mib": round((after - before) / 1024, 1)}))


if __name__ == "__main__":
  {"make": make, "load": load}[sys.argv[1]](pathlib.Path(sys.argv[2]))
