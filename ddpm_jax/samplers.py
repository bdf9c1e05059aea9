"""Reverse-process samplers, each a single `jax.lax.scan` over its steps.

Every sampler takes a plain `eps_fn(x_t, t) -> eps` with x_t [B, H, W, C] and
t [B] int32, so research code can wrap a model, add guidance or swap networks
without touching the sampler. The scan body is traced once, so compiling a
1000-step sampler costs the same as a 10-step one.

Randomness: with `rng_init, rng_steps = jax.random.split(rng)`, x_T is drawn
from `rng_init` and the noise added at the step leaving timestep t from
`fold_in(rng_steps, t)`. Two samplers visiting the same timesteps therefore
draw identical noise.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import predict_eps_from_x0, predict_x0_from_eps
from ddpm_jax.eps_fns import call_eps_fn
from ddpm_jax.schedules import Schedule

EpsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
VARIANCES = ("beta_tilde", "beta")
SPACINGS = ("trailing", "linspace", "quadratic")


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "trailing") -> np.ndarray:
  """The decreasing timesteps a `num_steps` sampler visits, [num_steps] int32.

  "trailing" ends each of num_steps equal intervals (always starts at T-1 and,
  with num_steps == T, visits every timestep); "linspace" spreads them evenly
  over [0, T-1]; "quadratic" packs them near t = 0.
  """
  if spacing not in SPACINGS:
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
  if (
    isinstance(num_steps, bool)
    or int(num_steps) != num_steps
    or not 1 <= num_steps <= num_timesteps
  ):
    raise ValueError(f"num_steps must be an integer in [1, {num_timesteps}] (T), got {num_steps!r}")
  n, T = int(num_steps), int(num_timesteps)
  if n == 1:  # one step must start from pure noise, whatever the spacing
    return np.array([T - 1], np.int32)
  if spacing == "trailing":
    ts = np.round(np.arange(1, n + 1) * (T / n)).astype(np.int64) - 1
  elif spacing == "linspace":
    ts = np.round(np.linspace(0, T - 1, n)).astype(np.int64)
  else:
    ts = np.round(np.linspace(0, math.sqrt(T - 1), n) ** 2).astype(np.int64)
  if len(np.unique(ts)) != n:
    raise ValueError(
      f"{spacing!r} spacing gives repeated timesteps for num_steps={n}, T={T}; "
      "use fewer steps or 'trailing' spacing"
    )
  return ts[::-1].astype(np.int32)


MIN_LOGSNR = -5.1  # log-SNR below which x_t holds no usable signal (sqrt(ab) < 0.006)


def logsnr_timesteps(
  schedule: Schedule, num_steps: int, min_logsnr: float = MIN_LOGSNR
) -> np.ndarray:
  """`num_steps` decreasing timesteps from T-1 to 0, evenly spaced in
  log-SNR lambda_t = log(a_t / s_t) (the spacing DPM-Solver is analysed in),
  each the discrete timestep nearest its target and made distinct.

  The spacing covers [max(lambda_{T-1}, min_logsnr), lambda_0]; the first
  step still starts at T-1. The floor keeps schedules whose last beta is
  clipped (cosine: lambda_{T-1} = -9.9, lambda_{T-2} = -6.5) from spending
  a third of the steps next to pure noise; DPM-Solver's reference code
  stops the cosine schedule at t = 0.9946 (lambda about -4.8) for the same
  reason. The linear T=1000 schedule (lambda_{T-1} = -5.06) is unaffected.
  """
  T = schedule.num_timesteps
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must be an integer in [1, {T}] (T), got {num_steps!r}")
  n = int(num_steps)
  ab = np.asarray(schedule.alphas_cumprod, np.float64)
  lam = 0.5 * (np.log(ab) - np.log1p(-ab))  # decreasing in t
  targets = np.linspace(max(lam[-1], min(float(min_logsnr), lam[0])), lam[0], n)
  ts = np.array([int(np.argmin(np.abs(lam - target))) for target in targets])
  ts[0] = T - 1
  for i in range(1, n):  # strictly decreasing from T-1 ...
    ts[i] = min(ts[i], ts[i - 1] - 1)
  ts[-1] = max(ts[-1], 0)
  for i in range(n - 2, -1, -1):  # ... and not below 0
    ts[i] = max(ts[i], ts[i + 1] + 1)
  return ts.astype(np.int32)


def _check_shape(shape: Sequence[int]):
  if np.ndim(shape) != 1 or len(shape) < 2 or any(int(s) < 1 for s in shape):
    raise ValueError(f"shape must be (B, ...) with positive sizes, got {shape!r}")


def _frame_index(j: jnp.ndarray, n: int, every: int):
  """Whether step j (0-based, of n) is recorded, and into which frame slot."""
  write = ((j + 1) % every == 0) | (j == n - 1)
  return write, (j + every) // every  # ceil((j + 1) / every)


def trajectory_timesteps(step_timesteps: Sequence[int], every: int) -> list:
  """Labels for the frames a sampler returns with `trajectory_every=every`.

  Each frame is labelled with the timestep at which that state is (or would
  be) fed to eps_fn: frame 0 is x_T at step_timesteps[0]; the frame after
  step j is at step_timesteps[j + 1], and after the last step it is the
  sample itself, labelled -1 (x0).
  """
  n = len(step_timesteps)
  labels = [int(step_timesteps[0])]
  for j in range(n):
    if (j + 1) % every == 0 or j == n - 1:
      labels.append(int(step_timesteps[j + 1]) if j + 1 < n else -1)
  return labels


def _run(step_fn, x_T, ts, ts_prev, trajectory_every, aux=None):
  """Scans step_fn over (t, t_prev); optionally keeps every k-th state.

  step_fn(x, t, t_prev) -> x; with `aux` (extra carried state, e.g. a
  multistep solver's history) step_fn(x, aux, t, t_prev) -> (x, aux).
  """
  n = len(ts)
  xs = (jnp.arange(n), jnp.asarray(ts), jnp.asarray(ts_prev))
  if aux is None:
    step = lambda c, t, t_prev: (step_fn(c[0], t, t_prev), None)
  else:
    step = lambda c, t, t_prev: step_fn(c[0], c[1], t, t_prev)
  if trajectory_every is None:
    (x, _), _ = jax.lax.scan(lambda c, s: (step(c, s[1], s[2]), None), (x_T, aux), xs)
    return x
  every = int(trajectory_every)
  if every < 1:
    raise ValueError(f"trajectory_every must be >= 1, got {trajectory_every!r}")
  num_frames = 1 + -(-n // every)
  frames = jnp.zeros((num_frames,) + x_T.shape, x_T.dtype).at[0].set(x_T)

  def body(carry, s):
    c, frames = carry
    j, t, t_prev = s
    c = step(c, t, t_prev)
    write, idx = _frame_index(j, n, every)
    frames = jax.lax.cond(
      write, lambda f: jax.lax.dynamic_update_index_in_dim(f, c[0], idx, 0), lambda f: f, frames
    )
    return (c, frames), None

  ((x, _), frames), _ = jax.lax.scan(body, ((x_T, aux), frames), xs)
  return x, frames


def _maybe_clip(x0, clip_x0):
  if clip_x0 is None or clip_x0 is False:
    return x0
  bound = 1.0 if clip_x0 is True else float(clip_x0)
  return jnp.clip(x0, -bound, bound)


def ddpm_sample(
  eps_fn: EpsFn,
  schedule: Schedule,
  rng: jax.Array,
  shape: Sequence[int],
  *,
  variance: str = "beta",
  clip_x0: Union[bool, Tuple[float, float]] = False,
  temperature: float = 1.0,
  trajectory_every: Optional[int] = None,
  x_T: Optional[jnp.ndarray] = None,
  dtype: Any = jnp.float32,
  num_steps: Optional[int] = None,
  spacing: str = "trailing",
) -> Any:
  """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), over all T steps or
  a respaced subsequence of them.

  With `num_steps` K < T the chain visits the K timesteps of
  `ddim_timesteps(T, K, spacing)` and each jump t -> s is an ancestral step of
  the respaced process (Nichol & Dhariwal 2021): beta_ts = 1 - ab_t / ab_s,
  posterior mean of x0_hat, and variance beta_ts ("beta") or
  beta_ts (1 - ab_s) / (1 - ab_t) ("beta_tilde").

  Args:
    eps_fn: (x_t [B,H,W,C], t [B] int32) -> eps [B,H,W,C].
    schedule: the noise schedule.
    rng: PRNG key.
    shape: (B, H, W, C) of the samples.
    variance: "beta" (sigma_t^2 = beta_t, the seed notebook's choice) or
      "beta_tilde" (the true posterior variance).
    clip_x0: False; True to clip the predicted x0 to [-1, 1]; or a float bound.
      With clipping, the step uses the posterior mean of the clipped x0.
    temperature: scales the noise added at each step (1.0 = standard).
    trajectory_every: if set to k, also return frames [1 + ceil(T/k), *shape]:
      x_T and every k-th state (the last state always included).
    x_T: optional starting noise [*shape] (default: drawn from rng).
    dtype: sample dtype.
    num_steps: steps in [1, T]; None means T (every timestep).
    spacing: timestep spacing when num_steps < T, see `ddim_timesteps`.

  Returns:
    x0 [*shape], or (x0, frames) when trajectory_every is set. The final step
    adds no noise.
  """
  if variance not in VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature!r}")
  _check_shape(shape)
  T = schedule.num_timesteps
  ts = ddim_timesteps(T, T if num_steps is None else num_steps, spacing)
  return ddim_like_sample(
    eps_fn,
    schedule,
    rng,
    shape,
    ts,
    eta=None,
    variance=variance,
    clip_x0=clip_x0,
    temperature=temperature,
    trajectory_every=trajectory_every,
    x_T=x_T,
    dtype=dtype,
  )


def ddim_sample(
  eps_fn: EpsFn,
  schedule: Schedule,
  rng: jax.Array,
  shape: Sequence[int],
  num_steps: int,
  eta: float = 0.0,
  *,
  spacing: str = "trailing",
  clip_x0: Union[bool, Tuple[float, float]] = False,
  temperature: float = 1.0,
  trajectory_every: Optional[int] = None,
  x_T: Optional[jnp.ndarray] = None,
  dtype: Any = jnp.float32,
) -> Any:
  """DDIM sampling (Song et al. 2021) with any number of steps from 1 to T.

  x_{s} = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps + sigma z, with
  sigma = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s), s the
  next timestep visited (ab_s = 1 after the last one). eta = 0 is
  deterministic; eta = 1 with all T steps is the ancestral sampler with the
  beta-tilde variance.

  Args:
    eps_fn, schedule, rng, shape, clip_x0, temperature, trajectory_every, x_T,
      dtype: as in `ddpm_sample`.
    num_steps: steps in [1, T].
    eta: stochasticity in [0, 1].
    spacing: timestep spacing, see `ddim_timesteps`.

  Returns:
    x0 [*shape], or (x0, frames) when trajectory_every is set.
  """
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature!r}")
  _check_shape(shape)
  ts = ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
  return ddim_like_sample(
    eps_fn,
    schedule,
    rng,
    shape,
    ts,
    eta=float(eta),
    variance=None,
    clip_x0=clip_x0,
    temperature=temperature,
    trajectory_every=trajectory_every,
    x_T=x_T,
    dtype=dtype,
  )


def ddim_like_sample(
  eps_fn: EpsFn,
  schedule: Schedule,
  rng: jax.Array,
  shape: Sequence[int],
  ts: Any,
  *,
  eta: float,
  variance: str,
  clip_x0: Union[bool, Tuple[float, float]],
  temperature: float,
  trajectory_every: Optional[int],
  x_T: Optional[jax.Array],
  dtype: Any,
) -> Any:
  """Shared scan for the ancestral (eta None) and DDIM samplers over timesteps ts."""
  shape = tuple(int(s) for s in shape)
  rng_init, rng_steps = jax.random.split(rng)
  if x_T is None:
    x_T = jax.random.normal(rng_init, shape, dtype)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
  ts = np.asarray(ts, np.int32)
  ts_prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)
  B = shape[0]
  ab_ext = jnp.concatenate([schedule.alphas_cumprod, jnp.ones((1,), jnp.float32)])
  # log(ab) by a cumulative sum keeps 1 - ab_t / ab_s accurate for short jumps.
  log_ab_ext = jnp.concatenate([jnp.cumsum(jnp.log1p(-schedule.betas)), jnp.zeros((1,))])

  def step(x, t, t_prev):
    tb = jnp.full((B,), t, jnp.int32)
    eps = call_eps_fn(eps_fn, x, tb)
    x32 = x.astype(jnp.float32)
    x0 = predict_x0_from_eps(schedule, x32, tb, eps)
    if clip_x0 is not None and clip_x0 is not False:
      x0 = _maybe_clip(x0, clip_x0)
      eps = predict_eps_from_x0(schedule, x32, tb, x0)
    z = jax.random.normal(jax.random.fold_in(rng_steps, t), shape, jnp.float32) * temperature
    if eta is None:  # ancestral: posterior mean of x0_hat plus sigma z
      # The jump t -> t_prev of the (possibly respaced) chain; adjacent steps
      # use the schedule's own float64-derived coefficients.
      adjacent = t_prev == t - 1
      ab_t, ab_s = ab_ext[t], ab_ext[t_prev]
      beta_ts = jnp.where(
        adjacent, schedule.betas[t], -jnp.expm1(log_ab_ext[t] - log_ab_ext[t_prev])
      )
      coef1 = jnp.where(
        adjacent, schedule.posterior_mean_coef1[t], jnp.sqrt(ab_s) * beta_ts / (1 - ab_t)
      )
      coef2 = jnp.where(
        adjacent, schedule.posterior_mean_coef2[t], jnp.sqrt(1 - beta_ts) * (1 - ab_s) / (1 - ab_t)
      )
      var = beta_ts
      if variance == "beta_tilde":
        var = jnp.where(adjacent, schedule.posterior_variance[t], beta_ts * (1 - ab_s) / (1 - ab_t))
      sigma = jnp.where(t_prev >= 0, jnp.sqrt(var), 0.0)  # no noise on the last step
      x_new = coef1 * x0 + coef2 * x32 + sigma * z
    else:
      ab_t = ab_ext[t]
      ab_s = ab_ext[t_prev]  # index -1 -> the appended 1.0
      sigma = eta * jnp.sqrt((1 - ab_s) / (1 - ab_t)) * jnp.sqrt(1 - ab_t / ab_s)
      dir_coef = jnp.sqrt(jnp.maximum(1 - ab_s - sigma**2, 0.0))
      x_new = jnp.sqrt(ab_s) * x0 + dir_coef * eps + sigma * z
    return x_new.astype(dtype)

  return _run(step, x_T, ts, ts_prev, trajectory_every)


def dpm_solver_sample(
  eps_fn: EpsFn,
  schedule: Schedule,
  rng: jax.Array,
  shape: Sequence[int],
  num_steps: int = 20,
  *,
  spacing: str = "logsnr",
  clip_x0: Union[bool, Tuple[float, float]] = False,
  lower_order_final: bool = True,
  stochastic: bool = False,
  temperature: float = 1.0,
  trajectory_every: Optional[int] = None,
  x_T: Optional[jnp.ndarray] = None,
  dtype: Any = jnp.float32,
) -> Any:
  """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the
  probability-flow ODE in data-prediction form, deterministic given x_T; with
  `stochastic`, SDE-DPM-Solver++(2M), the same solver for the reverse SDE.

  With lambda_t = log(a_t / s_t) (a_t = sqrt(ab_t), s_t = sqrt(1 - ab_t)),
  h = lambda_s - lambda_t and D the data prediction:

    x_s = (s_s / s_t) x_t - a_s expm1(-h) D,
    D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,  r = h_prev / h,

  first order (D = x0_t) on the first step. The stochastic solver steps

    x_s = (s_s / s_t) e^-h x_t - a_s expm1(-2h) D + s_s sqrt(-expm1(-2h)) z;

  its first-order step is exactly the ancestral step t -> s with the
  posterior variance (beta-tilde), so it is the second-order form of the
  ancestral sampler and keeps that sampler's error-correcting noise at a
  fraction of its steps. After the last visited timestep
  the sample is its x0 prediction (a first-order step to noise level 0).
  With `lower_order_final` (as in the reference DPM-Solver code and
  diffusers) the step onto the last visited timestep is first order too:
  when that timestep is t = 0 its lambda step is long and r small, and the
  extrapolation would overshoot.

  Args:
    eps_fn, schedule, rng, shape, clip_x0, trajectory_every, x_T, dtype: as
      in `ddim_sample` (rng draws x_T, and the noise when stochastic).
    num_steps: model evaluations, in [1, T].
    spacing: "logsnr" (default: even steps in lambda, from T-1 to 0, see
      `logsnr_timesteps`) or a `ddim_timesteps` spacing.
    lower_order_final: first-order step onto the last visited timestep.
    stochastic: solve the reverse SDE (noise drawn from rng) instead of the ODE.
    temperature: scales the stochastic solver's noise (1.0 = standard).

  Returns:
    x0 [*shape], or (x0, frames) when trajectory_every is set.
  """
  _check_shape(shape)
  shape = tuple(int(s) for s in shape)
  if spacing == "logsnr":
    ts = logsnr_timesteps(schedule, num_steps)
  else:
    ts = ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
  ts_next = np.concatenate([ts[1:], [-1]]).astype(np.int32)
  last_t = int(ts[-1]) if lower_order_final else -2  # -2: never matches
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature!r}")
  rng_init, rng_steps = jax.random.split(rng)  # as in the ancestral sampler
  if x_T is None:
    x_T = jax.random.normal(rng_init, shape, dtype)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
  B = shape[0]
  log_ab = jnp.log(schedule.alphas_cumprod)
  log_1m_ab = jnp.log1p(-schedule.alphas_cumprod)
  lam = 0.5 * (log_ab - log_1m_ab)

  def step(x, aux, t, s):
    x0_prev, h_prev, has_prev = aux
    tb = jnp.full((B,), t, jnp.int32)
    x32 = x.astype(jnp.float32)
    x0 = _maybe_clip(predict_x0_from_eps(schedule, x32, tb, call_eps_fn(eps_fn, x, tb)), clip_x0)
    final = s < 0
    s_ = jnp.maximum(s, 0)
    h = jnp.where(final, 1.0, lam[s_] - lam[t])  # unused on the final step
    r = h_prev / h
    second = has_prev & ~final & (s != last_t)
    d = jnp.where(second, (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev, x0)
    ratio = jnp.exp(0.5 * (log_1m_ab[s_] - log_1m_ab[t]))  # s_s / s_t
    a_s = jnp.exp(0.5 * log_ab[s_])
    if stochastic:
      z = jax.random.normal(jax.random.fold_in(rng_steps, t), shape, jnp.float32) * temperature
      x_next = ratio * jnp.exp(-h) * x32 - a_s * jnp.expm1(-2 * h) * d
      x_next = x_next + jnp.exp(0.5 * log_1m_ab[s_]) * jnp.sqrt(-jnp.expm1(-2 * h)) * z
    else:
      x_next = ratio * x32 - a_s * jnp.expm1(-h) * d
    x_next = jnp.where(final, x0, x_next)
    return x_next.astype(dtype), (x0, h, jnp.asarray(True))

  aux = (jnp.zeros(shape, jnp.float32), jnp.ones((), jnp.float32), jnp.asarray(False))
  return _run(step, x_T, ts, ts_next, trajectory_every, aux=aux)


SAMPLERS = ("ddpm", "ddim", "dpm", "dpm_sde")
# Steps and spacing each sampler uses when not told: ancestral over all T
# steps, DDIM over 50, DPM-Solver++(2M) (ODE or SDE) over 20 evenly spaced in log-SNR.
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpm": 20, "dpm_sde": 20}
DEFAULT_SPACING = {"ddpm": "trailing", "ddim": "trailing", "dpm": "logsnr", "dpm_sde": "logsnr"}
LOGSNR_SAMPLERS = ("dpm", "dpm_sde")


def _resolve(schedule: Schedule, sampler: str, num_steps: Optional[int], spacing: Optional[str]):
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  T = schedule.num_timesteps
  steps = num_steps if num_steps is not None else (DEFAULT_STEPS[sampler] or T)
  steps = min(steps, T) if num_steps is None else steps
  spacing = spacing or DEFAULT_SPACING[sampler]
  allowed = SPACINGS + (("logsnr",) if sampler in LOGSNR_SAMPLERS else ())
  if spacing not in allowed:
    raise ValueError(
      f"spacing {spacing!r} does not apply to the {sampler} sampler; expected one of {allowed}"
    )
  return steps, spacing


def sampler_timesteps(
  schedule: Schedule,
  sampler: str = "dpm",
  num_steps: Optional[int] = None,
  spacing: Optional[str] = None,
) -> np.ndarray:
  """The decreasing timesteps `sample(..., sampler, num_steps, spacing=spacing)` visits."""
  steps, spacing = _resolve(schedule, sampler, num_steps, spacing)
  if spacing == "logsnr":
    return logsnr_timesteps(schedule, steps)
  return ddim_timesteps(schedule.num_timesteps, steps, spacing)


def sample(
  eps_fn: EpsFn,
  schedule: Schedule,
  rng: jax.Array,
  shape: Sequence[int],
  sampler: str = "dpm",
  num_steps: Optional[int] = None,
  *,
  spacing: Optional[str] = None,
  clip_x0: Union[bool, Tuple[float, float]] = False,
  eta: float = 0.0,
  variance: str = "beta",
  temperature: float = 1.0,
  trajectory_every: Optional[int] = None,
  x_T: Optional[jnp.ndarray] = None,
  dtype: Any = jnp.float32,
) -> Any:
  """One entry point to every sampler: `sample(eps_fn, schedule, rng, shape)`.

  Args:
    eps_fn: (x_t [B, ...], t [B] int32) -> eps.
    schedule, rng, shape, clip_x0, trajectory_every, x_T, dtype: as in
      `ddpm_sample`.
    sampler: "ddpm" (ancestral), "ddim", "dpm" (DPM-Solver++(2M), the ODE) or
      "dpm_sde" (SDE-DPM-Solver++(2M), the second-order ancestral sampler).
    num_steps: steps in [1, T]; None: `DEFAULT_STEPS` (T for ddpm, 50 for
      ddim, 20 for dpm and dpm_sde).
    spacing: None (`DEFAULT_SPACING`), or "trailing", "linspace",
      "quadratic", and "logsnr" for dpm and dpm_sde.
    eta: DDIM stochasticity (ddim only).
    variance: "beta" or "beta_tilde" (ddpm only).
    temperature: noise scale of ddpm, ddim and dpm_sde (dpm adds no noise: must be 1).

  Returns:
    x0 [*shape], or (x0, frames) when trajectory_every is set; the frames'
    timesteps are `trajectory_timesteps(sampler_timesteps(...), every)`.
  """
  steps, spacing = _resolve(schedule, sampler, num_steps, spacing)
  common = dict(clip_x0=clip_x0, trajectory_every=trajectory_every, x_T=x_T, dtype=dtype)
  if sampler == "ddpm":
    return ddpm_sample(
      eps_fn,
      schedule,
      rng,
      shape,
      variance=variance,
      num_steps=steps,
      spacing=spacing,
      temperature=temperature,
      **common,
    )
  if sampler == "ddim":
    return ddim_sample(
      eps_fn,
      schedule,
      rng,
      shape,
      steps,
      eta=eta,
      spacing=spacing,
      temperature=temperature,
      **common,
    )
  if sampler == "dpm_sde":
    return dpm_solver_sample(
      eps_fn,
      schedule,
      rng,
      shape,
      steps,
      spacing=spacing,
      stochastic=True,
      temperature=temperature,
      **common,
    )
  if temperature != 1.0:
    raise ValueError(
      "temperature applies to the ddpm, ddim and dpm_sde samplers; dpm adds no noise"
    )
  return dpm_solver_sample(eps_fn, schedule, rng, shape, steps, spacing=spacing, **common)
