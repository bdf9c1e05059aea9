"""Guided sampling as `eps_fn` wrappers: each returns a plain `eps_fn(x_t, t)`
that any sampler takes, so guidance composes with DDPM, DDIM and DPM-Solver.

* Classifier-free guidance (Ho & Salimans 2022): a class-conditional network
  trained with its label replaced by a null label with probability p
  (`train.drop_labels`) is evaluated with and without the label, and
  eps = eps(x_t, t, null) + w (eps(x_t, t, y) - eps(x_t, t, null)).
  w = 0 is the unconditional model, w = 1 the conditional one, w > 1 trades
  diversity for fidelity to the class.
* Classifier guidance (Dhariwal & Nichol 2021; the tutorial's 3.5.2): given
  grad_log_p(x_t, t) = grad_x log p(y | x_t), the score gains
  s * grad_log_p; in eps terms (score = -eps / sqrt(1 - ab_t))
  eps = eps(x_t, t) - s sqrt(1 - ab_t) grad_log_p(x_t, t).
  With the exact noisy-data classifier and s = 1 this is exactly the
  conditional model (Bayes' rule on the scores).

Labels are ints [B]; a conditional U-Net's null label is its `num_classes`.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion import extract
from ddpm_jax.eps_fns import CondEpsFn, model_cond_eps_fn  # noqa: F401  (re-exported)
from ddpm_jax.schedules import Schedule

# cond_eps_fn(x_t [B,H,W,C], t [B], y [B] int) -> eps [B,H,W,C]
Scale = Union[float, jnp.ndarray]


def classifier_free_eps_fn(
  cond_eps_fn: CondEpsFn, labels: jnp.ndarray, scale: Scale, null_label: int
) -> Callable:
  """`eps_fn(x_t, t)` with classifier-free guidance of strength `scale` towards `labels`.

  Args:
    cond_eps_fn: (x_t, t, y) -> eps of a model trained with label dropout.
    labels: [B] target classes (entries equal to null_label give
      unconditional samples at any scale).
    scale: guidance weight w >= 0: 0 = unconditional, 1 = conditional. A
      Python number of 0 or 1 costs one network call per step; other values
      (and traced arrays, to sweep w without recompiling) cost one call on a
      doubled batch.
    null_label: the model's null label (a conditional U-Net's num_classes).
  """
  if isinstance(scale, (int, float)) and not scale >= 0:
    raise ValueError(f"guidance scale must be >= 0, got {scale!r}")
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be ints of shape [B], got {labels.dtype}{list(labels.shape)}")
  if not isinstance(labels, jax.core.Tracer) and labels.size:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > null_label:  # the embedding lookup would give NaN samples
      raise ValueError(
        f"labels must lie in 0..{null_label} ({null_label}: the null label), got {lo}..{hi}"
      )
  null = jnp.full_like(labels, null_label)

  one_call = isinstance(scale, (int, float)) and scale in (0, 1)

  def eps_fn(x_t, t):
    b = x_t.shape[0]
    if labels.shape[0] != b:
      raise ValueError(f"{labels.shape[0]} labels for a batch of {b} images")
    if one_call:
      return cond_eps_fn(x_t, t, labels if scale == 1 else null)
    both = cond_eps_fn(
      jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([labels, null])
    )
    eps_c, eps_u = both[:b], both[b:]
    return eps_u + jnp.asarray(scale, eps_u.dtype) * (eps_c - eps_u)

  return eps_fn


def classifier_guidance_eps_fn(
  eps_fn: Callable, schedule: Schedule, grad_log_p: Callable, scale: Scale = 1.0
) -> Callable:
  """`eps_fn(x_t, t)` guided by a classifier's gradient.

  Args:
    eps_fn: (x_t, t) -> eps, usually the unconditional model.
    schedule: the noise schedule (for sqrt(1 - ab_t)).
    grad_log_p: (x_t, t) -> grad_x log p(y | x_t) [B, H, W, C], e.g.
      `classifier_grad_log_p(logits_fn, labels)` for a noise-aware classifier.
    scale: guidance strength s (1 = Bayes' rule, larger = sharper).
  """
  if isinstance(scale, (int, float)) and not scale >= 0:
    raise ValueError(f"guidance scale must be >= 0, got {scale!r}")

  def guided(x_t, t):
    eps = eps_fn(x_t, t)
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
    g = grad_log_p(x_t, t)
    return (eps - scale * sigma * g).astype(eps.dtype)

  return guided


def classifier_grad_log_p(logits_fn: Callable, labels: jnp.ndarray) -> Callable:
  """grad_x log softmax(logits_fn(x_t, t))[y] for each example, as the
  `grad_log_p(x_t, t)` of `classifier_guidance_eps_fn`.

  logits_fn(x_t [B,H,W,C], t [B]) -> logits [B, K] must treat the examples
  independently (no batch statistics), so the gradient of the batch sum is
  each example's own gradient.
  """
  labels = jnp.asarray(labels)

  def grad_log_p(x_t, t):
    def total(x):
      logp = jax.nn.log_softmax(logits_fn(x, t).astype(jnp.float32), axis=-1)
      return jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    return jax.grad(total)(x_t.astype(jnp.float32))

  return grad_log_p
