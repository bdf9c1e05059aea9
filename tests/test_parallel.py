"""Data parallelism on 4 fake CPU devices (in a subprocess: the device count is
fixed when JAX starts)."""

import json
import os
import subprocess
import sys

import pytest

from ddpm_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def result():
  env = dict(
    os.environ,
    JAX_NUM_CPU_DEVICES="4",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "scripts", "parallel_check.py")],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_parallel_step_matches_single_device(result):
  assert result["batch_devices"] == 4 and result["step_4"] == 2
  assert abs(result["loss_1"] - result["loss_4"]) < 1e-5
  assert abs(result["grad_norm_1"] - result["grad_norm_4"]) < 1e-5 * result["grad_norm_1"]
  assert result["param_max_diff"] < 1e-5 * max(1.0, result["param_scale"])
  assert result["plain_vs_4_max_diff"] < 1e-5 * max(1.0, result["param_scale"])


def test_samples_identical_across_device_counts(result):
  assert result["sample_devices"] == 4
  assert result["sample_max_diff"] < 1e-5


def test_fast_convolutions_split_the_batch_over_the_devices(result):
  # Without the mesh-aware scans XLA gathered the whole batch onto every
  # device for each chunked convolution (15 all-gathers in one forward).
  assert result["gemm_all_gathers_4"] == 0
  # Winograd weight gradients are all-reduced as 9 kernel slabs, not the
  # 36 (F(4, 3)) of the transformed domain.
  assert result["winograd_domain_all_reduces_4"] == 0
  assert result["gemm_loss_diff"] < 1e-5
  assert result["gemm_grad_norm_rel_diff"] < 1e-5
  assert result["gemm_param_max_diff"] < 1e-5
  assert result["gemm_sample_max_diff"] < 1e-4


def test_indivisible_batch_is_refused(result):
  assert "not divisible by the 4 devices" in result["indivisible_error"]
  assert "batch size 6 is not divisible by the 4" in result["indivisible_sampler_error"]


def test_process_rows():
  assert parallel.process_rows(8, 1, 4) == slice(2, 4)
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    parallel.process_rows(8, 0, 3)
