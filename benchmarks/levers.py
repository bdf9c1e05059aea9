"""Measure speed levers one by one: `python -m benchmarks.levers [--quick]`.

Each lever runs in a fresh process (XLA flags are read when JAX starts):
the seed SimpleUNet's train step at batch 128 and one forward on 64 images,
under each XLA:CPU flag set, with our GEMM weight-gradient convolutions on
and off. Prints a table; `--json PATH` writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
import jax
from benchmarks.run import train_bench, forward_bench, matmul_peak
gemm = sys.argv[1] == "1"; iters = int(sys.argv[2])
peak = matmul_peak()
t = train_bench("simple", 128, iters, peak, gemm=gemm)
f = forward_bench("simple", 64, 3 * iters, peak)
print(json.dumps({"train": t["images_per_sec"], "forward": f["images_per_sec"],
                  "train_gflops": t["gflops"], "forward_gflops": f["gflops"], "peak": peak}))
"""

LEVERS = [
    ("XLA default", "", True),
    ("XLA default, XLA weight-grad convs", "", False),
    ("oneDNN (xla_cpu_use_onednn)", "--xla_cpu_use_onednn=true", True),
    ("XNNPACK (xla_cpu_use_xnnpack)", "--xla_cpu_use_xnnpack=true", True),
    ("fast math", "--xla_cpu_enable_fast_math=true", True),
    ("no thunk runtime", "--xla_cpu_use_thunk_runtime=false", True),
]


def run_lever(flags: str, gemm: bool, iters: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  proc = subprocess.run([sys.executable, "-c", CHILD, "1" if gemm else "0", str(iters)],
                        capture_output=True, text=True, env=env, check=False)
  if proc.returncode != 0:
    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"error": err[:200]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  iters = 2 if a.quick else 5
  rows = []
  print(f"{'lever':<40} {'train img/s':>11} {'fwd img/s':>10} {'train GF/s':>10}")
  for name, flags, gemm in LEVERS:
    r = dict(run_lever(flags, gemm, iters), lever=name, xla_flags=flags, gemm_weight_grad=gemm)
    rows.append(r)
    if "error" in r:
      print(f"{name:<40} failed: {r['error']}", flush=True)
    else:
      print(f"{name:<40} {r['train']:>11.1f} {r['forward']:>10.0f} {r['train_gflops'] or 0:>10.1f}",
            flush=True)
  if a.json:
    with open(a.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
