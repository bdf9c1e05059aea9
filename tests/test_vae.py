import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vae_jax as vj
from nnbase import blas


def test_kl_closed_form_matches_monte_carlo():
  mean = jnp.array([0.5, -1.0, 0.2])
  logvar = jnp.array([-0.5, 0.3, 0.0])
  z = vj.reparameterize(
    jax.random.key(0), jnp.broadcast_to(mean, (200000, 3)), jnp.broadcast_to(logvar, (200000, 3))
  )
  log_q = vj.gaussian_log_density(z, mean[None], logvar[None])
  log_p = vj.gaussian_log_density(z, jnp.zeros_like(z), jnp.zeros_like(z))
  mc = float(jnp.mean(log_q - log_p))
  assert float(vj.gaussian_kl(mean, logvar)) == pytest.approx(mc, abs=0.01)
  assert float(vj.gaussian_kl(jnp.zeros(4), jnp.zeros(4))) == 0.0


def test_bernoulli_log_likelihood_direct_and_extreme():
  logits = jnp.array([-3.0, 0.0, 2.5, 0.7])
  x = jnp.array([0.0, 1.0, 0.3, 1.0])
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  direct = np.sum(np.asarray(x) * np.log(p) + (1 - np.asarray(x)) * np.log(1 - p))
  assert float(vj.bernoulli_log_likelihood(logits, x)) == pytest.approx(direct, rel=1e-5)
  # Extreme logits: finite, and equal to the limits (log sigmoid(-200) = -200).
  big = jnp.array([200.0, -200.0, 200.0, -200.0])
  xb = jnp.array([1.0, 0.0, 0.0, 1.0])
  ll = float(vj.bernoulli_log_likelihood(big, xb))
  assert np.isfinite(ll) and ll == pytest.approx(-400.0, rel=1e-6)
  g = jax.grad(lambda logits: vj.bernoulli_log_likelihood(logits, xb))(big)
  assert np.all(np.isfinite(g))


def test_softplus_matches_jax_and_its_derivative_is_sigmoid():
  from vae_jax.objectives import softplus

  x = jnp.concatenate([jnp.linspace(-120.0, 120.0, 20001), jnp.array([0.0, -jnp.inf, jnp.inf])])
  np.testing.assert_allclose(jax.jit(softplus)(x), jax.nn.softplus(x), rtol=1e-6, atol=1e-7)
  g = jax.jit(jax.vmap(jax.grad(softplus)))(x)
  np.testing.assert_allclose(g, jax.nn.sigmoid(x), rtol=1e-6, atol=1e-7)
  assert float(jax.grad(softplus)(0.0)) == 0.5
  # One exponential per pixel for the value and the derivative together.
  jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda x: jnp.sum(softplus(x))))(x[:8])
  assert str(jaxpr).count(" exp ") == 1


def tiny_vae():
  vae = vj.make_vae("mlp", latent_dim=4, hidden=32)
  params = vj.init_vae(vae, jax.random.key(0), 4)
  return vae, params


def test_shapes_and_parameter_counts():
  vae = vj.make_vae("mlp", 20, 400)
  params = jax.eval_shape(lambda: vj.init_vae(vae, jax.random.key(0), 20))
  # PyTorch seed: fc1 784*400+400, fc_mu/fc_logvar 2*(400*20+20), fc3 20*400+400, fc4 400*784+784.
  assert sum(x.size for x in jax.tree.leaves(params)) == 652_824
  conv = vj.make_vae("conv", 8, 64)
  params = vj.init_vae(conv, jax.random.key(0), 8)
  enc, dec = vj.vae_fns(conv, params)
  m, lv = enc(jnp.zeros((3, 28, 28, 1)))
  assert m.shape == lv.shape == (3, 8) and dec(m).shape == (3, 784)


def test_mean_and_logvar_heads_are_one_product_with_the_seed_layers_parameters():
  """The MLP encoder's two heads share one GEMM, with the parameters (names,
  shapes and initial values) that two TorchDense layers would have."""
  import flax.linen as nn

  from vae_jax import models

  class TwoDenseHeads(nn.Module):  # the seed's layout: fc1, then fc_mu and fc_logvar
    @nn.compact
    def __call__(self, x):
      h = nn.relu(models.TorchDense(32, name="fc1")(x.reshape(x.shape[0], -1)))
      return models.TorchDense(4, name="fc_mu")(h), models.TorchDense(4, name="fc_logvar")(h)

  enc = vj.make_vae("mlp", latent_dim=4, hidden=32).encoder
  x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
  params = enc.init(jax.random.key(0), x)
  seed = TwoDenseHeads().init(jax.random.key(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(seed)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(seed)))
  for a, b in zip(enc.apply(params, x), TwoDenseHeads().apply(seed, x)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  jaxpr = jax.make_jaxpr(lambda p: jax.grad(lambda p: sum(map(jnp.sum, enc.apply(p, x))))(p))
  # fc1, the heads; the heads' weight and input gradients; fc1's weight gradient (8 with two
  # heads), as XLA's products or as MKL's (nnbase.blas)
  with blas.forced(False):
    assert str(jaxpr(params)).count("dot_general") == 5
  if blas._load()[0]:
    with blas.forced(True):
      # (a loss whose output gradient is not all ones, which XLA folds into sums)
      grad = jax.jit(jax.grad(lambda p: sum(jnp.sum(jnp.sin(y)) for y in enc.apply(p, x))))
      assert grad.lower(params).compile().as_text().count(f'"{blas.TARGET}"') == 5


@pytest.mark.parametrize("model,likelihood", [("mlp", "bernoulli"), ("conv", "gaussian")])
def test_batch_loss_is_the_vmapped_per_example_elbo(model, likelihood):
  """batch_loss runs the networks on the whole batch, but example i must draw
  its z with key split(rng, B)[i], exactly as vmapping elbo_terms does."""
  vae = vj.make_vae(model, 8, 64)
  params = vj.init_vae(vae, jax.random.key(0), 8)
  enc, dec = vj.vae_fns(vae, params)
  x = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1))
  rng = jax.random.key(2)
  loss, aux = jax.jit(lambda x: vj.batch_loss(enc, dec, rng, x, 0.5, likelihood))(x)
  rec, kl = jax.vmap(lambda r, xi: vj.elbo_terms(enc, dec, r, xi, likelihood))(
    jax.random.split(rng, 5), x
  )
  np.testing.assert_allclose(aux["rec"], jnp.mean(-rec), rtol=1e-5)
  np.testing.assert_allclose(aux["kl"], jnp.mean(kl), rtol=1e-5)
  np.testing.assert_allclose(loss, jnp.mean(-rec + 0.5 * kl), rtol=1e-5)


def test_iwae_k1_equals_elbo_in_expectation_and_grows_with_k():
  vae, params = tiny_vae()
  enc, dec = vj.vae_fns(vae, params)
  x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
  # ELBO estimated with many single samples vs the k=1 bound averaged likewise.
  reps = 1000
  elbo = jax.vmap(lambda r: -vj.batch_loss(enc, dec, r, x)[1]["elbo_loss"])(
    jax.random.split(jax.random.key(2), reps)
  )
  iw1 = jax.vmap(lambda r: vj.iwae_bound(enc, dec, r, x, 1).mean())(
    jax.random.split(jax.random.key(3), reps)
  )
  stderr = math.sqrt(float(elbo.var() + iw1.var()) / reps)
  assert abs(float(iw1.mean()) - float(elbo.mean())) < 4 * stderr, (iw1.mean(), elbo.mean(), stderr)
  # The bound grows with k in expectation: average each over 16 keys.
  keys = jax.random.split(jax.random.key(4), 16)
  b = [
    float(jax.vmap(lambda r, k=k: vj.iwae_bound(enc, dec, r, x, k, chunk=50).mean())(keys).mean())
    for k in (1, 10, 100)
  ]
  assert b[0] < b[1] < b[2], b


def test_iwae_chunking_gives_same_bound():
  """The chunk is a memory knob: the same key gives the same bound for any chunk."""
  vae, params = tiny_vae()
  enc, dec = vj.vae_fns(vae, params)
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  key = jax.random.key(4)
  whole = vj.iwae_bound(enc, dec, key, x, 40, chunk=40)
  assert whole.shape == (4,) and np.all(np.isfinite(whole))
  for chunk in (10, 7, 1):  # 7 does not divide 40: chunks of gcd(40, 7) = 1
    bound = jax.jit(lambda x, c=chunk: vj.iwae_bound(enc, dec, key, x, 40, chunk=c))(x)
    np.testing.assert_allclose(bound, whole, rtol=1e-5, err_msg=f"chunk {chunk}")
  with pytest.raises(ValueError, match="chunk"):
    vj.iwae_bound(enc, dec, jax.random.key(4), x, 40, chunk=0)


def test_train_epoch_lowers_loss():
  vae = vj.make_vae("mlp", latent_dim=4, hidden=32)
  tx = optax.adam(3e-3)
  state = vj.create_state(jax.random.key(0), vae, tx, 4)
  imgs = (jax.random.uniform(jax.random.key(1), (256, 28, 28, 1)) > 0.7).astype(jnp.uint8) * 255
  ep = jax.jit(vj.make_train_epoch(vae, tx, base_rng=jax.random.key(2), batch_size=32))
  ev = jax.jit(vj.make_evaluate(vae, batch_size=64))
  before = float(ev(state.params, imgs, jax.random.key(3))["loss"])
  for e in range(5):
    state, m = ep(state, imgs, e)
  after = float(ev(state.params, imgs, jax.random.key(3))["loss"])
  assert int(state.step) == 5 * 8
  assert after < before - 50, (before, after)


@pytest.mark.parametrize("binarization", ["none", "dynamic"])
def test_train_epoch_is_its_steps_with_per_step_keys(binarization):
  """The epoch draws its z noise before the scan; it must be the noise each
  step draws from its own key: the same parameters as a loop of
  `batch_loss` steps keyed fold_in(step_rng, step), from a resumed step."""
  vae = vj.make_vae("mlp", latent_dim=3, hidden=16)
  tx = optax.adam(1e-2)
  base = jax.random.key(2)
  state = vj.create_state(jax.random.key(0), vae, tx, 3).replace(step=jnp.array(7, jnp.int32))
  imgs = jax.random.randint(jax.random.key(1), (40, 28, 28, 1), 0, 256).astype(jnp.uint8)
  ep = vj.make_train_epoch(vae, tx, base_rng=base, batch_size=8, binarization=binarization)
  got, _ = jax.jit(ep)(state, imgs, 3)

  shuffle_rng, step_rng = jax.random.split(base)
  perm = jax.random.permutation(jax.random.fold_in(shuffle_rng, 3), 40).reshape(5, 8)

  @jax.jit
  def one(params, opt_state, step, x_u8):
    rng = jax.random.fold_in(step_rng, step)
    if binarization == "dynamic":
      bin_rng, rng = jax.random.split(rng)
      x = vj.train.binarize(bin_rng, x_u8)
    else:
      x = vj.train.to_unit(x_u8)
    loss = lambda p: vj.batch_loss(*vj.vae_fns(vae, p), rng, x)[0]
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = state.params, state.opt_state
  for i in range(5):
    params, opt_state = one(params, opt_state, 7 + i, imgs[perm[i]])
  assert int(got.step) == 12
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 3])
def test_train_epoch_counts_a_non_finite_update(steps):
  """The loss is checked every step; an update that makes the parameters
  non-finite must be counted too, also when it is the epoch's last (its loss
  was still finite)."""
  vae = vj.make_vae("mlp", 4, 16)
  nan_updates = optax.GradientTransformation(
    lambda p: optax.EmptyState(), lambda u, s, p=None: (jax.tree.map(lambda g: g * jnp.nan, u), s)
  )
  state = vj.create_state(jax.random.key(0), vae, nan_updates, 4)
  epoch = jax.jit(vj.make_train_epoch(vae, nan_updates, base_rng=jax.random.key(1), batch_size=4))
  images = jnp.full((4 * steps, 28, 28, 1), 128, jnp.uint8)
  _, m = epoch(state, images, 0)
  assert int(m["nonfinite_steps"]) == max(steps - 1, 1)


def test_sampling_helpers():
  vae, params = tiny_vae()
  enc, dec = vj.vae_fns(vae, params)
  s = vj.sample_prior(dec, jax.random.key(0), 5, 4)
  assert s.shape == (5, 28, 28, 1) and float(s.min()) >= 0 and float(s.max()) <= 1
  r = vj.reconstruct(enc, dec, jnp.zeros((2, 28, 28, 1)))
  assert r.shape == (2, 28, 28, 1)
  path = vj.interpolate(dec, jnp.zeros(4), jnp.ones(4), 7)
  assert path.shape == (7, 28, 28, 1)
  np.testing.assert_allclose(path[0], vj.decode_grid(dec, jnp.zeros((1, 4)))[0], atol=1e-6)


def test_dynamic_binarization_draws_bernoulli_pixels():
  images = jnp.asarray(np.array([0, 64, 128, 255] * 2500, np.uint8).reshape(100, 10, 10, 1))
  x = vj.train.binarize(jax.random.key(0), images)
  assert set(np.unique(np.asarray(x)).tolist()) <= {0.0, 1.0}
  p = np.asarray(x).reshape(-1, 4).mean(0)
  np.testing.assert_allclose(p, [0, 64 / 255, 128 / 255, 1], atol=0.03)
  u8 = vj.train.binarize_u8(jax.random.key(0), images)
  assert u8.dtype == jnp.uint8 and set(np.unique(np.asarray(u8)).tolist()) <= {0, 255}
  with pytest.raises(ValueError, match="binarization"):
    vj.make_train_epoch(None, None, base_rng=jax.random.key(0), batch_size=2, binarization="x")


def test_images_in_float_are_refused_not_scaled_a_second_time():
  """The epoch and evaluation take uint8 pixels; float images already in [0, 1]
  would be divided by 255 again and train on near-black digits."""
  from nnbase import pixels

  vae = vj.make_vae("mlp", latent_dim=4, hidden=16)
  tx = optax.adam(1e-3)
  state = vj.create_state(jax.random.key(0), vae, tx, 4)
  unit = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
  epoch = jax.jit(vj.make_train_epoch(vae, tx, base_rng=jax.random.key(2), batch_size=4))
  with pytest.raises(ValueError, match="uint8"):
    epoch(state, unit, 0)
  with pytest.raises(ValueError, match="uint8"):
    vj.make_evaluate(vae, batch_size=4)(state.params, unit, jax.random.key(3))
  with pytest.raises(ValueError, match="uint8"):
    pixels.u8_to_signed(unit)
  u8 = (unit * 255).astype(jnp.uint8)
  np.testing.assert_allclose(pixels.u8_to_unit(u8), u8 / 255.0, rtol=1e-6)
  assert np.isfinite(float(epoch(state, u8, 0)[1]["loss"]))
