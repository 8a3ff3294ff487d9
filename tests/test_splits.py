"""data/splits.py: the seeded partition, the split files on disk and their validation.

Expected values are written out by hand (file contents, error messages, which lists a seed
gives), so a change of format or rule fails here. Pure Python on tmp_path, well under a second.
"""

import json
import logging

import numpy as np
import pytest

from sdseg_jax.data import splits
from sdseg_jax.data.base import DataError

NAMES = [f"img{i}" for i in range(10)]
INFO = {"seed": 3, "dataset": "toy"}  # written back with sorted keys


def test_seeded_partition_cuts_consecutive_blocks_of_a_seeded_permutation_of_sorted_names():
  got = splits.seeded_partition(list(reversed(NAMES)), {"val": 2, "test": 3}, seed=5)
  order = np.random.default_rng(5).permutation(10)  # the documented rule, by hand
  shuffled = [NAMES[i] for i in order]
  assert got == {"val": sorted(shuffled[:2]), "test": sorted(shuffled[2:5]),
                 "train": sorted(shuffled[5:])}
  assert list(got) == ["val", "test", "train"]
  assert splits.seeded_partition(NAMES, {"val": 2, "test": 3}, seed=6) != got


def test_seeded_partition_rest_name_and_exact_fit():
  got = splits.seeded_partition(NAMES, {"train": 7, "val": 3}, seed=0, rest="test")
  assert got["test"] == [] and len(got["train"]) == 7 and len(got["val"]) == 3
  assert sorted(got["train"] + got["val"]) == NAMES


def test_seeded_partition_rejects_sizes_larger_than_the_data():
  with pytest.raises(DataError, match=r"split sizes \{'val': 6, 'test': 5\} exceed the 10 "
                                      r"available samples"):
    splits.seeded_partition(NAMES, {"val": 6, "test": 5}, seed=0)


def _propose():
  return {"train": ["img3", "img1", "img2"], "val": ["img4"], "test": ["img0", "img5"]}


def test_first_call_writes_sorted_split_files_and_info(tmp_path, caplog):
  split_dir = tmp_path / "a" / "splits"
  with caplog.at_level(logging.INFO):
    got = splits.resolve_splits(split_dir, NAMES[:6], _propose, INFO)
  assert got == {"train": ["img1", "img2", "img3"], "val": ["img4"], "test": ["img0", "img5"]}
  assert (split_dir / "train.txt").read_text() == "img1\nimg2\nimg3\n"
  assert (split_dir / "val.txt").read_text() == "img4\n"
  assert (split_dir / "test.txt").read_text() == "img0\nimg5\n"
  assert (split_dir / "split_info.json").read_text() == '{\n "dataset": "toy",\n "seed": 3\n}\n'
  assert caplog.messages == [f"wrote split {{'train': 3, 'val': 1, 'test': 2}} to {split_dir}"]


def test_a_missing_split_in_the_proposal_is_written_empty(tmp_path):
  got = splits.resolve_splits(tmp_path, ["a", "b"], lambda: {"train": ["b", "a"]}, INFO)
  assert got == {"train": ["a", "b"], "val": [], "test": []}
  assert (tmp_path / "val.txt").read_text() == ""


def test_later_calls_read_the_files_not_the_proposal(tmp_path):
  splits.resolve_splits(tmp_path, NAMES[:6], _propose, INFO)
  (tmp_path / "val.txt").write_text("  img4 \n\n")  # hand-edited: blanks and spaces are ignored

  def must_not_run():
    raise AssertionError("propose called although the split exists")

  got = splits.resolve_splits(tmp_path, NAMES[:6], must_not_run, INFO)
  assert got == {"train": ["img1", "img2", "img3"], "val": ["img4"], "test": ["img0", "img5"]}
  assert splits.read_split_files(tmp_path) == got


def test_split_without_info_file_is_accepted(tmp_path):
  splits.resolve_splits(tmp_path, NAMES[:6], _propose, INFO)
  (tmp_path / "split_info.json").unlink()
  got = splits.resolve_splits(tmp_path, NAMES[:6], _propose, {"dataset": "other"})
  assert got["val"] == ["img4"]


def test_a_split_made_with_other_settings_is_an_error(tmp_path):
  splits.resolve_splits(tmp_path, NAMES[:6], _propose, INFO)
  with pytest.raises(DataError, match=r"holds a split made with other settings \(stored, "
                                      r"requested\): \{'seed': \(3, 4\)\}"):
    splits.resolve_splits(tmp_path, NAMES[:6], _propose, {"dataset": "toy", "seed": 4})
  stored = json.loads((tmp_path / "split_info.json").read_text())
  assert stored == INFO


def test_an_incomplete_split_is_an_error(tmp_path):
  (tmp_path / "train.txt").write_text("img1\n")
  with pytest.raises(DataError, match=r"holds only some of \('train', 'val', 'test'\): "
                                      "incomplete split"):
    splits.resolve_splits(tmp_path, NAMES, _propose, INFO)


def _write(split_dir, train, val, test):
  for name, names in (("train", train), ("val", val), ("test", test)):
    (split_dir / f"{name}.txt").write_text("".join(f"{n}\n" for n in names))


@pytest.mark.parametrize("train,val,test,message", [
    (["a", "a", "b"], ["c"], [], r"train.txt lists duplicates: \['a'\]"),
    (["a"], ["c", "c"], [], r"val.txt lists duplicates: \['c'\]"),
    (["a"], ["c"], ["zz", "b"], r"test.txt names 1 samples not on disk: \['zz'\]"),
    (["a", "b"], ["b"], [], r"train and val overlap in 1 samples: \['b'\]"),
    (["a"], ["b"], ["a"], r"train and test overlap in 1 samples: \['a'\]"),
    (["a"], ["b"], ["b"], r"val and test overlap in 1 samples: \['b'\]"),
])
def test_split_files_that_do_not_match_the_data_are_errors(tmp_path, train, val, test, message):
  _write(tmp_path, train, val, test)
  with pytest.raises(DataError, match=r"split files in .* do not match the data: .*" + message):
    splits.resolve_splits(tmp_path, ["a", "b", "c"], _propose, INFO)


def test_every_problem_is_reported_at_once(tmp_path):
  _write(tmp_path, ["a", "a"], ["a"], ["q"])
  with pytest.raises(DataError) as e:
    splits.resolve_splits(tmp_path, ["a", "b"], _propose, INFO)
  text = str(e.value)
  assert text == (f"split files in {tmp_path} do not match the data: "
                  "train.txt lists duplicates: ['a']; test.txt names 1 samples not on disk: "
                  "['q']; train and val overlap in 1 samples: ['a']")


def test_long_problem_lists_are_cut_to_a_few_examples(tmp_path):
  many = [f"n{i:02d}" for i in range(30)]
  _write(tmp_path, many[:12] * 2, many[:12], [f"x{i:02d}" for i in range(25)])
  with pytest.raises(DataError) as e:
    splits.resolve_splits(tmp_path, many, _propose, INFO)
  text = str(e.value)
  assert f"train.txt lists duplicates: {many[:10]}" in text
  assert "val and" not in text and f"train and val overlap in 12 samples: {many[:10]}" in text
  assert "test.txt names 25 samples not on disk: " + str([f"x{i:02d}" for i in range(20)]) in text


def test_samples_in_no_split_are_a_warning_not_an_error(tmp_path, caplog):
  _write(tmp_path, ["a"], ["b"], [])
  with caplog.at_level(logging.WARNING):
    got = splits.resolve_splits(tmp_path, ["a", "b", "c", "d"], _propose, INFO)
  assert got == {"train": ["a"], "val": ["b"], "test": []}
  assert caplog.messages == [f"2 samples on disk are in no split of {tmp_path} (e.g. ['c', 'd'])"]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    splits.resolve_splits(tmp_path, ["a", "b"], _propose, INFO)
  assert "in no split" not in caplog.text


def test_unused_samples_warning_names_five_examples(tmp_path, caplog):
  _write(tmp_path, ["a"], [], [])
  with caplog.at_level(logging.WARNING):
    splits.resolve_splits(tmp_path, list("abcdefgh"), _propose, INFO)
  assert caplog.messages == [f"7 samples on disk are in no split of {tmp_path} "
                             "(e.g. ['b', 'c', 'd', 'e', 'f'])"]
