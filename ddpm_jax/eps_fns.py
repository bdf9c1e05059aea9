"""Everything that becomes an `eps_fn(x_t, t) -> eps`, the samplers' one input.

* `model_eps_fn`: a U-Net and its params (eps prediction).
* `eps_fn_from_model`: any `model_fn(x_t, t)` predicting eps, x0 or v.
* `model_cond_eps_fn`: a class-conditional U-Net as `cond_eps_fn(x_t, t, y)`,
  for `guidance.classifier_free_eps_fn`.
* `gaussian_eps_fn`: the exact eps of N(mu, sd^2) data, a known answer for
  checking samplers.
* `call_eps_fn`: how the samplers and the bound call an eps_fn (its output's
  shape checked).

Shapes: x_t [B, H, W, C], t [B] int32, y [B] int, eps like x_t.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import extract
from ddpm_jax.parameterization import check_parameterization, to_eps
from ddpm_jax.schedules import Schedule

CondEpsFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def call_eps_fn(eps_fn: Callable, x_t: jax.Array, t: jax.Array) -> jax.Array:
  """eps_fn(x_t, t) in float32, for the samplers and the bound: a ValueError
  when it is not shaped like x_t (checked while tracing: free per step)."""
  eps = eps_fn(x_t, t)
  if getattr(eps, "shape", None) != x_t.shape:
    got = tuple(eps.shape) if hasattr(eps, "shape") else type(eps).__name__
    raise ValueError(
      f"eps_fn(x_t, t) must return an array shaped like x_t {tuple(x_t.shape)}, got {got}"
    )
  return eps.astype(jnp.float32)


def model_eps_fn(
  model: nn.Module,
  params: Any,
  *,
  labels: Optional[jax.Array] = None,
  train: bool = False,
  rng: jax.Array = None,
) -> Callable:
  """Wraps a U-Net and its params into `eps_fn(x_t, t) -> eps` for the samplers.

  labels: for a class-conditional U-Net, the class of each image [B] (the
  null label `model.num_classes` for unconditional samples); None: the
  unconditional net, or the null label for a conditional one. For
  classifier-free guidance use `guidance.classifier_free_eps_fn`.
  """
  rngs = {"dropout": rng} if (train and rng is not None) else None
  extra = {} if labels is None else {"y": labels}
  return lambda x_t, t: model.apply({"params": params}, x_t, t, train=train, rngs=rngs, **extra)


def eps_fn_from_model(model_fn: Callable, schedule: Schedule, parameterization: str) -> Callable:
  """Wraps `model_fn(x_t, t)`, which predicts eps, x0 or v, into the
  `eps_fn(x_t, t)` every sampler takes."""
  check_parameterization(parameterization)
  if parameterization == "eps":
    return model_fn

  def eps_fn(x_t, t):
    pred = model_fn(x_t, t).astype(jnp.float32)
    return to_eps(schedule, x_t.astype(jnp.float32), t, pred, parameterization)

  return eps_fn


def model_cond_eps_fn(
  model: nn.Module, params: Any, schedule: Schedule, parameterization: str = "eps"
) -> CondEpsFn:
  """A class-conditional U-Net (eps, x0 or v prediction) as `cond_eps_fn(x_t, t, y)`."""

  def cond_eps_fn(x_t, t, y):
    model_fn = lambda x, s: model.apply({"params": params}, x, s, y=y)
    return eps_fn_from_model(model_fn, schedule, parameterization)(x_t, t)

  return cond_eps_fn


def gaussian_eps_fn(schedule: Schedule, mu: float, sd: float) -> Callable:
  """E[eps | x_t] when x0 ~ N(mu, sd^2) independently per pixel (closed form)."""

  def eps_fn(x, t):
    ab = extract(schedule.alphas_cumprod, t, x.shape)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * sd**2 + 1 - ab)

  return eps_fn
