"""sample_quality.metrics against direct computations and constructed answers."""

import numpy as np
import pytest
import scipy.linalg

from sample_quality import metrics as qm


def feats(seed, n=300, d=8, shift=0.0, scale=1.0):
  rs = np.random.default_rng(seed)
  mix = rs.normal(size=(d, d)) / np.sqrt(d)
  return (rs.normal(size=(n, d)) @ mix) * scale + shift


def test_fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric():
  a, b = feats(0), feats(1, shift=0.5, scale=1.3)
  assert qm.frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-8)
  assert qm.frechet_distance_features(a, b) == pytest.approx(
    qm.frechet_distance_features(b, a), rel=1e-9
  )
  assert qm.frechet_distance_features(a, b) > 0.5


def test_fd_matches_scipy_sqrtm():
  a, b = feats(2, d=6), feats(3, d=6, shift=0.3, scale=0.7)
  mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
  assert qm.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)


def test_fd_closed_form_for_isotropic_gaussians():
  d = 4  # N(0, I) vs N(m, 4I): |m|^2 + d (1 + 4 - 2 * 2)
  m = np.full(d, 0.5)
  assert qm.frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(
    d * 0.25 + d
  )


def test_mmd2_unbiased_matches_double_loop():
  x, y = feats(4, n=7, d=3), feats(5, n=9, d=3, shift=0.2)
  k = lambda u, v: (u @ v / 3 + 1) ** 3
  m, n = len(x), len(y)
  sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  assert qm.mmd2_unbiased(x, y) == pytest.approx(sxx + syy - 2 * sxy, rel=1e-10)


def test_kid_subsets_and_standard_error():
  a, b = feats(6, n=50, d=4), feats(7, n=50, d=4, shift=1.0)
  one = qm.kid(a, b, num_subsets=1, subset_size=50)  # the whole sets, permuted
  assert one["kid"] == pytest.approx(qm.mmd2_unbiased(a, b), rel=1e-10)
  many = qm.kid(a, b, num_subsets=20, subset_size=20, seed=1)
  assert many["kid_subset_size"] == 20
  assert many["kid_stderr"] == pytest.approx(many["kid_std"] / np.sqrt(20))
  assert many["kid"] > 10 * many["kid_stderr"] > 0  # clearly different sets
  pool = feats(8, n=800, d=4)  # two halves of one sample: the same law
  same = qm.kid(pool[:400], pool[400:], num_subsets=20, subset_size=200)
  assert abs(same["kid"]) < 3 * same["kid_stderr"] + 1e-3  # unbiased: ~0 for equal laws


def test_precision_recall_on_points_on_a_line():
  # Real points 0..9: 3rd-NN radii are 2 inside, 3 at the ends.
  real = np.stack([np.arange(10.0), np.zeros(10)], 1)
  # Fake points: four within the real manifold, four far away.
  fake = np.stack([np.array([0.5, 1.5, 2.5, 3.5, 100, 101, 102, 103.0]), np.zeros(8)], 1)
  pr = qm.precision_recall(real, fake, k=3)
  assert pr["precision"] == pytest.approx(0.5)
  # Fake balls: 0.5 (r=3), 1.5 (2), 2.5 (2), 3.5 (3) cover [-2.5, 6.5]: reals 0..6.
  assert pr["recall"] == pytest.approx(0.7)
  full = qm.precision_recall(real, real, k=3)
  assert full["precision"] == 1.0 and full["recall"] == 1.0
  far = qm.precision_recall(real, real + 1000.0, k=3)
  assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_knn_radii_brute_force():
  f = feats(10, n=30, d=3)
  d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
  expected = np.sort(d, 1)[:, 3] ** 2
  np.testing.assert_allclose(qm.knn_radii(f, 3, chunk=7), expected, rtol=1e-8, atol=1e-10)


def test_classifier_score_and_histogram():
  confident = np.eye(10)[np.arange(100) % 10]  # every class, each sample certain
  assert qm.classifier_score(confident)["classifier_score"] == pytest.approx(10.0)
  collapsed = np.tile(np.eye(10)[3], (100, 1))  # one class only
  assert qm.classifier_score(collapsed)["classifier_score"] == pytest.approx(1.0)
  assert qm.classifier_score(np.full((50, 10), 0.1))["classifier_score"] == pytest.approx(1.0)
  h = qm.class_histogram(collapsed)
  assert h["class_counts"][3] == 100 and sum(h["class_counts"]) == 100
  assert h["class_tv_from_uniform"] == pytest.approx(0.9)
  assert qm.class_histogram(confident)["class_tv_from_uniform"] == pytest.approx(0.0)


def test_mean_pairwise_distance_brute_force():
  f = feats(11, n=40, d=5)
  d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
  expected = d[np.triu_indices(40, 1)].mean()
  assert qm.mean_pairwise_distance(f, chunk=9) == pytest.approx(expected, rel=1e-8)
  assert qm.mean_pairwise_distance(np.ones((5, 3))) == 0.0


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda: qm.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)), "mismatched"),
    (lambda: qm.kid(np.ones((5, 3)), np.ones((5, 4))), "feature dims differ"),
    (lambda: qm.precision_recall(np.ones((3, 2)), np.ones((10, 2)), k=3), "N >= 4"),
    (lambda: qm.feature_stats(np.full((4, 2), np.nan)), "non-finite"),
  ],
)
def test_metric_argument_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_precision_recall_with_kept_real_radii_is_the_same():
  rs = np.random.default_rng(1)
  real, fake = rs.normal(size=(60, 4)), rs.normal(0.3, 1.0, size=(25, 4))
  kept = qm.knn_radii(real, 3)
  assert qm.precision_recall(real, fake, 3, real_radii=kept) == qm.precision_recall(real, fake, 3)
  with pytest.raises(ValueError, match=r"real_radii must be \[60\]"):
    qm.precision_recall(real, fake, 3, real_radii=kept[:10])


def test_scores_on_class_probabilities_refuse_logits():
  logits = np.random.default_rng(0).normal(size=(50, 10)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  for fn in (qm.classifier_score, qm.class_histogram, qm.readable_fraction):
    fn(probs.astype(np.float32))  # a float32 softmax passes
    with pytest.raises(ValueError, match="probabilities"):
      fn(logits)
    with pytest.raises(ValueError, match="sum to 1"):
      fn(probs * 0.5)
