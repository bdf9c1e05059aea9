"""The VAE jobs' shared set-up: the run configuration, its presets and checks,
the optimiser, and loading a trained run (`mnist_vae` and `evaluate` use it).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import optax

import vae_jax as vj
from experiments import cli
from experiments.checkpoints import restore_latest


@dataclasses.dataclass(frozen=True)
class Config:
  """The VAE job's configuration; the defaults are the seed notebook's."""

  model: str = cli.flag("mlp", "mlp (the seeds' 784-hidden-latent) or conv")
  latent_dim: int = cli.flag(20, "latent dimensions (2 gives the manifold plot)")
  hidden: int = cli.flag(400, "hidden width")
  num_hidden_layers: int = cli.flag(1, "hidden layers in each MLP")
  epochs: int = cli.flag(10, "training epochs")
  batch_size: int = cli.flag(128, "batch size")
  learning_rate: float = cli.flag(1e-3, "Adam learning rate")
  lr_schedule: str = cli.flag(
    "constant", "constant (the seeds') or cosine (decay to 0 over the run)"
  )
  beta: float = cli.flag(1.0, "weight of the KL term (beta-VAE); 1 is the ELBO")
  likelihood: str = cli.flag("bernoulli", "bernoulli (the seeds' BCE) or gaussian (sd 0.1)")
  iwae_k: int = cli.flag(1000, "importance samples for the final test NLL estimate")
  eval_examples: int = cli.flag(10000, "test images used for the final IWAE estimate")
  seed: int = cli.flag(0, "random seed")
  binarize: str = cli.flag(
    "none",
    "none: grey-level pixels with the seeds' BCE (the IWAE figure is then a bound on a "
    "cross-entropy, not a likelihood); dynamic: a fresh Bernoulli draw of every training batch "
    "and one fixed draw of the test set, so the IWAE figure bounds a true NLL (the IWAE paper's "
    "setting)",
  )
  skip_nonfinite: bool = cli.flag(
    False,
    "skip updates whose loss or gradient is not finite "
    "(default: stop with an error, keeping the last checkpoint)",
  )


PRESETS = {
  "default": {"_doc": "the seed notebook: MLP 784-400-20, batch 128, Adam 1e-3, 10 epochs"},
  "better": {
    "_doc": "two hidden layers of 512, latent 32, 50 epochs, cosine decay; "
    "a few minutes on 2 CPU cores",
    "hidden": 512,
    "num_hidden_layers": 2,
    "latent_dim": 32,
    "epochs": 50,
    "lr_schedule": "cosine",
    "learning_rate": 1e-3,
  },
  "latent2": {
    "_doc": "the seed's 2-D latent space for the manifold plot",
    "latent_dim": 2,
    "epochs": 20,
  },
  "smoke": {
    "_doc": "one epoch, small IWAE (tests)",
    "epochs": 1,
    "batch_size": 500,
    "iwae_k": 8,
    "eval_examples": 200,
  },
}


TEST_BINARIZATION_SEED = 20_231_123  # --binarize dynamic: the test set's fixed draw


def validate(c: Config) -> None:
  def need(ok, msg):
    if not ok:
      raise cli.UsageError(msg)

  need(c.model in ("mlp", "conv"), f"--model must be mlp or conv, got {c.model!r}")
  need(
    c.binarize in vj.train.BINARIZE,
    f"--binarize must be one of {vj.train.BINARIZE}, got {c.binarize!r}",
  )
  need(
    c.binarize == "none" or c.likelihood == "bernoulli",
    "--binarize dynamic needs --likelihood bernoulli",
  )
  need(c.latent_dim >= 1, f"--latent_dim must be >= 1, got {c.latent_dim}")
  need(c.hidden >= 1, f"--hidden must be >= 1, got {c.hidden}")
  need(c.num_hidden_layers >= 1, f"--num_hidden_layers must be >= 1, got {c.num_hidden_layers}")
  need(c.epochs >= 1, f"--epochs must be >= 1, got {c.epochs}")
  need(1 <= c.batch_size <= 60000, f"--batch_size must lie in [1, 60000], got {c.batch_size}")
  need(c.learning_rate > 0, f"--learning_rate must be > 0, got {c.learning_rate}")
  need(
    c.lr_schedule in ("constant", "cosine"),
    f"--lr_schedule must be constant or cosine, got {c.lr_schedule!r}",
  )
  need(c.beta >= 0, f"--beta must be >= 0, got {c.beta}")
  need(
    c.likelihood in vj.objectives.LIKELIHOODS,
    f"--likelihood must be bernoulli or gaussian, got {c.likelihood!r}",
  )
  need(c.iwae_k >= 1, f"--iwae_k must be >= 1, got {c.iwae_k}")
  need(
    1 <= c.eval_examples <= 10000, f"--eval_examples must lie in [1, 10000], got {c.eval_examples}"
  )


def make_optimizer(c: Config, steps_per_epoch: int):
  if c.lr_schedule == "cosine":
    return optax.adam(optax.cosine_decay_schedule(c.learning_rate, c.epochs * steps_per_epoch))
  return optax.adam(c.learning_rate)


def load_trained(workdir: str):
  """(config, vae, params, step) of the VAE run in `workdir`, from its latest
  checkpoint; UsageError when there is none."""
  c, _ = cli.load_config(Config, workdir)
  validate(c)
  vae = vj.make_vae(c.model, c.latent_dim, c.hidden, c.num_hidden_layers)
  init = functools.partial(
    vj.create_state, jax.random.key(0), vae, make_optimizer(c, 1), c.latent_dim
  )
  state, step = restore_latest(os.path.join(workdir, "checkpoints"), init)
  return c, vae, state.params, step
