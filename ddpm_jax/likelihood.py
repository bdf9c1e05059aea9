"""The DDPM variational bound on -log p(x0) for discrete images (Ho et al. 2020, eq. 5).

    L = L_T + sum_{t>=1} L_{t-1} + L_0      (nats per image)
    L_T     = KL(q(x_T | x0) || N(0, I))                      (the prior term)
    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)),   x_t ~ q(x_t | x0)
    L_0     = -log p(x0 | x_1)                                 (the decoder)

In this package's 0-based time, term t >= 1 is the KL at step t and term 0 is
the decoder: a Gaussian with the reverse mean at t = 0, integrated over the
bin of width 2/255 around each pixel value (the edge bins extend to
infinity), so images in [-1, 1] with 256 levels get a proper discrete
likelihood. Bits per dimension = L / (D ln 2).

The reverse variance is fixed, as in training with L_simple: "beta" (sigma^2
= beta_t, with beta_tilde_1 at t = 0 as in the DDPM code) or "beta_tilde"
(the posterior variance, clipped at t = 0).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from ddpm_jax.diffusion import extract, p_mean_from_eps, q_posterior_mean_variance, q_sample
from ddpm_jax.eps_fns import call_eps_fn
from ddpm_jax.schedules import Schedule

VARIANCES = ("beta", "beta_tilde")
BIN_HALF_WIDTH = 1.0 / 255.0  # half the spacing of 256 levels on [-1, 1]


def normal_kl(
  mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def _log_sub_exp(a, b):
  """log(exp(a) - exp(b)) for a > b, accurate when they are close."""
  return a + jnp.log(-jnp.expm1(jnp.minimum(b - a, -1e-30)))


def discretized_gaussian_log_likelihood(
  x: jax.Array, mean: jax.Array, log_scale: jax.Array
) -> jax.Array:
  """log P(x) for x on the 256-level grid of [-1, 1] under N(mean, exp(log_scale)^2)
  integrated over x's bin; the bins at -1 and 1 take the tails. Elementwise."""
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (x - mean + BIN_HALF_WIDTH)
  lower = inv_std * (x - mean - BIN_HALF_WIDTH)
  log_cdf_upper = norm.logcdf(upper)
  log_sf_lower = norm.logcdf(-lower)
  # log(Phi(upper) - Phi(lower)), on the side of the mean where it is accurate.
  mid = jnp.where(
    lower > 0,
    _log_sub_exp(log_sf_lower, norm.logcdf(-upper)),
    _log_sub_exp(log_cdf_upper, norm.logcdf(lower)),
  )
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, mid))


def model_log_variance(
  schedule: Schedule, t: jnp.ndarray, variance: str, shape: Sequence[int]
) -> jnp.ndarray:
  """log sigma_t^2 of the fixed-variance reverse step, broadcast to [B, 1, ...]."""
  if variance not in VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
  if variance == "beta_tilde":
    return extract(schedule.posterior_log_variance_clipped, t, shape)
  log_var = jnp.log(schedule.betas).at[0].set(schedule.posterior_log_variance_clipped[0])
  return extract(log_var, t, shape)


def prior_kl(schedule: Schedule, x0: jnp.ndarray) -> jnp.ndarray:
  """L_T = KL(q(x_T | x0) || N(0, I)) per image [B], in nats."""
  t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1)
  mean = extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
  log_var = jnp.log1p(-extract(schedule.alphas_cumprod, t, x0.shape))
  kl = normal_kl(mean, log_var, 0.0, 0.0)
  return jnp.sum(kl.reshape(x0.shape[0], -1), axis=1)


def vlb_terms(
  eps_fn: Callable, schedule: Schedule, rng: jax.Array, x0: jnp.ndarray, variance: str = "beta"
) -> dict:
  """Every term of the bound for a batch, one compiled scan over t = 0..T-1.

  Args:
    eps_fn: (x_t [B,H,W,C], t [B]) -> eps, as the samplers take.
    schedule: the noise schedule the model was trained with.
    rng: key; x_t ~ q(x_t | x0) uses fold_in(rng, t).
    x0: [B, H, W, C] images on the 256-level grid of [-1, 1]
      (uint8 / 127.5 - 1).
    variance: the reverse variance, "beta" or "beta_tilde".

  Returns:
    {"prior": [B] L_T, "terms": [T, B] (row 0 the decoder NLL L_0, row t the
    KL at step t), "total": [B] nats, "bits_per_dim": [B]}.
  """
  if variance not in VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
  if not jnp.issubdtype(x0.dtype, jnp.floating):
    raise ValueError(
      f"x0 must be floats on the grid of [-1, 1] (uint8 / 127.5 - 1), got {x0.dtype}"
    )
  x0 = x0.astype(jnp.float32)
  b = x0.shape[0]
  flat_sum = lambda a: jnp.sum(a.reshape(b, -1), axis=1)

  def term(_, t):
    tb = jnp.full((b,), t)
    noise = jax.random.normal(jax.random.fold_in(rng, t), x0.shape, jnp.float32)
    x_t = q_sample(schedule, x0, tb, noise)
    eps = call_eps_fn(eps_fn, x_t, tb)
    mean = p_mean_from_eps(schedule, x_t, tb, eps)
    log_var = model_log_variance(schedule, tb, variance, x0.shape)
    q_mean, _, q_log_var = q_posterior_mean_variance(schedule, x0, x_t, tb)
    kl = flat_sum(normal_kl(q_mean, q_log_var, mean, log_var))
    nll = -flat_sum(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var))
    return None, jnp.where(t == 0, nll, kl)

  _, terms = jax.lax.scan(term, None, jnp.arange(schedule.num_timesteps))
  prior = prior_kl(schedule, x0)
  total = prior + jnp.sum(terms, axis=0)
  dims = math.prod(x0.shape[1:])
  return {
    "prior": prior,
    "terms": terms,
    "total": total,
    "bits_per_dim": total / (dims * math.log(2.0)),
  }
