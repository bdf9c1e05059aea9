"""Speed benchmarks: `python -m benchmarks.run [--quick] [--json PATH]`.

Times, in one process so ratios hold on a noisy machine:
- the machine's fp32 matmul peak (a large jitted `jnp.dot`), the yardstick
  for achieved GFLOP/s;
- the jitted, buffer-donating DDPM train step per U-Net preset and batch
  (images/s after compilation, compile seconds, GFLOP/s from XLA's cost
  analysis and as a fraction of the peak, peak memory), with our GEMM
  weight-gradient convolutions on and off on the seed SimpleUNet;
- the sampler: one U-Net forward on 64 images (what each sampler step costs)
  and whole DDIM-50 and DDPM-1000 samplers for 64 images;
- the VAE epoch (784-400-20, batch 128, one compiled scan), and the same
  epoch's matrix products alone (the floor under any implementation here);
- the seeds' PyTorch models and loops (`benchmarks/torch_ref.py`), when torch
  is installed: `train_ratio`, `sampler_ratio` and `vae_ratio` are JAX over
  PyTorch throughput (higher is better), null without torch;
  `vae_ratio_bound` is PyTorch's epoch over the products alone, timed in the
  same rounds (the vae_ratio no implementation on these products passes).

`python -m benchmarks.run` restarts itself once with huge pages for malloc,
as the jobs do (experiments/runtime.py). PyTorch runs in the same process,
so it gets the same set-up. The machine line says whether it is on.
"""

from __future__ import annotations

from experiments import runtime

runtime.restart_main(__name__)  # huge pages: restart before the imports below (runtime.py)

import argparse
import os
import resource
import sys
import time
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import benchmarks
import ddpm_jax as dj
import nnbase
import vae_jax as vj
from benchmarks import torch_ref
from experiments.ddpm_setup import job_mesh
from experiments.files import write_json_atomic

cpu_name = nnbase.tuning.cpu_model  # one home for the CPU model string


def _time(fn: Callable, iters: int) -> float:
  """Seconds per call of fn() (which must block), best of 3 rounds of `iters`."""
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(iters):
      fn()
    best = min(best, (time.perf_counter() - t0) / iters)
  return best


def matmul_peak(n: int = 2048, dtype=jnp.float32) -> float:
  """GFLOP/s of an n x n x n jitted matmul (the yardstick)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  dt = _time(lambda: f(a, a).block_until_ready(), 3)
  return 2 * n**3 / dt / 1e9


def _cost(compiled) -> tuple:
  """(flops, bytes of arguments + outputs + temporaries) from XLA's analyses."""
  flops, mem = None, None
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    flops = float(ca.get("flops", 0.0)) or None
  except Exception:  # not every backend reports it
    pass
  try:
    ma = compiled.memory_analysis()
    mem = int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes)
  except Exception:
    pass
  return flops, mem


def _device_peak_bytes() -> Optional[int]:
  try:
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None
  except Exception:
    return None


def _train_setup(preset: str, gemm: Optional[bool], dtype, mesh):
  """(init_state, jitted buffer-donating train step) of a U-Net preset, T=1000,
  the state replicated over `mesh` and the batch split over it (`dj.parallel`)."""
  model = dj.make_model(preset, gemm_conv=gemm, dtype=dtype)
  schedule = dj.make_schedule("linear", 1000)
  tx = dj.make_optimizer(1e-3, 1000)
  init = lambda: dj.create_train_state(jax.random.key(0), model, tx, (28, 28, 1))
  step = dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(1))
  return (lambda: dj.parallel.replicate(init(), mesh)), dj.parallel.parallel_train_step(step, mesh)


def _mesh(batch: int):
  """The mesh a job splits a batch of `batch` over (on a CPU, one device per
  core: experiments/runtime.py)."""
  return job_mesh(batch)


def _one_device():
  return dj.parallel.make_mesh(jax.devices()[:1])


def _forward_fn(model, mesh):
  """jit of the U-Net forward `(params, x, t) -> eps`, the batch split over the mesh."""
  rep, data = dj.parallel.replicated(mesh), dj.parallel.data_sharding(mesh)
  fn = dj.parallel.in_mesh(lambda p, x, t: model.apply(p, x, t), mesh)
  return dj.parallel.jit_inference(fn, in_shardings=(rep, data, data), out_shardings=data)


def _init_params(model, mesh: Optional[Mesh] = None):
  """The model's parameters, replicated over `mesh` when given (as the jobs hold
  them: otherwise every call would first copy them to the devices)."""
  p = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
  return p if mesh is None else dj.parallel.replicate(p, mesh)


def model_flops(preset: str, batch: int, dtype=jnp.float32) -> Optional[float]:
  """FLOPs of one train step, from XLA's cost analysis of the plain-XLA model
  (gemm_conv=False: the same maths without scans, whose bodies the
  analysis would count once), on one device (a split program's are per device)."""
  init, step = _train_setup(preset, False, dtype, _one_device())
  x = jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.float32)
  flops, _ = _cost(step.lower(jax.eval_shape(init), x).compile())
  return flops


def train_bench(
  preset: str, batch: int, iters: int, peak: float, gemm: Optional[bool] = None, dtype=jnp.float32
) -> dict:
  """Train-step throughput; gemm: `gemm_conv` (None: the backend's default)."""
  mesh = _mesh(batch)
  init, step = _train_setup(preset, gemm, dtype, mesh)
  state = init()
  x = dj.parallel.shard_batch(
    jax.random.uniform(jax.random.key(2), (batch, 28, 28, 1)) * 2 - 1, mesh
  )
  t0 = time.perf_counter()
  compiled = step.lower(state, x).compile()
  compile_s = time.perf_counter() - t0
  _, mem = _cost(compiled)
  flops = model_flops(preset, batch, dtype)
  holder = [state]

  def run():
    holder[0], m = compiled(holder[0], x)
    m["loss"].block_until_ready()

  run()
  dt = _time(run, iters)
  gflops = flops / dt / 1e9 if flops else None
  return {
    "preset": preset,
    "batch": batch,
    "gemm_conv": nnbase.conv.use_gemm_conv(gemm),
    "dtype": jnp.dtype(dtype).name,
    "images_per_sec": batch / dt,
    "step_ms": 1e3 * dt,
    "compile_s": compile_s,
    "gflop_per_step": flops / 1e9 if flops else None,
    "gflops": gflops,
    "fraction_of_peak": gflops / peak if gflops else None,
    "xla_memory_bytes": mem,
  }


def forward_bench(
  preset: str, batch: int, iters: int, peak: float, gemm: Optional[bool] = None
) -> dict:
  model = dj.make_model(preset, gemm_conv=gemm)
  mesh = _mesh(batch)
  params = _init_params(model, mesh)
  eps_fn = _forward_fn(model, mesh)
  x = dj.parallel.shard_batch(jax.random.normal(jax.random.key(1), (batch, 28, 28, 1)), mesh)
  t = dj.parallel.shard_batch(jnp.full((batch,), 500, jnp.int32), mesh)
  t0 = time.perf_counter()
  compiled = eps_fn.lower(params, x, t).compile()
  compile_s = time.perf_counter() - t0
  _, mem = _cost(compiled)
  # FLOPs from the plain-XLA model on one device: the analysis counts a scan
  # body once, and a split program's FLOPs per device.
  plain = _forward_fn(dj.make_model(preset, gemm_conv=False), _one_device())
  x1, t1 = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, t))
  p1 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  flops, _ = _cost(plain.lower(p1, x1, t1).compile())
  compiled(params, x, t).block_until_ready()
  dt = _time(lambda: compiled(params, x, t).block_until_ready(), iters)
  gflops = flops / dt / 1e9 if flops else None
  return {
    "preset": preset,
    "batch": batch,
    "images_per_sec": batch / dt,
    "forward_ms": 1e3 * dt,
    "compile_s": compile_s,
    "gflops": gflops,
    "fraction_of_peak": gflops / peak if gflops else None,
    "xla_memory_bytes": mem,
  }


def sampler_bench(preset: str, batch: int, sampler: str, steps: int) -> dict:
  model = dj.make_model(preset)
  schedule = dj.make_schedule("linear", 1000)
  shape = (batch, 28, 28, 1)
  mesh = _mesh(batch)
  params = _init_params(model, mesh)

  def sample(p, rng):
    eps_fn = dj.parallel.sharded_eps_fn(lambda x, t: model.apply(p, x, t), mesh)
    if sampler == "ddpm":
      return dj.ddpm_sample(eps_fn, schedule, rng, shape, num_steps=steps)
    return dj.ddim_sample(eps_fn, schedule, rng, shape, steps)

  t0 = time.perf_counter()
  compiled = dj.parallel.parallel_sampler(sample, mesh).lower(params, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled(params, jax.random.key(2)).block_until_ready()
  dt = time.perf_counter() - t0
  return {
    "preset": preset,
    "batch": batch,
    "sampler": sampler,
    "steps": steps,
    "images_per_sec": batch / dt,
    "seconds": dt,
    "ms_per_step": 1e3 * dt / steps,
    "compile_s": compile_s,
  }


def vae_bench(images_u8: np.ndarray, epochs: int) -> dict:
  """The fastest of `epochs` VAE epochs after a warm-up one (`jax_vae_round`)."""
  round_ = jax_vae_round(images_u8)
  best = min(round_() for _ in range(epochs))
  return {
    "epoch_seconds": best,
    "compile_s": round_.compile_s,
    "images_per_sec": images_u8.shape[0] / best,
  }


def vae_gemm_floor_round(steps: int = 468, batch: int = 128) -> Tuple[Callable, float]:
  """The VAE epoch's matrix products alone, as one compiled scan: the forward
  784-400-(20+20)-400-784 products and the backward products that training
  needs (every weight gradient, every input gradient but the data's). No
  activations, loss, sampling or Adam: a lower bound on the epoch's time on
  this machine (`nnbase.blas.dot`: MKL where it is on, else XLA's own).
  Returns (`round() -> seconds` of one scan, compiled and warmed, its GFLOP)."""
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
  ws = (
    0.03 * jax.random.normal(k1, (784, 400)),
    0.03 * jax.random.normal(k2, (400, 40)),
    0.03 * jax.random.normal(k3, (20, 400)),
    0.03 * jax.random.normal(k4, (400, 784)),
  )
  xs = jax.random.uniform(k5, (steps, batch, 784))

  def body(w, x):
    w1, w2, w3, w4 = w
    mm = nnbase.blas.dot  # as the epoch's layers compute them
    h = mm(x, w1)
    z = mm(h, w2)[:, :20]
    h2 = mm(z, w3)
    g = mm(h2, w4)  # stands in for the output gradient: same shape, data-dependent
    gh2 = mm(g, w4, trans_b=True)
    gz = mm(gh2, w3, trans_b=True)
    gzp = jnp.pad(gz, ((0, 0), (0, 20)))
    gh = mm(gzp, w2, trans_b=True)
    grads = (mm(x, gh, True), mm(h, gzp, True), mm(z, gh2, True), mm(h2, g, True))
    return jax.tree.map(lambda a, b: a - 1e-9 * b, w, grads), None

  fn = jax.jit(lambda w, xs: jax.lax.scan(body, w, xs)[0]).lower(ws, xs).compile()
  jax.block_until_ready(fn(ws, xs))

  def round_() -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(ws, xs))
    return time.perf_counter() - t0

  flops = 2 * steps * batch * (3 * (784 * 400 + 400 * 40 + 20 * 400 + 400 * 784) - 784 * 400)
  return round_, flops / 1e9


def vae_gemm_floor(round_: Callable, gflops: float) -> dict:
  """The best of 3 of a `vae_gemm_floor_round`: seconds, GFLOP and the
  GFLOP/s the products reach on these shapes."""
  dt = _time(round_, 1)
  return {"seconds": dt, "gflops": gflops, "gflops_per_sec": gflops / dt}


def mnist_like(n: int = 60000) -> np.ndarray:
  """Random uint8 digits-shaped data: the VAE epoch's cost does not depend on pixels."""
  return np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def tuning_values() -> dict:
  """The fast convolutions' constants (nnbase.conv) in force for this run,
  whether float32 products run on MKL (nnbase.blas), and the compile options
  of forward-only programs (nnbase.tuning.inference_compiler_options)."""
  c = nnbase.conv
  return {
    "chunk_bytes": c.CHUNK_BYTES,
    "gemm_by_default": c.GEMM_BY_DEFAULT,
    "strided_forward_xla": c.STRIDED_FORWARD_XLA,
    "winograd_tile": c.WINOGRAD_TILE,
    "source": "benchmarks.tune" if nnbase.tuning.cached_choice() else "cache-size rule",
    "winograd_min_channels": c.WINOGRAD_MIN_CHANNELS,
    "gemm_min_channels": c.GEMM_MIN_CHANNELS,
    "min_sum_rows": c.MIN_SUM_ROWS,
    "blas": nnbase.blas.status(),
    "inference_compiler_options": nnbase.tuning.inference_compiler_options(),
  }


def jax_train_round(
  preset: str, batch: int, gemm: Optional[bool] = None, mesh: Optional[Mesh] = None
) -> Callable:
  """The jitted train step over `mesh` (None: the job's), compiled and warmed
  once: `round(iters) -> images/s`."""
  mesh = _mesh(batch) if mesh is None else mesh
  init, step = _train_setup(preset, gemm, jnp.float32, mesh)
  holder = [init()]
  x = dj.parallel.shard_batch(
    jax.random.uniform(jax.random.key(2), (batch, 28, 28, 1)) * 2 - 1, mesh
  )
  compiled = step.lower(holder[0], x).compile()

  def run():
    holder[0], m = compiled(holder[0], x)
    m["loss"].block_until_ready()

  run()

  def round_(iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
      run()
    return batch * iters / (time.perf_counter() - t0)

  return round_


def jax_forward_round(
  preset: str, batch: int, mesh: Optional[Mesh] = None, gemm: Optional[bool] = None
) -> Callable:
  """One U-Net forward over `mesh` (None: the job's), compiled once:
  `round(iters) -> images/s`; gemm: `gemm_conv` (None: the backend's default)."""
  model = dj.make_model(preset, gemm_conv=gemm)
  mesh = _mesh(batch) if mesh is None else mesh
  params = _init_params(model, mesh)
  x = dj.parallel.shard_batch(jax.random.normal(jax.random.key(1), (batch, 28, 28, 1)), mesh)
  t = dj.parallel.shard_batch(jnp.full((batch,), 500, jnp.int32), mesh)
  compiled = _forward_fn(model, mesh).lower(params, x, t).compile()
  compiled(params, x, t).block_until_ready()

  def round_(iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
      compiled(params, x, t).block_until_ready()
    return batch * iters / (time.perf_counter() - t0)

  return round_


def jax_vae_round(images_u8: np.ndarray) -> Callable:
  """The VAE epoch (784-400-20, batch 128), compiled once and run once:
  `round() -> seconds`; `round.compile_s` is the compile time."""
  import optax

  vae = vj.make_vae("mlp", 20, 400)
  tx = optax.adam(1e-3)
  holder = [vj.create_state(jax.random.key(0), vae, tx, 20)]
  train_epoch = jax.jit(
    vj.make_train_epoch(vae, tx, base_rng=jax.random.key(1), batch_size=128), donate_argnums=0
  )
  images = jax.device_put(images_u8)
  t0 = time.perf_counter()
  compiled = train_epoch.lower(holder[0], images, 0).compile()
  compile_s = time.perf_counter() - t0
  epoch = [0]

  def round_() -> float:
    t0 = time.perf_counter()
    holder[0], m = compiled(holder[0], images, epoch[0])
    jax.block_until_ready(m)
    epoch[0] += 1
    return time.perf_counter() - t0

  round_()
  round_.compile_s = compile_s
  return round_


def jax_ancestral_round(preset: str, batch: int, T: int = 1000) -> Callable:
  """Ancestral sampling over all T steps, compiled once: `round() -> seconds`."""
  model = dj.make_model(preset)
  schedule = dj.make_schedule("linear", T)
  shape = (batch, 28, 28, 1)
  mesh = _mesh(batch)
  params = _init_params(model, mesh)
  eps = lambda p: dj.parallel.sharded_eps_fn(lambda x, t: model.apply(p, x, t), mesh)
  fn = dj.parallel.parallel_sampler(
    lambda p, r: dj.sample(eps(p), schedule, r, shape, "ddpm", T), mesh
  )
  compiled = fn.lower(params, jax.random.key(1)).compile()
  n = [0]

  def round_() -> float:
    n[0] += 1
    t0 = time.perf_counter()
    compiled(params, jax.random.key(n[0])).block_until_ready()
    return time.perf_counter() - t0

  return round_


def interleave(
  jax_round: Callable,
  torch_round: Callable,
  rounds: int,
  faster: str,
  bound_round: Optional[Callable] = None,
) -> dict:
  """Runs JAX, PyTorch, JAX, PyTorch, ... `rounds` times; the ratio of each
  round is JAX's speed over PyTorch's (`faster`: "higher" for throughputs,
  "lower" for seconds), reported as the median with its min and max.

  `bound_round`, measured the same way as jax_round, runs after PyTorch in
  each round: a floor under any JAX implementation, reported as `bound` and
  as the ratio it would give (`bound_ratio`, its min and max)."""
  js, ts, bs = [], [], []
  for _ in range(rounds):
    js.append(jax_round())
    ts.append(torch_round())
    if bound_round is not None:
      bs.append(bound_round())
  ratio = lambda j, t: j / t if faster == "higher" else t / j
  ratios = [ratio(j, t) for j, t in zip(js, ts)]
  out = {
    "jax": float(np.median(js)),
    "torch": float(np.median(ts)),
    "ratio": float(np.median(ratios)),
    "ratio_min": min(ratios),
    "ratio_max": max(ratios),
    "ratios": ratios,
    "rounds": rounds,
  }
  if bs:
    bound = [ratio(b, t) for b, t in zip(bs, ts)]
    out.update(
      bound=float(np.median(bs)),
      bound_ratio=float(np.median(bound)),
      bound_ratio_min=min(bound),
      bound_ratio_max=max(bound),
    )
  return out


# Untimed calls at the start of every train and forward round, on both sides.
# The first JAX call after PyTorch has run is slow for a reason no training
# run meets: XLA:CPU maps its temporary buffer afresh on every call (~480 MB
# for the train step at batch 128) and the kernel zeroes it on first touch;
# right after a PyTorch round that zeroing is 10-20x slower. Measured with
# getrusage around single train steps: 0.4-0.8 s of system time in the first
# step after a PyTorch round, 0.03-0.08 s in the steps after it, at the same
# number of page faults (docs/design.md).
ROUND_WARMUP = 1


def warm(round_fn: Callable, iters: int) -> Callable:
  """`round_fn(iters)` after ROUND_WARMUP untimed calls of one iteration."""

  def run():
    for _ in range(ROUND_WARMUP):
      round_fn(1)
    return round_fn(iters)

  return run


def compare_with_torch(
  batch: int, iters: int, rounds: int, ancestral_rounds: int, vae_floor_round: Callable
) -> dict:
  """JAX against the seeds' PyTorch code, interleaved round by round;
  `vae_floor_round` is `vae_gemm_floor_round`'s."""
  out = {"threads": torch_ref.torch.get_num_threads(), "round_warmup_calls": ROUND_WARMUP}
  jt, tt = jax_train_round("simple", batch), torch_ref.make_train_round(batch)
  out["train"] = interleave(warm(jt, iters), warm(tt, iters), rounds, "higher")
  jf, tf = jax_forward_round("simple", 64), torch_ref.make_forward_round(64)
  out["forward"] = interleave(warm(jf, 3 * iters), warm(tf, 3 * iters), rounds, "higher")
  images = mnist_like()
  jv = jax_vae_round(images)
  # The epoch's matrix products alone in the same rounds: the vae ratio no
  # implementation on these products could pass on this machine.
  out["vae"] = interleave(
    jv, lambda: torch_ref.vae_epoch_seconds(images), rounds, "lower", bound_round=vae_floor_round
  )
  out["vae_seed_loop"] = interleave(
    jv, lambda: torch_ref.vae_epoch_seconds_seed_loop(images), max(3, rounds // 2), "lower"
  )
  if ancestral_rounds:
    ja, ta = jax_ancestral_round("simple", 64), torch_ref.make_ancestral_round(64)
    out["ancestral_1000"] = interleave(ja, ta, ancestral_rounds, "lower")
  for name, r in out.items():
    if isinstance(r, dict):
      print(
        f"{name:16s} JAX {r['jax']:9.2f}  PyTorch {r['torch']:9.2f}  ratio {r['ratio']:.2f} "
        f"(min {r['ratio_min']:.2f}, max {r['ratio_max']:.2f}, {r['rounds']} rounds)"
        + (
          f"; matrix products alone {r['bound']:.2f}, ratio {r['bound_ratio']:.2f} "
          f"(min {r['bound_ratio_min']:.2f}, max {r['bound_ratio_max']:.2f})"
          if "bound" in r
          else ""
        ),
        flush=True,
      )
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(
    prog=benchmarks.prog(__spec__),
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="the seed SimpleUNet only, fewer iterations, DDPM-1000 estimated from "
    "DDIM-50's per-step time (a few minutes on 2 CPU cores)",
  )
  p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
  p.add_argument(
    "--presets",
    default=None,
    help="comma-separated train presets (default: simple,simple_half,tiny; simple with --quick)",
  )
  p.add_argument("--batch", type=int, default=128, help="train batch size")
  p.add_argument("--bf16", action="store_true", help="also time bf16 compute (GPU/TPU)")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument(
    "--rounds", type=int, default=5, help="interleaved JAX/PyTorch rounds per figure (>= 1)"
  )
  p.add_argument(
    "--ancestral_rounds",
    type=int,
    default=None,
    help="interleaved rounds of 1000-step ancestral sampling of 64 images "
    "(about 6 minutes a round on 2 cores; default 0 with --quick, else 2)",
  )
  a = p.parse_args(argv)
  benchmarks.check_json_path(p, a.json)
  if a.rounds < 1:
    p.error(f"--rounds must be >= 1, got {a.rounds}")
  quick = a.quick
  iters = 3 if quick else 8
  presets = (a.presets or ("simple" if quick else "simple,simple_half,tiny")).split(",")
  for name in presets:
    if name not in dj.PRESETS:
      p.error(f"unknown preset {name!r}; choose from {sorted(dj.PRESETS)}")
  use_torch = torch_ref.available() and not a.no_torch

  dev = jax.devices()[0]
  machine = {
    "device": dev.device_kind,
    "platform": dev.platform,
    "device_count": jax.device_count(),
    "cpu": cpu_name(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "torch": torch_ref.torch.__version__ if use_torch else None,
    "hugepages": runtime.hugepages_active(),
    "alloc_cache": runtime.alloc_cache_active(),
    "caches": nnbase.tuning.cpu_caches(),
    "tuning": tuning_values(),
  }
  print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
  peak = matmul_peak(2048 if dev.platform == "cpu" else 8192)
  print(f"fp32 matmul peak (measured): {peak:.1f} GFLOP/s", flush=True)
  out = {"machine": machine, "matmul_peak_gflops": peak, "quick": quick}

  print(
    f"\n{'train':<12} {'batch':>5} {'dtype':>8} {'gemm':>5} {'img/s':>8} {'ms':>7} "
    f"{'GFLOP/s':>8} {'%peak':>6} {'compile s':>9} {'XLA MB':>7}"
  )
  rows = []
  # The backend's default convolutions first, then the other kind for the seed net.
  cases = [(name, None, jnp.float32) for name in presets]
  if "simple" in presets:
    cases.append(("simple", not nnbase.conv.use_gemm_conv(None), jnp.float32))
  if a.bf16:
    cases += [(name, None, jnp.bfloat16) for name in presets]
  for name, gemm, dtype in cases:
    r = train_bench(name, a.batch, iters, peak, gemm, dtype)
    rows.append(r)
    print(
      f"{name:<12} {r['batch']:>5} {r['dtype']:>8} {str(r['gemm_conv']):>5} "
      f"{r['images_per_sec']:>8.1f} "
      f"{r['step_ms']:>7.0f} {r['gflops'] or 0:>8.1f} {100 * (r['fraction_of_peak'] or 0):>5.0f}% "
      f"{r['compile_s']:>9.1f} {(r['xla_memory_bytes'] or 0) / 2**20:>7.0f}",
      flush=True,
    )
  out["train"] = rows

  fwd = forward_bench("simple", 64, 3 * iters, peak)
  out["forward"] = fwd
  print(
    f"\nforward simple, 64 images: {fwd['images_per_sec']:.0f} img/s "
    f"({fwd['forward_ms']:.1f} ms, {fwd['gflops'] or 0:.0f} GFLOP/s, "
    f"{100 * (fwd['fraction_of_peak'] or 0):.0f}% of peak)",
    flush=True,
  )
  samplers = [sampler_bench("simple", 64, "ddim", 50)]
  if not quick:
    samplers.append(sampler_bench("simple", 64, "ddpm", 1000))
  else:
    est = dict(samplers[0], sampler="ddpm", steps=1000, estimated=True)
    est["seconds"] = samplers[0]["ms_per_step"] * 1000 / 1e3
    est["images_per_sec"] = 64 / est["seconds"]
    samplers.append(est)
  for s in samplers:
    print(
      f"sampler {s['sampler']} {s['steps']} steps, 64 images: {s['seconds']:.1f} s "
      f"({s['images_per_sec']:.2f} img/s, {s['ms_per_step']:.0f} ms/step"
      f"{', estimated' if s.get('estimated') else ''})",
      flush=True,
    )
  out["samplers"] = samplers

  vae = vae_bench(mnist_like(), 2 if quick else 3)
  out["vae"] = vae
  print(f"VAE epoch (784-400-20, batch 128, 60k images): {vae['epoch_seconds']:.2f} s", flush=True)
  floor_round, floor_gflops = vae_gemm_floor_round()
  floor = vae_gemm_floor(floor_round, floor_gflops)
  out["vae_gemm_floor"] = floor
  print(
    f"VAE epoch's matrix products alone ({floor['gflops']:.0f} GFLOP): {floor['seconds']:.2f} s "
    f"at {floor['gflops_per_sec']:.0f} GFLOP/s; at the matmul peak they would take "
    f"{floor['gflops'] / peak:.2f} s",
    flush=True,
  )

  out["torch"] = None
  if use_torch:
    anc = a.ancestral_rounds if a.ancestral_rounds is not None else (0 if quick else 2)
    print(
      f"\nPyTorch {machine['torch']} against JAX, interleaved ({a.rounds} rounds; "
      "ratio = JAX speed / PyTorch speed):",
      flush=True,
    )
    t = out["torch"] = compare_with_torch(a.batch, iters, a.rounds, anc, floor_round)
    for name, key in (("train", "train"), ("sampler", "forward"), ("vae", "vae")):
      for suffix in ("", "_min", "_max"):
        out[f"{name}_ratio{suffix}"] = t[key]["ratio" + suffix]
    out["vae_ratio_seed_loop"] = t["vae_seed_loop"]["ratio"]
    # The best vae_ratio any implementation on these products could reach
    # here: PyTorch's epoch over the products alone, round by round.
    for suffix in ("", "_min", "_max"):
      out[f"vae_ratio_bound{suffix}"] = t["vae"]["bound_ratio" + suffix]
    if "ancestral_1000" in t:
      out["ancestral_ratio"] = t["ancestral_1000"]["ratio"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    print(
      f"train_ratio {fmt(out['train_ratio'])} (target >= 1.2), sampler_ratio "
      f"{fmt(out['sampler_ratio'])} (>= 1.2), vae_ratio {fmt(out['vae_ratio'])} (>= 2.2; "
      f"{fmt(out['vae_ratio_seed_loop'])} against the seed's DataLoader loop; matrix products "
      f"alone would give {fmt(out['vae_ratio_bound'])})"
    )
  else:
    print(
      "\nPyTorch reference skipped: "
      + ("--no_torch" if a.no_torch else "torch is not installed (pip install torch==2.13.0)"),
      flush=True,
    )
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  out["device_peak_bytes"] = _device_peak_bytes()
  if a.json:
    write_json_atomic(a.json, out)
    print(f"written to {a.json}", file=sys.stderr)


if __name__ == "__main__":
  runtime.split_cpu_devices()  # one JAX device per core
  main()
