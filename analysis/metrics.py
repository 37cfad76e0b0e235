"""Similarity and divergence measures used by the reports (numpy, float64).

Representations are matrices ``X [n, d]`` (n samples, d features); two
representations compared by CKA must have the same n (matched samples), not the
same d. Distributions are summarised as Gaussians ``(mean [d], cov [d, d])``.

- :func:`linear_cka`: linear centred kernel alignment (Kornblith et al. 2019),
  ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``; 1 for identical
  representations and invariant to orthogonal transforms and isotropic scaling.
- :func:`cka_from_moments`: the same from streamed sums (no sample matrix kept).
- :func:`gaussian_kl`, :func:`frechet_distance`: closed forms between Gaussians.
- :func:`js_divergence`: Jensen-Shannon divergence of two discrete distributions
  (natural log, so in ``[0, ln 2]``).
- :func:`topk_iou`: IoU of the top-k% cells of two maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


# ---------------------------------------------------------------------------
# CKA
# ---------------------------------------------------------------------------
def _centre(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a [n, d] matrix, got shape {x.shape}")
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between ``x [n, d1]`` and ``y [n, d2]`` (rows are matched samples).

    Uses the feature-space form when ``d`` is small and the Gram (sample-space)
    form when ``n`` is smaller; both are exact. Returns NaN when either side is
    constant (zero variance).
    """
    x, y = _centre(x), _centre(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs matched samples: {x.shape[0]} vs {y.shape[0]} rows")
    n = x.shape[0]
    if n <= max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T
        hsic_xy, hsic_xx, hsic_yy = (kx * ky).sum(), (kx * kx).sum(), (ky * ky).sum()
    else:
        xy, xx, yy = y.T @ x, x.T @ x, y.T @ y
        hsic_xy, hsic_xx, hsic_yy = (xy * xy).sum(), (xx * xx).sum(), (yy * yy).sum()
    den = math.sqrt(hsic_xx) * math.sqrt(hsic_yy)
    return float(hsic_xy / den) if den > 0 else float("nan")


def cka_from_moments(n: int, sum_x: np.ndarray, sum_y: np.ndarray, xx: np.ndarray, yy: np.ndarray,
                     xy: np.ndarray) -> float:
    """Linear CKA from streamed moments of matched samples.

    Args:
        n: number of samples; ``sum_x [d1]``, ``sum_y [d2]``: column sums;
        ``xx = X^T X [d1, d1]``, ``yy = Y^T Y [d2, d2]``, ``xy = X^T Y [d1, d2]`` (uncentred).
    """
    mx, my = sum_x / n, sum_y / n
    cxx = xx - n * np.outer(mx, mx)
    cyy = yy - n * np.outer(my, my)
    cxy = xy - n * np.outer(mx, my)
    den = np.linalg.norm(cxx) * np.linalg.norm(cyy)
    return float((cxy * cxy).sum() / den) if den > 0 else float("nan")


def cka_matrix(grams: list[np.ndarray]) -> np.ndarray:
    """Pairwise linear CKA from centred Gram matrices ``K_l = Xc_l Xc_l^T [n, n]`` -> ``[L, L]``.

    ``HSIC(l, m) = <K_l, K_m>_F`` accumulated in float64, one pair at a time (no stacked copy).
    """
    n = len(grams)
    hsic = np.zeros((n, n))
    for i in range(n):
        gi = grams[i].astype(np.float64, copy=False).ravel()
        for j in range(i, n):
            hsic[i, j] = hsic[j, i] = float(gi @ grams[j].astype(np.float64, copy=False).ravel())
    norms = np.sqrt(np.clip(np.diag(hsic), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        return hsic / np.outer(norms, norms)


def centred_gram(x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """``Xc Xc^T`` of a ``[n, d]`` matrix (columns centred in float64, product in ``dtype``)."""
    x = _centre(x).astype(dtype, copy=False)
    return x @ x.T


# ---------------------------------------------------------------------------
# Gaussian summaries
# ---------------------------------------------------------------------------
@dataclass
class Gaussian:
    """Mean ``[d]`` and covariance ``[d, d]`` (float64) of a token distribution."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @property
    def var(self) -> np.ndarray:
        return np.diag(self.cov).copy()

    @classmethod
    def fit(cls, x: np.ndarray) -> "Gaussian":
        """Maximum-likelihood fit (covariance divided by n) of ``x [n, d]``."""
        x = np.asarray(x, dtype=np.float64)
        mu = x.mean(0)
        xc = x - mu
        return cls(mu, xc.T @ xc / x.shape[0], x.shape[0])


def regularise(cov: np.ndarray, ridge: float) -> np.ndarray:
    """``cov + ridge * mean(diag(cov)) * I``: keeps rank-deficient covariances invertible."""
    d = cov.shape[0]
    scale = float(np.trace(cov)) / d if d else 0.0
    return cov + (ridge * (scale if scale > 0 else 1.0)) * np.eye(d)


def gaussian_kl(mu0: np.ndarray, cov0: np.ndarray, mu1: np.ndarray, cov1: np.ndarray) -> float:
    """``KL(N(mu0, cov0) || N(mu1, cov1))`` in nats.

    ``0.5 * [tr(S1^-1 S0) + (mu1-mu0)^T S1^-1 (mu1-mu0) - d + ln det S1 - ln det S0]``,
    evaluated with Cholesky factors. Both covariances must be positive definite
    (see :func:`regularise`).
    """
    mu0, mu1 = np.asarray(mu0, np.float64), np.asarray(mu1, np.float64)
    d = mu0.shape[0]
    l0 = np.linalg.cholesky(np.asarray(cov0, np.float64))
    l1 = np.linalg.cholesky(np.asarray(cov1, np.float64))
    from scipy.linalg import solve_triangular

    m = solve_triangular(l1, l0, lower=True)  # L1^-1 L0 -> tr(S1^-1 S0) = ||m||_F^2
    v = solve_triangular(l1, mu1 - mu0, lower=True)
    logdet0 = 2.0 * np.log(np.diag(l0)).sum()
    logdet1 = 2.0 * np.log(np.diag(l1)).sum()
    kl = 0.5 * ((m * m).sum() + (v * v).sum() - d + logdet1 - logdet0)
    return float(max(kl, 0.0))


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(np.asarray(cov, np.float64))
    w = np.clip(w, 0.0, None)
    return (v * np.sqrt(w)) @ v.T


def frechet_distance(mu0: np.ndarray, cov0: np.ndarray, mu1: np.ndarray, cov1: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between Gaussians.

    ``||mu0-mu1||^2 + tr(S0) + tr(S1) - 2 tr((S0^1/2 S1 S0^1/2)^1/2)``; the last trace is
    the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``S0^1/2 S1 S0^1/2`` (numerically stable; no complex ``sqrtm`` residue).
    """
    mu0, mu1 = np.asarray(mu0, np.float64), np.asarray(mu1, np.float64)
    s0h = _psd_sqrt(cov0)
    mid = s0h @ np.asarray(cov1, np.float64) @ s0h
    mid = 0.5 * (mid + mid.T)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(mid), 0.0, None)).sum()
    diff = mu0 - mu1
    fd = diff @ diff + np.trace(cov0) + np.trace(cov1) - 2.0 * tr_sqrt
    return float(max(fd, 0.0))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (NaN if one is zero)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float("nan")


def moment_gaps(a: Gaussian, b: Gaussian) -> dict[str, float]:
    """Per-dimension mean/variance gaps summarised as scalars.

    - ``mean_gap_rms``: ``sqrt(mean_d (mu_a - mu_b)^2)``
    - ``mean_gap_rel``: ``||mu_a - mu_b|| / sqrt(mean(tr S_a, tr S_b))`` (gap in units of the spread)
    - ``var_gap_rms``: ``sqrt(mean_d (var_a - var_b)^2)``
    - ``log_var_ratio``: ``mean_d |ln(var_a / var_b)|`` (scale-free; 0 when equal)
    """
    dm = a.mean - b.mean
    va, vb = a.var, b.var
    spread = math.sqrt(max(0.5 * (va.sum() + vb.sum()), 1e-300))
    tiny = 1e-12 * max(float(va.mean()), float(vb.mean()), 1e-300)
    return {
        "mean_gap_rms": float(np.sqrt(np.mean(dm * dm))),
        "mean_gap_rel": float(np.linalg.norm(dm) / spread),
        "var_gap_rms": float(np.sqrt(np.mean((va - vb) ** 2))),
        "log_var_ratio": float(np.mean(np.abs(np.log((va + tiny) / (vb + tiny))))),
    }


def distribution_metrics(a: Gaussian, b: Gaussian, ridge: float = 1e-4) -> dict[str, float]:
    """Cosine of means, moment gaps, KL both ways (+ symmetric mean) and Fréchet distance."""
    ca, cb = regularise(a.cov, ridge), regularise(b.cov, ridge)
    kl_ab, kl_ba = gaussian_kl(a.mean, ca, b.mean, cb), gaussian_kl(b.mean, cb, a.mean, ca)
    d = a.mean.shape[0]
    return {
        "cos_mean": cosine(a.mean, b.mean),
        **moment_gaps(a, b),
        "kl_ab": kl_ab, "kl_ba": kl_ba, "kl_sym": 0.5 * (kl_ab + kl_ba), "kl_sym_per_dim": 0.5 * (kl_ab + kl_ba) / d,
        "frechet": frechet_distance(a.mean, a.cov, b.mean, b.cov),
    }


# ---------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------
def _as_dist(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    if (p < 0).any():
        raise ValueError("a probability map must be non-negative")
    s = p.sum(axis=-1, keepdims=True)
    return np.divide(p, s, out=np.full_like(p, 1.0 / p.shape[-1]), where=s > 0)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float | np.ndarray:
    """Jensen-Shannon divergence (nats) of non-negative maps; flattened, normalised to sum 1.

    ``0.5 KL(p||m) + 0.5 KL(q||m)`` with ``m = (p+q)/2``; bounded by ``ln 2``.
    Leading dimensions are batch dimensions when the inputs are 2-D ``[B, K]``.
    """
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    batched = p.ndim == 2
    p = _as_dist(p.reshape(p.shape[0], -1) if batched else p.reshape(1, -1))
    q = _as_dist(q.reshape(q.shape[0], -1) if batched else q.reshape(1, -1))
    m = 0.5 * (p + q)

    def _kl(a: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(a > 0, a * np.log(a / m), 0.0)
        return t.sum(-1)

    js = np.clip(0.5 * _kl(p) + 0.5 * _kl(q), 0.0, math.log(2.0))
    return js if batched else float(js[0])


def topk_mask(a: np.ndarray, k_percent: float) -> np.ndarray:
    """Boolean mask of the ``ceil(k% * size)`` largest cells (ties broken by position, stable)."""
    flat = np.asarray(a, np.float64).ravel()
    k = max(1, math.ceil(flat.size * k_percent / 100.0))
    order = np.argsort(-flat, kind="stable")[:k]
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    return mask.reshape(np.shape(a))


def topk_iou(a: np.ndarray, b: np.ndarray, k_percent: float = 10.0) -> float:
    """Intersection over union of the top-``k_percent`` cells of two same-shape maps."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"maps must have the same shape: {np.shape(a)} vs {np.shape(b)}")
    ma, mb = topk_mask(a, k_percent), topk_mask(b, k_percent)
    return float((ma & mb).sum() / (ma | mb).sum())
