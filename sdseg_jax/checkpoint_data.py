"""The data-iterator state inside a checkpoint: a value wrapped for grain's orbax handler.

A module of its own so that `checkpoint.py` holds the orbax manager and nothing else; the
envelope format below is what checkpoints on disk contain, so it must not change.
"""

from __future__ import annotations

import base64
import json
from typing import Any


class DataStateHolder:
  """Presents a saved iterator state as the iterator object grain's orbax handler expects.

  grain's `CheckpointHandler` calls `get_state()` / `set_state()` / `start_prefetch()` on a live
  iterator. Passing the state *value* instead keeps `Checkpointer` independent of how the lead
  builds its loader, and lets `restore` hand the state back before the loader exists. The value
  is wrapped in a small JSON envelope so bytes (DataLoaderIterator) and dicts (DatasetIterator)
  both round-trip to their original type.
  """

  def __init__(self, value: Any = None):
    self.value = value

  def get_state(self) -> bytes:
    if isinstance(self.value, (bytes, bytearray)):
      envelope = {"kind": "bytes", "value": base64.b64encode(bytes(self.value)).decode("ascii")}
    elif isinstance(self.value, str):
      envelope = {"kind": "str", "value": self.value}
    else:
      envelope = {"kind": "json", "value": self.value}
    return json.dumps(envelope).encode()

  def set_state(self, state: bytes) -> None:
    envelope = json.loads(state.decode())
    kind, value = envelope["kind"], envelope["value"]
    if kind == "bytes":
      self.value = base64.b64decode(value)
    elif kind in ("str", "json"):
      self.value = value
    else:
      raise ValueError(f"unknown data-state kind {kind!r}")

  def start_prefetch(self) -> None:
    """Called by grain's handler after `set_state`; there is nothing to prefetch here."""
