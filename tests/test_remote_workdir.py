"""Workdirs on cloud storage: the jobs' own files (config, metrics, manifests,
pictures) go through `etils.epath`. There is no bucket here, so epath's gs://
backend is mocked onto a local folder; Orbax's own gs:// support (TensorStore)
is not exercised."""

import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from experiments import checkpoints, cli, files, plotting

_FNS = (
  "copy",
  "exists",
  "glob",
  "isdir",
  "listdir",
  "makedirs",
  "mkdir",
  "open",
  "remove",
  "rename",
  "replace",
  "rmtree",
  "stat",
)


@pytest.fixture
def bucket(tmp_path):
  """gs://b/... lives in tmp_path/gcs/b/...; yields that local root."""
  root = tmp_path / "gcs"
  root.mkdir()

  def local(p):
    s = os.fspath(p)
    return str(root / s[len("gs://") :]) if s.startswith("gs://") else s

  def wrap(orig, path, *args, **kwargs):
    return orig(local(path), *[local(a) if isinstance(a, str) else a for a in args], **kwargs)

  def walk(orig, path, *args, **kwargs):
    for d, dirs, names in orig(local(path), *args, **kwargs):
      d = os.fspath(d)
      yield ("gs://" + os.path.relpath(d, root) if d.startswith(str(root)) else d), dirs, names

  with epath_testing.mock_epath(walk=walk, **{name: wrap for name in _FNS}):
    yield root


def test_json_pictures_and_metrics_on_a_bucket(bucket):
  run = "gs://b/run"
  assert files.is_remote(run) and files.absolute(run) == run
  cli.write_json_atomic(run + "/config.json", {"steps": 3})
  assert json.loads((bucket / "b/run/config.json").read_text()) == {"steps": 3}
  assert files.read_json(run + "/config.json") == {"steps": 3}
  plotting.save_grid(np.zeros((4, 8, 8, 1)), run + "/grid.png", nrow=2, title="t")
  assert (bucket / "b/run/grid.png").read_bytes()[:4] == b"\x89PNG"

  log = cli.MetricsLog(run + "/metrics.jsonl")  # object stores cannot append
  for step in (1, 2, 3):
    log.write({"step": step, "loss": 1.0 / step})
  assert [r["step"] for r in cli.MetricsLog.read(run + "/metrics.jsonl")] == [1, 2, 3]
  resumed = cli.MetricsLog(run + "/metrics.jsonl", keep_up_to_step=2)
  resumed.write({"step": 3, "loss": 0.5})
  rows = cli.MetricsLog.read(run + "/metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.5)]


def test_checkpoint_manifests_and_set_aside_on_a_bucket(bucket):
  ckpts = "gs://b/run/checkpoints"
  for step in (5, 6):
    for rel, data in (("default/a.bin", b"x" * 10), ("default/meta/b.json", b"{}")):
      with files.atomic_path(f"{ckpts}/{step}/{rel}") as tmp:
        with open(tmp, "wb") as f:
          f.write(data)
  checkpoints.write_manifest(f"{ckpts}/5")
  manifest = json.loads((bucket / "b/run/checkpoints/5/sha256.json").read_text())
  assert sorted(manifest) == ["default/a.bin", "default/meta/b.json"]
  assert checkpoints.verify_manifest(f"{ckpts}/5") is None
  (bucket / "b/run/checkpoints/5/default/a.bin").write_bytes(b"y" * 10)
  assert "differ" in checkpoints.verify_manifest(f"{ckpts}/5")
  # Step 6 has no manifest: it is moved aside, never used.
  assert checkpoints.set_aside_unhashed_steps(ckpts) == [6]
  assert files.listdir(ckpts) == ["5"]
  assert files.listdir("gs://b/run/checkpoints_unverified") == ["6"]


def test_remote_workdir_is_prepared_without_a_lock_and_urls_are_checked(bucket, capsys):
  cli.prepare_workdir("gs://b/other")
  assert "no locks" in capsys.readouterr().err
  assert (bucket / "b/other").is_dir()
  with pytest.raises(cli.UsageError, match="only local paths, gs:// and s3://"):
    cli.check_path("ftp://host/run", "--workdir")
  try:
    import gcsfs  # noqa: F401
  except ImportError:
    with pytest.raises(cli.UsageError, match="pip install gcsfs"):
      cli.check_path("gs://b/run", "--workdir")
  assert isinstance(epath.Path("gs://b/run"), epath.Path)
