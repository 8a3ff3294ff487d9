"""A real two-process training job on CPU through the generic launcher `launch/multinode.sh`.

`multinode.sh --local 2 --cpu-devices 4` starts two `sdseg_jax.main` processes that join one JAX
job (coordinator on 127.0.0.1, gloo collectives) with 4 emulated devices each, so the global
mesh has 8 devices on 2 hosts. The job pre-trains the VAE, trains 2 steps and checkpoints; this
exercises per-process data loading, global-array assembly, multi-host orbax saves (each process
writes its own array shards and data-iterator state) and process-0-only logging.

Which data each process read cannot be seen in the checkpoint (the grain state is only a
position), so the launcher is pointed (SDSEG_MAIN_MODULE) at a small wrapper module, written by
this test outside the package, that records a fingerprint of every train batch each process's
loader yields before running the unchanged `sdseg_jax.main`. The test then checks them against
the loader's documented split: process i of 2 gets every other example of the global stream,
the two halves are disjoint and together form exactly the batches a single process would read.

The job's workdir is `gs://test-bucket/multiprocess` on the test GCS server (tests/gcs_server.py)
when it is available, as on a pod whose hosts share no disk: both processes write their array
shards and data-iterator states into the bucket through tensorstore. The bucket run is then
downloaded, so the assertions below read the same files either way. Without the server (a
user's clone without the test extras) the workdir is local; CI requires the server.

All assertions share one run, so the (slow, ~2 x 40 s of compilation) job is started once.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
from typing import Dict, List

import jax
import numpy as np
import pytest

from configs import tiny
from sdseg_jax.data import pipeline
from tests import gcs_server as gcs_lib
from tests import test_train_loop as loop

STEPS = 2
PROCESSES = 2

# Runs sdseg_jax.main with make_train_loader wrapped to log each yielded batch's fingerprints.
_RECORDING_MAIN = '''
"""Test wrapper (tests/test_multiprocess_train.py): sdseg_jax.main, recording train batches."""
import hashlib
import json
import os

from absl import app

from sdseg_jax import main
from sdseg_jax.data import pipeline

_make_train_loader = pipeline.make_train_loader


class _Recording:
  def __init__(self, it, path):
    self._it, self._path = it, path

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    rows = [hashlib.sha1(image.tobytes() + mask.tobytes()).hexdigest()
            for image, mask in zip(batch["image"], batch["mask"])]
    with open(self._path, "a") as f:
      f.write(json.dumps(rows) + "\\n")
    return batch

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def make_train_loader(data_config, **kwargs):
  it = _make_train_loader(data_config, **kwargs)
  path = os.path.join(os.environ["SDSEG_RECORD_DIR"],
                      "seed%d_process%d.jsonl" % (kwargs["seed"], kwargs["process_index"]))
  return _Recording(it, path)


pipeline.make_train_loader = make_train_loader

if __name__ == "__main__":
  app.run(main.main)
'''


def _fingerprints(batch: Dict[str, np.ndarray]) -> List[str]:
  return [hashlib.sha1(image.tobytes() + mask.tobytes()).hexdigest()
          for image, mask in zip(batch["image"], batch["mask"])]


def _expected_batches(split_dir: pathlib.Path, process_index: int, process_count: int,
                      num_batches: int) -> List[List[str]]:
  """Fingerprints of the first batches the loader gives one process of the tiny config."""
  config = tiny.get_config()
  it = pipeline.make_train_loader(
      config.data, split_dir=split_dir, global_batch_size=config.train.global_batch_size,
      process_index=process_index, process_count=process_count, seed=config.seed,
      worker_count=0)
  return [_fingerprints(next(it)) for _ in range(num_batches)]


BUCKET_WORKDIR = f"gs://{gcs_lib.BUCKET}/multiprocess"


@pytest.fixture(scope="module")
def job(tmp_path_factory, request) -> pathlib.Path:
  """Runs the two-process job once per session; returns its (local copy of the) workdir."""
  try:
    server = request.getfixturevalue("gcs_server")
  except pytest.skip.Exception:
    server = None  # no GCS server on this machine: a local workdir

  def produce(workdir: pathlib.Path) -> None:
    root = workdir.parent
    wrapper_dir, records, logs = root / "mp_wrapper", root / "mp_records", root / "mp_logs"
    for d in (wrapper_dir, records, logs):
      d.mkdir(exist_ok=True)
    (wrapper_dir / "sdseg_recording_main.py").write_text(_RECORDING_MAIN)
    env = loop.subprocess_env(tmp_path_factory, None, single_process=False)
    env.update(PYTHON=sys.executable, SDSEG_MAIN_MODULE="sdseg_recording_main",
               SDSEG_RECORD_DIR=str(records), SDSEG_INIT_TIMEOUT="120",
               PYTHONPATH=os.pathsep.join([str(wrapper_dir), env["PYTHONPATH"]]))
    target = str(workdir)
    if server is not None:
      env.update(server.env)
      target = BUCKET_WORKDIR
      fs = server.filesystem()
      if fs.exists(BUCKET_WORKDIR[len("gs://"):]):  # a failed earlier attempt
        fs.rm(BUCKET_WORKDIR[len("gs://"):], recursive=True)
    cmd = ["bash", str(loop.REPO_ROOT / "launch" / "multinode.sh"), "--local", str(PROCESSES),
           "--cpu-devices", "4", "--log-dir", str(logs), "--",
           "--config", "configs/tiny.py", "--workdir", target,
           f"--config.train.max_steps={STEPS}"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=loop.REPO_ROOT,
                            timeout=loop.RUN_TIMEOUT, check=False)
    (root / "mp_launcher.log").write_text(result.stdout + "\n---- stderr ----\n" + result.stderr)
    assert result.returncode == 0, (f"multinode.sh exited {result.returncode}:\n"
                                    f"{result.stderr[-4000:]}")
    if server is not None:
      prefix = BUCKET_WORKDIR[len("gs://"):] + "/"
      keys = sorted(server.filesystem().find(prefix))
      (root / "mp_bucket_listing.json").write_text(json.dumps([k[len(prefix):] for k in keys]))
      for key in keys:
        target_file = workdir / key[len(prefix):]
        target_file.parent.mkdir(parents=True, exist_ok=True)
        server.filesystem().get_file(key, str(target_file))
      assert not any(p.name.startswith("gs:") for p in loop.REPO_ROOT.iterdir())
  return loop.shared_run(tmp_path_factory, "multiprocess", produce)


def test_two_process_job_trains_checkpoints_and_splits_the_data(job, tmp_path):
  root = job.parent
  launcher = (root / "mp_launcher.log").read_text()
  for i in range(PROCESSES):
    assert f"process {i} exit code 0" in launcher
    log = (root / "mp_logs" / f"process_{i}.log").read_text()
    assert f"process {i}/{PROCESSES}, 4 local / 8 global cpu devices" in log

  listing = root / "mp_bucket_listing.json"
  if listing.exists():  # the job wrote into the bucket (see the module docstring)
    names = json.loads(listing.read_text())
    for i in range(PROCESSES):
      assert f"checkpoints/{STEPS}/data/process_{i}-of-{PROCESSES}.json" in names, names
    assert f"checkpoints/{STEPS}/commit_success.txt" in names

  # Process 0 alone logs; both steps are there.
  assert loop.train_steps(loop.read_metrics(job)) == list(range(1, STEPS + 1))
  assert (job / "pretrained_vae.npz").is_file()

  # The checkpoint is complete (one data-iterator state per process) and restores.
  step_dir = job / "checkpoints" / str(STEPS)
  assert (step_dir / "commit_success.txt").is_file() and (step_dir / "state").is_dir()
  for i in range(PROCESSES):
    data_state = json.loads((step_dir / "data" / f"process_{i}-of-{PROCESSES}.json").read_text())
    assert data_state == {"kind": "json", "value": {"next_index": STEPS}}, data_state
  state, _, extra = loop.restore_checkpoint(job, restore_data_state=False)
  assert int(state.step) == STEPS
  assert extra["scale_factor"] > 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))

  # Each process read its own half of every global batch.
  seed = tiny.get_config().seed
  recorded = []
  for i in range(PROCESSES):
    lines = (root / "mp_records" / f"seed{seed}_process{i}.jsonl").read_text().splitlines()
    recorded.append([json.loads(line) for line in lines])
    assert len(recorded[i]) == STEPS
    assert recorded[i] == _expected_batches(tmp_path, i, PROCESSES, STEPS), f"process {i}"
  single = _expected_batches(tmp_path, 0, 1, STEPS)
  for step in range(STEPS):
    halves = [set(recorded[i][step]) for i in range(PROCESSES)]
    assert not halves[0] & halves[1], f"step {step + 1}: the processes read the same examples"
    assert halves[0] | halves[1] == set(single[step])
