"""Measure speed levers one by one: `python -m benchmarks.levers [--quick]`.

Each lever runs in a fresh process (XLA flags are read when JAX starts):
the seed SimpleUNet's train step at batch 128 and one forward on 64 images,
under each XLA:CPU flag set, with our GEMM convolutions (`conv_gemm`) on and
off, and with its parts switched off one at a time (Winograd, batch
chunking). Every lever runs with huge pages for malloc (the jobs' process
set-up, experiments/runtime.py) except the one that times glibc's default.
Prints a table; `--json PATH` writes it.
"""

from __future__ import annotations

from experiments import runtime

runtime.restart_main(__name__)  # huge pages: restart before the imports below (runtime.py)

import argparse
import json
import os
import subprocess
import sys

import benchmarks

CHILD = r"""
import json, sys
import jax
from benchmarks.run import train_bench, forward_bench, matmul_peak
from nnbase import conv as layers
gemm = sys.argv[1] == "1"; iters = int(sys.argv[2])
for k, v in json.loads(sys.argv[3]).items():
  setattr(layers, k, v)
peak = matmul_peak()
t = train_bench("simple", 128, iters, peak, gemm=gemm)
f = forward_bench("simple", 64, 3 * iters, peak, gemm=gemm)
print(json.dumps({"train": t["images_per_sec"], "forward": f["images_per_sec"],
                  "train_gflops": t["gflops"], "forward_gflops": f["gflops"], "peak": peak}))
"""

_NO_WINOGRAD = {"WINOGRAD_MIN_CHANNELS": 10**9}
_NO_CHUNKS = {"CHUNK_BYTES": 2**62}

# (name, XLA flags, conv_gemm on, nnbase.conv overrides)
LEVERS = [
  ("conv_gemm (default)", "", True, {}),
  ("XLA convolutions", "", False, {}),
  ("conv_gemm without Winograd", "", True, _NO_WINOGRAD),
  ("conv_gemm without batch chunks", "", True, _NO_CHUNKS),
  ("conv_gemm, neither", "", True, dict(_NO_WINOGRAD, **_NO_CHUNKS)),
  ("oneDNN (xla_cpu_use_onednn)", "--xla_cpu_use_onednn=true", True, {}),
  ("XNNPACK (xla_cpu_use_xnnpack)", "--xla_cpu_use_xnnpack=true", True, {}),
  ("fast math", "--xla_cpu_enable_fast_math=true", True, {}),
  ("no thunk runtime", "--xla_cpu_use_thunk_runtime=false", True, {}),
]

# The process set-up lever, timed apart: glibc's default malloc, which maps
# and faults in XLA's per-call buffers afresh (experiments/runtime.py).
NO_HUGEPAGES = "conv_gemm, no huge pages (glibc default)"


def run_lever(flags: str, gemm: bool, iters: int, overrides: dict, hugepages: bool = True) -> dict:
  env = dict(os.environ)
  if hugepages:
    env = runtime.hugepages_env(env, runtime.glibc_version(), runtime.thp_mode()) or env
  else:
    env["GLIBC_TUNABLES"] = ":".join(
      t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != runtime.TUNABLE
    )
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  proc = subprocess.run(
    [sys.executable, "-c", CHILD, "1" if gemm else "0", str(iters), json.dumps(overrides)],
    capture_output=True,
    text=True,
    env=env,
    check=False,
  )
  if proc.returncode != 0:
    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"error": err[:200]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog=benchmarks.prog(__spec__), description=__doc__)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
  a = p.parse_args(argv)
  benchmarks.check_json_path(p, a.json)
  iters = 2 if a.quick else 5
  rows = []
  print(f"{'lever':<40} {'train img/s':>11} {'fwd img/s':>10} {'train GF/s':>10}")
  levers = [(name, flags, gemm, overrides, True) for name, flags, gemm, overrides in LEVERS]
  levers.insert(1, (NO_HUGEPAGES, "", True, {}, False))
  for name, flags, gemm, overrides, hugepages in levers:
    r = dict(
      run_lever(flags, gemm, iters, overrides, hugepages),
      lever=name,
      xla_flags=flags,
      gemm_conv=gemm,
      layer_overrides=overrides,
      hugepages=hugepages,
    )
    rows.append(r)
    if "error" in r:
      print(f"{name:<40} failed: {r['error']}", flush=True)
    else:
      print(
        f"{name:<40} {r['train']:>11.1f} {r['forward']:>10.0f} {r['train_gflops'] or 0:>10.1f}",
        flush=True,
      )
  if a.json:
    with open(a.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  runtime.split_cpu_devices()  # one JAX device per core
  main()
