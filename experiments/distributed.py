"""Multi-process runs (one process per host, as on TPU VM pods): the jobs' flags,
`jax.distributed.initialize`, and the few rules the jobs follow.

* Every process runs the same program on the global device mesh; arrays are
  global (`jax.Array` over all processes' devices).
* Only process 0 writes files (`is_writer`): config.json, metrics.jsonl,
  TensorBoard events, pictures, evaluation JSON, checkpoint manifests. Every
  process takes part in Orbax saves and restores, as Orbax requires.
* A stop request (SIGTERM) seen by any process is shared by `any_process` at
  fixed positions, so all stop at the same step.
* A dead peer: the coordination service's heartbeat (`HEARTBEAT_SECONDS`)
  ends the survivors with an error instead of a hang in a collective.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import numpy as np

from experiments.errors import UsageError

HEARTBEAT_SECONDS = 30  # a peer silent this long is declared dead; survivors stop
INIT_TIMEOUT_SECONDS = 120  # waiting for every process to join


def add_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("multi-process runs (one process per host)")
  g.add_argument(
    "--distributed",
    choices=("off", "auto"),
    default="off",
    help="auto: jax.distributed.initialize() with no arguments, as on a TPU VM pod, "
    "Slurm or MPI (default: off, one process, unless --coordinator_address is given)",
  )
  g.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0's coordinator")
  g.add_argument("--num_processes", type=int, default=None, help="number of processes")
  g.add_argument("--process_id", type=int, default=None, help="this process's index")


def initialize(args: argparse.Namespace) -> None:
  """Starts the JAX distributed runtime when the flags ask for it (before any
  device is used); UsageError for an incomplete or contradictory set."""
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  if args.distributed == "auto":
    if any(x is not None for x in explicit):
      raise UsageError(
        "--distributed auto finds the coordinator itself; drop --coordinator_address, "
        "--num_processes and --process_id"
      )
    jax.distributed.initialize(
      initialization_timeout=INIT_TIMEOUT_SECONDS, heartbeat_timeout_seconds=HEARTBEAT_SECONDS
    )
    return
  if all(x is None for x in explicit):
    return
  if any(x is None for x in explicit):
    raise UsageError(
      "--coordinator_address, --num_processes and --process_id go together; got "
      f"{args.coordinator_address!r}, {args.num_processes!r}, {args.process_id!r}"
    )
  if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
    raise UsageError(
      f"--process_id must lie in [0, --num_processes) with --num_processes >= 1; got "
      f"{args.process_id} of {args.num_processes}"
    )
  host, _, port = args.coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise UsageError(f"--coordinator_address must be HOST:PORT, got {args.coordinator_address!r}")
  if args.num_processes == 1:
    return
  jax.distributed.initialize(
    args.coordinator_address,
    num_processes=args.num_processes,
    process_id=args.process_id,
    initialization_timeout=INIT_TIMEOUT_SECONDS,
    heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
  )


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True when `flag` is true on any process (a collective: every process
  must call it at the same point)."""
  if not is_multiprocess():
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if is_multiprocess():
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def to_host(x: Any) -> np.ndarray:
  """A global array's full value as numpy on every process (gathers the
  shards of other processes; plain `np.asarray` for local arrays)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
