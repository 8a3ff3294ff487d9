"""Run and output paths that live on local disk or in a Cloud Storage bucket (gs://).

On a TPU pod the hosts share no disk, so workdirs, exports and converted weights go to a bucket.
Every path the CLIs take goes through `path()`, which returns an `etils.epath.Path`: the same
path type orbax uses, local files through `os`, `gs://` through gcsfs (fsspec). Paths are joined
with `/` on that object, never as strings or through `pathlib`, because
`pathlib.Path("gs://b/run")` is the local folder `gs:/b/run`.

`path()` rejects strings that look like a mistyped URL (`gs:/b/run`, `gcs://b/run`, an invalid
bucket name) instead of letting them become local folders, and `check_bucket()` fails before any
work starts when the bucket is missing, the credentials are missing or the bucket is not writable:
a run never silently falls back to local disk.

GCS objects cannot be appended to or renamed atomically; writers here therefore build a file in
memory and upload it in one request (an upload is atomic: the object appears complete or not at
all). Local files keep the temporary-file + rename pattern.

Testing against an emulator (fake-gcs-server): STORAGE_EMULATOR_HOST points gcsfs at it,
TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING point tensorstore (orbax) at it, and the
credentials check is skipped because the emulator accepts anonymous requests. gcsfs's zonal-bucket
probe speaks gRPC, which emulators do not serve: set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import BinaryIO, Iterator, Union
import uuid

from etils import epath

from sdseg_jax import errors

PathLike = Union[str, os.PathLike]

_SCHEME = "gs"
# A URL-like prefix: a scheme of two or more letters, a colon and a slash ("C:/x" is a drive).
_URL_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")
# Cloud Storage bucket names: 3-63 characters (up to 222 with dots), lowercase letters, digits,
# dashes, underscores and dots, starting and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


class StorageError(errors.UserFacingError, ValueError):
  """A path is malformed, or its bucket is missing, unreachable or not writable."""


def is_remote(value: PathLike) -> bool:
  """True for a `gs://` path (as a string or an epath.Path)."""
  return os.fspath(value).startswith(f"{_SCHEME}://")


def bucket(value: PathLike) -> str:
  """The bucket name of a `gs://` path."""
  return os.fspath(value)[len(f"{_SCHEME}://"):].split("/", 1)[0]


def path(value: PathLike) -> epath.Path:
  """An epath.Path for a local path or `gs://BUCKET/PATH`; rejects mistyped URLs.

  Raises:
    StorageError: for `gs:/b/x`, `gs:b/x`, `gcs://b/x`, other schemes, or a bad bucket name.
  """
  text = os.fspath(value)
  url = _URL_PREFIX.match(text)
  if text.lower().startswith(("gs:", "gcs:")) and not text.startswith(f"{_SCHEME}://"):
    rest = re.sub(r"^[A-Za-z]+:/*", "", text)
    raise StorageError(f"{text!r} is not a valid Cloud Storage path; did you mean "
                       f"'gs://{rest}'? (a local folder would be created instead)")
  if url and url.group(1) != _SCHEME:
    raise StorageError(f"{text!r}: unsupported storage scheme {url.group(1)!r}; use a local "
                       "path or gs://BUCKET/PATH")
  if is_remote(text):
    name = bucket(text)
    if not _BUCKET_NAME.match(name):
      raise StorageError(f"{text!r}: {name!r} is not a valid bucket name (3-63 lowercase "
                         "letters, digits, '-', '_' or '.'); expected gs://BUCKET/PATH")
  return epath.Path(text)


def _check_credentials(where: str) -> None:
  """Application Default Credentials must exist (unless an emulator is used)."""
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return  # an emulator accepts anonymous requests
  import google.auth  # pylint: disable=g-import-not-at-top
  import google.auth.exceptions  # pylint: disable=g-import-not-at-top
  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise StorageError(
        f"{where}: no Google Cloud credentials found ({e}). On a TPU VM or GCE the VM's service "
        "account is used; elsewhere run `gcloud auth application-default login` or set "
        "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file") from None


def check_bucket(value: PathLike, *, write: bool) -> None:
  """Fails early, naming `value`, when a gs:// path cannot be used; a no-op for local paths.

  Checks that credentials exist and that the bucket exists; with `write`, by writing and
  deleting a probe object with a unique name under `value` (which needs object permissions
  only), otherwise by looking the bucket up. gcsfs would otherwise fall back to anonymous
  access and fail later, or create the bucket on `mkdir(parents=True)`.
  """
  if not is_remote(value):
    return
  where = os.fspath(value)
  _check_credentials(where)
  name = bucket(where)
  missing = (f"{where}: bucket gs://{name} does not exist (or these credentials cannot see it); "
             f"create it with `gcloud storage buckets create gs://{name} --location=REGION` or "
             "fix the path")
  try:
    if write:  # an upload into a missing bucket is a 404, i.e. FileNotFoundError
      probe = path(where) / f".sdseg_write_probe_{uuid.uuid4().hex}"
      probe.write_bytes(b"")
      probe.unlink()
    elif not epath.Path(f"{_SCHEME}://{name}").exists():
      raise FileNotFoundError(name)
  except FileNotFoundError:
    raise StorageError(missing) from None
  except Exception as e:  # gcsfs raises OSError (403), HttpError, aiohttp errors...
    action = "write to" if write else "read from"
    raise StorageError(f"{where}: cannot {action} gs://{name} ({type(e).__name__}: {e}); check "
                       "the bucket's IAM permissions (roles/storage.objectAdmin to write, "
                       "roles/storage.objectViewer to read)") from e


@contextlib.contextmanager
def open_atomic(target: PathLike) -> Iterator[BinaryIO]:
  """A binary file whose contents replace `target` atomically when the block ends cleanly.

  Readers see the old file or the new one, never a partial one. Locally the data streams to a
  temporary file beside `target` (renamed at the end, removed on error), so a multi-GB artifact
  never needs a second copy in memory; a gs:// object is one upload at the end.
  """
  target = path(target)
  if is_remote(target):
    buffer = io.BytesIO()
    yield buffer
    target.write_bytes(buffer.getvalue())  # one upload: atomic on GCS
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
  try:
    with open(tmp, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_bytes_atomic(target: PathLike, data: bytes) -> None:
  """Writes `data` so that readers see the old file or the new one, never a partial one."""
  with open_atomic(target) as f:
    f.write(data)


def write_text_atomic(target: PathLike, text: str) -> None:
  write_bytes_atomic(target, text.encode("utf-8"))


def read_bytes(source: PathLike) -> io.BytesIO:
  """The whole file in memory (one download for gs://, instead of many ranged reads)."""
  return io.BytesIO(path(source).read_bytes())
