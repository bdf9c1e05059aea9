"""TensorBoard event files beside `metrics.jsonl`: `tensorboard --logdir runs/`.

Written with tensorboardX (no TensorFlow or torch), from process 0 only. On a
resumed run the writer purges events after the resumed step, so a crashed
run's extra points do not show twice.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np

from experiments.plotting import tile, to_unit

# Record fields that are not plotted (identifiers, not measurements).
SKIP = ("step", "time")


class TensorBoardLog:
  """Scalars and images of one run in `<workdir>/tensorboard`."""

  def __init__(self, workdir: str, resumed_step: Optional[int] = None):
    self._writer = None
    if jax.process_index() != 0:
      return
    from tensorboardX import SummaryWriter

    purge = None if resumed_step is None else int(resumed_step) + 1
    self._writer = SummaryWriter(
      logdir=os.path.join(workdir, "tensorboard"), purge_step=purge, flush_secs=30
    )

  def scalars(self, step: int, record: dict, prefix: str = "") -> None:
    """Every numeric field of a metrics record, as `prefix + name` at `step`."""
    if self._writer is None:
      return
    for k, v in record.items():
      if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._writer.add_scalar(prefix + k, float(v), int(step))

  def image(
    self, tag: str, images: np.ndarray, step: int, nrow: int, value_range=(-1.0, 1.0)
  ) -> None:
    """A grid of images [N, H, W, C] (as the PNG grids show them) at `step`."""
    if self._writer is None:
      return
    grid = tile(to_unit(np.asarray(images), value_range), nrow)
    if grid.ndim == 2:
      grid = grid[..., None]
    self._writer.add_image(tag, np.clip(grid, 0, 1), int(step), dataformats="HWC")

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()
      self._writer = None
