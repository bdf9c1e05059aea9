"""Noise schedules as frozen pytrees.

All quantities are computed in float64 with numpy and stored as float32 JAX
arrays of shape [T]. Index ``t`` runs over ``0 .. T-1``; ``t = 0`` is the
first (least noisy) diffusion step, as in the seed notebooks.
"""

from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("linear", "cosine", "quadratic")


@flax.struct.dataclass
class Schedule:
  """A discrete-time diffusion schedule. Every array field is [T] float32.

  Attributes:
    kind: name of the schedule (static).
    num_timesteps: T (static).
    betas: beta_t.
    alphas: 1 - beta_t.
    alphas_cumprod: alpha-bar_t = prod_{s<=t} alpha_s.
    alphas_cumprod_prev: alpha-bar_{t-1}, with alpha-bar_{-1} = 1.
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: for q_sample.
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod: for eps -> x0.
    posterior_variance: beta-tilde_t = beta_t (1 - ab_{t-1}) / (1 - ab_t).
    posterior_log_variance_clipped: log beta-tilde_t, with the t=0 entry
      replaced by the t=1 value so it is finite.
    posterior_mean_coef1, posterior_mean_coef2: the posterior mean is
      coef1 * x0 + coef2 * x_t.
    log_betas: log beta_t (the "fixed large" variance).
  """

  kind: str = flax.struct.field(pytree_node=False)
  num_timesteps: int = flax.struct.field(pytree_node=False)
  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray
  sqrt_recipm1_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray
  log_betas: jnp.ndarray


def linear_betas(
  num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
  """The DDPM schedule of the seeds: betas evenly spaced, [T] float64."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def quadratic_betas(
  num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
  """Betas growing quadratically from beta_start to beta_end, [T] float64."""
  s = np.linspace(0.0, 1.0, num_timesteps, dtype=np.float64)
  return beta_start + (beta_end - beta_start) * s**2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021), [T] float64."""
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
  alphas_cumprod = f / f[0]
  betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
  return np.clip(betas, 0.0, max_beta)


def schedule_from_betas(betas: np.ndarray, kind: str = "custom") -> Schedule:
  """Builds a Schedule from betas [T] in (0, 1), computing in float64."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size < 1:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
  if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
    bad = betas[~((betas > 0) & (betas < 1))]
    raise ValueError(
      f"betas must lie in the open interval (0, 1); got values such as {bad[:3].tolist()} "
      f"(min {betas.min():.3g}, max {betas.max():.3g})"
    )
  alphas = 1.0 - betas
  ab = np.cumprod(alphas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
  # post_var[0] == 0; use the next value so the log is finite (as in DDPM).
  post_logvar = np.log(
    np.concatenate([post_var[1:2], post_var[1:]]) if betas.size > 1 else np.array([betas[0]])
  )
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
    kind=kind,
    num_timesteps=int(betas.size),
    betas=f32(betas),
    alphas=f32(alphas),
    alphas_cumprod=f32(ab),
    alphas_cumprod_prev=f32(ab_prev),
    sqrt_alphas_cumprod=f32(np.sqrt(ab)),
    sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
    sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ab)),
    sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ab - 1.0)),
    posterior_variance=f32(post_var),
    posterior_log_variance_clipped=f32(post_logvar),
    posterior_mean_coef1=f32(betas * np.sqrt(ab_prev) / (1.0 - ab)),
    posterior_mean_coef2=f32((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)),
    log_betas=f32(np.log(betas)),
  )


def make_schedule(kind: str = "linear", num_timesteps: int = 1000, **options) -> Schedule:
  """Makes a noise schedule.

  Args:
    kind: "linear" (options beta_start=1e-4, beta_end=0.02), "quadratic" (same
      options) or "cosine" (options s=0.008, max_beta=0.999).
    num_timesteps: T >= 1.
    **options: schedule-specific options, listed above.

  Returns:
    A `Schedule` pytree with [T] float32 arrays.

  Raises:
    ValueError: unknown kind or option, T < 1, or betas outside (0, 1).
  """
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
  if isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
  num_timesteps = int(num_timesteps)
  allowed = {
    "linear": ("beta_start", "beta_end"),
    "quadratic": ("beta_start", "beta_end"),
    "cosine": ("s", "max_beta"),
  }[kind]
  unknown = set(options) - set(allowed)
  if unknown:
    raise ValueError(
      f"unknown option(s) {sorted(unknown)} for the {kind!r} schedule; allowed: {list(allowed)}"
    )
  if kind in ("linear", "quadratic"):
    lo, hi = options.get("beta_start", 1e-4), options.get("beta_end", 0.02)
    for name, v in (("beta_start", lo), ("beta_end", hi)):
      if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {v!r}")
    fn = linear_betas if kind == "linear" else quadratic_betas
    betas = fn(num_timesteps, lo, hi)
  else:
    max_beta = options.get("max_beta", 0.999)
    if not 0.0 < max_beta < 1.0:
      raise ValueError(f"max_beta must lie in (0, 1), got {max_beta!r}")
    s = options.get("s", 0.008)
    if not s > 0:
      raise ValueError(f"s must be > 0, got {s!r}")
    betas = cosine_betas(num_timesteps, s, max_beta)
  return schedule_from_betas(betas, kind=kind)
