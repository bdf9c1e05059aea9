"""One JAX device against one per core: `python -m benchmarks.cpu_devices`.

In one process with the CPU split into devices (experiments/runtime.py),
times the seed SimpleUNet's forward (64 images) and train step (batch 128)
compiled for device 0 alone and for the mesh of every device, interleaved
round by round, and prints the median of the per-round ratios with their
min and max. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import ddpm_jax as dj
from benchmarks import run
from experiments import runtime


def _rate(fn, n: int, batch: int) -> float:
  fn()  # one untimed call per round
  t0 = time.perf_counter()
  for _ in range(n):
    fn()
  return n * batch / (time.perf_counter() - t0)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=12)
  args = p.parse_args(argv)
  mesh = dj.parallel.make_mesh()
  if mesh.devices.size < 2:
    raise SystemExit("one device only: run on a machine with >= 2 cores, JAX_NUM_CPU_DEVICES unset")
  d0 = jax.devices()[0]
  model = dj.make_model("simple")
  params = run._init_params(model)
  x = jax.random.normal(jax.random.key(1), (64, 28, 28, 1))
  t = jnp.full((64,), 500, jnp.int32)
  one = jax.jit(lambda p, x, t: model.apply(p, x, t))
  args1 = jax.device_put((params, x, t), d0)
  split = run._forward_fn(model, mesh)
  args2 = (params, run._shard(x, mesh), run._shard(t, mesh))
  init1, step1 = run._train_setup("simple", None, jnp.float32)
  init2, step2 = run._train_setup("simple", None, jnp.float32, mesh)
  xb = jax.random.uniform(jax.random.key(2), (128, 28, 28, 1)) * 2 - 1
  states = {1: jax.device_put(init1(), d0), 2: init2()}
  batches = {1: jax.device_put(xb, d0), 2: run._shard(xb, mesh)}
  steps = {1: step1, 2: step2}

  def train(k):
    states[k], m = steps[k](states[k], batches[k])
    m["loss"].block_until_ready()

  fwd = {1: lambda: one(*args1).block_until_ready(), 2: lambda: split(*args2).block_until_ready()}
  res = {"forward": ([], []), "train": ([], [])}
  for _ in range(args.rounds):
    for k in (1, 2):
      res["forward"][k - 1].append(_rate(fwd[k], 5, 64))
    for k in (1, 2):
      res["train"][k - 1].append(_rate(lambda k=k: train(k), 2, 128))
  n = mesh.devices.size
  for name, (a, b) in res.items():
    a, b = np.array(a), np.array(b)
    r = b / a
    print(
      f"{name:8s} 1 device {np.median(a):6.1f} img/s, {n} devices {np.median(b):6.1f} img/s: "
      f"ratio {np.median(r):.2f} (min {r.min():.2f}, max {r.max():.2f}, {args.rounds} rounds)"
    )


if __name__ == "__main__":
  runtime.setup_process()  # huge pages, one JAX device per core
  main()
