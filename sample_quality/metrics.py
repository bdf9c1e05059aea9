"""Sample-quality metrics on feature vectors (numpy, float64 where it matters).

All functions take features [N, D] of the reference set ("real") and of the
samples ("fake"), as produced by `sample_quality.classifier`, and return plain
floats or dicts, so they work with any feature extractor.

- `frechet_distance` (FD): ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)).
  On our MNIST classifier's features we call it FD-MNIST; it is not the
  Inception FID and the numbers are not comparable with FID.
- `kid`: unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3 (Binkowski
  et al. 2018), averaged over random subsets, with its standard error.
- `precision_recall`: k-nearest-neighbour manifolds (Kynkaanniemi et al. 2019).
- `classifier_score`: the Inception Score formula exp(E_x KL(p(y|x) || p(y))).
- `class_histogram`, `mean_pairwise_distance` (diversity).
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _check_features(name: str, f: np.ndarray, min_rows: int = 2) -> np.ndarray:
  f = np.asarray(f)
  if f.ndim != 2 or f.shape[0] < min_rows:
    raise ValueError(f"{name} must be [N, D] with N >= {min_rows}, got shape {f.shape}")
  if not np.all(np.isfinite(f)):
    raise ValueError(f"{name} holds non-finite values")
  return f.astype(np.float64)


def _check_probs(probs: np.ndarray, min_rows: int = 1) -> np.ndarray:
  """probs [N, C] as float64; ValueError unless each row is a distribution
  (logits passed by mistake would give a silently wrong score)."""
  p = np.asarray(probs, np.float64)
  if p.ndim != 2 or p.shape[0] < min_rows:
    raise ValueError(f"probs must be [N, C] with N >= {min_rows}, got shape {p.shape}")
  if not (np.all(np.isfinite(p)) and p.min() >= 0 and p.max() <= 1 + 1e-6):
    raise ValueError(
      f"probs must be probabilities in [0, 1] (softmax of the logits), got values in "
      f"[{np.nanmin(p):.4g}, {np.nanmax(p):.4g}]"
    )
  sums = p.sum(axis=1)
  if np.any(np.abs(sums - 1) > 1e-3):
    raise ValueError(f"probs rows must sum to 1, got sums in [{sums.min():.4g}, {sums.max():.4g}]")
  return p


def feature_stats(features: np.ndarray) -> tuple:
  """(mean [D], covariance [D, D]) in float64; the covariance uses N - 1."""
  f = _check_features("features", features)
  return f.mean(0), np.cov(f, rowvar=False)


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the
  eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric PSD matrix with the same
  spectrum, so no complex parts or failing sqrtm on singular covariances.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(
      f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
    )
  r1 = _sqrtm_psd(s1)
  m = r1 @ s2 @ r1
  tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
  fd = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
  return float(max(fd, 0.0))


def frechet_distance_features(real: np.ndarray, fake: np.ndarray) -> float:
  return frechet_distance(*feature_stats(real), *feature_stats(fake))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3) -> np.ndarray:
  """k(x, y) = (x.y / D + 1)^degree: [N, D], [M, D] -> [N, M]."""
  return (x @ y.T / x.shape[1] + 1.0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
  """Unbiased MMD^2 between samples x [m, D] and y [n, D] (U-statistic)."""
  m, n = x.shape[0], y.shape[0]
  kxx, kyy, kxy = (
    polynomial_kernel(x, x, degree),
    polynomial_kernel(y, y, degree),
    polynomial_kernel(x, y, degree),
  )
  sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
  syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
  return float(sxx + syy - 2 * kxy.mean())


def kid(
  real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict:
  """Kernel Inception Distance formula on our features.

  The mean of `mmd2_unbiased` over `num_subsets` random pairs of subsets of
  `subset_size` (capped at the smaller set), with the standard deviation over
  subsets and the standard error of the mean (std / sqrt(num_subsets)).
  """
  real, fake = _check_features("real", real), _check_features("fake", fake)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  m = min(subset_size, real.shape[0], fake.shape[0])
  rs = np.random.default_rng(seed)
  vals = np.array(
    [
      mmd2_unbiased(
        real[rs.choice(real.shape[0], m, replace=False)],
        fake[rs.choice(fake.shape[0], m, replace=False)],
      )
      for _ in range(num_subsets)
    ]
  )
  std = float(vals.std(ddof=1)) if num_subsets > 1 else 0.0
  return {
    "kid": float(vals.mean()),
    "kid_std": std,
    "kid_stderr": std / np.sqrt(num_subsets),
    "kid_subsets": num_subsets,
    "kid_subset_size": m,
  }


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
  return np.maximum(d, 0.0)


def knn_radii(f: np.ndarray, k: int = 3, chunk: int = 1000) -> np.ndarray:
  """Squared distance from each row of f [N, D] to its k-th nearest other row: [N]."""
  if not 1 <= k < f.shape[0]:
    raise ValueError(f"k must lie in [1, N - 1] = [1, {f.shape[0] - 1}], got {k}")
  out = np.empty(f.shape[0])
  for i in range(0, f.shape[0], chunk):
    d = _sq_dists(f[i : i + chunk], f)
    out[i : i + chunk] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
  return out


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int) -> float:
  """Fraction of points inside at least one ball (centre, squared radius)."""
  inside = np.zeros(points.shape[0], bool)
  for i in range(0, points.shape[0], chunk):
    d = _sq_dists(points[i : i + chunk], centres)
    inside[i : i + chunk] = (d <= radii[None, :]).any(1)
  return float(inside.mean())


def precision_recall(
  real: np.ndarray,
  fake: np.ndarray,
  k: int = 3,
  chunk: int = 1000,
  real_radii: Optional[np.ndarray] = None,
) -> dict:
  """Improved precision and recall (Kynkaanniemi et al. 2019).

  The real manifold is the union of balls around each real feature with the
  radius of its k-th nearest real neighbour; precision is the fraction of
  fake features inside it. Recall swaps the roles. `real_radii` [N_real]:
  `knn_radii(real, k)`, when the caller keeps them for a fixed reference set
  (the N_real^2 distances are most of the cost).
  """
  real, fake = _check_features("real", real, k + 1), _check_features("fake", fake, k + 1)
  if real_radii is None:
    real_radii = knn_radii(real, k, chunk)
  elif np.shape(real_radii) != (real.shape[0],):
    raise ValueError(f"real_radii must be [{real.shape[0]}], got shape {np.shape(real_radii)}")
  precision = _coverage(fake, real, real_radii, chunk)
  recall = _coverage(real, fake, knn_radii(fake, k, chunk), chunk)
  return {"precision": precision, "recall": recall, "pr_k": k}


def classifier_score(probs: np.ndarray, splits: int = 10) -> dict:
  """exp(E_x KL(p(y|x) || p(y))) over all samples, and the mean/std over `splits`
  equal parts (the Inception Score's usual report). probs: [N, C] rows summing to 1."""
  p = _check_probs(probs, splits)

  def score(q):
    py = q.mean(0, keepdims=True)
    kl = (q * (np.log(np.clip(q, 1e-12, None)) - np.log(np.clip(py, 1e-12, None)))).sum(1)
    return float(np.exp(kl.mean()))

  parts = [score(q) for q in np.array_split(p, splits)]
  return {
    "classifier_score": score(p),
    "classifier_score_split_mean": float(np.mean(parts)),
    "classifier_score_split_std": float(np.std(parts)),
  }


def class_histogram(probs: np.ndarray) -> dict:
  """Counts of the predicted classes, their fractions, and the total-variation
  distance of those fractions from uniform (0 = perfectly balanced)."""
  p = _check_probs(probs)
  counts = np.bincount(p.argmax(1), minlength=p.shape[1])
  frac = counts / counts.sum()
  return {
    "class_counts": counts.tolist(),
    "class_fractions": frac.round(4).tolist(),
    "class_tv_from_uniform": float(0.5 * np.abs(frac - 1 / p.shape[1]).sum()),
  }


def mean_pairwise_distance(
  f: np.ndarray, max_points: Optional[int] = 5000, seed: int = 0, chunk: int = 1000
) -> float:
  """Mean Euclidean distance over all pairs i < j (diversity); on a random
  subset of `max_points` rows when N is larger."""
  f = _check_features("features", f)
  if max_points is not None and f.shape[0] > max_points:
    f = f[np.random.default_rng(seed).choice(f.shape[0], max_points, replace=False)]
  n, total = f.shape[0], 0.0
  for i in range(0, n, chunk):
    total += np.sqrt(_sq_dists(f[i : i + chunk], f)).sum()
  return float(total / (n * (n - 1)))  # the diagonal adds zeros


READABLE_THRESHOLD = 0.9


def readable_fraction(probs: np.ndarray, threshold: float = READABLE_THRESHOLD) -> float:
  """Share of images that the classifier assigns one class with probability
  >= threshold: probs [N, K] -> a number in [0, 1]."""
  p = _check_probs(probs)
  return float(np.mean(p.max(axis=1) >= threshold))


def all_metrics(
  real: np.ndarray,
  fake: np.ndarray,
  fake_probs: np.ndarray,
  *,
  k: int = 3,
  kid_subsets: int = 100,
  kid_subset_size: int = 1000,
  seed: int = 0,
  real_radii: Optional[np.ndarray] = None,
) -> dict:
  """Every metric above for one set of samples against the reference features
  (`real_radii`: their `knn_radii(real, k)`, if kept)."""
  out = {
    "fd": frechet_distance_features(real, fake),
    "num_samples": int(fake.shape[0]),
    "num_reference": int(real.shape[0]),
  }
  out.update(kid(real, fake, kid_subsets, kid_subset_size, seed))
  out.update(precision_recall(real, fake, k, real_radii=real_radii))
  out.update(classifier_score(fake_probs, splits=min(10, fake.shape[0])))
  out.update(class_histogram(fake_probs))
  out["readable"] = readable_fraction(fake_probs)
  out["diversity"] = mean_pairwise_distance(fake, seed=seed)
  return out
