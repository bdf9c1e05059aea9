"""End-to-end tests of `python -m experiments.mnist_ddpm` with the smoke preset."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import cli, mnist_ddpm
from experiments.checkpoints import Checkpointer


def run(workdir, *flags):
  mnist_ddpm.main(["--workdir", str(workdir), "--preset", "smoke", *flags])


def final_params(workdir):
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  state = ckpt.restore(_abstract())
  ckpt.close()
  return state


def _abstract():
  import ddpm_jax as dj

  model = dj.make_model("test")
  tx = dj.make_optimizer(1e-3, 6, warmup_steps=2)
  return jax.eval_shape(lambda: dj.create_train_state(jax.random.key(0), model, tx, (28, 28, 1)))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  run(workdir)
  return workdir


def test_smoke_job_outputs(smoke_run):
  for name in [
    "config.json",
    "metrics.jsonl",
    "loss_curve.png",
    "samples_final.png",
    "trajectory.png",
  ]:
    assert os.path.getsize(smoke_run / name) > 0, name
  config = json.loads((smoke_run / "config.json").read_text())
  assert config["preset"] == "smoke" and config["model"] == "test" and config["steps"] == 6
  records = cli.MetricsLog.read(str(smoke_run / "metrics.jsonl"))
  assert [r["step"] for r in records] == [2, 4, 6]
  for r in records:
    assert {"step", "loss", "learning_rate", "images_per_sec"} <= set(r)
    assert np.isfinite(r["loss"]) and r["images_per_sec"] > 0
  assert Checkpointer(str(smoke_run / "checkpoints")).latest_step() == 6


def test_resume_continues_identically(smoke_run, tmp_path):
  run(tmp_path, "--stop_after_steps", "4")
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.latest_step() == 4
  ckpt.close()
  assert not (tmp_path / "samples_final.png").exists()
  run(tmp_path)  # resumes from step 4
  a, b = final_params(smoke_run), final_params(tmp_path)
  assert int(b.step) == 6
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  jax.tree.map(np.testing.assert_array_equal, a.ema_params, b.ema_params)
  steps = [r["step"] for r in cli.MetricsLog.read(str(tmp_path / "metrics.jsonl"))]
  assert steps == [2, 4, 6]


def test_bad_flags_give_one_line_and_exit_2(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  for flags, expect in [
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--eta", "2"], "--eta must lie in [0, 1], got 2.0"),
    (["--sample_steps", "5000", "--sampler", "ddim"], "--sample_steps must lie in [1, 1000]"),
    (["--sampler", "dpm", "--temperature", "0.5"], "dpm (DPM-Solver++) adds no noise"),
    (["--label_dropout", "1.5"], "--label_dropout must lie in [0, 1]"),
    (["--spacing", "logsnr"], "--spacing must be one of"),
  ]:
    p = subprocess.run(
      [sys.executable, "-m", "experiments.mnist_ddpm", "--workdir", str(tmp_path / "w"), *flags],
      capture_output=True,
      text=True,
      env=env,
    )
    assert p.returncode == 2, p.stderr
    assert expect in p.stderr and "Traceback" not in p.stderr, p.stderr
  assert not (tmp_path / "w").exists() or not os.listdir(tmp_path / "w")


def test_help_lists_flags():
  p = subprocess.run(
    [sys.executable, "-m", "experiments.mnist_ddpm", "--help"], capture_output=True, text=True
  )
  assert p.returncode == 0
  for flag in [
    "--workdir",
    "--preset",
    "--epochs",
    "--steps",
    "--batch_size",
    "--learning_rate",
    "--schedule",
    "--timesteps",
    "--model",
    "--sampler",
    "--sample_steps",
    "--num_samples",
    "--ema_decay",
    "--seed",
    "--conditional",
    "--guidance_scale",
    "--temperature",
  ]:
    assert flag in p.stdout


@pytest.mark.parametrize("job", ["mnist_ddpm", "mnist_vae", "sample"])
def test_help_names_the_job_as_launched_and_each_default_once(job):
  p = subprocess.run(
    [sys.executable, "-m", f"experiments.{job}", "--help"], capture_output=True, text=True
  )
  assert p.returncode == 0, p.stderr
  assert p.stdout.startswith(f"usage: python -m experiments.{job} "), p.stdout[:200]
  text = " ".join(p.stdout.split())
  assert "(default: None)" not in text  # a config flag's None means "the preset's"
  assert "default 30 (default: 30.0)" not in text, text  # --peer_timeout's help names it
  bad = subprocess.run(
    [sys.executable, "-m", f"experiments.{job}", "--no_such_flag"], capture_output=True, text=True
  )
  assert bad.returncode == 2 and bad.stderr.startswith(f"python -m experiments.{job}: error:")


def test_bfloat16_compute_keeps_float32_state(tmp_path):
  run(tmp_path, "--compute_dtype", "bfloat16", "--steps", "2", "--num_samples", "4")
  records = cli.MetricsLog.read(str(tmp_path / "metrics.jsonl"))
  assert records and all(np.isfinite(r["loss"]) for r in records)
  state = final_params(tmp_path)
  assert {str(a.dtype) for a in jax.tree.leaves(state.params)} == {"float32"}
  assert {str(a.dtype) for a in jax.tree.leaves(state.opt_state) if hasattr(a, "dtype")} <= {
    "float32",
    "int32",
  }


def test_divergence_stops_without_saving_or_is_skipped(tmp_path, capsys):
  """A learning rate of 1e30 makes the loss non-finite within a few steps."""
  stop_dir, skip_dir = tmp_path / "stop", tmp_path / "skip"
  code = cli.run_main(
    mnist_ddpm.main, ["--workdir", str(stop_dir), "--preset", "smoke", "--learning_rate", "1e30"]
  )
  err = capsys.readouterr().err
  assert code == 3 and "non-finite loss or gradient at step" in err and "Traceback" not in err
  ck = Checkpointer(str(stop_dir / "checkpoints"))
  latest = ck.latest_step()
  ck.close()
  if latest is not None:
    state = final_params(stop_dir)  # whatever was saved was checked first
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(state.params))
  run(skip_dir, "--learning_rate", "1e30", "--skip_nonfinite", "true")
  records = cli.MetricsLog.read(str(skip_dir / "metrics.jsonl"))
  assert records[-1]["skipped_steps"] > 0
  state = final_params(skip_dir)
  assert int(state.step) == 6
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(state.params))


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path):
  import signal
  import time

  workdir = tmp_path / "pre"
  cmd = [
    sys.executable,
    "-m",
    "experiments.mnist_ddpm",
    "--workdir",
    str(workdir),
    "--preset",
    "smoke",
    "--steps",
    "5000",
    "--log_every_steps",
    "1",
    "--checkpoint_every_steps",
    "100000",
  ]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 143, err[-2000:]
  assert "SIGTERM at step" in err and "Traceback" not in err
  ck = Checkpointer(str(workdir / "checkpoints"))
  saved = ck.latest_step()
  ck.close()
  assert saved is not None and saved >= 3
  run(workdir, "--stop_after_steps", "2")
  assert int(final_params(workdir).step) == saved + 2


def test_v_prediction_min_snr_and_dpm_solver_job(tmp_path):
  run(
    tmp_path,
    "--parameterization",
    "v",
    "--loss_weighting",
    "min_snr",
    "--sampler",
    "dpm",
    "--sample_steps",
    "5",
    "--steps",
    "2",
    "--num_samples",
    "4",
    "--spacing",
    "quadratic",
  )
  records = cli.MetricsLog.read(str(tmp_path / "metrics.jsonl"))
  assert records and all(np.isfinite(r["loss"]) for r in records)
  assert (tmp_path / "samples_final.png").exists() and (tmp_path / "trajectory.png").exists()
  stored = json.loads((tmp_path / "config.json").read_text())
  assert (stored["parameterization"], stored["loss_weighting"]) == ("v", "min_snr")
