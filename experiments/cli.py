"""Flags, presets, config.json and metrics.jsonl shared by the jobs.

A job declares a `dataclass` config (field docs in `metadata["help"]`) and a
dict of presets (field overrides). Every field becomes a `--flag`; flags left
out keep the preset's value. A workdir remembers its config in
`config.json`: running again resumes with it, and explicit flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import sys
import tempfile
import typing
from typing import Any, Optional

from experiments import distributed, files, runtime
from experiments.checkpoints import close_all_quietly
from experiments.data import DataError
from experiments.errors import (  # noqa: F401  (the jobs use them as cli.X)
  EXIT_DIVERGED,
  EXIT_INTERNAL,
  EXIT_IO,
  EXIT_PEER_LOST,
  EXIT_PREEMPTED,
  EXIT_USAGE,
  UsageError,
)
from experiments.files import atomic_path, read_json, write_json_atomic  # noqa: F401
from nnbase import user_cache
from nnbase.param_files import WeightsError


def flag(default, text: str):
  """A config dataclass field with its `--help` text."""
  return dataclasses.field(default=default, metadata={"help": text})


def _parse_bool(s: str) -> bool:
  v = s.strip().lower()
  if v in ("1", "true", "yes", "on"):
    return True
  if v in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _field_parser(tp):
  """Converter for a field annotation (str, int, float, bool or Optional of them)."""
  origin = typing.get_origin(tp)
  if origin is typing.Union:
    inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
    conv = _field_parser(inner)

    def optional(s):
      return None if s.strip().lower() == "none" else conv(s)

    optional.__name__ = inner.__name__  # argparse names it in "invalid int value"
    return optional
  if tp is bool:
    return _parse_bool
  return tp


def _launch_name() -> Optional[str]:
  """The job's name as launched, `python -m experiments.X`, or None for any
  other launch (argparse would name the file, "X.py", not what the user typed)."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  name = getattr(spec, "name", "") or ""
  return f"python -m {name}" if name.startswith("experiments.") else None


class _Parser(argparse.ArgumentParser):
  """The jobs' parser: a bad flag raises UsageError (one line, exit 2), and
  the usage line and errors name the job as it was launched."""

  def __init__(self, *args, **kwargs):
    if not args and kwargs.get("prog") is None:
      kwargs["prog"] = _launch_name()
    super().__init__(*args, **kwargs)

  def error(self, message):
    raise UsageError(message)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends "(default: X)" only where X is a value and the help does not
  name a default itself. A config flag's argparse default is None, meaning
  "the preset's, or the stored run's", and its help names the field's default."""

  def _get_help_string(self, action):
    if action.default is None or "default" in (action.help or ""):
      return action.help
    return super()._get_help_string(action)


def build_parser(
  config_cls, presets: dict, description: str, stop_unit: str = "steps"
) -> argparse.ArgumentParser:
  hints = typing.get_type_hints(config_cls)
  defaults = config_cls()
  p = _Parser(description=description, formatter_class=_DefaultsFormatter)
  p.add_argument(
    "--workdir",
    required=True,
    help="output folder: checkpoints, config.json, metrics.jsonl, PNGs; "
    "running again with the same workdir resumes",
  )
  p.add_argument(
    f"--stop_after_{stop_unit}",
    dest="stop_after",
    type=int,
    default=None,
    metavar="N",
    help=f"leave after N training {stop_unit} in this invocation, with a checkpoint; "
    "run again with the same workdir to continue (not stored in config.json)",
  )
  p.add_argument(
    "--compilation_cache",
    default=None,
    metavar="DIR",
    help="persistent XLA compilation cache, so a restart (e.g. after preemption) does not "
    "compile again; 'none' disables it (default: $JAX_COMPILATION_CACHE_DIR if set, else "
    f"{default_compilation_cache()})",
  )
  p.add_argument(
    "--preset",
    choices=sorted(presets),
    default=None,
    help="a named set of defaults: "
    + "; ".join(f"{k}: {v.get('_doc', '')}" for k, v in presets.items()),
  )
  for f in dataclasses.fields(config_cls):
    helptext = f.metadata.get("help", "")
    value = getattr(defaults, f.name)
    if value is not None and "default" not in helptext:  # None: the help says what happens
      helptext += f" (default: {value!r})"
    p.add_argument(
      f"--{f.name}",
      type=_field_parser(hints[f.name]),
      default=None,
      metavar=hints[f.name].__name__ if isinstance(hints[f.name], type) else "VALUE",
      help=helptext,
    )
  distributed.add_flags(p)
  return p


def preset_config(config_cls, presets: dict, preset: Optional[str]):
  overrides = {k: v for k, v in presets.get(preset or "default", {}).items() if k != "_doc"}
  return dataclasses.replace(config_cls(), **overrides)


_LOCKS: dict = {}  # workdir -> open directory fd holding its flock, for the process's life


def _lock_holder(fd: int) -> Optional[int]:
  """The pid holding a flock on the file of `fd`, from /proc/locks (Linux), or None."""
  st = os.fstat(fd)
  try:
    with open("/proc/locks", encoding="ascii") as f:
      for line in f:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].split(":")[-1] == str(st.st_ino):
          return int(parts[4])
  except (OSError, ValueError):
    pass
  return None


def lock_workdir(workdir: str) -> None:
  """Takes an exclusive lock on `workdir` for the rest of this process (an
  flock on the folder itself: nothing is written, and the kernel releases it
  when the process dies). UsageError naming the holder's pid if another job
  has it. A cloud-storage workdir cannot be locked: one note on stderr."""
  workdir = files.absolute(workdir)
  if workdir in _LOCKS or not distributed.is_writer():  # process 0 holds the lock
    return
  if files.is_remote(workdir):
    print(
      f"note: {workdir} is on cloud storage, which has no locks: make sure no other job uses it",
      file=sys.stderr,
    )
    _LOCKS[workdir] = None
    return
  fd = os.open(workdir, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    pid = _lock_holder(fd)
    os.close(fd)
    who = f"pid {pid}" if pid is not None else "another process"
    raise UsageError(
      f"workdir {workdir} is in use by another job ({who}); wait for it to end, "
      "or use another workdir"
    ) from None
  _LOCKS[workdir] = fd


def unlock_workdir(workdir: str) -> None:
  fd = _LOCKS.pop(files.absolute(workdir), None)
  if fd is not None:
    os.close(fd)  # closing the descriptor releases the flock


def _check_writable(folder: str) -> None:
  """OSError unless a file can be written in the existing local `folder`;
  on object storage the first upload tells."""
  if files.is_remote(folder):
    return
  with tempfile.TemporaryFile(dir=folder) as f:
    f.write(b"ok\n")
    f.flush()
    os.fsync(f.fileno())


def prepare_output_dir(path: str) -> None:
  """Creates folder `path` and checks that files can be written there
  (OSError if not), so that a job fails before its work, not after it. In a
  multi-process run only process 0 writes outputs, so only it does this."""
  if not distributed.is_writer():
    return
  files.makedirs(path)
  _check_writable(path)


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir`, locks it for this process (see `lock_workdir`) and
  checks that files can be written there (OSError if not), before a job
  changes anything in it."""
  files.makedirs(workdir)
  lock_workdir(workdir)
  _check_writable(workdir)


def stored_fields(workdir: str) -> dict:
  """The parsed `workdir/config.json`; UsageError when missing or unreadable."""
  path = os.path.join(workdir, "config.json")
  if not files.exists(path):
    raise UsageError(f"{path} not found: {workdir} is not a workdir of a training job")
  try:
    stored = read_json(path)
  except (OSError, ValueError) as e:
    raise UsageError(f"{path} is unreadable ({e}); move it away or use a new workdir") from None
  if not isinstance(stored, dict):
    raise UsageError(f"{path} does not hold a JSON object")
  return stored


INT_RANGE = (-(2**31), 2**31 - 1)  # every integer flag (seeds, steps, sizes) fits in int32


def _type_ok(tp, value) -> bool:
  """Whether a JSON value fits a field annotation (str, int, float, bool, Optional)."""
  if typing.get_origin(tp) is typing.Union:
    return any(_type_ok(a, value) for a in typing.get_args(tp))
  if tp is type(None):
    return value is None
  if tp is bool:
    return isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if tp is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, tp)


def check_values(config) -> None:
  """UsageError for a float flag that is not finite or an integer flag
  outside int32, whatever the job (the jobs check their own ranges after)."""
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if isinstance(v, float) and not math.isfinite(v):
      raise UsageError(f"--{f.name} must be a finite number, got {v}")
    if isinstance(v, int) and not isinstance(v, bool) and not INT_RANGE[0] <= v <= INT_RANGE[1]:
      raise UsageError(
        f"--{f.name} {v} is out of range: integer flags lie in [{INT_RANGE[0]}, {INT_RANGE[1]}]"
      )


def load_config(config_cls, workdir: str) -> tuple:
  """(config, preset) stored in `workdir/config.json` for the job of `config_cls`.

  Every field must be present with a value of its type (fields named in the
  class's `ADDED_LATER` may be absent: runs from before them used their
  defaults); UsageError otherwise.
  """
  stored = stored_fields(workdir)
  path = os.path.join(workdir, "config.json")
  hints = typing.get_type_hints(config_cls)
  known = {f.name for f in dataclasses.fields(config_cls)}
  unknown = set(stored) - known - {"preset"}
  if unknown:
    raise UsageError(
      f"{path} has unknown fields {sorted(unknown)}; it was written by another job or version"
    )
  later = set(getattr(config_cls, "ADDED_LATER", ()))  # absent in older runs: defaults hold
  missing = sorted(known - set(stored) - later)
  if missing:
    raise UsageError(
      f"{path} lacks the fields {missing}; it was written by another version "
      "or edited by hand. Restore them, or use a new workdir"
    )
  known &= set(stored)
  for k in sorted(known):
    if not _type_ok(hints[k], stored[k]):
      raise UsageError(
        f"{path}: {k} = {stored[k]!r} is not of type "
        f"{getattr(hints[k], '__name__', hints[k])}; fix the file or use a new "
        "workdir"
      )
  preset = stored.get("preset")
  if preset is not None and not isinstance(preset, str):
    raise UsageError(f"{path}: preset = {preset!r} is not a string")
  config = dataclasses.replace(config_cls(), **{k: stored[k] for k in known})
  if any(hints[k] is float and isinstance(stored[k], int) for k in known):
    config = dataclasses.replace(
      config, **{k: float(stored[k]) for k in known if hints[k] is float and stored[k] is not None}
    )
  check_values(config)
  return config, preset


def default_compilation_cache() -> str:
  return os.path.join(user_cache.CACHE_DIR, "xla_cache")


def use_compilation_cache(directory: Optional[str]) -> Optional[str]:
  """Points JAX's persistent compilation cache at `directory` ("none": off;
  None: $JAX_COMPILATION_CACHE_DIR if set, else the default); returns it."""
  import jax

  if directory is None:
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_compilation_cache()
  if directory.lower() == "none":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return directory


REMOTE_SCHEMES = {"gs": "gcsfs", "s3": "s3fs"}  # URL scheme -> the fsspec package epath needs


def check_path(path: Optional[str], flag: str) -> None:
  """UsageError for a URL the jobs cannot use: a scheme other than gs:// and
  s3://, or one whose file-system package is not installed."""
  if path is None or not files.is_remote(path):
    return
  scheme = path.split("://", 1)[0]
  if scheme not in REMOTE_SCHEMES:
    raise UsageError(
      f"{flag} {path}: only local paths, gs:// and s3:// URLs are supported, not {scheme}://"
    )
  package = REMOTE_SCHEMES[scheme]
  try:
    __import__(package)
  except ImportError:
    raise UsageError(
      f"{flag} {path}: {scheme}:// paths need the {package} package "
      f"(pip install {package}), which is not installed"
    ) from None


class RunArgs(typing.NamedTuple):
  config: Any
  preset: str
  workdir: str
  stop_after: Optional[int]


def resolve_config(
  config_cls, presets: dict, argv=None, description: str = "", stop_unit: str = "steps"
) -> RunArgs:
  """Parses argv into RunArgs(config, preset, workdir, stop_after).

  New workdir: defaults <- preset <- explicit flags. Existing workdir with a
  config.json: stored config <- explicit flags; an explicit --preset that
  disagrees with the stored config is refused, naming the differing fields.
  """
  args = build_parser(config_cls, presets, description, stop_unit).parse_args(argv)
  distributed.initialize(args)
  check_path(args.workdir, "--workdir")
  workdir = files.absolute(args.workdir)
  if args.stop_after is not None and args.stop_after < 1:
    raise UsageError(f"--stop_after_{stop_unit} must be >= 1, got {args.stop_after}")
  explicit = {
    f.name: getattr(args, f.name)
    for f in dataclasses.fields(config_cls)
    if getattr(args, f.name) is not None
  }
  stored_path = os.path.join(workdir, "config.json")
  if files.exists(stored_path):
    base, stored_preset = load_config(config_cls, workdir)
    known = {f.name for f in dataclasses.fields(config_cls)}
    if args.preset is not None and args.preset != stored_preset:
      wanted = preset_config(config_cls, presets, args.preset)
      diff = [
        f"{k}: {getattr(base, k)!r} (stored) vs {getattr(wanted, k)!r}"
        for k in known
        if getattr(base, k) != getattr(wanted, k) and k not in explicit
      ]
      if diff:
        raise UsageError(
          f"workdir {workdir} holds a run with preset {stored_preset!r}; "
          f"--preset {args.preset} differs in "
          + "; ".join(sorted(diff))
          + ". Pass those fields explicitly to override, or use a new workdir"
        )
    changed = {k: (getattr(base, k), v) for k, v in explicit.items() if getattr(base, k) != v}
    for k, (old, new) in changed.items():
      print(f"note: overriding {k} = {old!r} from {stored_path} with {new!r}", file=sys.stderr)
    preset = stored_preset or args.preset
    config = dataclasses.replace(base, **explicit)
  else:
    preset = args.preset or "default"
    config = dataclasses.replace(preset_config(config_cls, presets, args.preset), **explicit)
  check_values(config)
  use_compilation_cache(args.compilation_cache)
  return RunArgs(config, preset, workdir, args.stop_after)


class MetricsLog:
  """Appends one JSON object per line to `path`; flushes each line.

  A valid record is a JSON object with an integer "step". Other lines (a
  torn last line after a crash, or garbage written by hand) are skipped and
  reported once on stderr, never trusted and never the reason a valid
  record is dropped.
  """

  def __init__(self, path: str, keep_up_to_step: Optional[int] = None):
    self.path = path
    self.writer = distributed.is_writer()  # multi-process: process 0 keeps the log
    # Object stores cannot append: there the whole log is rewritten each time.
    self.lines: Optional[list] = [] if files.is_remote(path) else None
    if not self.writer:
      return
    files.makedirs(os.path.dirname(files.absolute(path)))
    if keep_up_to_step is not None and files.exists(path):
      # Drop records a crashed run wrote after its last checkpoint.
      kept = [json.dumps(r) + "\n" for r in self.read(path) if r["step"] <= keep_up_to_step]
      self._rewrite(kept)
      if self.lines is not None:
        self.lines = kept
    elif keep_up_to_step is None and files.exists(path):
      files.remove(path)

  def _rewrite(self, lines: list) -> None:
    with atomic_path(self.path, ".jsonl.tmp") as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)

  def write(self, record: dict) -> None:
    if not self.writer:
      return
    line = json.dumps(record) + "\n"
    if self.lines is not None:
      self.lines.append(line)
      self._rewrite(self.lines)
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line)

  @staticmethod
  def read(path: str, required: tuple = (), quiet: bool = False) -> list:
    """The valid records of `path` in order (bad lines skipped and counted);
    `required` names fields that must also hold numbers."""
    out, bad = [], []
    if not files.exists(path):
      return out
    with files.open_file(path, errors="replace") as f:
      for number, line in enumerate(f, 1):
        line = line.strip()
        if not line:
          continue
        try:
          record = json.loads(line)
        except ValueError:
          record = None
        step = record.get("step") if isinstance(record, dict) else None
        ok = (
          isinstance(step, int)
          and not isinstance(step, bool)
          and all(
            isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)
            for k in required
          )
        )
        if ok:
          out.append(record)
        else:
          bad.append(number)
    if bad and not quiet:
      print(
        f"note: skipped {len(bad)} malformed line(s) of {path} (line {bad[0]}"
        f"{' and more' if len(bad) > 1 else ''}); the valid records are kept",
        file=sys.stderr,
      )
    return out


def silence_background_threads() -> None:
  """On an error exit: no log records or thread tracebacks from Orbax's and
  TensorStore's writer threads, which would bury the one-line message."""
  import logging
  import threading

  logging.disable(logging.CRITICAL)
  threading.excepthook = lambda args: None
  try:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.FATAL)
  except ImportError:
    pass


def run_main(fn, argv=None) -> int:
  """Runs fn(argv), turning the expected failures into one stderr line each.

  Exit 2: a UsageError (bad flags, config conflicts, unreadable checkpoints),
  DataError or WeightsError; a plain ValueError is a bug (exit 1). Exit 3: a
  FloatingPointError (divergence; the job has kept its last good checkpoint).
  Exit 4: an OSError (full or read-only disk, permissions); the workdir keeps
  its last complete checkpoint. Any
  other exception: one line naming it, exit 1; `--debug` anywhere in argv
  shows its traceback instead.
  """

  prog = _launch_name() or (os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "job")
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv  # any other exception: its traceback instead of one line
  argv = [a for a in argv if a != "--debug"]
  try:
    try:
      fn(argv)
    except BaseException as e:
      if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C must not break the clean-up
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
      silence_background_threads()
      raise
    finally:
      close_all_quietly()
  except (UsageError, DataError, WeightsError, FloatingPointError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return EXIT_DIVERGED if isinstance(e, FloatingPointError) else EXIT_USAGE
  except OSError as e:
    print(
      f"{prog}: error: cannot read or write files: {e}. Outputs written so far and the "
      "last complete checkpoint are kept; fix the disk and run again to resume",
      file=sys.stderr,
    )
    return EXIT_IO
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except Exception as e:
    if debug:
      raise
    if distributed.closed_by_a_peer(e):
      print(
        distributed.peer_lost_line(
          "another process closed its connection in a collective (it failed or was killed: "
          "see its own log)"
        ),
        file=sys.stderr,
      )
      return EXIT_PEER_LOST
    text = (str(e).strip().splitlines() or [""])[0][:300]
    print(
      f"{prog}: internal error: {type(e).__name__}: {text}. This is a bug, not a bad "
      "flag: run again with --debug for the traceback, and report it",
      file=sys.stderr,
    )
    return EXIT_INTERNAL
  return 0


def exit_main(fn) -> None:
  """A job's `__main__`: `runtime.split_cpu_devices()` (one JAX device per CPU
  core; the module restarted for huge pages before its imports), then
  `sys.exit(run_main(fn))`. In a multi-process run, a process that ends in
  order (exit 0, or 143 after a stop all processes agreed on) tells the
  others before it leaves (`distributed.announce_exit`); one that ends with an
  error leaves without JAX's shutdown barrier (`distributed.leave_after_error`)."""
  runtime.split_cpu_devices()  # one JAX device per core
  try:
    code = run_main(fn)
  except SystemExit as e:  # 143: the runner's agreed stop
    code = 0 if e.code is None else e.code
  if code in (0, EXIT_PREEMPTED):
    distributed.announce_exit()
  elif isinstance(code, int) and code:
    distributed.leave_after_error(code)  # multi-process only; returns with one process
  sys.exit(code)
