"""REML of the linear mixed model behind ``algorithm="lmm"`` in table mode
(``metafit/algorithms/_reml.py``), and its use by the estimator."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from metafit import MetaInitializedRegressor
from metafit.algorithms._reml import _precision, group_statistics, reml_criterion, reml_prior
from metafit.grouped import Standardization


def _simulated(n_groups=40, rows=(4, 15), seed=0):
    """Groups of unequal sizes from a mixed model with random intercepts and slopes."""
    rng = np.random.default_rng(seed)
    cov = np.array([[0.5, 0.2], [0.2, 0.8]])
    Z, y, labels = [], [], []
    for g in range(n_groups):
        n = int(rng.integers(*rows))
        x = rng.normal(size=(n, 1))
        design = np.c_[x, np.ones(n)]
        u = rng.multivariate_normal(np.zeros(2), cov)
        Z.append(design)
        y.append(design @ (np.array([1.5, -0.5]) + u) + 0.7 * rng.normal(size=n))
        labels.append(np.full(n, g))
    return Z, y, labels


def _dense_criterion(raw, Z_groups, y_groups, jitter=0.0):
    """-2 log REML likelihood (up to the constant) with every group's covariance written
    out in full, beta and sigma^2 profiled out: the definition, not the shortcut."""
    lam = _precision(torch.as_tensor(raw), jitter).numpy()
    D = np.linalg.inv(lam)
    H_inv = [np.linalg.inv(np.eye(len(z)) + z @ D @ z.T) for z in Z_groups]
    A = sum(z.T @ h @ z for z, h in zip(Z_groups, H_inv))
    a = sum(z.T @ h @ y for z, h, y in zip(Z_groups, H_inv, y_groups))
    beta = np.linalg.solve(A, a)
    rss = sum((y - z @ beta) @ h @ (y - z @ beta) for z, h, y in zip(Z_groups, H_inv, y_groups))
    dof = sum(len(y) for y in y_groups) - len(beta)
    sigma2 = rss / dof
    logdet_H = sum(-np.linalg.slogdet(h)[1] for h in H_inv)
    return dof * np.log(sigma2) + logdet_H + np.linalg.slogdet(A)[1], beta, sigma2


def _stats(Z, y):
    return group_statistics([torch.as_tensor(z) for z in Z], [torch.as_tensor(v) for v in y])


@pytest.mark.parametrize("seed", [0, 1])
def test_criterion_equals_the_dense_definition(seed):
    Z, y, _ = _simulated(n_groups=8, seed=seed)
    rng = np.random.default_rng(seed)
    raw = np.tril(rng.normal(scale=0.7, size=(2, 2)))
    value, beta, sigma2 = reml_criterion(torch.as_tensor(raw), _stats(Z, y), 1e-5)
    want, want_beta, want_sigma2 = _dense_criterion(raw, Z, y, 1e-5)
    np.testing.assert_allclose(float(value), want, rtol=1e-10)
    np.testing.assert_allclose(beta.numpy(), want_beta, rtol=1e-10)
    np.testing.assert_allclose(float(sigma2), want_sigma2, rtol=1e-10)


def test_estimate_is_a_minimum_and_recovers_the_simulated_model():
    Z, y, _ = _simulated(n_groups=200, seed=3)
    beta, raw, sigma2 = reml_prior([torch.as_tensor(z) for z in Z],
                                   [torch.as_tensor(v) for v in y])
    stats = _stats(Z, y)
    best = float(reml_criterion(raw, stats)[0])
    rng = np.random.default_rng(0)
    for _ in range(10):  # every nearby point is worse
        step = torch.as_tensor(np.tril(rng.normal(scale=0.05, size=(2, 2))))
        assert float(reml_criterion(raw + step, stats)[0]) > best
    cov = (sigma2 * torch.linalg.inv(_precision(raw, 0.0))).numpy()
    np.testing.assert_allclose(beta.numpy(), [1.5, -0.5], atol=0.2)
    np.testing.assert_allclose(cov, [[0.5, 0.2], [0.2, 0.8]], atol=0.2)
    assert abs(float(sigma2) - 0.49) < 0.05


def test_estimate_matches_statsmodels_mixedlm():
    sm = pytest.importorskip("statsmodels.api")
    Z, y, labels = _simulated(n_groups=60, seed=5)
    beta, raw, sigma2 = reml_prior([torch.as_tensor(z) for z in Z],
                                   [torch.as_tensor(v) for v in y])
    exog = np.concatenate(Z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sm.MixedLM(np.concatenate(y), exog, np.concatenate(labels),
                         exog_re=exog).fit(reml=True)
    relative = torch.linalg.inv(_precision(raw, 0.0)).numpy()
    np.testing.assert_allclose(beta.numpy(), fit.fe_params, atol=1e-4)
    np.testing.assert_allclose(relative, np.asarray(fit.cov_re) / fit.scale, atol=1e-3)
    np.testing.assert_allclose(float(sigma2), fit.scale, rtol=1e-4)


def test_unidentifiable_groups_give_none():
    one_row = [torch.ones(1, 2, dtype=torch.float64)]
    assert reml_prior(one_row, [torch.ones(1, dtype=torch.float64)]) is None
    constant = [torch.ones(5, 2, dtype=torch.float64) for _ in range(3)]  # rank 1 of 2
    assert reml_prior(constant, [torch.arange(5.0, dtype=torch.float64)] * 3) is None


def _table(seed=0):
    Z, y, labels = _simulated(n_groups=30, seed=seed)
    X = np.concatenate(Z)[:, :1] * 3.0 + 10.0  # raw units: the estimator standardizes
    return X, np.concatenate(y) * 2.0 + 5.0, np.concatenate(labels)


def test_lmm_table_mode_keeps_the_reml_prior_of_every_group():
    X, y, groups = _table()
    est = MetaInitializedRegressor(algorithm="lmm", meta_iterations=20, random_state=0,
                                   verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.meta_fit(X, y, groups=groups)
    meta = est.meta_init_.metadata
    assert meta["fitted_extras"] == ["alpaca_prior_factor", "alpaca_prior_mean"]
    assert meta["calibrated_extras"]  # the noise, from the validation groups, kept
    scaling = Standardization.from_metadata(meta["standardization"])
    Xs, ys = scaling.transform_X(X), scaling.transform_y(y)
    designs = [torch.as_tensor(np.c_[Xs[groups == g], np.ones((groups == g).sum())])
               for g in np.unique(groups)]
    want = reml_prior(designs, [torch.as_tensor(ys[groups == g]) for g in np.unique(groups)],
                      jitter=1e-5)
    tensors = est.meta_init_.tensors
    np.testing.assert_allclose(tensors["extra.alpaca_prior_mean"].numpy(), want[0], atol=1e-5)
    np.testing.assert_allclose(tensors["extra.alpaca_prior_factor"].numpy(), want[1],
                               atol=1e-4)
    # fit is the BLUP under that prior, in the table's units
    rows = np.flatnonzero(groups == 0)[:4]
    z = np.c_[Xs[rows], np.ones(len(rows))]
    lam = _precision(want[1], 1e-5).numpy()
    k = np.linalg.solve(z.T @ z + lam, z.T @ ys[rows] + lam @ want[0].numpy())
    Xq = X[np.flatnonzero(groups == 0)[4:]]
    expected = scaling.inverse_y(np.c_[scaling.transform_X(Xq), np.ones(len(Xq))] @ k)
    np.testing.assert_allclose(est.fit(X[rows], y[rows]).predict(Xq), expected.ravel(),
                               rtol=1e-4)


def test_validation_scores_the_prior_of_the_training_groups_alone(monkeypatch):
    """The score that weighs lmm in the defaults' ensemble is honest: the validation
    groups score the prior fitted without them, and join it only afterwards."""
    from metafit.algorithms.alpaca import LinearMixedModel
    from metafit.estimators._meta_fit_run import MetaFitRun

    seen, scored = [], []
    fitted_extras, choose = LinearMixedModel.fitted_extras, MetaFitRun._choose_adaptation

    def counting(self, ctx, groups):
        seen.append(len(groups))
        return fitted_extras(self, ctx, groups)

    def scoring(self, meta_init, val):
        scored.append(meta_init.tensors["extra.alpaca_prior_mean"].clone())
        return choose(self, meta_init, val)

    monkeypatch.setattr(LinearMixedModel, "fitted_extras", counting)
    monkeypatch.setattr(MetaFitRun, "_choose_adaptation", scoring)
    X, y, groups = _table(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = MetaInitializedRegressor(algorithm="lmm", meta_iterations=20, random_state=0,
                                       verbose=0).meta_fit(X, y, groups=groups)
    n_val = round(0.2 * 30)
    assert seen == [30 - n_val, 30]
    final = est.meta_init_.tensors["extra.alpaca_prior_mean"]
    assert len(scored) == 1 and not torch.allclose(scored[0], final)
    assert est.meta_init_.metadata["validation_score"] is not None


def test_task_mode_and_alpaca_fit_no_extras():
    rng = np.random.default_rng(0)
    tasks = [(rng.normal(size=(5, 1)), rng.normal(size=5), rng.normal(size=(5, 1)),
              rng.normal(size=5)) for _ in range(20)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lmm = MetaInitializedRegressor(algorithm="lmm", meta_iterations=5, meta_batch_size=4,
                                       verbose=0).meta_fit(tasks)
        X, y, groups = _table()
        alpaca = MetaInitializedRegressor(algorithm="alpaca", meta_iterations=5,
                                          verbose=0).meta_fit(X, y, groups=groups)
    assert "fitted_extras" not in lmm.meta_init_.metadata
    assert "fitted_extras" not in alpaca.meta_init_.metadata


def test_a_group_level_column_gets_a_fixed_effect_only(monkeypatch):
    """A column constant within every group has no within-group slope: REML holds its
    random variance at the bound, uncorrelated with the others, and lmm finds such
    columns itself."""
    from metafit.algorithms._reml import _BOUND
    from metafit.algorithms.alpaca import LinearMixedModel

    Z, y, _ = _simulated(n_groups=40, seed=2)
    rng = np.random.default_rng(2)
    level = [np.full((len(z), 1), rng.normal()) for z in Z]  # one value per group
    designs = [np.c_[z[:, :1], g, z[:, 1:]] for z, g in zip(Z, level)]
    y = [v + 0.8 * g[:, 0] for v, g in zip(y, level)]
    beta, raw, _ = reml_prior([torch.as_tensor(d) for d in designs],
                              [torch.as_tensor(v) for v in y], fixed_only=[1])
    assert float(raw[1, 1]) == _BOUND and float(raw[1, 0]) == 0 and float(raw[2, 1]) == 0
    assert abs(float(beta[1]) - 0.8) < 0.3  # its fixed effect is still estimated
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return reml_prior(*args, **kwargs)

    monkeypatch.setattr("metafit.algorithms.alpaca.reml_prior", spy)
    groups = [(torch.as_tensor(d[:, :2]), torch.as_tensor(v)) for d, v in zip(designs, y)]
    assert LinearMixedModel().fitted_extras(None, groups)
    assert seen["fixed_only"] == [1]
