"""Sampling from the prior, reconstruction and latent interpolation."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def sample_prior(decode_fn: Callable, rng: jax.Array, num: int, latent_dim: int) -> jax.Array:
  """Decodes z ~ N(0, I): returns pixel means [num, 28, 28, 1] in [0, 1]."""
  z = jax.random.normal(rng, (num, latent_dim))
  return jax.nn.sigmoid(decode_fn(z)).reshape(num, 28, 28, 1)


def reconstruct(encode_fn: Callable, decode_fn: Callable, x: jax.Array) -> jax.Array:
  """Decodes the posterior means of x [B, 28, 28, 1]: [B, 28, 28, 1] in [0, 1]."""
  mean, _ = encode_fn(x)
  return jax.nn.sigmoid(decode_fn(mean)).reshape(x.shape[0], 28, 28, 1)


def interpolate(decode_fn: Callable, z0: jax.Array, z1: jax.Array, num: int) -> jax.Array:
  """Decodes num points on the segment z0 -> z1 ([L] each): [num, 28, 28, 1]."""
  w = jnp.linspace(0.0, 1.0, num)[:, None]
  z = (1.0 - w) * z0[None] + w * z1[None]
  return jax.nn.sigmoid(decode_fn(z)).reshape(num, 28, 28, 1)


def decode_grid(decode_fn: Callable, coords: jax.Array) -> jax.Array:
  """Decodes 2-D latent coordinates [N, 2]: [N, 28, 28, 1] in [0, 1]."""
  return jax.nn.sigmoid(decode_fn(coords)).reshape(coords.shape[0], 28, 28, 1)
