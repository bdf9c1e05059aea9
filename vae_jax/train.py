"""VAE training: a train state, and a whole epoch as one compiled `lax.scan`."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from nnbase import pixels
from vae_jax.models import VAE, init_vae, vae_fns
from vae_jax.objectives import batch_loss, example_noise, iwae_bound

# optax >= 0.2.4 has optax.tree.norm; optax.global_norm is its deprecated name.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@flax.struct.dataclass
class VAEState:
  step: jnp.ndarray
  params: dict
  opt_state: optax.OptState


def create_state(
  rng: jax.Array, vae: VAE, tx: optax.GradientTransformation, latent_dim: int
) -> VAEState:
  params = init_vae(vae, rng, latent_dim)
  return VAEState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


to_unit = pixels.u8_to_unit  # uint8 -> [0, 1] (torchvision's ToTensor)


BINARIZE = ("none", "dynamic")


def binarize(rng: jax.Array, images_u8: jax.Array) -> jax.Array:
  """Stochastic binarization: each pixel is 1 with probability its grey level
  (uint8 [...] -> float32 0/1), the IWAE paper's dynamic MNIST."""
  x = to_unit(images_u8)
  return (jax.random.uniform(rng, x.shape) < x).astype(jnp.float32)


def binarize_u8(rng: jax.Array, images_u8: jax.Array) -> jax.Array:
  """A fixed stochastic binarization as uint8 0/255 (e.g. of the test set once)."""
  return (binarize(rng, images_u8) * 255).astype(jnp.uint8)


def make_train_epoch(
  vae: VAE,
  tx: optax.GradientTransformation,
  *,
  base_rng: jax.Array,
  batch_size: int,
  beta: float = 1.0,
  likelihood: str = "bernoulli",
  skip_nonfinite: bool = False,
  binarization: str = "none",
) -> Callable:
  """Returns `train_epoch(state, images_u8, epoch) -> (state, metrics)`, jittable.

  binarization "dynamic" trains on a fresh Bernoulli draw of every batch
  (pixel = 1 with probability its grey level); "none" on grey levels.

  Shuffles the device-resident uint8 images [N, 28, 28, 1] with a key folded
  from `epoch`, then scans the update over N // batch_size batches (the last
  partial batch is dropped). Per-step keys are fold_in(step_rng, step), with
  (shuffle_rng, step_rng) = split(base_rng). The z noise of every step is
  drawn from them before the scan (N x latent floats: 4.8 MB for MNIST at
  latent 20).

  With skip_nonfinite, an update whose loss or gradient norm is not finite
  leaves params and optimizer state unchanged (only `step` advances).
  Without it, only the loss is checked per step (the gradient-norm reduction
  cost 9% of the MNIST epoch on the CPU): a non-finite gradient or update
  makes the parameters non-finite, so the next step's loss, or the check of
  the parameters at the end of the epoch, counts it.
  Metrics: loss, rec, kl (per-image means over the epoch's finite steps) and
  nonfinite_steps (a count; the means are NaN when it is > 0 and
  skip_nonfinite is off).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if binarization not in BINARIZE:
    raise ValueError(f"binarization must be one of {BINARIZE}, got {binarization!r}")
  shuffle_rng, step_rng = jax.random.split(base_rng)

  def keys(step):
    """(binarization key or None, the z noise's key) of the update at `step`."""
    rng = jax.random.fold_in(step_rng, step)
    if binarization == "dynamic":
      bin_rng, rng = jax.random.split(rng)
      return bin_rng, rng
    return None, rng

  def step(state: VAEState, batch):
    x_u8, noise = batch
    bin_rng, _ = keys(state.step)
    x = binarize(bin_rng, x_u8) if bin_rng is not None else to_unit(x_u8)

    def loss_fn(p):
      enc, dec = vae_fns(vae, p)
      return batch_loss(enc, dec, None, x, beta, likelihood, noise=noise)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    finite = jnp.isfinite(loss)
    if skip_nonfinite:
      finite &= jnp.isfinite(_tree_norm(grads))
      kept = state.replace(step=state.step + 1)
      new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept)
    return new, {"loss": loss, "rec": aux["rec"], "kl": aux["kl"], "finite": finite}

  def train_epoch(state, images_u8, epoch):
    n = images_u8.shape[0]
    steps = n // batch_size
    if steps < 1:
      raise ValueError(f"batch_size {batch_size} exceeds the {n} training images")
    perm = jax.random.permutation(jax.random.fold_in(shuffle_rng, epoch), n)
    idx = perm[: steps * batch_size].reshape(steps, batch_size)
    # The epoch's z noise [steps, B, L] in one vectorised draw, the same numbers
    # each step would draw (split(key, B)[i] for example i): inside the scan,
    # two small threefry loops per step took ~5% of the MNIST epoch on the CPU.
    x0 = jax.ShapeDtypeStruct((batch_size,) + images_u8.shape[1:], jnp.float32)
    mean = jax.eval_shape(lambda p, x: vae_fns(vae, p)[0](x)[0], state.params, x0)
    latent = mean.shape[-1]
    noise = jax.vmap(
      lambda s: example_noise(jax.random.split(keys(s)[1], batch_size), latent, mean.dtype)
    )(state.step + jnp.arange(steps))
    state, m = jax.lax.scan(
      lambda s, a: step(s, (jnp.take(images_u8, a[0], axis=0), a[1])), state, (idx, noise)
    )
    finite = m.pop("finite")
    out = {"nonfinite_steps": jnp.sum(~finite)}
    if skip_nonfinite:
      count = jnp.maximum(jnp.sum(finite), 1)
      out.update({k: jnp.sum(jnp.where(finite, v, 0.0)) / count for k, v in m.items()})
    else:
      out.update(jax.tree.map(jnp.mean, m))
      # A bad last update shows only in the parameters.
      bad = ~jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(state)]))
      out["nonfinite_steps"] = jnp.maximum(out["nonfinite_steps"], bad.astype(jnp.int32))
    return state, out

  return train_epoch


def scan_batches(fn: Callable, images_u8: jax.Array, batch_size: int, rng: jax.Array) -> Any:
  """Applies fn(rng_i, x [b, ...] in [0, 1]) to the full batches of images_u8
  in one `lax.scan`; rng_i = fold_in(rng, i). Returns the stacked outputs."""
  n = images_u8.shape[0]
  b = min(batch_size, n)
  steps = n // b
  xs = images_u8[: steps * b].reshape((steps, b) + images_u8.shape[1:])
  _, out = jax.lax.scan(
    lambda _, a: (None, fn(jax.random.fold_in(rng, a[0]), to_unit(a[1]))),
    None,
    (jnp.arange(steps), xs),
  )
  return out


def make_evaluate(vae: VAE, *, batch_size: int = 500, likelihood: str = "bernoulli") -> Callable:
  """Returns `evaluate(params, images_u8, rng) -> metrics` (loss, rec, kl per image,
  beta = 1), one compiled scan over all full batches of the set."""

  def evaluate(params, images_u8, rng):
    enc, dec = vae_fns(vae, params)
    m = scan_batches(
      lambda r, x: batch_loss(enc, dec, r, x, 1.0, likelihood)[1], images_u8, batch_size, rng
    )
    m = jax.tree.map(jnp.mean, m)
    return {"loss": m["elbo_loss"], "rec": m["rec"], "kl": m["kl"]}

  return evaluate


def make_iwae_nll(
  vae: VAE, *, k: int, batch_size: int = 100, chunk: int = 100, likelihood: str = "bernoulli"
) -> Callable:
  """Returns `iwae_nll(params, images_u8 [N, ...], rng) -> [N // batch_size * batch_size]`
  per-image NLL estimates (-IWAE bound with k samples), scanning over batches."""

  def iwae_nll(params, images_u8, rng):
    enc, dec = vae_fns(vae, params)
    nll = scan_batches(
      lambda r, x: -iwae_bound(enc, dec, r, x, k, chunk, likelihood), images_u8, batch_size, rng
    )
    return nll.reshape(-1)

  return iwae_nll
