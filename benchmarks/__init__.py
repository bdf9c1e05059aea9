"""Speed benchmarks (`python -m benchmarks.run`)."""

from experiments.runtime import reexec_with_hugepages

# `python -m benchmarks.X` measures the jobs' process set-up: huge pages for
# XLA's buffers (experiments/runtime.py). benchmarks.levers times it off and on.
reexec_with_hugepages()
