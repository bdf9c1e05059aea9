"""End-to-end tests of `python -m experiments.mnist_vae` with the smoke preset."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax

import vae_jax as vj
from experiments import cli, mnist_vae
from experiments.checkpoints import Checkpointer


def run(workdir, *flags):
  mnist_vae.main(["--workdir", str(workdir), "--preset", "smoke", *flags])


def restore(workdir, sub="checkpoints"):
  vae = vj.make_vae("mlp", 2, 400)
  abstract = jax.eval_shape(lambda: vj.create_state(jax.random.key(0), vae, optax.adam(1e-3), 2))
  ck = Checkpointer(os.path.join(workdir, sub))
  state = ck.restore(abstract)
  ck.close()
  return state


def test_smoke_job_end_to_end_and_resumable(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  run(a, "--epochs", "2", "--latent_dim", "2")
  for name in [
    "config.json",
    "metrics.jsonl",
    "learning_curves.png",
    "samples.png",
    "reconstructions.png",
    "manifold.png",
    "latent_scatter.png",
    "final_eval.json",
  ]:
    assert os.path.getsize(a / name) > 0, name
  records = cli.MetricsLog.read(str(a / "metrics.jsonl"))
  assert [r["epoch"] for r in records] == [1, 2]
  for r in records:
    assert {"train_loss", "test_loss", "train_rec", "train_kl", "test_rec", "test_kl"} <= set(r)
    assert 80 < r["test_loss"] < 300
  result = json.loads((a / "final_eval.json").read_text())
  assert result["test_examples"] == 200 and result["iwae_k"] == 8
  # The IWAE bound is tighter than the ELBO (NLL estimate below -ELBO), by a sane margin.
  assert 0 < result["test_neg_elbo"] - result["test_nll_iwae"] < 20
  assert Checkpointer(str(a / "best")).latest_step() is not None

  # The same run, stopped after epoch 1 and resumed, ends identically.
  run(b, "--epochs", "2", "--latent_dim", "2", "--stop_after_epochs", "1")
  assert not (b / "final_eval.json").exists()
  run(b)  # resumes with the stored config (epochs 2, latent 2)
  sa, sb = restore(a), restore(b)
  jax.tree.map(np.testing.assert_array_equal, sa.params, sb.params)
  assert [r["epoch"] for r in cli.MetricsLog.read(str(b / "metrics.jsonl"))] == [1, 2]


def test_bad_values_and_conflicting_preset(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.getcwd())

  def job(*flags):
    return subprocess.run(
      [sys.executable, "-m", "experiments.mnist_vae", "--workdir", str(tmp_path / "w"), *flags],
      capture_output=True,
      text=True,
      env=env,
    )

  p = job("--latent_dim", "0")
  assert p.returncode == 2 and "--latent_dim must be >= 1, got 0" in p.stderr
  assert "Traceback" not in p.stderr
  # A workdir holding a smoke run refuses --preset better, naming the fields.
  smoke = {"epochs": 1, "batch_size": 500, "iwae_k": 8, "eval_examples": 200}
  cli.write_json_atomic(
    str(tmp_path / "w" / "config.json"),
    {**dataclasses.asdict(mnist_vae.Config()), "preset": "smoke", **smoke},
  )
  p = job("--preset", "better")
  assert p.returncode == 2 and "differs in" in p.stderr and "hidden" in p.stderr, p.stderr


def test_dynamic_binarization_reports_a_true_nll(tmp_path):
  run(tmp_path / "d", "--binarize", "dynamic")
  result = json.loads((tmp_path / "d" / "final_eval.json").read_text())
  assert result["binarize"] == "dynamic" and "binarized" in result["test_nll_iwae_is"]
  # Binary pixels are easier to code than the grey levels' cross-entropy: a lower bound.
  assert 60 < result["test_nll_iwae"] < 200 and result["test_nll_iwae"] < result["test_neg_elbo"]
  run(tmp_path / "g")
  grey = json.loads((tmp_path / "g" / "final_eval.json").read_text())
  assert grey["binarize"] == "none" and "not a normalised likelihood" in grey["test_nll_iwae_is"]
