"""pyproject.toml agrees with the pinned requirements files and with the package tree.

pyproject.toml declares the direct dependencies with lower bounds; requirements*.txt are the lock
CI installs. A dependency that the lock does not pin (or pins below its bound) would install an
untested version for `pip install -e .` users, so every one must be pinned at a version its bound
admits. No network and no build: the files are only parsed.
"""

import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import sdseg_jax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Where each group of pyproject dependencies is pinned.
LOCKS = {
    "dependencies": ("requirements.txt",),
    "tpu": ("requirements-tpu.txt",),
    "bench": ("requirements-bench.txt",),
    "test": ("requirements.txt",),
}


def _name(name: str) -> str:
  """PEP 503 normalised project name."""
  return re.sub(r"[-_.]+", "-", name).lower()


def pins(*files: str) -> dict:
  """{normalised name: Version} of the `name[extras]==version` lines of requirements files."""
  pinned = {}
  for file in files:
    for line in (REPO_ROOT / file).read_text().splitlines():
      line = line.split("#", 1)[0].strip()
      if line:
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{file}: {line!r} is not an exact pin"
        pinned[_name(requirement.name)] = Version(spec.version)
  return pinned


def pyproject() -> dict:
  return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def dependency_groups() -> dict:
  project = pyproject()["project"]
  return {"dependencies": project["dependencies"], **project["optional-dependencies"]}


def unpinned(requirements, pinned) -> list:
  """The requirements that `pinned` does not pin at a version their specifier admits."""
  problems = []
  for text in requirements:
    requirement = Requirement(text)
    version = pinned.get(_name(requirement.name))
    if version is None:
      problems.append(f"{text}: not pinned")
    elif not requirement.specifier.contains(version, prereleases=True):
      problems.append(f"{text}: pinned at {version}")
  return problems


def test_every_dependency_is_pinned_within_its_bound():
  groups = dependency_groups()
  assert set(groups) == set(LOCKS), f"extras {sorted(groups)} vs locks {sorted(LOCKS)}"
  for group, files in LOCKS.items():
    problems = unpinned(groups[group], pins(*files))
    assert not problems, f"pyproject {group} vs {files}: {problems}"


def test_the_python312_lock_is_within_the_bounds():
  """The GPU image's stack (requirements-py312.txt) must satisfy the same lower bounds."""
  pinned = pins("requirements-py312.txt")
  shared = [r for r in dependency_groups()["dependencies"] if _name(Requirement(r).name) in pinned]
  assert shared, "requirements-py312.txt pins none of the dependencies"
  assert not unpinned(shared, pinned)


def test_checker_reports_missing_and_too_old_pins():
  pinned = {"jax": Version("0.10.2")}
  assert unpinned(["jax>=0.10.2"], pinned) == []
  assert unpinned(["jax>=0.11"], pinned) == ["jax>=0.11: pinned at 0.10.2"]
  assert unpinned(["flax>=0.12"], pinned) == ["flax>=0.12: not pinned"]


def test_metadata_matches_the_package():
  project = pyproject()["project"]
  assert project["name"] == "sdseg_jax"
  assert "3.11" in SpecifierSet(project["requires-python"])
  version_attr = pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert version_attr == "sdseg_jax.__version__"
  Version(sdseg_jax.__version__)  # a valid version string
  # setuptools' package discovery finds only folders with an __init__.py: a subpackage without
  # one would be missing from an installed (non-editable) sdseg_jax.
  for folder in (REPO_ROOT / "sdseg_jax").rglob("*"):
    if folder.is_dir() and "__pycache__" not in folder.parts and any(folder.glob("*.py")):
      assert (folder / "__init__.py").is_file(), f"{folder} has modules but no __init__.py"


def test_ruff_is_pinned_for_ci():
  """.ci/run runs `ruff check .` with the version requirements.txt pins."""
  assert "ruff" in pins("requirements.txt")
  assert "ruff check ." in (REPO_ROOT / ".ci" / "run").read_text()
