"""The per-user cache folder, and native libraries built into it at first use.

`CACHE_DIR` is `$XDG_CACHE_HOME/ddpm_jax` (else `~/.cache/ddpm_jax`): the
convolution tuning choice, XLA's compilation cache, and the shared libraries
that `build_library` compiles (the MKL product handler of `nnbase.blas`, the
allocation cache that `experiments.runtime` preloads).

This module imports neither JAX nor the rest of `nnbase`, so the jobs'
process set-up can use it before JAX is imported (`experiments/runtime.py`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

CACHE_DIR = os.path.join(
  os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
  "ddpm_jax",
)


def find_compiler(names: Sequence[Optional[str]]) -> Optional[str]:
  """The full path of the first of `names` on PATH (None entries skipped), or None."""
  for name in names:
    path = shutil.which(name) if name else None
    if path:
      return path
  return None


def build_library(
  source: str,
  build_dir: str,
  prefix: str,
  compilers: Sequence[Optional[str]],
  flags: Sequence[str] = (),
  libs: Sequence[str] = (),
  salt: bytes = b"",
) -> str:
  """Compiles `source` into `build_dir/{prefix}_{key}.so` once and returns its path.

  `key` is the sha256 of the source and `salt` (say, the headers' version), so
  an edited source builds anew and an unchanged one is never rebuilt. The
  library is written to a temporary file and renamed into place, so processes
  building at once each land a whole file and a failed build leaves nothing.
  The compiler is the first of `compilers` on PATH. Raises RuntimeError, in
  one line, when none is there or the build fails.
  """
  with open(source, "rb") as f:
    key = hashlib.sha256(f.read() + salt).hexdigest()[:16]
  target = os.path.join(build_dir, f"{prefix}_{key}.so")
  if os.path.exists(target):
    return target
  compiler = find_compiler(compilers)
  if compiler is None:
    tried = ", ".join(c for c in compilers if c)
    raise RuntimeError(f"no compiler on PATH to build {os.path.basename(source)} (tried {tried})")
  os.makedirs(build_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=build_dir)
  os.close(fd)
  cmd = [compiler, "-O2", "-shared", "-fPIC", *flags, source, "-o", tmp, *libs]
  try:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
      err = " ".join(r.stderr.split())[-500:]
      raise RuntimeError(f"{' '.join(cmd)} failed: {err}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target
