"""Tune the fast convolutions for this machine: `python -m benchmarks.tune`.

Where MKL loads (`nnbase.blas`), it first times the train step, the forward
pass and the MNIST VAE epoch with float32 products on MKL and on XLA's own
GEMMs, interleaved, and keeps MKL if the geometric mean of the three speed
ratios is at least 1; the steps below then run with that choice.

It then times the seed SimpleUNet's train step (batch 128, fp32) and one forward
pass of 64 images with a few chunk sizes of the GEMM convolutions
(`nnbase.tuning.tuning_candidates`) and with XLA's own convolutions,
interleaved round by round, and caches the fastest choice (the
product of the train and forward speeds, `chunk_scores`) for this machine
(`nnbase/tuning.py`: ~/.cache/ddpm_jax/conv_tuning.json), which every later
process reads at import. The GEMM path is kept only if it beats XLA's
convolutions, so the default is never slower than the plain path. With the
GEMM path on, it then times one forward pass of 64 images with the strided
layers' forward pass through XLA's convolution and through im2col + GEMM
(`nnbase.conv.STRIDED_FORWARD_XLA`; the train step's gradients are GEMMs
either way) and keeps the faster, and the train step with Winograd F(4x4, 3x3)
against F(2x2, 3x3) (`nnbase.conv.WINOGRAD_TILE`). About eight minutes on 2 CPU
cores; run it on an otherwise idle machine.
"""

from __future__ import annotations

from experiments import runtime

runtime.restart_main(__name__)  # huge pages: restart before the imports below (runtime.py)

import argparse
import contextlib
import sys

import numpy as np

import benchmarks


def interleaved(makers: dict, rounds: int, label: str) -> dict:
  """{name: [images/s per round]}: each no-argument `makers[name]()` once per
  round, round by round, in turn."""
  results = {name: [] for name in makers}
  for r in range(rounds):
    for name, run in makers.items():
      results[name].append(run())
    print(
      f"{label} {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()),
      file=sys.stderr,
      flush=True,
    )
  return results


def measure(candidates: list, batch: int, rounds: int, iters: int) -> dict:
  """{name: [images/s per round]} of the train step, and {"fwd " + name: ...} of
  one forward of 64 images, for (name, chunk_bytes or None for XLA's convs)."""
  from benchmarks.run import jax_forward_round, jax_train_round, warm
  from nnbase import conv

  makers = {}
  for name, chunk in candidates:
    if chunk is not None:
      conv.CHUNK_BYTES = chunk  # read when the step is traced, below
    train_round = jax_train_round("simple", batch, gemm=chunk is not None)
    makers[name] = lambda run=train_round: run(iters)
    makers["fwd " + name] = warm(jax_forward_round("simple", 64, gemm=chunk is not None), 3 * iters)
    print(f"compiled {name}", file=sys.stderr, flush=True)
  return interleaved(makers, rounds, "round")


def chunk_scores(medians: dict) -> dict:
  """{name: score} from `measure`'s medians: each candidate's train speed times
  its forward speed, each over the best candidate's (1.0 for one best at
  both). The forward is what every sampler step costs, the train step what
  training does."""
  train = {k: v for k, v in medians.items() if not k.startswith("fwd ")}
  best_train = max(train.values())
  best_fwd = max(v for k, v in medians.items() if k.startswith("fwd "))
  return {k: v / best_train * medians["fwd " + k] / best_fwd for k, v in train.items()}


def measure_strided_forward(rounds: int, iters: int) -> dict:
  """{"xla" | "gemm": [images/s per round]}: one forward of 64 images with the
  strided layers' forward pass through XLA's convolution or im2col + GEMM."""
  from benchmarks.run import jax_forward_round, warm
  from nnbase import conv

  makers = {}
  for name, flag in (("xla", True), ("gemm", False)):
    conv.STRIDED_FORWARD_XLA = flag  # read when the forward is traced, below
    makers[name] = warm(jax_forward_round("simple", 64), 3 * iters)
  return interleaved(makers, rounds, "forward round (strided xla / gemm)")


def measure_winograd_tile(batch: int, rounds: int, iters: int) -> dict:
  """{"F4" | "F2": [images/s per round]}: the train step with Winograd
  F(4x4, 3x3) or F(2x2, 3x3) at the float32 3x3 layers."""
  from benchmarks.run import jax_train_round
  from nnbase import conv

  makers = {}
  for name, tile in (("F4", 4), ("F2", 2)):
    conv.WINOGRAD_TILE = tile  # read when the step is traced, below
    train_round = jax_train_round("simple", batch)
    makers[name] = lambda run=train_round: run(iters)
  return interleaved(makers, rounds, "train round (Winograd F4 / F2)")


def measure_blas(batch: int, rounds: int, iters: int) -> dict:
  """{"mkl" | "xla": [train images/s per round], "fwd ...": [forward images/s],
  "vae ...": [VAE epochs/s]} with float32 products on MKL or XLA's GEMMs."""
  from benchmarks.run import jax_forward_round, jax_train_round, jax_vae_round, mnist_like, warm
  from nnbase import blas

  images = mnist_like()
  makers = {}
  for name, on in (("mkl", True), ("xla", False)):
    with blas.forced(on):  # read when each program is traced, below
      train_round = jax_train_round("simple", batch)
      makers[name] = lambda run=train_round: run(iters)
      makers["fwd " + name] = warm(jax_forward_round("simple", 64), 3 * iters)
      vae_round = jax_vae_round(images)
      makers["vae " + name] = lambda run=vae_round: 1.0 / run()
  return interleaved(makers, rounds, "round (MKL / XLA products)")


def blas_ratios(raw: dict) -> dict:
  """{"train" | "forward" | "vae": median of the per-round MKL / XLA speed
  ratios, "geomean": their geometric mean} from `measure_blas`."""
  out = {}
  for label, prefix in (("train", ""), ("forward", "fwd "), ("vae", "vae ")):
    out[label] = ab(raw, prefix + "mkl", prefix + "xla")[1]
  out["geomean"] = float(np.prod(list(out.values())) ** (1 / 3))
  return out


def ab(raw: dict, a: str, b: str) -> tuple:
  """({name: median images/s}, median of the per-round ratios a / b)."""
  medians = {k: float(np.median(v)) for k, v in raw.items()}
  return medians, float(np.median(np.array(raw[a]) / np.array(raw[b])))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(
    prog=benchmarks.prog(__spec__),
    description=__doc__,
    formatter_class=argparse.RawTextHelpFormatter,
  )
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 1)")
  p.add_argument("--iters", type=int, default=3, help="train steps per round and candidate")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--dry_run", action="store_true", help="measure, but do not save the choice")
  a = p.parse_args(argv)
  if min(a.rounds, a.iters, a.batch) < 1:
    p.error("--rounds, --iters and --batch must be >= 1")
  from nnbase import blas

  use_blas, blas_measured = None, {}
  if blas._load()[0]:
    blas_measured = blas_ratios(measure_blas(a.batch, max(4, a.rounds), a.iters))
    use_blas = blas_measured["geomean"] >= 1.0
    print(
      "MKL over XLA's products: "
      + ", ".join(f"{k} {v:.3f}" for k, v in blas_measured.items())
      + f" -> {'MKL' if use_blas else 'XLA'}"
    )
  else:
    print(f"products: XLA's own ({blas.status()})")
  with contextlib.ExitStack() as stack:
    if use_blas is not None:
      stack.enter_context(blas.forced(use_blas))
    tune_convolutions(a, use_blas, blas_measured)


def tune_convolutions(a, use_blas, blas_measured: dict) -> None:
  from nnbase import tuning

  rule = tuning.rule_chunk_bytes()
  sizes = tuning.tuning_candidates()
  candidates = [(f"gemm chunk {s / tuning.MIB:.1f} MiB", s) for s in sizes] + [("xla", None)]
  results = measure(candidates, a.batch, a.rounds, a.iters)
  medians = {k: float(np.median(v)) for k, v in results.items()}
  scores = chunk_scores(medians)
  best = max(scores, key=scores.get)
  chunk = dict(candidates)[best] or rule
  gemm = best != "xla"
  for k, score in scores.items():
    chosen = "   <- chosen" if k == best else ""
    print(
      f"{k:24s} train {medians[k]:6.1f}, forward {medians['fwd ' + k]:6.1f} img/s, "
      f"score {score:.3f}{chosen}"
    )
  strided_xla, fwd = tuning.strided_forward_xla(), {}
  tile, wino = tuning.winograd_tile(), {}
  if gemm:
    from nnbase import conv

    conv.CHUNK_BYTES = chunk
    # More rounds than the chunk sweep's: the differences are a few percent.
    fwd, ratio = ab(measure_strided_forward(max(8, 2 * a.rounds), a.iters), "xla", "gemm")
    fwd["xla_over_gemm"] = ratio
    strided_xla = ratio >= 1.0
    for k in ("xla", "gemm"):
      chosen = "   <- chosen" if (k == "xla") == strided_xla else ""
      print(f"{'forward, strided ' + k:24s} {fwd[k]:8.1f} img/s{chosen}")
    print(f"forward, strided XLA over GEMM: {ratio:.3f} (median of per-round ratios)")
    conv.STRIDED_FORWARD_XLA = strided_xla
    wino, ratio = ab(measure_winograd_tile(a.batch, max(6, 2 * a.rounds), a.iters), "F4", "F2")
    wino["f4_over_f2"] = ratio
    tile = 4 if ratio >= 1.0 else 2
    for k in ("F4", "F2"):
      chosen = "   <- chosen" if k == f"F{tile}" else ""
      print(f"{'train, Winograd ' + k:24s} {wino[k]:8.1f} img/s{chosen}")
    print(f"train, Winograd F4 over F2: {ratio:.3f} (median of per-round ratios)")
  if a.dry_run:
    return
  measured = {
    "images_per_sec_median": medians,
    "batch": a.batch,
    "forward_64_median": fwd,
    "train_winograd_median": wino,
    "mkl_over_xla": blas_measured,
  }
  path = tuning.save_choice(chunk, gemm, measured, strided_xla, tile, use_blas)
  products = {None: "unmeasured", True: "MKL", False: "XLA"}[use_blas]
  print(
    f"saved to {path}: chunk {chunk / tuning.MIB:.1f} MiB, gemm path {'on' if gemm else 'off'}, "
    f"strided forward {'XLA' if strided_xla else 'GEMM'}, Winograd F({tile}x{tile}, 3x3), "
    f"products {products}"
  )


if __name__ == "__main__":
  runtime.split_cpu_devices()  # one JAX device per core
  main()
