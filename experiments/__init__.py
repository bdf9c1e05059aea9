"""Runnable jobs that compose the ddpm_jax and vae_jax libraries (files, flags, plots).

Importing the package does nothing else; `python -m experiments.X` entry
points set up the process (huge pages, see runtime.py) in their `__main__`.
"""
