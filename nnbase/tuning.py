"""Machine-dependent constants of the fast convolutions, chosen per machine.

`nnbase.conv` asks `chunk_bytes()`, `gemm_default()`, `strided_forward_xla()`
and `winograd_tile()` at import. In order:
1. a choice measured on this machine by `python -m benchmarks.tune` and cached
   in `~/.cache/ddpm_jax/conv_tuning.json` (keyed by CPU model and cache sizes,
   so a copied home folder on another machine is ignored);
2. else a rule from the cache sizes Linux reports: a chunk of 7/32 of the
   last-level cache (7 MiB on a 32 MiB L3, the best measured there), within
   [1, 32] MiB; the GEMM path on; XLA's own convolution for the forward
   pass of strided layers (never slower than the plain XLA path); and
   Winograd F(4x4, 3x3) for float32 3x3 layers.
`DDPM_JAX_CONV_TUNING=off` ignores the cached file.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Optional

MIB = 2**20
DEFAULT_CHUNK_BYTES = 7 * MIB  # when the caches cannot be read
CACHE_FILE = os.path.join(
  os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
  "ddpm_jax",
  "conv_tuning.json",
)


def cpu_caches() -> dict:
  """{"L1d": bytes, "L2": bytes, "L3": bytes} of CPU 0 as Linux reports them ({} elsewhere)."""
  out = {}
  base = "/sys/devices/system/cpu/cpu0/cache"
  for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
    try:
      level, kind, size = (
        open(os.path.join(base, d, f)).read().strip() for f in ("level", "type", "size")
      )
      mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
      nbytes = int(size.rstrip("KMG")) * mult
    except (OSError, ValueError):
      continue
    if kind != "Instruction":
      out[f"L{level}" + ("d" if kind == "Data" else "")] = nbytes
  return out


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_key() -> str:
  caches = cpu_caches()
  return cpu_model() + " | " + ", ".join(f"{k}={v}" for k, v in sorted(caches.items()))


def rule_chunk_bytes(caches: Optional[dict] = None) -> int:
  """7/32 of the last-level cache, within [1, 32] MiB (7 MiB when unknown)."""
  caches = cpu_caches() if caches is None else caches
  last = max((v for k, v in caches.items() if k != "L1d"), default=0)
  if not last:
    return DEFAULT_CHUNK_BYTES
  return int(min(max(last * 7 // 32, MIB), 32 * MIB))


def cached_choice() -> Optional[dict]:
  """The tuned choice for this machine, or None (no file, another machine, or off)."""
  if os.environ.get("DDPM_JAX_CONV_TUNING", "").lower() == "off":
    return None
  try:
    with open(CACHE_FILE, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(record, dict) or record.get("machine") != machine_key():
    return None
  ok = isinstance(record.get("chunk_bytes"), int) and isinstance(record.get("gemm"), bool)
  return record if ok and record["chunk_bytes"] >= 64 * 1024 else None


def save_choice(
  chunk_bytes: int,
  gemm: bool,
  measurements: dict,
  strided_forward_xla: bool = True,
  winograd_tile: int = 4,
) -> str:
  record = {
    "machine": machine_key(),
    "chunk_bytes": int(chunk_bytes),
    "gemm": bool(gemm),
    "strided_forward_xla": bool(strided_forward_xla),
    "winograd_tile": int(winograd_tile),
    "measurements": measurements,
  }
  os.makedirs(os.path.dirname(CACHE_FILE), exist_ok=True)
  tmp = CACHE_FILE + f".{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, CACHE_FILE)
  return CACHE_FILE


def chunk_bytes() -> int:
  choice = cached_choice()
  return choice["chunk_bytes"] if choice else rule_chunk_bytes()


def gemm_default() -> bool:
  """Whether gemm_conv=None picks the GEMM path on CPU (False when tuning found it slower)."""
  choice = cached_choice()
  return choice["gemm"] if choice else True


def strided_forward_xla() -> bool:
  """Whether the GEMM path's strided convolutions run their forward pass
  through XLA's convolution (their gradients stay GEMMs). True unless tuning
  measured the GEMM forward faster: on a 2-core Zen 4 XLA's stride-2 forward
  ran 1.8x faster than im2col + GEMM at 28x28x64 -> 128, level at 14x14x128
  -> 256 (docs/design.md)."""
  choice = cached_choice()
  value = choice.get("strided_forward_xla") if choice else None
  return value if isinstance(value, bool) else True


def winograd_tile() -> int:
  """Winograd's output tile for float32 3x3 layers: 4 (F(4x4, 3x3)) unless
  tuning measured F(2x2, 3x3) faster on this machine. On a 2-core Zen 4 the
  seed U-Net's train step ran 1.07-1.21x faster with 4 (docs/design.md)."""
  choice = cached_choice()
  value = choice.get("winograd_tile") if choice else None
  return value if value in (2, 4) else 4
