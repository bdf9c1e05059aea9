"""Training batches read on the host, for datasets too big to keep on the devices.

The device path (`mnist_ddpm.make_step_fns`) keeps the uint8 images on every
device and gathers each batch there. `HostBatches` yields the same batches
from a random-access source (`data.ImageSource`, e.g. a TFDS data source):

* the global order is the device path's: batch `step` is rows
  `[i B, (i + 1) B)` of the permutation of epoch `step // steps_per_epoch`
  (i = step mod steps_per_epoch), so a run gives the same numbers on either path;
* each process reads only its rows of each global batch
  (`dj.parallel.process_rows`), and the global array is assembled with
  `jax.make_array_from_process_local_data`;
* a thread reads `ahead` batches in advance, overlapping reads with the step;
* the iterator's whole state is the train step, which every checkpoint holds,
  so a resumed run reads exactly what an uninterrupted one reads.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Dict, Optional, Tuple

import jax
import numpy as np

import ddpm_jax as dj
from experiments.data import ImageSource

DEVICE_DATA_LIMIT_BYTES = 2 << 30  # --data_pipeline auto: larger splits are read on the host
PIPELINES = ("auto", "device", "host")


def choose_pipeline(requested: str, source: ImageSource) -> str:
  """'device' or 'host' for --data_pipeline `requested` and this split.

  The device path puts a copy on every local device; CPU devices share the
  host's memory, so there the limit counts all their copies."""
  if requested != "auto":
    return requested
  local = jax.local_devices()
  copies = len(local) if local[0].platform == "cpu" else 1
  return "device" if source.nbytes * copies <= DEVICE_DATA_LIMIT_BYTES else "host"


class HostBatches:
  """`get(step) -> (images uint8 [B, H, W, C], labels int32 [B])`, global
  arrays split over the mesh's "data" axis, for steps in increasing order."""

  def __init__(
    self,
    source: ImageSource,
    batch_size: int,
    epoch_perm: Callable[[int], jax.Array],
    mesh: jax.sharding.Mesh,
    ahead: int = 2,
  ):
    dj.parallel.check_batch(batch_size, mesh)
    self.source, self.batch, self.mesh, self.ahead = source, batch_size, mesh, ahead
    self.steps_per_epoch = source.num_examples // batch_size
    self.rows = dj.parallel.process_rows(batch_size)
    self._epoch_perm = epoch_perm
    self._perms: Dict[int, np.ndarray] = {}
    self._pending: Dict[int, concurrent.futures.Future] = {}
    self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = (
      concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="host-batches")
    )

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:  # called from the main thread only (see get)
      self._perms = {epoch: np.asarray(self._epoch_perm(epoch))}
    return self._perms[epoch]

  def local_rows(self, step: int) -> np.ndarray:
    """Indices into the source of this process's rows of batch `step`."""
    i = step % self.steps_per_epoch
    idx = self._perm(step // self.steps_per_epoch)[i * self.batch : (i + 1) * self.batch]
    return idx[self.rows]

  def get(self, step: int) -> Tuple[jax.Array, jax.Array]:
    if self._pool is None:
      raise RuntimeError("HostBatches is closed")
    for s in list(self._pending):
      if s < step:  # a jump forward (never in training): drop stale reads
        self._pending.pop(s).cancel()
    for s in range(step, step + 1 + self.ahead):
      if s not in self._pending:
        self._pending[s] = self._pool.submit(self.source.read, self.local_rows(s))
    images, labels = self._pending.pop(step).result()
    return (
      dj.parallel.global_batch(np.ascontiguousarray(images), self.mesh),
      dj.parallel.global_batch(np.asarray(labels, np.int32), self.mesh),
    )

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool, self._pending = None, {}
