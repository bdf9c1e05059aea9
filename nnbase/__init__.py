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
"""

from nnbase import blas, conv, param_files, pixels, tuning
from nnbase.conv import Conv, ConvTranspose2x, conv_gemm, conv_transpose_2x
from nnbase.param_files import WeightsError

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
]
