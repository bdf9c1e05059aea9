"""Machine-dependent constants of the fast convolutions, chosen per machine.

`nnbase.conv` asks `chunk_bytes()`, `gemm_default()`, `strided_forward_xla()`
and `winograd_tile()` at import, `nnbase.blas` asks `blas_default()`, and
`ddpm_jax.parallel.jit_inference` compiles forward-only programs with
`inference_compiler_options()`. In order:
1. a choice measured on this machine by `python -m benchmarks.tune` and cached
   in `~/.cache/ddpm_jax/conv_tuning.json` (keyed by CPU model and cache sizes,
   so a copied home folder on another machine is ignored);
2. else a rule from the cache sizes Linux reports (`rule_chunk_bytes`: the
   per-core L2, within [1, 32] MiB); the GEMM path on; XLA's own convolution
   for the forward pass of strided layers (never slower than the plain XLA
   path); Winograd F(4x4, 3x3) for float32 3x3 layers; and MKL's GEMMs on
   Intel CPUs.
`DDPM_JAX_CONV_TUNING=off` ignores the cached file.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Optional

from nnbase import user_cache

MIB = 2**20
DEFAULT_CHUNK_BYTES = 7 * MIB  # when the caches cannot be read
CACHE_FILE = os.path.join(user_cache.CACHE_DIR, "conv_tuning.json")


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


def _cpuinfo(field: str) -> Optional[str]:
  """The first `field` of /proc/cpuinfo (None where there is none)."""
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith(field):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_model() -> str:
  return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_vendor() -> str:
  """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...), else ""."""
  return _cpuinfo("vendor_id") or ""


def machine_key() -> str:
  caches = cpu_caches()
  return cpu_model() + " | " + ", ".join(f"{k}={v}" for k, v in sorted(caches.items()))


# Above this size the last-level cache is a server socket's, shared by dozens
# of cores (a VM sees the whole of it), and a core's share is a few MiB.
SHARED_L3_BYTES = 64 * MIB


def _clamp(chunk: int) -> int:
  return int(min(max(chunk, MIB), 32 * MIB))


def _branches(caches: dict) -> tuple:
  """(the rule's chunk before clamping, the other branch's or None) for known
  caches: the per-core L2 and 7/32 of the L3; (None, None) when Linux
  reports neither usable (no L2, and no L3 or a socket-wide one)."""
  l2, l3 = caches.get("L2"), caches.get("L3")
  share = l3 * 7 // 32 if l3 else None
  if l2:
    return l2, share
  return (share, None) if share and l3 <= SHARED_L3_BYTES else (None, None)


def rule_chunk_bytes(caches: Optional[dict] = None) -> int:
  """The chunk size from the cache sizes, within [1, 32] MiB (7 MiB when unknown):
  the per-core L2, else 7/32 of an L3 of up to SHARED_L3_BYTES (one core
  complex's).

  Measured against 7/32 of the L3 (the earlier rule), interleaved:
  - a 2-core Intel Xeon VM (Emerald Rapids; L2 2 MiB, the socket's 260 MiB
    L3 reported whole, so 7/32 of it is 32 MiB): with 2 MiB the forward ran
    1.05-1.19x faster than with 4-32 MiB, and 32 MiB trained 0.90x as fast;
  - a 2-core AMD EPYC (Zen 4; L2 1 MiB, L3 32 MiB per core complex, so
    7/32 is 7 MiB): 1 MiB trained 1.02-1.07x and ran the forward
    1.01-1.08x as fast as 7 MiB, 2 MiB 1.07-1.08x and 1.02x (three sweeps
    of 3-10 rounds; docs/design.md).
  """
  chunk, _ = _branches(cpu_caches() if caches is None else caches)
  return DEFAULT_CHUNK_BYTES if chunk is None else _clamp(chunk)


def tuning_candidates(caches: Optional[dict] = None) -> list:
  """Chunk sizes `benchmarks.tune` measures, ascending: half, one and two times
  the rule's, and 7/32 of the L3 (up to 32 MiB), so a machine the rule
  misjudges still finds its size."""
  caches = cpu_caches() if caches is None else caches
  rule = rule_chunk_bytes(caches)
  _, other = _branches(caches)
  sizes = {rule // 2, rule, 2 * rule} | ({other} if other else set())
  return sorted({_clamp(s) for s in sizes})


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
  blas: Optional[bool] = None,
) -> str:
  record = {
    "machine": machine_key(),
    "chunk_bytes": int(chunk_bytes),
    "gemm": bool(gemm),
    "strided_forward_xla": bool(strided_forward_xla),
    "winograd_tile": int(winograd_tile),
    "blas": blas,
    "measurements": measurements,
  }
  os.makedirs(os.path.dirname(CACHE_FILE), exist_ok=True)
  tmp = CACHE_FILE + f".{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, CACHE_FILE)
  return CACHE_FILE


def _cached(key: str):
  """The tuned choice's `key` for this machine, or None (no choice, or a
  record from before that key existed)."""
  return (cached_choice() or {}).get(key)


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
  value = _cached("strided_forward_xla")
  return value if isinstance(value, bool) else True


def winograd_tile() -> int:
  """Winograd's output tile for float32 3x3 layers: 4 (F(4x4, 3x3)) unless
  tuning measured F(2x2, 3x3) faster on this machine. On a 2-core Zen 4 the
  seed U-Net's train step ran 1.07-1.21x faster with 4 (docs/design.md)."""
  value = _cached("winograd_tile")
  return value if value in (2, 4) else 4


def blas_default() -> bool:
  """Whether float32 products run on MKL (`nnbase.blas`) when it loads: as
  tuning measured on this machine, else on Intel CPUs only. On a 2-core Intel
  Xeon, against XLA's products, the seed U-Net's train step ran 1.17-1.31x
  and its forward 1.13-1.14x as fast on MKL, the MNIST VAE epoch 1.04-1.07x
  (docs/design.md). On a 2-core AMD EPYC (Zen 4) MKL was the slower:
  train step 0.944x, forward 0.964x, VAE epoch 0.937x (`benchmarks.tune
  --dry_run`, 4 interleaved rounds) and the VAE epoch 0.940x in 12 more."""
  value = _cached("blas")
  return value if isinstance(value, bool) else cpu_vendor() == "GenuineIntel"


# XLA:CPU's YNNPACK library fusions (its dots, convolutions and elementwise
# fusions), as the compile option that turns them off.
_NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


def inference_compiler_options(backend: Optional[str] = None) -> Optional[dict]:
  """XLA compile options for forward-only programs (sampling, a U-Net forward
  pass): on the CPU backend, without YNNPACK's fusions, whose work is split
  over the thread pool that the devices of a one-device-per-core mesh share.
  On a 2-core Intel Xeon, against the default, the seed U-Net's forward on 64
  images ran 1.07-1.08x and a 20-step DDIM sampler 1.05x as fast (medians of
  6-30 interleaved rounds); its train step ran 0.93-0.96x as fast, so
  training keeps the default (docs/design.md). `DDPM_JAX_INFERENCE_YNN=on`
  keeps YNNPACK. None elsewhere (no options)."""
  if backend is None:
    import jax  # imported here: the rest of this module needs only the standard library

    backend = jax.default_backend()
  if backend != "cpu" or os.environ.get("DDPM_JAX_INFERENCE_YNN", "").lower() == "on":
    return None
  return dict(_NO_YNNPACK)
