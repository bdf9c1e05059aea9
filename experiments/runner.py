"""The training loop that every job shares: `Runner(...).run(step_fn)`.

A job supplies what differs: a function that runs one unit of training (a
step for the DDPM, an epoch for the VAE) and returns the number of
non-finite steps in it (a device scalar, pulled lazily), a `save(position)`
that writes a checkpoint, and periodic actions (log, sample grid, evaluate),
in the manner of clu's periodic actions. The runner owns what is the same:
the progress bar, SIGTERM (checkpoint and leave with exit 143), the
non-finite policy (stop before saving the bad state, or count the skipped
steps), `--stop_after_*`, and the checkpoint at the point where it stops.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from typing import Any, Callable, Optional, Sequence

import jax
from tqdm import tqdm

from experiments import distributed
from experiments.preemption import Preemption

SIGTERM_EXIT = 143  # 128 + SIGTERM
SYNC_EVERY = 10  # multi-process: units between agreements on a stop request


@dataclasses.dataclass
class Action:
  """Calls `fn(position)` after every `every`-th unit; `last`: also after the final one."""

  every: int
  fn: Callable[[int], None]
  last: bool = False

  def due(self, position: int, total: int) -> bool:
    return position % self.every == 0 or (self.last and position == total)


_MESSAGES = {
  "step": dict(
    nonfinite="non-finite loss or gradient at step {first}",
    kept="step {saved}",
    preempted="SIGTERM at step {position}: checkpoint saved; run again to resume",
    stopped="stopped at step {position} of {total} as asked; run again to continue",
  ),
  "epoch": dict(
    nonfinite="non-finite loss or gradient in epoch {first} ({count} steps)",
    kept="after epoch {saved}",
    preempted="SIGTERM: checkpoint after epoch {position} saved; run again to resume",
    stopped="stopped after epoch {position} of {total} as asked; run again to continue",
  ),
}


class Runner:
  """Runs units `position+1 .. end` of a `total`-unit training run.

  Attributes read by the job's actions: `position` (units done), `skipped`
  (non-finite steps skipped so far), `last_saved` (position of the newest
  checkpoint or None), `preemption.requested`.

  Use as a context manager (SIGTERM handling is on inside it):

      with Runner(...) as runner:
        finished = runner.run(unit_fn)
        ...            # final work; runner.leave_if_preempted("stage") between stages
  """

  def __init__(
    self,
    *,
    position: int,
    total: int,
    unit: str,
    save: Callable[[int], None],
    checkpoint_every: int,
    actions: Sequence[Action] = (),
    stop_after: Optional[int] = None,
    skip_nonfinite: bool = False,
    last_saved: Optional[int] = None,
    on_close: Sequence[Callable[[], Any]] = (),
  ):
    if unit not in _MESSAGES:
      raise ValueError(f"unit must be one of {sorted(_MESSAGES)}, got {unit!r}")
    self.position, self.total, self.unit = position, total, unit
    self.end = total if stop_after is None else min(total, position + stop_after)
    self.save_fn, self.checkpoint_every = save, checkpoint_every
    self.actions, self.skip_nonfinite = list(actions), skip_nonfinite
    self.last_saved, self.skipped = last_saved, 0
    self.on_close = list(on_close)
    self.pbar: Optional[tqdm] = None  # the progress bar while running (for set_postfix)
    self._pending: list = []  # (position, device count of non-finite steps)
    self._msg = _MESSAGES[unit]
    self.preemption = Preemption()
    self._stop = False  # multi-process: a stop agreed by all
    self.interrupted = False  # Ctrl-C seen; raised as KeyboardInterrupt between units
    self._sigint_previous = None

  def __enter__(self) -> "Runner":
    self.preemption.__enter__()
    if threading.current_thread() is threading.main_thread():
      # Ctrl-C stops the loop between units, never inside a checkpoint write
      # (a KeyboardInterrupt raised inside Orbax can be lost or leave a
      # half-written step); a second Ctrl-C is ignored while cleaning up.
      self._sigint_previous = signal.signal(signal.SIGINT, self._on_sigint)
    return self

  def __exit__(self, *exc) -> bool:
    self._release_sigint()
    return self.preemption.__exit__(*exc)

  def _release_sigint(self) -> None:
    """Gives Ctrl-C back to its previous handler (after the loop: the final
    stages are interrupted as usual)."""
    if self._sigint_previous is not None:
      signal.signal(signal.SIGINT, self._sigint_previous)
      self._sigint_previous = None

  def _on_sigint(self, signum, frame) -> None:
    self.interrupted = True

  def _raise_if_interrupted(self) -> None:
    if self.interrupted:
      signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: ignored
      self._sigint_previous = None
      raise KeyboardInterrupt

  # ------------------------------------------------------------------ pieces

  def check_finite(self) -> None:
    """Pulls the pending non-finite counts: raises FloatingPointError (nothing
    saved) or, with skip_nonfinite, counts the skipped steps."""
    if not self._pending:
      return
    counts = jax.device_get([c for _, c in self._pending])
    bad = [(p, int(c)) for (p, _), c in zip(self._pending, counts) if c]
    self._pending.clear()
    if not bad:
      return
    if not self.skip_nonfinite:
      kept = (
        self._msg["kept"].format(saved=self.last_saved)
        if self.last_saved is not None
        else "none yet"
      )
      first = self._msg["nonfinite"].format(first=bad[0][0], count=bad[0][1])
      raise FloatingPointError(
        f"{first}; stopped without saving it (last good checkpoint: {kept}). Lower "
        "--learning_rate, or pass --skip_nonfinite true to skip such steps"
      )
    self.skipped += sum(c for _, c in bad)
    tqdm.write(
      f"skipped {sum(c for _, c in bad)} non-finite step(s), first in {self.unit} {bad[0][0]}",
      file=sys.stderr,
    )

  def save(self, position: int) -> None:
    self.check_finite()
    self.save_fn(position)
    self.last_saved = position

  def close(self) -> None:
    for fn in self.on_close:
      fn()
    self.on_close = []

  def stop_requested(self, every: int = SYNC_EVERY) -> bool:
    """Whether to stop before the next unit. One process: its own SIGTERM flag.
    Several: every `every` units all processes share their flags (a collective
    at the same position everywhere), so a SIGTERM seen by any one of them
    stops all at the same step."""
    if not distributed.is_multiprocess():
      return self.preemption.requested
    if self.position % every:
      return self._stop
    self._stop = self._stop or distributed.any_process(self.preemption.requested)
    return self._stop

  def leave_if_preempted(self, stage: str, what: str) -> None:
    """After the last unit: SIGTERM between final stages closes and exits 143."""
    if self.stop_requested(every=1):
      self.close()
      print(f"SIGTERM {stage}: {what}", file=sys.stderr)
      raise SystemExit(SIGTERM_EXIT)

  # -------------------------------------------------------------------- loop

  def run(self, unit_fn: Callable[[int], Any]) -> bool:
    """Runs `unit_fn(position)` (the unit to run is position + 1) until `end`;
    returns True when all `total` units are done (checkpointed), False when
    stopped early as asked (checkpointed, resources closed); exits 143 on SIGTERM."""
    self.pbar = pbar = tqdm(
      total=self.total,
      initial=self.position,
      desc="train",
      unit=self.unit,
      dynamic_ncols=True,
      mininterval=2.0,
      file=sys.stderr,
    )
    try:
      while self.position < self.end:
        self._raise_if_interrupted()
        if self.stop_requested():
          break
        nonfinite = unit_fn(self.position)
        self.position += 1
        self._pending.append((self.position, nonfinite))
        pbar.update(1)
        due = [a for a in self.actions if a.due(self.position, self.total)]
        if due:
          self.check_finite()
        for action in due:
          action.fn(self.position)
        if self.position % self.checkpoint_every == 0 and self.position < self.total:
          self.save(self.position)
    finally:
      pbar.close()
    self._raise_if_interrupted()
    self._release_sigint()
    self.check_finite()
    if self.last_saved != self.position:
      self.save(self.position)
    if self.position == self.total:
      return True
    self.close()
    fields = dict(position=self.position, total=self.total)
    if self.preemption.requested or self._stop:
      print(self._msg["preempted"].format(**fields), file=sys.stderr)
      raise SystemExit(SIGTERM_EXIT)
    print(self._msg["stopped"].format(**fields), file=sys.stderr)
    return False
