"""Pictures for the jobs: image grids, curves, trajectory strips. Files are
written atomically (a temporary file renamed into place)."""

from __future__ import annotations

from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import distributed  # noqa: E402
from experiments.files import atomic_path  # noqa: E402
from nnbase import pixels


def atomic_savefig(fig, path: str, **kwargs) -> None:
  """Saves `fig` as a PNG atomically and closes it; multi-process: process 0 writes."""
  try:
    if not distributed.is_writer():
      return
    with atomic_path(path, ".png.tmp") as tmp:
      fig.savefig(tmp, format="png", **kwargs)
  finally:
    plt.close(fig)


to_unit = pixels.to_unit


def tile(
  images: np.ndarray, nrow: int, pad: int = 2, fill: float = 0.5, border: bool = True
) -> np.ndarray:
  """[N, H, W, C] in [0, 1] -> one mosaic of `nrow` images per row, `pad`
  pixels of `fill` between them and, with `border`, around them:
  [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] (both 2*pad smaller without)."""
  n, h, w, c = images.shape
  rows = -(-n // nrow)
  edge = pad if border else 0
  out = np.full(
    (rows * (h + pad) - pad + 2 * edge, nrow * (w + pad) - pad + 2 * edge, c), fill, np.float32
  )
  for i in range(n):
    r, k = divmod(i, nrow)
    y, x = edge + r * (h + pad), edge + k * (w + pad)
    out[y : y + h, x : x + w] = images[i]
  return out


def _show(ax, mosaic):
  if mosaic.shape[-1] == 1:
    ax.imshow(mosaic[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  else:
    ax.imshow(mosaic, interpolation="nearest")
  ax.axis("off")


def save_grid(
  images: np.ndarray, path: str, nrow: int = 8, title: Optional[str] = None, value_range=(-1.0, 1.0)
) -> None:
  """Saves [N, H, W, C] images as a grid PNG (the seed's 8x8 sample grid)."""
  if not distributed.is_writer():  # multi-process: process 0 draws
    return
  mosaic = tile(to_unit(images, value_range), nrow)
  fig, ax = plt.subplots(figsize=(mosaic.shape[1] / 40 + 0.5, mosaic.shape[0] / 40 + 0.8))
  _show(ax, mosaic)
  if title:
    ax.set_title(title)
  atomic_savefig(fig, path, dpi=100, bbox_inches="tight")


def strip_mosaic(frames: np.ndarray, gap: int) -> np.ndarray:
  """[F, N, H, W, C] in [0, 1] -> [N*(H+gap)-gap, F*(W+gap)-gap, C]: frame j of
  row i at rows i*(H+gap) and columns j*(W+gap), white (1.0) between."""
  f, n, h, w, c = frames.shape
  rows_first = np.swapaxes(frames, 0, 1).reshape(n * f, h, w, c)
  return tile(rows_first, f, pad=gap, fill=1.0, border=False)


def save_strip(
  frames: np.ndarray,
  labels: Sequence[str],
  path: str,
  title: Optional[str] = None,
  value_range=(-1.0, 1.0),
) -> None:
  """Saves a trajectory [F, N, H, W, C] as N rows of F frames, columns labelled.

  One image on one axes, white gaps between the frames: an axes per frame
  (88 for the jobs' 8 x 11 strips) took 1.15 s to draw, this ~0.2 s.
  """
  if not distributed.is_writer():  # multi-process: process 0 draws
    return
  f, n, h, w, _ = frames.shape
  gap = max(1, h // 7)
  mosaic = strip_mosaic(to_unit(frames, value_range), gap)
  fig, ax = plt.subplots(figsize=(1.3 * f, 1.3 * n + 0.6))
  _show(ax, mosaic)
  ax.axis("on")
  ax.set_xticks([j * (w + gap) + (w - 1) / 2 for j in range(f)], list(labels), fontsize=9)
  ax.set_yticks([])
  ax.xaxis.tick_top()
  ax.tick_params(length=0)
  for spine in ax.spines.values():
    spine.set_visible(False)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  atomic_savefig(fig, path, dpi=100)


def save_curves(
  curves: dict,
  path: str,
  xlabel: str = "step",
  ylabel: str = "loss",
  title: Optional[str] = None,
  logy: bool = False,
) -> None:
  """Saves {label: (x, y)} line plots."""
  if not distributed.is_writer():  # multi-process: process 0 draws
    return
  fig, ax = plt.subplots(figsize=(8, 4))
  for label, (x, y) in curves.items():
    ax.plot(x, y, label=label, marker="o" if len(x) < 30 else None)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if logy:
    ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  if len(curves) > 1:
    ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  atomic_savefig(fig, path, dpi=100)


def save_scatter(
  points: np.ndarray, labels: np.ndarray, path: str, title: Optional[str] = None
) -> None:
  """Saves a 2-D scatter of points [N, 2] coloured by integer labels [N]."""
  if not distributed.is_writer():  # multi-process: process 0 draws
    return
  fig, ax = plt.subplots(figsize=(7, 6))
  sc = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=3, alpha=0.7)
  fig.colorbar(sc, ax=ax, ticks=range(int(labels.max()) + 1))
  ax.set_xlabel("z1")
  ax.set_ylabel("z2")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  atomic_savefig(fig, path, dpi=100)
