"""Train the seeds' MNIST VAE: `python -m experiments.mnist_vae --workdir W`.

Losses are per image in nats, summed over the 784 pixels, on continuous
[0, 1] MNIST with the Bernoulli (binary cross-entropy) likelihood, as in the
seed notebooks. Writes to the workdir: config.json, metrics.jsonl (one line
per epoch), checkpoints/ (latest) and best/ (best test loss), learning
curves, prior samples, reconstructions, for latent_dim 2 the manifold grid and
latent scatter, and final_eval.json with the importance-weighted NLL.
"""

from __future__ import annotations

from experiments import runtime

runtime.restart_main(__name__)  # huge pages: restart before the imports below (runtime.py)

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import vae_jax as vj
from experiments import cli, plotting
from experiments.checkpoints import Checkpointer, resume_or_init
from experiments.data import load_mnist
from experiments.runner import Action, Runner
from experiments.tensorboard_log import TensorBoardLog
from experiments.vae_setup import (  # noqa: F401  (re-exported for callers)
  PRESETS,
  TEST_BINARIZATION_SEED,
  Config,
  load_trained,
  make_optimizer,
  validate,
)


def save_pictures(c: Config, vae, params, test_images, test_labels, workdir, rng, step: int):
  enc, dec = vj.vae_fns(vae, params)
  samples = jax.jit(lambda r: vj.sample_prior(dec, r, 64, c.latent_dim))(rng)
  tb = TensorBoardLog(workdir, resumed_step=step)
  tb.image("samples", np.asarray(samples), step, 8, value_range=(0, 1))
  tb.close()
  plotting.save_grid(
    np.asarray(samples),
    os.path.join(workdir, "samples.png"),
    nrow=8,
    title="samples from the prior (Bernoulli means)",
    value_range=(0, 1),
  )
  x = vj.train.to_unit(test_images[:32])
  rec = jax.jit(lambda x: vj.reconstruct(enc, dec, x))(x)
  rows = np.concatenate(
    [np.asarray(x[:16]), np.asarray(rec[:16]), np.asarray(x[16:]), np.asarray(rec[16:])]
  )
  plotting.save_grid(
    rows,
    os.path.join(workdir, "reconstructions.png"),
    nrow=16,
    title="test images (rows 1, 3) and reconstructions (rows 2, 4)",
    value_range=(0, 1),
  )
  if c.latent_dim == 2:
    from scipy.stats import norm

    g = norm.ppf(np.linspace(0.05, 0.95, 20))
    # Row i has the i-th largest z_2 so the plot reads like a map (seed 003).
    coords = np.array([[gx, gy] for gy in g[::-1] for gx in g], np.float32)
    imgs = jax.jit(lambda z: vj.decode_grid(dec, z))(jnp.asarray(coords))
    plotting.save_grid(
      np.asarray(imgs),
      os.path.join(workdir, "manifold.png"),
      nrow=20,
      title="decoded latent grid, norm.ppf(linspace(0.05, 0.95, 20))",
      value_range=(0, 1),
    )
    means = np.asarray(jax.jit(lambda x: enc(x)[0])(vj.train.to_unit(test_images)))
    plotting.save_scatter(
      means,
      np.asarray(test_labels),
      os.path.join(workdir, "latent_scatter.png"),
      title="test-set latent means by digit",
    )


def train_and_evaluate(c: Config, preset: str, workdir: str, stop_after_epochs=None) -> dict:
  validate(c)
  cli.prepare_workdir(workdir)
  mnist = load_mnist()
  print(
    f"MNIST: {mnist.train_images.shape[0]} train, {mnist.test_images.shape[0]} test images "
    f"from {mnist.source}",
    file=sys.stderr,
  )
  train_images = jax.device_put(mnist.train_images)
  test_images = jax.device_put(mnist.test_images)
  if c.binarize == "dynamic":  # one fixed draw, the same for every run and seed
    test_images = vj.train.binarize_u8(jax.random.key(TEST_BINARIZATION_SEED), test_images)
  steps_per_epoch = train_images.shape[0] // c.batch_size

  vae = vj.make_vae(c.model, c.latent_dim, c.hidden, c.num_hidden_layers)
  tx = make_optimizer(c, steps_per_epoch)
  init_rng, train_rng, eval_rng, pic_rng = jax.random.split(jax.random.key(c.seed), 4)
  init = functools.partial(vj.create_state, init_rng, vae, tx, c.latent_dim)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), set_aside_unverified=True)
  best = Checkpointer(
    os.path.join(workdir, "best"), max_to_keep=1, best_metric="test_loss", best_mode="min"
  )
  state, latest = resume_or_init(
    ckpt, init, c, preset, workdir, c.epochs * steps_per_epoch, "--epochs"
  )
  epoch = int(state.step) // steps_per_epoch
  if latest is not None:
    print(f"resumed after epoch {epoch}", file=sys.stderr)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"VAE {c.model}: {n_params:,} parameters, latent {c.latent_dim}", file=sys.stderr)

  train_epoch = jax.jit(
    vj.make_train_epoch(
      vae,
      tx,
      base_rng=train_rng,
      batch_size=c.batch_size,
      beta=c.beta,
      likelihood=c.likelihood,
      skip_nonfinite=c.skip_nonfinite,
      binarization=c.binarize,
    ),
    donate_argnums=(0,),
  )
  evaluate = jax.jit(vj.make_evaluate(vae, likelihood=c.likelihood))
  resumed = int(state.step) if latest is not None else None
  metrics = cli.MetricsLog(os.path.join(workdir, "metrics.jsonl"), keep_up_to_step=resumed)
  tb = TensorBoardLog(workdir, resumed_step=resumed)
  last = {}  # the newest epoch's train metrics (device), time and test loss

  def train_unit(epoch):
    """Runs epoch `epoch + 1`; returns its number of non-finite steps (a
    non-finite mean loss counts as at least one)."""
    nonlocal state
    t0 = time.perf_counter()
    state, m = train_epoch(state, train_images, epoch)
    m = jax.device_get(m)
    last.update(train=m, seconds=time.perf_counter() - t0)
    return max(int(m["nonfinite_steps"]), 0 if np.isfinite(m["loss"]) else 1)

  def log(epoch):
    m, epoch_s = {k: float(v) for k, v in last["train"].items()}, last["seconds"]
    # Fixed evaluation key: comparable across epochs and runs.
    tm = {k: float(v) for k, v in evaluate(state.params, test_images, eval_rng).items()}
    last["test_loss"] = tm["loss"]
    record = {
      "epoch": epoch,
      "step": int(state.step),
      "train_loss": m["loss"],
      "train_rec": m["rec"],
      "train_kl": m["kl"],
      "test_loss": tm["loss"],
      "test_rec": tm["rec"],
      "test_kl": tm["kl"],
      "epoch_seconds": epoch_s,
      "skipped_steps": int(m["nonfinite_steps"]),
      "time": time.time(),
    }
    metrics.write(record)
    tb.scalars(int(state.step), record)
    runner.pbar.set_postfix(train=f"{m['loss']:.2f}", test=f"{tm['loss']:.2f}", s=f"{epoch_s:.1f}")
    tqdm.write(
      f"epoch {epoch:3d}  train {m['loss']:.2f} (rec {m['rec']:.2f} kl {m['kl']:.2f})"
      f"  test {tm['loss']:.2f}  {epoch_s:.1f}s"
      + (f"  skipped {int(m['nonfinite_steps'])} steps" if m["nonfinite_steps"] else ""),
      file=sys.stderr,
    )

  def save(epoch):
    host_state = jax.device_get(state)
    ckpt.save(int(host_state.step), host_state)
    if "test_loss" in last:  # not on a SIGTERM before the epoch's evaluation
      best.save(int(host_state.step), host_state, metrics={"test_loss": last["test_loss"]})

  # SIGTERM: finish the epoch, checkpoint, leave.
  runner = Runner(
    position=epoch,
    total=c.epochs,
    unit="epoch",
    save=save,
    checkpoint_every=1,
    actions=[Action(1, log)],
    stop_after=stop_after_epochs,
    skip_nonfinite=c.skip_nonfinite,
    last_saved=epoch if latest is not None else None,
    on_close=[tb.close, ckpt.close, best.close],
  )
  with runner:
    if not runner.run(train_unit):
      return {}
  runner.close()
  epoch = runner.position

  history = cli.MetricsLog.read(
    os.path.join(workdir, "metrics.jsonl"),
    required=("epoch", "train_loss", "test_loss", "epoch_seconds"),
  )
  ep = [r["epoch"] for r in history]
  plotting.save_curves(
    {
      "train": (ep, [r["train_loss"] for r in history]),
      "test": (ep, [r["test_loss"] for r in history]),
    },
    os.path.join(workdir, "learning_curves.png"),
    xlabel="epoch",
    ylabel="negative ELBO (nats / image)",
    title="VAE learning curves",
  )
  save_pictures(
    c, vae, state.params, test_images, mnist.test_labels, workdir, pic_rng, int(state.step)
  )

  return final_evaluation(c, vae, state.params, test_images, eval_rng, history, workdir, epoch)


def final_evaluation(c: Config, vae, params, test_images, eval_rng, history, workdir, epoch):
  """The importance-weighted NLL and the ELBO on the test images -> final_eval.json."""
  evaluate = jax.jit(vj.make_evaluate(vae, likelihood=c.likelihood))
  n = c.eval_examples
  t0 = time.perf_counter()
  iwae_nll = jax.jit(vj.make_iwae_nll(vae, k=c.iwae_k, likelihood=c.likelihood))
  nll = np.asarray(iwae_nll(params, test_images[:n], jax.random.fold_in(eval_rng, 1)))
  elbo = evaluate(params, test_images[:n], eval_rng)
  result = {
    "epochs": epoch,
    "test_examples": int(nll.size),
    "iwae_k": c.iwae_k,
    "test_nll_iwae": float(nll.mean()),
    "test_nll_iwae_is": (
      "an importance-weighted upper bound on the negative log-likelihood of the binarized "
      "test images (nats)"
      if c.binarize == "dynamic"
      else "an importance-weighted bound on the Bernoulli cross-entropy of grey-level pixels "
      "(nats); not a normalised likelihood, so not comparable with binarized-MNIST NLLs"
    ),
    "binarize": c.binarize,
    "test_nll_iwae_stderr": float(nll.std(ddof=1) / np.sqrt(nll.size)) if nll.size > 1 else None,
    "test_neg_elbo": float(elbo["loss"]),
    "final_test_loss": history[-1]["test_loss"],
    "best_test_loss": min(r["test_loss"] for r in history),
    "mean_epoch_seconds": float(
      np.mean([r["epoch_seconds"] for r in history[1:]] or [history[0]["epoch_seconds"]])
    ),
    "iwae_seconds": time.perf_counter() - t0,
  }
  cli.write_json_atomic(os.path.join(workdir, "final_eval.json"), result)
  print(
    f"test on {result['test_examples']} images: -ELBO {result['test_neg_elbo']:.2f} nats, "
    f"IWAE (k={c.iwae_k}) {'NLL' if c.binarize == 'dynamic' else 'cross-entropy bound'} "
    f"{result['test_nll_iwae']:.2f} "
    f"+- {result['test_nll_iwae_stderr'] or 0:.2f} nats; written to final_eval.json",
    file=sys.stderr,
  )
  return result


def main(argv=None) -> None:
  args = cli.resolve_config(Config, PRESETS, argv, description=__doc__, stop_unit="epochs")
  try:
    train_and_evaluate(args.config, args.preset, args.workdir, args.stop_after)
  finally:
    cli.unlock_workdir(args.workdir)


if __name__ == "__main__":
  cli.exit_main(main)
