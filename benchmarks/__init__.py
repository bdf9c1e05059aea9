"""Speed benchmarks (`python -m benchmarks.run`); importing does nothing else."""
