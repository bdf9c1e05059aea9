"""The shipped pretrained MNIST model and `python -m experiments.sample`."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax as dj
from experiments import sample
from sample_quality import classifier as clf


def classify(images_u8):
  probs = jax.nn.softmax(
    clf.make_apply()(clf.load_params(), jnp.asarray(images_u8, jnp.float32) / 255.0)[0]
  )
  return np.asarray(probs)


def test_pretrained_loads_and_draws_the_asked_digit():
  m = dj.load_pretrained("mnist")
  assert m.num_classes == 10 and m.image_shape == (28, 28, 1)
  assert m.record["sha256"] == dj.pretrained.REGISTRY["mnist"][1]
  labels = np.arange(100) % 10
  eps_fn = m.eps_fn(labels=labels, guidance_scale=m.record["best_guidance_scale"])
  x = jax.jit(
    lambda r: dj.sample(eps_fn, m.schedule, r, (100, 28, 28, 1), "dpm", 10, clip_x0=True)
  )(jax.random.key(0))
  u8 = np.rint(np.clip((np.asarray(x) + 1) / 2, 0, 1) * 255).astype(np.uint8)
  acc = np.mean(classify(u8).argmax(1) == labels)
  assert acc >= 0.9, acc


def test_pretrained_hash_is_checked(tmp_path):
  name, _ = dj.pretrained.REGISTRY["mnist"]
  path = tmp_path / name
  shutil.copy(os.path.join(dj.pretrained.WEIGHTS_DIR, name), path)
  tampered = dict(np.load(path))
  key = sorted(tampered)[0]
  tampered[key] = tampered[key] * 1.001
  np.savez_compressed(path, **tampered)
  with pytest.raises(dj.param_files.WeightsError, match="sha256"):
    dj.load_pretrained("mnist", path=str(path))
  (tmp_path / "bad.npz").write_bytes(b"PK not a zip")
  with pytest.raises(dj.param_files.WeightsError, match="cannot read"):
    dj.load_pretrained("mnist", path=str(tmp_path / "bad.npz"))
  with pytest.raises(ValueError, match="unknown pretrained model"):
    dj.load_pretrained("cifar")


def test_sample_job_writes_images_labels_and_grid(tmp_path):
  out = tmp_path / "s"
  sample.main(
    [
      "--pretrained",
      "mnist",
      "--num_samples",
      "12",
      "--digits",
      "3,7",
      "--steps",
      "6",
      "--batch_size",
      "8",
      "--out",
      str(out),
    ]
  )
  with np.load(out / "samples.npz", allow_pickle=False) as z:
    images, labels = z["images"], z["labels"]
  assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [3, 7] * 6)
  assert (out / "grid.png").stat().st_size > 1000
  sample.main(
    [
      "--pretrained",
      "mnist",
      "--num_samples",
      "4",
      "--steps",
      "3",
      "--sampler",
      "ddim",
      "--out",
      str(out),
    ]
  )
  with np.load(out / "samples.npz", allow_pickle=False) as z:
    np.testing.assert_array_equal(z["labels"], [-1] * 4)


@pytest.mark.parametrize(
  "args,match",
  [
    (["--digits", "3,12"], "--digits must lie in 0..9"),
    (["--digits", "a"], "comma-separated integers"),
    (["--steps", "0"], "--steps must lie in"),
    (["--num_samples", "0"], "--num_samples"),
    (["--guidance_scale", "-1"], "--guidance_scale"),
    (["--sampler", "euler"], "invalid choice"),
  ],
)
def test_sample_job_bad_flags_one_line_exit_2(tmp_path, args, match):
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.sample",
      "--pretrained",
      "mnist",
      "--out",
      str(tmp_path / "o"),
    ]
    + args,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 2, r.stderr
  lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and match in lines[0], r.stderr
  assert not (tmp_path / "o").exists()


def test_evaluate_scores_the_pretrained_model(tmp_path):
  from experiments import evaluate

  evaluate.main(
    [
      "--pretrained",
      "mnist",
      "--out",
      str(tmp_path),
      "--skip_main",
      "--guidance",
      "2",
      "--sampler",
      "dpm",
      "--steps",
      "5",
      "--num_samples",
      "20",
    ]
  )
  rec = json.loads((tmp_path / "guidance_n20.json").read_text())
  (row,) = rec["rows"]
  assert row["guidance_scale"] == 2 and row["accuracy"] >= 0.8 and 0 <= row["readable"] <= 1
