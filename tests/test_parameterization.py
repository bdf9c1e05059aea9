"""eps / x0 / v conversions, targets, loss weights against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax as dj
from ddpm_jax import parameterization as P


@pytest.fixture(scope="module")
def setup():
  s = dj.make_schedule("cosine", 100)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (6, 4, 4, 1))
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 30, 50, 98, 99])
  return s, x0, eps, t, dj.q_sample(s, x0, t, eps)


def test_targets_and_conversions_round_trip(setup):
  s, x0, eps, t, x_t = setup
  ab = np.asarray(s.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1)
  v = P.target(s, x0, t, eps, "v")
  np.testing.assert_allclose(v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, atol=1e-6)
  truth = {"eps": eps, "x0": x0, "v": v}
  for kind, pred in truth.items():
    np.testing.assert_array_equal(P.target(s, x0, t, eps, kind), pred)
    for conv, want in [(P.to_eps, eps), (P.to_x0, x0), (P.to_v, v)]:
      # x0 from eps divides by sqrt(ab) ~ 1e-2 at t = T-1: relative tolerance.
      np.testing.assert_allclose(conv(s, x_t, t, pred, kind), want, rtol=2e-3, atol=2e-3)
  with pytest.raises(ValueError, match="unknown parameterization"):
    P.to_eps(s, x_t, t, eps, "score")


def test_eps_fn_from_model_gives_eps(setup):
  s, x0, eps, t, x_t = setup
  for kind in dj.parameterization.PARAMETERIZATIONS:
    pred = P.target(s, x0, t, eps, kind)
    eps_fn = dj.eps_fn_from_model(lambda x, tt, pred=pred: pred, s, kind)
    np.testing.assert_allclose(eps_fn(x_t, t), eps, rtol=2e-3, atol=2e-3)


def test_loss_weights_match_their_formulas(setup):
  s, _, _, t, _ = setup
  ab = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)]
  snr = ab / (1 - ab)
  np.testing.assert_allclose(dj.snr(s, t), snr, rtol=1e-4)
  g = 5.0
  expect = {
    "eps": np.minimum(snr, g) / snr,
    "x0": np.minimum(snr, g),
    "v": np.minimum(snr, g) / (snr + 1),
  }
  for kind, w in expect.items():
    np.testing.assert_allclose(dj.loss_weight(s, t, kind, "min_snr"), w, rtol=1e-4)
    np.testing.assert_array_equal(dj.loss_weight(s, t, kind, "none"), np.ones(6))
  p2 = 1 / (1 + snr) ** 0.5
  np.testing.assert_allclose(dj.loss_weight(s, t, "eps", "p2", p2_gamma=0.5), p2, rtol=1e-4)
  np.testing.assert_allclose(dj.loss_weight(s, t, "x0", "p2", p2_gamma=0.5), p2 * snr, rtol=1e-4)
  with pytest.raises(ValueError, match="unknown loss weighting"):
    dj.loss_weight(s, t, "eps", "snr+1")


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["none", "min_snr", "p2"])
def test_diffusion_loss_is_zero_for_the_exact_target_only(kind, weighting):
  """A 'model' that knows x0 and the noise scores 0; a wrong one does not."""
  s = dj.make_schedule("linear", 50)
  x0 = jax.random.normal(jax.random.key(1), (5, 4, 4, 1))
  rng = jax.random.key(2)
  t_rng, n_rng, _ = jax.random.split(rng, 3)
  t = jax.random.randint(t_rng, (5,), 0, 50)
  noise = jax.random.normal(n_rng, x0.shape)
  exact = lambda p, x_t, tt, r: P.target(s, x0, t, noise, kind)
  loss = jax.jit(lambda: dj.diffusion_loss(exact, None, s, rng, x0, "mse", kind, weighting))()
  assert float(loss) == pytest.approx(0.0, abs=1e-10)
  wrong = lambda p, x_t, tt, r: P.target(s, x0, t, noise, kind) + 0.1
  w = dj.loss_weight(s, t, kind, weighting)
  loss = dj.diffusion_loss(wrong, None, s, rng, x0, "mse", kind, weighting)
  assert float(loss) == pytest.approx(0.01 * float(jnp.mean(w)), rel=1e-4)


def test_l1_loss_weights_use_square_roots_of_the_conversions(setup):
  """|eps err| = sqrt(SNR) |x0 err| and sqrt(SNR / (1 + SNR)) |v err|: with an
  L1 loss the weights carry the square roots of the squared-error factors."""
  s, _, _, t, _ = setup
  r = P.snr(s, t)
  w_eps = jnp.minimum(r, 5.0) / r
  for kind, c in (("eps", jnp.ones_like(r)), ("x0", r), ("v", r / (1 + r))):
    np.testing.assert_allclose(
      P.loss_weight(s, t, kind, "min_snr", loss_type="l1"), w_eps * jnp.sqrt(c), rtol=1e-5
    )
    np.testing.assert_allclose(P.loss_weight(s, t, kind, "min_snr"), w_eps * c, rtol=1e-5)
  with pytest.raises(ValueError, match="loss_type"):
    P.loss_weight(s, t, "x0", "min_snr", loss_type="huber")
