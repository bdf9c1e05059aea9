"""Float32 matrix products through Intel MKL inside XLA:CPU programs.

XLA:CPU's GEMMs (YNNPACK, Eigen) run the library's shapes 1.1-1.45x slower
than MKL on an Intel Xeon (docs/design.md, "The VAE epoch"). `dot` computes
op(a) @ op(b) through an XLA FFI custom call (`blas_gemm.cc`) that cuts the
product into parts over XLA's intra-op threads, each part one sequential MKL
`cblas_sgemm`. It is `lax.dot_general` instead (the same product to float32
rounding) wherever a piece is missing: not float32, not the CPU backend, no
MKL (`pip install mkl`, the `mkl` extra), no C++ compiler, or turned off.

The handler is compiled at first use (~3 s) with the C++ compiler against
`jax.ffi.include_dir()` into `~/.cache/ddpm_jax/blas/`, keyed by the source
and jaxlib version, and loaded with MKL's `libmkl_rt` from the environment's
`lib/` (or `DDPM_JAX_BLAS_LIB`). Whether it is on: `DDPM_JAX_BLAS=on|off`,
else the choice `python -m benchmarks.tune` measured on this machine
(`nnbase.tuning.blas_default`), else on for Intel CPUs only (on a 2-core
AMD EPYC, Zen 4, MKL's products ran the library's steps 0.94-0.96x as fast
as XLA's). `enabled()` says; `status()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nnbase import tuning, user_cache

TARGET = "nnbase_sgemm"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blas_gemm.cc")
BUILD_DIR = os.path.join(user_cache.CACHE_DIR, "blas")
# A part of a product is one cblas_sgemm call; below this many flops a
# product is not cut (a 128 x 400 x 40 head stays whole).
MIN_PART_FLOPS = 4_000_000
_MKL_SEQUENTIAL = 1  # MKL_THREADING_SEQUENTIAL in mkl_service.h

_log = logging.getLogger(__name__)
_override: list = []  # `forced` stack


def mkl_library() -> Optional[str]:
  """The path of MKL's single dynamic library (libmkl_rt), or None."""
  path = os.environ.get("DDPM_JAX_BLAS_LIB")
  if path:
    return path if os.path.exists(path) else None
  for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
    found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    if found:
      return found[-1]
  return None


def _build() -> str:
  """Compiles blas_gemm.cc once per source and jaxlib version; returns the .so path."""
  import jaxlib

  flags = ["-std=c++17", "-w", "-I", jax.ffi.include_dir()]
  compilers = (os.environ.get("CXX"), "c++", "g++", "clang++")
  return user_cache.build_library(
    SOURCE, BUILD_DIR, "nnbase_blas", compilers, flags, ["-ldl"], salt=jaxlib.__version__.encode()
  )


@functools.lru_cache(maxsize=1)
def _load() -> tuple:
  """(True, description) once the handler is registered, else (False, reason)."""
  mkl = mkl_library()
  if mkl is None:
    return False, "no MKL (pip install mkl, or set DDPM_JAX_BLAS_LIB)"
  try:
    lib = ctypes.CDLL(_build())
  except (OSError, RuntimeError) as e:
    _log.warning("nnbase.blas: XLA's own products (the FFI handler did not build: %s)", e)
    return False, f"the FFI handler did not build: {e}"
  rc = lib.nnbase_blas_load(mkl.encode(), b"cblas_sgemm", _MKL_SEQUENTIAL)
  if rc != 0:
    _log.warning("nnbase.blas: XLA's own products (%s did not load, code %d)", mkl, rc)
    return False, f"{mkl} did not load (code {rc})"
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NnbaseSgemm), platform="cpu")
  return True, f"MKL ({mkl})"


@functools.lru_cache(maxsize=1)
def _tuned_default() -> bool:
  """tuning.blas_default(), read once per process (it reads the tuning cache
  file and /proc/cpuinfo), as nnbase.conv reads its tuning at import."""
  return tuning.blas_default()


def _wanted() -> bool:
  env = os.environ.get("DDPM_JAX_BLAS", "").lower()
  if env in ("on", "off"):
    return env == "on"
  return _tuned_default()


def status() -> str:
  """One line: whether `dot` uses the BLAS and why."""
  if _override:
    return f"{'on' if _override[-1] else 'off'} (forced)"
  if not _wanted():
    return "off (DDPM_JAX_BLAS, the tuning cache, or a non-Intel CPU)"
  ok, why = _load()
  return f"on: {why}" if ok else f"off: {why}"


def enabled() -> bool:
  """Whether `dot` traced now runs on the BLAS (for the CPU backend)."""
  wanted = _override[-1] if _override else _wanted()
  return wanted and _load()[0]


class forced:
  """`with blas.forced(False): ...` traces `dot` as `lax.dot_general` (True:
  the BLAS where it loads), whatever the environment says; for benchmarks."""

  def __init__(self, on: bool):
    self.on = bool(on)

  def __enter__(self):
    _override.append(self.on)

  def __exit__(self, *exc):
    _override.pop()


def _dims(trans_a: bool, trans_b: bool, batched: bool):
  o = 1 if batched else 0
  contract = ((o if trans_a else o + 1,), (o + 1 if trans_b else o,))
  return (contract, ((0,), (0,)) if batched else ((), ()))


def _xla(a, b, trans_a, trans_b, preferred=None):
  return lax.dot_general(
    a, b, _dims(trans_a, trans_b, a.ndim == 3), preferred_element_type=preferred
  )


def _varying(x) -> frozenset:
  """The shard_map mesh axes x varies over (empty outside shard_map)."""
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)  # jax 0.10; `vma` before
  return frozenset(mat.varying if mat is not None else getattr(t, "vma", ()))


def _ffi(a, b, trans_a, trans_b):
  m = a.shape[-1] if trans_a else a.shape[-2]
  n = b.shape[-2] if trans_b else b.shape[-1]
  a3, b3 = (a, b) if a.ndim == 3 else (a[None], b[None])
  out = jax.ShapeDtypeStruct((a3.shape[0], m, n), jnp.float32)
  # Under vmap the handler gets the vmapped axes in front, size 1 where an
  # operand is not mapped, and broadcasts those.
  call = jax.ffi.ffi_call(TARGET, out, vmap_method="expand_dims")
  c = call(a3, b3, trans_a=trans_a, trans_b=trans_b, min_part_flops=np.int64(MIN_PART_FLOPS))
  # Inside shard_map the result varies over the mesh axes its operands vary
  # over; the custom call's result type does not say so by itself.
  vma = tuple(sorted(_varying(a) | _varying(b)))
  if vma:
    c = lax.pcast(c, vma, to="varying")
  return c if a.ndim == 3 else c[0]


def _meshed() -> bool:
  """Inside a trace whose context mesh has automatic axes: XLA's partitioner
  would gather a custom call's operands onto every device, so XLA's own
  product is kept there (inside `shard_map` the operands are local)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and any(
    n > 1 and ax not in mesh.manual_axes for ax, n in mesh.shape.items()
  )


def _use_blas(a, b, preferred) -> bool:
  return (
    jax.default_backend() == "cpu"
    and a.dtype == b.dtype == jnp.float32
    and preferred in (None, jnp.float32)
    and max(a.shape + b.shape, default=0) < 2**31
    and not _meshed()
    and enabled()
  )


def dot(
  a: jax.Array,
  b: jax.Array,
  trans_a: bool = False,
  trans_b: bool = False,
  preferred_element_type=None,
) -> jax.Array:
  """op(a) @ op(b), op transposing the last two axes where asked.

  Args:
    a: [M, K] ([K, M] with trans_a), or [G, M, K] for G products at once.
    b: [K, N] ([N, K] with trans_b), or [G, K, N].
    preferred_element_type: as `lax.dot_general`'s (float32 sums of
      bfloat16 operands); the BLAS path is float32 in and out.

  Returns:
    [M, N] or [G, M, N]. Without the BLAS this is `lax.dot_general` itself.
  """
  if _use_blas(a, b, preferred_element_type):
    return _blas_dot(a, b, trans_a, trans_b)
  return _xla(a, b, trans_a, trans_b, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _blas_dot(a, b, trans_a, trans_b):
  return lax.platform_dependent(
    a,
    b,
    cpu=lambda a, b: _ffi(a, b, trans_a, trans_b),
    default=lambda a, b: _xla(a, b, trans_a, trans_b),
  )


def _blas_dot_fwd(a, b, trans_a, trans_b):
  return _blas_dot(a, b, trans_a, trans_b), (a, b)


def _blas_dot_bwd(trans_a, trans_b, res, g):
  a, b = res
  # C = op(a) op(b): dop(a) = G op(b)^T, dop(b) = op(a)^T G, each product
  # written so that no operand is transposed in memory. XLA drops the one
  # that is not needed (the input gradient of a network's first layer).
  da = dot(b, g, trans_b, True) if trans_a else dot(g, b, False, not trans_b)
  db = dot(g, a, True, trans_a) if trans_b else dot(a, g, not trans_a, False)
  return da, db


_blas_dot.defvjp(_blas_dot_fwd, _blas_dot_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """A `dot_general` for `flax.linen.Dense(dot_general=...)`: [..., K] @ [K, N]
  through `dot`, anything else through `lax.dot_general`."""
  (lc, rc), (lb, rb) = dimension_numbers
  if (
    rhs.ndim == 2
    and tuple(lc) == (lhs.ndim - 1,)
    and tuple(rc) == (0,)
    and not lb
    and not rb
    and precision is None
    and preferred_element_type in (None, lhs.dtype)
  ):
    y = dot(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return y.reshape(lhs.shape[:-1] + rhs.shape[1:])
  return lax.dot_general(
    lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
  )
