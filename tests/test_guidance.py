"""Guidance on a problem with a known answer: two Gaussian classes, for which
the conditional and unconditional eps and the noisy-data classifier are all
available in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddpm_jax as dj

SD = 0.3
MUS = jnp.array([-1.5, 1.5])  # class means (every pixel)
NULL = 2
SHAPE = (3000, 2, 2, 1)


def _a_v(schedule, t, shape):
  ab = dj.extract(schedule.alphas_cumprod, t, shape)
  return jnp.sqrt(ab), ab * SD**2 + 1 - ab


def class_logits(schedule):
  """Exact log p(y | x_t) up to a constant: two equally likely classes."""

  def logits_fn(x, t):
    a, v = _a_v(schedule, t, x.shape)
    d = jnp.stack(
      [jnp.sum(((x - a * m) ** 2 / (2 * v)).reshape(x.shape[0], -1), axis=1) for m in MUS], axis=-1
    )
    return -d

  return logits_fn


def mixture_cond_eps_fn(schedule):
  """Exact E[eps | x_t, y]; y = NULL gives the mixture's E[eps | x_t]."""

  def per_class(x, t, m):
    a, v = _a_v(schedule, t, x.shape)
    return jnp.sqrt(1 - a**2) * (x - a * m) / v

  def cond_eps_fn(x, t, y):
    eps = jnp.stack([per_class(x, t, m) for m in MUS])  # [2, B, ...]
    w = jax.nn.softmax(class_logits(schedule)(x, t), axis=-1).T  # [2, B]
    uncond = jnp.sum(w[:, :, None, None, None] * eps, axis=0)
    sel = jnp.where((y == 0)[:, None, None, None], eps[0], eps[1])
    return jnp.where((y == NULL)[:, None, None, None], uncond, sel)

  return cond_eps_fn


@pytest.fixture(scope="module")
def schedule():
  return dj.make_schedule("cosine", 200)


def _sample(eps_fn, schedule, seed=0):
  return jax.jit(lambda r: dj.ddim_sample(eps_fn, schedule, r, SHAPE, 50))(jax.random.key(seed))


def test_cfg_scale_zero_and_one_are_the_unconditional_and_conditional_model(schedule):
  cond = mixture_cond_eps_fn(schedule)
  x = jax.random.normal(jax.random.key(0), (6, 2, 2, 1))
  t = jnp.array([0, 10, 50, 100, 150, 199])
  y = jnp.array([0, 1, 0, 1, 0, 1])
  null = jnp.full_like(y, NULL)
  for scale in (0.0, jnp.asarray(0.0)):  # static shortcut and traced general formula
    got = dj.classifier_free_eps_fn(cond, y, scale, NULL)(x, t)
    np.testing.assert_allclose(got, cond(x, t, null), rtol=1e-6, atol=1e-6)
  for scale in (1.0, jnp.asarray(1.0)):
    got = dj.classifier_free_eps_fn(cond, y, scale, NULL)(x, t)
    np.testing.assert_allclose(got, cond(x, t, y), rtol=1e-5, atol=1e-5)
  w = 3.0
  got = dj.classifier_free_eps_fn(cond, y, w, NULL)(x, t)
  want = cond(x, t, null) + w * (cond(x, t, y) - cond(x, t, null))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cfg_samples_the_requested_class(schedule):
  cond = mixture_cond_eps_fn(schedule)
  y = jnp.ones((SHAPE[0],), jnp.int32)
  x = _sample(dj.classifier_free_eps_fn(cond, y, 1.0, NULL), schedule)
  assert float(x.mean()) == pytest.approx(1.5, abs=0.03)
  assert float(x.std()) == pytest.approx(SD, rel=0.07)
  # Unconditional (scale 0): both classes, half each.
  x = np.asarray(_sample(dj.classifier_free_eps_fn(cond, y, 0.0, NULL), schedule))
  frac = np.mean(x.reshape(SHAPE[0], -1).mean(axis=1) > 0)
  assert frac == pytest.approx(0.5, abs=0.05)
  assert float(x.std()) == pytest.approx(np.sqrt(1.5**2 + SD**2), rel=0.05)


def test_classifier_guidance_with_exact_classifier_is_the_conditional_model(schedule):
  """Bayes on scores: uncond + grad log p(y | x_t) = cond; samples are class 0."""
  cond = mixture_cond_eps_fn(schedule)
  uncond = lambda x, t: cond(x, t, jnp.full((x.shape[0],), NULL))
  guided = lambda y, s: dj.classifier_guidance_eps_fn(
    uncond, schedule, dj.classifier_grad_log_p(class_logits(schedule), y), s
  )
  x = jax.random.normal(jax.random.key(1), (4, 2, 2, 1))
  t = jnp.array([5, 60, 120, 190])
  y4 = jnp.array([0, 1, 0, 1])
  np.testing.assert_allclose(guided(y4, 1.0)(x, t), cond(x, t, y4), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(guided(y4, 0.0)(x, t), uncond(x, t), rtol=1e-6)  # unguided
  x = _sample(guided(jnp.zeros((SHAPE[0],), jnp.int32), 1.0), schedule, seed=2)
  assert float(x.mean()) == pytest.approx(-1.5, abs=0.03)
  assert float(x.std()) == pytest.approx(SD, rel=0.07)


def test_drop_labels():
  y = jnp.arange(10000) % 10
  np.testing.assert_array_equal(dj.drop_labels(jax.random.key(0), y, 10, 0.0), y)
  assert bool(jnp.all(dj.drop_labels(jax.random.key(0), y, 10, 1.0) == 10))
  d = dj.drop_labels(jax.random.key(0), y, 10, 0.2)
  dropped = d == 10
  assert float(dropped.mean()) == pytest.approx(0.2, abs=0.015)
  np.testing.assert_array_equal(d[~dropped], y[~dropped])


def test_guidance_argument_errors(schedule):
  cond = mixture_cond_eps_fn(schedule)
  with pytest.raises(ValueError, match="scale"):
    dj.classifier_free_eps_fn(cond, jnp.zeros(3, jnp.int32), -1.0, NULL)
  with pytest.raises(ValueError, match="shape"):
    dj.classifier_free_eps_fn(cond, jnp.zeros((3, 1), jnp.int32), 2.0, NULL)
  for scale in (1.0, 2.0):  # the one-call scales check the count too
    with pytest.raises(ValueError, match="labels for a batch"):
      dj.classifier_free_eps_fn(cond, jnp.zeros(3, jnp.int32), scale, NULL)(
        jnp.zeros((4, 2, 2, 1)), jnp.zeros(4, jnp.int32)
      )
  # A label past the null label would index outside the embedding: NaN samples.
  for bad in ([0, NULL + 1], [-1, 0]):
    with pytest.raises(ValueError, match=f"0..{NULL}"):
      dj.classifier_free_eps_fn(cond, jnp.array(bad, jnp.int32), 2.0, NULL)
  with pytest.raises(ValueError, match="ints"):
    dj.classifier_free_eps_fn(cond, jnp.zeros(3), 2.0, NULL)
  dj.classifier_free_eps_fn(cond, jnp.array([0, NULL], jnp.int32), 2.0, NULL)  # null: allowed
  with pytest.raises(ValueError, match="num_classes"):
    dj.make_model("test", num_classes=-1)


# Small versions of both U-Nets (quick to compile).
TINY = {
  "simple": lambda **kw: dj.SimpleUNet(channels=(4, 8, 8), time_dim=16, **kw),
  "unet": lambda **kw: dj.UNet(
    base_channels=8,
    channel_mults=(1,),
    num_res_blocks=1,
    num_groups=4,
    num_heads=2,
    dropout=0.0,
    **kw,
  ),
}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_conditional_unet_labels(arch):
  model = TINY[arch](num_classes=3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t = jnp.array([3, 40])
  params = dj.train.run_once(lambda k: model.init(k, x, t)["params"], jax.random.key(1))
  table = params["label_embedding"]["embedding"]
  assert table.shape[0] == 4  # 3 classes + the null label

  @jax.jit
  def outputs(p):
    f = lambda y: model.apply({"params": p}, x, t, y=y)
    return (
      f(None),
      f(jnp.array([0, 2])),
      f(jnp.array([0, 1])),
      f(jnp.array([1, 1])),
      f(jnp.array([3, 3])),
    )

  # Fresh tables are zero: every label gives the unconditional output.
  none, y02, _, _, _ = outputs(params)
  np.testing.assert_array_equal(y02, none)
  params["label_embedding"]["embedding"] = jax.random.normal(jax.random.key(2), table.shape)
  none, _, a, b, null = outputs(params)
  assert not np.allclose(a[0], b[0]) and np.allclose(a[1], b[1])
  np.testing.assert_array_equal(null, none)
  with pytest.raises(ValueError, match="labels must be integers"):
    jax.eval_shape(lambda: model.apply({"params": params}, x, t, y=jnp.array([0.5, 1.0])))
  with pytest.raises(ValueError, match="unconditional U-Net"):
    jax.eval_shape(lambda: TINY[arch]().init(jax.random.key(0), x, t, y=jnp.array([0, 1])))


def test_conditional_train_step_learns_the_label_embedding():
  model = TINY["simple"](num_classes=10)
  schedule = dj.make_schedule("linear", 100)
  tx = optax.adam(1e-2)
  state = dj.create_train_state(jax.random.key(0), model, tx, (8, 8, 1))
  step = jax.jit(
    dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(1), label_dropout=0.5)
  )
  images = jax.random.uniform(jax.random.key(2), (8, 8, 8, 1), minval=-1, maxval=1)
  labels = jnp.arange(8) % 10
  new, m = step(state, (images, labels))
  assert bool(m["finite"])
  table = new.params["label_embedding"]["embedding"]
  used = np.abs(np.asarray(table)).sum(axis=1) > 0
  assert used[:8].any() and not used[8:10].any()  # labels 8, 9 never seen
  with pytest.raises(ValueError, match="images, labels"):
    step(state, images)
  plain = TINY["simple"]()
  with pytest.raises(ValueError, match="unconditional model"):
    dj.make_train_step(plain, schedule, tx, base_rng=jax.random.key(1))(state, (images, labels))
  with pytest.raises(ValueError, match="label_dropout"):
    dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(1), label_dropout=1.5)
