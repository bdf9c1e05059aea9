"""The CPU-fast convolutions forced on (gemm_conv=True) against lax at
precision HIGHEST: forward, input gradient and weight gradient, with a check
that the custom path (im2col GEMM, Winograd, the stride-2 input gradient and
the transposed convolution by tap GEMMs) actually ran."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnbase import conv as layers
from nnbase.conv import Conv, ConvTranspose2x

HIGHEST = jax.lax.Precision.HIGHEST


@pytest.fixture
def ran(monkeypatch):
  """Counts trace-time calls of the custom kernels."""
  counts = collections.Counter()
  for name in (
    "_conv_gemm",
    "_conv3x3_winograd",
    "_wgrad3x3_winograd",
    "_wgrad",
    "_dx_stride2",
    "_dx_stride1",
    "_conv_transpose_2x",
    "_tap_upsample",
    "_t2_grads",
  ):
    real = getattr(layers, name)

    def wrapped(*args, _real=real, _name=name, **kwargs):
      counts[_name] += 1
      return _real(*args, **kwargs)

    monkeypatch.setattr(layers, name, wrapped)
  return counts


def _compare(fast, ref, x, key, atol=2e-4):
  p = ref.init(key, x)
  np.testing.assert_allclose(fast.apply(p, x), ref.apply(p, x), atol=atol, rtol=1e-4)
  loss = lambda mod: lambda p, x: jnp.sum(jnp.sin(mod.apply(p, x)) * jnp.cos(x.sum()))
  g_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(p, x)
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(p, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=1e-3), g_fast, g_ref)


@pytest.mark.parametrize(
  "case",
  [
    "winograd_f2",
    "winograd_f4",
    "im2col",
    "one_by_one",
    "stride2_phases",
    "stride2_odd",
    "stride2_xla_forward",
    "chunked_winograd_f2",
    "chunked_winograd_f4",
    "chunked_im2col",
  ],
)
def test_custom_conv_matches_lax(key, ran, case, monkeypatch):
  kernel, strides, size, cin, cout, batch = (3, 3), (1, 1), 8, 16, 24, 3
  if case == "im2col":
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 10**6)
  if "winograd" in case:  # sizes 8 x 10: F(4, 3) pads the 10 to 12
    monkeypatch.setattr(layers, "WINOGRAD_TILE", int(case[-1]))
  if case == "one_by_one":
    kernel = (1, 1)
  if case.startswith("stride2"):
    strides, size = (2, 2), (9 if case == "stride2_odd" else 8)
    monkeypatch.setattr(layers, "STRIDED_FORWARD_XLA", case == "stride2_xla_forward")
  if case.startswith("chunked"):
    monkeypatch.setattr(layers, "CHUNK_BYTES", 4000)
    monkeypatch.setattr(layers, "MIN_SUM_ROWS", 1)  # the sums chunked too
    batch = 6
    if case == "chunked_im2col":
      monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 10**6)
  x = jax.random.normal(key, (batch, size, size + 2, cin))
  pad = tuple((k // 2, k // 2) for k in kernel)
  fast = Conv(cout, kernel, strides=strides, padding=pad, gemm_conv=True)
  ref = nn.Conv(cout, kernel, strides=strides, padding=pad, precision=HIGHEST)
  _compare(fast, ref, x, key)
  if "winograd" in case:
    assert ran["_conv3x3_winograd"] and ran["_wgrad3x3_winograd"] and ran["_dx_stride1"]
  elif case == "stride2_xla_forward":  # XLA's forward, the GEMM gradients
    assert not ran["_conv_gemm"] and ran["_wgrad"] and ran["_dx_stride2"]
  else:
    assert ran["_conv_gemm"] and ran["_wgrad"] and not ran["_conv3x3_winograd"]
  if case in ("stride2_phases", "stride2_xla_forward"):
    assert ran["_dx_stride2"] and ran["_tap_upsample"]


@pytest.mark.parametrize("chunk_bytes", [None, 2000])
def test_custom_conv_transpose_matches_lax(key, ran, chunk_bytes, monkeypatch):
  if chunk_bytes:
    monkeypatch.setattr(layers, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(layers, "MIN_SUM_ROWS", 1)  # the sums chunked too
  x = jax.random.normal(key, (4, 5, 7, 12))
  fast = ConvTranspose2x(10, gemm_conv=True)
  ref = nn.ConvTranspose(10, (4, 4), strides=(2, 2), padding="SAME", precision=HIGHEST)
  _compare(fast, ref, x, key)
  assert ran["_conv_transpose_2x"] and ran["_tap_upsample"] and ran["_t2_grads"]


def test_winograd_tile_follows_the_setting_and_dtype(monkeypatch):
  monkeypatch.setattr(layers, "WINOGRAD_TILE", 4)
  assert layers._winograd(jnp.float32) is layers.F4
  assert layers._winograd(jnp.bfloat16) is layers.F2  # F(4, 3)'s constants cost 16-bit precision
  monkeypatch.setattr(layers, "WINOGRAD_TILE", 2)
  assert layers._winograd(jnp.float32) is layers.F2


@pytest.mark.parametrize("f", [layers.F2, layers.F4], ids=["F2", "F4"])
def test_winograd_transforms_compute_a_correlation(f):
  """1-D: A^T [(G k) * (B^T d)] is the correlation of d with k, and the
  adjoints used by the weight gradient are the transposes."""
  rng = np.random.default_rng(0)
  d, k = rng.normal(size=f.m + 2), rng.normal(size=3)
  y = np.array(f.out(np.array(f.kernel(k)) * np.array(f.data(d))))
  np.testing.assert_allclose(y, [d[i : i + 3] @ k for i in range(f.m)], atol=1e-12)
  m, g = rng.normal(size=f.m + 2), rng.normal(size=f.m)
  np.testing.assert_allclose(np.dot(f.out(m), g), np.dot(m, f.out_adj(g)), atol=1e-12)
  np.testing.assert_allclose(np.dot(f.kernel(k), m), np.dot(k, f.kernel_adj(m)), atol=1e-12)


@pytest.mark.parametrize(
  "case",
  [
    "winograd",
    "chunked_winograd",
    "chunked_winograd_shared_shift",
    "stride2",
    "stride2_xla_forward",
    "one_by_one",
    "xla",
  ],
)
def test_conv_relu_matches_relu_of_conv_plus_shift(key, ran, case, monkeypatch):
  """Conv(...)(x, add, relu=True) is relu(conv(x) + bias + add) with the same
  gradients for x, the kernel, the bias and `add`; on a Winograd layer the
  epilogue runs inside the chunks (`conv_gemm_relu`)."""
  batch, strides = 6, (1, 1)
  if case.startswith("chunked"):
    monkeypatch.setattr(layers, "CHUNK_BYTES", 4000)
    monkeypatch.setattr(layers, "MIN_SUM_ROWS", 1)
  kernel = (1, 1) if case == "one_by_one" else (3, 3)
  if case.startswith("stride2"):
    strides = (2, 2)
    monkeypatch.setattr(layers, "STRIDED_FORWARD_XLA", case == "stride2_xla_forward")
  epilogues = []
  real = layers._conv3x3_winograd
  spy = lambda *a, **kw: epilogues.append(kw.get("relu", False)) or real(*a, **kw)
  monkeypatch.setattr(layers, "_conv3x3_winograd", spy)
  k1, k2, k3 = jax.random.split(key, 3)
  x = jax.random.normal(k1, (batch, 8, 10, 16))
  rows = 1 if case.endswith("shared_shift") else batch
  add = jax.random.normal(k2, (rows, 1, 1, 24))
  pad = tuple((k // 2, k // 2) for k in kernel)
  fused = Conv(24, kernel, strides=strides, padding=pad, gemm_conv=case != "xla")
  ref = nn.Conv(24, kernel, strides=strides, padding=pad, precision=HIGHEST)
  p = ref.init(k3, x)
  p = jax.tree.map(lambda a: a + 0.1, p)  # a nonzero bias
  f = lambda p, x, a: fused.apply(p, x, a, relu=True)
  r = lambda p, x, a: nn.relu(ref.apply(p, x) + a)
  np.testing.assert_allclose(jax.jit(f)(p, x, add), r(p, x, add), atol=2e-4, rtol=1e-4)
  assert float(jnp.mean(r(p, x, add) == 0)) > 0.2  # the ReLU's mask matters below
  loss = lambda fn: lambda p, x, a: jnp.sum(jnp.sin(fn(p, x, a)) * jnp.cos(x.sum()))
  g_fused = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(p, x, add)
  g_ref = jax.jit(jax.grad(loss(r), argnums=(0, 1, 2)))(p, x, add)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3), g_fused, g_ref)
  if "winograd" in case:  # the forward pass with the epilogue inside its chunks
    assert True in epilogues and ran["_wgrad3x3_winograd"]
