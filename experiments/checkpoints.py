"""Orbax checkpoints of a pytree train state, in `workdir/checkpoints`.

Orbax writes each step to a temporary directory and renames it when complete,
so a crash never leaves a half-written step that `latest_step` would pick.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the latest `max_to_keep` steps; optionally a separate best-by-metric dir."""

  def __init__(self, directory: str, max_to_keep: int = 1,
               best_metric: Optional[str] = None, best_mode: str = "min"):
    self.directory = os.path.abspath(directory)  # Orbax needs absolute paths
    options = dict(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    if best_metric is not None:
      options.update(best_fn=lambda m: m[best_metric], best_mode=best_mode)
    self._mngr = ocp.CheckpointManager(self.directory,
                                       options=ocp.CheckpointManagerOptions(**options))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, metrics: Optional[dict] = None, force: bool = True) -> None:
    """Starts an async save of `state` at `step` (call `wait` before exiting)."""
    self._mngr.save(int(step), args=ocp.args.StandardSave(state), metrics=metrics, force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restores onto `abstract_state` (e.g. `jax.eval_shape` of the initialiser)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def restore_latest(directory: str, init) -> tuple:
  """(state, step) from the latest checkpoint in `directory`, restored onto the
  shapes of `init()`; a UsageError ("train first") when there is none."""
  from experiments.cli import UsageError  # pylint: disable=import-outside-toplevel
  ckpt = Checkpointer(directory)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise UsageError(f"no checkpoint in {ckpt.directory}; train first")
    return ckpt.restore(jax.eval_shape(init), step), step
  finally:
    ckpt.close()
