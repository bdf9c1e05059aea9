"""Orbax checkpoints of a pytree train state, in `workdir/checkpoints`.

Orbax writes each step to a temporary directory and renames it when complete,
so a crash never leaves a half-written step that `latest_step` would pick.
Each save waits for the step to be complete and then writes its files'
SHA-256 into `<step>/sha256.json`; a restore checks them before Orbax reads
anything. A step without a manifest (a crash between the two) is never used
silently: a training job opening the folder moves it to
`<workdir>/checkpoints_unverified/` and resumes from the newest verified step. A step that cannot be
read back (truncated or corrupted files, or a tree that does not match the
run's model) raises `CheckpointError`, a `UsageError` that names the step's
folder; file-system failures while saving (full or read-only disk) come out
as `OSError`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
import weakref
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from experiments import distributed, files
from experiments.errors import UsageError
from experiments.files import atomic_path, read_json, sha256_file, write_json_atomic


class CheckpointError(UsageError):
  """A checkpoint that exists but cannot be restored."""


# How TensorStore (under Orbax) reports file-system failures: a ValueError
# whose text starts with an absl status code, not an OSError.
_STATUS_ERRNO = (
  ("RESOURCE_EXHAUSTED", errno.ENOSPC),
  ("No space left", errno.ENOSPC),
  ("PERMISSION_DENIED", errno.EACCES),
  ("Read-only file system", errno.EROFS),
)


def _os_error(e: BaseException) -> Optional[OSError]:
  """The OSError in e's cause/context chain, if any (TensorStore's status
  errors for a full, read-only or forbidden disk count as one)."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    text = str(e)
    for status, code in _STATUS_ERRNO:
      if status in text:
        return OSError(code, text.strip().splitlines()[0][:300] if text.strip() else status)
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return f"{type(e).__name__}: {text[:limit]}"


MANIFEST = "sha256.json"


def _file_hashes(folder: str) -> dict:
  """{relative path: sha256 hex} of every file under `folder` but the manifest."""
  return {
    rel: sha256_file(os.path.join(folder, rel))
    for rel in files.walk_files(folder)
    if rel != MANIFEST
  }


def write_manifest(folder: str) -> None:
  """Records the hashes of a complete step folder (atomically)."""

  hashes = _file_hashes(folder)
  with atomic_path(os.path.join(folder, MANIFEST), ".json.tmp") as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(hashes, f, indent=0, sort_keys=True)


def verify_manifest(folder: str) -> Optional[str]:
  """None if the folder matches its manifest (or has none); else what differs."""
  path = os.path.join(folder, MANIFEST)
  if not files.exists(path):
    return None
  try:
    want = read_json(path)
  except (OSError, ValueError) as e:
    return f"its {MANIFEST} is unreadable ({e})"
  have = _file_hashes(folder)
  missing = sorted(set(want) - set(have))
  if missing:
    return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
  changed = sorted(k for k in want if have[k] != want[k])
  if changed:
    return f"{len(changed)} file(s) differ from their recorded SHA-256, e.g. {changed[0]}"
  return None


def set_aside_unhashed_steps(directory: str) -> list:
  """Moves every complete step folder of `directory` that has no manifest to
  `<directory>_unverified/<step>` (kept, never deleted), with one stderr line
  each; returns the steps moved."""
  moved = []
  for name in sorted(files.listdir(directory), key=lambda n: (len(n), n)):
    folder = os.path.join(directory, name)
    if not (name.isdigit() and files.isdir(folder)):
      continue
    if files.exists(os.path.join(folder, MANIFEST)):
      continue
    aside_root = directory.rstrip(os.sep) + "_unverified"
    files.makedirs(aside_root)
    dest, k = os.path.join(aside_root, name), 1
    while files.exists(dest):
      dest, k = os.path.join(aside_root, f"{name}.{k}"), k + 1
    files.rename(folder, dest)
    moved.append(int(name))
    print(
      f"note: checkpoint step {name} has no {MANIFEST} (a crash before its hashes were "
      f"written), so it is not trusted: moved to {dest}; resuming from the newest verified "
      "checkpoint",
      file=sys.stderr,
    )
  return moved


def remove_temporary_folders(directory: str) -> None:
  """Removes Orbax's `*.orbax-checkpoint-tmp*` folders (saves that never completed)."""
  for name in files.listdir(directory):
    if ".orbax-checkpoint-tmp" in name:
      try:
        files.rmtree(os.path.join(directory, name))
      except OSError:
        pass


_OPEN = weakref.WeakSet()  # Checkpointers not yet closed


def close_all_quietly() -> None:
  """Closes every open Checkpointer, ignoring errors: for a job's error exit,
  so Orbax's background threads end before the interpreter does."""
  for ckpt in list(_OPEN):
    try:
      ckpt.close()
    except Exception:
      pass
    _OPEN.discard(ckpt)


class Checkpointer:
  """Keeps the latest `max_to_keep` steps; optionally a separate best-by-metric dir."""

  def __init__(
    self,
    directory: str,
    max_to_keep: int = 2,
    best_metric: Optional[str] = None,
    best_mode: str = "min",
    set_aside_unverified: bool = False,
  ):
    self.directory = files.absolute(directory)  # Orbax needs absolute paths (or URLs)
    if set_aside_unverified and distributed.is_writer():
      set_aside_unhashed_steps(self.directory)
    distributed.barrier(f"checkpoints {self.directory} checked")
    options = dict(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    if best_metric is not None:
      options.update(best_fn=lambda m: m[best_metric], best_mode=best_mode)
    self._mngr = ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(**options)
    )
    _OPEN.add(self)

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def _io(self, fn, *args, **kwargs):
    """Runs an Orbax call; a file-system failure anywhere in it becomes an OSError."""
    try:
      return fn(*args, **kwargs)
    except Exception as e:  # Orbax wraps errors of its writer threads
      err = _os_error(e)
      if err is None or err is e:
        raise
      raise OSError(
        err.errno, f"saving a checkpoint in {self.directory}: {err.strerror or err}", err.filename
      ) from e

  def save(self, step: int, state: Any, metrics: Optional[dict] = None, force: bool = True) -> None:
    """Saves `state` at `step` and, once the step is complete, its manifest.

    Only steps this call wrote get a manifest: error paths and restores never
    certify files they did not write.
    """
    self._io(self._mngr.wait_until_finished)
    saved = self._io(
      self._mngr.save, int(step), args=ocp.args.StandardSave(state), metrics=metrics, force=force
    )
    self._io(self._mngr.wait_until_finished)
    folder = os.path.join(self.directory, str(int(step)))
    distributed.barrier(f"checkpoint {step} saved")  # every process has written its part
    if saved is not False and files.isdir(folder) and distributed.is_writer():
      write_manifest(folder)

  def restore(self, abstract_state: Any, step: Optional[int] = None, hint: str = "") -> Any:
    """Restores onto `abstract_state` (e.g. `jax.eval_shape` of the initialiser).

    Raises CheckpointError naming the step's folder when it cannot be read
    back (its files differ from its sha256.json, or Orbax fails); `hint` is
    appended to that message.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    folder = os.path.join(self.directory, str(step))
    problem = verify_manifest(folder)
    if problem:
      raise CheckpointError(
        f"the checkpoint {folder} is corrupt or truncated: {problem}. Move it away to resume "
        "from an older checkpoint (or start over), or use a new workdir"
      )
    try:
      state = self._mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      raise CheckpointError(
        f"cannot restore the checkpoint {folder} ({_first_line(e)}). It is truncated or "
        f"corrupt, or was written for another model or optimizer{hint}. Move it away to "
        "resume from an older checkpoint (or start over), or use a new workdir"
      ) from None
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    bad = [
      p
      for p, a, b in zip(paths, jax.tree.leaves(state), jax.tree.leaves(abstract))
      if getattr(a, "shape", None) != b.shape or getattr(a, "dtype", None) != b.dtype
    ]
    if bad:
      raise CheckpointError(
        f"the checkpoint {folder} does not match this run's model: "
        f"{bad[0]} and {len(bad) - 1} more differ in shape or dtype{hint}; "
        "use a new workdir for a different model"
      )
    return state

  def wait(self) -> None:
    self._io(self._mngr.wait_until_finished)

  def close(self) -> None:
    """Waits for the last save and closes; then no save is in flight, so any
    Orbax temporary folder left (an interrupted save) is removed."""
    _OPEN.discard(self)
    try:
      self.wait()
    finally:
      self._mngr.close()
      if distributed.is_writer():
        remove_temporary_folders(self.directory)


def restore_hint(config, workdir: str) -> str:
  """For checkpoint errors: ' (this run changes a, b from W/config.json)', or ''."""
  path = os.path.join(workdir, "config.json")
  try:
    stored = read_json(path)
  except (OSError, ValueError):
    return ""
  if not isinstance(stored, dict):
    return ""
  diff = [
    f.name
    for f in dataclasses.fields(config)
    if f.name in stored and stored[f.name] != getattr(config, f.name)
  ]
  return f" (this run changes {', '.join(diff)} from {path})" if diff else ""


def resume_or_init(
  ckpt: Checkpointer,
  init,
  config,
  preset: str,
  workdir: str,
  total_steps: Optional[int] = None,
  unit: str = "--steps",
) -> tuple:
  """(state, latest step or None): the latest checkpoint restored onto the
  shapes of `init()`, or `init()` when there is none. Only then, with the
  checkpoint readable, is `workdir/config.json` rewritten with `config`, so a
  refused run leaves the workdir as it was. A run asking for fewer than
  `total_steps` steps than the checkpoint holds is refused (UsageError)."""

  latest = ckpt.latest_step()
  if latest is not None and total_steps is not None and latest > total_steps:
    raise UsageError(
      f"{workdir} has trained {latest} steps; {unit} asks for {total_steps} in "
      "all, fewer than already done. Ask for at least as many, or use a new "
      "workdir"
    )
  if latest is not None:
    state = ckpt.restore(jax.eval_shape(init), latest, hint=restore_hint(config, workdir))
  else:
    state = init()
  write_json_atomic(
    os.path.join(workdir, "config.json"), {"preset": preset, **dataclasses.asdict(config)}
  )
  return state, latest


def restore_latest(directory: str, init) -> tuple:
  """(state, step) from the latest checkpoint in `directory`, restored onto the
  shapes of `init()`; a UsageError ("train first") when there is none."""
  ckpt = Checkpointer(directory)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise UsageError(f"no checkpoint in {ckpt.directory}; train first")
    return ckpt.restore(jax.eval_shape(init), step), step
  finally:
    ckpt.close()
