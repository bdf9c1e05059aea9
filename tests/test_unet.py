import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax as dj
from nnbase.conv import Conv, ConvTranspose2x


def n_params(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def init_shapes(model, shape):
  x = jnp.zeros(shape)
  t = jnp.zeros((shape[0],), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t))["params"]


def test_simple_preset_matches_pytorch_parameter_count():
  assert n_params(init_shapes(dj.make_model("simple"), (1, 28, 28, 1))) == 2_755_201


@pytest.mark.parametrize(
  "preset,count",
  [("simple_half", 689_473), ("simple_half_emb", 734_881), ("tiny", 408_193), ("test", 44_889)],
)
def test_preset_parameter_counts(preset, count):
  assert n_params(init_shapes(dj.make_model(preset), (1, 28, 28, 1))) == count


def test_conditional_simple_unet_embeds_in_every_block():
  """A class-conditional SimpleUNet adds the time + label embedding to the two
  bottleneck and two decoder convs too; the unconditional seed net does not."""
  cond = init_shapes(dj.make_model("simple", num_classes=10), (1, 28, 28, 1))
  for name in ("time_proj_mid1", "time_proj_mid2", "time_proj4", "time_proj5"):
    assert name in cond
    assert name not in init_shapes(dj.make_model("simple"), (1, 28, 28, 1))
  model = dj.make_model("simple_half", num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  t = jnp.array([5, 5])
  # Compiled as wholes: op by op, the init and the two forwards took ~4x longer.
  params = dj.train.run_once(lambda k: model.init(k, x, t)["params"], jax.random.key(1))
  # The decoder's last projection changes the output for any label.
  bumped = dict(params, time_proj5=jax.tree.map(lambda p: p + 0.5, params["time_proj5"]))
  forward = jax.jit(lambda p: model.apply({"params": p}, x, t, y=jnp.array([1, 2])))
  assert float(jnp.abs(forward(params) - forward(bumped)).max()) > 1e-3


@pytest.mark.parametrize(
  "preset,shape",
  [
    ("simple", (2, 28, 28, 1)),
    ("simple", (2, 32, 32, 3)),
    ("test", (2, 28, 28, 1)),
    ("test", (3, 32, 32, 3)),
    ("small", (1, 32, 32, 3)),
  ],
)
def test_output_shapes(preset, shape):
  model = dj.make_model(preset)
  params = init_shapes(model, shape)
  out = jax.eval_shape(
    lambda p: model.apply({"params": p}, jnp.zeros(shape), jnp.zeros((shape[0],), jnp.int32)),
    params,
  )
  assert out.shape == shape


def test_forward_is_finite_and_depends_on_t(key):
  model = dj.make_model("test")
  x = jax.random.normal(key, (2, 8, 8, 1))
  params = dj.train.run_once(lambda k: model.init(k, x, jnp.zeros((2,), jnp.int32))["params"], key)
  f = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
  a, b = f(params, x, jnp.array([0, 0])), f(params, x, jnp.array([500, 500]))
  assert np.all(np.isfinite(a)) and float(jnp.abs(a - b).max()) > 1e-4


def test_bad_image_size_raises():
  with pytest.raises(ValueError, match="not divisible by 8"):
    init_shapes(dj.make_model("small"), (1, 28, 28, 1))
  with pytest.raises(ValueError, match="unknown model preset"):
    dj.make_model("huge")


@pytest.mark.parametrize("kernel,cin,cout", [((3, 3), 5, 4), ((1, 1), 5, 4), ((3, 3), 16, 24)])
def test_fast_conv_matches_flax_conv(key, kernel, cin, cout):
  """im2col GEMMs for few channels, Winograd for a 3x3 with >= 16 (odd 9x7 size)."""
  from nnbase import conv as layers

  w = jnp.zeros(kernel + (cin, cout))
  assert layers._is_winograd(w, ((1, 1), (1, 1)), (1, 1)) == (kernel == (3, 3) and cin == 16)
  x = jax.random.normal(key, (2, 9, 7, cin))
  ref = nn.Conv(cout, kernel, padding="SAME")
  p = ref.init(key, x)
  loss = lambda mod: lambda p: jnp.sum(jnp.sin(mod.apply(p, x)))
  np.testing.assert_allclose(Conv(cout, kernel).apply(p, x), ref.apply(p, x), atol=1e-5)
  g_fast = jax.jit(jax.grad(loss(Conv(cout, kernel))))(p)
  g_ref = jax.grad(loss(ref))(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g_fast, g_ref)
  gx_fast = jax.grad(lambda x: jnp.sum(jnp.sin(Conv(cout, kernel).apply(p, x))))(x)
  gx_ref = jax.grad(lambda x: jnp.sum(jnp.sin(ref.apply(p, x))))(x)
  np.testing.assert_allclose(gx_fast, gx_ref, atol=1e-4)


@pytest.mark.parametrize("batch,size", [(6, 28), (5, 9)])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize("chunk_bytes", [None, 3000])
@pytest.mark.parametrize("winograd", [False, True])
def test_fast_conv_strided_and_batch_chunked_matches_flax(
  key, batch, size, strides, chunk_bytes, winograd, monkeypatch
):
  """Strided convs (the even size takes the phase input gradient, the odd one
  XLA's), whole-batch and chunked (a small CHUNK_BYTES forces the scans); at
  stride 1 both the im2col and (forced for 3 channels) the Winograd paths."""
  from nnbase import conv as layers

  if winograd:
    if strides != (1, 1):
      pytest.skip("Winograd is for stride 1")
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 1)
  if chunk_bytes is not None:
    monkeypatch.setattr(layers, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(layers, "MIN_SUM_ROWS", 1)  # the sums chunked too
    assert layers._chunk_images(batch, 9, 27 * 4) < batch
  x = jax.random.normal(key, (batch, size, size, 3))
  pad = ((1, 1), (1, 1))
  ref = nn.Conv(4, (3, 3), strides=strides, padding=pad)
  fast = Conv(4, (3, 3), strides=strides, padding=pad)
  p = ref.init(key, x)
  np.testing.assert_allclose(fast.apply(p, x), ref.apply(p, x), atol=1e-5)
  loss = lambda mod: lambda p, x: jnp.sum(jnp.sin(mod.apply(p, x)))
  g_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(p, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(p, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g_fast, g_ref)


def test_wgrad_chunking_picks_divisors(monkeypatch):
  from nnbase import conv as layers

  monkeypatch.setattr(layers, "CHUNK_BYTES", 7 * 2**20)  # the size depends on the machine
  assert layers._chunk_images(128, 784) == 2
  assert layers._chunk_images(128, 49) == 32
  assert layers._chunk_images(7, 784) == 2 - 1  # 7 is prime: one image per chunk
  assert layers._chunk_images(3, 10) == 3  # small: no chunking


@pytest.mark.parametrize("chunk_bytes", [None, 500])
def test_conv_transpose_2x_matches_flax(key, chunk_bytes, monkeypatch):
  from nnbase import conv as layers

  if chunk_bytes is not None:  # one image per chunk in every scan
    monkeypatch.setattr(layers, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(layers, "MIN_SUM_ROWS", 1)  # the sums chunked too
  x = jax.random.normal(key, (4, 7, 5, 6))
  ref = nn.ConvTranspose(3, (4, 4), strides=(2, 2), padding="SAME")
  p = ref.init(key, x)
  y = ConvTranspose2x(3).apply(p, x)
  assert y.shape == (4, 14, 10, 3)
  np.testing.assert_allclose(y, ref.apply(p, x), atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(jnp.sin(ConvTranspose2x(3).apply(p, x))))(p)
  g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(ref.apply(p, x))))(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g, g_ref)
  gx = jax.grad(lambda x: jnp.sum(jnp.sin(ConvTranspose2x(3).apply(p, x))))(x)
  gx_ref = jax.grad(lambda x: jnp.sum(jnp.sin(ref.apply(p, x))))(x)
  np.testing.assert_allclose(gx, gx_ref, atol=1e-4)


def test_timestep_embedding_matches_seed_formula():
  t = jnp.array([0, 7, 999])
  e = dj.timestep_embedding(t, 8)
  half = 4
  freqs = np.exp(-np.log(10000) * np.arange(half) / (half - 1))
  args = np.array([0, 7, 999])[:, None] * freqs[None]
  np.testing.assert_allclose(e, np.concatenate([np.sin(args), np.cos(args)], -1), atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_heads_first_attention_matches_flax(key, dtype):
  from ddpm_jax.unet import heads_first_attention

  kq, kk, kv, km = jax.random.split(key, 4)
  q, k, v = (jax.random.normal(r, (3, 10, 2, 4), dtype) for r in (kq, kk, kv))
  mask = jax.random.bernoulli(km, 0.7, (3, 2, 10, 10)).at[..., 0].set(True)
  loss = lambda f, q, k, v, m: (f(q, k, v, mask=m).astype(jnp.float32) ** 2).sum()
  for m in (None, mask):
    ours = jax.jit(heads_first_attention)(q, k, v, mask=m)
    ref = nn.dot_product_attention(q, k, v, mask=m, force_fp32_for_softmax=True)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(ours), np.float32(ref), atol=tol, rtol=tol)
    g = jax.jit(jax.grad(lambda *a: loss(heads_first_attention, *a), (0, 1, 2)))(q, k, v, m)
    g_ref = jax.grad(lambda *a: loss(nn.dot_product_attention, *a), (0, 1, 2))(q, k, v, m)
    for a, b in zip(g, g_ref):
      np.testing.assert_allclose(np.float32(a), np.float32(b), atol=5 * tol, rtol=5 * tol)
  with pytest.raises(ValueError, match="no attention dropout"):
    heads_first_attention(q, k, v, dropout_rate=0.1)


def test_summed_chunks_hold_min_sum_rows(monkeypatch):
  """A weight gradient's chunks hold >= MIN_SUM_ROWS rows: the 7x7 bottleneck's
  4 Winograd tiles per image made 2 MiB chunks of 16 rows, whose additions of
  a [36, 256, 256] product per chunk cost more than the products."""
  from nnbase import conv as layers

  monkeypatch.setattr(layers, "CHUNK_BYTES", 2 * 2**20)
  row = 36 * 256 * 4  # one F(4, 3) tile of 256 channels
  assert layers._chunk_images(64, 4, row) == 8  # forward: by bytes alone
  assert layers._chunk_images(64, 4, row, min_rows=layers.MIN_SUM_ROWS) == 32
  assert layers._chunk_images(12, 4, row, min_rows=128) == 12  # capped at the batch
  seen = []
  monkeypatch.setattr(layers, "_chunk_images", lambda *a: seen.append(a) or 64)
  x = jnp.ones((64, 7, 7, 256))
  jax.eval_shape(lambda x, g: layers._wgrad3x3_winograd(x, g), x, x)
  assert seen and seen[0][-1] == layers.MIN_SUM_ROWS
