"""Building blocks shared by the networks: a fast convolution and the time embedding.

`Conv` computes the same function as `flax.linen.Conv` (stride 1, SAME
padding, same parameter names and shapes) but with a custom VJP whose weight
gradient is one GEMM over image patches. On XLA:CPU this is 2-3x faster than
the convolution XLA emits for the weight gradient at 28x28 (measured in
`benchmarks/`); the input gradient still uses XLA's transposed convolution.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_gemm_grad(x: jnp.ndarray, w: jnp.ndarray, pads=None, strides=(1, 1)) -> jnp.ndarray:
  """Convolution with a GEMM weight gradient.

  Args:
    x: [B, H, W, Cin].
    w: [kh, kw, Cin, Cout].
    pads: ((top, bottom), (left, right)); None means SAME.
    strides: (sh, sw).

  Returns:
    [B, H', W', Cout], as `lax.conv_general_dilated`.
  """
  return _conv(x, w, pads, strides)


def _fwd(x, w, pads, strides):
  return _conv(x, w, pads, strides), (x, w)


# Rows (output pixels) per chunk of the weight-gradient GEMM. Chunking the
# batch keeps each chunk's patch matrix (rows x kh*kw*Cin) in cache between
# its construction and the GEMM: on 2 AVX2 cores this doubles the weight
# gradient's speed at 28x28 (benchmarks/levers.py measures it).
WGRAD_CHUNK_ROWS = 1568


def _chunk_images(batch: int, rows_per_image: int) -> int:
  """The largest divisor of `batch` whose chunk has <= WGRAD_CHUNK_ROWS rows (>= 1)."""
  per = max(1, min(batch, WGRAD_CHUNK_ROWS // max(rows_per_image, 1)))
  while batch % per:
    per -= 1
  return per


def _wgrad(x, g, kh, kw, pads, strides=(1, 1)):
  """sum over images and pixels of patches(x)^T g: [kh*kw*Cin, Cout], float32."""
  cin, cout = x.shape[-1], g.shape[-1]

  def one(xc, gc):
    if kh == kw == 1 and pads == ((0, 0), (0, 0)) and tuple(strides) == (1, 1):
      cols = xc.reshape(-1, cin)
    else:
      cols = _patches(xc, kh, kw, pads, strides).reshape(-1, kh * kw * cin)
    return jnp.dot(cols.T, gc.reshape(-1, cout), preferred_element_type=jnp.float32)

  batch = x.shape[0]
  per = _chunk_images(batch, g.shape[1] * g.shape[2])
  if per == batch:
    return one(x, g)
  n = batch // per
  xs = x.reshape((n, per) + x.shape[1:])
  gs = g.reshape((n, per) + g.shape[1:])
  acc, _ = jax.lax.scan(lambda a, xg: (a + one(*xg), None),
                        jnp.zeros((kh * kw * cin, cout), jnp.float32), (xs, gs))
  return acc


def _bwd(pads, strides, res, g):
  x, w = res
  pads = _same_pads(*w.shape[:2]) if pads is None else pads
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, pads, strides), x)
  (dx,) = vjp_x(g)
  kh, kw, _, _ = w.shape
  dw = _wgrad(x, g, kh, kw, pads, strides)
  return dx, dw.reshape(w.shape).astype(w.dtype)


conv_gemm_grad.defvjp(_fwd, _bwd)


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
      cols.append(conv_gemm_grad(x, wk, (pad[a], pad[b])))
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
    fn = conv_gemm_grad if self.gemm_weight_grad else _conv
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
