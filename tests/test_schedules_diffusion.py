import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax as dj


@pytest.mark.parametrize("T", [1, 10, 1000])
def test_linear_schedule_closed_form(T):
  s = dj.make_schedule("linear", T)
  betas = np.linspace(1e-4, 0.02, T)
  ab = np.cumprod(1 - betas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-5)
  np.testing.assert_allclose(s.alphas_cumprod_prev, ab_prev, rtol=1e-5)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod, np.sqrt(ab), rtol=1e-5)
  np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ab), rtol=1e-5)
  np.testing.assert_allclose(
    s.posterior_variance, betas * (1 - ab_prev) / (1 - ab), rtol=1e-5, atol=1e-12
  )
  assert s.posterior_variance[0] == 0.0
  assert np.all(np.isfinite(s.posterior_log_variance_clipped))
  if T > 1:
    assert s.posterior_log_variance_clipped[0] == pytest.approx(
      math.log(float(s.posterior_variance[1])), rel=1e-5
    )
  assert s.num_timesteps == T and s.betas.dtype == jnp.float32


def test_cosine_schedule_closed_form():
  T, s_ = 1000, 0.008
  s = dj.make_schedule("cosine", T)
  f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2
  for t in [0, 10, 500, 900]:
    assert float(s.alphas_cumprod[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-4, abs=1e-7)
  assert float(s.betas.max()) <= 0.999 + 1e-6
  assert float(s.betas[-1]) == pytest.approx(0.999, rel=1e-6)  # clipped at the end


def test_schedule_is_pytree_and_jittable():
  s = dj.make_schedule("linear", 20)
  leaves = jax.tree.leaves(s)
  assert all(leaf.shape == (20,) for leaf in leaves)
  out = jax.jit(lambda sch: sch.alphas_cumprod[-1])(s)
  assert float(out) == pytest.approx(float(s.alphas_cumprod[-1]))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(kind="sigmoidal"), "unknown schedule kind 'sigmoidal'"),
    (dict(kind="linear", num_timesteps=0), "num_timesteps must be an integer >= 1, got 0"),
    (dict(kind="linear", beta_end=1.5), "beta_end must lie in \\(0, 1\\), got 1.5"),
    (dict(kind="linear", beta_start=0.0), "beta_start must lie in"),
    (dict(kind="cosine", beta_start=0.1), "unknown option"),
  ],
)
def test_schedule_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dj.make_schedule(**kwargs)


def test_schedule_from_betas_rejects_out_of_range():
  with pytest.raises(ValueError, match="open interval"):
    dj.schedule_from_betas(np.array([0.1, 1.0]))


def test_q_sample_formula_and_statistics(key):
  s = dj.make_schedule("linear", 1000)
  x0 = jnp.full((4, 3, 3, 1), 0.7)
  t = jnp.array([0, 10, 500, 999])
  noise = jax.random.normal(key, x0.shape)
  x_t = jax.jit(dj.q_sample)(s, x0, t, noise)
  ab = np.asarray(s.alphas_cumprod)[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(
    x_t, np.sqrt(ab) * 0.7 + np.sqrt(1 - ab) * np.asarray(noise), rtol=1e-5, atol=1e-6
  )

  # Statistics over many noise draws at one t.
  n = 20000
  x0 = jnp.full((n, 1, 1, 1), 0.5)
  tt = jnp.full((n,), 300)
  xs = dj.q_sample(s, x0, tt, jax.random.normal(jax.random.key(1), x0.shape))
  ab = float(s.alphas_cumprod[300])
  assert float(xs.mean()) == pytest.approx(math.sqrt(ab) * 0.5, abs=0.02)
  assert float(xs.var()) == pytest.approx(1 - ab, rel=0.05)


def test_posterior_mean_three_ways(key):
  """Seed tutorial 3.3: the posterior mean from x0, from an exact x0
  prediction and from an exact eps prediction all agree."""
  s = dj.make_schedule("linear", 1000)
  k1, k2 = jax.random.split(key)
  x0 = jax.random.normal(k1, (4, 8, 8, 3))
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([1, 250, 500, 999])
  x_t = dj.q_sample(s, x0, t, eps)
  mu_true, var, _ = dj.q_posterior_mean_variance(s, x0, x_t, t)
  x0_from_eps = dj.predict_x0_from_eps(s, x_t, t, eps)
  mu_eps, _, _ = dj.q_posterior_mean_variance(s, x0_from_eps, x_t, t)
  mu_direct = dj.p_mean_from_eps(s, x_t, t, eps)
  # Closed form written out with numpy in float64.
  b = np.asarray(s.betas, np.float64)
  ab = np.cumprod(1 - b)
  ti = np.asarray(t)
  abp = np.where(ti > 0, ab[ti - 1], 1.0)[:, None, None, None]
  a_t = (1 - b[ti])[:, None, None, None]
  ab_t = ab[ti][:, None, None, None]
  mu_np = (
    np.sqrt(abp) * b[ti][:, None, None, None] * np.asarray(x0, np.float64)
    + np.sqrt(a_t) * (1 - abp) * np.asarray(x_t, np.float64)
  ) / (1 - ab_t)
  np.testing.assert_allclose(mu_true, mu_np, atol=1e-4)
  np.testing.assert_allclose(mu_eps, mu_true, atol=1e-3)
  np.testing.assert_allclose(mu_direct, mu_true, atol=1e-3)
  np.testing.assert_allclose(
    var[:, 0, 0, 0], b[ti] * (1 - abp[:, 0, 0, 0]) / (1 - ab[ti]), rtol=1e-4
  )


def test_eps_x0_conversions_round_trip(key):
  s = dj.make_schedule("cosine", 100)
  x_t = jax.random.normal(key, (3, 4, 4, 1))
  eps = jax.random.normal(jax.random.key(5), x_t.shape)
  t = jnp.array([0, 40, 90])
  x0 = dj.predict_x0_from_eps(s, x_t, t, eps)
  np.testing.assert_allclose(dj.predict_eps_from_x0(s, x_t, t, x0), eps, atol=2e-4)
