"""The variational bound in bits/dim, against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

import ddpm_jax as dj
from ddpm_jax import likelihood as lk

LEVELS = jnp.arange(256) / 127.5 - 1.0  # the 256-level grid of [-1, 1]


@pytest.mark.parametrize(
  "mean,log_scale", [(0.0, 0.0), (0.3, -3.0), (-0.98, -5.0), (0.5, -8.0), (1.7, -2.0), (-1.0, -4.6)]
)
def test_discretized_gaussian_is_a_distribution_over_the_levels(mean, log_scale):
  logp = lk.discretized_gaussian_log_likelihood(LEVELS, mean, log_scale)
  assert bool(jnp.all(jnp.isfinite(logp)))
  assert float(jnp.sum(jnp.exp(logp))) == pytest.approx(1.0, abs=1e-5)
  # An interior bin against the normal CDF.
  x, s = float(LEVELS[100]), math.exp(log_scale)
  want = norm.cdf((x - mean + 1 / 255) / s) - norm.cdf((x - mean - 1 / 255) / s)
  if want > 1e-30:
    assert float(logp[100]) == pytest.approx(math.log(want), rel=1e-3, abs=1e-4)


def test_normal_kl():
  assert float(lk.normal_kl(0.3, -1.0, 0.3, -1.0)) == pytest.approx(0.0, abs=1e-7)
  m1, v1, m2, v2 = 0.2, 0.5, -0.1, 2.0
  want = 0.5 * (math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
  got = lk.normal_kl(m1, math.log(v1), m2, math.log(v2))
  assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_vlb_of_a_point_mass_with_its_exact_eps(variance):
  """Data = one fixed image c: E[eps | x_t] = (x_t - sqrt(ab) c) / sqrt(1 - ab) exactly,
  so the reverse mean equals the posterior mean and every term has a closed form."""
  s = dj.make_schedule("linear", 100, beta_start=1e-3, beta_end=0.05)
  c = LEVELS[jnp.array([0, 100, 153, 255])].reshape(1, 2, 2, 1)
  x0 = jnp.tile(c, (3, 1, 1, 1))

  def eps_fn(x, t):
    ab = dj.extract(s.alphas_cumprod, t, x.shape)
    return (x - jnp.sqrt(ab) * c) / jnp.sqrt(1 - ab)

  out = jax.jit(lambda r: lk.vlb_terms(eps_fn, s, r, x0, variance))(jax.random.key(0))
  betas, pv = np.asarray(s.betas, np.float64), np.asarray(s.posterior_variance, np.float64)
  ab = np.asarray(s.alphas_cumprod, np.float64)
  d = 4
  # KL terms: only the variance differs.
  model_var = pv if variance == "beta_tilde" else betas
  want_kl = d * 0.5 * (np.log(model_var[1:] / pv[1:]) + pv[1:] / model_var[1:] - 1)
  np.testing.assert_allclose(
    out["terms"][1:], np.tile(want_kl[:, None], (1, 3)), rtol=1e-3, atol=2e-5
  )
  # Decoder: N(c, pv[1]) integrated over c's bin (edge bins take the tails).
  sd, h = math.sqrt(pv[1]), 1 / 255
  p_mid = norm.cdf(h / sd) - norm.cdf(-h / sd)
  p_edge = norm.cdf(h / sd)
  want_nll = -(2 * math.log(p_edge) + 2 * math.log(p_mid))
  np.testing.assert_allclose(out["terms"][0], want_nll, rtol=1e-4)
  # Prior: KL(N(sqrt(ab_T) c, 1 - ab_T) || N(0, 1)).
  cc = np.asarray(c, np.float64).ravel()
  want_prior = np.sum(0.5 * (-np.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * cc**2 - 1))
  np.testing.assert_allclose(out["prior"], want_prior, rtol=1e-4)
  total = want_prior + want_nll + want_kl.sum()
  np.testing.assert_allclose(out["total"], total, rtol=1e-4)
  np.testing.assert_allclose(out["bits_per_dim"], total / (d * math.log(2)), rtol=1e-4)


def test_vlb_rewards_the_right_model():
  """Gaussian-ish data: the exact eps of a point mass at the data scores better
  than a model that predicts zero noise."""
  s = dj.make_schedule("linear", 50, beta_start=1e-3, beta_end=0.1)
  c = LEVELS[jnp.array([30, 200, 128, 77])].reshape(1, 2, 2, 1)
  good = lambda x, t: (
    (x - jnp.sqrt(dj.extract(s.alphas_cumprod, t, x.shape)) * c)
    / jnp.sqrt(1 - dj.extract(s.alphas_cumprod, t, x.shape))
  )
  bad = lambda x, t: jnp.zeros_like(x)
  bpd = lambda f: float(lk.vlb_terms(f, s, jax.random.key(1), c, "beta")["bits_per_dim"][0])
  assert bpd(good) < bpd(bad)
  with pytest.raises(ValueError, match="variance"):
    lk.vlb_terms(good, s, jax.random.key(1), c, "learned")
  with pytest.raises(ValueError, match="got uint8"):  # pixels 0..255 scored as [-1, 1]
    lk.vlb_terms(good, s, jax.random.key(1), jnp.zeros((1, 2, 2, 1), jnp.uint8))
  with pytest.raises(ValueError, match="shaped like x_t"):
    lk.vlb_terms(lambda x, t: x[..., 0], s, jax.random.key(1), c)
