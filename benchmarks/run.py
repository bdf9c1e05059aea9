"""Training-throughput benchmark: `python -m benchmarks.run [--quick] [--json PATH]`.

Times the jitted, buffer-donating DDPM train step (images/s after
compilation) for U-Net presets, with the GEMM weight-gradient convolutions on
and off (`gemm_weight_grad`), so the effect of that lever is measured in the
same run. (The PyTorch reference, sampler and scaling benchmarks are issue 5.)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

import ddpm_jax as dj


def train_throughput(preset: str, batch: int, gemm: bool, iters: int) -> dict:
  model = dj.make_model(preset, gemm_weight_grad=gemm)
  schedule = dj.make_schedule("linear", 1000)
  tx = dj.make_optimizer(1e-3, 1000)
  state = dj.create_train_state(jax.random.key(0), model, tx, (28, 28, 1))
  step = jax.jit(dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(1)),
                 donate_argnums=0)
  x = jax.random.uniform(jax.random.key(2), (batch, 28, 28, 1)) * 2 - 1
  t0 = time.perf_counter()
  state, m = step(state, x)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(iters):
    state, m = step(state, x)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / iters
  return {"preset": preset, "batch": batch, "gemm_weight_grad": gemm,
          "images_per_sec": batch / dt, "step_ms": dt * 1e3, "first_step_s": compile_s}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--quick", action="store_true", help="fewer presets and iterations")
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)
  iters = 3 if args.quick else 10
  cases = [("simple", 128), ("simple_half", 128), ("tiny", 128)]
  if args.quick:
    cases = [("simple", 128)]
  rows = []
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}")
  print(f"{'preset':<12} {'batch':>5} {'gemm_wgrad':>10} {'img/s':>8} {'step ms':>8} {'1st step s':>10}")
  for preset, batch in cases:
    for gemm in (False, True):
      r = train_throughput(preset, batch, gemm, iters)
      rows.append(r)
      print(f"{preset:<12} {batch:>5} {str(gemm):>10} {r['images_per_sec']:>8.1f} "
            f"{r['step_ms']:>8.0f} {r['first_step_s']:>10.1f}", flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"device": str(jax.devices()[0]), "train": rows}, f, indent=2)


if __name__ == "__main__":
  main()
