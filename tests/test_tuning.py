"""The fast convolutions' machine-dependent constants (nnbase/tuning.py)."""

import json

import pytest

from nnbase import conv, tuning


def test_rule_follows_the_caches():
  mib = tuning.MIB
  # The per-core L2: a 2-core AMD EPYC (Zen 4) and a 2-core Xeon VM, whose
  # socket-wide L3 (260 MiB) is reported whole.
  assert tuning.rule_chunk_bytes({"L1d": 32 * 1024, "L2": mib, "L3": 32 * mib}) == mib
  assert tuning.rule_chunk_bytes({"L1d": 48 * 1024, "L2": 2 * mib, "L3": 260 * mib}) == 2 * mib
  assert tuning.rule_chunk_bytes({"L2": 512 * 1024, "L3": 16 * mib}) == mib  # floor
  assert tuning.rule_chunk_bytes({"L2": 64 * mib, "L3": 512 * mib}) == 32 * mib  # ceiling
  # No L2: 7/32 of a core complex's L3, nothing from a socket-wide one.
  assert tuning.rule_chunk_bytes({"L3": 16 * mib}) == 3.5 * mib
  assert tuning.rule_chunk_bytes({"L3": 512 * mib}) == tuning.DEFAULT_CHUNK_BYTES
  assert tuning.rule_chunk_bytes({}) == tuning.DEFAULT_CHUNK_BYTES


def test_tuning_candidates_cover_the_l2_and_the_l3_share():
  mib = tuning.MIB
  epyc = {"L1d": 32 * 1024, "L2": mib, "L3": 32 * mib}
  assert tuning.tuning_candidates(epyc) == [mib, 2 * mib, 7 * mib]
  xeon = {"L1d": 48 * 1024, "L2": 2 * mib, "L3": 260 * mib}
  assert tuning.tuning_candidates(xeon) == [mib, 2 * mib, 4 * mib, 32 * mib]
  assert tuning.tuning_candidates({}) == [3.5 * mib, 7 * mib, 14 * mib]


def test_tune_scores_chunks_by_train_and_forward():
  from benchmarks.tune import chunk_scores

  # "a" trains 10% faster, "b" runs the forward 20% faster: b scores 100/110, a 300/360.
  medians = {"a": 110.0, "fwd a": 300.0, "b": 100.0, "fwd b": 360.0, "xla": 14.0, "fwd xla": 210.0}
  s = chunk_scores(medians)
  assert s["a"] == pytest.approx(300 / 360) and s["b"] == pytest.approx(100 / 110)
  assert max(s, key=s.get) == "b" and s["xla"] < 0.1


def test_cached_choice_is_used_only_on_its_machine(tmp_path, monkeypatch):
  path = tmp_path / "conv_tuning.json"
  monkeypatch.setattr(tuning, "CACHE_FILE", str(path))
  assert tuning.cached_choice() is None and tuning.chunk_bytes() == tuning.rule_chunk_bytes()
  assert tuning.strided_forward_xla() is True and tuning.winograd_tile() == 4
  tuning.save_choice(3 * tuning.MIB, False, {"x": 1}, strided_forward_xla=False, winograd_tile=2)
  assert tuning.chunk_bytes() == 3 * tuning.MIB and tuning.gemm_default() is False
  assert tuning.strided_forward_xla() is False and tuning.winograd_tile() == 2
  monkeypatch.setenv("DDPM_JAX_CONV_TUNING", "off")
  assert tuning.cached_choice() is None and tuning.gemm_default() is True
  monkeypatch.delenv("DDPM_JAX_CONV_TUNING")
  record = json.loads(path.read_text())
  # A record from before the strided-forward and Winograd choices keeps their defaults.
  old = {k: v for k, v in record.items() if k not in ("strided_forward_xla", "winograd_tile")}
  path.write_text(json.dumps(old))
  assert tuning.chunk_bytes() == 3 * tuning.MIB and tuning.strided_forward_xla() is True
  assert tuning.winograd_tile() == 4
  path.write_text(json.dumps(dict(record, winograd_tile=3)))  # not a tile we have
  assert tuning.winograd_tile() == 4
  path.write_text(json.dumps(dict(record, machine="another CPU | L3=1")))
  assert tuning.cached_choice() is None
  path.write_text(json.dumps(dict(record, chunk_bytes="big")))
  assert tuning.cached_choice() is None
  path.write_text("{torn")
  assert tuning.cached_choice() is None


def test_gemm_default_off_keeps_xla_convolutions(monkeypatch):
  monkeypatch.setattr(conv, "GEMM_BY_DEFAULT", False)
  assert not conv.use_gemm_conv(None, 64, 64)
  assert conv.use_gemm_conv(True, 64, 64)
  monkeypatch.setattr(conv, "GEMM_BY_DEFAULT", True)
  assert conv.use_gemm_conv(None, 64, 64) == (conv.jax.default_backend() == "cpu")


def test_tune_keeps_mkl_by_the_geometric_mean_of_its_speedups():
  from benchmarks.tune import blas_ratios

  raw = {
    "mkl": [110.0, 120.0, 100.0],
    "xla": [100.0, 100.0, 100.0],  # train ratios 1.1, 1.2, 1.0: median 1.1
    "fwd mkl": [90.0, 95.0, 99.0],
    "fwd xla": [100.0, 100.0, 100.0],  # median 0.95
    "vae mkl": [1.0, 1.0, 1.0],
    "vae xla": [1.0, 0.5, 1.0],  # ratios 1, 2, 1: median 1
  }
  r = blas_ratios(raw)
  assert r["train"] == pytest.approx(1.1) and r["forward"] == pytest.approx(0.95)
  assert r["vae"] == pytest.approx(1.0)
  assert r["geomean"] == pytest.approx((1.1 * 0.95) ** (1 / 3))


def test_inference_programs_compile_without_ynnpack(monkeypatch):
  """Forward-only programs (`jit_inference`: samplers, the benchmark's forward)
  compile without XLA:CPU's YNNPACK fusions; plain jit keeps them."""
  import jax
  import jax.numpy as jnp

  from ddpm_jax import parallel

  monkeypatch.delenv("DDPM_JAX_INFERENCE_YNN", raising=False)
  f = lambda a, b: jnp.tanh(a @ b)
  a = jnp.ones((64, 64))
  fused = lambda fn: "ynn_fusion" in fn.lower(a, a).compile().as_text()
  assert fused(jax.jit(f))  # what the option turns off is there by default
  assert not fused(parallel.jit_inference(f))
  assert tuning.inference_compiler_options("gpu") is None
  monkeypatch.setenv("DDPM_JAX_INFERENCE_YNN", "on")
  assert tuning.inference_compiler_options("cpu") is None
  assert fused(parallel.jit_inference(f))


def test_interleave_reports_the_bound_round_by_round():
  from benchmarks.run import interleave

  calls = []

  def side(name, values):
    it = iter(values)
    return lambda: calls.append(name) or next(it)

  r = interleave(
    side("jax", [1.0, 2.0, 1.0]),
    side("torch", [2.0, 2.0, 3.0]),
    3,
    "lower",
    bound_round=side("bound", [0.5, 1.0, 2.0]),
  )
  assert calls == ["jax", "torch", "bound"] * 3
  assert r["ratios"] == [2.0, 1.0, 3.0] and r["ratio"] == 2.0
  # PyTorch's time over the bound's, in the same round.
  assert (r["bound"], r["bound_ratio"], r["bound_ratio_min"], r["bound_ratio_max"]) == (
    1.0,
    2.0,
    1.5,
    4.0,
  )
  assert "bound" not in interleave(side("a", [1.0]), side("b", [1.0]), 1, "higher")


def test_benchmark_refuses_an_unwritable_json_before_it_runs(tmp_path, monkeypatch, capsys):
  """`benchmarks.run --json` into a missing folder: exit 2 at once, not a
  traceback after minutes of benchmarking."""
  from benchmarks import run

  def benchmarked(*args, **kwargs):
    raise AssertionError("benchmarked before checking --json")

  monkeypatch.setattr(run.torch_ref, "available", benchmarked)
  monkeypatch.setattr(run, "matmul_peak", benchmarked)
  for path, text in (
    (tmp_path / "missing" / "out.json", "does not exist or is not writable"),
    (tmp_path, "is a folder"),
  ):
    with pytest.raises(SystemExit) as e:
      run.main(["--quick", "--json", str(path)])
    assert e.value.code == 2 and text in capsys.readouterr().err
