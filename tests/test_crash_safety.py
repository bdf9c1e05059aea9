"""Issue 7: killed runs resume bitwise, bad checkpoints and disks give one
clear line and a non-zero exit, and nothing in the workdir is destroyed."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import cli, mnist_ddpm, mnist_vae
from experiments.checkpoints import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 24 steps of ~0.1 s with the test U-Net: long enough to kill partway.
KILL_FLAGS = [
  "--preset",
  "smoke",
  "--steps",
  "24",
  "--checkpoint_every_steps",
  "4",
  "--log_every_steps",
  "1",
  "--num_samples",
  "4",
]


def job(module, workdir, *flags):
  return [sys.executable, "-m", module, "--workdir", str(workdir), *flags]


def restore(workdir):
  """The latest full TrainState of a DDPM workdir, shaped by its config.json."""
  import ddpm_jax as dj

  config, _ = cli.load_config(mnist_ddpm.Config, str(workdir))
  model = dj.make_model(config.model)
  tx = dj.make_optimizer(
    config.learning_rate,
    config.steps,
    warmup_steps=min(config.warmup_steps, config.steps),
    grad_clip=config.grad_clip,
  )
  abstract = jax.eval_shape(
    lambda: dj.create_train_state(jax.random.key(0), model, tx, (28, 28, 1))
  )
  ck = Checkpointer(str(workdir / "checkpoints"))
  try:
    return ck.restore(abstract)
  finally:
    ck.close()


def logged_steps(workdir):
  return [r["step"] for r in cli.MetricsLog.read(str(workdir / "metrics.jsonl"))]


def kill_when_logged(workdir, step, env, timeout=300):
  """Starts the job, SIGKILLs it once metrics.jsonl reaches `step` (or it ends);
  returns the last step logged before the kill."""
  proc = subprocess.Popen(
    job("experiments.mnist_ddpm", workdir, *KILL_FLAGS),
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    steps = logged_steps(workdir)
    if steps and steps[-1] >= step:
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  return (logged_steps(workdir) or [0])[-1]


def test_sigkill_at_several_points_resumes_bitwise(tmp_path):
  # Every process runs the same programs: the session's compilation cache
  # (conftest.py) saves each one its ~15 s of compiling.
  env = dict(os.environ)
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  subprocess.run(
    job("experiments.mnist_ddpm", ref, *KILL_FLAGS),
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
  )
  reached = [kill_when_logged(killed, k, env) for k in (3, 10, 17)]
  assert reached[-1] < 24, f"the job finished before the last kill: {reached}"
  # Resume to the end.
  subprocess.run(
    job("experiments.mnist_ddpm", killed, *KILL_FLAGS),
    cwd=ROOT,
    env=env,
    check=True,
    capture_output=True,
  )
  a, b = restore(ref), restore(killed)
  assert int(b.step) == 24
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # bitwise: params, EMA, optimizer state
  ref_log = cli.MetricsLog.read(str(ref / "metrics.jsonl"))
  killed_log = cli.MetricsLog.read(str(killed / "metrics.jsonl"))
  assert [r["step"] for r in killed_log] == list(range(1, 25))
  assert [r["loss"] for r in killed_log] == [r["loss"] for r in ref_log]
  assert (killed / "samples_final.png").exists()
  assert not [f for f in os.listdir(killed) if f.endswith(".tmp")]


def _snapshot(workdir):
  out = {}
  for d, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, workdir)] = fh.read()
  return out


def _one_error_line(p, code, text):
  assert p.returncode == code, p.stderr[-3000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  lines = [line for line in p.stderr.splitlines() if "error:" in line]
  assert len(lines) == 1 and text in lines[0], p.stderr[-3000:]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
  """A smoke run stopped at step 3, with its checkpoint."""
  workdir = tmp_path_factory.mktemp("stopped")
  mnist_ddpm.main(["--workdir", str(workdir), "--preset", "smoke", "--stop_after_steps", "3"])
  return workdir


def test_corrupt_or_truncated_checkpoint_is_refused(stopped_run, tmp_path):
  import shutil

  workdir = tmp_path / "w"
  shutil.copytree(stopped_run, workdir)
  files = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "checkpoints" / "3") for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:  # a write cut short
    f.truncate(os.path.getsize(biggest) // 2)
  before = _snapshot(workdir)
  p = subprocess.run(
    job("experiments.mnist_ddpm", workdir), cwd=ROOT, capture_output=True, text=True
  )
  _one_error_line(p, 2, f"the checkpoint {workdir / 'checkpoints' / '3'} is corrupt or truncated")
  assert _snapshot(workdir) == before  # nothing destroyed or rewritten


def test_checkpoint_of_another_model_names_the_changed_flag(stopped_run, tmp_path):
  import shutil

  workdir = tmp_path / "w"
  shutil.copytree(stopped_run, workdir)
  config_before = (workdir / "config.json").read_text()
  p = subprocess.run(
    job("experiments.mnist_ddpm", workdir, "--model", "tiny"),
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  _one_error_line(p, 2, "this run changes model")
  assert (workdir / "config.json").read_text() == config_before


def test_unwritable_workdir_gives_one_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  p = subprocess.run(
    job("experiments.mnist_ddpm", blocker / "w", "--preset", "smoke"),
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  _one_error_line(p, 4, "cannot read or write files")
  assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(
  hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders"
)
def test_read_only_workdir_gives_one_line(stopped_run, tmp_path):
  import shutil

  workdir = tmp_path / "ro"
  shutil.copytree(stopped_run, workdir)
  before = _snapshot(workdir)
  os.chmod(workdir, 0o555)
  try:
    p = subprocess.run(
      job("experiments.mnist_ddpm", workdir), cwd=ROOT, capture_output=True, text=True
    )
  finally:
    os.chmod(workdir, 0o755)
  _one_error_line(p, 4, "cannot read or write files")
  assert _snapshot(workdir) == before


def test_full_disk_mid_run_exits_4_and_resumes(tmp_path, monkeypatch, capsys):
  full = tmp_path / "full"
  flags = ["--preset", "smoke", "--log_every_steps", "1"]
  real_write, calls = cli.MetricsLog.write, []

  def write(self, record):
    calls.append(record)
    if len(calls) == 5:  # after the step-3 checkpoint
      raise OSError(errno.ENOSPC, "No space left on device", self.path)
    real_write(self, record)

  monkeypatch.setattr(cli.MetricsLog, "write", write)
  code = cli.run_main(mnist_ddpm.main, ["--workdir", str(full), *flags])
  err = capsys.readouterr().err
  assert code == 4 and "No space left on device" in err and "Traceback" not in err
  ck = Checkpointer(str(full / "checkpoints"))
  assert ck.latest_step() == 3
  ck.close()
  monkeypatch.setattr(cli.MetricsLog, "write", real_write)
  # Space again: resumes from step 3 (that it ends bitwise equal to an
  # uninterrupted run is the SIGKILL test's business).
  mnist_ddpm.main(["--workdir", str(full), *flags, "--stop_after_steps", "3"])
  assert int(restore(full).step) == 6
  assert logged_steps(full) == list(range(1, 7))


def test_orbax_errors_carrying_an_os_error_become_os_errors(tmp_path):
  ck = Checkpointer(str(tmp_path / "c"))

  def fails():
    try:
      raise OSError(errno.EROFS, "Read-only file system")
    except OSError as e:
      raise RuntimeError("async save failed") from e

  with pytest.raises(OSError, match="Read-only file system"):
    ck._io(fails)
  with pytest.raises(KeyError):
    ck._io(lambda: {}["x"])
  ck.close()


@pytest.mark.parametrize(
  "flags,text",
  [
    (["--timesteps", "0"], "--timesteps must be >= 1"),
    (["--beta_end", "1.5"], "beta_end must lie in (0, 1)"),
    (["--beta_start", "0.1", "--beta_end", "0.01"], "--beta_start 0.1 exceeds --beta_end 0.01"),
    (["--learning_rate", "-1"], "--learning_rate must be > 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--model", "small"], "28x28 is not divisible"),
    (["--eta", "-0.5"], "--eta must lie in [0, 1]"),
    (["--sampler", "ddpm", "--sample_steps", "101"], "--sample_steps must lie in [1, 100]"),
    (["--steps", "nope"], "invalid int value: 'nope'"),
  ],
)
def test_out_of_range_values_give_one_line(tmp_path, flags, text, capsys):
  code = cli.run_main(
    mnist_ddpm.main, ["--workdir", str(tmp_path / "w"), "--preset", "smoke", *flags]
  )
  err = capsys.readouterr().err
  assert code == 2 and text in err and "Traceback" not in err, err
  assert len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "w").exists()


def test_batch_not_divisible_by_devices_gives_one_line(tmp_path):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", PYTHONPATH=ROOT)
  p = subprocess.run(
    job("experiments.mnist_ddpm", tmp_path / "w", "--preset", "smoke", "--batch_size", "6"),
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=env,
  )
  _one_error_line(p, 2, "--batch_size")
  assert "4" in p.stderr and not (tmp_path / "w").exists()


def test_explicit_flag_overrides_a_stored_config(stopped_run, tmp_path, capsys):
  import shutil

  workdir = tmp_path / "w"
  shutil.copytree(stopped_run, workdir)
  mnist_ddpm.main(["--workdir", str(workdir), "--num_samples", "4", "--stop_after_steps", "1"])
  assert "overriding num_samples = 16" in capsys.readouterr().err
  assert json.loads((workdir / "config.json").read_text())["num_samples"] == 4


VAE_FLAGS = ["--preset", "smoke"]


def test_vae_divergence_stops_or_is_skipped(tmp_path, capsys):
  stop, skip = tmp_path / "stop", tmp_path / "skip"
  code = cli.run_main(
    mnist_vae.main, ["--workdir", str(stop), *VAE_FLAGS, "--learning_rate", "1e30"]
  )
  err = capsys.readouterr().err
  assert code == 3 and "non-finite loss or gradient in epoch" in err and "Traceback" not in err
  mnist_vae.main(
    [
      "--workdir",
      str(skip),
      *VAE_FLAGS,
      "--learning_rate",
      "1e30",
      "--skip_nonfinite",
      "true",
      "--epochs",
      "1",
    ]
  )
  records = cli.MetricsLog.read(str(skip / "metrics.jsonl"))
  assert records[-1]["skipped_steps"] > 0
  _, _, params, _ = mnist_vae.load_trained(str(skip))
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(params))


def test_vae_sigterm_saves_and_resumes(tmp_path):
  workdir = tmp_path / "vae"
  proc = subprocess.Popen(
    job("experiments.mnist_vae", workdir, *VAE_FLAGS, "--epochs", "500"),
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().strip():
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 143 and "SIGTERM: checkpoint after epoch" in err, err[-2000:]
  _, _, _, step = mnist_vae.load_trained(str(workdir))
  epochs = cli.MetricsLog.read(str(metrics))[-1]["epoch"]
  assert step > 0 and epochs >= 1
