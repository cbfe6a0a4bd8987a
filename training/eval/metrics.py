"""Pure metric functions over classifier features and predictions (numpy in, Python floats out).

Features are float arrays [N, D] (e.g. the classifier's 128-d penultimate activations).
"""

import numpy as np


def _sqrt_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix via eigendecomposition.

    The input is symmetrized first and tiny negative eigenvalues (round-off) are clipped to 0, so
    the result is real, symmetric and PSD.
    """
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def gaussian_stats(features):
    """Returns (mean [D], covariance [D, D]) of features [N, D] in float64 (covariance ddof=1)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b):
    """Frechet distance between Gaussians N(mu_a, cov_a) and N(mu_b, cov_b).

    d^2 = ||mu_a - mu_b||^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^(1/2)).
    The trace term uses tr((A B)^(1/2)) = tr((A^(1/2) B A^(1/2))^(1/2)): the eigenvalues of A B
    equal those of the symmetric PSD matrix A^(1/2) B A^(1/2), so only symmetric eigensolves are
    needed and no complex round-off appears (unlike sqrtm of the non-symmetric product).
    Returns a float >= 0 (clipped at 0 against round-off).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"shape mismatch: means {mu_a.shape} vs {mu_b.shape}, "
                         f"covariances {cov_a.shape} vs {cov_b.shape}")
    sqrt_a = _sqrt_psd(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(distance, 0.0))


def frechet_distance(features_a, features_b):
    """Frechet distance between Gaussian fits of two feature sets [N_a, D] and [N_b, D] (FID when
    the features come from the evaluation classifier). Symmetric; ~0 for identical sets."""
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


def class_accuracy(predicted, prompted):
    """Fraction of images whose predicted class equals the prompted class.

    predicted, prompted: integer arrays [N] (predicted = argmax of the classifier's logits).
    """
    predicted, prompted = np.asarray(predicted), np.asarray(prompted)
    if predicted.shape != prompted.shape or predicted.ndim != 1 or len(predicted) == 0:
        raise ValueError(
            f"need two non-empty [N] arrays, got {predicted.shape} and {prompted.shape}")
    return float(np.mean(predicted == prompted))


def mean_pairwise_distance(features):
    """Mean Euclidean distance over all unordered pairs of rows of features [N >= 2, D]."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    squared_norms = (features ** 2).sum(1)
    squared = squared_norms[:, None] + squared_norms[None, :] - 2 * features @ features.T
    upper = np.triu_indices(len(features), k=1)
    return float(np.sqrt(np.clip(squared[upper], 0, None)).mean())


def within_class_diversity(features, labels):
    """Mean pairwise feature distance within each class: {class: distance} for every class with at
    least 2 members. features [N, D], labels integer [N]."""
    features, labels = np.asarray(features), np.asarray(labels)
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    return {int(c): mean_pairwise_distance(features[labels == c])
            for c in np.unique(labels) if np.sum(labels == c) >= 2}


def diversity_ratio(features, labels, real_features, real_labels):
    """Within-class diversity of a (generated) set relative to real data.

    Returns {"per_class": {class: ratio}, "mean": mean ratio} over classes with >= 2 members in
    both sets; ratio = diversity(set) / diversity(real). ~1 matches real variety; ~0 means mode
    collapse (every image of a class alike). "mean" is None when no class qualifies.
    """
    ours = within_class_diversity(features, labels)
    real = within_class_diversity(real_features, real_labels)
    per_class = {c: ours[c] / real[c] for c in sorted(ours) if c in real and real[c] > 0}
    mean = float(np.mean(list(per_class.values()))) if per_class else None
    return {"per_class": per_class, "mean": mean}
