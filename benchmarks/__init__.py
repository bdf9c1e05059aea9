"""Speed benchmarks (`python -m benchmarks.run`); importing does nothing else."""

from __future__ import annotations

import argparse
import os
from typing import Optional


def check_json_path(p: argparse.ArgumentParser, path: Optional[str]) -> None:
  """p.error (one line, exit 2) unless --json `path` can be written, so that a
  run of minutes does not end in a traceback at its last line."""
  if path is None:
    return
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    p.error(f"--json {path} is a folder; give a file name")
  if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
    p.error(f"--json {path}: the folder {folder} does not exist or is not writable")


def prog(spec) -> Optional[str]:
  """argparse's prog for a module launched as `python -m benchmarks.X` (its
  `__spec__`); None (argparse names the file) for any other launch."""
  return f"python -m {spec.name}" if spec is not None else None
