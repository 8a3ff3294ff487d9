"""The torch-free reader reads only the weights of a training checkpoint, lazily.

A Lightning checkpoint of official SDSeg is about twice its weights: AdamW moments of the UNet
and vision encoder sit beside "state_dict". `torch_pickle.load_state_dict` (what the convert CLI
uses) must never read them, and must read each weight straight into its own array, so that
converting a multi-GB file needs about the memory of the weights it keeps.

The full-size measurement (official SDSeg shapes) is a benchmark, see tests/large_checkpoint.py
and BENCHMARKS.md; here a 0.64 GB file of the same layout is generated (and deleted) per run.
"""

import collections
import zipfile

import numpy as np

from sdseg_jax.weights import torch_pickle
from tests import large_checkpoint

TRAINABLE = ("model.diffusion_model.", "cond_stage_model.")


def _assert_weights(state, shapes, values):
  assert list(state) == list(shapes)
  for key, shape in shapes.items():
    array = state[key]
    assert array.shape == shape and array.dtype == np.float32, key
    assert np.all(array == values[key]), key
    # Owned, writable, C-contiguous: nothing keeps the archive open or aliases another tensor.
    assert array.flags.owndata and array.flags.writeable and array.flags.c_contiguous, key


def test_load_state_dict_reads_only_the_weights(tmp_path, monkeypatch):
  shapes = {"model.diffusion_model.out.2.weight": (4, 3, 3, 3),
            "model.diffusion_model.out.2.bias": (4,),
            "cond_stage_model.out.weight": (4, 8, 1, 1),
            "first_stage_model.quant_conv.bias": (8,),
            "scale_factor": ()}
  path = tmp_path / "small.ckpt"
  values = large_checkpoint.write_lightning_checkpoint(path, shapes, TRAINABLE)
  opened = collections.Counter()
  original_open = zipfile.ZipFile.open

  def counting_open(self, name, *args, **kwargs):
    opened[name] += 1
    return original_open(self, name, *args, **kwargs)

  monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
  state = torch_pickle.load_state_dict(path)
  _assert_weights(state, shapes, values)
  # Storages 0-4 are the weights, 5-10 the optimizer moments of the 3 trainable tensors.
  records = {n for n in opened if "/data/" in n}
  assert records == {f"archive/data/{i}" for i in range(len(shapes))}, sorted(records)
  assert all(opened[n] == 1 for n in records)
  # The same weights as the eager path (everything read, then the state_dict picked).
  monkeypatch.undo()
  eager = torch_pickle.state_dict_from_checkpoint(torch_pickle.load_torch_checkpoint(path), path)
  assert eager["model.diffusion_model.out.2.weight"].shape == (4, 3, 3, 3)
  for key in shapes:
    np.testing.assert_array_equal(eager[key], state[key])
  moments = torch_pickle.load_torch_checkpoint(path)["optimizer_states"][0]["state"]
  assert sorted(moments) == [0, 1, 2] and moments[0]["exp_avg"].shape == (4, 3, 3, 3)


def test_peak_memory_stays_near_the_kept_weights(tmp_path):
  """Weights 256 MiB, optimizer moments 384 MiB: the reader's peak may exceed the weights by
  at most a quarter of the file (the brief's bound for the full size is half the file); an
  eager reader, which holds every record, exceeds them by the whole file."""
  mib = 1 << 20
  shapes = {f"model.diffusion_model.input_blocks.{i}.0.weight": (1024, 1024) for i in range(48)}
  shapes.update({f"first_stage_model.decoder.up.{i}.weight": (1024, 1024) for i in range(16)})
  path = tmp_path / "large.ckpt"
  try:
    values = large_checkpoint.write_lightning_checkpoint(path, shapes, TRAINABLE)
    file_bytes = path.stat().st_size
    assert 640 * mib < file_bytes < 641 * mib
    report = large_checkpoint.peak_rss(path)
  finally:
    path.unlink(missing_ok=True)
  assert report["tensors"] == 64 and report["kept_bytes"] == 256 * mib
  for key, first in report["probe"].items():
    assert first == values[key], key
  above = report["peak_bytes"] - report["baseline_bytes"] - report["kept_bytes"]
  assert above < file_bytes // 4, (
      f"peak RSS {report['peak_bytes'] / mib:.0f} MiB = baseline "
      f"{report['baseline_bytes'] / mib:.0f} MiB + weights 256 MiB + {above / mib:.0f} MiB")
