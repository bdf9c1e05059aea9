"""Runnable jobs that compose the ddpm_jax and vae_jax libraries (files, flags, plots)."""

from experiments.runtime import reexec_with_hugepages

# `python -m experiments.X`: restart once with huge pages for XLA's buffers
# (see experiments/runtime.py); a no-op on import from other code.
reexec_with_hugepages()
