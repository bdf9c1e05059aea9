"""The packaged MNIST feature network and `python -m experiments.evaluate`."""

import dataclasses
import json
import os

import numpy as np
import pytest

from experiments import evaluate, mnist_ddpm, mnist_vae
from experiments.data import load_mnist
from sample_quality import classifier as clf


@pytest.fixture(scope="module")
def mnist():
  return load_mnist()


def test_packaged_classifier_accuracy_on_test_slice(mnist):
  net = evaluate.FeatureNet()
  feats, probs = net.embed(mnist.test_images[:2000])
  assert feats.shape == (2000, clf.FEATURE_DIM) and np.all(feats >= 0)
  acc = np.mean(probs.argmax(1) == mnist.test_labels[:2000])
  assert acc >= 0.99, acc


def test_weights_hash_is_checked(tmp_path):
  params = clf.load_params()
  path = str(tmp_path / "w.npz")
  digest = clf.save_params(params, path)
  assert digest == clf.WEIGHTS_SHA256
  tampered = dict(np.load(path))
  key = sorted(tampered)[0]
  tampered[key] = tampered[key] + 1e-3
  np.savez(path, **tampered)
  with pytest.raises(clf.WeightsError, match="sha256"):
    clf.load_params(path)
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  with pytest.raises(clf.WeightsError, match="cannot read"):
    clf.load_params(str(tmp_path / "bad.npz"))


def test_baselines_order_floor_below_ceilings(mnist):
  net = evaluate.FeatureNet()
  ref = evaluate.reference_set(net, mnist.test_images)
  sets = evaluate.baselines(mnist.train_images, 500)
  fd = {k: evaluate.evaluate_images(net, ref, v)["fd"] for k, v in sets.items()}
  floor = fd["floor: real train images"]
  assert (
    floor < 0.2 * fd["ceiling: uniform noise"] and floor < 0.2 * fd["ceiling: blurred mean image"]
  )


def test_evaluate_ddpm_and_vae_runs(tmp_path, capsys):
  """A class-conditional smoke DDPM: each digit in turn at the run's guidance
  scale, the sweep (then one sampler rerun, merged), the bound in bits/dim and
  guidance."""
  ddpm_dir, vae_dir = tmp_path / "ddpm", tmp_path / "vae"
  mnist_ddpm.main(
    [
      "--workdir",
      str(ddpm_dir),
      "--preset",
      "smoke",
      "--conditional",
      "true",
      "--samples_per_class",
      "1",
    ]
  )
  evaluate.main(
    [
      "--workdir",
      str(ddpm_dir),
      "--num_samples",
      "20",
      "--batch_size",
      "10",
      "--sweep",
      "3",
      "--sweep_num_samples",
      "12",
      "--sweep_samplers",
      "ddpm,ddim",
      "--vlb",
      "--vlb_num_images",
      "3",
      "--guidance",
      "2",
    ]
  )
  out = capsys.readouterr().out
  assert "FD-MNIST" in out and "floor: real train images" in out
  rec = json.loads((ddpm_dir / "eval" / "ddim_10steps_n20.json").read_text())
  name = "DDPM test (ddim, 10 steps, guidance 3, each digit in turn)"
  res = rec["results"][name]
  assert res["num_samples"] == 20 and res["num_reference"] == 10000
  assert sum(res["class_counts"]) == 20 and np.isfinite(res["fd"])
  assert res["guidance_scale"] == 3 and len(res["per_class_accuracy"]) == 10
  assert set(rec["results"]) == {
    name,
    "floor: real train images",
    "ceiling: uniform noise",
    "ceiling: blurred mean image",
  }
  evaluate.main(
    [
      "--workdir",
      str(ddpm_dir),
      "--skip_main",
      "--sweep",
      "3",
      "--sweep_num_samples",
      "12",
      "--sweep_samplers",
      "dpm",
      "--batch_size",
      "12",
    ]
  )
  sweep = json.loads((ddpm_dir / "eval" / "steps_sweep_n12.json").read_text())
  assert [(r["sampler"], r["steps"]) for r in sweep["sweep"]] == [
    ("ddpm", 3),
    ("ddim", 3),
    ("dpm", 3),
  ]
  assert all(r["seconds_per_image"] > 0 for r in sweep["sweep"])
  assert os.path.getsize(ddpm_dir / "eval" / "steps_sweep_n12.png") > 0
  vlb = json.loads((ddpm_dir / "eval" / "vlb_n3.json").read_text())
  assert vlb["num_images"] == 3 and len(vlb["per_t_bits_per_dim"]) == 100
  # The bound is its terms' sum and is positive (a discrete likelihood is <= 1).
  assert vlb["bits_per_dim"] == pytest.approx(
    vlb["prior_bits_per_dim"] + sum(vlb["per_t_bits_per_dim"]), rel=1e-6
  )
  assert 0 < vlb["bits_per_dim"] < 100
  guided = json.loads((ddpm_dir / "eval" / "guidance_n20.json").read_text())
  assert [r["guidance_scale"] for r in guided["rows"]] == [2.0]
  for r in guided["rows"]:
    assert r["num_samples"] == 20 and len(r["per_class_accuracy"]) == 10
    assert r["accuracy"] == pytest.approx(np.mean(r["per_class_accuracy"]))
  assert os.path.getsize(ddpm_dir / "eval" / "guidance_n20.png") > 0

  mnist_vae.main(["--workdir", str(vae_dir), "--preset", "smoke", "--latent_dim", "2"])
  evaluate.main(["--workdir", str(vae_dir), "--num_samples", "30"])
  rec = json.loads((vae_dir / "eval" / "vae_prior_n30.json").read_text())
  assert (
    rec["run"] == "vae"
    and rec["results"]["VAE prior samples (Bernoulli means)"]["num_samples"] == 30
  )


@pytest.mark.parametrize(
  "flags,match",
  [
    (["--steps", "101"], "exceeds the run's T = 100"),
    (["--sweep", "2,x"], "comma-separated integers"),
    (["--num_samples", "5"], "--num_samples must be >= 10"),
    (["--eta", "2"], "eta must lie in"),
    (["--guidance", "1"], "needs a class-conditional run"),
    (["--guidance", "1,-2"], "--guidance values must be >= 0"),
    (["--skip_main"], "needs --sweep, --vlb or --guidance"),
    (["--sweep", "2", "--sweep_samplers", "euler"], "unknown sampler 'euler'"),
  ],
)
def test_evaluate_bad_flags(tmp_path, flags, match):
  config = dict(dataclasses.asdict(mnist_ddpm.Config()), preset="smoke", timesteps=100)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(evaluate.cli.UsageError, match=match):
    evaluate.main(["--workdir", str(tmp_path), *flags])


def test_evaluate_refuses_non_run_dir(tmp_path):
  with pytest.raises(evaluate.cli.UsageError, match="not a workdir"):
    evaluate.main(["--workdir", str(tmp_path)])
