"""The jobs' TensorBoard events, read back with TensorBoard's own reader."""

import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments import mnist_ddpm, mnist_vae


def read(logdir):
  acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
  acc.Reload()
  return acc


def test_ddpm_job_writes_scalars_and_sample_grids(tmp_path):
  mnist_ddpm.main(["--workdir", str(tmp_path), "--preset", "smoke"])
  acc = read(tmp_path / "tensorboard")
  tags = acc.Tags()
  assert {"loss", "grad_norm", "learning_rate", "images_per_sec"} <= set(tags["scalars"])
  assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6]
  assert "samples" in tags["images"]
  image = acc.Images("samples")[-1]
  assert image.step == 6 and image.width > 28 and len(image.encoded_image_string) > 100


def test_vae_job_writes_scalars_and_samples(tmp_path):
  mnist_vae.main(["--workdir", str(tmp_path), "--preset", "smoke"])
  acc = read(tmp_path / "tensorboard")
  assert {"train_loss", "test_loss", "epoch_seconds"} <= set(acc.Tags()["scalars"])
  assert "samples" in acc.Tags()["images"]
  assert os.listdir(tmp_path / "tensorboard")


def test_non_finite_samples_are_written_black_without_a_warning(tmp_path):
  import warnings

  import numpy as np

  from experiments.tensorboard_log import TensorBoardLog

  images = np.zeros((4, 8, 8, 1), np.float32)
  images[0] = np.nan  # a diverged run's samples
  log = TensorBoardLog(str(tmp_path))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    log.image("samples", images, 1, nrow=2)
  log.close()
  assert read(tmp_path / "tensorboard").Images("samples")[-1].step == 1


def test_pixel_scaling_maps_nan_to_black_without_a_warning():
  import warnings

  import numpy as np

  from nnbase import pixels

  x = np.array([np.nan, -1.0, 0.0, 1.0, 3.0], np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    np.testing.assert_array_equal(pixels.to_unit(x), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(pixels.to_uint8(x), [0, 0, 128, 255, 255])
