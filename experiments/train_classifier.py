"""Train the MNIST feature network shipped in `sample_quality/weights/`.

  python -m experiments.train_classifier            # writes the packaged weights
  python -m experiments.train_classifier --output /tmp/cnn.npz

Fixed seed; AdamW with a cosine schedule, random +-2 pixel shifts; each epoch
is one compiled `lax.scan`. Prints the test accuracy and the weights' sha256
(paste it into `sample_quality/classifier.py::WEIGHTS_SHA256` when replacing
the packaged weights) and writes a JSON record beside the weights.
"""

from __future__ import annotations

from experiments import runtime

runtime.restart_main(__name__)  # huge pages: restart before the imports below (runtime.py)

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from experiments import cli
from experiments.data import load_mnist
from experiments.files import atomic_path
from nnbase import pixels
from sample_quality import classifier as clf


def shift_batch(rng, images_u8, max_shift: int):
  """Random translations by up to `max_shift` pixels (zero fill): uint8 [B, 28, 28, 1]."""
  b, h, w, _ = images_u8.shape
  padded = jnp.pad(images_u8, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
  offs = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda x, o: jax.lax.dynamic_slice(x, (o[0], o[1], 0), (h, w, x.shape[-1]))
  return jax.vmap(crop)(padded, offs)


def accuracy(apply, params, images_u8, labels) -> float:
  logits, _ = apply(params, pixels.u8_to_unit(images_u8))
  return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))


def train(
  epochs: int, batch_size: int, learning_rate: float, seed: int, max_shift: int, mnist=None
):
  """Returns (params, test_accuracy, seconds)."""
  mnist = mnist or load_mnist()
  model = clf.MNISTClassifier()
  images = jax.device_put(mnist.train_images)
  labels = jax.device_put(mnist.train_labels.astype(np.int32))
  n = images.shape[0]
  steps_per_epoch = n // batch_size
  total = epochs * steps_per_epoch
  tx = optax.adamw(
    optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(200, total // 10), total),
    weight_decay=1e-4,
  )
  init_rng, train_rng, data_rng = jax.random.split(jax.random.key(seed), 3)
  params = model.init(init_rng, jnp.zeros((1, 28, 28, 1)))["params"]
  opt_state = tx.init(params)

  def step(carry, idx):
    params, opt_state, i = carry
    rng = jax.random.fold_in(train_rng, i)
    shift_rng, drop_rng = jax.random.split(rng)
    x = pixels.u8_to_unit(shift_batch(shift_rng, jnp.take(images, idx, axis=0), max_shift))
    y = jnp.take(labels, idx)

    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": drop_rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, i + 1), loss

  @jax.jit
  def epoch_fn(params, opt_state, epoch):
    perm = jax.random.permutation(jax.random.fold_in(data_rng, epoch), n)
    idx = perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
    (params, opt_state, _), losses = jax.lax.scan(
      step, (params, opt_state, epoch * steps_per_epoch), idx
    )
    return params, opt_state, losses.mean()

  apply = clf.make_apply(model)
  t0 = time.perf_counter()
  for epoch in tqdm(range(epochs), desc="classifier", unit="epoch", file=sys.stderr):
    params, opt_state, loss = epoch_fn(params, opt_state, epoch)
    acc = accuracy(apply, params, mnist.test_images, mnist.test_labels)
    tqdm.write(
      f"epoch {epoch + 1}: train loss {float(loss):.4f}, test accuracy {acc:.4f}", file=sys.stderr
    )
  return params, acc, time.perf_counter() - t0


def main(argv=None) -> None:
  p = cli._Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--output", default=clf.WEIGHTS_PATH, help="npz to write")
  p.add_argument("--epochs", type=int, default=6)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--learning_rate", type=float, default=2e-3)
  p.add_argument("--max_shift", type=int, default=2, help="augmentation shift in pixels")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  if a.epochs < 1 or a.batch_size < 1 or a.learning_rate <= 0 or a.max_shift < 0:
    raise cli.UsageError(
      "--epochs and --batch_size must be >= 1, --learning_rate > 0, --max_shift >= 0"
    )
  output = os.path.abspath(a.output)
  cli.prepare_output_dir(os.path.dirname(output))  # fail now, not after the training
  params, acc, secs = train(a.epochs, a.batch_size, a.learning_rate, a.seed, a.max_shift)
  with atomic_path(output, ".npz.tmp") as tmp:
    digest = clf.save_params(jax.device_get(params), tmp)
  record = {
    "test_accuracy": acc,
    "sha256": digest,
    "seconds": round(secs, 1),
    "epochs": a.epochs,
    "batch_size": a.batch_size,
    "learning_rate": a.learning_rate,
    "max_shift": a.max_shift,
    "seed": a.seed,
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
  }
  cli.write_json_atomic(os.path.splitext(output)[0] + ".json", record)
  print(json.dumps(record, indent=2))
  if digest != clf.WEIGHTS_SHA256 and output == os.path.abspath(clf.WEIGHTS_PATH):
    print(f"note: set WEIGHTS_SHA256 = {digest!r} in sample_quality/classifier.py", file=sys.stderr)


if __name__ == "__main__":
  cli.exit_main(main)
