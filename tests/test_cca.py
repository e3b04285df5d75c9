"""CCA, SVCCA and PWCCA on synthetic views whose answer is known."""

import numpy as np
import pytest
from refsim.exporters.cca import canonical_correlations, pwcca, svcca

N = 4000


def gaussian(seed, n=N, d=8):
    return np.random.default_rng(seed).standard_normal((n, d))


def orthogonal(seed, d):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


@pytest.mark.parametrize("score", [pwcca, svcca])
def test_identical_views_score_one(score):
    x = gaussian(0) @ np.diag(np.linspace(1, 5, 8))
    assert score(x, x) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("score", [pwcca, svcca])
def test_rotated_scaled_and_shifted_views_score_one(score):
    x = gaussian(1)
    y = (x @ orthogonal(2, 8)) * 3.0 + 7.0
    assert score(x, y) == pytest.approx(1.0, abs=1e-9)
    mixed = x @ np.random.default_rng(3).standard_normal((8, 8))  # any invertible map
    assert score(x, mixed) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("score", [pwcca, svcca])
def test_independent_views_score_near_zero(score):
    assert score(gaussian(4), gaussian(5)) < 0.06


@pytest.mark.parametrize("score", [pwcca, svcca])
def test_many_neurons_few_samples_is_not_spuriously_one(score):
    # as many neurons as samples: plain CCA would find perfect correlations in noise
    assert score(gaussian(6, n=200, d=200), gaussian(7, n=200, d=200)) < 0.5


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_noisy_copy_has_the_expected_correlations(rho):
    x = gaussian(8, d=4)
    y = rho * x + np.sqrt(1 - rho ** 2) * gaussian(9, d=4)
    correlations, _ = canonical_correlations(x, y)
    assert correlations == pytest.approx(np.full(4, rho), abs=0.04)
    assert svcca(x, y) == pytest.approx(rho, abs=0.03)
    assert pwcca(x, y) == pytest.approx(rho, abs=0.03)


def test_half_shared_views():
    x = gaussian(10, d=4)
    y = np.concatenate([x[:, :2], gaussian(11, d=2)], axis=1)
    correlations, _ = canonical_correlations(x, y)
    assert correlations[:2] == pytest.approx([1, 1], abs=1e-9)
    assert correlations[2:] == pytest.approx([0, 0], abs=0.06)
    assert svcca(x, y) == pytest.approx(0.5, abs=0.03)


def test_pwcca_weights_the_directions_that_carry_the_representation():
    # x: one loud neuron y copies exactly, three quiet ones y does not see
    rng = np.random.default_rng(12)
    x = rng.standard_normal((N, 4)) * np.array([10.0, 0.1, 0.1, 0.1])
    y = np.concatenate([x[:, :1], rng.standard_normal((N, 3))], axis=1)
    assert svcca(x, y, topk=4) == pytest.approx(0.25, abs=0.05)
    assert pwcca(x, y) > 0.9


def test_svcca_topk_keeps_the_top_directions():
    rng = np.random.default_rng(13)
    signal = rng.standard_normal((N, 3)) * 10
    x = np.concatenate([signal, rng.standard_normal((N, 5)) * 0.01], axis=1)
    y = np.concatenate([signal @ orthogonal(14, 3), rng.standard_normal((N, 5)) * 0.01], axis=1)
    assert svcca(x, y, topk=3) == pytest.approx(1.0, abs=1e-6)
    assert svcca(x, y, topk=8) < 0.7  # the noise directions are independent


def test_first_canonical_correlation_matches_scikit_learn():
    from sklearn.cross_decomposition import CCA

    rng = np.random.default_rng(15)
    z = rng.standard_normal((N, 2))
    x = np.concatenate([z, rng.standard_normal((N, 3))], axis=1) @ rng.standard_normal((5, 5))
    y = np.concatenate([0.7 * z[:, :1] + 0.3 * rng.standard_normal((N, 1)), rng.standard_normal((N, 3))], axis=1)
    u, v = CCA(n_components=1, max_iter=2000, tol=1e-12).fit(x, y).transform(x, y)
    theirs = abs(np.corrcoef(u[:, 0], v[:, 0])[0, 1])
    ours, _ = canonical_correlations(x, y)
    assert ours[0] == pytest.approx(theirs, abs=1e-6)


def test_constant_views():
    zeros = np.zeros((100, 3))
    assert pwcca(zeros, zeros) == 1.0 and svcca(zeros, zeros) == 1.0
    assert pwcca(gaussian(16, n=100, d=3), zeros) == 0.0
