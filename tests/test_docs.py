"""Every documentation reference in the repository resolves inside the repository.

Code comments, configs, tests, launch scripts and Markdown pages send readers to `docs/*.md`
sections, the READMEs and BENCHMARKS.md. A user's clone has nothing else, so a reference to a
Markdown file must name a file of the repository (relative to the repository root or to the
referring file), a `#anchor` must be a heading of that file, and nothing may point at the
developers' private notes beside the repository or at numbered sections that only those had.
"""

import functools
import pathlib
import re
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
THIS_FILE = pathlib.Path(__file__).resolve()

TEXT_SUFFIXES = {".py", ".md", ".sh", ".sbatch", ".txt", ".toml", ".cfg", ".ini", ".yaml", ".yml"}
EXTRA_FILES = (".ci/run",)
# Folders that are not part of the repository's content: environments, caches, run outputs.
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", ".cache", ".whl", "runs", "workdirs",
                "build", "dist", "node_modules"}

# A path to a Markdown file, optionally with an anchor. It may not start in the middle of a URL
# or a longer path (hence the look-behind).
MD_REFERENCE = re.compile(r"(?<![\w./:@-])((?:\.{1,2}/)*(?:[\w.-]+/)*[\w.-]+\.md)(#[\w-]+)?")
# Section numbers ("§10.3", "performance.md section 1.3") pointed into the private notes.
SECTION_NUMBER = re.compile(r"§\s*\d|\.md,?\s+sections?\s+\d")
# The shared folder beside the repository holds fixtures and data (allowed: tests use them and
# skip without them) and the developers' private notes (never to be referenced).
PRIVATE_NOTES = re.compile(r"shared/docs\b")
SHARED_PREFIX = "../shared/"
# Markdown files that our commands WRITE (not part of the repository), e.g. the reproduction
# report `DIR/report.md` of `python -m sdseg_jax.reproduce`.
# `scores.md` of `tests/mutation.sh`.
GENERATED_OUTPUTS = {"report.md", "scores.md"}


def _skipped(path: pathlib.Path) -> bool:
  parts = path.relative_to(REPO_ROOT).parts[:-1]
  return any(p in SKIPPED_DIRS or p.startswith(".venv") or p.endswith(".egg-info")
             for p in parts)


@functools.lru_cache(maxsize=None)
def text_files() -> tuple:
  files = [p for p in REPO_ROOT.rglob("*")
           if p.is_file() and p.suffix in TEXT_SUFFIXES and not _skipped(p)]
  files += [REPO_ROOT / name for name in EXTRA_FILES if (REPO_ROOT / name).is_file()]
  return tuple(sorted(p for p in files if p.resolve() != THIS_FILE))


def github_anchors(markdown: str) -> set:
  """The anchors GitHub generates for the headings of a Markdown text (fenced code skipped).

  Lower case; characters other than letters, digits, spaces, '-' and '_' dropped; spaces become
  '-'; a repeated heading gets '-1', '-2', ... appended.
  """
  anchors, seen, fenced = set(), {}, False
  for line in markdown.splitlines():
    if line.lstrip().startswith(("```", "~~~")):
      fenced = not fenced
      continue
    match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not match:
      continue
    slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f"{slug}-{count}")
  return anchors


def resolve(reference: str, referrer: pathlib.Path):
  """The repository file a reference names (relative to the referrer or the root), or None."""
  for base in (referrer.parent, REPO_ROOT):
    candidate = (base / reference).resolve()
    if candidate.is_file() and candidate.is_relative_to(REPO_ROOT):
      return candidate
  return None


def reference_problems(path: pathlib.Path) -> list:
  """What is wrong with the documentation references of one file (empty when all resolve)."""
  text = path.read_text(errors="replace")
  where = path.relative_to(REPO_ROOT)
  problems = []
  for number, line in enumerate(text.splitlines(), 1):
    if PRIVATE_NOTES.search(line):
      problems.append(f"{where}:{number}: points at the private notes outside the repository "
                      f"(use docs/*.md): {line.strip()}")
    if SECTION_NUMBER.search(line):
      problems.append(f"{where}:{number}: a numbered section of a document; name it as "
                      f"docs/<page>.md#<anchor> instead: {line.strip()}")
    for match in MD_REFERENCE.finditer(line):
      reference, anchor = match.group(1), match.group(2)
      if reference.startswith(SHARED_PREFIX):
        continue  # fixtures and data beside the repository, checked by the tests that use them
      if pathlib.PurePosixPath(reference).name in GENERATED_OUTPUTS:
        continue
      target = resolve(reference, path)
      if target is None:
        problems.append(f"{where}:{number}: {reference} is not a file of the repository")
      elif anchor and anchor[1:] not in github_anchors(target.read_text()):
        problems.append(f"{where}:{number}: {reference} has no heading for {anchor}")
  return problems


def test_the_scan_sees_the_repository():
  names = {str(p.relative_to(REPO_ROOT)) for p in text_files()}
  assert {"README.md", "docs/method.md", "docs/design.md", "docs/performance.md",
          "sdseg_jax/train.py", "configs/base.py", "launch/README.md", ".ci/run"} <= names


def test_docs_are_linked_from_the_readme():
  readme = (REPO_ROOT / "README.md").read_text()
  for page in ("docs/method.md", "docs/design.md", "docs/performance.md"):
    assert f"]({page}" in readme, f"README.md does not link {page}"


def test_readme_layout_matches_the_tree():
  """README.md's Layout lists every module of the package, one line each, and nothing else."""
  readme = (REPO_ROOT / "README.md").read_text()
  section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
  block = section.split("```", 2)[1]
  listed = [line.split()[0] for line in block.splitlines() if line.strip()]
  missing_paths = [p for p in listed if not (REPO_ROOT / p).exists()]
  assert not missing_paths, f"README.md Layout names paths that do not exist: {missing_paths}"
  modules = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "sdseg_jax").rglob("*.py")
                   if p.name != "__init__.py" and not _skipped(p))
  unlisted = [m for m in modules if m not in listed]
  assert not unlisted, f"modules missing from README.md's Layout: {unlisted}"
  assert len(listed) == len(set(listed)), "README.md's Layout lists a path twice"


def test_documentation_references_resolve():
  problems = [problem for path in text_files() for problem in reference_problems(path)]
  assert not problems, "\n".join(problems)


def test_checker_catches_broken_references(tmp_path, monkeypatch):
  """The checker itself: each kind of broken reference is reported, a good one is not."""
  monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", tmp_path)
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Some section: a/b\n```\n# not\n```\n")
  bad = {
      "missing file": "see docs/absent.md",
      "private notes": "see ../shared/docs/design.md",
      "missing anchor": "see docs/page.md#not-a-heading",
      "code-block line is no heading": "see docs/page.md#not",
      "section number": "see page.md §6.5",
  }
  for name, line in bad.items():
    source = tmp_path / "x.py"
    source.write_text(f"# {line}\n")
    assert reference_problems(source), f"{name} not reported"
  source = tmp_path / "ok.py"
  source.write_text("# docs/page.md#some-section-ab and docs/page.md, https://x.org/a/README.md\n")
  assert reference_problems(source) == []
