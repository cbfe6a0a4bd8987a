"""Tests for training/eval/metrics.py against analytic values and independent references."""

import unittest

import numpy as np

from training.eval import metrics

try:
    import scipy.linalg
except ImportError:  # The brute-force reference needs scipy; the other tests do not.
    scipy = None


def _brute_force_frechet(a, b):
    """Textbook formula with a general (non-symmetric) matrix square root of cov_a @ cov_b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


class FrechetDistanceTest(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(0)
        mixing = rng.normal(size=(6, 6))
        self.a = rng.normal(size=(400, 6)) @ mixing
        self.b = rng.normal(size=(300, 6)) @ (mixing + 0.5 * rng.normal(size=(6, 6))) + 1.0

    def test_identical_sets_give_zero(self):
        self.assertAlmostEqual(metrics.frechet_distance(self.a, self.a), 0.0, places=6)

    def test_mean_shift_adds_squared_norm(self):
        shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])  # ||shift||^2 = 15.25
        self.assertAlmostEqual(metrics.frechet_distance(self.a, self.a + shift), 15.25, places=6)

    def test_symmetric(self):
        self.assertAlmostEqual(metrics.frechet_distance(self.a, self.b),
                               metrics.frechet_distance(self.b, self.a), places=8)

    @unittest.skipIf(scipy is None, "scipy not installed")
    def test_matches_brute_force_reference(self):
        for seed in range(5):
            rng = np.random.default_rng(seed)
            a = rng.normal(size=(50, 4)) @ rng.normal(size=(4, 4))
            b = rng.normal(size=(60, 4)) @ rng.normal(size=(4, 4)) + rng.normal(size=4)
            self.assertAlmostEqual(metrics.frechet_distance(a, b), _brute_force_frechet(a, b),
                                   places=6)

    def test_diagonal_covariances_closed_form(self):
        # For diagonal covariances, d^2 = ||mu_a - mu_b||^2 + sum_i (sigma_a,i - sigma_b,i)^2.
        mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
        var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
        expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0) ** 2
        self.assertAlmostEqual(metrics.frechet_distance_from_stats(
            mu_a, np.diag(var_a), mu_b, np.diag(var_b)), expected, places=8)

    def test_rank_deficient_covariance_is_finite_and_non_negative(self):
        constant = np.ones((20, 6))
        distance = metrics.frechet_distance(constant, self.a)
        self.assertTrue(np.isfinite(distance))
        self.assertAlmostEqual(distance, metrics.frechet_distance(self.a, constant), places=6)
        self.assertGreater(distance, np.trace(np.cov(self.a, rowvar=False)) - 1e-6)

    def test_rejects_bad_shapes(self):
        with self.assertRaises(ValueError):
            metrics.frechet_distance(self.a, self.a[:, :3])
        with self.assertRaises(ValueError):
            metrics.frechet_distance(self.a[:1], self.a)


class ClassAccuracyTest(unittest.TestCase):
    def test_fraction_of_matches(self):
        self.assertEqual(metrics.class_accuracy([0, 1, 2, 3], [0, 1, 0, 3]), 0.75)
        self.assertEqual(metrics.class_accuracy([5, 5], [4, 4]), 0.0)

    def test_rejects_mismatched_or_empty(self):
        with self.assertRaises(ValueError):
            metrics.class_accuracy([0, 1], [0])
        with self.assertRaises(ValueError):
            metrics.class_accuracy([], [])


class DiversityTest(unittest.TestCase):
    def test_mean_pairwise_distance_of_a_3_4_5_triangle(self):
        points = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
        self.assertAlmostEqual(metrics.mean_pairwise_distance(points), 4.0)

    def test_within_class_diversity(self):
        features = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0], [1.0, 1.0],
                             [9.0, 9.0]])
        labels = np.array([2, 2, 2, 7, 7, 5])  # Class 5 has one member and is left out.
        diversity = metrics.within_class_diversity(features, labels)
        self.assertEqual(set(diversity), {2, 7})
        self.assertAlmostEqual(diversity[2], 4.0)
        self.assertEqual(diversity[7], 0.0)

    def test_ratio_to_real_data(self):
        rng = np.random.default_rng(1)
        real = rng.normal(size=(40, 5))
        labels = np.repeat([0, 1], 20)
        half_spread = metrics.diversity_ratio(real * 0.5, labels, real, labels)
        self.assertAlmostEqual(half_spread["mean"], 0.5)
        self.assertEqual(set(half_spread["per_class"]), {0, 1})
        collapsed = metrics.diversity_ratio(np.zeros_like(real), labels, real, labels)
        self.assertEqual(collapsed["mean"], 0.0)

    def test_ratio_without_common_classes_is_none(self):
        features = np.zeros((4, 2))
        result = metrics.diversity_ratio(features, [0, 0, 1, 1], features, [2, 2, 3, 3])
        self.assertEqual(result, {"per_class": {}, "mean": None})


if __name__ == "__main__":
    unittest.main()
