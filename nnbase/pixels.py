"""Pixel scaling, one home: uint8 <-> [0, 1] <-> [-1, 1].

The DDPM works on [-1, 1] (the seeds' Normalize(0.5, 0.5)); the VAE and the
MNIST classifier on [0, 1] (torchvision's ToTensor); files and metrics on
uint8, rounded as a PNG would store them.
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _uint8(images_u8: Any) -> jax.Array:
  """`images_u8` as a jnp array; ValueError unless its dtype is uint8 (float
  images already scaled to [0, 1] would otherwise be divided by 255 again)."""
  x = jnp.asarray(images_u8)
  if x.dtype != jnp.uint8:
    raise ValueError(f"expected uint8 images (pixel values 0..255), got dtype {x.dtype}")
  return x


def u8_to_unit(images_u8: jax.Array) -> jax.Array:
  """uint8 [...] -> float32 in [0, 1] (jnp; works under jit)."""
  return _uint8(images_u8).astype(jnp.float32) / 255.0


def u8_to_signed(images_u8: jax.Array) -> jax.Array:
  """uint8 [...] -> float32 in [-1, 1] (jnp; works under jit)."""
  return _uint8(images_u8).astype(jnp.float32) / 127.5 - 1.0


def to_unit(images: Any, value_range: Tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """Float images in value_range -> float32 in [0, 1], clipped (numpy, for plots).
  NaN (a diverged run's samples) becomes 0, black."""
  lo, hi = value_range
  u = (np.asarray(images, np.float32) - lo) / (hi - lo)
  return np.clip(np.nan_to_num(u, nan=0.0), 0.0, 1.0)


def to_uint8(images: Any, value_range: Tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """Float images in value_range -> uint8, clipped and rounded as a PNG stores them;
  NaN becomes 0."""
  lo, hi = value_range
  u = (np.asarray(images, np.float64) - lo) / (hi - lo)
  return np.rint(np.clip(np.nan_to_num(u, nan=0.0), 0, 1) * 255).astype(np.uint8)
