"""One JAX device against one per core: `python -m benchmarks.cpu_devices`.

In one process with the CPU split into devices (experiments/runtime.py),
times the seed SimpleUNet's forward (64 images) and train step (batch 128)
compiled for device 0 alone and for the mesh of every device, interleaved
round by round (`benchmarks.run.interleave`), and prints the median of the
per-round ratios with their min and max. About 3 minutes on 2 cores.
"""

from __future__ import annotations

from experiments import runtime

runtime.restart_main(__name__)  # huge pages: restart before the imports below (runtime.py)

import argparse

import jax

import benchmarks
import ddpm_jax as dj
from benchmarks import run


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog=benchmarks.prog(__spec__), description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=12)
  args = p.parse_args(argv)
  every = dj.parallel.make_mesh()
  if every.devices.size < 2:
    raise SystemExit("one device only: run on a machine with >= 2 cores, JAX_NUM_CPU_DEVICES unset")
  one = dj.parallel.make_mesh(jax.devices()[:1])
  cases = {
    "forward": (lambda m: run.jax_forward_round("simple", 64, m), 5),
    "train": (lambda m: run.jax_train_round("simple", 128, mesh=m), 2),
  }
  n = every.devices.size
  for name, (make, iters) in cases.items():
    # interleave's two sides: "jax" is every device, "torch" the one device here.
    r = run.interleave(
      run.warm(make(every), iters), run.warm(make(one), iters), args.rounds, "higher"
    )
    print(
      f"{name:8s} 1 device {r['torch']:6.1f} img/s, {n} devices {r['jax']:6.1f} img/s: "
      f"ratio {r['ratio']:.2f} (min {r['ratio_min']:.2f}, max {r['ratio_max']:.2f}, "
      f"{args.rounds} rounds)",
      flush=True,
    )


if __name__ == "__main__":
  runtime.split_cpu_devices()  # one JAX device per core
  main()
