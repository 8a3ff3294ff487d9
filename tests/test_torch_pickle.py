"""Tests of the torch-free PyTorch checkpoint reader (sdseg_jax.weights.torch_pickle).

Files are either the official-SDSeg fixtures (real `torch.save` output) or written by
tests/torch_format.py, a torch-free writer, so that exact values, layouts and hostile pickles
can be checked without torch installed.
"""

import collections
import json
import os
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from sdseg_jax.weights.torch_pickle import CheckpointFormatError
from sdseg_jax.weights.torch_pickle import OpaqueObject
from sdseg_jax.weights.torch_pickle import UnsafeCheckpointError
from sdseg_jax.weights.torch_pickle import load_torch_checkpoint
from sdseg_jax.weights.torch_pickle import state_dict_from_checkpoint
from tests.torch_format import Call
from tests.torch_format import Global
from tests.torch_format import Obj
from tests.torch_format import TensorView
from tests.torch_format import dumps
from tests.torch_format import parameter
from tests.torch_format import write_archive
from tests.torch_format import write_checkpoint

# Keys every fixture must hold (names only: sizes come from tiny_config.json).
_EXPECTED_KEYS = {
    "tiny_klf8_autoencoder.ckpt": (
        "encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight",
        "post_quant_conv.weight"),
    "tiny_ldm_unet4ch.ckpt": (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.out.2.weight", "first_stage_model.encoder.conv_in.weight"),
    "tiny_sdseg_trained.ckpt": (
        "model.diffusion_model.input_blocks.0.0.weight", "model_ema.decay",
        "model_ema.num_updates", "first_stage_model.decoder.conv_out.weight",
        "cond_stage_model.encoder.conv_in.weight", "cond_stage_model.out.weight", "betas",
        "alphas_cumprod", "scale_factor"),
    "tiny_unet_class_embed.ckpt": ("model.diffusion_model.label_emb.weight",),
}


def _load_state(path):
  return state_dict_from_checkpoint(load_torch_checkpoint(path), path)


# --- The official fixtures ---------------------------------------------------------------


def test_every_fixture_checkpoint_loads_as_float32_arrays(official_fixtures):
  paths = sorted(official_fixtures.glob("*.ckpt"))
  assert {p.name for p in paths} >= set(_EXPECTED_KEYS)
  for path in paths:
    state = _load_state(path)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    for key in _EXPECTED_KEYS.get(path.name, ()):
      assert key in state, (path.name, key)
    # The one integer entry of an SDSeg checkpoint is LitEma's update counter.
    floats = {k: v for k, v in state.items() if k != "model_ema.num_updates"}
    assert {v.dtype for v in floats.values()} == {np.dtype(np.float32)}, path.name


def test_fixture_shapes_follow_the_tiny_config(official_fixtures):
  config = json.loads((official_fixtures / "tiny_config.json").read_text())
  vae, unet = config["vae_ddconfig"], config["unet"]
  klf8 = _load_state(official_fixtures / "tiny_klf8_autoencoder.ckpt")
  assert klf8["encoder.conv_in.weight"].shape == (vae["ch"], vae["in_channels"], 3, 3)
  assert klf8["quant_conv.weight"].shape == (2 * vae["z_channels"], 2 * vae["z_channels"], 1, 1)
  ldm = _load_state(official_fixtures / "tiny_ldm_unet4ch.ckpt")
  assert ldm["model.diffusion_model.input_blocks.0.0.weight"].shape == (
      unet["model_channels"], vae["z_channels"], 3, 3)
  embed = _load_state(official_fixtures / "tiny_unet_class_embed.ckpt")
  assert embed["model.diffusion_model.label_emb.weight"].shape[0] == (
      config["unet_class_embed_num_classes"])


def test_trained_fixture_holds_sdseg_state_without_importing_lightning(official_fixtures):
  config = json.loads((official_fixtures / "tiny_config.json").read_text())
  ckpt = load_torch_checkpoint(official_fixtures / "tiny_sdseg_trained.ckpt")
  state = state_dict_from_checkpoint(ckpt, "tiny_sdseg_trained.ckpt")

  assert state["scale_factor"].shape == ()
  assert state["scale_factor"] == np.float32(config["scale_factor"]) == np.float32(0.12)
  assert state["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == (
      config["unet"]["in_channels"])
  assert state["cond_stage_model.out.weight"].shape[:2] == (
      config["vision_encoder_embed_dim"], 2 * config["vae_ddconfig"]["z_channels"])
  reference = np.load(official_fixtures / "tiny_reference.npz")
  np.testing.assert_array_equal(state["betas"], reference["betas"].astype(np.float32))
  # EMA keys are the online ones with the dots removed, and hold different weights.
  online = "model.diffusion_model.out.2.weight"
  ema = "model_ema.diffusion_model" + online[len("model.diffusion_model."):].replace(".", "")
  assert state[ema].shape == state[online].shape
  assert not np.array_equal(state[ema], state[online])

  hparams = ckpt["hyper_parameters"]
  assert isinstance(hparams, OpaqueObject)
  assert (hparams.module, hparams.name) == ("pytorch_lightning.utilities.parsing",
                                            "AttributeDict")
  assert hparams.dictitems["linear_start"] == config["schedule"]["linear_start"]
  assert isinstance(ckpt["global_step"], int) and isinstance(ckpt["epoch"], int)
  assert "pytorch_lightning" not in sys.modules


# --- Exact values from the test-side writer ----------------------------------------------


@pytest.mark.parametrize("values", [
    np.array([1.5, -2.25, 3e-8, np.inf], np.float32),
    np.array([1.5, -2.0, 65504.0, 6e-8], np.float16),
    np.array([1.0, -2.5, 3.140625, 1e30], ml_dtypes.bfloat16),
    np.array([0, -1, 2**40, -2**63], np.int64),
    np.array([True, False, True], np.bool_),
    np.array([7, -8], np.int8),
    np.array([1e-300, -2.0], np.float64),
    np.array([1 + 2j, -3.5j], np.complex64),
    np.array([65535, 1], np.uint16),  # No typed storage: torch uses _rebuild_tensor_v3.
], ids=lambda v: str(v.dtype))
@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_dtypes_round_trip_exactly(tmp_path, values, byteorder):
  path = write_checkpoint(tmp_path / "t.pt", {"x": TensorView("0", values.shape)},
                          {"0": values}, byteorder=byteorder)
  loaded = load_torch_checkpoint(path)["x"]
  assert loaded.dtype == values.dtype
  assert loaded.tobytes() == values.tobytes()


def test_views_are_materialised_with_their_stride_and_offset(tmp_path):
  base = np.arange(24, dtype=np.float32)
  matrix = base.reshape(4, 6)
  obj = {
      "full": TensorView("0", (4, 6)),
      "transposed": TensorView("0", (6, 4), stride=(1, 6)),
      "strided": TensorView("0", (2, 2), stride=(12, 3), offset=1),
      "rows_2_3": TensorView("0", (2, 6), offset=12),
      "scalar": TensorView("0", (), stride=(), offset=5),
      "broadcast": TensorView("0", (3, 2), stride=(0, 1), offset=4),
      "empty": TensorView("0", (0, 6)),
  }
  loaded = load_torch_checkpoint(write_checkpoint(tmp_path / "v.pt", obj, {"0": base}))
  expected = {
      "full": matrix, "transposed": matrix.T, "strided": matrix[::2, 1::3],
      "rows_2_3": matrix[2:], "scalar": np.array(5, np.float32),
      "broadcast": np.broadcast_to(base[4:6], (3, 2)), "empty": np.zeros((0, 6), np.float32),
  }
  for name, want in expected.items():
    got = loaded[name]
    np.testing.assert_array_equal(got, want, err_msg=name)
    assert got.shape == want.shape and got.dtype == np.float32, name
    # Owned and C-contiguous: nothing keeps the archive bytes alive or aliases another tensor.
    assert got.flags.c_contiguous and got.flags.owndata and got.flags.writeable, name


def test_shared_storage_is_read_once_and_tensors_do_not_alias(tmp_path, monkeypatch):
  base = np.arange(10, dtype=np.int64)
  path = write_checkpoint(tmp_path / "s.pt", {
      "a": TensorView("0", (5,)),
      "b": TensorView("0", (5,), offset=5),
      "other": TensorView("1", (1,)),
  }, {"0": base, "1": np.array([9], np.int64)})
  reads = collections.Counter()
  original_open = zipfile.ZipFile.open

  def counting_open(self, name, *args, **kwargs):
    reads[name] += 1
    return original_open(self, name, *args, **kwargs)

  monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
  loaded = load_torch_checkpoint(path)
  np.testing.assert_array_equal(loaded["a"], base[:5])
  np.testing.assert_array_equal(loaded["b"], base[5:])
  assert reads["archive/data/0"] == 1 and reads["archive/data/1"] == 1
  loaded["a"][0] = 100
  assert loaded["b"][0] == 5


def test_nested_containers_and_torch_globals(tmp_path):
  values = np.arange(6, dtype=np.float32)
  obj = collections.OrderedDict(
      state_dict=collections.OrderedDict([("w", parameter(TensorView("0", (2, 3))))]),
      nested={"list": [1, "two", TensorView("0", (3,), offset=3), [3.5, None]],
              "tuple": (True, b"\x00\xffraw"), "big": 2**70},
      size=Call(Global("torch", "Size"), ((2, 3),)),
      device=Call(Global("torch", "device"), ("cuda", 0)),
      dtype=Global("torch", "bfloat16"),
      set=Call(Global("builtins", "set"), ([1, 2],)),
  )
  loaded = load_torch_checkpoint(write_checkpoint(tmp_path / "n.pt", obj, {"0": values}))
  assert isinstance(loaded, collections.OrderedDict)
  assert isinstance(loaded["state_dict"], collections.OrderedDict)
  np.testing.assert_array_equal(loaded["state_dict"]["w"], values.reshape(2, 3))
  one, two, tensor, inner = loaded["nested"]["list"]
  assert (one, two, inner) == (1, "two", [3.5, None])
  np.testing.assert_array_equal(tensor, values[3:])
  assert loaded["nested"]["tuple"] == (True, b"\x00\xffraw")
  assert loaded["nested"]["big"] == 2**70
  assert loaded["size"] == (2, 3)
  assert loaded["device"] == "cuda:0"
  assert loaded["dtype"] == np.dtype(ml_dtypes.bfloat16)
  assert loaded["set"] == {1, 2}


def test_unknown_classes_become_inert_opaque_objects(tmp_path):
  assert "this" not in sys.modules  # Importing `this` prints the Zen of Python.
  obj = {
      "namespace": Obj(Global("argparse", "Namespace"), via_reduce=True,
                       state={"lr": 1e-4, "name": "sdseg"}),
      "config": Obj(Global("omegaconf.dictconfig", "DictConfig"), args=(1,),
                    dictitems={"model": {"target": "ldm.models.X"}}),
      "items": Obj(Global("some_plugin.containers", "TrackedList"), listitems=[1, 2, 3]),
      "zen": Obj(Global("this", "Zen"), via_reduce=True, args=("beautiful",)),
      "class_only": Global("pytorch_lightning.callbacks", "ModelCheckpoint"),
  }
  loaded = load_torch_checkpoint(write_checkpoint(tmp_path / "o.pt", obj))

  namespace = loaded["namespace"]
  assert isinstance(namespace, OpaqueObject)
  assert (namespace.module, namespace.name) == ("argparse", "Namespace")
  assert namespace.state == {"lr": 1e-4, "name": "sdseg"}
  assert loaded["config"].args == (1,)
  assert loaded["config"].dictitems == {"model": {"target": "ldm.models.X"}}
  assert loaded["items"].listitems == [1, 2, 3]
  assert loaded["zen"].args == ("beautiful",)
  assert issubclass(loaded["class_only"], OpaqueObject)
  assert loaded["class_only"].name == "ModelCheckpoint"
  assert "this" not in sys.modules and "omegaconf" not in sys.modules


# --- state_dict_from_checkpoint -----------------------------------------------------------


def test_plain_state_dict_keeps_tensors_and_drops_other_entries(tmp_path):
  path = write_checkpoint(tmp_path / "plain.pt", {
      "weight": TensorView("0", (2,)),
      "step": TensorView("1", ()),
      "version": 3,
      "_extra_state": Obj(Global("my.module", "Extra")),
  }, {"0": np.array([1.0, 2.0], np.float32), "1": np.array([7], np.int64)})
  state = _load_state(path)
  assert list(state) == ["weight", "step"]
  assert state["step"].shape == () and state["step"] == 7


@pytest.mark.parametrize("obj, match", [
    ([1, 2], "not a dict of tensors"),
    ({"state_dict": [1]}, "not a dict of tensors"),
    ({"epoch": 3}, "holds no tensors"),
    ({"state_dict": {"w": Call(Global("torch._utils", "_rebuild_sparse_tensor"), (1,))}},
     "unsupported kind"),
])
def test_state_dict_from_checkpoint_rejects_non_weights(tmp_path, obj, match):
  path = write_checkpoint(tmp_path / "weird.ckpt", obj)
  with pytest.raises(CheckpointFormatError, match=match) as error:
    _load_state(path)
  assert "weird.ckpt" in str(error.value)


# --- Damaged and foreign files ------------------------------------------------------------


def _assert_format_error(path, match):
  with pytest.raises(CheckpointFormatError, match=match) as error:
    load_torch_checkpoint(path)
  assert not isinstance(error.value, UnsafeCheckpointError)
  assert path.name in str(error.value)


def test_truncated_fixture_is_a_format_error(official_fixtures, tmp_path):
  data = (official_fixtures / "tiny_klf8_autoencoder.ckpt").read_bytes()
  path = tmp_path / "half_klf8.ckpt"
  path.write_bytes(data[:len(data) // 2])
  _assert_format_error(path, "truncated")


def test_non_zip_files_are_format_errors(tmp_path):
  random_path = tmp_path / "random.ckpt"
  random_path.write_bytes(np.random.default_rng(0).bytes(4096))
  _assert_format_error(random_path, "not a PyTorch zip checkpoint.*bad zip header")
  text_path = tmp_path / "notes.ckpt"
  text_path.write_text("model: sdseg\nthis is a YAML file, not weights\n")
  _assert_format_error(text_path, "bad zip header")
  empty_path = tmp_path / "empty.ckpt"
  empty_path.write_bytes(b"")
  _assert_format_error(empty_path, "bad zip header")


def test_legacy_torch_save_format_is_named(tmp_path):
  path = tmp_path / "legacy.pt"
  path.write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2) + b"rest")
  _assert_format_error(path, "legacy pre-1.6")


def test_zip_without_data_pkl_is_a_format_error(tmp_path):
  path = write_archive(tmp_path / "nodata.ckpt", None, {"0": b"\x00" * 8})
  _assert_format_error(path, "data.pkl")


def test_any_archive_folder_name_is_accepted(tmp_path):
  values = np.array([4.0], np.float32)
  path = write_checkpoint(tmp_path / "named.ckpt", {"x": TensorView("0", (1,))},
                          {"0": values}, archive="whatever_name")
  np.testing.assert_array_equal(load_torch_checkpoint(path)["x"], values)


def test_missing_and_short_storage_records_are_format_errors(tmp_path):
  storages = {"0": np.arange(4, dtype=np.float32)}
  obj = {"x": TensorView("0", (4,))}
  missing = write_checkpoint(tmp_path / "missing.ckpt", obj, storages, omit=("0",))
  _assert_format_error(missing, "'archive/data/0' is missing")
  short = write_checkpoint(tmp_path / "short.ckpt", obj, storages, records={"0": b"\0" * 12})
  _assert_format_error(short, "too short")


def test_view_past_the_storage_end_is_a_format_error(tmp_path):
  path = write_checkpoint(tmp_path / "overrun.ckpt", {"x": TensorView("0", (3,), stride=(2,))},
                          {"0": np.arange(4, dtype=np.float32)})
  _assert_format_error(path, "past the end")


def test_corrupt_record_and_pickle_are_format_errors(tmp_path):
  pattern = np.full(64, 1234.5, np.float32)
  path = write_checkpoint(tmp_path / "crc.ckpt", {"x": TensorView("0", (64,))}, {"0": pattern})
  data = bytearray(path.read_bytes())
  data[data.index(pattern.tobytes()) + 10] ^= 0xFF
  path.write_bytes(bytes(data))
  _assert_format_error(path, "corrupt")

  garbage = write_archive(tmp_path / "garbage.ckpt", b"\x80\x02not really a pickle")
  _assert_format_error(garbage, "malformed data.pkl")
  not_a_storage = write_archive(tmp_path / "tuple_storage.ckpt", dumps(
      Call(Global("torch._utils", "_rebuild_tensor_v2"), (("x",), 0, (1,), (1,)))))
  _assert_format_error(not_a_storage, "malformed data.pkl.*not a storage record")


def test_unsupported_storage_type_is_a_format_error(tmp_path):
  pid_then_persid = dumps(("storage", Global("torch", "QInt8Storage"), "0", "cpu", 1))
  data_pkl = pid_then_persid[:-1] + b"Q."  # BINPERSID on the tuple, then STOP.
  path = write_archive(tmp_path / "qint8.ckpt", data_pkl, {"0": b"\0"})
  _assert_format_error(path, "unsupported storage type")


# --- Hostile pickles ----------------------------------------------------------------------


class _Hostile:
  """Pickles (with the real pickle module) as a call of `func(*args)`."""

  def __init__(self, func, *args):
    self._reduce = (func, args)

  def __reduce__(self):
    return self._reduce


def _assert_refused(path, global_name, marker):
  with pytest.raises(UnsafeCheckpointError, match=global_name) as error:
    load_torch_checkpoint(path)
  assert path.name in str(error.value)
  assert not marker.exists(), "the pickled command ran"


@pytest.mark.parametrize("protocol", [2, 4])
def test_os_system_is_refused_and_never_runs(tmp_path, protocol):
  marker = tmp_path / "pwned"
  data_pkl = pickle.dumps({"state_dict": {}, "x": _Hostile(os.system, f"touch {marker}")},
                          protocol=protocol)
  path = write_archive(tmp_path / "evil_system.ckpt", data_pkl)
  _assert_refused(path, r"(posix|os)\.system", marker)


def test_builtins_eval_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / "pwned_eval"
  data_pkl = pickle.dumps(_Hostile(eval, f"open({str(marker)!r}, 'w').write('x')"), protocol=2)
  path = write_archive(tmp_path / "evil_eval.ckpt", data_pkl)
  _assert_refused(path, r"builtins\.eval", marker)


@pytest.mark.parametrize("module, name", [
    ("os", "system"), ("subprocess", "Popen"), ("__builtin__", "exec"),
    ("builtins", "getattr"), ("builtins", "__import__"), ("builtins", "open"),
    ("nt", "system"), ("shutil", "rmtree"), ("importlib", "import_module"),
    ("runpy", "run_path"), ("socket", "socket"), ("sys", "modules"), ("ctypes", "CDLL"),
    ("os.path", "join"), ("operator", "attrgetter"), ("torch.hub", "load"),
])
def test_dangerous_globals_are_refused_after_tensors(tmp_path, module, name):
  marker = tmp_path / "never"
  obj = {"state_dict": {"w": TensorView("0", (1,))},
         "payload": Call(Global(module, name), (f"touch {marker}",))}
  path = write_checkpoint(tmp_path / "evil.ckpt", obj, {"0": np.ones(1, np.float32)})
  shown = "builtins" if module == "__builtin__" else module
  _assert_refused(path, f"{shown}.{name}", marker)


def test_refusal_error_is_also_a_format_error():
  assert issubclass(UnsafeCheckpointError, CheckpointFormatError)
  assert issubclass(CheckpointFormatError, ValueError)
