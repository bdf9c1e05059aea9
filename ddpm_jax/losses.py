"""Training losses for eps-prediction DDPM."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import q_sample
from ddpm_jax.schedules import Schedule

LOSS_TYPES = ("mse", "l1")

# eps_model(params, x_t [B,H,W,C], t [B] int, rng) -> eps [B,H,W,C]
EpsModel = Callable[..., jnp.ndarray]


def elementwise_loss(pred: jnp.ndarray, target: jnp.ndarray, loss_type: str) -> jnp.ndarray:
  """Per-example loss, mean over all non-batch axes: [B, ...] -> [B]."""
  if loss_type == "mse":
    err = jnp.square(pred - target)
  elif loss_type == "l1":
    err = jnp.abs(pred - target)
  else:
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
  return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def eps_loss(eps_model: EpsModel, params, schedule: Schedule, rng: jax.Array,
             x0: jnp.ndarray, loss_type: str = "mse") -> jnp.ndarray:
  """The simplified DDPM objective E_{t, eps} |eps - eps_theta(x_t, t)|^2.

  t ~ Uniform{0, ..., T-1} per example and eps ~ N(0, I) are drawn from `rng`.

  Args:
    eps_model: (params, x_t, t, rng) -> predicted eps.
    params: model parameters.
    schedule: the noise schedule.
    rng: PRNG key.
    x0: [B, H, W, C] clean images.
    loss_type: "mse" (the seeds' default) or "l1".

  Returns:
    Scalar mean loss over the batch.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
  t_rng, n_rng, m_rng = jax.random.split(rng, 3)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
  x_t = q_sample(schedule, x0, t, noise)
  eps = eps_model(params, x_t, t, m_rng)
  return jnp.mean(elementwise_loss(eps.astype(jnp.float32), noise, loss_type))
