"""Metric correctness against independent computations (numpy/scipy closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import jensenshannon
from scipy.stats import ortho_group

from analysis import metrics as M


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def _cka_reference(x, y):
    """Kornblith et al. eq. via explicit centring matrix H and HSIC on Gram matrices."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


@pytest.mark.parametrize("n,d", [(50, 8), (10, 30)])  # feature-space and Gram-space branches
def test_cka_self_rotation_scale_and_reference(rng, n, d):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    q = ortho_group.rvs(d, random_state=1)
    assert M.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert M.linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert M.linear_cka(x, 3.7 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-10)  # isotropic scale + shift
    y = rng.normal(size=(n, d + 3))
    ref = _cka_reference(x, y)
    assert M.linear_cka(x, y) == pytest.approx(ref, rel=1e-10)
    assert 0.0 < M.linear_cka(x, y) < 0.9
    # a non-orthogonal (anisotropic) map does change CKA
    assert M.linear_cka(x, x * np.linspace(0.1, 10, d)) < 0.999


def test_cka_from_moments_and_matrix_match_direct(rng):
    x = rng.normal(size=(200, 6)) + 3.0
    y = np.tanh(x @ rng.normal(size=(6, 4))) + rng.normal(scale=0.3, size=(200, 4))
    direct = M.linear_cka(x, y)
    mom = M.cka_from_moments(200, x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y)
    assert mom == pytest.approx(direct, rel=1e-9)
    z = rng.normal(size=(200, 5))
    mat = M.cka_matrix([M.centred_gram(a) for a in (x, y, z)])
    assert np.allclose(np.diag(mat), 1.0)
    assert mat[0, 1] == pytest.approx(direct, rel=1e-9)
    assert mat[1, 2] == pytest.approx(M.linear_cka(y, z), rel=1e-9)
    assert np.allclose(mat, mat.T)


def _kl_reference(m0, s0, m1, s1):
    d = len(m0)
    inv1 = np.linalg.inv(s1)
    return 0.5 * (np.trace(inv1 @ s0) + (m1 - m0) @ inv1 @ (m1 - m0) - d
                  + np.linalg.slogdet(s1)[1] - np.linalg.slogdet(s0)[1])


def _frechet_reference(m0, s0, m1, s1):
    covmean = scipy.linalg.sqrtm(s0 @ s1)
    return float(np.sum((m0 - m1) ** 2) + np.trace(s0) + np.trace(s1) - 2 * np.trace(covmean).real)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_gaussian_kl_and_frechet_closed_forms(rng):
    d = 7
    m0, m1 = rng.normal(size=d), rng.normal(size=d)
    s0, s1 = _random_spd(rng, d), _random_spd(rng, d)
    assert M.gaussian_kl(m0, s0, m0, s0) == pytest.approx(0.0, abs=1e-10)
    assert M.frechet_distance(m0, s0, m0, s0) == pytest.approx(0.0, abs=1e-8)
    assert M.gaussian_kl(m0, s0, m1, s1) == pytest.approx(_kl_reference(m0, s0, m1, s1), rel=1e-9)
    assert M.gaussian_kl(m1, s1, m0, s0) == pytest.approx(_kl_reference(m1, s1, m0, s0), rel=1e-9)
    assert M.frechet_distance(m0, s0, m1, s1) == pytest.approx(_frechet_reference(m0, s0, m1, s1), rel=1e-7)
    # 1-D textbook forms
    kl1 = math.log(2.0 / 1.5) + (1.5 ** 2 + (0.3 - 1.0) ** 2) / (2 * 2.0 ** 2) - 0.5
    assert M.gaussian_kl([0.3], [[1.5 ** 2]], [1.0], [[2.0 ** 2]]) == pytest.approx(kl1, rel=1e-12)
    assert M.frechet_distance([0.3], [[1.5 ** 2]], [1.0], [[2.0 ** 2]]) == pytest.approx(0.7 ** 2 + 0.5 ** 2)


def test_distribution_metrics_on_samples(rng):
    x = rng.normal(size=(4000, 5)) @ rng.normal(size=(5, 5))
    ga = M.Gaussian.fit(x)
    assert np.allclose(ga.cov, np.cov(x.T, bias=True))
    same = M.distribution_metrics(ga, M.Gaussian.fit(x.copy()))
    assert same["cos_mean"] == pytest.approx(1.0)
    for k in ("mean_gap_rms", "mean_gap_rel", "var_gap_rms", "log_var_ratio", "kl_ab", "kl_ba", "frechet"):
        assert same[k] == pytest.approx(0.0, abs=1e-8), k
    shifted = M.distribution_metrics(ga, M.Gaussian.fit(x + 2.0))
    assert shifted["mean_gap_rms"] == pytest.approx(2.0)
    assert shifted["frechet"] == pytest.approx(4.0 * 5, rel=1e-6)  # covariances equal: only ||dmu||^2 left
    assert shifted["log_var_ratio"] == pytest.approx(0.0, abs=1e-9)


def test_js_divergence_bounds_and_reference(rng):
    p, q = rng.random(20), rng.random(20)
    assert M.js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert M.js_divergence(p, 5 * p) == pytest.approx(0.0, abs=1e-12)  # normalised
    ref = jensenshannon(p, q) ** 2  # scipy: sqrt of JS, natural log
    assert M.js_divergence(p, q) == pytest.approx(ref, rel=1e-10)
    disjoint = M.js_divergence([1, 1, 0, 0], [0, 0, 2, 3])
    assert disjoint == pytest.approx(math.log(2))
    many = M.js_divergence(rng.random((100, 16)) ** 4, rng.random((100, 16)) ** 4)
    assert many.shape == (100,) and (many >= 0).all() and (many <= math.log(2) + 1e-12).all()
    assert M.js_divergence(np.ones((3, 3)), np.ones(9).reshape(3, 3))[0] == pytest.approx(0.0)  # 2-D = batch
    with pytest.raises(ValueError):
        M.js_divergence([-1, 2], [1, 1])


def test_topk_iou_hand_made_maps():
    a = np.array([[9, 8, 0, 0],
                  [7, 6, 0, 0],
                  [0, 0, 0, 0],
                  [0, 0, 0, 1]], float)
    b = np.array([[0, 9, 0, 0],
                  [0, 8, 7, 0],
                  [0, 0, 6, 0],
                  [0, 0, 0, 0]], float)
    # top 25% = 4 cells: a -> {(0,0),(0,1),(1,0),(1,1)}, b -> {(0,1),(1,1),(1,2),(2,2)}
    assert M.topk_iou(a, b, 25) == pytest.approx(2 / 6)
    assert M.topk_iou(a, a, 25) == 1.0
    # top 1 cell each: (0,0) vs (0,1) -> disjoint
    assert M.topk_iou(a, b, 100 / 16) == 0.0
    assert M.topk_mask(a, 10).sum() == 2  # ceil(1.6)
    with pytest.raises(ValueError):
        M.topk_iou(a, b[:2], 25)
