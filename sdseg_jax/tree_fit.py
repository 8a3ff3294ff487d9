"""Does a stored pytree fit the tree a caller asks for? Every difference, named by its path.

Orbax would catch a shape mismatch itself, but only one array at a time and deep inside
tensorstore, and a structure mismatch (e.g. a checkpoint of another optimizer or model) gives
cryptic errors. `mismatches` compares the stored tree's metadata (no array is read) with the
requested abstract tree and lists what is missing, unexpected or misshapen, so a checkpoint
error can say all of it at once.
"""

from __future__ import annotations

from typing import Any

import jax


def _path(path: tuple[Any, ...]) -> str:
  """Key path as "a/b/0", so a dataclass field, a NamedTuple field and a dict key compare
  equal (orbax stores dataclasses and NamedTuples as dicts, tuples as lists)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _stored_shape(leaf: Any) -> tuple[int, ...] | None:
  """Shape as orbax stores the leaf: PRNG key arrays are stored as their key data."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    return None
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data,
                                jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)).shape)
  return tuple(leaf.shape)


def mismatches(stored_tree: Any, wanted_tree: Any, subtree: bool = False) -> list[str]:
  """Human-readable differences between a stored tree (orbax metadata) and an abstract tree.

  `subtree`: the wanted tree is a part of the stored one (partial restore), so stored leaves
  it does not ask for are fine. Empty when the trees fit.
  """
  stored = {_path(p): tuple(getattr(leaf, "shape", ()) or ())
            for p, leaf in jax.tree_util.tree_flatten_with_path(stored_tree)[0]}
  wanted = {_path(p): _stored_shape(leaf)
            for p, leaf in jax.tree_util.tree_flatten_with_path(wanted_tree)[0]}
  missing = sorted(set(wanted) - set(stored))
  unexpected = [] if subtree else sorted(set(stored) - set(wanted))
  wrong = sorted(k for k in set(wanted) & set(stored)
                 if wanted[k] is not None and wanted[k] != stored[k])
  details = [f"{len(keys)} {what}, e.g. {keys[:3]}" for keys, what in (
      (missing, "leaves missing from the checkpoint"),
      (unexpected, "unexpected leaves in the checkpoint")) if keys]
  if wrong:
    details.append("shape mismatch " + ", ".join(
        f"{k}: checkpoint {stored[k]} vs expected {wanted[k]}" for k in wrong[:3]))
  return details
