"""Train a DDPM on MNIST and draw samples: `python -m experiments.mnist_ddpm --workdir W`.

Writes to the workdir: config.json, metrics.jsonl, checkpoints/ (Orbax, the
latest kept), loss_curve.png, samples_epoch_XXX.png, samples_final.png and
trajectory.png. Running again with the same workdir resumes.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import ddpm_jax as dj
from experiments import cli, plotting
from experiments.checkpoints import Checkpointer, resume_or_init
from experiments.data import load_mnist
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
  grid_labels,
  load_trained,
  make_sampler,
  make_schedule,
  sampler_timesteps,
  to_float,
  validate,
  weight_options,
)
from experiments.preemption import Preemption
from experiments.tensorboard_log import TensorBoardLog


def train_and_evaluate(
  config: Config, preset: str, workdir: str, stop_after_steps: Optional[int] = None
) -> dj.TrainState:
  """Trains (or resumes) a DDPM in `workdir` and writes samples and plots.

  With `stop_after_steps`, leaves after that many steps with a checkpoint
  (no final samples); running again continues.
  """
  validate(config)
  cli.prepare_workdir(workdir)
  mnist = load_mnist()
  print(f"MNIST: {mnist.train_images.shape[0]} train images from {mnist.source}", file=sys.stderr)
  mesh = dj.parallel.make_mesh()  # data parallel over every device
  rep, data = dj.parallel.replicated(mesh), dj.parallel.data_sharding(mesh)
  # uint8 on every device and shuffled there; each device gathers its slice of a batch.
  images = jax.device_put(mnist.train_images, rep)
  train_labels = jax.device_put(mnist.train_labels.astype(np.int32), rep)
  n_train, image_shape = images.shape[0], tuple(images.shape[1:])

  schedule = make_schedule(config)
  model = build_model(config)
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
  lr_fn = dj.learning_rate_schedule(
    config.learning_rate, total_steps, min(config.warmup_steps, total_steps)
  )

  @functools.partial(jax.jit, donate_argnums=(0,), out_shardings=(rep, rep))
  def step_fn(state, images, labels, perm):
    i = state.step % steps_per_epoch
    idx = jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)
    x = jax.lax.with_sharding_constraint(to_float(jnp.take(images, idx, axis=0)), data)
    if not config.conditional:
      return train_step(state, x)
    y = jax.lax.with_sharding_constraint(jnp.take(labels, idx, axis=0), data)
    return train_step(state, (x, y))

  @jax.jit
  def epoch_perm(epoch):
    return jax.random.permutation(jax.random.fold_in(data_rng, epoch), n_train).astype(jnp.int32)

  if config.conditional:  # one row per digit
    digits = grid_labels(config)
    sample = make_sampler(config, model, schedule, (len(digits),) + image_shape, labels=digits)
    nrow, what = config.samples_per_class, f"rows 0-9, guidance {config.guidance_scale:g}, "
  else:
    sample = make_sampler(config, model, schedule, (config.num_samples,) + image_shape)
    nrow, what = 8, ""

  def save_samples(step, name, title):
    imgs = np.asarray(sample(state.ema_params, jax.random.fold_in(sample_rng, step)))
    tb.image("samples", imgs, step, nrow)
    plotting.save_grid(
      imgs, os.path.join(workdir, name), nrow=nrow, title=title.replace("(EMA", f"({what}EMA")
    )

  tb = TensorBoardLog(workdir, resumed_step=latest)
  metrics = cli.MetricsLog(
    os.path.join(workdir, "metrics.jsonl"), keep_up_to_step=latest if latest is not None else None
  )
  step = int(state.step)
  last_saved = latest
  end_step = total_steps if stop_after_steps is None else min(total_steps, step + stop_after_steps)
  perm_epoch, perm = -1, None
  loss_sum, finite_steps, window_steps, window_start = 0.0, 0.0, 0, time.perf_counter()
  pending = []  # (step, finite flag on device) since the last check
  skipped = 0

  def check_finite():
    """Pulls the pending finite flags; raises (nothing saved) or counts skips."""
    nonlocal skipped
    if not pending:
      return
    flags = jax.device_get([f for _, f in pending])
    bad = [s for (s, _), f in zip(pending, flags) if not f]
    pending.clear()
    if bad and not config.skip_nonfinite:
      kept = f"step {last_saved}" if last_saved is not None else "none yet"
      raise FloatingPointError(
        f"non-finite loss or gradient at step {bad[0]}; stopped without saving it (last good "
        f"checkpoint: {kept}). Lower --learning_rate, or pass --skip_nonfinite true to skip "
        "such steps"
      )
    if bad:
      skipped += len(bad)
      tqdm.write(f"skipped {len(bad)} non-finite step(s), first at step {bad[0]}", file=sys.stderr)

  pbar = tqdm(
    total=total_steps,
    initial=step,
    desc="train",
    unit="step",
    dynamic_ncols=True,
    mininterval=2.0,
    file=sys.stderr,
  )
  with Preemption() as preemption:
    try:
      while step < end_step:
        if preemption.requested:  # SIGTERM: checkpoint below and leave
          end_step = step
          break
        epoch = step // steps_per_epoch
        if epoch != perm_epoch:
          perm, perm_epoch = epoch_perm(epoch), epoch
        state, m = step_fn(state, images, train_labels, perm)
        step += 1
        pending.append((step, m["finite"]))
        loss_sum = loss_sum + jnp.where(m["finite"] > 0, m["loss"], 0.0)
        finite_steps = finite_steps + m["finite"]
        window_steps += 1
        pbar.update(1)
        if step % config.log_every_steps == 0 or step == total_steps:
          check_finite()
          n_finite = float(finite_steps)
          loss = float(loss_sum) / n_finite if n_finite else float("nan")
          now = time.perf_counter()
          ips = window_steps * batch / (now - window_start)
          record = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "loss": loss,
            "grad_norm": float(m["grad_norm"]),
            "learning_rate": float(lr_fn(step - 1)),
            "images_per_sec": ips,
            "skipped_steps": skipped,
            "time": time.time(),
          }
          metrics.write(record)
          tb.scalars(step, record)
          pbar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}")
          loss_sum, finite_steps, window_steps, window_start = 0.0, 0.0, 0, time.perf_counter()
        if step % config.checkpoint_every_steps == 0 and step < total_steps:
          check_finite()
          ckpt.save(step, jax.device_get(state))
          last_saved = step
        if (
          step % steps_per_epoch == 0
          and (step // steps_per_epoch) % config.sample_every_epochs == 0
        ):
          e = step // steps_per_epoch
          save_samples(step, f"samples_epoch_{e:03d}.png", f"epoch {e}, step {step} (EMA)")
          window_start = time.perf_counter()  # keep sampling time out of img/s
    finally:
      pbar.close()

    check_finite()
    if end_step < total_steps:
      if last_saved != step:
        ckpt.save(step, jax.device_get(state))
      tb.close()
      ckpt.close()
      if preemption.requested:
        print(f"SIGTERM at step {step}: checkpoint saved; run again to resume", file=sys.stderr)
        raise SystemExit(143)  # 128 + SIGTERM
      print(
        f"stopped at step {step} of {total_steps} as asked; run again to continue", file=sys.stderr
      )
      return state

    if last_saved != total_steps:
      ckpt.save(total_steps, jax.device_get(state))

    def leave_if_preempted(stage):
      """SIGTERM after the last step: the final checkpoint is complete; stop here."""
      if preemption.requested:
        tb.close()
        ckpt.close()
        print(
          f"SIGTERM {stage}: the final checkpoint (step {total_steps}) is complete; run "
          "again to draw the final samples",
          file=sys.stderr,
        )
        raise SystemExit(143)

    ckpt.wait()
    leave_if_preempted("after the last training step")
    ts = sampler_timesteps(config)
    t0 = time.perf_counter()
    save_samples(
      total_steps,
      "samples_final.png",
      f"final samples, step {total_steps} (EMA, {config.sampler} {len(ts)} steps)",
    )
    n_grid = len(digits) if config.conditional else config.num_samples
    print(
      f"sampled {n_grid} images in {time.perf_counter() - t0:.1f} s (compile included)",
      file=sys.stderr,
    )
    leave_if_preempted("while drawing the final samples")
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
      np.asarray(frames),
      labels,
      os.path.join(workdir, "trajectory.png"),
      title="Denoising trajectory: from noise to image",
    )
    leave_if_preempted("while drawing the trajectory")
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
        f"done: step {total_steps}, last logged loss {history[-1]['loss']:.4f}; "
        f"outputs in {workdir}",
        file=sys.stderr,
      )
    tb.close()
    ckpt.close()
    return state


def main(argv=None) -> None:
  args = cli.resolve_config(Config, PRESETS, argv, description=__doc__)
  try:
    train_and_evaluate(args.config, args.preset, args.workdir, args.stop_after)
  finally:
    cli.unlock_workdir(args.workdir)


if __name__ == "__main__":
  cli.exit_main(main)
