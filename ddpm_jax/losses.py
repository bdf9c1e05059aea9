"""Training losses: the DDPM objective for eps, x0 or v networks, with optional
per-timestep weighting (see `ddpm_jax.parameterization`)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import q_sample
from ddpm_jax.parameterization import loss_weight, target
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


def diffusion_loss(
  model: EpsModel,
  params: Any,
  schedule: Schedule,
  rng: jax.Array,
  x0: jnp.ndarray,
  loss_type: str = "mse",
  parameterization: str = "eps",
  weighting: str = "none",
  **weight_options,
) -> jnp.ndarray:
  """E_{t, eps} w(t) |target - model(x_t, t)|^2 (or |.| for l1).

  t ~ Uniform{0, ..., T-1} per example and eps ~ N(0, I) are drawn from `rng`;
  the target is eps, x0 or v (`parameterization`), and w(t) is
  `loss_weight(schedule, t, parameterization, weighting, **weight_options)`.

  Args:
    model: (params, x_t, t, rng) -> prediction [B, H, W, C].
    params: model parameters.
    schedule: the noise schedule.
    rng: PRNG key.
    x0: [B, H, W, C] clean images.
    loss_type: "mse" (the seeds') or "l1".
    parameterization: what the model predicts: "eps", "x0" or "v".
    weighting: "none", "min_snr" or "p2".

  Returns:
    Scalar mean weighted loss over the batch.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
  t_rng, n_rng, m_rng = jax.random.split(rng, 3)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
  x_t = q_sample(schedule, x0, t, noise)
  pred = model(params, x_t, t, m_rng)
  per_example = elementwise_loss(
    pred.astype(jnp.float32), target(schedule, x0, t, noise, parameterization), loss_type
  )
  if weighting != "none":
    per_example = per_example * loss_weight(
      schedule, t, parameterization, weighting, loss_type=loss_type, **weight_options
    )
  return jnp.mean(per_example)


def eps_loss(
  eps_model: EpsModel,
  params: Any,
  schedule: Schedule,
  rng: jax.Array,
  x0: jnp.ndarray,
  loss_type: str = "mse",
) -> jnp.ndarray:
  """The simplified DDPM objective E_{t, eps} |eps - eps_theta(x_t, t)|^2:
  `diffusion_loss` with an eps network and no weighting."""
  return diffusion_loss(eps_model, params, schedule, rng, x0, loss_type)
