"""ddpm_jax: denoising diffusion probabilistic models in pure JAX.

The public API: schedules, diffusion maths, losses, U-Nets, samplers and the
training step. Everything is a pure function or a Flax module holding only
parameters; samplers take a plain `eps_fn(x_t, t)`.
"""

from ddpm_jax import (
  eps_fns,
  guidance,
  likelihood,
  parallel,
  parameterization,
  pretrained,
)
from ddpm_jax.diffusion import (
  extract,
  p_mean_from_eps,
  predict_eps_from_x0,
  predict_x0_from_eps,
  q_posterior_mean_variance,
  q_sample,
)
from ddpm_jax.eps_fns import eps_fn_from_model, gaussian_eps_fn, model_cond_eps_fn, model_eps_fn
from ddpm_jax.guidance import (
  classifier_free_eps_fn,
  classifier_grad_log_p,
  classifier_guidance_eps_fn,
)
from ddpm_jax.losses import diffusion_loss, eps_loss
from ddpm_jax.parameterization import loss_weight, snr
from ddpm_jax.pretrained import Pretrained, load_pretrained
from ddpm_jax.samplers import (
  SAMPLERS,
  ddim_sample,
  ddim_timesteps,
  ddpm_sample,
  dpm_solver_sample,
  sample,
  sampler_timesteps,
  trajectory_timesteps,
)
from ddpm_jax.schedules import Schedule, make_schedule, schedule_from_betas
from ddpm_jax.train import (
  TrainState,
  create_train_state,
  drop_labels,
  ema_update,
  learning_rate_schedule,
  make_optimizer,
  make_train_step,
)
from ddpm_jax.unet import PRESETS, SimpleUNet, UNet, make_model, timestep_embedding
from nnbase import param_files  # re-exported: dj.param_files.WeightsError
from nnbase.conv import Conv, ConvTranspose2x, conv_gemm, conv_transpose_2x

__all__ = [
  "Conv",
  "ConvTranspose2x",
  "PRESETS",
  "classifier_free_eps_fn",
  "classifier_grad_log_p",
  "classifier_guidance_eps_fn",
  "drop_labels",
  "guidance",
  "likelihood",
  "model_cond_eps_fn",
  "parallel",
  "parameterization",
  "Schedule",
  "SimpleUNet",
  "TrainState",
  "UNet",
  "conv_gemm",
  "conv_transpose_2x",
  "create_train_state",
  "ddim_sample",
  "ddim_timesteps",
  "ddpm_sample",
  "diffusion_loss",
  "dpm_solver_sample",
  "ema_update",
  "eps_fn_from_model",
  "eps_loss",
  "extract",
  "loss_weight",
  "snr",
  "learning_rate_schedule",
  "make_model",
  "make_optimizer",
  "make_schedule",
  "make_train_step",
  "model_eps_fn",
  "p_mean_from_eps",
  "predict_eps_from_x0",
  "predict_x0_from_eps",
  "q_posterior_mean_variance",
  "q_sample",
  "schedule_from_betas",
  "timestep_embedding",
  "trajectory_timesteps",
  "Pretrained",
  "eps_fns",
  "gaussian_eps_fn",
  "SAMPLERS",
  "load_pretrained",
  "param_files",
  "pretrained",
  "sample",
  "sampler_timesteps",
]
