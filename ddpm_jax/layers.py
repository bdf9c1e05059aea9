"""Building blocks shared by the networks: fast convolutions and the time embedding.

`Conv` computes the same function as `flax.linen.Conv` (same parameter names
and shapes) through `conv_gemm`: the forward pass, the input gradient and the
weight gradient are each a `lax.scan` of GEMMs over cache-sized batch chunks
of image patches. On XLA:CPU this is 1.2-2.5x faster than XLA's own
convolutions for the seed U-Net's layers (measured in `benchmarks/`).
`ConvTranspose2x` is the 4x4/stride-2 transposed convolution as four phase
convolutions built on the same primitive.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_DN = ("NHWC", "HWIO", "NHWC")


def _same_pads(kh, kw):
  return ((kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2))


def _conv(x, w, pads=None, strides=(1, 1)):
  pads = _same_pads(*w.shape[:2]) if pads is None else pads
  return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN)


def _patches(x, kh, kw, pads, strides=(1, 1)):
  """[B, H', W', C] -> [B, H, W, kh*kw*C] with the (i, j, c) order of an HWIO kernel."""
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  sh, sw = strides
  H = (xp.shape[1] - kh) // sh + 1
  W = (xp.shape[2] - kw) // sw + 1
  return jnp.concatenate([xp[:, i:i + sh * (H - 1) + 1:sh, j:j + sw * (W - 1) + 1:sw, :]
                          for i in range(kh) for j in range(kw)], axis=-1)


# Bytes of one chunk's patch matrix (rows x kh*kw*Cin floats). Every GEMM
# convolution below runs as a `lax.scan` over batch chunks of about this size,
# so a chunk's patches stay in cache between their construction and the GEMM:
# on 2 AVX2 cores this takes the 28x28 convolutions from 50-80 to 110-160
# GFLOP/s (benchmarks/levers.py and the README's speed section).
CHUNK_BYTES = 7 * 2**20


def _chunk_images(batch: int, rows_per_image: int, row_bytes: int = 4 * 1152) -> int:
  """The largest divisor of `batch` whose chunk holds <= CHUNK_BYTES of patches (>= 1)."""
  per = max(1, min(batch, CHUNK_BYTES // max(rows_per_image * row_bytes, 1)))
  while batch % per:
    per -= 1
  return per


def _out_size(n, k, pad, stride):
  return (n + pad[0] + pad[1] - k) // stride + 1


def _chunked(fn, batch_args, out_rows_per_image, row_bytes, init=None):
  """Applies `fn` to batch chunks of `batch_args` in a scan.

  With init=None the per-chunk outputs are concatenated along the batch;
  otherwise they are summed into `init`.
  """
  batch = batch_args[0].shape[0]
  per = _chunk_images(batch, out_rows_per_image, row_bytes)
  if per == batch:
    return fn(*batch_args) if init is None else init + fn(*batch_args)
  n = batch // per
  split = [a.reshape((n, per) + a.shape[1:]) for a in batch_args]
  if init is None:
    _, ys = jax.lax.scan(lambda c, a: (None, fn(*a)), None, split)
    return ys.reshape((batch,) + ys.shape[2:])
  acc, _ = jax.lax.scan(lambda c, a: (c + fn(*a), None), init, split)
  return acc


def _conv_gemm(x, w, pads, strides=(1, 1)):
  """`_conv(x, w, pads, strides)` as chunked (patches @ kernel) GEMMs."""
  kh, kw, cin, cout = w.shape
  H = _out_size(x.shape[1], kh, pads[0], strides[0])
  W = _out_size(x.shape[2], kw, pads[1], strides[1])
  wm = w.reshape(kh * kw * cin, cout)

  def one(xc):
    cols = _patches(xc, kh, kw, pads, strides).reshape(-1, kh * kw * cin)
    return jnp.dot(cols, wm).reshape(xc.shape[0], H, W, cout)

  return _chunked(one, (x,), H * W, kh * kw * cin * x.dtype.itemsize)


def _wgrad(x, g, kh, kw, pads, strides=(1, 1)):
  """sum over images and pixels of patches(x)^T g: [kh*kw*Cin, Cout], float32.

  Each chunk computes g^T @ patches ([Cout, K]), which XLA:CPU runs 1.3-2x
  faster than patches^T @ g; one transpose of the small result at the end.
  """
  cin, cout = x.shape[-1], g.shape[-1]
  k = kh * kw * cin

  def one(xc, gc):
    if kh == kw == 1 and pads == ((0, 0), (0, 0)) and tuple(strides) == (1, 1):
      cols = xc.reshape(-1, cin)
    else:
      cols = _patches(xc, kh, kw, pads, strides).reshape(-1, k)
    return jnp.dot(gc.reshape(-1, cout).T, cols, preferred_element_type=jnp.float32)

  acc = _chunked(one, (x, g), g.shape[1] * g.shape[2], k * x.dtype.itemsize,
                 init=jnp.zeros((cout, k), jnp.float32))
  return acc.T


def _flip_transpose(w):
  """The kernel of the input gradient: spatially flipped, Cin and Cout swapped."""
  return jnp.flip(w, (0, 1)).swapaxes(2, 3)


def _dx_stride1(g, w, pads):
  kh, kw = w.shape[:2]
  dpads = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
           (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
  return _conv_gemm(g, _flip_transpose(w), dpads)


# Input gradient of a 3x3, stride-2, pad-1 convolution, split by the parity of
# the input pixel: even pixels 2q see tap 1 of output q; odd pixels 2q+1 see
# tap 2 of output q and tap 0 of output q+1. Per parity: (taps, pads) of a
# stride-1 correlation over g.
_S2_PHASES = (((1,), (0, 0)), ((2, 0), (0, 1)))


def _dx_stride2(g, w):
  """dx of `_conv(x, w, ((1, 1), (1, 1)), (2, 2))` for even H, W: four phase GEMM convs."""
  rows = []
  for taps_a, pad_a in _S2_PHASES:
    cols = []
    for taps_b, pad_b in _S2_PHASES:
      wk = w[jnp.array(taps_a)][:, jnp.array(taps_b)].swapaxes(2, 3)
      cols.append(_conv_gemm(g, wk, (pad_a, pad_b)))
    rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2(b), C]
  y = jnp.stack(rows, axis=2)  # [B, H, 2(a), W, 2(b), C]
  B, H, _, W, _, C = y.shape
  return y.reshape(B, 2 * H, 2 * W, C)


def _dx(x_shape, w, pads, strides, g):
  if tuple(strides) == (1, 1):
    return _dx_stride1(g, w, pads)
  if (tuple(strides) == (2, 2) and w.shape[:2] == (3, 3) and pads == ((1, 1), (1, 1))
      and x_shape[1] % 2 == 0 and x_shape[2] % 2 == 0):
    return _dx_stride2(g, w)
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, pads, strides), jnp.zeros(x_shape, g.dtype))
  return vjp_x(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_gemm(x: jnp.ndarray, w: jnp.ndarray, pads=None, strides=(1, 1)) -> jnp.ndarray:
  """A convolution whose forward pass and both gradients are chunked GEMMs.

  Same function as `lax.conv_general_dilated` (NHWC, HWIO). The forward pass
  and the input gradient are (patches @ kernel) over batch chunks; the weight
  gradient is g^T @ patches. Strided input gradients other than 3x3/stride 2/
  pad 1 fall back to XLA.

  Args:
    x: [B, H, W, Cin].
    w: [kh, kw, Cin, Cout].
    pads: ((top, bottom), (left, right)); None means SAME.
    strides: (sh, sw).

  Returns:
    [B, H', W', Cout].
  """
  pads = _same_pads(*w.shape[:2]) if pads is None else pads
  return _conv_gemm(x, w, pads, tuple(strides))


def _fwd(x, w, pads, strides):
  return conv_gemm(x, w, pads, strides), (x, w)


def _bwd(pads, strides, res, g):
  x, w = res
  pads = _same_pads(*w.shape[:2]) if pads is None else pads
  dx = _dx(x.shape, w, pads, tuple(strides), g)
  kh, kw, _, _ = w.shape
  dw = _wgrad(x, g, kh, kw, pads, strides)
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


conv_gemm.defvjp(_fwd, _bwd)


def conv_transpose_2x(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """`nn.ConvTranspose(kernel_size=(4, 4), strides=(2, 2), padding="SAME")` maths
  (PyTorch's ConvTranspose2d(k=4, s=2, p=1)) as four 2x2 phase convolutions.

  Output pixel (2p + a, 2q + b) only sees kernel taps of parity (a, b), so
  each phase is a dense 2x2 convolution of x: no multiplications by the zeros
  a dilated input would hold, and every weight gradient is a GEMM.

  Args:
    x: [B, H, W, Cin].
    w: [4, 4, Cin, Cout], the `nn.ConvTranspose` kernel (not flipped).

  Returns:
    [B, 2H, 2W, Cout].
  """
  # Phase 0 uses inputs at offsets (-1, 0) with taps (0, 2); phase 1 offsets
  # (0, +1) with taps (1, 3).
  taps = ((0, 2), (1, 3))
  pad = (((1, 0)), ((0, 1)))
  rows = []
  for a in range(2):
    cols = []
    for b in range(2):
      wk = w[jnp.array(taps[a])][:, jnp.array(taps[b])]
      cols.append(conv_gemm(x, wk, (pad[a], pad[b])))
    rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2(b), C]
  y = jnp.stack(rows, axis=2)  # [B, H, 2(a), W, 2(b), C]
  B, H, _, W, _, C = y.shape
  return y.reshape(B, 2 * H, 2 * W, C)


class Conv(nn.Module):
  """A convolution with the parameters of `nn.Conv` (SAME padding by default,
  or explicit `padding` pairs, and any `strides`).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    gemm_weight_grad: use the GEMM weight gradient (see module docstring);
      False falls back to plain `nn.Conv` maths.
    dtype: computation dtype (parameters stay float32).
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Optional[Sequence[Sequence[int]]] = None
  gemm_weight_grad: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    pads = None if self.padding is None else tuple(tuple(p) for p in self.padding)
    fn = conv_gemm if self.gemm_weight_grad else _conv
    y = fn(x, kernel, pads, tuple(self.strides))
    return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal embedding of the seeds: [B] -> [B, dim], sin then cos halves.

  Frequencies are exp(-log(max_period) * i / (half - 1)), i = 0..half-1.
  """
  if dim < 4 or dim % 2:
    raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ConvTranspose2x(nn.Module):
  """`nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding="SAME")`, same
  parameters and maths, computed by `conv_transpose_2x` when gemm_weight_grad."""

  features: int
  gemm_weight_grad: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (4, 4, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    if self.gemm_weight_grad:
      y = conv_transpose_2x(x, kernel)
    else:
      y = jax.lax.conv_transpose(x, kernel, (2, 2), "SAME", dimension_numbers=_DN)
    return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
