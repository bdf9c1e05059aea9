"""Data parallelism with `jax.jit`, a device `Mesh` and `NamedSharding`.

The global batch is split over the mesh's "data" axis; parameters, optimizer
and EMA state are replicated, and XLA inserts the gradient all-reduce. This
is the jit-era replacement for `pmap` and scales from one CPU to a TPU pod.

Randomness: the train step and the samplers draw t, noise and dropout masks
for the *global* batch from one key inside the jitted function. With
`jax_threefry_partitionable` (JAX's default since 0.5) each device computes
only its own slice of those random arrays, no two devices share noise, and
the values do not depend on the number of devices, so a run is reproducible
across device counts (tests check 1 vs 4 devices).

Multi-host: every process runs the same program; `global_batch` assembles the
global array from the rows each process loaded (`process_rows` says which).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnbase import tuning
from nnbase.conv import BATCH_AXIS as DATA_AXIS  # the axis the fast convolutions split
from nnbase.param_files import arrays_sha256


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices, every host) named "data"."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the devices."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch splits evenly over the devices."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(
      f"batch size {batch_size} is not divisible by the {n} devices of the "
      f"mesh; use a multiple of {n}"
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (e.g. the train state) on every device of the mesh.

  With several processes every process must pass the same values. That is
  checked once for the whole tree, by one all-gather of a digest of every
  leaf's dtype, shape and bytes (a ValueError if they differ).
  `jax.device_put` would check each leaf with its own all-gather, and for a
  process whose compilation-cache keys differ from process 0's (CPU
  processes) compile a program for each.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  leaves, treedef = jax.tree.flatten(tree)
  out, host = [], []
  for x in leaves:
    if isinstance(x, jax.Array) and (
      not x.is_fully_addressable or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    ):
      out.append(jax.device_put(x, sharding))  # already global, or a typed PRNG key
      continue
    x = np.asarray(x)
    host.append(x)
    out.append(jax.make_array_from_callback(x.shape, sharding, lambda idx, x=x: x[idx]))
  _check_same_on_every_process(host)
  return treedef.unflatten(out)


def _check_same_on_every_process(arrays: Sequence[np.ndarray]) -> None:
  """Raises ValueError unless every process holds the same arrays (compared by
  their `arrays_sha256`, in one all-gather)."""
  from jax.experimental import multihost_utils

  mine = np.frombuffer(bytes.fromhex(arrays_sha256(arrays)), np.uint32)
  every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 8]
  if not (every == mine).all():
    differ = [i for i in range(every.shape[0]) if not (every[i] == every[0]).all()]
    raise ValueError(
      f"replicate: processes {differ} hold other values than process 0; every process "
      "must pass the same tree (same seed, same checkpoint)"
    )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Splits a host batch [B, ...] (the same on every process) over the mesh."""
  check_batch(batch.shape[0], mesh)
  return jax.device_put(batch, data_sharding(mesh))


def process_rows(
  global_batch_size: int, process_index: Optional[int] = None, process_count: Optional[int] = None
) -> slice:
  """The rows of a global batch that process `process_index` loads."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch_size % pc:
    raise ValueError(f"batch size {global_batch_size} is not divisible by {pc} processes")
  per = global_batch_size // pc
  return slice(pi * per, (pi + 1) * per)


def global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """The global batch array from each process's rows (`process_rows`)."""
  return jax.make_array_from_process_local_data(data_sharding(mesh), local_batch)


def in_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` traced with `mesh` as the context mesh (for use inside `jax.jit`).

  The fast CPU convolutions (`nnbase.conv`) read it: under a mesh whose
  "data" axis splits the batch, each device runs its own rows' chunked GEMMs
  (a `shard_map`) instead of XLA gathering the batch for them. Every
  function below wraps its argument with it; wrap your own jitted function
  the same way when its batch is split over `data_sharding(mesh)`.
  """

  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def parallel_train_step(train_step: Callable, mesh: Mesh, donate: bool = True) -> Callable:
  """jit(train_step) with a replicated state and a batch split over "data".

  `train_step(state, batch) -> (state, metrics)` is the single-device step
  from `make_train_step`, unchanged: its means over the global batch become
  all-reduces.
  """
  rep, data = replicated(mesh), data_sharding(mesh)
  return jax.jit(
    in_mesh(train_step, mesh),
    in_shardings=(rep, data),
    out_shardings=(rep, rep),
    donate_argnums=(0,) if donate else (),
  )


def sharded_eps_fn(eps_fn: Callable, mesh: Mesh) -> Callable:
  """Wraps `eps_fn(x_t, t)` so x_t and t are split over "data" inside any
  sampler's scan: each device denoises its own slice of the batch."""
  data = data_sharding(mesh)
  constrain = lambda a: jax.lax.with_sharding_constraint(a, data)
  inner = in_mesh(eps_fn, mesh)

  def sharded(x_t, t):
    check_batch(x_t.shape[0], mesh)  # one line, at trace time, before XLA's IndivisibleError
    return constrain(inner(constrain(x_t), constrain(t)))

  return sharded


def jit_inference(fn: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fn, **jit_kwargs)` for a forward-only program (a sampler, a
  forward pass), compiled with `nnbase.tuning.inference_compiler_options()`:
  on CPU without XLA's YNNPACK fusions (forward 1.07x, sampling 1.05x on a
  2-core Xeon); training steps keep XLA's defaults."""
  return jax.jit(fn, compiler_options=tuning.inference_compiler_options(), **jit_kwargs)


def parallel_sampler(sample_fn: Callable, mesh: Mesh) -> Callable:
  """jit(sample_fn) with replicated inputs and the samples split over "data".

  `sample_fn(params, rng) -> images [B, ...]` is written as for one device,
  with its eps_fn wrapped by `sharded_eps_fn`; B must be divisible by the
  number of devices.
  """
  rep, data = replicated(mesh), data_sharding(mesh)
  return jit_inference(in_mesh(sample_fn, mesh), in_shardings=(rep, rep), out_shardings=data)
