"""Hostile input: flag values, hand-edited config.json and metrics.jsonl, a
finished run asked for fewer steps, corrupt caches. Each gives one line and
the right exit code, or is repaired with a note; nothing valid is lost."""

import json
import os
import shutil

import numpy as np
import pytest

from experiments import cli, data, evaluate, mnist_ddpm
from sample_quality import metrics as qm


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 6-step smoke run."""
  workdir = tmp_path_factory.mktemp("finished")
  mnist_ddpm.main(["--workdir", str(workdir), "--preset", "smoke"])
  return workdir


def _copy(run, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(run, workdir)
  return workdir


def _run(argv, capsys, main=mnist_ddpm.main):
  code = cli.run_main(main, argv)
  return code, capsys.readouterr().err


@pytest.mark.parametrize(
  "flags,text",
  [
    (["--seed", "9223372036854775808"], "--seed 9223372036854775808 is out of range"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--timesteps", "10000000000000"], "--timesteps 10000000000000 is out of range"),
    (["--timesteps", "200000"], "--timesteps must be <= 100000"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--ema_decay", "nan"], "--ema_decay must be a finite number"),
  ],
)
def test_flag_values_out_of_range(tmp_path, flags, text, capsys):
  code, err = _run(["--workdir", str(tmp_path / "w"), "--preset", "smoke", *flags], capsys)
  assert code == 2 and text in err and "Traceback" not in err, err
  assert len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "w").exists()


def test_unexpected_exception_is_one_line_with_debug_for_the_traceback(capsys):
  def broken(argv):
    del argv
    raise TypeError("unsupported operand\nsecond line")

  code, err = _run([], capsys, main=broken)
  assert code == 1 and "internal error: TypeError: unsupported operand" in err
  assert "--debug" in err and len(err.strip().splitlines()) == 1, err
  with pytest.raises(TypeError):
    cli.run_main(broken, ["--debug"])


@pytest.mark.parametrize(
  "edit,text",
  [
    (lambda c: c.update(timesteps="100"), "timesteps = '100' is not of type int"),
    (lambda c: c.update(learning_rate=None), "learning_rate = None is not of type float"),
    (lambda c: c.update(conditional=1), "conditional = 1 is not of type bool"),
    (lambda c: c.pop("steps"), "lacks the fields ['steps']"),
  ],
)
def test_stored_config_is_type_checked(finished_run, tmp_path, edit, text, capsys):
  workdir = _copy(finished_run, tmp_path)
  path = workdir / "config.json"
  config = json.loads(path.read_text())
  edit(config)
  path.write_text(json.dumps(config))
  code, err = _run(["--workdir", str(workdir)], capsys)
  assert code == 2 and text in err and "Traceback" not in err, err
  code, err = _run(["--workdir", str(workdir), "--num_samples", "10"], capsys, main=evaluate.main)
  assert code == 2 and text in err, err


def test_fewer_steps_than_trained_is_refused(finished_run, tmp_path, capsys):
  workdir = _copy(finished_run, tmp_path)
  before = sorted(os.listdir(workdir / "checkpoints"))
  config_before = (workdir / "config.json").read_text()
  code, err = _run(["--workdir", str(workdir), "--steps", "3"], capsys)
  assert code == 2 and "has trained 6 steps; --steps asks for 3" in err, err
  assert sorted(os.listdir(workdir / "checkpoints")) == before
  assert (workdir / "config.json").read_text() == config_before


def test_metrics_log_skips_bad_lines_and_keeps_valid_records(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  lines = [
    json.dumps({"step": 1, "loss": 1.0}),
    "garbage {",
    "7",
    json.dumps({"step": 2}),
    json.dumps({"step": 3, "loss": 0.5}),
    json.dumps({"step": True, "loss": 0.1}),
    json.dumps({"step": 9, "loss": 0.2}),
  ]
  path.write_text("\n".join(lines) + "\n")
  assert [r["step"] for r in cli.MetricsLog.read(str(path))] == [1, 2, 3, 9]
  assert "skipped 3 malformed line(s)" in capsys.readouterr().err
  assert [r["step"] for r in cli.MetricsLog.read(str(path), required=("loss",))] == [1, 3, 9]
  # Bytes that are not UTF-8 (a torn multi-byte write) are one more bad line, not a crash.
  torn = tmp_path / "torn.jsonl"
  torn.write_bytes(b'{"step": 1, "loss": 1.0}\n\xff\xfe{"st\n{"step": 2, "loss": 0.5}\n')
  assert [r["step"] for r in cli.MetricsLog.read(str(torn))] == [1, 2]
  # Resuming at step 3 keeps every valid record up to 3, even after the garbage.
  cli.MetricsLog(str(path), keep_up_to_step=3)
  assert [r["step"] for r in cli.MetricsLog.read(str(path))] == [1, 2, 3]


def test_finished_run_with_appended_garbage_still_resumes(finished_run, tmp_path, capsys):
  workdir = _copy(finished_run, tmp_path)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('7\n{"step": 1}\nnot json\n')
  code, err = _run(["--workdir", str(workdir), "--steps", "8"], capsys)
  assert code == 0 and "Traceback" not in err, err
  steps = [
    r["step"] for r in cli.MetricsLog.read(str(workdir / "metrics.jsonl"), required=("loss",))
  ]
  assert steps == [2, 4, 6, 8]


def test_reference_feature_cache_is_verified(tmp_path, capsys):
  net = evaluate.FeatureNet()
  images = data.load_mnist().test_images[:500]  # the cache logic; any size will do
  good = evaluate.reference_set(net, images, str(tmp_path))
  feats, probs = net.embed(images)
  np.testing.assert_array_equal(good.features, feats)
  np.testing.assert_array_equal(good.radii, qm.knn_radii(feats, evaluate.REFERENCE_K))
  assert good.readable == qm.readable_fraction(probs)

  def same(ref):
    for a, b in zip(ref, good):
      np.testing.assert_array_equal(a, b)

  (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
  z = dict(np.load(path))
  np.savez(path, **{**z, "features": np.zeros_like(good.features)})  # replaced by zeros
  same(evaluate.reference_set(net, images, str(tmp_path)))
  assert "rebuilding the reference-feature cache" in capsys.readouterr().err
  np.savez(path, features=good.features, sha256=z["sha256"])  # an older cache: no radii
  same(evaluate.reference_set(net, images, str(tmp_path)))
  assert "KeyError" in capsys.readouterr().err
  path.write_bytes(path.read_bytes()[:1000])  # truncated
  same(evaluate.reference_set(net, images, str(tmp_path)))
  assert "rebuilding" in capsys.readouterr().err


def test_mnist_cache_hash_covers_dtype_and_shape(tmp_path):
  ds = data.load_mnist(use_tfds=False)
  arrays = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
  path = tmp_path / "mnist.npz"
  np.savez(
    path,
    train_images=ds.train_images.view(np.int8),
    train_labels=ds.train_labels,
    test_images=ds.test_images,
    test_labels=ds.test_labels,
  )
  with pytest.raises(data.DataError, match="is corrupt"):
    data._load_npz(str(path))  # the same bytes as int8
  np.savez(
    path,
    train_images=ds.train_images.reshape(60000, 784),
    train_labels=ds.train_labels,
    test_images=ds.test_images,
    test_labels=ds.test_labels,
  )
  with pytest.raises(data.DataError, match="is corrupt"):
    data._load_npz(str(path))
  assert data.arrays_sha256(arrays) == data.ARRAYS_SHA256


def test_served_arrays_are_checked():
  ok = (
    np.zeros((60000, 28, 28), np.int64),
    np.zeros(60000, np.int64),
    np.zeros((10000, 28, 28, 1), np.uint8),
    np.zeros(10000, np.uint8),
  )
  out = data.check_arrays(ok, "src")
  assert out[0].shape == (60000, 28, 28, 1) and all(a.dtype == np.uint8 for a in out)
  bad_range = (ok[0] + 300,) + ok[1:]
  with pytest.raises(data.DataError, match="values in \\[300, 300\\]"):
    data.check_arrays(bad_range, "src")
  with pytest.raises(data.DataError, match="shape"):
    data.check_arrays((ok[0][:5],) + ok[1:], "src")
  with pytest.raises(data.DataError, match="dtype"):
    data.check_arrays((ok[0].astype(np.float32),) + ok[1:], "src")


@pytest.mark.parametrize(
  "flags,text",
  [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--num_samples", "10001"], "--num_samples must lie in [10, 10000]"),
  ],
)
def test_evaluate_refuses_up_front(finished_run, flags, text, capsys):
  code, err = _run(["--workdir", str(finished_run), *flags], capsys, main=evaluate.main)
  assert code == 2 and text in err, err


@pytest.mark.parametrize("job", ["sample", "evaluate"])
def test_an_unwritable_output_folder_fails_before_any_sampling(tmp_path, job, monkeypatch, capsys):
  """--out under a file: exit 4 in one line before the job samples, not after."""
  import ddpm_jax as dj
  from experiments import sample

  def sampled(*args, **kwargs):
    raise AssertionError("the job worked before it checked its output folder")

  monkeypatch.setattr(dj, "sample", sampled)  # what sample draws with
  monkeypatch.setattr(evaluate, "Scorer", sampled)  # what evaluate builds first
  (tmp_path / "file").write_text("")
  out = str(tmp_path / "file" / "out")
  argv = ["--pretrained", "mnist", "--out", out, "--num_samples", "10", "--steps", "2"]
  code, err = _run(argv, capsys, main=sample.main if job == "sample" else evaluate.main)
  assert code == cli.EXIT_IO and "Not a directory" in err, err
  assert len(err.strip().splitlines()) == 1, err


def test_train_classifier_checks_its_output_before_training(tmp_path, monkeypatch, capsys):
  from experiments import train_classifier

  def trained(*args, **kwargs):
    raise AssertionError("trained before checking --output")

  monkeypatch.setattr(train_classifier, "train", trained)
  (tmp_path / "file").write_text("")
  argv = ["--output", str(tmp_path / "file" / "clf.npz")]
  code, err = _run(argv, capsys, main=train_classifier.main)
  assert code == cli.EXIT_IO and "File exists" in err, err
  assert len(err.strip().splitlines()) == 1, err


def test_second_job_on_a_locked_workdir_is_refused(tmp_path):
  """While one job holds the workdir, a second gets one line naming its pid."""
  import subprocess
  import sys
  import time

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "w"
  workdir.mkdir()
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from experiments import cli; "
      f"cli.lock_workdir({str(workdir)!r}); print('locked', flush=True); "
      "time.sleep(60)",
    ],
    cwd=root,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    p = subprocess.run(
      [
        sys.executable,
        "-m",
        "experiments.mnist_ddpm",
        "--workdir",
        str(workdir),
        "--preset",
        "smoke",
      ],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by another job (pid {holder.pid})" in lines[0], p.stderr
    assert os.listdir(workdir) == []
  finally:
    holder.kill()
    holder.wait()
  time.sleep(0.1)
  cli.lock_workdir(str(workdir))  # released when the holder died
  cli.unlock_workdir(str(workdir))


def test_closing_never_certifies_steps_it_did_not_write(finished_run, tmp_path):
  """Error paths close the Checkpointer: that must not write a manifest for a
  step whose files it never wrote (they may be corrupt)."""
  from experiments.checkpoints import MANIFEST, Checkpointer

  workdir = _copy(finished_run, tmp_path)
  manifest = workdir / "checkpoints" / "6" / MANIFEST
  manifest.unlink()
  ck = Checkpointer(str(workdir / "checkpoints"))
  ck.close()
  assert not manifest.exists()


def test_unhashed_checkpoint_is_set_aside_and_the_run_resumes(finished_run, tmp_path, capsys):
  """A step without a manifest (SIGKILL between Orbax's rename and the hashes)
  with a flipped byte is never restored: it is moved aside, kept, and the run
  resumes from the newest verified step and ends as the uninterrupted run."""
  from experiments.checkpoints import MANIFEST
  from tests.test_crash_safety import restore

  workdir = _copy(finished_run, tmp_path)
  step6 = workdir / "checkpoints" / "6"
  (step6 / MANIFEST).unlink()
  files = [os.path.join(d, f) for d, _, fs in os.walk(step6) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0xFF]))
  code, err = _run(["--workdir", str(workdir)], capsys)
  assert code == 0, err
  assert "checkpoint step 6 has no sha256.json" in err and "moved to" in err, err
  assert (workdir / "checkpoints_unverified" / "6").is_dir()
  assert (workdir / "checkpoints" / "6" / MANIFEST).exists()
  a, b = restore(workdir), restore(finished_run)
  jax_tree_equal = [np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b))]
  assert all(jax_tree_equal)


def _leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_tensorstore_disk_full_is_exit_4_in_one_line(tmp_path, monkeypatch, capsys):
  """TensorStore reports a full disk as ValueError('RESOURCE_EXHAUSTED ...')."""
  import logging
  import threading

  from experiments import checkpoints

  real_save = checkpoints.ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step >= 3:
      raise ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/x/d/1": '
        "[OS error 28: No space left on device]"
      )
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", save)
  hook = threading.excepthook
  try:
    code, err = _run(["--workdir", str(tmp_path / "w"), "--preset", "smoke"], capsys)
  finally:
    threading.excepthook = hook
    logging.disable(logging.NOTSET)
  assert code == 4, err
  lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
  assert len(lines) == 1 and "RESOURCE_EXHAUSTED" in lines[0], err
  assert "Traceback" not in err


def _popen_job(workdir, *flags):
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.Popen(
    [sys.executable, "-m", "experiments.mnist_ddpm", "--workdir", str(workdir), *flags],
    cwd=root,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for(cond, proc, timeout=300):
  import time

  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and not cond():
    time.sleep(0.01)
  return cond()


def _tmp_folders(workdir):
  return [d for d, _, _ in os.walk(workdir) if "orbax-checkpoint-tmp" in d]


def test_sigterm_during_final_sampling_keeps_the_final_checkpoint(tmp_path):
  import signal

  workdir = tmp_path / "w"
  flags = ["--preset", "smoke", "--sampler", "ddpm", "--sample_steps", "100", "--num_samples", "64"]
  proc = _popen_job(workdir, *flags)
  manifest = workdir / "checkpoints" / "6" / "sha256.json"
  assert _wait_for(manifest.exists, proc), proc.communicate()[1][-2000:]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  if proc.returncode == 0:
    pytest.skip("the job finished before the signal arrived")
  assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
  assert "final checkpoint (step 6) is complete" in err
  assert manifest.exists() and sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert not _tmp_folders(workdir)
  code = _popen_job(workdir).wait(timeout=300)
  assert code == 0 and (workdir / "samples_final.png").exists()


def test_double_ctrl_c_ends_cleanly(tmp_path):
  import signal
  import time

  workdir = tmp_path / "w"
  proc = _popen_job(
    workdir,
    "--preset",
    "smoke",
    "--steps",
    "400",
    "--checkpoint_every_steps",
    "1",
    "--log_every_steps",
    "1",
  )
  assert _wait_for(
    lambda: len(cli.MetricsLog.read(str(workdir / "metrics.jsonl"), quiet=True)) >= 5, proc
  )
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err[-3000:]
  assert not _tmp_folders(workdir)
