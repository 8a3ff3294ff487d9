"""A safe, torch-free reader for PyTorch zip checkpoints (`torch.save`, torch >= 1.6).

Why this exists: the official SDSeg, LDM and kl-f8 weights are `.ckpt` files written by
`torch.save`. `torch.load(..., weights_only=False)` needs torch and executes whatever callables
the pickle names, and `weights_only=True` refuses these files because PyTorch-Lightning also
pickles its own objects into them (e.g. an `AttributeDict` of hyper-parameters). This reader
needs only numpy and never imports or calls anything a file names, except a fixed allow-list
of small functions written here (tensor rebuilders, plain containers). Every other global
becomes an inert `OpaqueObject`; a global that only a hostile file would name (`os.system`,
`builtins.eval`, ...) makes loading fail loudly with `UnsafeCheckpointError`.

The format: a zip archive holding `<archive>/data.pkl`, one `<archive>/data/<key>` record of raw
bytes per storage, and `<archive>/byteorder`. `data.pkl` is a pickle in which every tensor is a
call `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` and
every storage a persistent id `('storage', torch.<Type>Storage, key, location, numel)`.

Reading is lazy: unpickling yields placeholders that know their storage, dtype, offset, size and
stride (bounds already checked against the record sizes in the zip directory) but hold no bytes.
Only the tensors a caller keeps are then read, one storage record at a time, straight into their
own arrays. So `load_state_dict` on a multi-GB Lightning checkpoint never reads the optimizer
state beside the weights, and its peak memory is the weights plus one record, not the file size.
"""

from __future__ import annotations

import builtins
import collections
from collections.abc import Mapping
import dataclasses
import io
import os
import pickle
import sys
from typing import Any
import zipfile
import zlib

import ml_dtypes
import numpy as np

from sdseg_jax import errors

PathLike = str | os.PathLike[str]

_LEGACY_ADVICE = ("legacy pre-1.6 torch.save files are not supported, re-save with "
                  "torch>=1.6")


class CheckpointFormatError(errors.UserFacingError, ValueError):
  """A file is not a readable PyTorch zip checkpoint; the message names the file."""


class UnsafeCheckpointError(CheckpointFormatError):
  """The file's pickle names a global that only a hostile file needs (e.g. `os.system`).

  Nothing is ever called either way; this error exists so that such a file fails loudly
  instead of loading with an inert placeholder where the attack was.
  """


class OpaqueObject:
  """Inert stand-in for a pickled object of a class this reader does not know.

  Lightning checkpoints pickle objects such as `pytorch_lightning...AttributeDict`,
  `argparse.Namespace` or omegaconf configs next to the tensors. Importing their classes would
  need those packages and would run their code, so each unknown global `module.name` becomes a
  subclass of this class instead (one per global and load, with class attributes `module` and
  `name`). Whatever the pickle then does with it is only recorded: constructor arguments
  (`args`, `kwargs`), BUILD state (`state`), dict items (`dictitems`) and list items
  (`listitems`).
  """

  module: str = ""
  name: str = ""

  def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
    # NEWOBJ calls only __new__, REDUCE calls the class, so the recording happens here.
    obj = super().__new__(cls)
    obj.args = args
    obj.kwargs = kwargs
    obj.state = None
    obj.dictitems = {}
    obj.listitems = []
    return obj

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    del args, kwargs  # Already recorded by __new__.

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __setitem__(self, key: Any, value: Any) -> None:
    self.dictitems[key] = value

  def append(self, item: Any) -> None:
    self.listitems.append(item)

  def extend(self, items: Any) -> None:
    self.listitems.extend(items)

  def __repr__(self) -> str:
    return (f"OpaqueObject({self.module}.{self.name}, args={self.args!r}, "
            f"state={self.state!r}, dictitems={self.dictitems!r}, "
            f"listitems={self.listitems!r})")


def _opaque_class(module: str, name: str) -> type[OpaqueObject]:
  """A fresh OpaqueObject subclass standing for the global `module.name`."""
  return type("OpaqueObject", (OpaqueObject,), {"module": module, "name": name})


# --- Element types -----------------------------------------------------------------------

# Typed storage classes that torch writes into persistent ids (`torch.FloatStorage`, ...).
# `UntypedStorage` (pickled as `torch.storage.UntypedStorage`) holds bytes; the tensor then
# says its dtype (`_rebuild_tensor_v3`, for dtypes without a typed storage class).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

# `torch.<dtype>` globals, as pickled for `_rebuild_tensor_v3` or inside user objects.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "cdouble": np.dtype(np.complex128),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What a `torch.<Type>Storage` global resolves to: only its element type matters here."""
  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  """One storage record as a persistent id refers to it: raw bytes plus declared dtype."""
  key: str
  data: memoryview  # Exactly numel * dtype.itemsize bytes of the record.
  dtype: np.dtype
  byteorder: str  # "<" or ">", from the archive's `byteorder` record.

  def elements(self, dtype: np.dtype) -> np.ndarray:
    """The storage as a flat, read-only array of `dtype` in native byte order."""
    count = len(self.data) // dtype.itemsize
    native = "<" if sys.byteorder == "little" else ">"
    if self.byteorder == native or dtype.itemsize == 1:
      return np.frombuffer(self.data, dtype, count)
    # Swap per scalar component: a complex number is two floats, each swapped on its own.
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    stored = np.frombuffer(self.data, np.dtype(f"{self.byteorder}u{unit}"),
                           count * dtype.itemsize // unit)
    return stored.astype(np.dtype(f"=u{unit}")).view(dtype)


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A storage as the pickle names it, before its bytes are read (see `_Archive.storage`)."""
  key: str
  name: str  # The zip record holding the bytes.
  nbytes: int  # numel * dtype.itemsize: the bytes the pickle may view.
  dtype: np.dtype


class _LazyTensor:
  """A tensor whose bytes are not read yet: (storage, dtype, offset, size, stride), checked.

  Unhashable like the numpy array it becomes, so it can never end up in a set or as a key.
  """

  __hash__ = None  # type: ignore[assignment]

  def __init__(self, storage: Any, dtype: np.dtype | None, offset: Any, size: Any,
               stride: Any):
    if not isinstance(storage, _StorageRef):
      raise ValueError(f"tensor storage is a {type(storage).__name__}, not a storage record")
    self.storage, self.dtype = storage, dtype
    self.shape = _index_tuple(size, "size")
    self.strides = _index_tuple(stride, "stride")
    (self.offset,) = _index_tuple((offset,), "storage offset")
    if len(self.shape) != len(self.strides):
      raise ValueError(f"tensor size {self.shape} and stride {self.strides} differ in length")
    count = storage.nbytes // dtype.itemsize
    end = self.offset if self.empty else self.offset + 1 + sum(
        (n - 1) * s for n, s in zip(self.shape, self.strides))
    if end > count:
      raise ValueError(
          f"tensor (size {self.shape}, stride {self.strides}, offset {self.offset}) reads past "
          f"the end of storage {storage.key!r} ({count} elements of {dtype})")

  @property
  def empty(self) -> bool:
    return 0 in self.shape

  @property
  def whole_storage(self) -> bool:
    """Whether the tensor is its storage, element for element (the usual state_dict case)."""
    return (self.offset == 0 and self.strides == _contiguous_strides(self.shape) and
            int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize ==
            self.storage.nbytes)

  def view(self, storage: _Storage) -> np.ndarray:
    """Materialises the tensor from its storage's bytes as an owned C-contiguous array."""
    if self.empty:
      return np.zeros(self.shape, self.dtype)
    elements = storage.elements(self.dtype)
    view = np.lib.stride_tricks.as_strided(
        elements[self.offset:], self.shape, tuple(s * self.dtype.itemsize for s in self.strides),
        writeable=False)
    return np.array(view, order="C", copy=True)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Element strides of a C-contiguous tensor, as torch reports them."""
  strides, step = [], 1
  for n in reversed(shape):
    strides.append(step)
    step *= max(n, 1)
  return tuple(reversed(strides))


# --- Tensor rebuilders (the only torch functions this reader implements) -------------------


def _index_tuple(value: Any, what: str) -> tuple[int, ...]:
  """Validates a size or stride: a sequence of non-negative ints (torch never writes others)."""
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    raise ValueError(f"tensor {what} {value!r} is not a sequence of non-negative ints")
  return tuple(value)


def _view_storage(storage: Any, dtype: np.dtype, offset: Any, size: Any,
                  stride: Any) -> _LazyTensor:
  """The tensor (storage, offset, size, stride), checked now and read later.

  The bounds are checked before anything is read, because a hostile or corrupt pickle could
  otherwise make numpy's stride tricks read outside the storage.
  """
  return _LazyTensor(storage, dtype, offset, size, stride)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _LazyTensor:
  """`torch._utils._rebuild_tensor`: the dtype is the storage's."""
  dtype = storage.dtype if isinstance(storage, _StorageRef) else None
  return _view_storage(storage, dtype, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _LazyTensor:
  """`torch._utils._rebuild_tensor_v2`; autograd flags and hooks mean nothing to numpy."""
  del requires_grad, backward_hooks, metadata
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: Any,
                       metadata: Any = None) -> _LazyTensor:
  """`torch._utils._rebuild_tensor_v3`: an untyped storage read as `dtype` (uint16, fp8...)."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, np.dtype):
    raise ValueError(f"tensor dtype {dtype!r} is not a known torch dtype")
  return _view_storage(storage, dtype, storage_offset, size, stride)


def _require_array(data: Any) -> _LazyTensor:
  if not isinstance(data, _LazyTensor):
    raise ValueError(f"parameter data is a {type(data).__name__}, not a tensor")
  return data


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> _LazyTensor:
  """`torch._utils._rebuild_parameter`: an nn.Parameter is its tensor."""
  del requires_grad, backward_hooks
  return _require_array(data)


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any,
                                  state: Any) -> _LazyTensor:
  """`torch._utils._rebuild_parameter_with_state`: Python attributes of the parameter dropped."""
  del requires_grad, backward_hooks, state
  return _require_array(data)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
  """`torch._tensor._rebuild_from_type_v2`: a tensor subclass is kept as its plain array.

  Calling `func` is safe: it can only be something this unpickler resolved (an allow-listed
  function here, or an inert OpaqueObject class).
  """
  del new_type, state
  return func(*args)


def _torch_size(sizes: Any = ()) -> tuple[Any, ...]:
  """`torch.Size` is a tuple subclass; a tuple is all callers need."""
  return tuple(sizes)


def _torch_device(kind: Any, index: Any = None) -> str:
  """`torch.device` becomes its string form ("cpu", "cuda:0"): arrays here live on the host."""
  return str(kind) if index is None else f"{kind}:{index}"


def _encode_text(text: str, encoding: str = "utf-8") -> bytes:
  """`_codecs.encode`, how protocol-2 pickles spell bytes, limited to plain text codecs."""
  if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
    raise ValueError(f"_codecs.encode with codec {encoding!r} is not allowed")
  return text.encode(encoding)


# --- Which globals resolve, which are refused ----------------------------------------------

_HARMLESS_BUILTINS = ("set", "frozenset", "slice", "complex", "dict", "list", "tuple", "int",
                      "float", "str", "bool")

_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _encode_text,
    **{("builtins", name): getattr(builtins, name) for name in _HARMLESS_BUILTINS},
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", name): dtype for name, dtype in _TORCH_DTYPES.items()},
}

# Python 2 spellings, which the stock find_class maps and an override must map itself.
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

# Modules whose globals run code, touch files, processes or the network, or reach into the
# interpreter. Unknown globals are never called anyway; these only make hostile files fail.
_DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "shutil", "socket",
    "importlib", "runpy", "pickle", "_pickle", "marshal", "types", "ctypes", "_ctypes", "code",
    "codeop", "pty", "webbrowser", "io", "_io", "tempfile", "pathlib", "glob", "signal",
    "multiprocessing", "threading", "_thread", "asyncio", "operator", "_operator", "inspect",
    "gc", "platform", "ssl", "http", "urllib", "ftplib", "smtplib", "telnetlib", "xmlrpc",
    "zipimport", "pkgutil", "imp", "site", "sysconfig", "bdb", "pdb", "timeit", "trace",
    "profile", "cProfile", "zipfile", "tarfile", "shelve", "dbm", "sqlite3", "dill",
    "cloudpickle", "requests", "pip", "setuptools", "distutils", "torch.hub", "torch.jit",
    "torch.package", "torch.utils.cpp_extension", "numpy.f2py", "numpy.distutils",
    "numpy.testing",
})

_DANGEROUS_BUILTINS = frozenset({
    "eval", "exec", "compile", "getattr", "setattr", "delattr", "__import__", "open", "input",
    "breakpoint", "globals", "locals", "vars", "help", "exit", "quit", "__build_class__",
    "type", "super", "memoryview", "classmethod", "staticmethod", "property",
})

_DANGEROUS_GLOBALS = frozenset({
    ("torch", "load"), ("torch", "save"), ("torch.serialization", "load"),
    ("torch.serialization", "save"), ("numpy", "load"), ("numpy", "save"),
    ("numpy", "fromfile"), ("numpy", "loadtxt"), ("numpy", "genfromtxt"),
})


def _is_dangerous(module: str, name: str) -> bool:
  """Whether `module.name` (or a dotted attribute path under it) is on the refuse lists."""
  module = module.strip()
  parts = module.split(".")
  if any(".".join(parts[:i]) in _DANGEROUS_MODULES for i in range(1, len(parts) + 1)):
    return True
  head = name.strip().split(".", 1)[0]
  if module == "builtins" and head in _DANGEROUS_BUILTINS:
    return True
  return (module, head) in _DANGEROUS_GLOBALS


# --- The archive and its pickle -------------------------------------------------------------


def _not_a_zip_reason(path: str) -> str:
  """Explains why `path` did not open as a zip, from its first bytes."""
  with open(path, "rb") as f:
    head = f.read(4)
  if head == b"PK\x03\x04":
    return ("truncated or corrupt zip archive (no readable central directory); the file may "
            "be an incomplete copy or download")
  if head[:1] == b"\x80":
    return f"not a PyTorch zip checkpoint (it is a bare pickle); {_LEGACY_ADVICE}"
  return f"not a PyTorch zip checkpoint (bad zip header); {_LEGACY_ADVICE}"


def _open_zip(path: str) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, EOFError) as e:
    raise CheckpointFormatError(f"{path}: {_not_a_zip_reason(path)}") from e


class _Archive:
  """An open checkpoint zip: where its records are, and how the kept tensors are read."""

  def __init__(self, path: str, zip_file: zipfile.ZipFile):
    self.path = path
    self._zip = zip_file
    self._names = frozenset(zip_file.namelist())
    self._prefix = self._find_prefix()
    self._byteorder = self._read_byteorder()

  def _error(self, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{self.path}: {problem}")

  def _find_prefix(self) -> str:
    """The `<archive>/` folder: torch names it after the file, but any name is valid."""
    names = self._zip.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      found = "no" if not pickles else f"{len(pickles)}"
      raise self._error(
          f"not a PyTorch zip checkpoint: {found} <archive>/data.pkl record(s) among "
          f"{len(names)} entries {names[:5]!r}")
    return pickles[0][:-len("data.pkl")]

  def _read_error(self, name: str, e: Exception) -> CheckpointFormatError:
    return self._error(f"cannot read record {name!r} ({type(e).__name__}: {e}); the file "
                       f"may be truncated or corrupt")

  def _read(self, name: str) -> bytes:
    """One record's bytes; a truncated or corrupt record is a format error."""
    try:
      return self._zip.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as e:
      raise self._read_error(name, e) from e

  def _read_into(self, name: str, out: np.ndarray) -> None:
    """Fills `out` (C-contiguous, exactly the record's size) with the record's bytes.

    No intermediate `bytes`: the record goes straight into the array that is returned. Reading
    the record to its end makes zipfile check its CRC, as `read` does.
    """
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    try:
      with self._zip.open(name) as f:
        filled = 0
        while filled < len(buffer):
          n = f.readinto(buffer[filled:])
          if not n:
            raise EOFError(f"record ends after {filled} of {len(buffer)} bytes")
          filled += n
        if f.read(1):
          raise zipfile.BadZipFile("record is longer than its directory entry says")
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as e:
      raise self._read_error(name, e) from e

  def _read_byteorder(self) -> str:
    """"<" or ">"; files written before torch recorded it were little-endian."""
    name = self._prefix + "byteorder"
    if name not in self._names:
      return "<"
    order = self._read(name).strip()
    if order not in (b"little", b"big"):
      raise self._error(f"unknown byteorder record {order!r}")
    return "<" if order == b"little" else ">"

  def storage(self, pid: Any) -> _StorageRef:
    """Resolves a persistent id ('storage', storage type, key, location, numel), unread.

    The record's size comes from the zip directory, so a short record is an error here, at
    unpickling, although its bytes are read only if a kept tensor needs them.
    """
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise self._error(f"unsupported persistent id {pid!r} in data.pkl")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise self._error(f"storage {key!r} has unsupported storage type {storage_type!r}")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise self._error(f"malformed storage reference {pid!r}")
    name = f"{self._prefix}data/{key}"
    if name not in self._names:
      raise self._error(f"storage record {name!r} is missing from the archive")
    size = self._zip.getinfo(name).file_size
    nbytes = numel * storage_type.dtype.itemsize
    if size < nbytes:
      raise self._error(f"storage record {name!r} is too short: {size} bytes, but the "
                        f"pickle needs {numel} x {storage_type.dtype} = {nbytes} bytes")
    return _StorageRef(key, name, nbytes, storage_type.dtype)

  def unpickle(self) -> Any:
    """Loads data.pkl with every tensor a `_LazyTensor`; nothing else is read.

    Any failure of the pickle itself becomes a CheckpointFormatError.
    """
    data = self._read(self._prefix + "data.pkl")
    try:
      return _RestrictedUnpickler(io.BytesIO(data), self).load()
    except (CheckpointFormatError, MemoryError):
      raise
    except Exception as e:  # A corrupt or hostile pickle can fail in any way.
      raise self._error(f"malformed data.pkl ({type(e).__name__}: {e})") from e

  def materialize(self, obj: Any) -> Any:
    """`obj` with every lazy tensor (and bare storage) read, in place where containers allow.

    Each storage record is read once: straight into the tensor's own array when the tensor is
    the whole storage in native byte order, else into a buffer kept only until the last tensor
    viewing it is built. Peak memory is therefore the tensors of `obj` plus one record.
    """
    leaves: dict[int, Any] = {}  # One result per leaf object the pickle may share.
    _walk(obj, lambda leaf: leaves.setdefault(id(leaf), leaf))
    users = collections.Counter(leaf.storage.key if isinstance(leaf, _LazyTensor) else leaf.key
                                for leaf in leaves.values())
    buffers: dict[str, _Storage] = {}
    results: dict[int, Any] = {}

    def read(leaf: _LazyTensor | _StorageRef) -> np.ndarray | _Storage:
      if id(leaf) not in results:
        results[id(leaf)] = read_once(leaf)
      return results[id(leaf)]

    def read_once(leaf: _LazyTensor | _StorageRef) -> np.ndarray | _Storage:
      ref = leaf.storage if isinstance(leaf, _LazyTensor) else leaf
      users[ref.key] -= 1
      if (isinstance(leaf, _LazyTensor) and ref.key not in buffers and users[ref.key] == 0 and
          leaf.whole_storage and self._zip.getinfo(ref.name).file_size == ref.nbytes and
          (self._byteorder == _NATIVE_ORDER or leaf.dtype.itemsize == 1)):
        array = np.empty(leaf.shape, leaf.dtype)
        self._read_into(ref.name, array)
        return array
      if ref.key not in buffers:
        buffers[ref.key] = _Storage(ref.key, memoryview(self._read(ref.name))[:ref.nbytes],
                                    ref.dtype, self._byteorder)
      storage = buffers[ref.key] if users[ref.key] else buffers.pop(ref.key)
      return leaf.view(storage) if isinstance(leaf, _LazyTensor) else storage

    return _walk(obj, read)


_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"


def _walk(obj: Any, visit: Any) -> Any:
  """Replaces each `_LazyTensor` / `_StorageRef` leaf of `obj` by `visit(leaf)`.

  Dicts, lists and OpaqueObjects are updated in place (so objects the pickle shares stay
  shared, and cycles end); tuples are rebuilt. Each mutable container is visited once.
  """
  seen: set[int] = set()

  def go(node: Any) -> Any:
    if isinstance(node, (_LazyTensor, _StorageRef)):
      return visit(node)
    if isinstance(node, tuple):
      return type(node)(go(x) for x in node) if type(node) is tuple else node
    if not isinstance(node, (dict, list, OpaqueObject)) or id(node) in seen:
      return node
    seen.add(id(node))
    if isinstance(node, dict):
      for key, value in node.items():
        node[key] = go(value)
    elif isinstance(node, list):
      node[:] = [go(x) for x in node]
    else:
      node.args, node.kwargs, node.state = go(node.args), go(node.kwargs), go(node.state)
      go(node.dictitems)
      go(node.listitems)
    return node

  return go(obj)


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves globals from fixed tables and never imports anything."""

  def __init__(self, file: io.BytesIO, archive: _Archive):
    super().__init__(file)
    self._archive = archive
    self._opaque_classes: dict[tuple[str, str], type[OpaqueObject]] = {}

  def find_class(self, module: str, name: str) -> Any:
    module = _MODULE_ALIASES.get(module, module)
    if _is_dangerous(module, name):
      raise UnsafeCheckpointError(
          f"{self._archive.path}: refusing to load: its pickle names the dangerous global "
          f"{module}.{name} (nothing was executed)")
    key = (module, name)
    if key in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[key]
    if key not in self._opaque_classes:  # Same global, same class, as with real imports.
      self._opaque_classes[key] = _opaque_class(module, name)
    return self._opaque_classes[key]

  def persistent_load(self, pid: Any) -> _StorageRef:
    return self._archive.storage(pid)


def load_torch_checkpoint(path: PathLike) -> Any:
  """Loads a `torch.save` zip checkpoint with tensors as numpy arrays, without torch.

  Reads every tensor of the file; `load_state_dict` reads only the weights.

  Args:
    path: a `.ckpt` / `.pt` file written by `torch.save` (torch >= 1.6 zip format).

  Returns:
    The pickled object (usually a dict) with every tensor and parameter as an owned,
    C-contiguous numpy array of the tensor's dtype (bfloat16 as `ml_dtypes.bfloat16`),
    `torch.Size` as a tuple, `torch.device` as a string, torch dtypes as numpy dtypes and
    objects of unknown classes as `OpaqueObject`s.

  Raises:
    UnsafeCheckpointError: the pickle names a dangerous global such as `os.system`.
    CheckpointFormatError: the file is not a readable zip checkpoint (truncated, not a zip,
      legacy format, missing data.pkl or storage records, malformed pickle).
  """
  path = os.fspath(path)
  with _open_zip(path) as zip_file:
    archive = _Archive(path, zip_file)
    return archive.materialize(archive.unpickle())


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """The name -> array weights of a checkpoint, reading no other tensor of the file.

  `state_dict_from_checkpoint(load_torch_checkpoint(path), path)` without its cost: the
  optimizer moments, EMA copies of other modules or callback state that Lightning stores beside
  "state_dict" stay unread, and each weight is read straight into its own array. Converting a
  multi-GB training checkpoint thus needs about the memory of its weights, not of the file.

  Raises:
    UnsafeCheckpointError, CheckpointFormatError: as `load_torch_checkpoint` and
      `state_dict_from_checkpoint`.
  """
  path = os.fspath(path)
  with _open_zip(path) as zip_file:
    archive = _Archive(path, zip_file)
    obj = archive.unpickle()
    source, where = _weights_source(obj)
    if isinstance(source, Mapping):
      source = archive.materialize(dict(source))
    return _state_dict(source, where, path)


def _is_undecoded_tensor(value: Any) -> bool:
  """Whether `value` stands for a torch tensor this reader cannot decode (sparse, quantized)."""
  return isinstance(value, OpaqueObject) and value.module.split(".")[0] == "torch"


def _weights_source(obj: Any) -> tuple[Any, str]:
  """Where the weights are: Lightning's "state_dict" entry, or the object itself."""
  if isinstance(obj, Mapping) and "state_dict" in obj:
    return obj["state_dict"], "its 'state_dict' entry"
  return obj, "the checkpoint"


def state_dict_from_checkpoint(obj: Any, path: PathLike) -> dict[str, np.ndarray]:
  """The name -> array weights of a loaded checkpoint.

  Lightning checkpoints keep them under "state_dict" beside optimizer and callback state; a
  plain `torch.save(model.state_dict())` file is the mapping itself. Non-tensor entries (such
  as `_extra_state` objects) are dropped; a tensor this reader could not decode is an error,
  so a weight can never silently go missing.

  Args:
    obj: what `load_torch_checkpoint(path)` returned.
    path: the checkpoint's path, for error messages.

  Returns:
    A dict from parameter name to numpy array (scalar tensors as 0-d arrays), in file order.

  Raises:
    CheckpointFormatError: no mapping of tensors was found, a key is not a string, or an
      entry is a tensor of an unsupported kind.
  """
  source, where = _weights_source(obj)
  return _state_dict(source, where, os.fspath(path))


def _state_dict(source: Any, where: str, path: str) -> dict[str, np.ndarray]:
  if not isinstance(source, Mapping):
    raise CheckpointFormatError(
        f"{path}: {where} is a {type(source).__name__}, not a dict of tensors")
  state = {}
  for key, value in source.items():
    if _is_undecoded_tensor(value):
      raise CheckpointFormatError(
          f"{path}: entry {key!r} is a tensor of an unsupported kind ({value.module}."
          f"{value.name})")
    if not isinstance(value, np.ndarray):
      continue
    if not isinstance(key, str):
      raise CheckpointFormatError(f"{path}: {where} has a non-string key {key!r}")
    state[key] = value
  if not state:
    raise CheckpointFormatError(f"{path}: {where} holds no tensors")
  return state
