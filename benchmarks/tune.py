"""Tune the fast convolutions for this machine: `python -m benchmarks.tune`.

Times the seed SimpleUNet's train step (batch 128, fp32) with a few chunk
sizes of the GEMM convolutions and with XLA's own convolutions, interleaved
round by round, and caches the fastest choice for this machine
(`nnbase/tuning.py`: ~/.cache/ddpm_jax/conv_tuning.json), which every later
process reads at import. The GEMM path is kept only if it beats XLA's
convolutions, so the default is never slower than the plain path. About a
minute on 2 CPU cores; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from experiments import runtime


def measure(candidates: list, batch: int, rounds: int, iters: int) -> dict:
  """{name: [images/s per round]} for (name, chunk_bytes or None for XLA's convs)."""
  from benchmarks.run import jax_train_round
  from nnbase import conv

  makers = {}
  for name, chunk in candidates:
    if chunk is not None:
      conv.CHUNK_BYTES = chunk  # read when the step is traced, below
    makers[name] = jax_train_round("simple", batch, gemm=chunk is not None)
    print(f"compiled {name}", file=sys.stderr, flush=True)
  results = {name: [] for name in makers}
  for r in range(rounds):
    for name, run in makers.items():
      results[name].append(run(iters))
    print(
      f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()),
      file=sys.stderr,
      flush=True,
    )
  return results


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 1)")
  p.add_argument("--iters", type=int, default=3, help="train steps per round and candidate")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--dry_run", action="store_true", help="measure, but do not save the choice")
  a = p.parse_args(argv)
  if min(a.rounds, a.iters, a.batch) < 1:
    p.error("--rounds, --iters and --batch must be >= 1")
  from nnbase import tuning

  rule = tuning.rule_chunk_bytes()
  sizes = sorted({max(tuning.MIB, rule // 2), rule, 2 * rule})
  candidates = [(f"gemm chunk {s / tuning.MIB:.1f} MiB", s) for s in sizes] + [("xla", None)]
  results = measure(candidates, a.batch, a.rounds, a.iters)
  medians = {k: float(np.median(v)) for k, v in results.items()}
  best = max(medians, key=medians.get)
  chunk = dict(candidates)[best] or rule
  gemm = best != "xla"
  for k, v in medians.items():
    print(f"{k:24s} {v:8.1f} img/s{'   <- chosen' if k == best else ''}")
  if a.dry_run:
    return
  path = tuning.save_choice(chunk, gemm, {"images_per_sec_median": medians, "batch": a.batch})
  print(f"saved to {path}: chunk {chunk / tuning.MIB:.1f} MiB, gemm path {'on' if gemm else 'off'}")


if __name__ == "__main__":
  runtime.setup_process()  # huge pages, one JAX device per core
  main()
