"""Train a DDPM on MNIST and draw samples: `python -m experiments.mnist_ddpm --workdir W`.

Writes to the workdir: config.json, metrics.jsonl, checkpoints/ (Orbax, the
latest kept), loss_curve.png, samples_epoch_XXX.png, samples_final.png and
trajectory.png. Running again with the same workdir resumes.
"""

from __future__ import annotations

from experiments import runtime

runtime.restart_main(__name__)  # huge pages: restart before the imports below (runtime.py)

import functools
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import ddpm_jax as dj
from experiments import cli, distributed, plotting
from experiments.checkpoints import Checkpointer, resume_or_init
from experiments.data import open_train_images
from experiments.ddpm_setup import (  # noqa: F401  (re-exported for callers)
  COMPUTE_DTYPES,
  DDIM_DEFAULT_STEPS,
  DPM_DEFAULT_STEPS,
  MAX_TIMESTEPS,
  NUM_CLASSES,
  PRESETS,
  SAMPLERS,
  Config,
  build_model,
  check_image_size,
  grid_labels,
  job_mesh,
  load_trained,
  make_sampler,
  make_schedule,
  sampler_timesteps,
  to_float,
  validate,
  weight_options,
)
from experiments.host_pipeline import HostBatches, choose_pipeline
from experiments.runner import Action, Runner
from experiments.tensorboard_log import TensorBoardLog


def make_step_fns(config: Config, model, schedule, tx, train_rng, data_rng, n_train: int):
  """(step_fn, host_step_fn, epoch_perm(epoch) -> perm [n_train]).

  step_fn(state, images, labels, perm) -> (state, metrics): the uint8 images
  sit on every device; each step gathers its batch by the epoch's permutation
  and shards it over the devices (data parallel). host_step_fn(state, x, y):
  the same step on a uint8 batch read on the host (`host_pipeline`), already
  split over the devices; both give the same numbers."""
  mesh = job_mesh(config.batch_size)
  rep, data = dj.parallel.replicated(mesh), dj.parallel.data_sharding(mesh)
  batch, steps_per_epoch = config.batch_size, n_train // config.batch_size
  train_step = dj.make_train_step(
    model,
    schedule,
    tx,
    base_rng=train_rng,
    ema_decay=config.ema_decay,
    loss_type=config.loss,
    skip_nonfinite=config.skip_nonfinite,
    parameterization=config.parameterization,
    weighting=config.loss_weighting,
    weight_options=weight_options(config),
    label_dropout=config.label_dropout,
  )

  def on_batch(state, x_u8, y):
    x = jax.lax.with_sharding_constraint(to_float(x_u8), data)
    if not config.conditional:
      return train_step(state, x)
    return train_step(state, (x, jax.lax.with_sharding_constraint(y, data)))

  host_step_fn = jax.jit(
    dj.parallel.in_mesh(on_batch, mesh), donate_argnums=(0,), out_shardings=(rep, rep)
  )

  @functools.partial(jax.jit, out_shardings=(data, data))
  def gather(step, images, labels, perm):
    idx = jax.lax.dynamic_slice_in_dim(perm, (step % steps_per_epoch) * batch, batch)
    return jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0)

  def step_fn(state, images, labels, perm):
    # The gather is its own program so both paths run the same compiled step
    # on the same uint8 batch: they train bit for bit alike.
    return host_step_fn(state, *gather(state.step, images, labels, perm))

  @jax.jit
  def epoch_perm(epoch):
    return jax.random.permutation(jax.random.fold_in(data_rng, epoch), n_train).astype(jnp.int32)

  return step_fn, host_step_fn, epoch_perm


def grid_sampler(config: Config, model, schedule, image_shape):
  """(sample(params, rng) -> images, grid row length, title words) for the sample grids."""
  if config.conditional:  # one row per class
    classes = grid_labels(config, model.num_classes)
    sample = make_sampler(config, model, schedule, (len(classes),) + image_shape, labels=classes)
    rows = f"rows 0-{model.num_classes - 1}, guidance {config.guidance_scale:g}, "
    return sample, config.samples_per_class, rows
  sample = make_sampler(config, model, schedule, (config.num_samples,) + image_shape)
  return sample, 8, ""


def train_and_evaluate(
  config: Config, preset: str, workdir: str, stop_after_steps: Optional[int] = None
) -> dj.TrainState:
  """Trains (or resumes) a DDPM in `workdir` and writes samples and plots.

  With `stop_after_steps`, leaves after that many steps with a checkpoint
  (no final samples); running again continues.
  """
  validate(config)
  cli.prepare_workdir(workdir)
  source = open_train_images(config.dataset, config.data_dir)
  pipeline = choose_pipeline(config.data_pipeline, source)
  print(
    f"{config.dataset}: {source.num_examples} train images "
    f"{'x'.join(map(str, source.image_shape))} from {source.source}"
    + ("; batches read on the host" if pipeline == "host" else ""),
    file=sys.stderr,
  )
  check_image_size(config, source.image_shape[:2])
  if config.conditional and not source.num_classes:
    raise cli.UsageError(f"--conditional needs class labels; {config.dataset} has none")
  mesh = job_mesh(config.batch_size)  # data parallel over every device
  images = train_labels = None
  if pipeline == "device":  # uint8 on every device, shuffled there
    data = source.load()
    images, train_labels = dj.parallel.replicate(
      (data.train_images, data.train_labels.astype(np.int32)), mesh
    )
  n_train, image_shape = source.num_examples, tuple(source.image_shape)

  schedule = make_schedule(config)
  model = build_model(config, source.num_classes)
  batch = config.batch_size
  steps_per_epoch = n_train // batch
  total_steps = config.steps or config.epochs * steps_per_epoch
  tx = dj.make_optimizer(
    config.learning_rate,
    total_steps,
    warmup_steps=min(config.warmup_steps, total_steps),
    grad_clip=config.grad_clip,
  )
  init_rng, train_rng, data_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 4)
  init = functools.partial(dj.create_train_state, init_rng, model, tx, image_shape)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), set_aside_unverified=True)
  state, latest = resume_or_init(
    ckpt, init, config, preset, workdir, total_steps, "--steps" if config.steps else "--epochs"
  )
  if latest is not None:
    print(f"resumed from checkpoint at step {latest}", file=sys.stderr)
  state = dj.parallel.replicate(state, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(
    f"model {config.model}: {n_params:,} parameters; {total_steps} steps of batch {batch} "
    f"({steps_per_epoch} steps per epoch)",
    file=sys.stderr,
  )

  step_fn, host_step_fn, epoch_perm = make_step_fns(
    config, model, schedule, tx, train_rng, data_rng, n_train
  )
  host = HostBatches(source, batch, epoch_perm, mesh) if pipeline == "host" else None
  lr_fn = dj.learning_rate_schedule(
    config.learning_rate, total_steps, min(config.warmup_steps, total_steps)
  )
  sample, nrow, what = grid_sampler(config, model, schedule, image_shape)

  def save_samples(step, name, title):
    imgs = distributed.to_host(sample(state.ema_params, jax.random.fold_in(sample_rng, step)))
    tb.image("samples", imgs, step, nrow)
    plotting.save_grid(
      imgs, os.path.join(workdir, name), nrow=nrow, title=title.replace("(EMA", f"({what}EMA")
    )

  tb = TensorBoardLog(workdir, resumed_step=latest)
  metrics = cli.MetricsLog(os.path.join(workdir, "metrics.jsonl"), keep_up_to_step=latest)
  epoch_perm_cache = {}
  window = dict(loss=0.0, finite=0.0, steps=0, start=time.perf_counter())

  def train_unit(step):
    """Runs step `step + 1`; returns 1 when its loss or gradient was non-finite."""
    nonlocal state
    if host is not None:
      state, m = host_step_fn(state, *host.get(step))
    else:
      epoch = step // steps_per_epoch
      if epoch not in epoch_perm_cache:
        epoch_perm_cache.clear()
        epoch_perm_cache[epoch] = epoch_perm(epoch)
      state, m = step_fn(state, images, train_labels, epoch_perm_cache[epoch])
    window["loss"] = window["loss"] + jnp.where(m["finite"] > 0, m["loss"], 0.0)
    window["finite"] = window["finite"] + m["finite"]
    window["steps"] += 1
    window["grad_norm"] = m["grad_norm"]
    return 1 - m["finite"]

  def log(step):
    n_finite = float(window["finite"])
    loss = float(window["loss"]) / n_finite if n_finite else float("nan")
    ips = window["steps"] * batch / (time.perf_counter() - window["start"])
    record = {
      "step": step,
      "epoch": step / steps_per_epoch,
      "loss": loss,
      "grad_norm": float(window["grad_norm"]),
      "learning_rate": float(lr_fn(step - 1)),
      "images_per_sec": ips,
      "skipped_steps": runner.skipped,
      "time": time.time(),
    }
    metrics.write(record)
    tb.scalars(step, record)
    runner.pbar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
    window.update(loss=0.0, finite=0.0, steps=0, start=time.perf_counter())

  def epoch_samples(step):
    e = step // steps_per_epoch
    save_samples(step, f"samples_epoch_{e:03d}.png", f"epoch {e}, step {step} (EMA)")
    window["start"] = time.perf_counter()  # keep sampling time out of img/s

  runner = Runner(
    position=int(state.step),
    total=total_steps,
    unit="step",
    save=lambda step: ckpt.save(step, jax.device_get(state)),
    checkpoint_every=config.checkpoint_every_steps,
    actions=[
      Action(config.log_every_steps, log, last=True),
      Action(steps_per_epoch * config.sample_every_epochs, epoch_samples),
    ],
    stop_after=stop_after_steps,
    skip_nonfinite=config.skip_nonfinite,
    last_saved=latest,
    on_close=[tb.close, ckpt.close] + ([host.close] if host is not None else []),
  )
  with runner:
    if not runner.run(train_unit):
      return state
    ckpt.wait()
    final = (
      f"the final checkpoint (step {total_steps}) is complete; run again to draw the final samples"
    )
    runner.leave_if_preempted("after the last training step", final)
    final_pictures(
      config, state, workdir, total_steps, save_samples, sample_rng, model, schedule, image_shape
    )
    runner.leave_if_preempted("while drawing the final samples", final)
    runner.close()
    return state


def final_pictures(
  config, state, workdir, total_steps, save_samples, sample_rng, model, schedule, image_shape
):
  """The final sample grid, the denoising trajectory and the loss curve."""
  ts = sampler_timesteps(config)
  t0 = time.perf_counter()
  save_samples(
    total_steps,
    "samples_final.png",
    f"final samples, step {total_steps} (EMA, {config.sampler} {len(ts)} steps)",
  )
  n_grid = len(grid_labels(config, model.num_classes)) if config.conditional else config.num_samples
  print(
    f"sampled {n_grid} images in {time.perf_counter() - t0:.1f} s (compile included)",
    file=sys.stderr,
  )
  every = max(1, len(ts) // 10)
  traj_sample = make_sampler(
    config,
    model,
    schedule,
    (8,) + image_shape,
    trajectory_every=every,
    labels=np.arange(8, dtype=np.int32) if config.conditional else None,
  )
  _, frames = traj_sample(state.ema_params, jax.random.fold_in(sample_rng, total_steps + 1))
  labels = [f"t={t}" if t >= 0 else "x0" for t in dj.trajectory_timesteps(ts, every)]
  labels[0] = f"x_T (t={ts[0]})"  # pure noise
  plotting.save_strip(
    distributed.to_host(frames),
    labels,
    os.path.join(workdir, "trajectory.png"),
    title="Denoising trajectory: from noise to image",
  )
  history = cli.MetricsLog.read(os.path.join(workdir, "metrics.jsonl"), required=("loss",))
  if history:
    plotting.save_curves(
      {"train loss": ([r["step"] for r in history], [r["loss"] for r in history])},
      os.path.join(workdir, "loss_curve.png"),
      ylabel=f"{config.loss} loss on {config.parameterization}"
      + ("" if config.loss_weighting == "none" else f" ({config.loss_weighting})"),
      title="DDPM training loss",
      logy=True,
    )
    print(
      f"done: step {total_steps}, last logged loss {history[-1]['loss']:.4f}; outputs in {workdir}",
      file=sys.stderr,
    )


def main(argv=None) -> None:
  args = cli.resolve_config(Config, PRESETS, argv, description=__doc__)
  try:
    train_and_evaluate(args.config, args.preset, args.workdir, args.stop_after)
  finally:
    cli.unlock_workdir(args.workdir)


if __name__ == "__main__":
  cli.exit_main(main)
