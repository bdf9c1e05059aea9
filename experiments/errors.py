"""The jobs' error types and exit codes (one home for both)."""

from __future__ import annotations


class UsageError(ValueError):
  """Bad flags or configuration; the job prints the message and exits 2."""


EXIT_INTERNAL, EXIT_USAGE, EXIT_DIVERGED, EXIT_IO = 1, 2, 3, 4
EXIT_PEER_LOST = 5  # another process of a multi-process run died (experiments.distributed)
EXIT_INTERRUPTED, EXIT_PREEMPTED = 130, 143  # 128 + SIGINT, 128 + SIGTERM
