"""Atomic file writes: a temporary file in the target folder, renamed into place."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp"):
  """Yields a temporary path beside `path`; on success it replaces `path`.

  Readers see the old file or the complete new one, never a partial write.
  On an exception the temporary file is removed and `path` is untouched.
  """
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, suffix=suffix)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


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
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    import signal

    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
