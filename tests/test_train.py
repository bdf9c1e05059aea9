import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax as dj


def setup(lr=3e-3, steps=100):
  # The test U-Net at one level without attention (74 parameter leaves, not
  # 144): the step's mechanics are the same, and it compiles in a third of the time.
  model = dj.make_model("test", channel_mults=(1,), attention_levels=())
  schedule = dj.make_schedule("linear", 100)
  tx = dj.make_optimizer(lr, steps, warmup_steps=0)
  state = dj.create_train_state(jax.random.key(0), model, tx, (8, 8, 1))
  return model, schedule, tx, state


def test_train_step_lowers_loss_on_fixed_batch():
  model, schedule, tx, state = setup()
  batch = jnp.tanh(jax.random.normal(jax.random.key(1), (16, 8, 8, 1)))
  apply = lambda p, x, t, r: model.apply({"params": p}, x, t)
  eval_loss = jax.jit(
    lambda p: jnp.mean(
      jnp.stack([dj.eps_loss(apply, p, schedule, jax.random.key(k), batch) for k in range(8)])
    )
  )
  step = jax.jit(
    dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(2)), donate_argnums=0
  )
  before = float(eval_loss(state.params))
  for _ in range(40):
    state, m = step(state, batch)
  after = float(eval_loss(state.params))
  assert int(state.step) == 40
  assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
  assert after < 0.8 * before, (before, after)
  assert step._cache_size() == 1  # no recompilation across steps


def test_ema_update_and_keys_from_step():
  model, schedule, tx, state = setup()
  batch = jnp.zeros((4, 8, 8, 1))
  step = jax.jit(
    dj.make_train_step(
      model, schedule, tx, base_rng=jax.random.key(2), ema_decay=0.9, ema_warmup=False
    )
  )
  s1, m1 = step(state, batch)
  expect = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, s1.params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s1.ema_params, expect
  )
  # The same state gives the same step; another step index draws other noise.
  s1b, m1b = step(state, batch)
  assert float(m1["loss"]) == float(m1b["loss"])
  s_other, m_other = step(state.replace(step=jnp.asarray(5, jnp.int32)), batch)
  assert float(m_other["loss"]) != float(m1["loss"])


def test_optimizer_errors():
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    dj.make_optimizer(0.0, 10)
  with pytest.raises(ValueError, match="warmup_steps must lie in"):
    dj.make_optimizer(1e-3, 10, warmup_steps=11)
  with pytest.raises(ValueError, match="ema_decay"):
    model, schedule, tx, _ = setup()
    dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(0), ema_decay=1.0)
  model, schedule, tx, state = setup()
  step = dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(0))
  with pytest.raises(ValueError, match="floats in \\[-1, 1\\], got uint8"):
    jax.eval_shape(step, state, jnp.zeros((4, 8, 8, 1), jnp.uint8))


def test_learning_rate_schedule_warmup_then_cosine():
  lr = dj.learning_rate_schedule(1e-3, 100, 10)
  assert float(lr(0)) == 0.0
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_step_is_flagged_and_optionally_skipped(skip):
  model, schedule, tx, state = setup()
  # float32, not weakly typed: the good batch below then reuses the compiled step.
  bad = jnp.full((4, 8, 8, 1), jnp.nan, jnp.float32)
  step = jax.jit(
    dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(2), skip_nonfinite=skip)
  )
  new, m = step(state, bad)
  assert float(m["finite"]) == 0.0 and int(new.step) == 1
  leaves_ok = [bool(np.all(np.isfinite(a))) for a in jax.device_get(jax.tree.leaves(new.params))]
  if skip:  # everything but the step counter is untouched
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, new.ema_params, state.ema_params)
  else:
    assert not all(leaves_ok)
  good, m = step(state, jnp.zeros((4, 8, 8, 1)))
  assert float(m["finite"]) == 1.0
  assert step._cache_size() == 1


def test_replicas_draw_their_own_noise_under_axis_name():
  """With axis_name, each replica folds its axis index into the step key. Two
  replicas given the same images then draw different t and noise, so the
  averaged loss is not the single-device loss (with shared keys it was)."""
  model, schedule, tx, state = setup()
  images = jnp.tanh(jax.random.normal(jax.random.key(1), (4, 8, 8, 1)))
  batch = jnp.stack([images, images])  # identical data on both replicas
  step = dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(2), axis_name="r")
  states, metrics = jax.jit(jax.vmap(step, in_axes=(None, 0), axis_name="r"))(state, batch)
  jax.tree.map(
    lambda a: np.testing.assert_allclose(a[0], a[1], rtol=1e-6, atol=1e-7), states.params
  )  # the pmean'd update is the same on both
  single = jax.jit(dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(2)))
  _, m = single(state, images)
  assert abs(float(metrics["loss"][0]) - float(m["loss"])) > 1e-4 * float(m["loss"])
