"""The jobs' pictures (experiments/plotting.py)."""

import numpy as np

from experiments import plotting


def test_strip_mosaic_places_frame_j_of_row_i(tmp_path):
  frames = np.arange(3 * 2, dtype=np.float32).reshape(3, 2, 1, 1, 1) / 10  # [F=3, N=2]
  frames = np.broadcast_to(frames, (3, 2, 4, 5, 1))
  m = plotting.strip_mosaic(frames, gap=2)
  assert m.shape == (2 * 6 - 2, 3 * 7 - 2, 1)
  for i in range(2):
    for j in range(3):
      cell = m[i * 6 : i * 6 + 4, j * 7 : j * 7 + 5]
      np.testing.assert_array_equal(cell, frames[j, i])
  assert m[4:6].min() == 1.0 and m[:, 5:7].min() == 1.0  # white gaps
  plotting.save_strip(frames * 2 - 1, ["a", "b", "c"], str(tmp_path / "s.png"), title="t")
  assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
