"""The jobs' file operations: atomic writes (a temporary file in the target
folder, renamed into place), JSON written that way, and the few operations
on run folders, all through `etils.epath`, so a workdir can be a local path
or a cloud-storage URL (`gs://bucket/run`, as Orbax accepts).

Local paths keep local atomicity (temporary file + rename). On cloud storage
a file is written locally and uploaded as one object; an object store
replaces an object whole, so readers still see the old or the new file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from etils import epath

from experiments import distributed
from nnbase.param_files import arrays_sha256


def is_remote(path: str) -> bool:
  """Whether `path` is a URL (gs://, s3://) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path: str) -> str:
  """An absolute local path; URLs unchanged (os.path.abspath would break them)."""
  return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str) -> List[str]:
  """Names in folder `path` (empty when it does not exist)."""
  p = epath.Path(path)
  return [c.name for c in p.iterdir()] if p.is_dir() else []


def walk_files(folder: str) -> Iterator[str]:
  """Paths of every file under `folder`, relative to it, with "/" separators."""
  root = epath.Path(folder)
  for d, _, files in root.walk():
    for f in files:
      yield os.fspath((epath.Path(d) / f).relative_to(root))


def rename(src: str, dst: str) -> None:
  """Moves a file or folder (on an object store: copy, then delete)."""
  epath.Path(src).rename(dst)


def rmtree(path: str) -> None:
  p = epath.Path(path)
  if p.exists():
    p.rmtree()


def remove(path: str) -> None:
  epath.Path(path).unlink(missing_ok=True)


def open_file(path: str, mode: str = "r", errors: str = "strict"):
  """`open` for local paths and URLs ("a" only for local paths); text is UTF-8,
  decoded with `errors` (e.g. "replace")."""
  if "a" in mode and is_remote(path):
    raise ValueError(f"append is not supported on {path}: rewrite the file with atomic_path")
  if "b" in mode:
    return epath.Path(path).open(mode)
  binary = epath.Path(path).open(mode.replace("t", "") + "b")  # epath takes no `errors`
  return io.TextIOWrapper(binary, encoding="utf-8", errors=errors)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp"):
  """Yields a temporary local path; on success its file replaces `path`.

  Readers see the old file or the complete new one, never a partial write.
  On an exception the temporary file is removed and `path` is untouched.
  For a URL the file is uploaded as one object (an object store's write is
  atomic).
  """
  if is_remote(path):
    with tempfile.TemporaryDirectory() as d:
      tmp = os.path.join(d, "upload" + suffix)
      yield tmp
      makedirs(os.path.dirname(path))
      epath.Path(tmp).copy(path, overwrite=True)
    return
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
  with open_file(path) as f:
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
  with open_file(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# ------------------------------------------------------------ verified caches


class CacheError(Exception):
  """A cache file that cannot be used: unreadable, incomplete or not the bytes it should be."""


def read_verified_npz(
  path: str,
  keys: Sequence[str],
  sha256: Optional[str] = None,
  shapes: Optional[Sequence[tuple]] = None,
) -> Tuple[np.ndarray, ...]:
  """The arrays `keys` of the local .npz cache `path`, after checking them.

  Their `arrays_sha256` must equal `sha256` or, when it is None, the digest
  that `write_verified_npz` stored in the file. With `shapes`, each array must
  have its shape. Raises CacheError with a one-line reason otherwise (a
  missing, truncated or foreign file included), for the caller to rebuild.
  """
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = tuple(z[k] for k in keys)
      expected = sha256 if sha256 is not None else str(z["sha256"])
  except Exception as e:  # OS, zip, npz-format and missing-key errors alike
    raise CacheError(f"unreadable: {type(e).__name__}: {e}") from e
  got = [a.shape for a in arrays]
  if shapes is not None and got != [tuple(s) for s in shapes]:
    raise CacheError(f"shapes {got}, expected {[tuple(s) for s in shapes]}")
  digest = arrays_sha256(arrays)
  if digest != expected:
    raise CacheError(f"sha256 {digest}, expected {expected}")
  return arrays


def write_verified_npz(path: str, arrays: Mapping[str, Any], store_sha256: bool = True) -> None:
  """Writes `arrays` (name -> array, in the order `read_verified_npz` reads
  them) to the local .npz `path`, atomically; with `store_sha256`, also
  their `arrays_sha256` under the key "sha256"."""
  out = {k: np.asarray(v) for k, v in arrays.items()}
  if store_sha256:
    out["sha256"] = np.array(arrays_sha256(list(out.values())))
  with atomic_path(path, ".npz.tmp") as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **out)
