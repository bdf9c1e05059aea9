"""SIGTERM as a request to checkpoint and leave (preemptible VMs send it first)."""

from __future__ import annotations

import signal
import threading


class Preemption:
  """Context manager: while active, SIGTERM sets `requested` instead of killing
  the process, so a training loop can checkpoint and leave (preemptible VMs
  send SIGTERM before they stop). The previous handler comes back on exit."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
