"""The base layer that the library packages share (it imports none of them).

* `nnbase.blas`: float32 matrix products on Intel MKL inside XLA:CPU
  programs (an XLA FFI custom call), else XLA's own.
* `nnbase.conv`: fast CPU convolutions for Flax (`Conv`, `ConvTranspose2x`):
  chunked GEMMs and Winograd F(2x2, 3x3), the same maths as `lax.conv`.
* `nnbase.pixels`: pixel scaling, uint8 <-> [0, 1] <-> [-1, 1].
* `nnbase.tuning`: the convolutions' machine-dependent constants (measured
  by `python -m benchmarks.tune`, else derived from the CPU's cache sizes).
* `nnbase.param_files`: parameter files (npz) whose contents' sha256 is
  checked on every load.
* `nnbase.user_cache`: the per-user cache folder, and C/C++ sources built
  into shared libraries there once.

The submodules load on first use (`nnbase.conv`, `from nnbase import Conv`),
so `nnbase.user_cache` imports no JAX: the jobs' process set-up uses it
before JAX starts (`experiments/runtime.py`).
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from nnbase import blas, conv, param_files, pixels, tuning, user_cache
  from nnbase.conv import Conv, ConvTranspose2x, conv_gemm, conv_transpose_2x
  from nnbase.param_files import WeightsError

_SUBMODULES = ("blas", "conv", "param_files", "pixels", "tuning", "user_cache")
_NAMES = {
  "Conv": "conv",
  "ConvTranspose2x": "conv",
  "conv_gemm": "conv",
  "conv_transpose_2x": "conv",
  "WeightsError": "param_files",
}

__all__ = [
  "Conv",
  "ConvTranspose2x",
  "WeightsError",
  "blas",
  "conv",
  "conv_gemm",
  "conv_transpose_2x",
  "param_files",
  "pixels",
  "tuning",
  "user_cache",
]


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"nnbase.{name}")
  if name in _NAMES:
    return getattr(importlib.import_module(f"nnbase.{_NAMES[name]}"), name)
  raise AttributeError(f"module 'nnbase' has no attribute {name!r}")


def __dir__():
  return __all__
