"""Draw digits from a trained DDPM: `python -m experiments.sample --pretrained mnist`.

Samples from the model that ships with the package (`--pretrained mnist`) or
from a run of `experiments.mnist_ddpm` (`--workdir W`: the EMA parameters of
its latest checkpoint). Writes `OUT/samples.npz` (`images` uint8
[N, 28, 28, 1], `labels` int [N]: the digit asked for, or -1 for
unconditional samples) and `OUT/grid.png`.
"""

from __future__ import annotations

from experiments import runtime

runtime.restart_main(__name__)  # huge pages: restart before the imports below (runtime.py)

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import ddpm_jax as dj
from experiments import cli, ddpm_setup, distributed, plotting
from experiments.files import atomic_path
from nnbase import pixels


def build_parser() -> argparse.ArgumentParser:
  p = cli._Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument(
    "--pretrained",
    choices=sorted(dj.pretrained.REGISTRY),
    help="a model that ships with the package",
  )
  src.add_argument("--workdir", help="a DDPM run's workdir (EMA params of its latest checkpoint)")
  p.add_argument("--num_samples", type=int, default=64, help="images to draw")
  p.add_argument(
    "--digits",
    default=None,
    help="comma-separated digits, repeated over the samples (e.g. 0,1,2); "
    "omitted: unconditional samples",
  )
  p.add_argument(
    "--guidance_scale",
    type=float,
    default=None,
    help="classifier-free guidance weight w (0 unconditional, 1 conditional, "
    "> 1 guided; default: the pretrained model's best, or the run's)",
  )
  p.add_argument(
    "--sampler",
    choices=dj.SAMPLERS,
    default="dpm_sde",
    help="ddpm (ancestral), ddim, dpm (DPM-Solver++(2M)) or dpm_sde (its stochastic form, "
    "the default: the best FD per step on the pretrained model)",
  )
  p.add_argument(
    "--steps",
    type=int,
    default=None,
    help="sampler steps (default: T for ddpm, 50 for ddim, 20 for dpm and dpm_sde)",
  )
  p.add_argument("--batch_size", type=int, default=500, help="images per sampler call")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--out", required=True, help="output folder")
  distributed.add_flags(p)
  return p


def parse_digits(text, num_classes: int) -> list:
  try:
    digits = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise cli.UsageError(f"--digits must be comma-separated integers, got {text!r}") from None
  if not digits or any(not 0 <= d < num_classes for d in digits):
    raise cli.UsageError(f"--digits must lie in 0..{num_classes - 1}, got {text!r}")
  return digits


def load_model(a) -> tuple:
  """(model, params, schedule, parameterization, num_classes, default guidance)."""
  if a.pretrained:
    try:
      m = dj.load_pretrained(a.pretrained)
    except dj.param_files.WeightsError as e:
      raise cli.UsageError(str(e)) from None
    best = m.record.get("best_guidance_scale", 1.0)
    return m.model, m.params, m.schedule, m.parameterization, m.num_classes, best
  config, model, schedule, params, _ = ddpm_setup.load_trained(a.workdir)
  return (
    model,
    params,
    schedule,
    config.parameterization,
    model.num_classes,
    config.guidance_scale,
  )


def main(argv=None) -> None:
  a = build_parser().parse_args(argv)
  distributed.initialize(a)
  for flag in ("workdir", "out"):
    cli.check_path(getattr(a, flag, None), "--" + flag)
  if not 1 <= a.num_samples <= 1_000_000:
    raise cli.UsageError(f"--num_samples must lie in [1, 1000000], got {a.num_samples}")
  if a.batch_size < 1:
    raise cli.UsageError(f"--batch_size must be >= 1, got {a.batch_size}")
  if a.guidance_scale is not None and not 0 <= a.guidance_scale < 1e6:
    raise cli.UsageError(f"--guidance_scale must be a number >= 0, got {a.guidance_scale}")
  if not 0 <= a.seed < 2**63:
    raise cli.UsageError(f"--seed must lie in [0, 2^63), got {a.seed}")
  if a.workdir and not os.path.isfile(os.path.join(a.workdir, "config.json")):
    raise cli.UsageError(f"--workdir {a.workdir} holds no DDPM run (no config.json)")
  model, params, schedule, param_kind, num_classes, default_w = load_model(a)
  T = schedule.num_timesteps
  if a.steps is not None and not 1 <= a.steps <= T:
    raise cli.UsageError(f"--steps must lie in [1, {T}] (the model's T), got {a.steps}")
  if a.digits is not None and num_classes == 0:
    raise cli.UsageError(
      "--digits needs a class-conditional model; this one was trained without labels"
    )
  w = default_w if a.guidance_scale is None else a.guidance_scale
  n = a.num_samples
  labels = (
    np.resize(np.asarray(parse_digits(a.digits, num_classes), np.int32), n)
    if a.digits is not None
    else np.full((n,), -1, np.int32)
  )
  cli.prepare_output_dir(a.out)  # an unwritable --out fails now, not after the sampling
  b = min(a.batch_size, n)
  shape = (b,) + (28, 28, 1)

  @jax.jit
  def draw(params, rng, y):
    if num_classes == 0:
      eps_fn = dj.eps_fn_from_model(dj.model_eps_fn(model, params), schedule, param_kind)
    else:
      cond = dj.model_cond_eps_fn(model, params, schedule, param_kind)
      y = jnp.where(y < 0, num_classes, y)  # -1: the null label (unconditional)
      eps_fn = dj.classifier_free_eps_fn(cond, y, w, num_classes)
    return dj.sample(eps_fn, schedule, rng, shape, a.sampler, a.steps, clip_x0=True)

  rng = jax.random.key(a.seed)
  padded = np.resize(labels, -(-n // b) * b)
  out, t0 = [], time.perf_counter()
  writer = distributed.is_writer()
  with tqdm(total=n, desc="sampling", unit="img", file=sys.stderr, disable=not writer) as bar:
    for i in range(padded.size // b):
      y = padded[i * b : (i + 1) * b]
      out.append(distributed.to_host(draw(params, jax.random.fold_in(rng, i), y)))
      bar.update(min(b, n - i * b))
  images = np.concatenate(out)[:n]
  u8 = pixels.to_uint8(images)
  if not writer:
    return
  with atomic_path(os.path.join(a.out, "samples.npz"), ".npz.tmp") as tmp:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, images=u8, labels=labels)
  what = f"digits {a.digits}, guidance {w:g}" if a.digits is not None else "unconditional"
  steps = len(dj.sampler_timesteps(schedule, a.sampler, a.steps))
  ncol = 10 if a.digits is None else max(1, min(len(set(labels.tolist())), 16))
  plotting.save_grid(
    pixels.to_unit(u8[: min(n, 400)], (0, 255)),
    os.path.join(a.out, "grid.png"),
    nrow=ncol,
    value_range=(0, 1),
    title=f"{a.pretrained or a.workdir}: {what}, {a.sampler} {steps} steps",
  )
  print(
    f"{n} samples in {time.perf_counter() - t0:.1f} s (compile included): "
    f"{os.path.join(a.out, 'samples.npz')}, {os.path.join(a.out, 'grid.png')}",
    file=sys.stderr,
  )


if __name__ == "__main__":
  cli.exit_main(main)
