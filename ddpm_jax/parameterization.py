"""What the network predicts (eps, x0 or v), conversions, targets and loss weights.

With a_t = sqrt(ab_t), s_t = sqrt(1 - ab_t) and x_t = a_t x0 + s_t eps:

  eps = (x_t - a_t x0) / s_t,   x0 = (x_t - s_t eps) / a_t,
  v   = a_t eps - s_t x0,       x0 = a_t x_t - s_t v,   eps = s_t x_t + a_t v.

SNR(t) = ab_t / (1 - ab_t). At a fixed x_t the squared errors relate as
|eps err|^2 = SNR |x0 err|^2 = SNR / (1 + SNR) |v err|^2, which is how the
weightings below are expressed for each target.

Shapes: x_t, predictions and targets are [B, ...]; t is [B] int; weights [B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import extract, predict_eps_from_x0, predict_x0_from_eps
from ddpm_jax.schedules import Schedule

PARAMETERIZATIONS = ("eps", "x0", "v")
WEIGHTINGS = ("none", "min_snr", "p2")


def check_parameterization(parameterization: str) -> None:
  """ValueError unless parameterization is one of PARAMETERIZATIONS."""
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(
      f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}"
    )


def _a_s(schedule: Schedule, t, shape):
  return (
    extract(schedule.sqrt_alphas_cumprod, t, shape),
    extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape),
  )


def snr(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
  """SNR(t) = ab_t / (1 - ab_t): [B]."""
  ab = jnp.take(schedule.alphas_cumprod, t, axis=0)
  return ab / (1.0 - ab)


def to_eps(
  schedule: Schedule, x_t: jax.Array, t: jax.Array, pred: jax.Array, parameterization: str
) -> jax.Array:
  """The eps implied by a prediction of the given kind."""
  check_parameterization(parameterization)
  if parameterization == "eps":
    return pred
  if parameterization == "x0":
    return predict_eps_from_x0(schedule, x_t, t, pred)
  a, s = _a_s(schedule, t, x_t.shape)
  return s * x_t + a * pred


def to_x0(
  schedule: Schedule, x_t: jax.Array, t: jax.Array, pred: jax.Array, parameterization: str
) -> jax.Array:
  """The x0 implied by a prediction of the given kind."""
  check_parameterization(parameterization)
  if parameterization == "x0":
    return pred
  if parameterization == "eps":
    return predict_x0_from_eps(schedule, x_t, t, pred)
  a, s = _a_s(schedule, t, x_t.shape)
  return a * x_t - s * pred


def to_v(
  schedule: Schedule, x_t: jax.Array, t: jax.Array, pred: jax.Array, parameterization: str
) -> jax.Array:
  """The v implied by a prediction of the given kind."""
  check_parameterization(parameterization)
  if parameterization == "v":
    return pred
  a, s = _a_s(schedule, t, x_t.shape)
  eps = to_eps(schedule, x_t, t, pred, parameterization)
  x0 = to_x0(schedule, x_t, t, pred, parameterization)
  return a * eps - s * x0


def target(
  schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, parameterization: str
) -> jax.Array:
  """The regression target for a network of the given kind at x_t = q_sample(x0, t, noise)."""
  check_parameterization(parameterization)
  if parameterization == "eps":
    return noise
  if parameterization == "x0":
    return x0
  a, s = _a_s(schedule, t, x0.shape)
  return a * noise - s * x0


def loss_weight(
  schedule: Schedule,
  t: jnp.ndarray,
  parameterization: str,
  weighting: str = "none",
  *,
  min_snr_gamma: float = 5.0,
  p2_k: float = 1.0,
  p2_gamma: float = 1.0,
  loss_type: str = "mse",
) -> jnp.ndarray:
  """Per-example weights [B] for the error of a `parameterization` target.

  - "none": 1 (the plain MSE of that target; for eps, the DDPM L_simple).
  - "min_snr": Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) on the x0
    error, i.e. min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and
    min(SNR, gamma) / (SNR + 1) for v.
  - "p2": perception-prioritized weighting (Choi et al. 2022): the eps loss
    weighted by 1 / (k + SNR)^gamma, carried over to the other targets by
    the error relations above.

  With loss_type "l1" the errors relate by the square roots of those factors
  (|eps err| = sqrt(SNR) |x0 err|), so the conversion uses them.
  """
  check_parameterization(parameterization)
  if loss_type not in ("mse", "l1"):
    raise ValueError(f"unknown loss_type {loss_type!r}; expected 'mse' or 'l1'")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
  r = snr(schedule, t)
  if weighting == "none":
    return jnp.ones_like(r)
  # Factor c with |eps err|^2 = c |target err|^2.
  c = {"eps": jnp.ones_like(r), "x0": r, "v": r / (1.0 + r)}[parameterization]
  if loss_type == "l1":
    c = jnp.sqrt(c)
  if weighting == "min_snr":
    if not min_snr_gamma > 0:
      raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
    w_eps = jnp.minimum(r, min_snr_gamma) / r
  else:
    if not p2_k > 0 or not p2_gamma >= 0:
      raise ValueError(f"p2 needs k > 0 and gamma >= 0, got k={p2_k!r}, gamma={p2_gamma!r}")
    w_eps = 1.0 / (p2_k + r) ** p2_gamma
  return w_eps * c
