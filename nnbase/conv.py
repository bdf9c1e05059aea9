"""Fast convolutions for Flax on the CPU (used by ddpm_jax and sample_quality).

`Conv` computes the same function as `flax.linen.Conv` (same parameter names
and shapes) through `conv_gemm`: the forward pass, the input gradient and the
weight gradient are each a `lax.scan` of GEMMs (`nnbase.blas.dot`: on MKL
where it is on, else XLA's own) over cache-sized batch chunks of image
patches (a strided forward pass is XLA's own convolution unless tuning chose
otherwise: `STRIDED_FORWARD_XLA`). On XLA:CPU this beats XLA's
own convolutions for the seed U-Net's layers (`python -m benchmarks.levers`
measures it; figures in docs/design.md).
`ConvTranspose2x` is the 4x4/stride-2 transposed convolution as one GEMM of
each chunk against all 16 kernel taps, the shifted tap planes then summed
(`_tap_upsample`, which also computes the stride-2 input gradient).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nnbase import blas, tuning

_DN = ("NHWC", "HWIO", "NHWC")


def _same_pads(kh, kw):
  return ((kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2))


def _conv(x, w, pads=None, strides=(1, 1)):
  pads = _same_pads(*w.shape[:2]) if pads is None else pads
  return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN)


def _patches(x, kh, kw, pads, strides=(1, 1)):
  """[B, H', W', C] -> [B, H, W, kh*kw*C] with the (i, j, c) order of an HWIO kernel.

  Built as [B, H, W, kh, kw, C] by two stacks on non-minor axes, which XLA:CPU
  fuses into one pass that reads the padded input; it does not fuse a
  concatenation along the channel axis (>= 128 wide) or of more than 8 parts,
  and writes each tap's slice and then copies them all.
  """
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  sh, sw = strides
  H = (xp.shape[1] - kh) // sh + 1
  W = (xp.shape[2] - kw) // sw + 1
  cols = jnp.stack([xp[:, :, j : j + sw * (W - 1) + 1 : sw] for j in range(kw)], axis=3)
  rows = jnp.stack([cols[:, i : i + sh * (H - 1) + 1 : sh] for i in range(kh)], axis=3)
  return rows.reshape(rows.shape[:3] + (kh * kw * x.shape[-1],))


# Bytes of one chunk's patch matrix (rows x kh*kw*Cin floats). Every GEMM
# convolution below runs as a `lax.scan` over batch chunks of about this size,
# so a chunk's patches stay in cache between their construction and the GEMM:
# the size depends on the machine's caches (nnbase/tuning.py: a measured choice
# from `python -m benchmarks.tune`, else a rule from the cache sizes).
CHUNK_BYTES = tuning.chunk_bytes()
# Whether gemm_conv=None means the GEMM path on CPU (off only if tuning measured
# the plain XLA convolutions faster on this machine).
GEMM_BY_DEFAULT = tuning.gemm_default()
# Whether `conv_gemm`'s strided forward pass is XLA's convolution (XLA:CPU
# builds the patches inside its GEMM; im2col writes them out first, about 40%
# of the stride-2 layer's time). Its gradients stay GEMMs either way.
STRIDED_FORWARD_XLA = tuning.strided_forward_xla()
# Winograd's output tile for float32 3x3 layers: 4 (F(4x4, 3x3)) or 2
# (F(2x2, 3x3), also what 16-bit floats always use; see `_winograd`).
WINOGRAD_TILE = tuning.winograd_tile()


# Rows (the GEMM's inner dimension) a chunk of a summed product such as a
# weight gradient holds at least, whatever CHUNK_BYTES says: each chunk adds
# a whole gradient-sized product into the sum, so few rows per chunk make the
# additions, not the multiplications, the cost. The seed U-Net's 7x7
# bottleneck had 16 Winograd tiles per 2 MiB chunk: its weight gradient ran
# 1.8x faster with 128 (docs/design.md).
MIN_SUM_ROWS = 128

# Conv(...)(x, add, relu=True) through conv_gemm_relu (False: three steps; for A/B runs).
FUSED_RELU = True


def _chunk_images(
  batch: int, rows_per_image: int, row_bytes: int = 4 * 1152, min_rows: int = 1
) -> int:
  """The largest divisor of `batch` whose chunk holds <= CHUNK_BYTES of patches,
  or about `min_rows` rows where that is more (>= 1)."""
  per = CHUNK_BYTES // max(rows_per_image * row_bytes, 1)
  per = max(1, min(batch, max(per, -(-min_rows // max(rows_per_image, 1)))))
  while batch % per:
    per -= 1
  return per


def _out_size(n, k, pad, stride):
  return (n + pad[0] + pad[1] - k) // stride + 1


# The mesh axis a batch is split over in data parallelism (ddpm_jax.parallel).
BATCH_AXIS = "data"


def _batch_mesh(batch: int):
  """The trace's context mesh (`jax.sharding.use_abstract_mesh`, which
  `ddpm_jax.parallel` sets) when its BATCH_AXIS splits `batch` over more than
  one device and is not already manual (inside a `shard_map`), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or BATCH_AXIS not in mesh.axis_names or BATCH_AXIS in mesh.manual_axes:
    return None
  n = mesh.shape[BATCH_AXIS]
  return mesh if n > 1 and batch % n == 0 else None


def _chunked(
  fn, batch_args, out_rows_per_image, row_bytes, init=None, with_outputs=False, finish=None
):
  """Applies `fn` to batch chunks of `batch_args` in a scan.

  With init=None the per-chunk outputs are concatenated along the batch;
  otherwise they are summed into `init`. With `with_outputs` too, `fn` returns
  (summand, output) per chunk and the result is (sum, concatenated outputs).
  `finish`, a linear map, is applied to the sum (on each device's partial
  sum before the all-reduce, which then moves the smaller result).

  Under a context mesh that splits the batch (`_batch_mesh`), each device
  scans its own rows (`shard_map`) and the sums are all-reduced. XLA's
  partitioner would otherwise gather the whole batch onto every device for
  the scan (15 all-gathers in the seed U-Net's forward, 2x slower than one
  device).
  """
  batch = batch_args[0].shape[0]
  mesh = _batch_mesh(batch)
  if finish is not None and (mesh is None or init is None or with_outputs):
    assert init is not None and not with_outputs, "finish is for sums"
    return finish(_chunked(fn, batch_args, out_rows_per_image, row_bytes, init))
  if mesh is not None:
    data = P(BATCH_AXIS)
    local = lambda *a: _chunked(fn, a, out_rows_per_image, row_bytes, None, False)
    if init is None:
      return jax.shard_map(local, mesh=mesh, in_specs=data, out_specs=data)(*batch_args)

    def part(*a):
      zero = jax.lax.pcast(jnp.zeros(init.shape, init.dtype), (BATCH_AXIS,), to="varying")
      r = _chunked(fn, a, out_rows_per_image, row_bytes, zero, with_outputs)
      if finish is not None:
        r = finish(r)
      return (jax.lax.psum(r[0], BATCH_AXIS), r[1]) if with_outputs else jax.lax.psum(r, BATCH_AXIS)

    out_specs = (P(), data) if with_outputs else P()
    r = jax.shard_map(part, mesh=mesh, in_specs=data, out_specs=out_specs)(*batch_args)
    if finish is not None:
      return finish(init) + r
    return (init + r[0], r[1]) if with_outputs else init + r
  min_rows = 1 if init is None else MIN_SUM_ROWS
  per = _chunk_images(batch, out_rows_per_image, row_bytes, min_rows)
  if per == batch:
    r = fn(*batch_args)
    if init is None:
      return r
    return (init + r[0], r[1]) if with_outputs else init + r
  # Without the barrier XLA fuses an argument's producer (e.g. bias + ReLU)
  # into the chunked reshape and computes it a second time for the argument's
  # other users; this way it is written once (train step ~3% faster).
  batch_args = jax.lax.optimization_barrier(tuple(batch_args))
  n = batch // per
  split = [a.reshape((n, per) + a.shape[1:]) for a in batch_args]
  unchunk = lambda ys: ys.reshape((batch,) + ys.shape[2:])
  if init is None:
    _, ys = jax.lax.scan(lambda c, a: (None, fn(*a)), None, split)
    return unchunk(ys)
  if with_outputs:

    def body(c, a):
      summand, y = fn(*a)
      return c + summand, y

    acc, ys = jax.lax.scan(body, init, split)
    return acc, unchunk(ys)
  acc, _ = jax.lax.scan(lambda c, a: (c + fn(*a), None), init, split)
  return acc


def _epilogue(y, shift, relu: bool):
  """relu(y + shift) (`conv_gemm_relu`), each step only where asked."""
  y = y if shift is None else y + shift
  return jnp.maximum(y, 0) if relu else y


def _with_shift(x, shift) -> tuple:
  """`_chunked`'s batch arguments: x, and shift where it has one row per image
  (a shared [1, 1, 1, C] shift stays a closure of the chunk function)."""
  return (x, shift) if shift is not None and shift.shape[0] == x.shape[0] > 1 else (x,)


def _conv_gemm(x, w, pads, strides=(1, 1), shift=None, relu: bool = False):
  """`_conv(x, w, pads, strides)` as chunked (patches @ kernel) GEMMs; with
  `shift` ([B or 1, 1, 1, Cout]) and `relu`, relu(y + shift) per chunk."""
  kh, kw, cin, cout = w.shape
  H = _out_size(x.shape[1], kh, pads[0], strides[0])
  W = _out_size(x.shape[2], kw, pads[1], strides[1])
  wm = w.reshape(kh * kw * cin, cout)
  if kh == kw == 1 and pads == ((0, 0), (0, 0)) and tuple(strides) == (1, 1):
    y = blas.dot(x.reshape(-1, cin), wm).reshape(x.shape[:3] + (cout,))
    return _epilogue(y, shift, relu)

  def one(xc, sc=shift):
    cols = _patches(xc, kh, kw, pads, strides).reshape(-1, kh * kw * cin)
    return _epilogue(blas.dot(cols, wm).reshape(xc.shape[0], H, W, cout), sc, relu)

  return _chunked(one, _with_shift(x, shift), H * W, kh * kw * cin * x.dtype.itemsize)


# Winograd F(m x m, 3 x 3): Y = A^T [(G w G^T) * (B^T d B)] A per (m+2)^2 input
# tile d and m x m output tile; (m+2)^2 multiplications per output tile
# instead of 9 m^2. Each transform below acts along one axis, on a tuple of
# arrays (the slices along that axis).


def _f2_g(k):
  """G k, 3 taps -> 4; G = ((1, 0, 0), (1/2, 1/2, 1/2), (1/2, -1/2, 1/2), (0, 0, 1))."""
  return (k[0], 0.5 * (k[0] + k[1] + k[2]), 0.5 * (k[0] - k[1] + k[2]), k[2])


def _f2_gt(m):
  """G^T m, 4 -> 3 taps, the adjoint of `_f2_g`."""
  return (m[0] + 0.5 * (m[1] + m[2]), 0.5 * (m[1] - m[2]), 0.5 * (m[1] + m[2]) + m[3])


def _f2_in(p):
  """B^T p: the four 2-strided slices of p combined."""
  return (p[0] - p[2], p[1] + p[2], p[2] - p[1], p[1] - p[3])


def _f2_out(m):
  """A^T m, 4 -> 2."""
  return (m[0] + m[1] + m[2], m[1] - m[2] - m[3])


def _f2_out_adj(gy):
  """A gy, 2 -> 4, the adjoint of `_f2_out`."""
  return (gy[0], gy[0] + gy[1], gy[0] - gy[1], -gy[1])


def _f4_g(k):
  """G k, 3 taps -> 6 (Lavin and Gray's F(4, 3), points 0, +-1, +-2, inf)."""
  a, b = k[0] / 24 + k[2] / 6, k[1] / 12
  return (k[0] / 4, -(k[0] + k[1] + k[2]) / 6, -(k[0] - k[1] + k[2]) / 6, a + b, a - b, k[2])


def _f4_gt(m):
  """G^T m, 6 -> 3 taps, the adjoint of `_f4_g`."""
  s12, s34 = m[1] + m[2], m[3] + m[4]
  return (
    m[0] / 4 - s12 / 6 + s34 / 24,
    (m[2] - m[1]) / 6 + (m[3] - m[4]) / 12,
    (s34 - s12) / 6 + m[5],
  )


def _f4_in(d):
  """B^T d, 6 -> 6."""
  return (
    4 * d[0] - 5 * d[2] + d[4],
    d[3] + d[4] - 4 * (d[1] + d[2]),
    d[4] - d[3] + 4 * (d[1] - d[2]),
    d[4] - d[2] + 2 * (d[3] - d[1]),
    d[4] - d[2] + 2 * (d[1] - d[3]),
    4 * d[1] - 5 * d[3] + d[5],
  )


def _f4_out(m):
  """A^T m, 6 -> 4."""
  a, b, c, d = m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]
  return (m[0] + a + c, b + 2 * d, a + 4 * c, b + 8 * d + m[5])


def _f4_out_adj(g):
  """A g, 4 -> 6, the adjoint of `_f4_out`."""
  a, b, c, d = g[0] + g[2], g[1] + g[3], g[0] + 4 * g[2], 2 * g[1] + 8 * g[3]
  return (g[0], a + b, a - b, c + d, c - d, g[3])


class Winograd(NamedTuple):
  """F(m x m, 3 x 3) as its 1-D transforms (input tiles m + 2 wide, step m)."""

  m: int
  kernel: Callable  # G: 3 -> m + 2
  kernel_adj: Callable  # G^T: m + 2 -> 3
  data: Callable  # B^T: m + 2 -> m + 2
  out: Callable  # A^T: m + 2 -> m
  out_adj: Callable  # A: m -> m + 2


F2 = Winograd(2, _f2_g, _f2_gt, _f2_in, _f2_out, _f2_out_adj)
F4 = Winograd(4, _f4_g, _f4_gt, _f4_in, _f4_out, _f4_out_adj)


def _winograd(dtype) -> Winograd:
  """F(4x4, 3x3) for float32 and wider when WINOGRAD_TILE is 4, else F(2x2, 3x3).

  F(4, 3) does 2.25 multiplications per output against F(2, 3)'s 4 and
  expands the input 2.25x against 4x, but its constants (up to 8 and 1/24)
  cost precision: ~1e-5 relative in float32 against ~1e-6, too coarse for
  16-bit floats.
  """
  wide = jnp.dtype(dtype).itemsize >= 4
  return F4 if WINOGRAD_TILE == 4 and wide else F2


def _kron(t, n):
  """The matrix of the 2-D transform that applies the 1-D transform `t`
  (n taps -> k, linear) along both axes: kron(T, T), [k*k, n*n] float32, built
  at trace time."""
  T = np.array([t(list(np.eye(n)[:, j])) for j in range(n)], np.float64).T  # [k, n]
  return np.kron(T, T).astype(np.float32)


def _wino_kernel(w, f: Winograd, flip: bool = False):
  """G w G^T of a [3, 3, Cin, Cout] kernel -> [(m+2)^2, Cin, Cout]; with `flip`,
  of w flipped in both spatial axes.

  One GEMM, kron(G, G) [(m+2)^2, 9] @ w [9, Cin*Cout]: the same numbers as
  `einsum("ai,ijcd,bj->abcd", G, w, G)`, which XLA:CPU ran through a
  transposing copy (4.2 ms for a 256x256 kernel, F(2, 3)), and 6x faster than
  the (m+2)^2 slab sums it replaced (0.36 against 2.28 ms, 256x256, F(4, 3)),
  which XLA wrote one by one and then copied into their stack.
  """
  m = _kron(f.kernel, 3)
  m = m[:, ::-1] if flip else m  # tap (i, j) -> (2 - i, 2 - j) is index 8 - (3i + j)
  u = jnp.dot(jnp.asarray(m, w.dtype), w.reshape(9, -1), preferred_element_type=jnp.float32)
  return u.astype(w.dtype).reshape((m.shape[0],) + w.shape[2:])


def _padded(n, m):
  return -(-n // m) * m


def _wino_tiles(xc, H, W, f: Winograd):
  """B^T d B for every (m+2)^2 tile of xc padded by 1 (and up to multiples of m):
  [(m+2)^2, b, H'/m, W'/m, C]."""
  Hp, Wp = _padded(H, f.m), _padded(W, f.m)
  xp = jnp.pad(xc, ((0, 0), (1, 1 + Hp - H), (1, 1 + Wp - W), (0, 0)))
  return _tile_transform(f.data, xp, f.m + 2, f.m, Hp, Wp)


def _tile_transform(t, x, n, step, H, W):
  """A 1-D tile transform `t` (n arrays -> k) along both spatial axes of x:
  first on the row slices x[:, i : i + H : step], then on the column slices
  [..., j : j + W : step] of the result, i < n. Returns [k*k, b, H/step, W/step, C].

  Rows, stacked, then columns, stacked: two k-way stacks XLA:CPU fuses. One
  stack of all k*k transformed tiles is not fused (no concatenation of more
  than 8 parts is): it writes k*k slabs, then copies them (F(2, 3) forward
  ~5% slower, train ~3-7%).
  """
  rows = jnp.stack(t([x[:, i : i + H : step] for i in range(n)]))  # [k, b, H/step, W', C]
  cols = t([rows[:, :, :, j : j + W : step] for j in range(n)])  # k x [k, b, H/s, W/s, C]
  return jnp.stack(cols, axis=1).reshape((len(cols) ** 2,) + cols[0].shape[1:])


def _interleave(y):
  """y[a][b] [n, H, W, C], a, b < k -> [n, kH, kW, C]; pixel (kp + a, kq + b) = y[a][b][p, q]."""
  out = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # [n, H, k(a), W, k(b), C]
  n, H, ka, W, kb, C = out.shape
  return out.reshape(n, ka * H, kb * W, C)


def _conv3x3_winograd(x, w, adjoint: bool = False, shift=None, relu: bool = False):
  """`_conv(x, w)` for a 3x3 kernel, stride 1, padding 1, by Winograd F(m x m, 3 x 3)
  (`_winograd`: m = 4 in float32 by default, else 2). With `adjoint`, the
  convolution with `_flip_transpose(w)` (the input gradient of `_conv(., w)`),
  without writing that kernel out: its transposed copy made the 256-channel
  input gradient ~1.5x slower than the forward pass.

  Per batch chunk: the input transform, one batched GEMM
  [(m+2)^2, tiles, Cin] @ [(m+2)^2, Cin, Cout], the output transform. 4x
  (F(4, 3)) or 2.25x (F(2, 3)) fewer multiplications than the direct
  convolution (faster than `_conv_gemm` at the seed U-Net's 3x3 layers:
  docs/design.md). Sizes that m does not divide are padded and cropped.
  Float32 error is ~1e-5 (F(4, 3)) or ~1e-6 (F(2, 3)) relative.

  With `shift` ([B or 1, 1, 1, Cout]) and `relu`, returns relu(y + shift)
  (`conv_gemm_relu`), computed in each chunk as its output is written.

  Args:
    x: [B, H, W, Cin]; w: [3, 3, Cin, Cout] ([3, 3, Cout, Cin] with `adjoint`).

  Returns:
    [B, H, W, Cout].
  """
  B, H, W, cin = x.shape
  cout = w.shape[2 if adjoint else 3]
  f = _winograd(x.dtype)
  k = f.m + 2
  u = _wino_kernel(w, f, flip=adjoint)  # [k*k, Cin, Cout], or [k*k, Cout, Cin]

  def one(xc, sc=shift):
    v = _wino_tiles(xc, H, W, f)
    m = blas.dot(v.reshape(k * k, -1, cin), u, trans_b=adjoint)
    m = m.reshape((k, k) + v.shape[1:4] + (cout,))
    # Rows then columns; output pixel (mp + a, mq + b) is y_ab at tile (p, q).
    return _epilogue(_interleave([f.out(s) for s in f.out(m)])[:, :H, :W], sc, relu)

  tiles = (_padded(H, f.m) // f.m) * (_padded(W, f.m) // f.m)
  return _chunked(one, _with_shift(x, shift), tiles, k * k * cin * x.dtype.itemsize)


def _wgrad3x3_winograd(x, g):
  """Weight gradient of `_conv3x3_winograd`: [3, 3, Cin, Cout], float32.

  The forward pass is y = A^T (U * V) A per tile with U = G w G^T, so
  dw = G^T [sum over tiles of (A gy A^T) * V] G: (m+2)^2 GEMMs over the
  tiles, as many fewer multiplications than the direct weight gradient as
  the forward pass has.

  Args:
    x: [B, H, W, Cin], the forward input; g: [B, H, W, Cout], the output gradient.
  """
  B, H, W, cin = x.shape
  cout = g.shape[-1]
  f = _winograd(x.dtype)
  k = f.m + 2
  Hp, Wp = _padded(H, f.m), _padded(W, f.m)

  def one(xc, gc):
    v = _wino_tiles(xc, H, W, f)
    gp = jnp.pad(gc, ((0, 0), (0, Hp - H), (0, Wp - W), (0, 0)))
    gh = _tile_transform(f.out_adj, gp, f.m, f.m, Hp, Wp)  # A g A^T
    return blas.dot(
      gh.reshape(k * k, -1, cout),
      v.reshape(k * k, -1, cin),
      trans_a=True,
      preferred_element_type=jnp.float32,
    )  # [k*k, Cout, Cin]

  def kernel_adj(acc):  # G^T m G: [k*k, Cout, Cin] -> [3, 3, Cout, Cin]
    m = jnp.asarray(_kron(f.kernel_adj, k), acc.dtype)  # [9, k*k]
    return jnp.dot(m, acc.reshape(k * k, -1)).reshape(3, 3, cout, cin)

  dw = _chunked(
    one,
    (x, g),
    (Hp // f.m) * (Wp // f.m),
    k * k * cin * x.dtype.itemsize,
    init=jnp.zeros((k * k, cout, cin), jnp.float32),
    finish=kernel_adj,  # before the all-reduce: 9 slabs move instead of k*k
  )
  return dw.swapaxes(2, 3)  # [3, 3, Cin, Cout]


# Winograd's transforms only pay off when the GEMMs have some width: a
# 1-channel input (the U-Net's first layer) runs 6x slower than im2col.
WINOGRAD_MIN_CHANNELS = 16


def _is_winograd(w, pads, strides):
  """3x3, stride 1, padding 1, and >= WINOGRAD_MIN_CHANNELS in and out."""
  return (
    w.shape[:2] == (3, 3)
    and pads == ((1, 1), (1, 1))
    and tuple(strides) == (1, 1)
    and min(w.shape[2:]) >= WINOGRAD_MIN_CHANNELS
  )


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
    return blas.dot(gc.reshape(-1, cout), cols, trans_a=True, preferred_element_type=jnp.float32)

  acc = _chunked(
    one,
    (x, g),
    g.shape[1] * g.shape[2],
    k * x.dtype.itemsize,
    init=jnp.zeros((cout, k), jnp.float32),
  )
  return acc.T


def _flip_transpose(w):
  """The kernel of the input gradient: spatially flipped, Cin and Cout swapped."""
  return jnp.flip(w, (0, 1)).swapaxes(2, 3)


def _dx_stride1(g, w, pads):
  kh, kw = w.shape[:2]
  dpads = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]), (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
  if _is_winograd(w, dpads, (1, 1)):
    return _conv3x3_winograd(g, w, adjoint=True)
  return _conv_gemm(g, _flip_transpose(w), dpads)


# Input gradient of a 3x3, stride-2, pad-1 convolution: even input pixels 2q
# see tap 1 of output q; odd pixels 2q+1 see tap 2 of output q and tap 0 of
# output q+1. Per parity: the (output offset, kernel tap) pairs.
_S2_TAPS = (((0, 1),), ((0, 2), (1, 0)))


def _tap_upsample(x, k, taps):
  """A 2x upsampling convolution by one GEMM per chunk against all taps.

  Output pixel (2p + a, 2q + b) = sum over (di, i) in taps[a] and (dj, j) in
  taps[b] of x[p + di, q + dj] @ k[i, j] (zero outside x). Each chunk computes
  x @ k for every tap at once ([rows, Cin] @ [Cin, kh*kw*Cout], a wide GEMM)
  and sums the shifted tap planes into the interleaved output in cache.

  Args:
    x: [B, H, W, Cin]; k: [kh, kw, Cin, Cout]; taps: per parity (0, 1), pairs
      (offset, tap) used along both axes.

  Returns:
    [B, 2H, 2W, Cout].
  """
  B, H, W, cin = x.shape
  kh, kw, _, cout = k.shape
  km = k.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)
  lo = max(0, -min(d for t in taps for d, _ in t))
  hi = max(0, max(d for t in taps for d, _ in t))

  def one(xc):
    y = blas.dot(xc.reshape(-1, cin), km).reshape(xc.shape[:3] + (kh, kw, cout))
    yp = jnp.pad(y, ((0, 0), (lo, hi), (lo, hi), (0, 0), (0, 0), (0, 0)))
    tap = lambda di, i, dj, j: yp[:, lo + di : lo + di + H, lo + dj : lo + dj + W, i, j]
    return _interleave([[sum(tap(*r, *c) for r in ta for c in tb) for tb in taps] for ta in taps])

  return _chunked(one, (x,), H * W, kh * kw * cout * x.dtype.itemsize)


def _dx_stride2(g, w):
  """dx of `_conv(x, w, ((1, 1), (1, 1)), (2, 2))` for even H, W."""
  return _tap_upsample(g, w.swapaxes(2, 3), _S2_TAPS)


def _dx(x_shape, w, pads, strides, g):
  if tuple(strides) == (1, 1):
    return _dx_stride1(g, w, pads)
  if (
    tuple(strides) == (2, 2)
    and w.shape[:2] == (3, 3)
    and pads == ((1, 1), (1, 1))
    and x_shape[1] % 2 == 0
    and x_shape[2] % 2 == 0
  ):
    return _dx_stride2(g, w)
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, pads, strides), jnp.zeros(x_shape, g.dtype))
  return vjp_x(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_gemm(
  x: jnp.ndarray, w: jnp.ndarray, pads: Any = None, strides: Sequence[int] = (1, 1)
) -> jnp.ndarray:
  """A convolution whose forward pass and both gradients are chunked GEMMs.

  Same function as `lax.conv_general_dilated` (NHWC, HWIO). The forward pass
  and the input gradient are (patches @ kernel) over batch chunks; the weight
  gradient is g^T @ patches. Strided input gradients other than 3x3/stride 2/
  pad 1 fall back to XLA, and so does a strided forward pass when
  STRIDED_FORWARD_XLA (the default unless `benchmarks.tune` chose otherwise).

  Args:
    x: [B, H, W, Cin].
    w: [kh, kw, Cin, Cout].
    pads: ((top, bottom), (left, right)); None means SAME.
    strides: (sh, sw).

  Returns:
    [B, H', W', Cout].
  """
  return _forward(x, w, pads, strides)


def _forward(x, w, pads, strides, shift=None, relu: bool = False):
  """`conv_gemm`'s forward pass; with `shift` and `relu`, relu(y + shift)
  (`conv_gemm_relu`), inside the chunks on the Winograd and im2col paths."""
  pads = _same_pads(*w.shape[:2]) if pads is None else pads
  if _is_winograd(w, pads, strides):
    return _conv3x3_winograd(x, w, shift=shift, relu=relu)
  if tuple(strides) != (1, 1) and STRIDED_FORWARD_XLA:
    return _epilogue(_conv(x, w, pads, tuple(strides)), shift, relu)
  return _conv_gemm(x, w, pads, tuple(strides), shift=shift, relu=relu)


def _fwd(x, w, pads, strides):
  return conv_gemm(x, w, pads, strides), (x, w)


def _bwd(pads, strides, res, g):
  x, w = res
  pads = _same_pads(*w.shape[:2]) if pads is None else pads
  dx = _dx(x.shape, w, pads, tuple(strides), g)
  kh, kw, _, _ = w.shape
  if _is_winograd(w, pads, strides):
    dw = _wgrad3x3_winograd(x, g)
  else:
    dw = _wgrad(x, g, kh, kw, pads, strides)
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


conv_gemm.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_gemm_relu(
  x: jnp.ndarray,
  w: jnp.ndarray,
  shift: jnp.ndarray,
  pads: Any = None,
  strides: Sequence[int] = (1, 1),
) -> jnp.ndarray:
  """relu(conv_gemm(x, w, pads, strides) + shift), the bias (and a per-image
  time projection) and the ReLU applied where a Winograd or im2col layer
  writes each chunk's output: the pre-activation is never stored, and no
  separate pass reads it back. A strided layer on XLA's convolution
  (STRIDED_FORWARD_XLA) computes the same in three steps. The backward pass
  keeps only the output (the ReLU's mask is output > 0).

  Args:
    x: [B, H, W, Cin]; w: [kh, kw, Cin, Cout].
    shift: [B or 1, 1, 1, Cout].

  Returns:
    [B, H', W', Cout].
  """
  return _forward(x, w, pads, strides, shift.astype(x.dtype), relu=True)


def _relu_fwd(x, w, shift, pads, strides):
  h = conv_gemm_relu(x, w, shift, pads, strides)
  return h, (x, w, h, shift)


def _relu_bwd(pads, strides, res, g):
  x, w, h, shift = res
  g = jnp.where(h > 0, g, jnp.zeros((), g.dtype))
  axes = tuple(i for i in range(4) if shift.shape[i] == 1 and g.shape[i] != 1)
  dshift = jnp.sum(g, axis=axes, keepdims=True, dtype=jnp.float32).astype(shift.dtype)
  dx, dw = _bwd(pads, strides, (x, w), g)
  return dx, dw, dshift


conv_gemm_relu.defvjp(_relu_fwd, _relu_bwd)


# Per output parity a: the (input offset, kernel tap) pairs that reach pixel 2p + a.
_T2_TAPS = (((-1, 0), (0, 2)), ((0, 1), (1, 3)))


def _conv_transpose_2x(x, w):
  return _tap_upsample(x, w, _T2_TAPS)


@jax.custom_vjp
def conv_transpose_2x(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """`nn.ConvTranspose(kernel_size=(4, 4), strides=(2, 2), padding="SAME")` maths
  (PyTorch's ConvTranspose2d(k=4, s=2, p=1)) as chunked GEMMs.

  Forward (`_tap_upsample`): per batch chunk one GEMM of x against all 16
  taps ([rows, Cin] @ [Cin, 16*Cout]), then each output pixel sums the four
  shifted tap planes of its parity (no multiplications by the zeros a dilated
  input would hold). Backward (`_t2_grads`): the input
  gradient, a 4x4 stride-2 convolution of g with the flipped kernel, and the
  weight gradient, a GEMM of x against the same stride-2 patches of g, share
  each chunk's patches.

  Args:
    x: [B, H, W, Cin].
    w: [4, 4, Cin, Cout], the `nn.ConvTranspose` kernel (not flipped).

  Returns:
    [B, 2H, 2W, Cout].
  """
  return _conv_transpose_2x(x, w)


def _t2_fwd(x, w):
  return _conv_transpose_2x(x, w), (x, w)


def _t2_grads(x, w, g):
  """(dx, dw) of `conv_transpose_2x(x, w)` for the output gradient g.

  Both come from the same matrix, the 4x4 stride-2 patches of g (pad 1):
  dx = patches @ flip_transpose(w) and dw = flip_transpose(x^T @ patches).
  One scan builds each chunk's patches once and uses them for both.

  Args:
    x: [B, H, W, Cin]; w: [4, 4, Cin, Cout]; g: [B, 2H, 2W, Cout].
  """
  B, H, W, cin = x.shape
  cout = w.shape[3]
  wm = _flip_transpose(w).reshape(16 * cout, cin)
  pads = ((1, 1), (1, 1))

  def one(xc, gc):
    cols = _patches(gc, 4, 4, pads, (2, 2)).reshape(-1, 16 * cout)
    dx = blas.dot(cols, wm).reshape(xc.shape)
    # x^T @ patches as ([Cin, rows] @ [rows, K]); see `_wgrad` on the orientation.
    dwt = blas.dot(xc.reshape(-1, cin), cols, trans_a=True, preferred_element_type=jnp.float32)
    return dwt, dx

  acc, dx = _chunked(
    one,
    (x, g),
    H * W,
    16 * cout * g.dtype.itemsize,
    init=jnp.zeros((cin, 16 * cout), jnp.float32),
    with_outputs=True,
  )
  dw = _flip_transpose(acc.T.reshape(4, 4, cout, cin))
  return dx, dw


def _t2_bwd(res, g):
  x, w = res
  dx, dw = _t2_grads(x, w, g)
  return dx.astype(x.dtype), dw.astype(w.dtype)


conv_transpose_2x.defvjp(_t2_fwd, _t2_bwd)


# With gemm_conv=None, layers narrower than this keep XLA's convolution: they
# are cheap either way, and the GEMM path's scans cost compile time.
GEMM_MIN_CHANNELS = 32


def use_gemm_conv(
  gemm_conv: Optional[bool], cin: int = GEMM_MIN_CHANNELS, cout: int = GEMM_MIN_CHANNELS
) -> bool:
  """Resolves a `gemm_conv` setting for a layer. None means: on the CPU
  backend, for layers with >= GEMM_MIN_CHANNELS input or output channels."""
  if gemm_conv is not None:
    return bool(gemm_conv)
  return GEMM_BY_DEFAULT and jax.default_backend() == "cpu" and max(cin, cout) >= GEMM_MIN_CHANNELS


class Conv(nn.Module):
  """A convolution with the parameters of `nn.Conv` (SAME padding by default,
  or explicit `padding` pairs, and any `strides`).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    gemm_conv: compute with `conv_gemm` (see module docstring); False uses
      XLA's convolution; None (default) picks `conv_gemm` on CPU for layers
      with >= GEMM_MIN_CHANNELS channels (GPU and TPU convolution libraries
      beat it; narrow layers gain nothing).
    dtype: computation dtype (parameters stay float32).

  `Conv(...)(x, add, relu=True)` is relu(conv(x) + bias + add), `add`
  broadcasting as [B or 1, 1, 1, features] (a time projection); on the GEMM
  path through `conv_gemm_relu`.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Optional[Sequence[Sequence[int]]] = None
  gemm_conv: Optional[bool] = None
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, add=None, relu: bool = False):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    pads = None if self.padding is None else tuple(tuple(p) for p in self.padding)
    shift = bias.reshape((1,) * (x.ndim - 1) + (-1,))
    if add is not None:
      shift = shift + jnp.asarray(add, self.dtype)
    gemm = use_gemm_conv(self.gemm_conv, x.shape[-1], self.features)
    if relu and gemm and FUSED_RELU and x.ndim == 4 and shift.ndim == 4:
      return conv_gemm_relu(x, kernel, shift, pads, tuple(self.strides))
    y = (conv_gemm if gemm else _conv)(x, kernel, pads, tuple(self.strides)) + shift
    return nn.relu(y) if relu else y


class ConvTranspose2x(nn.Module):
  """`nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding="SAME")`, same
  parameters and maths, computed by `conv_transpose_2x` when `gemm_conv`
  (None: as for `Conv`)."""

  features: int
  gemm_conv: Optional[bool] = None
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (4, 4, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    if use_gemm_conv(self.gemm_conv, x.shape[-1], self.features):
      y = conv_transpose_2x(x, kernel)
    else:
      y = jax.lax.conv_transpose(x, kernel, (2, 2), "SAME", dimension_numbers=_DN)
    return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
