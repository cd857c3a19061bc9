"""Tests of ALPACA's noise models (``metafit.algorithms._noise_prior``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from metafit.algorithms import _noise_prior


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_likelihoods_are_scipys_also_at_a_nearly_gaussian_prior(dtype):
    """Student-t and Gaussian NLL against scipy, with degrees of freedom from 3 to 2e5
    (the prior's start, 1 + e^12): float32 must not lose the lgamma difference there."""
    rng = np.random.default_rng(0)
    y, mean = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    scale2 = rng.uniform(0.5, 2.0, size=(3, 4))
    dof = np.array([[3.0], [40.0], [2 * (1 + math.exp(_noise_prior.SHARED_SHAPE))]])
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    got = _noise_prior.nll(t(mean), t(scale2), t(y), t(dof)).double().numpy()
    want = -stats.t.logpdf(y, dof, mean, np.sqrt(scale2))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    gauss = _noise_prior.nll(t(mean), t(scale2), t(y)).double().numpy()
    np.testing.assert_allclose(gauss, -stats.norm.logpdf(y, mean, np.sqrt(scale2)),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(got[2], gauss[2], atol=1e-4)  # that far out: Gaussian


def test_the_student_predictive_is_the_normal_inverse_gamma_posteriors():
    """a_n = a0 + n/2, b_n = a0 sigma0^2 + surprise/2: 2 a_n degrees of freedom, squared
    scale b_n / a_n times the spread; a grid of prior values broadcasts in front."""
    rows, surprise = torch.tensor([4.0, 10.0]), torch.tensor([3.0, 0.5])
    spread = torch.tensor([[1.0, 1.5], [1.2, 2.0]])
    raw_shape, raw_noise = torch.tensor(0.7), torch.tensor(-0.4)
    dof, scale2 = _noise_prior.student(rows, surprise, spread, raw_shape, raw_noise)
    a0, s2 = 1 + math.exp(0.7), math.exp(-0.8)
    for i in range(2):
        a_n, b_n = a0 + rows[i] / 2, a0 * s2 + surprise[i] / 2
        assert float(dof[i, 0]) == pytest.approx(2 * a_n)
        torch.testing.assert_close(scale2[i], b_n / a_n * spread[i])
    grid_dof, grid_scale2 = _noise_prior.student(rows, surprise, spread, raw_shape,
                                                 torch.tensor([-0.4, 0.0, 0.3]))
    assert grid_scale2.shape == (3, 2, 2)
    torch.testing.assert_close(grid_scale2[0], scale2)


def test_fitting_recovers_the_prior_that_drew_the_tasks():
    """1,500 tasks whose noise variances are drawn from IG(a0, a0 sigma0^2) with a0 = 5,
    sigma0 = 0.5: the fit finds both numbers from their support and query rows (the
    prior's mean fitted perfectly: spread 1, surprise = the support's sum of squares)."""
    g = torch.Generator().manual_seed(0)
    n_tasks, n_support, n_query = 1500, 6, 8
    a0, sigma0 = 5.0, 0.5
    gamma = torch.distributions.Gamma(torch.tensor(a0), torch.tensor(a0 * sigma0**2))
    torch.manual_seed(1)
    variance = 1 / gamma.sample((n_tasks,))
    support = torch.randn(n_tasks, n_support, generator=g, dtype=torch.float64)
    query = torch.randn(n_tasks, n_query, generator=g, dtype=torch.float64)
    sd = variance.double().sqrt()[:, None]
    terms = [(torch.full((n_tasks,), float(n_support), dtype=torch.float64),
              (support * sd).pow(2).sum(1), torch.zeros(n_tasks, n_query, dtype=torch.float64),
              torch.ones(n_tasks, n_query, dtype=torch.float64), query * sd,
              torch.ones(n_tasks, n_query, dtype=torch.float64))]
    shape, noise = _noise_prior.fit_noise_prior(terms, raw_noise=0.0)
    assert 1 + math.exp(shape) == pytest.approx(a0, rel=0.3)
    assert math.exp(noise) == pytest.approx(sigma0, rel=0.1)
    # one noise level for all: the fit goes to the shared end of the range
    same = [(t[0], (support * 0.5).pow(2).sum(1), *t[2:4], query * 0.5, t[5])
            for t in terms]
    shape, noise = _noise_prior.fit_noise_prior(same, raw_noise=0.0)
    assert shape > 5.0 and math.exp(noise) == pytest.approx(0.5, rel=0.05)
    # no rows, or a likelihood nowhere finite: nothing to fit
    assert _noise_prior.fit_noise_prior([(*t[:5], torch.zeros_like(t[5]))
                                         for t in terms], 0.0) is None
    nan = [(*t[:4], torch.full_like(t[4], math.nan), t[5]) for t in terms]
    assert _noise_prior.fit_noise_prior(nan, 0.0) is None
