"""Offline sample quality of a trained DDPM or VAE run:
`python -m experiments.evaluate --workdir W`.

Draws `--num_samples` images from the run's latest checkpoint (EMA parameters
for a DDPM; the prior for a VAE), embeds them with the packaged MNIST
classifier (`sample_quality`), and compares them with the reference set, the
MNIST test split (10,000 images), by FD-MNIST, KID, precision/recall (k=3),
classifier score, class histogram and diversity. The same metrics for a floor
(real train images) and two ceilings (uniform noise, a blurred mean image),
each with the same sample count, come with every table.

Writes `W/eval/<sampler>_<steps>steps_n<N>.json` (or `vae_prior_n<N>.json`)
and a grid of the first 100 samples beside it. `--sweep 10,20,50,100,250,1000`
also runs DDPM and DDIM at each step count and writes
`W/eval/steps_sweep_n<N>.json` and `.png` (seconds per image and FD-MNIST).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import ddpm_jax as dj
import vae_jax as vj
from experiments import cli, mnist_ddpm, mnist_vae, plotting
from experiments.data import ARRAYS_SHA256, default_cache_dir, load_mnist
from experiments.files import atomic_path
from sample_quality import classifier as clf
from sample_quality import metrics as qm

REFERENCE = "MNIST test split (10,000 images)"
EXTRACTOR = "sample_quality MNIST CNN, 128-d penultimate features"


# --------------------------------------------------------------------- features

class FeatureNet:
  """The packaged classifier: `embed(images uint8 [N, 28, 28, 1]) -> (features, probs)`."""

  def __init__(self):
    self.params = clf.load_params()
    self._apply = clf.make_apply()

  def embed(self, images_u8: np.ndarray) -> tuple:
    x = jnp.asarray(images_u8, jnp.float32) / 255.0
    logits, feats = self._apply(self.params, x)
    return np.asarray(feats, np.float64), np.asarray(jax.nn.softmax(logits), np.float64)


def reference_features(net: FeatureNet, test_images: np.ndarray,
                       cache_dir: Optional[str] = None) -> np.ndarray:
  """Features of the MNIST test split, cached per (classifier, dataset) hash."""
  cache_dir = cache_dir or os.path.join(os.path.dirname(default_cache_dir()), "quality")
  path = os.path.join(cache_dir, f"ref_{clf.WEIGHTS_SHA256[:12]}_{ARRAYS_SHA256[:12]}.npz")
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as z:
        feats = z["features"]
      if feats.shape == (test_images.shape[0], clf.FEATURE_DIM):
        return feats
    except (OSError, ValueError, KeyError):
      pass  # unreadable cache: recompute
  feats, _ = net.embed(test_images)
  with atomic_path(path, ".npz.tmp") as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, features=feats)
  return feats


def to_uint8(images: np.ndarray, value_range=(-1.0, 1.0)) -> np.ndarray:
  """Float images -> uint8 [N, 28, 28, 1], as if saved to PNG (clipped, rounded)."""
  lo, hi = value_range
  u = (np.asarray(images, np.float64) - lo) / (hi - lo)
  return np.rint(np.clip(u, 0, 1) * 255).astype(np.uint8)


# -------------------------------------------------------------------- baselines

def blurred_mean_image(train_images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
  """The mean training image, Gaussian-blurred: uint8 [28, 28, 1]."""
  from scipy.ndimage import gaussian_filter  # pylint: disable=import-outside-toplevel
  mean = train_images.astype(np.float64).mean(0)[..., 0]
  return np.rint(gaussian_filter(mean, sigma))[..., None].clip(0, 255).astype(np.uint8)


def baselines(train_images: np.ndarray, n: int, seed: int = 0) -> dict:
  """Image sets of size n: the floor (real train images) and two ceilings."""
  rs = np.random.default_rng(seed)
  real = train_images[rs.choice(train_images.shape[0], n, replace=False)]
  noise = rs.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  mean = np.repeat(blurred_mean_image(train_images)[None], n, axis=0)
  return {"floor: real train images": real, "ceiling: uniform noise": noise,
          "ceiling: blurred mean image": mean}


def evaluate_images(net: FeatureNet, ref: np.ndarray, images_u8: np.ndarray,
                    seed: int = 0) -> dict:
  feats, probs = net.embed(images_u8)
  return qm.all_metrics(ref, feats, probs, seed=seed)


# --------------------------------------------------------------------- samplers

def draw(sample_fn: Callable, params, rng, n: int, batch_size: int, desc: str) -> tuple:
  """Calls jitted `sample_fn(params, rng_i) -> [batch, ...]` for i = 0, 1, ...
  until n images exist; returns (images [n, ...], seconds per image without compilation)."""
  num_batches = -(-n // batch_size)
  compiled = sample_fn.lower(params, jax.random.fold_in(rng, 0)).compile()
  out, t0 = [], time.perf_counter()
  for i in tqdm(range(num_batches), desc=desc, unit="batch", file=sys.stderr, leave=False,
                dynamic_ncols=True):
    out.append(np.asarray(compiled(params, jax.random.fold_in(rng, i))))
  secs = time.perf_counter() - t0
  return np.concatenate(out)[:n], secs / (num_batches * batch_size)


def ddpm_sampler(config, model, schedule, sampler: str, steps: int, eta: float, batch: int):
  """The job's jitted sampler (split over devices when the batch allows)."""
  config = dataclasses.replace(config, sampler=sampler, sample_steps=steps, eta=eta)
  return mnist_ddpm.make_sampler(config, model, schedule, (batch, 28, 28, 1))


# ------------------------------------------------------------------------ table

def format_table(rows: dict) -> str:
  head = (f"{'set':34s} {'n':>6s} {'FD-MNIST':>9s} {'KID +- stderr':>17s} {'prec':>6s} {'recall':>6s} "
          f"{'CS':>6s} {'TV':>5s} {'divers':>7s}")
  lines = [head, "-" * len(head)]
  for name, m in rows.items():
    kid = f"{m['kid']:.3g} +- {m['kid_stderr']:.2g}"
    lines.append(f"{name[:34]:34s} {m['num_samples']:6d} {m['fd']:9.3f} {kid:>17s} "
                 f"{m['precision']:6.3f} {m['recall']:6.3f} {m['classifier_score']:6.2f} "
                 f"{m['class_tv_from_uniform']:5.3f} {m['diversity']:7.2f}")
  return "\n".join(lines)


def _meta(kind: str, workdir: str, step: int, n: int) -> dict:
  return {"run": kind, "workdir": workdir, "checkpoint_step": step, "num_samples": n,
          "reference": REFERENCE, "extractor": EXTRACTOR,
          "extractor_sha256": clf.WEIGHTS_SHA256, "device": jax.devices()[0].device_kind,
          "jax": jax.__version__, "time": time.time()}


def run_kind(workdir: str) -> str:
  fields = cli.stored_fields(workdir)
  if "timesteps" in fields:
    return "ddpm"
  if "latent_dim" in fields:
    return "vae"
  raise cli.UsageError(f"{workdir}/config.json is neither a DDPM nor a VAE run")


def parse_steps(text: str) -> list:
  try:
    steps = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise cli.UsageError(f"--sweep must be comma-separated integers, got {text!r}") from None
  if not steps or min(steps) < 1:
    raise cli.UsageError(f"--sweep step counts must be >= 1, got {text!r}")
  return steps


def build_parser():
  p = cli._Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a DDPM or VAE run's workdir")
  p.add_argument("--sampler", choices=mnist_ddpm.SAMPLERS, default=None,
                 help="DDPM runs: ancestral (ddpm), ddim or dpm (DPM-Solver++ 2M; default: "
                      "the run's sampler)")
  p.add_argument("--steps", type=int, default=None,
                 help="DDPM runs: sampler steps (default: T for ddpm, the run's "
                      f"--sample_steps or {mnist_ddpm.DDIM_DEFAULT_STEPS} for ddim)")
  p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the run's)")
  p.add_argument("--num_samples", type=int, default=10000, help="images to draw and score")
  p.add_argument("--batch_size", type=int, default=500, help="images per compiled sampler call")
  p.add_argument("--seed", type=int, default=0, help="sampling and subset seed")
  p.add_argument("--sweep", default=None, metavar="STEPS",
                 help="DDPM runs: also a DDPM and DDIM speed/quality sweep over these step "
                      "counts, e.g. 10,20,50,100,250,1000")
  p.add_argument("--sweep_num_samples", type=int, default=None,
                 help="images per sweep point (default: --num_samples)")
  p.add_argument("--skip_main", action="store_true",
                 help="with --sweep: only the sweep")
  return p


def main(argv=None) -> None:
  a = build_parser().parse_args(argv)
  workdir = os.path.abspath(a.workdir)
  kind = run_kind(workdir)
  for name in ("num_samples", "batch_size"):
    if getattr(a, name) < 1:
      raise cli.UsageError(f"--{name} must be >= 1, got {getattr(a, name)}")
  if a.num_samples < 10:
    raise cli.UsageError(f"--num_samples must be >= 10 (the metrics need a few), got {a.num_samples}")
  if a.eta is not None and not 0 <= a.eta <= 1:
    raise cli.UsageError(f"--eta must lie in [0, 1], got {a.eta}")
  sweep = parse_steps(a.sweep) if a.sweep else None
  if a.sweep_num_samples is not None and a.sweep_num_samples < 10:
    raise cli.UsageError(f"--sweep_num_samples must be >= 10, got {a.sweep_num_samples}")
  if a.skip_main and not sweep:
    raise cli.UsageError("--skip_main needs --sweep")
  if kind == "vae" and (sweep or a.sampler or a.steps):
    raise cli.UsageError("--sampler, --steps and --sweep apply to DDPM runs only")
  if kind == "ddpm":
    config, _ = cli.load_config(mnist_ddpm.Config, workdir)
    T = config.timesteps
    sampler = a.sampler or config.sampler
    eta = config.eta if a.eta is None else a.eta
    steps = a.steps or {"ddpm": T, "ddim": config.sample_steps or mnist_ddpm.DDIM_DEFAULT_STEPS,
                         "dpm": config.sample_steps or mnist_ddpm.DPM_DEFAULT_STEPS}[sampler]
    for s in [steps] + (sweep or []):
      if not 1 <= s <= T:
        raise cli.UsageError(f"step count {s} is outside [1, {T}]: it exceeds the run's T = {T}"
                             if s > T else f"step count {s} must be >= 1")
  batch = min(a.batch_size, a.num_samples)
  out_dir = os.path.join(workdir, "eval")

  mnist = load_mnist()
  net = FeatureNet()
  ref = reference_features(net, mnist.test_images)
  rng = jax.random.key(a.seed)
  cache_baselines: dict = {}

  def baseline_metrics(n):
    """Metrics of the floor and ceilings with n images (computed once per n)."""
    if n not in cache_baselines:
      cache_baselines[n] = {k: evaluate_images(net, ref, v, a.seed)
                            for k, v in baselines(mnist.train_images, n, a.seed).items()}
    return cache_baselines[n]

  def with_baselines(name, metrics, n):
    return {name: metrics, **baseline_metrics(n)}

  if kind == "vae":
    c, vae, params, step = mnist_vae.load_trained(workdir)
    fn = jax.jit(lambda p, r: vj.sample_prior(vj.vae_fns(vae, p)[1], r, batch, c.latent_dim))
    imgs, spi = draw(fn, params, rng, a.num_samples, batch, "VAE samples")
    imgs = to_uint8(imgs, (0.0, 1.0))
    name, tag = "VAE prior samples (Bernoulli means)", f"vae_prior_n{a.num_samples}"
    m = evaluate_images(net, ref, imgs, a.seed)
    m["seconds_per_image"] = spi
    report(out_dir, tag, {**_meta("vae", workdir, step, a.num_samples),
                          "results": with_baselines(name, m, a.num_samples)}, imgs)
    return

  config, model, schedule, params, step = mnist_ddpm.load_trained(workdir)

  if not a.skip_main:
    fn = ddpm_sampler(config, model, schedule, sampler, steps, eta, batch)
    imgs, spi = draw(fn, params, rng, a.num_samples, batch, f"{sampler} {steps} steps")
    imgs = to_uint8(imgs)
    m = evaluate_images(net, ref, imgs, a.seed)
    m.update(seconds_per_image=spi, sampler=sampler, steps=steps, eta=eta)
    name = f"DDPM {config.model} ({sampler}, {steps} steps)"
    report(out_dir, f"{sampler}_{steps}steps_n{a.num_samples}",
           {**_meta("ddpm", workdir, step, a.num_samples),
            "results": with_baselines(name, m, a.num_samples)}, imgs)

  if sweep:
    n = a.sweep_num_samples or a.num_samples
    b = min(batch, n)
    rows = []
    for sampler_name in mnist_ddpm.SAMPLERS:
      for s in sweep:
        fn = ddpm_sampler(config, model, schedule, sampler_name, s, 0.0, b)
        imgs, spi = draw(fn, params, rng, n, b, f"sweep {sampler_name} {s} steps")
        m = evaluate_images(net, ref, to_uint8(imgs), a.seed)
        m.update(sampler=sampler_name, steps=s, seconds_per_image=spi,
                 eta=0.0 if sampler_name == "ddim" else None)
        rows.append(m)
        tqdm.write(f"{sampler_name:5s} {s:5d} steps: {spi * 1e3:8.1f} ms/image, "
                   f"FD-MNIST {m['fd']:.3f}, KID {m['kid']:.3g}", file=sys.stderr)
    record = {**_meta("ddpm", workdir, step, n), "sweep": rows,
              "baselines": baseline_metrics(n)}
    tag = f"steps_sweep_n{n}"
    cli.write_json_atomic(os.path.join(out_dir, tag + ".json"), record)
    plot_sweep(rows, record["baselines"], os.path.join(out_dir, tag + ".png"), n)
    print(format_sweep(rows))
    print(f"written to {os.path.join(out_dir, tag)}.json and .png", file=sys.stderr)


def report(out_dir: str, tag: str, record: dict, images_u8: np.ndarray) -> None:
  cli.write_json_atomic(os.path.join(out_dir, tag + ".json"), record)
  plotting.save_grid(images_u8[:100].astype(np.float32) / 255.0, os.path.join(out_dir, tag + ".png"),
                     nrow=10, title=f"{tag}: first 100 samples", value_range=(0, 1))
  print(f"reference: {record['reference']}; extractor: {record['extractor']}")
  print(format_table(record["results"]))
  print(f"written to {os.path.join(out_dir, tag)}.json and .png", file=sys.stderr)


def format_sweep(rows: list) -> str:
  lines = [f"{'sampler':8s} {'steps':>6s} {'ms/image':>9s} {'FD-MNIST':>9s} {'KID':>8s} "
           f"{'prec':>6s} {'recall':>6s}"]
  for r in rows:
    lines.append(f"{r['sampler']:8s} {r['steps']:6d} {1e3 * r['seconds_per_image']:9.2f} "
                 f"{r['fd']:9.3f} {r['kid']:8.3g} {r['precision']:6.3f} {r['recall']:6.3f}")
  return "\n".join(lines)


def plot_sweep(rows: list, base: dict, path: str, n: int) -> None:
  plt = plotting.plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for sampler_name, marker in (("ddpm", "o"), ("ddim", "s"), ("dpm", "^")):
    rs = [r for r in rows if r["sampler"] == sampler_name]
    ax1.plot([r["steps"] for r in rs], [r["fd"] for r in rs], marker=marker, label=sampler_name)
    ax2.plot([r["steps"] for r in rs], [1e3 * r["seconds_per_image"] for r in rs],
             marker=marker, label=sampler_name)
  floor = base["floor: real train images"]["fd"]
  ax1.axhline(floor, color="gray", ls="--", label=f"real train images ({floor:.2f})")
  for ax in (ax1, ax2):
    ax.set_xscale("log")
    ax.set_xlabel("sampler steps")
    ax.grid(alpha=0.3)
    ax.legend()
  ax1.set_yscale("log")
  ax1.set_ylabel(f"FD-MNIST ({n} samples vs MNIST test)")
  ax2.set_yscale("log")
  ax2.set_ylabel(f"ms per image ({jax.devices()[0].device_kind})")
  fig.suptitle("Sampling speed and quality against step count")
  fig.tight_layout()
  plotting.atomic_savefig(fig, path, dpi=100)


if __name__ == "__main__":
  sys.exit(cli.run_main(main))
