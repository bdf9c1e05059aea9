"""The MNIST feature network: a small CNN classifier whose penultimate layer
gives the features for FD-MNIST, KID and precision/recall.

Its weights ship in `sample_quality/weights/mnist_cnn.npz` and are read with
`np.load(allow_pickle=False)`; the sha256 of their contents is checked on
every load. `python -m experiments.train_classifier` reproduces them.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nnbase import param_files
from nnbase.conv import Conv
from nnbase.param_files import WeightsError, params_sha256, save_params  # noqa: F401

WEIGHTS_PATH = os.path.join(os.path.dirname(__file__), "weights", "mnist_cnn.npz")
# sha256 of the weights' contents (see `params_sha256`), written by
# `python -m experiments.train_classifier`.
WEIGHTS_SHA256 = "d765b9bc5543f8b644336efdf458e7126bfc4c71f07c9d045221eeb20a820c59"
FEATURE_DIM = 128
# MNIST train-set pixel mean and std (of x / 255), the usual input normalisation.
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081


class MNISTClassifier(nn.Module):
  """Conv(3x3)-ReLU-MaxPool stages, then Dense-ReLU (the features) and Dense(10).

  Input [B, 28, 28, 1] in [0, 1]; returns (logits [B, 10], features [B, feature_dim]).
  """

  widths: Sequence[int] = (32, 64, 128)
  feature_dim: int = FEATURE_DIM
  dropout: float = 0.3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = (x - PIXEL_MEAN) / PIXEL_STD
    for w in self.widths:
      x = nn.relu(Conv(w)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    h = nn.relu(nn.Dense(self.feature_dim)(x))
    logits = nn.Dense(10)(nn.Dropout(self.dropout, deterministic=not train)(h))
    return logits, h


def load_params(path: str = WEIGHTS_PATH, sha256: str | None = WEIGHTS_SHA256) -> dict:
  """Loads classifier params from an npz, checking their hash (None skips the check)."""
  return param_files.load_params(
    path,
    sha256,
    what="classifier weights",
    hint="reinstall the package or rerun `python -m experiments.train_classifier`",
  )


def make_apply(
  model: MNISTClassifier | None = None, batch_size: int = 1000
) -> Callable[[dict, jnp.ndarray], tuple]:
  """Returns jitted `apply(params, images [N, 28, 28, 1] in [0, 1]) -> (logits, features)`,
  evaluated in batches of `batch_size` with one `lax.map` (N need not divide it)."""
  model = model or MNISTClassifier()

  @jax.jit
  def apply(params, images):
    n = images.shape[0]
    b = min(batch_size, n)
    pad = (-n) % b
    x = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
    out = jax.lax.map(
      lambda xb: model.apply({"params": params}, xb), x.reshape((-1, b) + images.shape[1:])
    )
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:n], out)

  return apply
