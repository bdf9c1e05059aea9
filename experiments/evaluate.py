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
and a grid of the first 100 samples beside it. A class-conditional run draws
what its grids show: each digit in turn (N/10 of each) at the run's
`--guidance_scale`, also scored per class (`--guidance 0` gives the null
label's unconditional samples). DDPM runs can add:

* `--sweep 10,20,50,100,250,1000`: each sampler of `--sweep_samplers`
  (ddpm, ddim, dpm, dpm_sde) at each step count, on the same checkpoint:
  `W/eval/steps_sweep_n<N>.json` and `.png` (seconds per image and FD-MNIST).
  Rows of samplers not rerun are kept from an earlier sweep of the same
  checkpoint and N.
* `--vlb`: the variational bound in bits/dim on `--vlb_num_images` MNIST test
  images (discretised Gaussian decoder, all T terms per image; see
  `ddpm_jax.likelihood`): `W/eval/vlb_n<N>.json` and `.png` (the bound's
  terms against t).
* `--guidance 0,1,3` (class-conditional runs): samples of every digit at each
  classifier-free guidance scale (with `--sampler` and `--steps`), scored by
  the MNIST classifier (accuracy per class: is a "3" drawn as a 3?) and by
  FD-MNIST:
  `W/eval/guidance_n<N>.json` and `.png`.
"""

from __future__ import annotations

from experiments import runtime

runtime.restart_main(__name__)  # huge pages: restart before the imports below (runtime.py)

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np
from tqdm import tqdm

import ddpm_jax as dj
import vae_jax as vj
from experiments import cli, ddpm_setup, distributed, files, plotting, vae_setup
from experiments.data import ARRAYS_SHA256, default_cache_dir, load_mnist
from nnbase import pixels
from sample_quality import classifier as clf
from sample_quality import metrics as qm

REFERENCE = "MNIST test split (10,000 images)"
REFERENCE_SIZE = 10_000
_TEST_READABLE: dict = {}  # readable fraction of the reference set, once computed
EXTRACTOR = "sample_quality MNIST CNN, 128-d penultimate features"


# --------------------------------------------------------------------- features


class FeatureNet:
  """The packaged classifier: `embed(images uint8 [N, 28, 28, 1]) -> (features, probs)`."""

  def __init__(self):
    self.params = clf.load_params()
    self._apply = clf.make_apply()

  def embed(self, images_u8: np.ndarray) -> tuple:
    x = pixels.u8_to_unit(images_u8)
    logits, feats = self._apply(self.params, x)
    return np.asarray(feats, np.float64), np.asarray(jax.nn.softmax(logits), np.float64)


class Reference(NamedTuple):
  """The reference set as the metrics use it: features [N, FEATURE_DIM], each
  one's squared distance to its REFERENCE_K-th nearest neighbour [N] (the
  precision manifold), and the classifier's readable fraction of the set."""

  features: np.ndarray
  radii: np.ndarray
  readable: float


REFERENCE_K = 3  # the k of precision/recall


def reference_set(net: FeatureNet, test_images: np.ndarray, cache_dir: Optional[str] = None):
  """`Reference` of the MNIST test split, cached per (classifier, dataset) hash.

  The cache stores its arrays' own sha256; a cache that is unreadable, has
  the wrong shapes or fails its hash is rebuilt (with a note on stderr).
  """
  cache_dir = cache_dir or os.path.join(os.path.dirname(default_cache_dir()), "quality")
  name = f"ref_k{REFERENCE_K}_{clf.WEIGHTS_SHA256[:12]}_{ARRAYS_SHA256[:12]}.npz"
  path = os.path.join(cache_dir, name)
  n = test_images.shape[0]
  keys, shapes = ("features", "radii", "readable"), [(n, clf.FEATURE_DIM), (n,), ()]
  if os.path.exists(path):
    try:
      feats, radii, readable = files.read_verified_npz(path, keys, shapes=shapes)
      return Reference(feats, radii, float(readable))
    except files.CacheError as e:
      print(f"note: rebuilding the reference-feature cache {path} ({e})", file=sys.stderr)
  feats, probs = net.embed(test_images)
  radii = qm.knn_radii(feats, REFERENCE_K)
  readable = qm.readable_fraction(probs)
  files.write_verified_npz(path, dict(zip(keys, (feats, radii, readable))))
  return Reference(feats, radii, float(readable))


to_uint8 = pixels.to_uint8


# -------------------------------------------------------------------- baselines


def blurred_mean_image(train_images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
  """The mean training image, Gaussian-blurred: uint8 [28, 28, 1]."""
  from scipy.ndimage import gaussian_filter

  mean = train_images.astype(np.float64).mean(0)[..., 0]
  return np.rint(gaussian_filter(mean, sigma))[..., None].clip(0, 255).astype(np.uint8)


def baselines(train_images: np.ndarray, n: int, seed: int = 0) -> dict:
  """Image sets of size n: the floor (real train images) and two ceilings."""
  rs = np.random.default_rng(seed)
  real = train_images[rs.choice(train_images.shape[0], n, replace=False)]
  noise = rs.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  mean = np.repeat(blurred_mean_image(train_images)[None], n, axis=0)
  return {
    "floor: real train images": real,
    "ceiling: uniform noise": noise,
    "ceiling: blurred mean image": mean,
  }


def evaluate_images(net: FeatureNet, ref: Reference, images_u8: np.ndarray, seed: int = 0) -> dict:
  feats, probs = net.embed(images_u8)
  return qm.all_metrics(ref.features, feats, probs, k=REFERENCE_K, seed=seed, real_radii=ref.radii)


# --------------------------------------------------------------------- samplers


def draw(sample_fn: Callable, params, rng, n: int, batch_size: int, desc: str) -> tuple:
  """Calls jitted `sample_fn(params, rng_i) -> [batch, ...]` for i = 0, 1, ...
  until n images exist; returns (images [n, ...], seconds per image without compilation)."""
  num_batches = -(-n // batch_size)
  compiled = sample_fn.lower(params, jax.random.fold_in(rng, 0)).compile()
  out, t0 = [], time.perf_counter()
  for i in tqdm(
    range(num_batches), desc=desc, unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True
  ):
    out.append(distributed.to_host(compiled(params, jax.random.fold_in(rng, i))))
  secs = time.perf_counter() - t0
  return np.concatenate(out)[:n], secs / (num_batches * batch_size)


def sampler_overrides(config, a, sampler: str, steps: int):
  """The run's config with --variance, --spacing and --temperature applied and checked."""
  changes = {k: getattr(a, k) for k in ("variance", "spacing", "temperature")}
  changes = {k: v for k, v in changes.items() if v is not None}
  new = dataclasses.replace(config, **changes)
  if changes:  # the job's checks name the bad flag (e.g. --temperature with dpm)
    ddpm_setup.validate(dataclasses.replace(new, sampler=sampler, sample_steps=steps))
  return new


def sampler_suffix(a, sep: str) -> str:
  """'' or e.g. '_beta_tilde_T0.9' naming the sampler flags that were given."""
  parts = [a.variance, a.spacing, None if a.temperature is None else f"T{a.temperature:g}"]
  return "".join(sep + p for p in parts if p)


def with_sampler(config, sampler: str, steps: int, eta: float):
  """The run's config drawing with `sampler` over `steps` (DDIM's `eta`)."""
  return dataclasses.replace(config, sampler=sampler, sample_steps=steps, eta=eta)


def ddpm_sampler(config, model, schedule, sampler: str, steps: int, eta: float, batch: int):
  """The job's jitted sampler (split over devices when the batch allows)."""
  config = with_sampler(config, sampler, steps, eta)
  return ddpm_setup.make_sampler(config, model, schedule, (batch, 28, 28, 1))


# ------------------------------------------------------------------------ table


def format_table(rows: dict) -> str:
  head = (
    f"{'set':34s} {'n':>6s} {'FD-MNIST':>9s} {'KID +- stderr':>17s} {'prec':>6s} {'recall':>6s} "
    f"{'CS':>6s} {'TV':>5s} {'divers':>7s} {'readable':>8s}"
  )
  lines = [head, "-" * len(head)]
  for name, m in rows.items():
    kid = f"{m['kid']:.3g} +- {m['kid_stderr']:.2g}"
    lines.append(
      f"{name[:34]:34s} {m['num_samples']:6d} {m['fd']:9.3f} {kid:>17s} "
      f"{m['precision']:6.3f} {m['recall']:6.3f} {m['classifier_score']:6.2f} "
      f"{m['class_tv_from_uniform']:5.3f} {m['diversity']:7.2f} "
      f"{m['readable']:8.3f}"
    )
  return "\n".join(lines)


def _meta(kind: str, workdir: str, step: int, n: int) -> dict:
  return {
    "run": kind,
    "workdir": workdir,
    "checkpoint_step": step,
    "num_samples": n,
    "reference": REFERENCE,
    "reference_readable": _TEST_READABLE.get("value"),
    "readable_threshold": qm.READABLE_THRESHOLD,
    "extractor": EXTRACTOR,
    "extractor_sha256": clf.WEIGHTS_SHA256,
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "time": time.time(),
  }


def run_kind(workdir: str) -> str:
  fields = cli.stored_fields(workdir)
  if "timesteps" in fields:
    return "ddpm"
  if "latent_dim" in fields:
    return "vae"
  raise cli.UsageError(f"{workdir}/config.json is neither a DDPM nor a VAE run")


def parse_list(text: str, flag: str, kind=int, low=1) -> list:
  """Comma-separated numbers of `kind`, each >= low; UsageError naming `flag` otherwise."""
  noun = "integers" if kind is int else "numbers"
  try:
    values = [kind(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise cli.UsageError(f"{flag} must be comma-separated {noun}, got {text!r}") from None
  if not values or min(values) < low:
    raise cli.UsageError(f"{flag} values must be >= {low}, got {text!r}")
  return values


def build_parser():
  p = cli._Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a DDPM or VAE run's workdir (results go to W/eval/)")
  src.add_argument(
    "--pretrained",
    choices=sorted(dj.pretrained.REGISTRY),
    help="a model that ships with the package (results go to --out)",
  )
  p.add_argument(
    "--out",
    default=None,
    help="with --pretrained: output folder (default: runs/eval_pretrained_<name>)",
  )
  p.add_argument(
    "--sampler",
    choices=ddpm_setup.SAMPLERS,
    default=None,
    help="DDPM runs: ancestral (ddpm), ddim, dpm (DPM-Solver++ 2M) or dpm_sde (its stochastic "
    "form); default: the run's sampler",
  )
  p.add_argument(
    "--steps",
    type=int,
    default=None,
    help="DDPM runs: sampler steps (default: T for ddpm, the run's "
    f"--sample_steps or {ddpm_setup.DDIM_DEFAULT_STEPS} for ddim)",
  )
  p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the run's)")
  p.add_argument(
    "--variance",
    choices=("beta", "beta_tilde"),
    default=None,
    help="ancestral (ddpm) variance (default: the run's)",
  )
  p.add_argument(
    "--spacing",
    default=None,
    help="sampler timestep spacing: trailing, linspace, quadratic, or logsnr for dpm "
    "(default: the run's, else the sampler's)",
  )
  p.add_argument(
    "--temperature",
    type=float,
    default=None,
    help="noise scale of the ddpm and ddim samplers (default: the run's)",
  )
  p.add_argument("--num_samples", type=int, default=10000, help="images to draw and score")
  p.add_argument("--batch_size", type=int, default=500, help="images per compiled sampler call")
  p.add_argument("--seed", type=int, default=0, help="sampling and subset seed")
  p.add_argument(
    "--sweep",
    default=None,
    metavar="STEPS",
    help="DDPM runs: also a DDPM and DDIM speed/quality sweep over these step "
    "counts, e.g. 10,20,50,100,250,1000",
  )
  p.add_argument(
    "--sweep_num_samples",
    type=int,
    default=None,
    help="images per sweep point (default: --num_samples)",
  )
  p.add_argument(
    "--sweep_samplers",
    default=",".join(ddpm_setup.SAMPLERS),
    help="samplers of the sweep (default: all)",
  )
  p.add_argument(
    "--vlb",
    action="store_true",
    help="DDPM runs: the variational bound in bits/dim on MNIST test images",
  )
  p.add_argument(
    "--vlb_num_images",
    type=int,
    default=100,
    help="test images for --vlb (each costs T network calls)",
  )
  p.add_argument(
    "--guidance",
    default=None,
    metavar="SCALES",
    help="class-conditional DDPM runs: per-class accuracy and FD of samples at "
    "these classifier-free guidance scales, e.g. 0,1,3",
  )
  p.add_argument(
    "--skip_main", action="store_true", help="with --sweep, --vlb or --guidance: only those"
  )
  distributed.add_flags(p)
  return p


@dataclasses.dataclass
class Request:
  """The checked command line: what to evaluate and how."""

  a: argparse.Namespace
  kind: str  # "ddpm" or "vae"
  workdir: str
  out_dir: str
  pretrained: Optional[dj.Pretrained] = None
  config: Optional[ddpm_setup.Config] = None  # DDPM runs, with the sampler flags applied
  sampler: Optional[str] = None
  steps: Optional[int] = None
  eta: Optional[float] = None
  sweep: Optional[list] = None
  sweep_samplers: Optional[list] = None
  scales: Optional[list] = None

  @property
  def batch(self) -> int:
    return min(self.a.batch_size, self.a.num_samples)


def check_counts(a) -> None:
  """UsageError for sample, batch and step counts out of range."""
  for name in ("num_samples", "batch_size"):
    if getattr(a, name) < 1:
      raise cli.UsageError(f"--{name} must be >= 1, got {getattr(a, name)}")
  if a.num_samples < 10:
    raise cli.UsageError(
      f"--num_samples must be >= 10 (the metrics need a few), got {a.num_samples}"
    )
  if a.num_samples > REFERENCE_SIZE:
    raise cli.UsageError(
      f"--num_samples must lie in [10, {REFERENCE_SIZE}] (the reference set has "
      f"{REFERENCE_SIZE} images), got {a.num_samples}"
    )
  if a.steps is not None and a.steps < 1:
    raise cli.UsageError(f"--steps must be >= 1, got {a.steps}")
  if a.eta is not None and not 0 <= a.eta <= 1:
    raise cli.UsageError(f"--eta must lie in [0, 1], got {a.eta}")
  if a.sweep_num_samples is not None and not 10 <= a.sweep_num_samples <= REFERENCE_SIZE:
    raise cli.UsageError(
      f"--sweep_num_samples must lie in [10, {REFERENCE_SIZE}], got {a.sweep_num_samples}"
    )
  if a.vlb_num_images < 1:
    raise cli.UsageError(f"--vlb_num_images must be >= 1, got {a.vlb_num_images}")


def resolve_ddpm(r: Request) -> None:
  """Fills the DDPM fields of r from its config and flags (UsageError on bad ones)."""
  a = r.a
  if r.pretrained is not None:
    config = ddpm_setup.Config(**r.pretrained.record["config"])
  else:
    config, _ = cli.load_config(ddpm_setup.Config, r.workdir)
  if config.dataset != "mnist":
    raise cli.UsageError(
      f"{r.workdir} trained on {config.dataset}: FD-MNIST, the readable fraction and the "
      "MNIST classifier measure MNIST runs only (a number here would mean nothing); "
      "look at its sample grids"
    )
  T = config.timesteps
  r.sampler = a.sampler or config.sampler
  r.eta = config.eta if a.eta is None else a.eta
  default_steps = {
    "ddpm": T,
    "ddim": config.sample_steps or ddpm_setup.DDIM_DEFAULT_STEPS,
    "dpm": config.sample_steps or ddpm_setup.DPM_DEFAULT_STEPS,
    "dpm_sde": config.sample_steps or ddpm_setup.DPM_DEFAULT_STEPS,
  }
  r.steps = a.steps if a.steps is not None else default_steps[r.sampler]
  r.config = sampler_overrides(config, a, r.sampler, r.steps)
  if r.scales and not config.conditional:
    raise cli.UsageError(
      f"--guidance needs a class-conditional run; {r.workdir} was trained without --conditional"
    )
  for s in [r.steps] + (r.sweep or []):
    if not 1 <= s <= T:
      raise cli.UsageError(
        f"step count {s} is outside [1, {T}]: it exceeds the run's T = {T}"
        if s > T
        else f"step count {s} must be >= 1"
      )


def parse_request(argv) -> Request:
  """Parses and checks the flags; UsageError (exit 2) names the bad one."""
  a = build_parser().parse_args(argv)
  distributed.initialize(a)
  for flag in ("workdir", "out"):
    cli.check_path(getattr(a, flag, None), "--" + flag)
  if a.pretrained:
    try:
      pretrained = dj.load_pretrained(a.pretrained)
    except dj.param_files.WeightsError as e:
      raise cli.UsageError(str(e)) from None
    workdir = files.absolute(a.out or os.path.join("runs", f"eval_pretrained_{a.pretrained}"))
    r = Request(a, "ddpm", workdir, workdir, pretrained=pretrained)
  else:
    if a.out:
      raise cli.UsageError("--out applies with --pretrained; a workdir's results go to W/eval/")
    workdir = files.absolute(a.workdir)
    r = Request(a, run_kind(workdir), workdir, os.path.join(workdir, "eval"))
  check_counts(a)
  r.sweep = parse_list(a.sweep, "--sweep") if a.sweep else None
  r.sweep_samplers = [x for x in a.sweep_samplers.split(",") if x]
  for x in r.sweep_samplers:
    if x not in ddpm_setup.SAMPLERS:
      raise cli.UsageError(
        f"--sweep_samplers: unknown sampler {x!r}; choose from {ddpm_setup.SAMPLERS}"
      )
  r.scales = parse_list(a.guidance, "--guidance", float, 0) if a.guidance else None
  if a.skip_main and not (r.sweep or a.vlb or r.scales):
    raise cli.UsageError("--skip_main needs --sweep, --vlb or --guidance")
  ddpm_only = (r.sweep, a.sampler, a.steps, a.vlb, r.scales, a.variance, a.spacing, a.temperature)
  if r.kind == "vae" and any(x is not None and x is not False for x in ddpm_only):
    raise cli.UsageError(
      "--sampler, --steps, --sweep, --vlb, --guidance, --variance, --spacing and "
      "--temperature apply to DDPM runs only"
    )
  if r.kind == "ddpm":
    resolve_ddpm(r)
  return r


class Scorer:
  """The feature net, the reference features and the baselines (floor, ceilings) per n."""

  def __init__(self, seed: int):
    self.seed = seed
    self.mnist = load_mnist()
    self.net = FeatureNet()
    self.ref = reference_set(self.net, self.mnist.test_images)
    test_readable = self.ref.readable
    _TEST_READABLE["value"] = test_readable
    print(
      f"readable fraction of the MNIST test images (the ceiling): {test_readable:.4f}",
      file=sys.stderr,
    )
    self._baselines: dict = {}

  def score(self, images_u8: np.ndarray) -> dict:
    return evaluate_images(self.net, self.ref, images_u8, self.seed)

  def baselines(self, n: int) -> dict:
    """Metrics of the floor and ceilings with n images (computed once per n)."""
    if n not in self._baselines:
      self._baselines[n] = {
        k: self.score(v) for k, v in baselines(self.mnist.train_images, n, self.seed).items()
      }
    return self._baselines[n]

  def with_baselines(self, name: str, metrics: dict, n: int) -> dict:
    return {name: metrics, **self.baselines(n)}


def eval_vae(r: Request, sc: Scorer, rng) -> None:
  """Prior samples of a VAE run, scored."""
  n, batch = r.a.num_samples, r.batch
  c, vae, params, step = vae_setup.load_trained(r.workdir)
  fn = jax.jit(lambda p, k: vj.sample_prior(vj.vae_fns(vae, p)[1], k, batch, c.latent_dim))
  imgs, spi = draw(fn, params, rng, n, batch, "VAE samples")
  imgs = to_uint8(imgs, (0.0, 1.0))
  m = sc.score(imgs)
  m["seconds_per_image"] = spi
  name = "VAE prior samples (Bernoulli means)"
  record = {**_meta("vae", r.workdir, step, n), "results": sc.with_baselines(name, m, n)}
  report(r.out_dir, f"vae_prior_n{n}", record, imgs)


def eval_main(r: Request, sc: Scorer, trained, rng) -> None:
  """Samples of the configured sampler, scored (a conditional run: each digit
  in turn at the run's guidance scale, as its grids)."""
  config, model, schedule, params, step = trained
  a, n = r.a, r.a.num_samples
  extra, labels = "", None
  if config.conditional:
    gconfig = with_sampler(config, r.sampler, r.steps, r.eta)
    w = config.guidance_scale
    imgs, labels, spi = draw_classes(gconfig, model, schedule, params, w, n, r.batch, rng)
    extra = f", guidance {w:g}, each digit in turn"
  else:
    fn = ddpm_sampler(config, model, schedule, r.sampler, r.steps, r.eta, r.batch)
    imgs, spi = draw(fn, params, rng, n, r.batch, f"{r.sampler} {r.steps} steps")
  imgs = to_uint8(imgs)
  m = sc.score(imgs)
  if labels is not None:
    m.update(class_scores(sc, imgs, labels), guidance_scale=config.guidance_scale)
  m.update(seconds_per_image=spi, sampler=r.sampler, steps=r.steps, eta=r.eta)
  name = f"DDPM {config.model} ({r.sampler}, {r.steps} steps{sampler_suffix(a, ', ')}{extra})"
  record = {**_meta("ddpm", r.workdir, step, n), "results": sc.with_baselines(name, m, n)}
  report(r.out_dir, f"{r.sampler}_{r.steps}steps{sampler_suffix(a, '_')}_n{n}", record, imgs)


def eval_sweep(r: Request, sc: Scorer, trained, rng) -> None:
  """Every sampler of --sweep_samplers at every step count of --sweep."""
  config, model, schedule, params, step = trained
  n = r.a.sweep_num_samples or r.a.num_samples
  b = min(r.batch, n)
  tag = f"steps_sweep_n{n}"
  rows = earlier_sweep_rows(os.path.join(r.out_dir, tag + ".json"), step, r.sweep_samplers)
  for sampler_name in r.sweep_samplers:
    for s in r.sweep:
      fn = ddpm_sampler(config, model, schedule, sampler_name, s, 0.0, b)
      imgs, spi = draw(fn, params, rng, n, b, f"sweep {sampler_name} {s} steps")
      m = sc.score(to_uint8(imgs))
      eta = 0.0 if sampler_name == "ddim" else None
      m.update(sampler=sampler_name, steps=s, seconds_per_image=spi, eta=eta)
      rows.append(m)
      tqdm.write(
        f"{sampler_name:5s} {s:5d} steps: {spi * 1e3:8.1f} ms/image, "
        f"FD-MNIST {m['fd']:.3f}, KID {m['kid']:.3g}",
        file=sys.stderr,
      )
  order = {name: i for i, name in enumerate(ddpm_setup.SAMPLERS)}
  rows.sort(key=lambda row: (order[row["sampler"]], row["steps"]))
  record = {**_meta("ddpm", r.workdir, step, n), "sweep": rows, "baselines": sc.baselines(n)}
  cli.write_json_atomic(os.path.join(r.out_dir, tag + ".json"), record)
  plot_sweep(rows, record["baselines"], os.path.join(r.out_dir, tag + ".png"), n)
  print(format_sweep(rows))
  print(f"written to {os.path.join(r.out_dir, tag)}.json and .png", file=sys.stderr)


def eval_vlb(r: Request, sc: Scorer, trained, rng) -> None:
  """The variational bound in bits/dim on MNIST test images."""
  config, model, schedule, params, step = trained
  test_images = sc.mnist.test_images
  n = min(r.a.vlb_num_images, test_images.shape[0])
  record = vlb_eval(
    config, model, schedule, params, test_images, n, r.batch, jax.random.fold_in(rng, 7)
  )
  record = {**_meta("ddpm", r.workdir, step, n), **record}
  tag = f"vlb_n{n}"
  cli.write_json_atomic(os.path.join(r.out_dir, tag + ".json"), record)
  plot_vlb(record, os.path.join(r.out_dir, tag + ".png"))
  print(
    f"variational bound on {n} MNIST test images ({config.variance} variance): "
    f"{record['bits_per_dim']:.3f} +- {record['bits_per_dim_stderr']:.3f} bits/dim "
    f"({record['nats_per_image']:.1f} nats per image; prior term "
    f"{record['prior_bits_per_dim']:.2g}, decoder {record['decoder_bits_per_dim']:.3f})"
  )
  print(f"written to {os.path.join(r.out_dir, tag)}.json and .png", file=sys.stderr)


def class_scores(sc: Scorer, imgs: np.ndarray, labels: np.ndarray) -> dict:
  """Accuracy on the asked digit and readable fraction, overall and per class."""
  _, probs = sc.net.embed(imgs)
  pred = probs.argmax(axis=1)
  sure = probs.max(axis=1) >= qm.READABLE_THRESHOLD
  classes = range(ddpm_setup.NUM_CLASSES)
  return dict(
    accuracy=float(np.mean(pred == labels)),
    per_class_accuracy=[float(np.mean(pred[labels == k] == k)) for k in classes],
    per_class_readable=[float(np.mean(sure[labels == k])) for k in classes],
    readable_and_correct=float(np.mean(sure & (pred == labels))),
  )


def eval_guidance(r: Request, sc: Scorer, trained, rng) -> None:
  """Samples of every digit at each guidance scale: accuracy, readable, FD."""
  config, model, schedule, params, step = trained
  n = max(1, -(-r.a.num_samples // ddpm_setup.NUM_CLASSES)) * ddpm_setup.NUM_CLASSES
  rows, grids = [], []
  gconfig = with_sampler(config, r.sampler, r.steps, r.eta)
  for w in r.scales:
    imgs, labels, spi = draw_classes(
      gconfig, model, schedule, params, w, n, r.batch, jax.random.fold_in(rng, 11)
    )
    imgs = to_uint8(imgs)
    m = sc.score(imgs)
    m.update(class_scores(sc, imgs, labels))
    m.update(guidance_scale=w, seconds_per_image=spi, sampler=r.sampler, steps=r.steps)
    rows.append(m)
    grids.append(imgs[np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(10)])])
    tqdm.write(
      f"guidance {w:g}: accuracy {m['accuracy']:.3f}, readable {m['readable']:.3f}, "
      f"FD-MNIST {m['fd']:.2f}",
      file=sys.stderr,
    )
  tag = f"guidance{sampler_suffix(r.a, '_')}_n{n}"
  record = {**_meta("ddpm", r.workdir, step, n), "rows": rows, "baselines": sc.baselines(n)}
  cli.write_json_atomic(os.path.join(r.out_dir, tag + ".json"), record)
  plot_guidance(rows, grids, os.path.join(r.out_dir, tag + ".png"))
  print(format_guidance(rows))
  print(f"written to {os.path.join(r.out_dir, tag)}.json and .png", file=sys.stderr)


def main(argv=None) -> None:
  r = parse_request(argv)
  cli.prepare_output_dir(r.out_dir)  # an unwritable folder fails now, not after the sampling
  sc = Scorer(r.a.seed)
  rng = jax.random.key(r.a.seed)
  if r.kind == "vae":
    eval_vae(r, sc, rng)
    return
  if r.pretrained is not None:
    p = r.pretrained
    trained = (r.config, p.model, p.schedule, p.params, p.record["steps"])
  else:
    config, model, schedule, params, step = ddpm_setup.load_trained(r.workdir)
    trained = (r.config, model, schedule, params, step)  # the config with the sampler flags
  if not r.a.skip_main:
    eval_main(r, sc, trained, rng)
  if r.sweep:
    eval_sweep(r, sc, trained, rng)
  if r.a.vlb:
    eval_vlb(r, sc, trained, rng)
  if r.scales:
    eval_guidance(r, sc, trained, rng)


def earlier_sweep_rows(path: str, step: int, rerun: list) -> list:
  """Rows of an earlier sweep of the same checkpoint for samplers not rerun now."""
  try:
    old = cli.read_json(path)
  except (OSError, ValueError):
    return []
  if not isinstance(old, dict) or old.get("checkpoint_step") != step:
    return []
  return [r for r in old.get("sweep", []) if r.get("sampler") not in rerun]


def draw_classes(config, model, schedule, params, scale: float, n: int, batch: int, rng):
  """n samples, each digit in turn (labels sorted), with classifier-free
  guidance `scale`: (images [n, ...], labels [n], seconds per image)."""
  labels = np.sort(np.arange(n, dtype=np.int32) % ddpm_setup.NUM_CLASSES)
  b = min(batch, labels.size)
  pad = -labels.size % b
  padded = np.concatenate([labels, labels[:pad]])
  fn = ddpm_setup.make_sampler(
    config, model, schedule, (b, 28, 28, 1), labels=padded[:b], guidance_scale=scale
  )
  compiled = fn.lower(params, rng, padded[:b]).compile()
  out, t0 = [], time.perf_counter()
  for i in tqdm(
    range(padded.size // b),
    desc=f"guidance {scale:g}",
    unit="batch",
    file=sys.stderr,
    leave=False,
    dynamic_ncols=True,
  ):
    out.append(
      distributed.to_host(compiled(params, jax.random.fold_in(rng, i), padded[i * b : (i + 1) * b]))
    )
  secs = time.perf_counter() - t0
  return np.concatenate(out)[: labels.size], labels, secs / padded.size


def vlb_eval(
  config, model, schedule, params, test_images: np.ndarray, n: int, batch: int, rng
) -> dict:
  """Bits/dim of the bound on the first n test images, in batches."""
  eps_fn_of = lambda p: dj.eps_fn_from_model(
    dj.model_eps_fn(model, p), schedule, config.parameterization
  )
  fn = dj.parallel.jit_inference(
    lambda p, x, r: dj.likelihood.vlb_terms(eps_fn_of(p), schedule, r, x, config.variance)
  )
  totals, priors, terms = [], [], []
  for i in tqdm(range(0, n, batch), desc="VLB", unit="batch", file=sys.stderr, dynamic_ncols=True):
    x = ddpm_setup.to_float(test_images[i : min(i + batch, n)])
    out = fn(params, x, jax.random.fold_in(rng, i))
    totals.append(np.asarray(out["total"], np.float64))
    priors.append(np.asarray(out["prior"], np.float64))
    terms.append(np.asarray(out["terms"], np.float64).sum(axis=1))
  total, prior = np.concatenate(totals), np.concatenate(priors)
  to_bpd = 1.0 / (28 * 28 * np.log(2.0))
  per_t = np.sum(terms, axis=0) / n * to_bpd
  bpd = total * to_bpd
  return {
    "bits_per_dim": float(bpd.mean()),
    "bits_per_dim_stderr": float(bpd.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
    "nats_per_image": float(total.mean()),
    "prior_bits_per_dim": float(prior.mean() * to_bpd),
    "decoder_bits_per_dim": float(per_t[0]),
    "per_t_bits_per_dim": per_t.tolist(),
    "variance": config.variance,
    "num_images": n,
    "images": f"first {n} of the MNIST test split",
  }


def plot_vlb(record: dict, path: str) -> None:
  plt = plotting.plt
  per_t = np.asarray(record["per_t_bits_per_dim"])
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.plot(np.arange(1, per_t.size), per_t[1:], lw=1)
  ax1.set_yscale("log")
  ax1.set_xlabel("t")
  ax1.set_ylabel("bits/dim of the KL term at t")
  ax1.set_title(f"decoder term (t = 0): {per_t[0]:.3f} bits/dim")
  ax2.plot(np.arange(per_t.size), np.cumsum(per_t) + record["prior_bits_per_dim"], lw=1)
  ax2.set_xlabel("t")
  ax2.set_ylabel("bits/dim from terms 0..t (+ prior)")
  ax2.set_title(f"total {record['bits_per_dim']:.3f} bits/dim")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
  fig.suptitle(f"DDPM variational bound on {record['num_images']} MNIST test images")
  fig.tight_layout()
  plotting.atomic_savefig(fig, path, dpi=100)


def format_guidance(rows: list) -> str:
  lines = [
    f"{'scale':>6s} {'accuracy':>8s} {'readable':>8s} {'FD-MNIST':>9s} {'recall':>6s}  "
    "per-class accuracy 0..9 / per-class readable 0..9"
  ]
  for r in rows:
    pc = " ".join(f"{v:.2f}" for v in r["per_class_accuracy"])
    pr = " ".join(f"{v:.2f}" for v in r["per_class_readable"])
    lines.append(
      f"{r['guidance_scale']:6g} {r['accuracy']:8.3f} {r['readable']:8.3f} "
      f"{r['fd']:9.2f} {r['recall']:6.3f}  {pc} / {pr}"
    )
  return "\n".join(lines)


def plot_guidance(rows: list, grids: list, path: str) -> None:
  plt = plotting.plt
  k = len(rows)
  fig, axes = plt.subplots(1, k + 1, figsize=(4 * (k + 1), 4.3))
  ax = axes[0]
  for r in rows:
    ax.plot(
      range(10),
      r["per_class_accuracy"],
      marker="o",
      label=f"w={r['guidance_scale']:g} (mean {r['accuracy']:.2f})",
    )
  ax.set_xticks(range(10))
  ax.set_xlabel("digit asked for")
  ax.set_ylabel("fraction classified as that digit")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  for ax, r, g in zip(axes[1:], rows, grids):
    ax.imshow(plotting.tile(pixels.to_unit(g, (0, 255)), 10)[..., 0], cmap="gray")
    ax.set_title(f"w = {r['guidance_scale']:g}: rows 0-9, FD {r['fd']:.1f}")
    ax.axis("off")
  fig.suptitle("Classifier-free guidance: do samples show the digit asked for?")
  fig.tight_layout()
  plotting.atomic_savefig(fig, path, dpi=100, bbox_inches="tight")


def report(out_dir: str, tag: str, record: dict, images_u8: np.ndarray) -> None:
  cli.write_json_atomic(os.path.join(out_dir, tag + ".json"), record)
  plotting.save_grid(
    pixels.to_unit(images_u8[:100], (0, 255)),
    os.path.join(out_dir, tag + ".png"),
    nrow=10,
    title=f"{tag}: first 100 samples",
    value_range=(0, 1),
  )
  print(f"reference: {record['reference']}; extractor: {record['extractor']}")
  print(format_table(record["results"]))
  print(f"written to {os.path.join(out_dir, tag)}.json and .png", file=sys.stderr)


def format_sweep(rows: list) -> str:
  lines = [
    f"{'sampler':8s} {'steps':>6s} {'ms/image':>9s} {'FD-MNIST':>9s} {'KID':>8s} "
    f"{'prec':>6s} {'recall':>6s}"
  ]
  for r in rows:
    lines.append(
      f"{r['sampler']:8s} {r['steps']:6d} {1e3 * r['seconds_per_image']:9.2f} "
      f"{r['fd']:9.3f} {r['kid']:8.3g} {r['precision']:6.3f} {r['recall']:6.3f}"
    )
  return "\n".join(lines)


def plot_sweep(rows: list, base: dict, path: str, n: int) -> None:
  plt = plotting.plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for sampler_name, marker in (("ddpm", "o"), ("ddim", "s"), ("dpm", "^"), ("dpm_sde", "v")):
    rs = [r for r in rows if r["sampler"] == sampler_name]
    ax1.plot([r["steps"] for r in rs], [r["fd"] for r in rs], marker=marker, label=sampler_name)
    ax2.plot(
      [r["steps"] for r in rs],
      [1e3 * r["seconds_per_image"] for r in rs],
      marker=marker,
      label=sampler_name,
    )
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
  cli.exit_main(main)
