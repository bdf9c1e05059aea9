"""Parameter trees as flat, pickle-free npz files with a content hash.

Leaves are stored under their "/"-joined names; `params_sha256` hashes
(name, dtype, shape, bytes) of every leaf, names sorted, so the same weights
give the same digest whatever the npz container's bytes are. `arrays_sha256`
hashes a sequence of arrays in order (verified caches, and the check that
every process replicates the same state).
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


class WeightsError(RuntimeError):
  """Weights are missing, unreadable or fail their hash check."""


def _update(h, a, prefix: str = "") -> None:
  """Feeds `prefix`, the array's dtype and shape, then its bytes to `h`;
  contiguous arrays are hashed in place, without a copy."""
  a = np.asarray(a)
  h.update(f"{prefix}{a.dtype.str}:{a.shape};".encode())
  h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def arrays_sha256(arrays: Sequence) -> str:
  """sha256 over each array's dtype, shape and bytes, in order (the same bytes
  read as another dtype or shape give another digest)."""
  h = hashlib.sha256()
  for a in arrays:
    _update(h, a)
  return h.hexdigest()


def params_sha256(params: Mapping) -> str:
  """sha256 over (name, dtype, shape, bytes) of every leaf, names sorted."""
  h = hashlib.sha256()
  for name, leaf in sorted(("/".join(k), v) for k, v in flatten_dict(params).items()):
    _update(h, leaf, f"{name}:")
  return h.hexdigest()


def save_params(params: Mapping, path: str, compressed: bool = False) -> str:
  """Writes float32 params as a flat npz (no pickle); returns their `params_sha256`."""
  flat = {"/".join(k): np.asarray(v, np.float32) for k, v in flatten_dict(params).items()}
  with open(path, "wb") as f:
    (np.savez_compressed if compressed else np.savez)(f, **flat)
  return params_sha256(unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()}))


def load_params(
  path: str, sha256: Optional[str], what: str = "weights", hint: str = "reinstall the package"
) -> dict:
  """Loads params from an npz with `allow_pickle=False`, checking their
  `params_sha256` against `sha256` (None skips the check); WeightsError otherwise."""
  try:
    with np.load(path, allow_pickle=False) as z:
      flat = {tuple(k.split("/")): z[k] for k in z.files}
  except (OSError, ValueError, EOFError) as e:
    raise WeightsError(f"cannot read {what} {path}: {e}") from e
  params = unflatten_dict(flat)
  if sha256 is not None:
    digest = params_sha256(params)
    if digest != sha256:
      raise WeightsError(f"{what} {path} have sha256 {digest}, expected {sha256}; {hint}")
  return jax.tree.map(jnp.asarray, params)
