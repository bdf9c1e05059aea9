"""Hostile input: flag values, hand-edited config.json and metrics.jsonl, a
finished run asked for fewer steps, corrupt caches. Each gives one line and
the right exit code, or is repaired with a note; nothing valid is lost."""

import json
import os
import shutil

import numpy as np
import pytest

from experiments import cli, data, evaluate, mnist_ddpm


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


@pytest.mark.parametrize("flags,text", [
    (["--seed", "9223372036854775808"], "--seed 9223372036854775808 is out of range"),
    (["--seed", "-3"], "--seed must be >= 0"),
    (["--timesteps", "10000000000000"], "--timesteps 10000000000000 is out of range"),
    (["--timesteps", "200000"], "--timesteps must be <= 100000"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--ema_decay", "nan"], "--ema_decay must be a finite number"),
])
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


@pytest.mark.parametrize("edit,text", [
    (lambda c: c.update(timesteps="100"), "timesteps = '100' is not of type int"),
    (lambda c: c.update(learning_rate=None), "learning_rate = None is not of type float"),
    (lambda c: c.update(conditional=1), "conditional = 1 is not of type bool"),
    (lambda c: c.pop("steps"), "lacks the fields ['steps']"),
])
def test_stored_config_is_type_checked(finished_run, tmp_path, edit, text, capsys):
  workdir = _copy(finished_run, tmp_path)
  path = workdir / "config.json"
  config = json.loads(path.read_text())
  edit(config)
  path.write_text(json.dumps(config))
  code, err = _run(["--workdir", str(workdir)], capsys)
  assert code == 2 and text in err and "Traceback" not in err, err
  code, err = _run(["--workdir", str(workdir), "--num_samples", "10"], capsys,
                   main=evaluate.main)
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
  lines = [json.dumps({"step": 1, "loss": 1.0}), "garbage {", "7", json.dumps({"step": 2}),
           json.dumps({"step": 3, "loss": 0.5}), json.dumps({"step": True, "loss": 0.1}),
           json.dumps({"step": 9, "loss": 0.2})]
  path.write_text("\n".join(lines) + "\n")
  assert [r["step"] for r in cli.MetricsLog.read(str(path))] == [1, 2, 3, 9]
  assert "skipped 3 malformed line(s)" in capsys.readouterr().err
  assert [r["step"] for r in cli.MetricsLog.read(str(path), required=("loss",))] == [1, 3, 9]
  # Resuming at step 3 keeps every valid record up to 3, even after the garbage.
  cli.MetricsLog(str(path), keep_up_to_step=3)
  assert [r["step"] for r in cli.MetricsLog.read(str(path))] == [1, 2, 3]


def test_finished_run_with_appended_garbage_still_resumes(finished_run, tmp_path, capsys):
  workdir = _copy(finished_run, tmp_path)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('7\n{"step": 1}\nnot json\n')
  code, err = _run(["--workdir", str(workdir), "--steps", "8"], capsys)
  assert code == 0 and "Traceback" not in err, err
  steps = [r["step"] for r in cli.MetricsLog.read(str(workdir / "metrics.jsonl"),
                                                   required=("loss",))]
  assert steps == [2, 4, 6, 8]


def test_reference_feature_cache_is_verified(tmp_path, capsys):
  net = evaluate.FeatureNet()
  images = data.load_mnist().test_images
  good = evaluate.reference_features(net, images, str(tmp_path))
  (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
  np.savez(path, features=np.zeros_like(good), sha256=np.array("0" * 64))  # replaced by zeros
  np.testing.assert_array_equal(evaluate.reference_features(net, images, str(tmp_path)), good)
  assert "rebuilding the reference-feature cache" in capsys.readouterr().err
  path.write_bytes(path.read_bytes()[:1000])  # truncated
  np.testing.assert_array_equal(evaluate.reference_features(net, images, str(tmp_path)), good)
  assert "rebuilding" in capsys.readouterr().err


def test_mnist_cache_hash_covers_dtype_and_shape(tmp_path):
  ds = data.load_mnist(use_tfds=False)
  arrays = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
  path = tmp_path / "mnist.npz"
  np.savez(path, train_images=ds.train_images.view(np.int8), train_labels=ds.train_labels,
           test_images=ds.test_images, test_labels=ds.test_labels)
  with pytest.raises(data.DataError, match="is corrupt"):
    data._load_npz(str(path))  # the same bytes as int8
  np.savez(path, train_images=ds.train_images.reshape(60000, 784), train_labels=ds.train_labels,
           test_images=ds.test_images, test_labels=ds.test_labels)
  with pytest.raises(data.DataError, match="is corrupt"):
    data._load_npz(str(path))
  assert data.arrays_sha256(arrays) == data.ARRAYS_SHA256


def test_served_arrays_are_checked():
  ok = (np.zeros((60000, 28, 28), np.int64), np.zeros(60000, np.int64),
        np.zeros((10000, 28, 28, 1), np.uint8), np.zeros(10000, np.uint8))
  out = data.check_arrays(ok, "src")
  assert out[0].shape == (60000, 28, 28, 1) and all(a.dtype == np.uint8 for a in out)
  bad_range = (ok[0] + 300,) + ok[1:]
  with pytest.raises(data.DataError, match="values in \\[300, 300\\]"):
    data.check_arrays(bad_range, "src")
  with pytest.raises(data.DataError, match="shape"):
    data.check_arrays((ok[0][:5],) + ok[1:], "src")
  with pytest.raises(data.DataError, match="dtype"):
    data.check_arrays((ok[0].astype(np.float32),) + ok[1:], "src")


@pytest.mark.parametrize("flags,text", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--num_samples", "10001"], "--num_samples must lie in [10, 10000]"),
])
def test_evaluate_refuses_up_front(finished_run, flags, text, capsys):
  code, err = _run(["--workdir", str(finished_run), *flags], capsys, main=evaluate.main)
  assert code == 2 and text in err, err


def test_second_job_on_a_locked_workdir_is_refused(tmp_path):
  """While one job holds the workdir, a second gets one line naming its pid."""
  import subprocess
  import sys
  import time
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / "w"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c",
                             "import sys, time; from experiments import cli; "
                             f"cli.lock_workdir({str(workdir)!r}); print('locked', flush=True); "
                             "time.sleep(60)"], cwd=root, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    p = subprocess.run([sys.executable, "-m", "experiments.mnist_ddpm", "--workdir", str(workdir),
                        "--preset", "smoke"], cwd=root, capture_output=True, text=True,
                       timeout=300)
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
