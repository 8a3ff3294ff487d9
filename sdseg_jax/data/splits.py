"""Train/val/test splits as plain text files, written once and then reused.

The official SDSeg code slices unsorted `glob` listings, so its splits depend on the filesystem
(docs/method.md#reproducible-splits). Here a split is proposed deterministically from SORTED names
and a seed, written to `split_dir/{train,val,test}.txt` (one name a line) plus
`split_dir/split_info.json`, and every later run reads those files back. Reading the files instead
of recomputing means a run keeps its split even if the proposing code changes, and a split can be
hand-edited or copied between runs. A split that names data that is not on disk is an error, never a
silent shrink of the dataset.
"""

from __future__ import annotations

import collections
import json
import logging
from typing import Callable, Mapping, Sequence

import numpy as np

from sdseg_jax import storage
from sdseg_jax.data.base import DataError

SPLITS = ("train", "val", "test")
INFO_FILE = "split_info.json"


def seeded_partition(names: Sequence[str], sizes: Mapping[str, int], seed: int,
                     rest: str = "train") -> dict[str, list[str]]:
  """Permutes SORTED names with `seed` and cuts consecutive blocks of the given sizes.

  The split named `rest` gets everything left; each list is returned sorted.
  """
  names = sorted(names)
  order = np.random.default_rng(seed).permutation(len(names))
  shuffled = [names[i] for i in order]
  out, start = {}, 0
  for split, size in sizes.items():
    out[split] = sorted(shuffled[start:start + size])
    start += size
  if start > len(names):
    raise DataError(f"split sizes {dict(sizes)} exceed the {len(names)} available samples")
  out[rest] = sorted(shuffled[start:])
  return out


def _write_atomic(path: storage.PathLike, text: str) -> None:
  # Several processes of one run may propose the same split at once: the content is identical,
  # and an atomic write (rename locally, one upload on gs://) keeps readers from ever seeing
  # half a file.
  storage.write_text_atomic(path, text)


def read_split_files(split_dir: storage.PathLike) -> dict[str, list[str]]:
  split_dir = storage.path(split_dir)
  return {s: [line.strip() for line in (split_dir / f"{s}.txt").read_text().splitlines()
              if line.strip()]
          for s in SPLITS}


def resolve_splits(split_dir: storage.PathLike, available: Sequence[str],
                   propose: Callable[[], Mapping[str, Sequence[str]]],
                   info: Mapping[str, object]) -> dict[str, list[str]]:
  """Returns {train, val, test} name lists, reading `split_dir` if it holds a split.

  Args:
    split_dir: folder of the run's split files.
    available: every name found on disk (what a split may refer to).
    propose: makes the split when none is on disk yet (deterministic).
    info: what identifies the split (dataset, scheme, seed...); stored next to the lists and
      compared on reuse so a run cannot silently mix e.g. a Kvasir split with CVC data.
  Raises:
    DataError: the stored split names missing data, overlaps itself, or was made for another
      dataset/scheme.
  """
  split_dir = storage.path(split_dir)  # a run's workdir may be gs://
  info = {k: v for k, v in info.items()}
  have = [(split_dir / f"{s}.txt").exists() for s in SPLITS]
  if all(have):
    splits = read_split_files(split_dir)
    info_path = split_dir / INFO_FILE
    if info_path.exists():
      stored = json.loads(info_path.read_text())
      diff = {k: (stored.get(k), v) for k, v in info.items() if stored.get(k) != v}
      if diff:
        raise DataError(f"{split_dir} holds a split made with other settings "
                        f"(stored, requested): {diff}; use another split_dir or delete it")
  elif any(have):
    raise DataError(f"{split_dir} holds only some of {SPLITS}: incomplete split, delete it")
  else:
    proposed = propose()
    splits = {s: sorted(proposed.get(s, [])) for s in SPLITS}
    split_dir.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
      _write_atomic(split_dir / f"{s}.txt", "".join(f"{n}\n" for n in splits[s]))
    _write_atomic(split_dir / INFO_FILE, json.dumps(info, indent=1, sort_keys=True) + "\n")
    logging.info("wrote split %s to %s", {s: len(v) for s, v in splits.items()}, split_dir)
  _validate(split_dir, splits, available)
  return splits


def _validate(split_dir: storage.PathLike, splits: Mapping[str, Sequence[str]],
              available: Sequence[str]) -> None:
  available = set(available)
  problems = []
  for s in SPLITS:
    dups = sorted(n for n, c in collections.Counter(splits[s]).items() if c > 1)
    if dups:
      problems.append(f"{s}.txt lists duplicates: {dups[:10]}")
    missing = [n for n in splits[s] if n not in available]
    if missing:
      problems.append(f"{s}.txt names {len(missing)} samples not on disk: {missing[:20]}")
  for i, a in enumerate(SPLITS):
    for b in SPLITS[i + 1:]:
      both = sorted(set(splits[a]) & set(splits[b]))
      if both:
        problems.append(f"{a} and {b} overlap in {len(both)} samples: {both[:10]}")
  if problems:
    raise DataError(f"split files in {split_dir} do not match the data: " + "; ".join(problems))
  unused = available - set().union(*map(set, splits.values()))
  if unused:
    logging.warning("%d samples on disk are in no split of %s (e.g. %s)", len(unused), split_dir,
                    sorted(unused)[:5])
