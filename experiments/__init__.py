"""Runnable jobs that compose the ddpm_jax and vae_jax libraries (files, flags, plots)."""
