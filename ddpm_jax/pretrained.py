"""Pretrained models that ship with the package: `load_pretrained("mnist")`.

Each model is a class-conditional U-Net trained with label dropout by
`python -m experiments.mnist_ddpm` (the exact command, config, wall time and
measured sample quality sit in the JSON record beside the weights). Its EMA
parameters are a compressed, pickle-free npz whose content sha256 is pinned
here and checked on every load.

  m = load_pretrained("mnist")
  eps_fn = m.eps_fn(labels=jnp.arange(10), guidance_scale=2.0)
  x = ddpm_jax.sample(eps_fn, m.schedule, jax.random.key(0), (10,) + m.image_shape)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from ddpm_jax.guidance import classifier_free_eps_fn, model_cond_eps_fn
from ddpm_jax.schedules import Schedule, make_schedule
from ddpm_jax.unet import make_model
from nnbase import param_files

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
# name -> (weights file, sha256 of the parameters' contents, see `param_files.params_sha256`)
REGISTRY = {
  "mnist": ("mnist_cond.npz", "759bb9e5b1ba98f8d90e1669822db052aba002d16e39092f2e275f116dea93a9"),
}


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """What a sampler needs: the model, its EMA params, the schedule and labels.

  Attributes:
    model: the U-Net (class-conditional; null label = num_classes).
    params: EMA parameters.
    schedule: the noise schedule it was trained with.
    num_classes: number of classes (the null label's index).
    parameterization: what the network predicts ("eps", "x0" or "v").
    image_shape: (H, W, C) of its images, in [-1, 1].
    record: the JSON record (command, config, steps, wall time, quality).
  """

  model: nn.Module
  params: Any
  schedule: Schedule
  num_classes: int
  parameterization: str
  image_shape: tuple
  record: dict

  def eps_fn(self, labels=None, guidance_scale: float = 1.0):
    """`eps_fn(x_t, t)` for the samplers: labels [B] (ints in 0..num_classes-1,
    or num_classes for unconditional rows) with classifier-free guidance of
    `guidance_scale`; labels=None draws unconditional samples."""
    cond = model_cond_eps_fn(self.model, self.params, self.schedule, self.parameterization)
    if labels is None:
      return lambda x_t, t: cond(x_t, t, jnp.full((x_t.shape[0],), self.num_classes, jnp.int32))
    return classifier_free_eps_fn(
      cond, jnp.asarray(labels, jnp.int32), guidance_scale, self.num_classes
    )


def record_path(name: str) -> str:
  return os.path.join(WEIGHTS_DIR, os.path.splitext(REGISTRY[name][0])[0] + ".json")


def load_pretrained(name: str = "mnist", path: Optional[str] = None) -> Pretrained:
  """The shipped model `name`, its params' sha256 checked (WeightsError if not).

  `path` reads the weights from another file (its hash is still checked
  against the registry's).
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown pretrained model {name!r}; expected one of {sorted(REGISTRY)}")
  file_name, sha256 = REGISTRY[name]
  path = path or os.path.join(WEIGHTS_DIR, file_name)
  try:
    with open(record_path(name)) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise param_files.WeightsError(
      f"cannot read the record of pretrained model {name!r}: {e}"
    ) from e
  params = param_files.load_params(path, sha256, what=f"pretrained model {name!r}")
  c = record["config"]
  options = {}
  if c["schedule"] in ("linear", "quadratic"):
    options = dict(beta_start=c["beta_start"], beta_end=c["beta_end"])
  schedule = make_schedule(c["schedule"], c["timesteps"], **options)
  num_classes = int(record["num_classes"])
  model = make_model(c["model"], num_classes=num_classes)
  return Pretrained(
    model=model,
    params=params,
    schedule=schedule,
    num_classes=num_classes,
    parameterization=c["parameterization"],
    image_shape=tuple(record["image_shape"]),
    record=record,
  )
