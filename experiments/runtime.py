"""Process set-up for the jobs: huge pages for XLA:CPU's buffers, and the
CPU split into one JAX device per core (`restart_main` as an entry point's
first statement, `split_cpu_devices` in its `__main__` block).

XLA:CPU takes each call's temporary buffer from malloc: one block of 108 MB
for the seed U-Net's forward pass on 64 images. glibc serves blocks above
32 MiB with a fresh mmap and unmaps them on free, so every call faults every
page in again. That is 26.5k minor faults per forward pass, about 10% of its
time on 2 cores.

The glibc tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc ask
for transparent huge pages, which cuts the faults 50x. Measured by
`python -m benchmarks.levers` (see the README).

Tunables are read only when a process starts. So `python -m experiments.X`
and `python -m benchmarks.X` restart themselves once, with the tunable set:
each entry point's first statement is `runtime.restart_main(__name__)`, which
restarts a `python -m` launch before the module imports JAX and the libraries
(a later restart would import them twice: 2.5-3 s more per launch). Importing
the packages or the modules does nothing. Set DDPM_JAX_HUGEPAGES=0 to opt out. For your own
scripts, export the variable yourself:

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py

`python -m benchmarks.run` prints whether it is on (machine line, `hugepages`).

The restart also preloads `alloc_cache.c` (LD_PRELOAD; compiled once with the
C compiler into ~/.cache/ddpm_jax/alloc/), which keeps malloc blocks of 32 MiB
and more mapped after free() and serves the next request of that size from
them. Even as huge pages, XLA:CPU's temporary buffer of each call (284 MB per
device for the seed U-Net's train step at batch 128) was mapped afresh and
zeroed by the kernel on every call: 91-304 ms of system time per train step on
2 cores. Set DDPM_JAX_ALLOC_CACHE=0 to opt out, DDPM_JAX_ALLOC_CACHE_MB to
bound the freed memory it keeps (default 2048). Measured in docs/design.md.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

from nnbase import user_cache  # imports no JAX: the restart comes before it

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


ALLOC_CACHE_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "alloc_cache.c")
ALLOC_CACHE_OPT_OUT = "DDPM_JAX_ALLOC_CACHE"
ALLOC_CACHE_DIR = os.path.join(user_cache.CACHE_DIR, "alloc")


def alloc_cache_library(build_dir: str = ALLOC_CACHE_DIR) -> Optional[str]:
  """The compiled `alloc_cache.c` (built once per source with $CC, cc or gcc,
  ~0.1 s), or None where it cannot be used: not glibc, no C compiler, or the
  build failed."""
  if glibc_version() is None:
    return None
  compilers = (os.environ.get("CC"), "cc", "gcc")
  try:
    return user_cache.build_library(
      ALLOC_CACHE_SOURCE, build_dir, "alloc_cache", compilers, libs=["-lpthread", "-ldl"]
    )
  except (OSError, RuntimeError):
    return None


def alloc_cache_active(env: Mapping[str, str] = os.environ) -> bool:
  """Whether LD_PRELOAD in `env` holds an `alloc_cache` library."""
  return any(
    os.path.basename(p).startswith("alloc_cache_")
    for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":")
  )


def _alloc_cache_wanted(env: Mapping[str, str]) -> bool:
  """Neither preloaded already nor opted out of (DDPM_JAX_ALLOC_CACHE=0)."""
  return not alloc_cache_active(env) and env.get(ALLOC_CACHE_OPT_OUT, "1") != "0"


def alloc_cache_env(env: Mapping[str, str], library: Optional[str]) -> Optional[dict]:
  """`env` with `library` added to LD_PRELOAD (other preloads kept), or None
  when nothing should change: one is preloaded already, the user opted out
  (DDPM_JAX_ALLOC_CACHE=0), or there is no library."""
  if library is None or not _alloc_cache_wanted(env):
    return None
  out = dict(env)
  old = env.get("LD_PRELOAD", "")
  out["LD_PRELOAD"] = f"{old}:{library}" if old else library
  return out


def restart_env(env: Mapping[str, str]) -> Optional[dict]:
  """The environment a job restarts with (huge pages, the allocation cache),
  or None where it needs no restart."""
  out = hugepages_env(env, glibc_version(), thp_mode())
  lib = alloc_cache_library() if _alloc_cache_wanted(env) else None  # no build when unwanted
  more = alloc_cache_env(out if out is not None else env, lib)
  return more if more is not None else out


def reexec_with_hugepages() -> None:
  """Restarts `python -m <module> ...` with `TUNABLE` set and the allocation
  cache preloaded, where they help (`restart_env`).

  For a `python -m` launch's `__main__` block, before JAX has run anything
  (imports are fine: no backend is initialised at import). A no-op in any
  other process. The new process has the same PID, arguments and
  environment, plus the tunable and LD_PRELOAD. It does not restart
  again, because both are then set. Errors leave this process running
  as it is.
  """
  orig = getattr(sys, "orig_argv", None)
  if not orig or "-m" not in orig[1:]:
    return
  env = restart_env(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)
  except OSError:
    pass


CPU_DEVICES = "JAX_NUM_CPU_DEVICES"
MAX_CPU_DEVICES = 8
# The CPU device count split_cpu_devices set in this process (None: it set none).
AUTO_CPU_DEVICES: Optional[int] = None


def cpu_device_count(cores: int) -> int:
  """JAX CPU devices for `cores` cores: the largest power of two <= min(cores,
  MAX_CPU_DEVICES), so that the usual batch sizes divide over them."""
  n = 1
  while n * 2 <= min(cores, MAX_CPU_DEVICES):
    n *= 2
  return n


def split_cpu_devices(env: Mapping[str, str] = os.environ) -> Optional[int]:
  """Makes the CPU backend one JAX device per core (up to a power of two);
  returns the count set, or None where the user chose (JAX_NUM_CPU_DEVICES,
  or a device count in XLA_FLAGS) or there is one core.

  XLA:CPU runs each elementwise fusion on one thread, so a single device
  leaves a core idle during the convolutions' transforms. With a device per
  core, the jobs' data parallelism (ddpm_jax.parallel) splits each batch and
  both cores work (seed U-Net on 2 cores: forward 1.14-1.43x, train step
  1.00-1.25x, `python -m benchmarks.cpu_devices`). Must run before JAX
  initialises a backend; JAX_NUM_CPU_DEVICES=1 opts out. GPUs and TPUs are not affected.
  """
  if CPU_DEVICES in env or "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", ""):
    return None
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    cores = os.cpu_count() or 1
  n = cpu_device_count(cores)
  if n < 2:
    return None
  import jax

  global AUTO_CPU_DEVICES
  jax.config.update("jax_num_cpu_devices", n)
  AUTO_CPU_DEVICES = n
  return n


def batch_devices(batch_size: int) -> list:
  """The devices a job splits a batch of `batch_size` over: every device, except
  where `split_cpu_devices` made them in this (single) process and the batch
  does not divide over all of them: then the most that divide it (batch 75 on
  2 CPU devices runs on one, where a chosen device count would refuse it)."""
  import jax

  devices = jax.devices()
  if AUTO_CPU_DEVICES is None or jax.process_count() > 1 or devices[0].platform != "cpu":
    return devices
  n = len(devices)
  while batch_size % n:
    n -= 1
  return devices[:n]


def restart_main(module_name: str) -> None:
  """`reexec_with_hugepages` where `module_name` (the caller's `__name__`) is
  "__main__". An entry point calls it before its other imports, so that a
  restarted `python -m` launch loads JAX and the libraries once, not twice."""
  if module_name == "__main__":
    reexec_with_hugepages()
