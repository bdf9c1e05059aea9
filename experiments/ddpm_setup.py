"""The DDPM jobs' shared set-up: the run configuration, its presets and
checks, and what turns a config into a schedule, model and sampler, or a
workdir into a trained model. `mnist_ddpm` (training), `evaluate`, `sample`
and `export_pretrained` all use it; no job imports another.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

import ddpm_jax as dj
from experiments import cli, runtime
from experiments.checkpoints import restore_latest
from experiments.host_pipeline import PIPELINES
from nnbase import pixels


@dataclasses.dataclass(frozen=True)
class Config:
  """The DDPM job's configuration; the defaults reproduce the seed notebook."""

  model: str = cli.flag("simple", f"U-Net preset: {sorted(dj.PRESETS)}")
  schedule: str = cli.flag("linear", "noise schedule: linear, cosine or quadratic")
  timesteps: int = cli.flag(1000, "diffusion steps T")
  beta_start: float = cli.flag(1e-4, "first beta of the linear or quadratic schedule")
  beta_end: float = cli.flag(0.02, "last beta of the linear or quadratic schedule")
  epochs: int = cli.flag(30, "training epochs (ignored when --steps is set)")
  steps: Optional[int] = cli.flag(None, "total training steps; overrides --epochs")
  batch_size: int = cli.flag(128, "global batch size")
  learning_rate: float = cli.flag(1e-3, "peak Adam learning rate")
  warmup_steps: int = cli.flag(500, "linear warmup steps before the cosine decay")
  grad_clip: float = cli.flag(1.0, "global gradient-norm clip")
  ema_decay: float = cli.flag(0.999, "EMA decay of the parameters used for sampling")
  loss: str = cli.flag("mse", "loss on the target: mse or l1")
  parameterization: str = cli.flag("eps", "what the U-Net predicts: eps (the seeds'), x0 or v")
  loss_weighting: str = cli.flag(
    "none", "per-timestep loss weight: none, min_snr (Min-SNR-gamma) or p2"
  )
  min_snr_gamma: float = cli.flag(5.0, "gamma of --loss_weighting min_snr")
  sampler: str = cli.flag(
    "ddpm",
    "sampler for the grids: ddpm (ancestral, all T steps), ddim, dpm (DPM-Solver++ 2M) or "
    "dpm_sde (its stochastic form)",
  )
  sample_steps: Optional[int] = cli.flag(
    None,
    "sampler steps (1..T); default: T for ddpm (fewer respace the chain), 50 for ddim, 20 for "
    "dpm and dpm_sde",
  )
  eta: float = cli.flag(0.0, "DDIM stochasticity in [0, 1]")
  spacing: Optional[str] = cli.flag(
    None,
    "sampler timestep spacing: trailing, linspace or "
    "quadratic (and logsnr for dpm, dpm_sde); default: trailing, logsnr "
    "for dpm and dpm_sde",
  )
  temperature: float = cli.flag(
    1.0,
    "scale of the noise the ddpm, ddim and dpm_sde samplers add at each "
    "step (1 = exact; < 1 sharper, less diverse)",
  )
  variance: str = cli.flag("beta", "ancestral variance: beta (the seed's) or beta_tilde")
  clip_x0: bool = cli.flag(True, "clip the predicted x0 to [-1, 1] while sampling")
  num_samples: int = cli.flag(64, "images in each sample grid (unconditional runs)")
  sample_every_epochs: int = cli.flag(5, "draw a sample grid every this many epochs")
  checkpoint_every_steps: int = cli.flag(1000, "save a checkpoint every this many steps")
  log_every_steps: int = cli.flag(50, "write metrics.jsonl every this many steps")
  seed: int = cli.flag(0, "random seed")
  skip_nonfinite: bool = cli.flag(
    False,
    "skip updates whose loss or gradient is not finite "
    "(default: stop with an error, keeping the last checkpoint)",
  )
  conditional: bool = cli.flag(
    False,
    "train class-conditionally on the digit labels (label "
    "embedding, classifier-free guidance); grids get one row per digit",
  )
  label_dropout: float = cli.flag(
    0.1, "with --conditional: probability of training on the null label instead of the digit"
  )
  guidance_scale: float = cli.flag(
    3.0,
    "with --conditional: classifier-free guidance weight of "
    "the grids (0 unconditional, 1 conditional, > 1 guided)",
  )
  samples_per_class: int = cli.flag(8, "with --conditional: grid columns (samples per digit)")
  compute_dtype: str = cli.flag(
    "float32",
    "U-Net compute dtype: float32, or bfloat16 for "
    "GPU/TPU mixed precision (parameters and optimizer stay float32)",
  )
  dataset: str = cli.flag(
    "mnist",
    "a TFDS image dataset with an 'image' feature (mnist, fashion_mnist, kmnist, cifar10, "
    "...), prepared in --data_dir; mnist also has a verified offline copy",
  )
  data_dir: Optional[str] = cli.flag(
    None, "TFDS data dir (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)"
  )

  data_pipeline: str = cli.flag(
    "auto",
    "where training batches are gathered: device (the split kept in device memory), host "
    "(read per batch, this process's rows only, one thread reading ahead), or auto (device "
    "up to 2 GiB of images)",
  )

  # Fields a config.json from before them may lack (their defaults held then).
  ADDED_LATER: ClassVar[tuple] = ("dataset", "data_dir", "data_pipeline")


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DDIM_DEFAULT_STEPS = dj.samplers.DEFAULT_STEPS["ddim"]
DPM_DEFAULT_STEPS = dj.samplers.DEFAULT_STEPS["dpm"]
SAMPLERS = dj.SAMPLERS

_QUICK = {
  "batch_size": 64,
  "steps": 6000,
  "learning_rate": 2e-3,
  "warmup_steps": 400,
  "ema_decay": 0.999,
  "parameterization": "v",
  "loss_weighting": "min_snr",
  "sample_every_epochs": 2,
  "checkpoint_every_steps": 500,
  "log_every_steps": 50,
}
_QUICK_COND = {
  **_QUICK,
  "model": "simple_half",
  "conditional": True,
  "guidance_scale": 2.0,
  "sampler": "dpm_sde",
  "sample_steps": 20,
}

PRESETS = {
  "default": {
    "_doc": "the seed notebook (SimpleUNet, T=1000, batch 128, 30 epochs); meant for a GPU or TPU"
  },
  "quick": {
    "_doc": "class-conditional half-width SimpleUNet (label and time embedding in every "
    "block, label dropout 0.1), v-prediction with Min-SNR-5 weighting, 6000 steps of batch "
    "64 (6.4 epochs); grids of each digit with classifier-free guidance 2 and 20 steps of "
    "SDE-DPM-Solver++(2M); about 12 minutes on 2 CPU cores",
    **_QUICK_COND,
  },
  "quick_cond": {
    "_doc": "the same as quick (the quick recipe is class-conditional)",
    **_QUICK_COND,
  },
  "quick_uncond": {
    "_doc": "the quick recipe without labels: half-width SimpleUNet with the time embedding "
    "in every block, ancestral sampling over 100 respaced steps with the posterior variance "
    "(beta-tilde); digits are less readable than quick's at the same budget",
    **_QUICK,
    "model": "simple_half_emb",
    "sampler": "ddpm",
    "sample_steps": 100,
    "variance": "beta_tilde",
  },
  "smoke": {
    "_doc": "tiny model, a few steps, under a minute (tests)",
    "model": "test",
    "timesteps": 100,
    "steps": 6,
    "batch_size": 16,
    "warmup_steps": 2,
    "sampler": "ddim",
    "sample_steps": 10,
    "num_samples": 16,
    "checkpoint_every_steps": 3,
    "log_every_steps": 2,
  },
}


def job_mesh(batch_size: int) -> jax.sharding.Mesh:
  """The data-parallel mesh of a job whose global batch is `batch_size`:
  every device (`runtime.batch_devices`)."""
  return dj.parallel.make_mesh(runtime.batch_devices(batch_size))


def make_schedule(config: Config) -> dj.Schedule:
  """The configured noise schedule (the betas apply to linear and quadratic)."""
  options = {}
  if config.schedule in ("linear", "quadratic"):
    options = dict(beta_start=config.beta_start, beta_end=config.beta_end)
  return dj.make_schedule(config.schedule, config.timesteps, **options)


def weight_options(config: Config) -> dict:
  return {"min_snr_gamma": config.min_snr_gamma} if config.loss_weighting == "min_snr" else {}


def validate(config: Config) -> None:
  """Raises cli.UsageError naming the bad value."""

  def need(ok, msg):
    if not ok:
      raise cli.UsageError(msg)

  need(
    config.model in dj.PRESETS,
    f"--model {config.model!r} unknown; choose from {sorted(dj.PRESETS)}",
  )
  need(config.timesteps >= 1, f"--timesteps must be >= 1, got {config.timesteps}")
  need(
    config.timesteps <= MAX_TIMESTEPS,
    f"--timesteps must be <= {MAX_TIMESTEPS}, got {config.timesteps}",
  )
  need(config.seed >= 0, f"--seed must be >= 0, got {config.seed}")
  need(
    config.beta_start <= config.beta_end,
    f"--beta_start {config.beta_start} exceeds --beta_end {config.beta_end}",
  )
  try:
    make_schedule(config)
  except ValueError as e:
    raise cli.UsageError(f"--schedule {config.schedule}: {e}") from None
  need(config.batch_size >= 1, f"--batch_size must be >= 1, got {config.batch_size}")
  need(
    config.batch_size <= 60000,
    f"--batch_size {config.batch_size} exceeds the 60000 training images",
  )
  try:
    dj.parallel.check_batch(config.batch_size, job_mesh(config.batch_size))
  except ValueError as e:
    raise cli.UsageError(f"--batch_size: {e}") from None
  need(config.learning_rate > 0, f"--learning_rate must be > 0, got {config.learning_rate}")
  need(config.epochs >= 1 or config.steps, f"--epochs must be >= 1, got {config.epochs}")
  need(config.steps is None or config.steps >= 1, f"--steps must be >= 1, got {config.steps}")
  need(config.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {config.warmup_steps}")
  need(0 <= config.ema_decay < 1, f"--ema_decay must lie in [0, 1), got {config.ema_decay}")
  need(config.loss in ("mse", "l1"), f"--loss must be mse or l1, got {config.loss!r}")
  need(
    config.data_pipeline in PIPELINES,
    f"--data_pipeline must be one of {PIPELINES}, got {config.data_pipeline!r}",
  )
  need(config.sampler in SAMPLERS, f"--sampler must be one of {SAMPLERS}, got {config.sampler!r}")
  need(
    config.parameterization in dj.parameterization.PARAMETERIZATIONS,
    f"--parameterization must be one of {dj.parameterization.PARAMETERIZATIONS}, "
    f"got {config.parameterization!r}",
  )
  need(
    config.loss_weighting in dj.parameterization.WEIGHTINGS,
    f"--loss_weighting must be one of {dj.parameterization.WEIGHTINGS}, "
    f"got {config.loss_weighting!r}",
  )
  need(config.min_snr_gamma > 0, f"--min_snr_gamma must be > 0, got {config.min_snr_gamma}")
  need(0 <= config.eta <= 1, f"--eta must lie in [0, 1], got {config.eta}")
  spacings = dj.samplers.SPACINGS + (
    ("logsnr",) if config.sampler in dj.samplers.LOGSNR_SAMPLERS else ()
  )
  need(
    config.spacing is None or config.spacing in spacings,
    f"--spacing must be one of {spacings} for --sampler {config.sampler}, got {config.spacing!r}",
  )
  need(config.temperature >= 0, f"--temperature must be >= 0, got {config.temperature}")
  need(
    config.temperature == 1 or config.sampler != "dpm",
    "--temperature applies to the ddpm, ddim and dpm_sde samplers; dpm (DPM-Solver++) adds "
    "no noise",
  )
  need(
    0 <= config.label_dropout <= 1,
    f"--label_dropout must lie in [0, 1], got {config.label_dropout}",
  )
  need(config.guidance_scale >= 0, f"--guidance_scale must be >= 0, got {config.guidance_scale}")
  need(
    config.samples_per_class >= 1,
    f"--samples_per_class must be >= 1, got {config.samples_per_class}",
  )
  need(
    config.variance in ("beta", "beta_tilde"),
    f"--variance must be beta or beta_tilde, got {config.variance!r}",
  )
  if config.sample_steps is not None:
    need(
      1 <= config.sample_steps <= config.timesteps,
      f"--sample_steps must lie in [1, {config.timesteps}] (T), got {config.sample_steps}",
    )
    try:  # the sampler's timesteps exist (e.g. quadratic spacing repeats for many steps)
      dj.sampler_timesteps(
        make_schedule(config), config.sampler, config.sample_steps, config.spacing
      )
    except ValueError as e:
      raise cli.UsageError(f"--sample_steps {config.sample_steps}: {e}") from None
  need(
    config.compute_dtype in COMPUTE_DTYPES,
    f"--compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {config.compute_dtype!r}",
  )
  need(config.num_samples >= 1, f"--num_samples must be >= 1, got {config.num_samples}")
  for name in ("sample_every_epochs", "checkpoint_every_steps", "log_every_steps"):
    need(getattr(config, name) >= 1, f"--{name} must be >= 1, got {getattr(config, name)}")
  check_image_size(config, (28, 28) if config.dataset == "mnist" else None)


def check_image_size(config: Config, size) -> None:
  """UsageError when the model's downsampling does not divide the images' H and W
  (size None: not known yet, nothing to check)."""
  factor = dj.make_model(config.model).downsample_factor
  if size is not None and (size[0] % factor or size[1] % factor):
    raise cli.UsageError(
      f"--model {config.model} downsamples by {factor}; {config.dataset}'s image size "
      f"{size[0]}x{size[1]} is not divisible by it; choose a model with fewer levels "
      "(e.g. simple, tiny)"
    )


NUM_CLASSES = 10  # MNIST digits
MAX_TIMESTEPS = 100_000


def build_model(config: Config, num_classes: int = 0):
  """The configured U-Net (class-conditional with --conditional: `num_classes`
  classes, MNIST's 10 when not given)."""
  return dj.make_model(
    config.model,
    dtype=COMPUTE_DTYPES[config.compute_dtype],
    num_classes=(num_classes or NUM_CLASSES) if config.conditional else 0,
  )


def grid_labels(config: Config, num_classes: int = 0) -> np.ndarray:
  """Class-major labels of the conditional grid: samples_per_class of each class
  (MNIST's 10 digits when num_classes is not given)."""
  n = num_classes or NUM_CLASSES
  return np.repeat(np.arange(n, dtype=np.int32), config.samples_per_class)


to_float = pixels.u8_to_signed  # uint8 -> [-1, 1] (the seeds' Normalize(0.5, 0.5))


def make_sampler(
  config: Config, model, schedule, shape, trajectory_every=None, labels=None, guidance_scale=None
):
  """A jitted `sample(params, rng) -> images` (and frames) for the configured sampler.

  labels [shape[0]]: for a conditional model, the digit of each sample, with
  classifier-free guidance of `guidance_scale` (default --guidance_scale);
  None samples a conditional model unconditionally (null label). The
  returned function also takes the labels as a third argument, `sample(
  params, rng, labels)`, to draw other digits without recompiling.
  With several devices and a batch they divide, each device denoises its slice.
  """
  mesh = job_mesh(config.batch_size)  # the devices training put the parameters on
  split = mesh.devices.size > 1 and shape[0] % mesh.devices.size == 0
  scale = config.guidance_scale if guidance_scale is None else guidance_scale

  def sample(params, rng, y=None):
    y = labels if y is None else y  # labels can also be passed per call
    if y is None:
      eps_fn = dj.eps_fn_from_model(
        dj.model_eps_fn(model, params), schedule, config.parameterization
      )
    else:
      cond = dj.model_cond_eps_fn(model, params, schedule, config.parameterization)
      eps_fn = dj.classifier_free_eps_fn(cond, jnp.asarray(y), scale, model.num_classes)
    if split:
      eps_fn = dj.parallel.sharded_eps_fn(eps_fn, mesh)
    return dj.sample(
      eps_fn,
      schedule,
      rng,
      shape,
      config.sampler,
      config.sample_steps,
      spacing=config.spacing,
      clip_x0=config.clip_x0,
      eta=config.eta,
      variance=config.variance,
      temperature=config.temperature,
      trajectory_every=trajectory_every,
    )

  return dj.parallel.jit_inference(sample)


def sampler_timesteps(config: Config) -> np.ndarray:
  return dj.sampler_timesteps(
    make_schedule(config), config.sampler, config.sample_steps, config.spacing
  )


def load_trained(workdir: str):
  """(config, model, schedule, ema_params, step) of the DDPM run in `workdir`,
  from its latest checkpoint; UsageError when there is none, or when the run
  trained on another dataset than MNIST (whose shapes this loader assumes)."""
  config, _ = cli.load_config(Config, workdir)
  if config.dataset != "mnist":
    raise cli.UsageError(
      f"{workdir} trained on {config.dataset}; loading a trained model for sampling and "
      "evaluation supports MNIST runs (the training job's grids show the others)"
    )
  validate(config)
  model = build_model(config)
  schedule = make_schedule(config)
  tx = dj.make_optimizer(
    config.learning_rate,
    2,
    warmup_steps=1,  # structure only
    grad_clip=config.grad_clip,
  )
  init = functools.partial(dj.create_train_state, jax.random.key(0), model, tx, (28, 28, 1))
  state, step = restore_latest(os.path.join(workdir, "checkpoints"), init)
  return config, model, schedule, state.ema_params, step
