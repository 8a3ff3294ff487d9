"""Checks a wheelhouse for the lent GPU machine: complete, one version each, small, installable.

The machine has no registry access: whatever sdseg_jax needs beyond its image travels as wheels
and is installed with `pip install --no-index --no-deps --target DIR`. `--no-deps` means pip
checks nothing, so this script does it here, before the device time is spent:

* every pin of the pin file has exactly one wheel, of that version, and no other wheel is there
  (two versions of one package stop the whole install);
* every wheel is installable on CPython 3.12, Linux x86_64 (py3-none-any, cp312 or abi3, and a
  manylinux x86_64 platform tag);
* every requirement of every wheel (markers evaluated for CPython 3.12.3 on Linux x86_64) is met
  by another wheel of the set or by a package of the image; a version range is checked wherever
  the version is known (the wheel's own, or the image's where the package list names one);
  requirements the pin file omits on purpose (`# omit: NAME reason`) are reported, not failed;
* the wheels together are at most --max-mb megabytes.

  python3 launch/device_wheelhouse_check.py --wheels .whl --pins launch/device_wheels.txt \
      --image launch/device_image_packages.txt
"""

import argparse
import dataclasses
import email.parser
import pathlib
import re
import sys
from typing import Dict, List, Optional, Tuple
import zipfile

try:
  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name
  from packaging.utils import parse_wheel_filename
  from packaging.version import Version
except ImportError:  # Every pip vendors packaging.
  from pip._vendor.packaging.requirements import Requirement  # type: ignore
  from pip._vendor.packaging.utils import canonicalize_name  # type: ignore
  from pip._vendor.packaging.utils import parse_wheel_filename  # type: ignore
  from pip._vendor.packaging.version import Version  # type: ignore

# The device machine's interpreter (as the device tool describes it): Python 3.12.3 at
# /opt/torch/.venv/bin/python3.
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "platform_release": "", "platform_version": "", "implementation_version": "3.12.3"}
_PLATFORM = re.compile(r"^(manylinux\d*_(\d+_\d+_)?x86_64|manylinux\d+_x86_64|any)$")


@dataclasses.dataclass
class Wheel:
  name: str          # canonical name
  version: Version
  path: pathlib.Path
  requires: List[str]


def read_pins(path: pathlib.Path) -> Tuple[Dict[str, Version], Dict[str, str]]:
  """`name==version` lines -> {canonical name: version}; `# omit: NAME reason` -> {name: reason}."""
  pins, omitted = {}, {}
  for number, raw in enumerate(path.read_text().splitlines(), 1):
    line = raw.strip()
    if line.startswith("# omit:"):
      name, _, reason = line[len("# omit:"):].strip().partition(" ")
      omitted[canonicalize_name(name)] = reason.strip()
      continue
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    name, sep, version = line.partition("==")
    if not sep or not version.strip():
      raise ValueError(f"{path}:{number}: expected NAME==VERSION, got {raw!r}")
    pins[canonicalize_name(name.strip())] = Version(version.strip())
  return pins, omitted


def read_image(path: pathlib.Path) -> Dict[str, Optional[Version]]:
  """The image's packages: `name` or `name==version` lines -> {canonical name: version or None}."""
  image = {}
  for raw in path.read_text().splitlines():
    line = raw.split("#", 1)[0].strip()
    if line:
      name, _, version = line.partition("==")
      image[canonicalize_name(name.strip())] = Version(version) if version else None
  return image


def read_wheel(path: pathlib.Path) -> Wheel:
  name, version, _, _ = parse_wheel_filename(path.name)
  with zipfile.ZipFile(path) as z:
    meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    meta = email.parser.Parser().parsestr(z.read(meta_name).decode("utf-8"))
  return Wheel(canonicalize_name(name), version, path, meta.get_all("Requires-Dist") or [])


def tag_problem(path: pathlib.Path) -> Optional[str]:
  """Why a wheel cannot install on CPython 3.12 / Linux x86_64, or None."""
  _, _, _, tags = parse_wheel_filename(path.name)
  for tag in tags:
    python_ok = tag.interpreter in ("py3", "cp312") or (
        tag.abi == "abi3" and tag.interpreter.startswith("cp3")
        and int(tag.interpreter[3:]) <= 12)
    if python_ok and tag.abi in ("none", "cp312", "abi3") and _PLATFORM.match(tag.platform):
      return None
  return f"{path.name}: no tag installs on CPython 3.12 / manylinux x86_64"


def _active(requirement: Requirement, extra: str = "") -> bool:
  return requirement.marker is None or requirement.marker.evaluate(dict(TARGET_ENV, extra=extra))


def check(wheel_dir: pathlib.Path, pins: Dict[str, Version], omitted: Dict[str, str],
          image: Dict[str, Optional[Version]], max_mb: float) -> Tuple[List[str], List[str]]:
  """(problems, notes) of the wheelhouse; no problems means it is ready to travel."""
  problems, notes = [], []
  wheels: Dict[str, List[Wheel]] = {}
  for path in sorted(wheel_dir.glob("*.whl")):
    try:
      wheel = read_wheel(path)
    except (ValueError, StopIteration, zipfile.BadZipFile, KeyError) as e:
      problems.append(f"{path.name}: not a readable wheel ({e})")
      continue
    wheels.setdefault(wheel.name, []).append(wheel)
    if (problem := tag_problem(path)) is not None:
      problems.append(problem)
  for name, found in sorted(wheels.items()):
    if len(found) > 1:
      problems.append(f"{name}: {len(found)} wheels ({', '.join(w.path.name for w in found)}); "
                      "keep one version, two stop the whole install")
    if name not in pins:
      problems.append(f"{found[0].path.name}: not in the pin file")
    elif found[0].version != pins[name]:
      problems.append(f"{found[0].path.name}: the pin file says {name}=={pins[name]}")
    if name in image:
      problems.append(f"{name}: the image already has it; a second copy shadows the image's")
  for name, version in sorted(pins.items()):
    if name not in wheels:
      problems.append(f"{name}=={version}: pinned but no wheel in {wheel_dir}")

  available = {n: ws[0] for n, ws in wheels.items()}

  def satisfied(requirement: Requirement, needed_by: str) -> None:
    name = canonicalize_name(requirement.name)
    if name in available:
      wheel = available[name]
      if requirement.specifier and wheel.version not in requirement.specifier:
        problems.append(f"{needed_by} needs {requirement}, the set has {name}=={wheel.version}")
      for extra in requirement.extras:  # the extra's own requirements must be met too
        for line in wheel.requires:
          sub = Requirement(line)
          if sub.marker is not None and _active(sub, extra) and not _active(sub):
            satisfied(sub, f"{needed_by} -> {name}[{extra}]")
    elif name in image:
      version = image[name]
      if version is not None and requirement.specifier and version not in requirement.specifier:
        problems.append(f"{needed_by} needs {requirement}, the image has {name}=={version}")
    elif name in omitted:
      notes.append(f"{needed_by} needs {requirement}: omitted on purpose ({omitted[name]})")
    else:
      problems.append(f"{needed_by} needs {requirement}: neither in the wheelhouse nor in the "
                      "image; pin it in the pin file")

  for name, wheel in sorted(available.items()):
    for line in wheel.requires:
      requirement = Requirement(line)
      if _active(requirement):
        satisfied(requirement, f"{name}=={wheel.version}")

  total = sum(w.path.stat().st_size for ws in wheels.values() for w in ws)
  notes.append(f"{sum(map(len, wheels.values()))} wheels, {total / 1e6:.1f} MB")
  if total > max_mb * 1e6:
    problems.append(f"the wheels take {total / 1e6:.1f} MB, more than the {max_mb:g} MB allowed")
  return problems, notes


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  here = pathlib.Path(__file__).resolve().parent
  parser.add_argument("--wheels", type=pathlib.Path, required=True, help="the wheelhouse folder")
  parser.add_argument("--pins", type=pathlib.Path, default=here / "device_wheels.txt")
  parser.add_argument("--image", type=pathlib.Path, default=here / "device_image_packages.txt")
  parser.add_argument("--max-mb", type=float, default=40.0)
  args = parser.parse_args(argv)
  pins, omitted = read_pins(args.pins)
  problems, notes = check(args.wheels, pins, omitted, read_image(args.image), args.max_mb)
  for note in notes:
    print(f"note: {note}")
  for problem in problems:
    print(f"error: {problem}", file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
