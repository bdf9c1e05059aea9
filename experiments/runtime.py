"""Process set-up for the jobs: transparent huge pages for XLA:CPU's buffers.

XLA:CPU takes each call's temporary buffer from malloc: one block of 108 MB
for the seed U-Net's forward pass on 64 images. glibc serves blocks above
32 MiB with a fresh mmap and unmaps them on free, so every call faults every
page in again. That is 26.5k minor faults per forward pass, about 10% of its
time on 2 cores.

The glibc tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc ask
for transparent huge pages, which cuts the faults 50x. Measured by
`python -m benchmarks.levers` (see the README).

Tunables are read only when a process starts. So `python -m experiments.X`
and `python -m benchmarks.X` restart themselves once, with the tunable set,
from their `__main__` blocks (`cli.exit_main`), before JAX runs anything;
importing the packages does nothing. Set DDPM_JAX_HUGEPAGES=0 to opt out. For your own
scripts, export the variable yourself:

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py

`python -m benchmarks.run` prints whether it is on (machine line, `hugepages`).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DDPM_JAX_HUGEPAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> Optional[tuple]:
  """(major, minor) of the running glibc, or None (not glibc, or unknown)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, OSError, ValueError, TypeError):
    return None


def thp_mode(path: str = THP_ENABLED) -> Optional[str]:
  """The kernel's selected transparent-huge-page mode ("always", "madvise",
  "never"), or None where the file is missing or unreadable."""
  try:
    with open(path, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return None
  for word in text.split():
    if word.startswith("[") and word.endswith("]"):
      return word[1:-1]
  return None


def hugepages_active(env: Mapping[str, str] = os.environ) -> bool:
  """Whether GLIBC_TUNABLES in `env` sets `TUNABLE`."""
  return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def hugepages_env(
  env: Mapping[str, str], glibc: Optional[tuple], thp: Optional[str]
) -> Optional[dict]:
  """`env` with `TUNABLE` added to GLIBC_TUNABLES (other tunables kept).

  Returns None when nothing should change: the tunable is already set; the
  user opted out (DDPM_JAX_HUGEPAGES=0); the C library is not glibc >= 2.35;
  or the kernel's transparent huge pages are off or absent.
  """
  if hugepages_active(env) or env.get(OPT_OUT, "1") == "0":
    return None
  if glibc is None or glibc < (2, 35) or thp not in ("always", "madvise"):
    return None
  out = dict(env)
  old = env.get("GLIBC_TUNABLES", "")
  out["GLIBC_TUNABLES"] = f"{old}:{TUNABLE}" if old else TUNABLE
  return out


def reexec_with_hugepages() -> None:
  """Restarts `python -m <module> ...` with `TUNABLE` set, where it helps.

  For a `python -m` launch's `__main__` block, before JAX has run anything
  (imports are fine: no backend is initialised at import). A no-op in any
  other process. The new process has the same PID, arguments and
  environment, plus the tunable. It does not restart
  again, because the tunable is then set. Errors leave this process running
  as it is.
  """
  orig = getattr(sys, "orig_argv", None)
  if not orig or "-m" not in orig[1:]:
    return
  env = hugepages_env(os.environ, glibc_version(), thp_mode())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)
  except OSError:
    pass
