"""Datasets beyond MNIST: any TFDS image dataset through `tfds.data_source`,
faked here with `tfds.testing.mock_data` (an RGB 32x32 dataset, cifar10's
features)."""

import os

import jax
import matplotlib.image
import numpy as np
import pytest
import tensorflow_datasets as tfds

import ddpm_jax as dj
from experiments import cli, data, evaluate, host_pipeline, mnist_ddpm
from experiments.checkpoints import Checkpointer

FLAGS = ["--preset", "smoke", "--dataset", "cifar10", "--conditional", "true"]


@pytest.fixture
def fake_cifar10():
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _state(workdir, step: int):
  model = dj.make_model("test", num_classes=10)
  tx = dj.make_optimizer(1e-3, 6, warmup_steps=2)
  abstract = jax.eval_shape(
    lambda: dj.create_train_state(jax.random.key(0), model, tx, (32, 32, 3))
  )
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return ckpt.restore(abstract, step)
  finally:
    ckpt.close()


def test_reads_an_rgb_dataset(fake_cifar10):
  d = data.load_train_images("cifar10")
  assert d.train_images.shape == (64, 32, 32, 3) and d.train_images.dtype == np.uint8
  assert d.num_classes == 10 and d.train_labels.shape == (64,) and d.train_labels.max() < 10


def test_rgb_dataset_trains_draws_in_colour_and_resumes_exactly(fake_cifar10, tmp_path, capsys):
  """On the device path whole; read on the host, stopped after 3 steps and
  resumed: the same parameters, bit for bit."""
  whole, split = tmp_path / "whole", tmp_path / "split"
  mnist_ddpm.main(["--workdir", str(whole), *FLAGS, "--data_pipeline", "device"])
  host = [*FLAGS, "--data_pipeline", "host"]
  mnist_ddpm.main(["--workdir", str(split), *host, "--stop_after_steps", "3"])
  mnist_ddpm.main(["--workdir", str(split), *host])
  assert "batches read on the host" in capsys.readouterr().err
  a, b = _state(whole, 6), _state(split, 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  grid = matplotlib.image.imread(str(whole / "samples_final.png"))[..., :3]
  assert np.abs(grid[..., 0] - grid[..., 1]).max() > 0.1  # colour, not grey
  # FD-MNIST and the MNIST classifier do not apply: evaluate says so.
  with pytest.raises(cli.UsageError, match="MNIST runs only"):
    evaluate.main(["--workdir", str(whole), "--num_samples", "10"])


def test_missing_dataset_is_one_clear_error(tmp_path):
  with pytest.raises(data.DataError, match="cannot be read from the TFDS data dir"):
    data.load_train_images("cifar10", data_dir=str(tmp_path))
  code = cli.run_main(
    mnist_ddpm.main,
    ["--workdir", str(tmp_path / "w"), *FLAGS, "--data_dir", str(tmp_path)],
  )
  assert code == cli.EXIT_USAGE


def test_host_batches_follow_the_epoch_permutation_and_split_by_process():
  images = np.arange(20 * 2 * 2 * 1, dtype=np.uint8).reshape(20, 2, 2, 1)
  labels = np.arange(20, dtype=np.int32) % 10
  reads = []

  def read(idx):
    reads.append(list(idx))
    return images[idx], labels[idx]

  source = data.ImageSource(read, 20, (2, 2, 1), 10, "test")
  perm = lambda epoch: np.roll(np.arange(20), 3 + epoch)  # any permutation per epoch
  mesh = dj.parallel.make_mesh(jax.devices()[:1])
  hb = host_pipeline.HostBatches(source, 8, perm, mesh, ahead=1)
  try:
    for step in (0, 1, 2, 3):  # 2 steps per epoch; step 2 starts epoch 1
      x, y = hb.get(step)
      i, want = step % 2, perm(step // 2)
      np.testing.assert_array_equal(np.asarray(x), images[want[i * 8 : (i + 1) * 8]])
      np.testing.assert_array_equal(np.asarray(y), labels[want[i * 8 : (i + 1) * 8]])
    assert sorted(hb._pending) == [4]  # one batch read ahead
    hb._pending[4].result()
    assert len(reads) == 5  # steps 0-3 and step 4, each read once
    # Two processes: each reads its half of every global batch, in order.
    halves = []
    for pid in range(2):
      hb.rows = dj.parallel.process_rows(8, pid, 2)
      halves.append(hb.local_rows(5))
    np.testing.assert_array_equal(np.concatenate(halves), perm(2)[8:16])
  finally:
    hb.close()
  with pytest.raises(RuntimeError, match="closed"):
    hb.get(4)
  assert host_pipeline.choose_pipeline("auto", source) == "device"
