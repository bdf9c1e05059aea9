"""Multi-process runs (one process per host, as on TPU VM pods): the jobs' flags,
`jax.distributed.initialize`, and the few rules the jobs follow.

* Every process runs the same program on the global device mesh; arrays are
  global (`jax.Array` over all processes' devices).
* Only process 0 writes files (`is_writer`): config.json, metrics.jsonl,
  TensorBoard events, pictures, evaluation JSON, checkpoint manifests. Every
  process takes part in Orbax saves and restores, as Orbax requires.
* A stop request (SIGTERM) seen by any process is shared by `any_process` at
  fixed positions, so all stop at the same step.
* A dead peer: every process publishes a beat in the coordination service's
  key-value store every `BEAT_SECONDS` from a watchdog thread; a process
  whose beat has not moved for `WATCHDOG_SECONDS` (or a coordinator that no
  longer answers) ends the survivors with one line and `EXIT_PEER_LOST`
  instead of a hang in a collective. JAX's own heartbeat
  (`HEARTBEAT_SECONDS`, longer) stays behind it as a backstop. A process that
  ends in order (the job done, or a stop all agreed on) says so before it
  leaves (`announce_exit`), and the others stop watching it: at exit JAX
  holds it in a shutdown barrier, beatless, until they all get there.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from experiments.errors import EXIT_PEER_LOST, UsageError

WATCHDOG_SECONDS = 30.0  # a peer whose beat has not moved this long is declared dead
BEAT_SECONDS = 2.0  # how often each process publishes its beat and reads the others'
HEARTBEAT_SECONDS = 90  # JAX's own bound (it aborts the process): the backstop
INIT_TIMEOUT_SECONDS = 120  # waiting for every process to join
_BEAT_DIR = "ddpm_jax/beat/"
_LEFT = "left"  # a process's last beat value when it ends in order
_STOPPING = threading.Event()  # set at interpreter exit: the watchdogs end quietly
_WATCHDOGS: list = []
_WATCHED: list = []  # per watchdog: (client, this process's index, process count, stale_after)


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
  g.add_argument(
    "--peer_timeout",
    type=float,
    default=WATCHDOG_SECONDS,
    help="seconds without a beat from another process before this one stops (exit 5); "
    f"default {WATCHDOG_SECONDS:g}",
  )


def initialize(args: argparse.Namespace) -> None:
  """Starts the JAX distributed runtime when the flags ask for it (before any
  device is used); UsageError for an incomplete or contradictory set."""
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  timeout = getattr(args, "peer_timeout", WATCHDOG_SECONDS)
  if not 2 * BEAT_SECONDS <= timeout < HEARTBEAT_SECONDS:
    raise UsageError(
      f"--peer_timeout must lie in [{2 * BEAT_SECONDS:g}, {HEARTBEAT_SECONDS}) seconds, got "
      f"{timeout:g}"
    )
  if args.distributed == "auto":
    if any(x is not None for x in explicit):
      raise UsageError(
        "--distributed auto finds the coordinator itself; drop --coordinator_address, "
        "--num_processes and --process_id"
      )
    jax.distributed.initialize(
      initialization_timeout=INIT_TIMEOUT_SECONDS, heartbeat_timeout_seconds=HEARTBEAT_SECONDS
    )
    start_watchdog(timeout)
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
  start_watchdog(timeout)


def peer_lost_line(message: str) -> str:
  return (
    f"error: {message}; stopping. The last complete checkpoint is intact: rerun every "
    "process with the same flags to resume from it."
  )


def _peer_lost(message: str) -> None:
  """The watchdog's end of the process: one line, no cleanup (a collective
  may hold the main thread forever), the exit code of a lost peer."""
  sys.stderr.write(f"\n{peer_lost_line(message)}\n")
  sys.stderr.flush()
  os._exit(EXIT_PEER_LOST)


def closed_by_a_peer(e: BaseException) -> bool:
  """Whether `e` is a collective that failed because another process closed
  its connection (it failed or was killed): on CPU, JAX's collectives run on
  gloo over TCP and raise this instead of waiting, before the watchdog's
  verdict."""
  text = str(e)
  by_peer = "Gloo" in text and ("closed by peer" in text or "reset by peer" in text)
  return by_peer and is_multiprocess()


def _follow_beats(seen: dict, beats: dict, now: float) -> None:
  """Updates `seen`, {process: (its last beat, when that beat changed)}, from
  the store's `beats`; a process whose beat is the farewell `_LEFT` ended in
  order (it waits at JAX's shutdown barrier) and is no longer followed."""
  for p, (value, _) in list(seen.items()):
    v = beats.get(f"{_BEAT_DIR}{p}")
    if v == _LEFT:
      del seen[p]
    elif v != value:
      seen[p] = (v, now)


def start_watchdog(
  stale_after: float = WATCHDOG_SECONDS,
  period: float = BEAT_SECONDS,
  on_lost: Callable[[str], None] = _peer_lost,
  client: Optional[Any] = None,
  me: Optional[int] = None,
  n: Optional[int] = None,
) -> Optional[threading.Thread]:
  """Starts the daemon thread that beats for this process and watches the
  others' beats (no-op with one process). Beats are counters, not clocks, so
  hosts need not agree on the time; a peer is dead when its counter has not
  changed for `stale_after` seconds of this process's monotonic clock.
  `client`, `me` and `n` default to JAX's coordination client, this process's
  index and the process count (tests pass a fake client). `stop_watchdogs`
  ends it; it runs at exit, before JAX's own shutdown (atexit runs its
  handlers in reverse order and JAX registered its handler at import)."""
  if client is None:
    if not is_multiprocess():
      return None
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
  me = jax.process_index() if me is None else me
  n = jax.process_count() if n is None else n

  def watch() -> None:
    seen = {p: (None, time.monotonic()) for p in range(n) if p != me}
    beat = 0
    while True:
      beat += 1
      if _STOPPING.is_set():
        return
      try:
        client.key_value_set(f"{_BEAT_DIR}{me}", str(beat), allow_overwrite=True)
        beats = dict(client.key_value_dir_get(_BEAT_DIR))
      except Exception as e:  # the coordinator (process 0) is gone
        if _STOPPING.is_set():  # ... because this process is exiting
          return
        on_lost(f"the coordinator stopped answering ({type(e).__name__}: {str(e)[:120]})")
        return
      now = time.monotonic()
      _follow_beats(seen, beats, now)
      for p, (_, since) in seen.items():
        if now - since > stale_after:
          on_lost(
            f"process {p} of {n} sent no beat for {now - since:.0f} s (killed, or its host "
            "was lost)"
          )
          return
      _STOPPING.wait(period)

  _STOPPING.clear()
  thread = threading.Thread(target=watch, name="peer-watchdog", daemon=True)
  if not _WATCHDOGS:
    atexit.register(stop_watchdogs)
  _WATCHDOGS.append(thread)
  _WATCHED.append((client, me, n, stale_after))
  thread.start()
  return thread


def announce_exit() -> None:
  """Tells the other processes that this one ends in order: their watchdogs
  stop watching it, instead of declaring it lost while they finish their own
  part (its beats stop at exit, and JAX then holds it in a shutdown barrier
  until every process arrives). Only for an orderly end (exit 0, or 143 after
  a stop all processes agreed on): a process that ends with an error says
  nothing (`leave_after_error`), so a peer waiting for it in a collective
  still hears within the peer timeout."""
  watched = list(_WATCHED)
  stop_watchdogs()  # first: no beat may overwrite the farewell
  for client, me, _, _ in watched:
    try:
      client.key_value_set(f"{_BEAT_DIR}{me}", _LEFT, allow_overwrite=True)
    except Exception:  # the coordinator is gone already: nobody left to tell
      pass


def leave_after_error(code: int, poll: float = BEAT_SECONDS) -> None:
  """Ends a multi-process run's process that failed on its own (its one-line
  error printed) with `code`, without JAX's shutdown barrier, which its peers
  cannot reach: they wait for it in a collective until their watchdogs end
  them (exit 5, "sent no beat"). Waiting there instead, JAX aborted this
  process at its heartbeat timeout with a C++ stack trace and exit 134.
  Process 0 hosts the coordination service, whose loss would abort the peers
  at once the same way, so it first waits until their beats stop (at most the
  peer timeout and a few beats). No-op without a watchdog (one process)."""
  if not _WATCHED:
    return
  client, me, n, stale_after = _WATCHED[0]
  stop_watchdogs()
  if me == 0:
    seen = {p: (None, time.monotonic()) for p in range(1, n)}
    deadline = time.monotonic() + stale_after + 4 * poll
    while time.monotonic() < deadline:
      try:
        beats = dict(client.key_value_dir_get(_BEAT_DIR))
      except Exception:
        break
      now = time.monotonic()
      _follow_beats(seen, beats, now)
      if all(now - since > 2.5 * poll for _, since in seen.values()):
        break  # every peer has stopped beating (or left in order): it is gone
      time.sleep(poll / 2)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def stop_watchdogs(timeout: float = 10.0) -> None:
  """Ends every watchdog thread of this process without a verdict (the
  process is exiting on purpose) and waits for them."""
  _STOPPING.set()
  for thread in _WATCHDOGS:
    thread.join(timeout)
  _WATCHDOGS.clear()
  _WATCHED.clear()


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
