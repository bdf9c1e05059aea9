"""vae_jax: variational autoencoders in pure JAX (the seeds' MNIST VAE and friends)."""

from vae_jax.models import (
  VAE,
  ConvDecoder,
  ConvEncoder,
  MLPDecoder,
  MLPEncoder,
  init_vae,
  make_vae,
  vae_fns,
)
from vae_jax.objectives import (
  batch_loss,
  bernoulli_log_likelihood,
  elbo_terms,
  example_noise,
  gaussian_kl,
  gaussian_log_density,
  gaussian_log_likelihood,
  iwae_bound,
  reparameterize,
)
from vae_jax.sampling import decode_grid, interpolate, reconstruct, sample_prior
from vae_jax.train import VAEState, create_state, make_evaluate, make_iwae_nll, make_train_epoch

__all__ = [
  "VAE",
  "VAEState",
  "ConvDecoder",
  "ConvEncoder",
  "MLPDecoder",
  "MLPEncoder",
  "batch_loss",
  "bernoulli_log_likelihood",
  "create_state",
  "decode_grid",
  "elbo_terms",
  "example_noise",
  "gaussian_kl",
  "gaussian_log_density",
  "gaussian_log_likelihood",
  "init_vae",
  "interpolate",
  "iwae_bound",
  "make_evaluate",
  "make_iwae_nll",
  "make_train_epoch",
  "make_vae",
  "reconstruct",
  "reparameterize",
  "sample_prior",
  "vae_fns",
]
