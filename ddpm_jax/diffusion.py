"""Pure diffusion maths: forward process, posterior, eps <-> x0 conversions.

Shapes: images are [B, H, W, C] (any trailing shape works); `t` is an int
array [B] with values in [0, T-1]. Per-timestep coefficients are gathered
from the schedule and broadcast over the trailing axes explicitly.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

from ddpm_jax.schedules import Schedule


def extract(coef: jnp.ndarray, t: jnp.ndarray, x_shape: Sequence[int]) -> jnp.ndarray:
  """Gathers coef[t] ([T] -> [B]) and reshapes to [B, 1, ..., 1] for x_shape."""
  out = jnp.take(coef, t, axis=0)
  return out.reshape(out.shape + (1,) * (len(x_shape) - out.ndim))


def q_sample(
  schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
  """Samples x_t ~ q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I) in closed form.

  Args:
    schedule: the noise schedule.
    x0: [B, H, W, C] clean data.
    t: [B] int timesteps in [0, T-1].
    noise: [B, H, W, C] standard normal noise.

  Returns:
    x_t: [B, H, W, C].
  """
  return (
    extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
    + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
  )


def q_posterior_mean_variance(
  schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Mean and variance of q(x_{t-1} | x_t, x0).

  Returns:
    (mean [B, H, W, C], variance [B, 1, 1, 1], log_variance [B, 1, 1, 1]); the
    log-variance is clipped at t = 0 so it stays finite.
  """
  mean = (
    extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
    + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t
  )
  var = extract(schedule.posterior_variance, t, x_t.shape)
  log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
  return mean, var, log_var


def predict_x0_from_eps(
  schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray
) -> jnp.ndarray:
  """x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t). All arrays [B, H, W, C]."""
  return (
    extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
    - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
  )


def predict_eps_from_x0(
  schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, x0: jnp.ndarray
) -> jnp.ndarray:
  """eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t). All arrays [B, H, W, C]."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
    schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape
  )


def p_mean_from_eps(
  schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray
) -> jnp.ndarray:
  """The seed's direct form of the reverse mean:

  mu = (x_t - beta_t / sqrt(1 - ab_t) * eps) / sqrt(alpha_t).
  """
  beta = extract(schedule.betas, t, x_t.shape)
  return (
    x_t - beta / extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * eps
  ) / jnp.sqrt(extract(schedule.alphas, t, x_t.shape))
