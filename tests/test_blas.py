"""Float32 products on MKL through an XLA FFI custom call (nnbase/blas.py)."""

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nnbase import blas, tuning

on_mkl = pytest.mark.skipif(
  not blas._load()[0], reason=f"no BLAS path here: {blas._load()[1]} (pip install mkl)"
)


@pytest.fixture(autouse=True)
def _blas_on(monkeypatch):
  """The BLAS path wanted whatever this CPU's default is (off on AMD CPUs):
  these tests are about that path. `blas.forced` and each test's own
  setting of DDPM_JAX_BLAS still override it."""
  monkeypatch.setenv("DDPM_JAX_BLAS", "on")


def _operands(rng, g, m, n, k, trans_a, trans_b, dtype=np.float32):
  a = rng.standard_normal(g + ((k, m) if trans_a else (m, k))).astype(dtype)
  b = rng.standard_normal(g + ((n, k) if trans_b else (k, n))).astype(dtype)
  return a, b


def _reference(a, b, trans_a, trans_b):
  a, b = np.float64(a), np.float64(b)
  return np.swapaxes(a, -1, -2) if trans_a else a, np.swapaxes(b, -1, -2) if trans_b else b


def _calls(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count(blas.TARGET)


def _plan(m, n, k, trans_a, trans_b, batch=1, threads=2, min_part_flops=blas.MIN_PART_FLOPS):
  """(side cut, pieces, rows or columns per piece) of the handler's plan."""
  out = (ctypes.c_int64 * 3)()
  lib = ctypes.CDLL(blas._build())
  lib.nnbase_blas_plan(
    *(ctypes.c_int64(v) for v in (m, n, k)),
    int(trans_a),
    int(trans_b),
    *(ctypes.c_int64(v) for v in (batch, threads, min_part_flops)),
    out,
  )
  return ("m" if out[0] else "n", out[1], out[2])


@on_mkl
@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("mn", [(130, 70), (70, 130)])
def test_dot_matches_numpy_and_its_gradients_xla(batch, trans_a, trans_b, mn, monkeypatch):
  rng = np.random.default_rng(0)
  # Products of 130 x 70 x 90 cut into parts by rows or by columns, odd sizes
  # included (`test_products_are_cut_along_contiguous_slabs`).
  monkeypatch.setattr(blas, "MIN_PART_FLOPS", 100_000)
  assert _plan(*mn, 90, trans_a, trans_b, min_part_flops=100_000)[1] == 2
  a, b = _operands(rng, batch, *mn, 90, trans_a, trans_b)
  fn = lambda a, b: blas.dot(a, b, trans_a, trans_b)
  assert _calls(fn, a, b) == 1
  ra, rb = _reference(a, b, trans_a, trans_b)
  np.testing.assert_allclose(jax.jit(fn)(a, b), ra @ rb, rtol=1e-5, atol=1e-4)

  loss = lambda a, b: jnp.sum(jnp.sin(fn(a, b)))
  assert _calls(jax.grad(loss, (0, 1)), a, b) == 3  # forward, da, db
  grads = jax.jit(jax.grad(loss, (0, 1)))(a, b)
  with blas.forced(False):
    assert _calls(jax.grad(loss, (0, 1)), a, b) == 0
    want = jax.jit(jax.grad(loss, (0, 1)))(a, b)
  for got, ref in zip(grads, want):
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)


@on_mkl
def test_products_are_cut_along_contiguous_slabs():
  # The VAE's five large products: rows of A when A is not transposed and B
  # is; columns (rows of B^T) for A @ B^T; the longer side otherwise.
  assert _plan(128, 400, 784, False, False) == ("m", 2, 64)  # x @ W1
  assert _plan(128, 784, 400, False, False) == ("m", 2, 64)  # h @ W4
  assert _plan(128, 400, 784, False, True) == ("n", 2, 200)  # g @ W4^T
  assert _plan(784, 400, 128, True, False) == ("m", 2, 392)  # x^T @ g
  assert _plan(400, 784, 128, True, False) == ("n", 2, 392)  # h^T @ g
  assert _plan(400, 784, 128, True, True) == ("n", 2, 392)
  # The U-Net's transposed convolutions' tap products: rows, unless the
  # other side is 8x longer.
  assert _plan(392, 1024, 128, False, False) == ("m", 2, 196)
  assert _plan(196, 2048, 256, False, False) == ("n", 2, 1024)
  assert _plan(196, 256, 2048, False, False) == ("m", 2, 98)
  # Too few rows for a slab of 16 each: columns instead.
  assert _plan(48, 200, 1000, False, False, threads=4) == ("n", 4, 50)
  assert _plan(64, 200, 1000, False, False, threads=4) == ("m", 4, 16)
  # Small products, and batches with a product per thread, are not cut.
  assert _plan(128, 40, 400, False, False)[1] == 1
  assert _plan(128, 400, 784, False, False, batch=2)[1] == 1
  assert _plan(130, 70, 90, False, False, threads=3, min_part_flops=600_000) == ("m", 2, 65)


@on_mkl
def test_dot_edge_shapes():
  rng = np.random.default_rng(1)
  for m, n, k in [(0, 5, 3), (4, 0, 3), (4, 5, 0), (1, 1, 1), (1, 700, 600)]:
    a, b = _operands(rng, (), m, n, k, False, False)
    got = jax.jit(blas.dot)(a, b)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, np.float64(a) @ b, rtol=1e-5, atol=1e-3)


@on_mkl
def test_other_dtypes_and_meshes_keep_xlas_product():
  rng = np.random.default_rng(2)
  a, b = _operands(rng, (2,), 32, 16, 8, True, False, jnp.bfloat16)
  fn = lambda a, b: blas.dot(a, b, True, False, jnp.float32)
  assert _calls(fn, a, b) == 0
  assert jax.jit(fn)(a, b).dtype == jnp.float32
  # Under a mesh whose axes XLA partitions itself, a custom call would have
  # its operands gathered onto every device.
  a, b = _operands(rng, (), 64, 16, 8, False, False)

  def meshed(a, b, n):
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((n,), ("data",))):
      return blas.dot(a, b)

  for n, calls in ((2, 0), (1, 1)):
    jaxpr = jax.make_jaxpr(functools.partial(meshed, n=n))(a, b)
    assert str(jaxpr).count("ffi_call") == calls


@on_mkl
def test_dot_inside_shard_map_varies_with_its_operands():
  # One device here (the suite's default), two or more in a job.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(3)
  x, y = _operands(rng, (), 24, 40, 64, True, False)  # x [64, 24], y [64, 40]
  # Each device's rows give x_i^T y_i; their sum is x^T y.
  local = lambda x, y: jax.lax.psum(blas.dot(x, y, trans_a=True), "data")
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  assert _calls(fn, x, y) == 1
  np.testing.assert_allclose(jax.jit(fn)(x, y), np.float64(x).T @ y, rtol=1e-5, atol=1e-3)


def test_switches(monkeypatch):
  monkeypatch.setenv("DDPM_JAX_BLAS", "off")
  assert not blas.enabled() and blas.status().startswith("off")
  with blas.forced(True):
    assert blas.enabled() == blas._load()[0]
    with blas.forced(False):
      assert not blas.enabled()
  monkeypatch.setenv("DDPM_JAX_BLAS", "on")
  assert blas.enabled() == blas._load()[0]


def test_default_follows_tuning_then_vendor(tmp_path, monkeypatch):
  monkeypatch.setattr(tuning, "CACHE_FILE", str(tmp_path / "conv_tuning.json"))
  monkeypatch.setattr(tuning, "cpu_vendor", lambda: "AuthenticAMD")
  assert tuning.blas_default() is False
  monkeypatch.setattr(tuning, "cpu_vendor", lambda: "GenuineIntel")
  assert tuning.blas_default() is True
  tuning.save_choice(tuning.MIB, True, {}, blas=False)
  assert tuning.blas_default() is False
  monkeypatch.setattr(tuning, "cpu_vendor", lambda: "AuthenticAMD")
  tuning.save_choice(tuning.MIB, True, {}, blas=True)
  assert tuning.blas_default() is True


def test_a_failed_build_is_one_line(tmp_path, monkeypatch):
  bad = tmp_path / "bad.cc"
  bad.write_text("this is not C++\n")
  monkeypatch.setattr(blas, "SOURCE", str(bad))
  monkeypatch.setattr(blas, "BUILD_DIR", str(tmp_path / "build"))
  with pytest.raises(RuntimeError, match="failed"):
    blas._build()
  assert list((tmp_path / "build").iterdir()) == []  # no half-written library left
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
  with pytest.raises(RuntimeError, match="no compiler on PATH to build bad.cc"):
    blas._build()


def test_missing_library_is_reported(monkeypatch):
  monkeypatch.setenv("DDPM_JAX_BLAS_LIB", "/nonexistent/libmkl_rt.so")
  assert blas.mkl_library() is None


@on_mkl
def test_dot_under_vmap_broadcasts_the_unmapped_operand():
  rng = np.random.default_rng(4)
  xs = rng.standard_normal((5, 3, 64, 48)).astype(np.float32)  # 5 x 3 batched products
  w = rng.standard_normal((3, 40, 48)).astype(np.float32)  # shared, used transposed
  fn = jax.vmap(lambda x: blas.dot(x, w, trans_b=True))
  lowered = jax.jit(fn).lower(xs).as_text()
  # One call for all 15 products, not a loop of calls (vmap_method="sequential").
  assert lowered.count(blas.TARGET) == 1 and "while" not in lowered
  want = np.float64(xs) @ np.swapaxes(np.float64(w), -1, -2)
  np.testing.assert_allclose(jax.jit(fn)(xs), want, rtol=1e-5, atol=1e-3)
  # Per-example gradients (vmap of grad) of a dense layer, against XLA's.
  x2, w2 = xs[:, 0, :8], w[0].T  # [5, 8, 48], [48, 40]
  per_example = jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp.tanh(blas.dot(x, w))), 1), (0, None))
  got = jax.jit(per_example)(x2, w2)
  with blas.forced(False):
    ref = jax.jit(per_example)(x2, w2)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
