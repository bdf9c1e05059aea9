import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax as dj

SHAPE = (3, 4, 4, 1)


def toy_eps_fn(T):
  return lambda x, t: 0.3 * x * jnp.tanh(t.astype(jnp.float32) / T)[:, None, None, None]


gaussian_eps_fn = dj.gaussian_eps_fn  # exact E[eps | x_t] for N(mu, sd^2) data


def test_ddpm_deterministic_for_fixed_key():
  s = dj.make_schedule("linear", 30)
  f = jax.jit(lambda rng: dj.ddpm_sample(toy_eps_fn(30), s, rng, SHAPE))
  a, b = f(jax.random.key(1)), f(jax.random.key(1))
  c = f(jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-3
  assert a.shape == SHAPE and np.all(np.isfinite(a))


@pytest.mark.parametrize("T,steps", [(1000, None), (10, None), (1000, 7)])
def test_sampler_traced_once(T, steps):
  """The scan body is traced once, whatever the number of steps."""
  s = dj.make_schedule("linear", T)
  calls = []

  def eps_fn(x, t):
    calls.append(1)
    return 0.1 * x

  if steps is None:
    jax.jit(lambda r: dj.ddpm_sample(eps_fn, s, r, SHAPE)).lower(jax.random.key(0))
  else:
    jax.jit(lambda r: dj.ddim_sample(eps_fn, s, r, SHAPE, steps)).lower(jax.random.key(0))
  assert len(calls) == 1


def test_ddim_eta0_is_deterministic_given_x_T():
  s = dj.make_schedule("linear", 50)
  x_T = jax.random.normal(jax.random.key(3), SHAPE)
  f = jax.jit(lambda r: dj.ddim_sample(toy_eps_fn(50), s, r, SHAPE, 10, eta=0.0, x_T=x_T))
  np.testing.assert_array_equal(f(jax.random.key(0)), f(jax.random.key(99)))


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_full_steps_eta1_equals_ancestral_beta_tilde(clip):
  T = 40
  s = dj.make_schedule("linear", T)
  eps_fn = toy_eps_fn(T)
  rng = jax.random.key(7)
  a = jax.jit(lambda r: dj.ddpm_sample(eps_fn, s, r, SHAPE, variance="beta_tilde", clip_x0=clip))(
    rng
  )
  b = jax.jit(lambda r: dj.ddim_sample(eps_fn, s, r, SHAPE, T, eta=1.0, clip_x0=clip))(rng)
  np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_trajectory_frames():
  s = dj.make_schedule("linear", 25)
  x_T = jax.random.normal(jax.random.key(3), SHAPE)
  final = dj.ddpm_sample(toy_eps_fn(25), s, jax.random.key(0), SHAPE, x_T=x_T)
  x, frames = jax.jit(
    lambda r: dj.ddpm_sample(toy_eps_fn(25), s, r, SHAPE, x_T=x_T, trajectory_every=10)
  )(jax.random.key(0))
  assert frames.shape == (1 + 3,) + SHAPE  # x_T, after steps 10, 20, 25
  np.testing.assert_array_equal(frames[0], x_T)
  np.testing.assert_allclose(frames[-1], x, atol=1e-6)
  np.testing.assert_allclose(x, final, atol=1e-6)
  labels = dj.trajectory_timesteps(np.arange(24, -1, -1), 10)
  assert labels == [24, 14, 4, -1]
  assert dj.trajectory_timesteps([9, 6, 3, 0], 2) == [9, 3, -1]


def test_ddim_timesteps():
  np.testing.assert_array_equal(dj.ddim_timesteps(10, 10), np.arange(9, -1, -1))
  np.testing.assert_array_equal(dj.ddim_timesteps(1000, 1), [999])
  ts = dj.ddim_timesteps(1000, 50)
  assert ts[0] == 999 and len(ts) == 50 and np.all(np.diff(ts) < 0)
  assert dj.ddim_timesteps(1000, 5, "linspace")[-1] == 0


@pytest.mark.parametrize(
  "call,match",
  [
    (
      lambda s: dj.ddim_sample(lambda x, t: x, s, jax.random.key(0), SHAPE, 11),
      "num_steps must be an integer in \\[1, 10\\]",
    ),
    (lambda s: dj.ddim_sample(lambda x, t: x, s, jax.random.key(0), SHAPE, 0), "num_steps"),
    (
      lambda s: dj.ddim_sample(lambda x, t: x, s, jax.random.key(0), SHAPE, 5, eta=1.5),
      "eta must lie in \\[0, 1\\], got 1.5",
    ),
    (
      lambda s: dj.ddpm_sample(lambda x, t: x, s, jax.random.key(0), SHAPE, variance="big"),
      "unknown variance",
    ),
    (lambda s: dj.sample(lambda x, t: x, s, jax.random.key(0), 16), "shape must be \\(B, ...\\)"),
  ]
  + [
    # An eps_fn that returns the wrong shape (a learned-variance head's 2C
    # channels, a tuple) is named at trace time, not as a lax.scan type error.
    (
      lambda s, name=name, out=out: dj.sample(out, s, jax.random.key(0), SHAPE, name, num_steps=2),
      "eps_fn\\(x_t, t\\) must return an array shaped like x_t",
    )
    for name in ("ddpm", "ddim", "dpm", "dpm_sde")
    for out in (lambda x, t: jnp.concatenate([x, x], -1), lambda x, t: (x, x))
  ],
)
def test_sampler_argument_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call(dj.make_schedule("linear", 10))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta0", "ddim_eta1", "dpm_solver", "dpm_sde"])
def test_samplers_recover_gaussian_data(sampler):
  """With the exact eps of Gaussian data, samples have the data's mean and variance."""
  mu, sd = 0.5, 0.3
  s = dj.make_schedule("cosine", 200)
  eps_fn = gaussian_eps_fn(s, mu, sd)
  shape = (4000, 2, 2, 1)
  rng = jax.random.key(11)
  if sampler == "ddpm":
    x = dj.ddpm_sample(eps_fn, s, rng, shape, variance="beta_tilde")
  elif sampler == "ddim_eta0":  # the probability-flow ODE is accurate with few steps
    x = dj.ddim_sample(eps_fn, s, rng, shape, 50, eta=0.0)
  elif sampler == "ddim_eta1":  # exact only with all steps (with few it under-disperses)
    x = dj.ddim_sample(eps_fn, s, rng, shape, 200, eta=1.0)
  elif sampler == "dpm_solver":  # second order: 20 steps suffice (DDIM eta=0 needs 50)
    x = dj.dpm_solver_sample(eps_fn, s, rng, shape, 20)
  else:  # the stochastic solver: 20 steps too, where DDIM eta=1 needs all 200
    x = dj.sample(eps_fn, s, rng, shape, "dpm_sde", 20)
  x = jax.jit(lambda v: v)(x)
  assert float(x.mean()) == pytest.approx(mu, abs=0.02)
  assert float(x.std()) == pytest.approx(sd, rel=0.07)


@pytest.mark.parametrize("spacing", ["trailing", "quadratic"])
def test_respaced_ancestral_equals_ddim_eta1(spacing):
  """Ancestral sampling over K < T respaced steps with the beta-tilde variance
  is DDIM with eta = 1 over the same timesteps (same noise keys)."""
  T, K = 100, 12
  s = dj.make_schedule("linear", T)
  eps_fn = toy_eps_fn(T)
  rng = jax.random.key(5)
  a = jax.jit(
    lambda r: dj.ddpm_sample(
      eps_fn, s, r, SHAPE, variance="beta_tilde", num_steps=K, spacing=spacing
    )
  )(rng)
  b = jax.jit(lambda r: dj.ddim_sample(eps_fn, s, r, SHAPE, K, eta=1.0, spacing=spacing))(rng)
  np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
  full = dj.ddpm_sample(eps_fn, s, rng, SHAPE)
  np.testing.assert_array_equal(full, dj.ddpm_sample(eps_fn, s, rng, SHAPE, num_steps=T))


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_dpm_sde_first_order_steps_are_ancestral_beta_tilde(spacing):
  """With two steps both SDE-DPM-Solver++ steps are first order (the first has
  no history, the second is the final one): each is the ancestral step with
  the posterior variance over the same timesteps, with the same noise keys."""
  T = 100
  s = dj.make_schedule("linear", T)
  eps_fn = toy_eps_fn(T)
  rng = jax.random.key(4)
  a = jax.jit(
    lambda r: dj.dpm_solver_sample(eps_fn, s, r, SHAPE, 2, spacing=spacing, stochastic=True)
  )(rng)
  b = jax.jit(
    lambda r: dj.ddpm_sample(
      eps_fn, s, r, SHAPE, variance="beta_tilde", num_steps=2, spacing=spacing
    )
  )(rng)
  np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
  ode = dj.dpm_solver_sample(eps_fn, s, rng, SHAPE, 2, spacing=spacing)
  assert float(jnp.abs(a - ode).max()) > 1e-2  # the noise is really there


def test_respaced_ancestral_beta_variance_last_step_is_noise_free():
  """With variance "beta" the last jump (t -> x0) must add no noise."""
  s = dj.make_schedule("linear", 100)
  x_T = jax.random.normal(jax.random.key(0), SHAPE)
  f = lambda r: dj.ddpm_sample(lambda x, t: jnp.zeros_like(x), s, r, SHAPE, num_steps=1, x_T=x_T)
  # One step from t = 99 straight to x0: x0_hat = x_T / sqrt(ab_99), no noise.
  expected = x_T / jnp.sqrt(s.alphas_cumprod[99])
  np.testing.assert_allclose(f(jax.random.key(1)), expected, rtol=1e-5)


def test_dpm_solver_deterministic_traced_once_and_frames():
  s = dj.make_schedule("linear", 100)
  traces = []

  def eps_fn(x, t):
    traces.append(1)
    return toy_eps_fn(100)(x, t)

  x_T = jax.random.normal(jax.random.key(3), SHAPE)
  f = jax.jit(lambda r: dj.dpm_solver_sample(eps_fn, s, r, SHAPE, 12, x_T=x_T, trajectory_every=5))
  x, frames = f(jax.random.key(0))
  x2, _ = f(jax.random.key(1))  # the key only draws x_T, given here
  np.testing.assert_array_equal(x, x2)
  assert len(traces) == 1 and frames.shape == (1 + 3,) + SHAPE
  np.testing.assert_array_equal(frames[0], x_T)
  np.testing.assert_array_equal(frames[-1], x)
  ts = dj.samplers.logsnr_timesteps(s, 12)
  assert ts[0] == 99 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
  with pytest.raises(ValueError, match="num_steps"):
    dj.dpm_solver_sample(eps_fn, s, jax.random.key(0), SHAPE, 101)


def test_dpm_solver_one_step_is_the_x0_prediction_at_T():
  """One step: no history, so the output is x0_hat(x_T, T-1)."""
  s = dj.make_schedule("linear", 50)
  x_T = jax.random.normal(jax.random.key(4), SHAPE)
  x = dj.dpm_solver_sample(toy_eps_fn(50), s, jax.random.key(0), SHAPE, 1, x_T=x_T)
  t = jnp.full((SHAPE[0],), 49, jnp.int32)
  np.testing.assert_allclose(
    x, dj.predict_x0_from_eps(s, x_T, t, toy_eps_fn(50)(x_T, t)), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("spacing", dj.samplers.SPACINGS)
def test_one_step_starts_from_pure_noise_for_every_spacing(spacing):
  """A single step must be taken at T-1, never at t = 0 (pure noise labelled clean)."""
  np.testing.assert_array_equal(dj.ddim_timesteps(1000, 1, spacing), [999])
  s = dj.make_schedule("linear", 1000)
  x = dj.ddim_sample(
    gaussian_eps_fn(s, 0.5, 0.3), s, jax.random.key(0), (2000, 2, 2, 1), 1, spacing=spacing
  )
  assert float(x.std()) < 0.05  # the x0 prediction at T-1 is the data mean, not noise (sd 1)


def test_dpm_solver_final_step_is_first_order():
  """With lower_order_final the step onto the last timestep is first order, so
  with 3 steps (first order, then the final, then x0) DPM-Solver++ is DDIM."""
  s = dj.make_schedule("linear", 100)
  eps_fn = gaussian_eps_fn(s, 0.5, 0.3)
  x_T = jax.random.normal(jax.random.key(3), (64, 2, 2, 1))
  for spacing in ("linspace", "trailing"):
    dpm = dj.dpm_solver_sample(eps_fn, s, jax.random.key(0), x_T.shape, 3, spacing=spacing, x_T=x_T)
    ddim = dj.ddim_sample(eps_fn, s, jax.random.key(0), x_T.shape, 3, spacing=spacing, x_T=x_T)
    np.testing.assert_allclose(dpm, ddim, rtol=2e-4, atol=2e-4)
    second = dj.dpm_solver_sample(
      eps_fn, s, jax.random.key(0), x_T.shape, 3, spacing=spacing, x_T=x_T, lower_order_final=False
    )
    assert float(jnp.abs(second - ddim).max()) > 1e-2


@pytest.mark.parametrize(
  "spacing,steps,tol",
  [
    ("logsnr", 10, 0.01),
    ("logsnr", 20, 0.01),
    ("quadratic", 10, 0.01),
    ("quadratic", 20, 0.01),
    ("linspace", 20, 0.05),
  ],
)
def test_dpm_solver_gaussian_accuracy_by_spacing(spacing, steps, tol):
  """Sample sd against the probability-flow ODE's answer for N(0.5, 0.3^2) data
  (0.3035 for the linear T=1000 schedule from x_T ~ N(0, I)). A second-order
  step onto t = 0 overshoots with linspace (0.388 at 20 steps)."""
  s = dj.make_schedule("linear", 1000)
  x = dj.dpm_solver_sample(
    gaussian_eps_fn(s, 0.5, 0.3), s, jax.random.key(11), (4000, 2, 2, 1), steps, spacing=spacing
  )
  assert float(x.std()) == pytest.approx(0.3035, abs=tol)


def test_logsnr_spacing_does_not_crowd_pure_noise_on_cosine():
  """Cosine's clipped last beta puts lambda_{T-1} far below lambda_{T-2}; even
  log-SNR steps over that range spent 7 of 20 steps within 10 timesteps of T-1."""
  s = dj.make_schedule("cosine", 1000)
  ts = dj.samplers.logsnr_timesteps(s, 20)
  assert ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
  assert np.sum(ts >= 990) <= 2
  x = dj.dpm_solver_sample(gaussian_eps_fn(s, 0.5, 0.3), s, jax.random.key(11), (4000, 2, 2, 1), 10)
  assert float(x.std()) == pytest.approx(0.3035, abs=0.01)  # 0.2685 with the crowded steps
  # The linear schedule's spacing is unchanged by the floor.
  lin = dj.make_schedule("linear", 1000)
  np.testing.assert_array_equal(
    dj.samplers.logsnr_timesteps(lin, 20), dj.samplers.logsnr_timesteps(lin, 20, min_logsnr=-1e9)
  )
