import jax
import pytest

# Catch (B,) * (B, H, W, C) broadcasting bugs.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def key():
  return jax.random.key(0)
