"""Atomic file writes (a temporary file in the target folder, renamed into place)
and JSON files written that way."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Any

from experiments import distributed


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp"):
  """Yields a temporary path beside `path`; on success it replaces `path`.

  Readers see the old file or the complete new one, never a partial write.
  On an exception the temporary file is removed and `path` is untouched.
  """
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically; in a multi-process run only
  process 0 writes (the others return)."""
  if not distributed.is_writer():
    return
  with atomic_path(path, ".json.tmp") as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())


def sha256_file(path: str) -> str:
  """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
