"""Writes PyTorch zip-format checkpoints without torch, for tests of the torch-free reader.

The pickle is written opcode by opcode (protocol 2, as `torch.save` does) so that a test
controls exactly which globals, persistent ids and tensor layouts a file holds, hostile ones
included, and so that producing one needs neither torch nor any class the file names.

A tensor is a `TensorView` of a named storage (a flat numpy array in `storages`), pickled as
torch does: `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, hooks)` with
the storage as the persistent id `('storage', torch.<Type>Storage, key, 'cpu', numel)`, or, for
dtypes without a typed storage class (uint16), `_rebuild_tensor_v3` on an untyped storage.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import dataclasses
import pathlib
import struct
from typing import Any
import zipfile

import ml_dtypes
import numpy as np

# Element type -> torch's typed storage class, as torch writes them into persistent ids.
_STORAGE_CLASSES = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
    np.dtype(np.complex64): "ComplexFloatStorage",
}

# Element types torch pickles with `_rebuild_tensor_v3` and a `torch.<dtype>` global.
_V3_DTYPE_NAMES = {np.dtype(np.uint16): "uint16", np.dtype(np.uint32): "uint32"}


@dataclasses.dataclass(frozen=True)
class Global:
  """A global reference `module.name` (pickle GLOBAL opcode)."""
  module: str
  name: str


@dataclasses.dataclass(frozen=True)
class Call:
  """`func(*args)` (pickle REDUCE)."""
  func: Any
  args: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class Obj:
  """An instance of `cls` as pickle builds one: NEWOBJ or REDUCE, then items, then BUILD."""
  cls: Global
  args: tuple[Any, ...] = ()
  dictitems: Mapping[Any, Any] | None = None
  listitems: Sequence[Any] | None = None
  state: Any = None
  via_reduce: bool = False


@dataclasses.dataclass(frozen=True)
class TensorView:
  """A tensor viewing storage `storage` (a key of `storages`); stride None is C-contiguous."""
  storage: str
  shape: tuple[int, ...]
  stride: tuple[int, ...] | None = None
  offset: int = 0


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
  """Element strides of a C-contiguous tensor of `shape`, as torch reports them."""
  strides, step = [], 1
  for n in reversed(shape):
    strides.append(step)
    step *= max(n, 1)
  return tuple(reversed(strides))


def parameter(view: TensorView) -> Call:
  """A `torch.nn.Parameter` as torch pickles it."""
  return Call(Global("torch._utils", "_rebuild_parameter"),
              (view, True, collections.OrderedDict()))


class _PickleWriter:
  """Emits protocol-2 pickle opcodes for plain values and the node types above."""

  def __init__(self, storages: Mapping[str, np.ndarray]):
    self._storages = storages
    self._out = bytearray(b"\x80\x02")  # PROTO 2

  def dumps(self, obj: Any) -> bytes:
    self._save(obj)
    self._out += b"."  # STOP
    return bytes(self._out)

  def _save(self, obj: Any) -> None:
    if obj is None:
      self._out += b"N"
    elif obj is True or obj is False:
      self._out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
      self._save_int(obj)
    elif isinstance(obj, float):
      self._out += b"G" + struct.pack(">d", obj)
    elif isinstance(obj, str):
      data = obj.encode("utf-8")
      self._out += b"X" + struct.pack("<I", len(data)) + data
    elif isinstance(obj, bytes):  # Protocol 2 has no bytes opcode: torch goes via _codecs.
      self._save(Call(Global("_codecs", "encode"), (obj.decode("latin-1"), "latin1")))
    elif isinstance(obj, tuple):
      self._out += b"("
      for item in obj:
        self._save(item)
      self._out += b"t"
    elif isinstance(obj, list):
      self._out += b"]"
      self._save_listitems(obj)
    elif isinstance(obj, collections.OrderedDict):
      self._save(Call(Global("collections", "OrderedDict")))
      self._save_dictitems(obj)
    elif isinstance(obj, dict):
      self._out += b"}"
      self._save_dictitems(obj)
    elif isinstance(obj, Global):
      self._out += f"c{obj.module}\n{obj.name}\n".encode("utf-8")
    elif isinstance(obj, Call):
      self._save(obj.func)
      self._save(tuple(obj.args))
      self._out += b"R"
    elif isinstance(obj, Obj):
      self._save_obj(obj)
    elif isinstance(obj, TensorView):
      self._save_tensor(obj)
    else:
      raise TypeError(f"cannot write {type(obj).__name__}")

  def _save_int(self, value: int) -> None:
    if -2**31 <= value < 2**31:
      self._out += b"J" + struct.pack("<i", value)
    else:
      data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
      self._out += b"\x8a" + bytes([len(data)]) + data

  def _save_dictitems(self, items: Mapping[Any, Any]) -> None:
    if items:
      self._out += b"("
      for key, value in items.items():
        self._save(key)
        self._save(value)
      self._out += b"u"  # SETITEMS

  def _save_listitems(self, items: Sequence[Any]) -> None:
    if items:
      self._out += b"("
      for item in items:
        self._save(item)
      self._out += b"e"  # APPENDS

  def _save_obj(self, obj: Obj) -> None:
    self._save(obj.cls)
    self._save(tuple(obj.args))
    self._out += b"R" if obj.via_reduce else b"\x81"  # REDUCE or NEWOBJ
    self._save_dictitems(obj.dictitems or {})
    self._save_listitems(obj.listitems or [])
    if obj.state is not None:
      self._save(obj.state)
      self._out += b"b"  # BUILD

  def _save_tensor(self, view: TensorView) -> None:
    storage = self._storages[view.storage]
    stride = view.stride if view.stride is not None else contiguous_strides(view.shape)
    hooks = collections.OrderedDict()
    if storage.dtype in _V3_DTYPE_NAMES:
      pid = ("storage", Global("torch.storage", "UntypedStorage"), view.storage, "cpu",
             storage.nbytes)
      rebuild = Global("torch._utils", "_rebuild_tensor_v3")
      extra = (Global("torch", _V3_DTYPE_NAMES[storage.dtype]),)
    else:
      pid = ("storage", Global("torch", _STORAGE_CLASSES[storage.dtype]), view.storage, "cpu",
             storage.size)
      rebuild = Global("torch._utils", "_rebuild_tensor_v2")
      extra = ()
    self._save(rebuild)
    self._out += b"("
    self._save(pid)
    self._out += b"Q"  # BINPERSID
    for arg in (view.offset, tuple(view.shape), tuple(stride), False, hooks, *extra):
      self._save(arg)
    self._out += b"tR"


def dumps(obj: Any, storages: Mapping[str, np.ndarray] | None = None) -> bytes:
  """The data.pkl bytes for `obj`, whose TensorViews refer to `storages`."""
  return _PickleWriter(storages or {}).dumps(obj)


def storage_bytes(array: np.ndarray, byteorder: str = "little") -> bytes:
  """The raw record torch writes for a flat storage (elements in the file's byte order)."""
  array = np.ascontiguousarray(array).reshape(-1)
  return array.tobytes() if byteorder == "little" else array.byteswap().tobytes()


def write_archive(path: pathlib.Path, data_pkl: bytes | None,
                  records: Mapping[str, bytes] | None = None, *, archive: str = "archive",
                  byteorder: str | None = "little") -> pathlib.Path:
  """Writes the zip container: `<archive>/data.pkl` (unless None), records under `data/`."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    if data_pkl is not None:
      zf.writestr(f"{archive}/data.pkl", data_pkl)
    if byteorder is not None:
      zf.writestr(f"{archive}/byteorder", byteorder)
    for key, data in (records or {}).items():
      zf.writestr(f"{archive}/data/{key}", data)
    zf.writestr(f"{archive}/version", "3\n")
  return path


def write_checkpoint(path: pathlib.Path, obj: Any,
                     storages: Mapping[str, np.ndarray] | None = None, *,
                     archive: str = "archive", byteorder: str = "little",
                     omit: Sequence[str] = (),
                     records: Mapping[str, bytes] | None = None) -> pathlib.Path:
  """Writes `obj` like `torch.save` would, its TensorViews backed by `storages`.

  `omit` leaves out the records of those storage keys and `records` replaces the bytes of
  some, so tests can build damaged files.
  """
  storages = storages or {}
  data = {key: storage_bytes(array, byteorder) for key, array in storages.items()
          if key not in omit}
  data.update(records or {})
  return write_archive(path, dumps(obj, storages), data, archive=archive, byteorder=byteorder)
