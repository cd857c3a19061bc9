"""Tests of ALPACA, the Bayesian last layer (``metafit.algorithms.alpaca``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from metafit import MetaInit, MetaInitializedRegressor, SinusoidTasks
from metafit.algorithms import ALPACA
from metafit.learner import MetaLearner
from metafit.models import MLP


def _learner(n_in=3, n_features=4, hidden=(8,), seed=0, linear=True, noise="per_task"):
    torch.manual_seed(seed)
    net = MLP(n_in, n_features, hidden_sizes=hidden)
    algorithm = ALPACA(n_features, linear_features=linear, noise=noise)
    learner = MetaLearner(net, loss="mse", algorithm=algorithm, inner_lr=0.01,
                          inner_steps=1, dtype=torch.float64)
    with torch.no_grad():
        for v in learner.extras.values():
            v.copy_(0.3 * torch.randn(v.shape, dtype=torch.float64))
    return learner


@pytest.mark.parametrize("noise", ["per_task", "shared"])
@pytest.mark.parametrize("linear", [True, False])
def test_the_posterior_and_the_predictive_match_numpy_in_float64(linear, noise):
    """Features: the network's outputs, the raw columns (``linear_features``), a 1. The
    per-task noise's Normal-Inverse-Gamma posterior from its textbook form, the
    predictive likelihood from scipy's Student-t (shared noise: Gaussian)."""
    from scipy import stats

    learner = _learner(linear=linear, noise=noise)
    rng = np.random.default_rng(0)
    Xs, ys = rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 6))
    Xq, yq = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4))
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    adapted = learner.adapt(t(Xs), t(ys), track_graph=False)
    mean, var = learner.predict_distribution(adapted, t(Xq))
    from metafit.tasks import TaskBatch

    with torch.no_grad():
        nll = learner.algorithm.query_nll(learner, adapted,
                                          TaskBatch(t(Xs), t(ys), t(Xq), t(yq)))
    k0, lam0, noise0 = (x.detach().numpy() for x in ALPACA.prior(learner))
    if noise == "per_task":
        a0 = 1 + np.exp(float(learner.extras["alpaca_log_shape"].detach()))
    def feats(X):
        with torch.no_grad():
            raw = [X] if linear else []
            return np.concatenate([learner.module(t(X)).numpy(), *raw, np.ones((len(X), 1))],
                                  1)

    for i in range(2):
        P, Q = feats(Xs[i]), feats(Xq[i])
        lam_n = P.T @ P + lam0
        k_n = np.linalg.solve(lam_n, P.T @ ys[i] + lam0 @ k0)
        np.testing.assert_allclose(adapted["alpaca.k"][i].detach().numpy(), k_n, rtol=1e-9)
        np.testing.assert_allclose(mean[i].numpy(), Q @ k_n, rtol=1e-9, atol=1e-12)
        spread = 1 + np.einsum("nd,de,ne->n", Q, np.linalg.inv(lam_n), Q)
        if noise == "shared":
            want_var = noise0 * spread
            want_nll = -stats.norm.logpdf(yq[i], Q @ k_n, np.sqrt(want_var))
        else:
            a_n = a0 + len(ys[i]) / 2
            b_n = a0 * noise0 + 0.5 * (ys[i] @ ys[i] + k0 @ lam0 @ k0 - k_n @ lam_n @ k_n)
            dof, scale2 = 2 * a_n, b_n / a_n * spread
            want_var = scale2 * dof / (dof - 2)
            want_nll = -stats.t.logpdf(yq[i], dof, Q @ k_n, np.sqrt(scale2))
        np.testing.assert_allclose(var[i].numpy(), want_var, rtol=1e-9)
        np.testing.assert_allclose(nll[i].numpy(), want_nll, rtol=1e-9)
    # predict (the estimators' path) is the predictive mean.
    out = learner.predict(adapted, t(Xq))
    np.testing.assert_allclose(out[..., 0].numpy(), mean.numpy())


def test_padding_rows_leave_the_noise_posterior_alone():
    """A task padded with junk rows (mask 0) has the unpadded task's posterior, noise
    statistics included, and the same predictive."""
    learner = _learner()
    g = torch.Generator().manual_seed(0)
    Xs, ys = torch.randn(1, 5, 3, generator=g, dtype=torch.float64), torch.randn(
        1, 5, generator=g, dtype=torch.float64)
    Xq = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    padded_X = torch.cat([Xs, 50 * torch.randn(1, 3, 3, generator=g, dtype=torch.float64)], 1)
    padded_y = torch.cat([ys, torch.full((1, 3), 9.0, dtype=torch.float64)], 1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], 1).double()
    plain = learner.adapt(Xs, ys, track_graph=False)
    padded = learner.adapt(padded_X, padded_y, track_graph=False, mask=mask)
    for key in ("alpaca.k", "alpaca.rows", "alpaca.surprise"):
        torch.testing.assert_close(padded[key], plain[key])
    for a, b in zip(learner.predict_distribution(padded, Xq),
                    learner.predict_distribution(plain, Xq)):
        torch.testing.assert_close(a, b)


def test_a_task_whose_support_rows_surprise_the_prior_gets_wider_intervals():
    """Per-task noise: the same inputs, support targets twice as far from the prior's
    mean, a wider predictive; one shared noise level gives both tasks the same width."""
    for noise, wider in (("per_task", True), ("shared", False)):
        learner = _learner(noise=noise)
        g = torch.Generator().manual_seed(1)
        Xs = torch.randn(1, 8, 3, generator=g, dtype=torch.float64).expand(2, 8, 3)
        Xq = torch.randn(1, 4, 3, generator=g, dtype=torch.float64).expand(2, 4, 3)
        with torch.no_grad():
            prior_mean = learner.adapt(Xs[:1, :0], torch.zeros(1, 0, dtype=torch.float64),
                                       track_graph=False)
            centre = learner.predict(prior_mean, Xs[:1])[..., 0]
        e = torch.randn(1, 8, generator=g, dtype=torch.float64)
        ys = torch.cat([centre + e, centre + 2 * e])
        _, var = learner.predict_distribution(learner.adapt(Xs, ys, track_graph=False), Xq)
        if wider:
            assert bool((var[1] > 1.5 * var[0]).all())
        else:
            torch.testing.assert_close(var[1], var[0])


def test_with_identity_features_the_posterior_mean_is_the_mixed_models_blup():
    """y = X beta + X b + e, b ~ N(0, G), e ~ N(0, s2): the BLUP of a new group is
    X_q (beta + (G^-1 + X_s^T X_s / s2)^-1 X_s^T (y_s - X_s beta) / s2)."""
    n_in = 2
    learner = _learner(n_in=n_in, n_features=n_in, hidden=(), linear=False)
    rng = np.random.default_rng(1)
    beta = np.array([0.5, -1.0, 2.0])  # two slopes and the intercept (the constant feature)
    A = rng.normal(size=(3, 3))
    G = A @ A.T + 0.5 * np.eye(3)
    s2 = 0.3
    with torch.no_grad():
        layer = learner.module.layers[0]
        layer.weight.copy_(torch.eye(n_in, dtype=torch.float64))
        layer.bias.zero_()
        lam0 = s2 * np.linalg.inv(G)  # prior covariance s2 * lam0^-1 = G
        L = np.linalg.cholesky(lam0 - 1e-5 * np.eye(3))  # the model adds a jitter
        raw = np.tril(L, -1) + np.diag(np.log(np.diag(L)))
        learner.extras["alpaca_prior_factor"].copy_(torch.as_tensor(raw))
        learner.extras["alpaca_prior_mean"].copy_(torch.as_tensor(beta))
        learner.extras["alpaca_log_noise"].fill_(0.5 * np.log(s2))
    Xs, Xq = rng.normal(size=(7, n_in)), rng.normal(size=(5, n_in))
    Zs, Zq = np.c_[Xs, np.ones(7)], np.c_[Xq, np.ones(5)]
    ys = Zs @ (beta + rng.multivariate_normal(np.zeros(3), G)) + rng.normal(0, s2**0.5, 7)
    b = np.linalg.solve(np.linalg.inv(G) + Zs.T @ Zs / s2, Zs.T @ (ys - Zs @ beta) / s2)
    want = Zq @ (beta + b)
    t = lambda a: torch.as_tensor(a[None], dtype=torch.float64)  # noqa: E731
    adapted = learner.adapt(t(Xs), t(ys), track_graph=False)
    got = learner.predict(adapted, t(Xq))[0, :, 0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_the_meta_gradient_reaches_the_network_and_the_prior():
    """...and not the per-task noise prior's shape, which held-out tasks fit: the
    meta-training loss is the Gaussian likelihood of one shared noise level."""
    learner = _learner()
    tasks = SinusoidTasks(k_shot=5, random_state=0).sample(4)
    tasks = [type(t)(np.repeat(t.X_support, 3, 1), t.y_support,
                     np.repeat(t.X_query, 3, 1), t.y_query) for t in tasks]
    loss, grads = learner.algorithm.meta_gradients(learner, learner.batches(tasks))
    assert np.isfinite(float(loss))
    assert len(grads) == len(learner.meta_parameters())
    shape = learner.extras["alpaca_log_shape"]
    for p, g in zip(learner.meta_parameters(), grads):
        assert (float(g.abs().max()) == 0) == (p is shape)
    shared = _learner(noise="shared")
    _, shared_grads = shared.algorithm.meta_gradients(shared, shared.batches(tasks))
    for g, h in zip(grads, shared_grads):  # the same loss as one shared noise level
        if h.shape == g.shape:
            torch.testing.assert_close(g, h)


@pytest.fixture(scope="module")
def linear_groups():
    """Groups of a linear mixed model: random intercept and slope, noise 0.5."""
    rng = np.random.default_rng(0)
    X, y, g = [], [], []
    for i in range(60):
        n = 25
        x = rng.normal(size=(n, 2))
        b0, b1 = rng.normal(0, 1.0), rng.normal(0, 0.7)
        X.append(x)
        y.append(1.0 + b0 + (2.0 + b1) * x[:, 0] - 0.5 * x[:, 1] + rng.normal(0, 0.5, n))
        g += [i] * n
    return np.vstack(X), np.concatenate(y), np.array(g)


@pytest.fixture(scope="module")
def alpaca_est(linear_groups):
    X, y, g = linear_groups
    train = g < 45
    est = MetaInitializedRegressor(algorithm="alpaca", hidden_sizes=(16,), meta_iterations=400,
                                   meta_batch_size=8, random_state=0, verbose=0)
    return est.meta_fit(X[train], y[train], groups=g[train])


def test_alpaca_fits_new_groups_and_its_intervals_are_calibrated(alpaca_est, linear_groups):
    X, y, g = linear_groups
    inside68, inside95, errors, pooled = [], [], [], []
    for group in range(45, 60):
        m = np.flatnonzero(g == group)
        s, q = m[:8], m[8:]
        est = clone(alpaca_est).fit(X[s], y[s])
        mean, std = est.predict(X[q], return_std=True)
        np.testing.assert_allclose(mean, est.predict(X[q]), rtol=1e-5, atol=1e-6)
        z = np.abs(y[q] - mean) / std
        inside68 += list(z < 1.0)
        inside95 += list(z < 1.96)
        errors.append(np.mean((y[q] - mean) ** 2))
        pooled.append(np.mean((y[q] - y[g < 45].mean()) ** 2))
    assert np.mean(errors) < 0.5 * np.mean(pooled)
    assert 0.55 < np.mean(inside68) < 0.80
    assert 0.88 < np.mean(inside95) < 0.99


def test_fit_ignores_the_inner_learning_rate_and_steps(alpaca_est, linear_groups):
    X, y, g = linear_groups
    m = np.flatnonzero(g == 50)
    a = clone(alpaca_est).fit(X[m[:6]], y[m[:6]]).predict(X[m[6:]])
    b = clone(alpaca_est).set_params(inner_lr=0.5, inner_steps=40).fit(
        X[m[:6]], y[m[:6]]).predict(X[m[6:]])
    np.testing.assert_allclose(a, b)


def test_alpaca_saves_loads_and_pickles_with_its_options(alpaca_est, linear_groups, tmp_path):
    import pickle

    X, y, g = linear_groups
    m = np.flatnonzero(g == 52)
    ref = clone(alpaca_est).fit(X[m[:6]], y[m[:6]]).predict(X[m[6:]], return_std=True)
    path = tmp_path / "alpaca.safetensors"
    alpaca_est.save_meta_init(path)
    init = MetaInit.load(path)
    assert init.metadata["algorithm"] == "alpaca"
    assert init.algorithm_options == {"n_features": 32, "linear_features": True,
                                      "noise": "per_task"}
    loaded = MetaInitializedRegressor(meta_init=path, hidden_sizes=(16,)).fit(
        X[m[:6]], y[m[:6]])
    again = pickle.loads(pickle.dumps(loaded))
    for est in (loaded, again):
        got = est.predict(X[m[6:]], return_std=True)
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_initialization_saved_before_the_noise_option_loads_with_one_shared_noise(
        tmp_path):
    """Files written before ``noise=`` existed have no ``noise`` in their options and no
    noise-prior tensor: they load as ``noise="shared"``, which is what they were."""
    from dataclasses import replace

    est = MetaInitializedRegressor(algorithm=ALPACA(n_features=4, noise="shared"),
                                   hidden_sizes=(8,), meta_iterations=10, meta_batch_size=4,
                                   random_state=0, verbose=0)
    est.meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    init = est.meta_init_
    assert "extra.alpaca_log_shape" not in init.tensors
    options = {k: v for k, v in init.algorithm_options.items() if k != "noise"}
    old = replace(init, metadata={**init.metadata, "algorithm_options": options})
    old.save(tmp_path / "old.safetensors")
    task = SinusoidTasks(k_shot=5, random_state=1).sample(1)[0]
    loaded = MetaInitializedRegressor(meta_init=tmp_path / "old.safetensors",
                                      hidden_sizes=(8,)).fit(task.X_support, task.y_support)
    assert loaded._learner.algorithm == ALPACA(n_features=4, noise="shared")
    want = est.fit(task.X_support, task.y_support).predict(task.X_query, return_std=True)
    for a, b in zip(loaded.predict(task.X_query, return_std=True), want):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_alpaca_in_task_mode_and_its_errors():
    est = MetaInitializedRegressor(algorithm=ALPACA(n_features=8), hidden_sizes=(16,),
                                   meta_iterations=20, meta_batch_size=4, random_state=0,
                                   verbose=0)
    est.meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    task = SinusoidTasks(k_shot=5, random_state=1).sample(1)[0]
    mean, std = est.fit(task.X_support, task.y_support).predict(task.X_query,
                                                                 return_std=True)
    assert mean.shape == std.shape == (len(task.X_query),) and (std > 0).all()
    with pytest.raises(ValueError, match="one target"):
        MetaInitializedRegressor(algorithm="alpaca", meta_iterations=2).meta_fit(
            [(np.ones((4, 1)), np.ones((4, 2)), np.ones((4, 1)), np.ones((4, 2)))])
    with pytest.raises(ValueError, match="n_features"):
        ALPACA(n_features=0)
    with pytest.raises(ValueError, match="noise must be 'per_task' or 'shared'"):
        ALPACA(noise="gaussian")
    maml = MetaInitializedRegressor(meta_iterations=2, random_state=0, verbose=0).meta_fit(
        SinusoidTasks(k_shot=5, random_state=0)).fit(task.X_support, task.y_support)
    with pytest.raises(ValueError, match="return_std=True needs.*alpaca"):
        maml.predict(task.X_query, return_std=True)


def test_raw_columns_join_the_features_of_tables_only():
    from metafit.models import Conv4

    alpaca = ALPACA(8)
    assert alpaca.n_inputs_used(MLP(3, 8, hidden_sizes=(16,))) == 3
    assert alpaca.n_inputs_used(MLP(100, 8, hidden_sizes=(16,))) == 0  # too wide: not a table
    assert alpaca.n_inputs_used(Conv4(8)) == 0  # images
    assert ALPACA(8, linear_features=False).n_inputs_used(MLP(3, 8)) == 0


def test_alpaca_refuses_classification_and_a_skorch_export_of_its_posterior():
    from sklearn.datasets import load_digits

    from metafit import MetaInitializedClassifier, NWayKShotTasks

    X, y = load_digits(return_X_y=True)
    tasks = NWayKShotTasks(X, y, n_way=3, k_shot=2, k_query=3, random_state=0)
    with pytest.raises(ValueError, match="models real targets.*MetaInitializedRegressor"):
        MetaInitializedClassifier(algorithm="alpaca", meta_iterations=2).meta_fit(tasks)
    est = MetaInitializedRegressor(algorithm="alpaca", hidden_sizes=(8,), meta_iterations=2,
                                   random_state=0, verbose=0)
    est.meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    assert est.to_skorch() is not None  # the feature network, before fit
    task = SinusoidTasks(k_shot=5, random_state=1).sample(1)[0]
    est.fit(task.X_support, task.y_support)
    with pytest.raises(ValueError, match="posterior over its head"):
        est.to_skorch()


def _held_out_batch(n_tasks=40):
    """Held-out tasks whose noise is three times the prior's and differs between them
    (alike in a task's support and query rows)."""
    g = torch.Generator().manual_seed(3)
    Xs, Xq = (torch.randn(n_tasks, n, 3, generator=g, dtype=torch.float64) for n in (6, 9))
    level = 3 * torch.exp(0.2 * torch.randn(n_tasks, 1, generator=g, dtype=torch.float64))
    ys = level * torch.randn(n_tasks, 6, generator=g, dtype=torch.float64)
    yq = level * torch.randn(n_tasks, 9, generator=g, dtype=torch.float64)
    from metafit.tasks import TaskBatch

    mask = torch.ones(n_tasks, 9, dtype=torch.float64)
    mask[2, 6:] = 0  # padding rows do not count
    return Xs, ys, Xq, yq, mask, TaskBatch(Xs, ys, Xq, yq, query_mask=mask)


def test_calibration_of_a_shared_noise_scales_the_variance_only_and_to_the_residuals():
    """The calibrated noise makes the mean of (y - mean)^2 / var over the held-out query
    rows exactly 1 and changes neither the posterior mean nor the variance's shape."""
    learner = _learner(noise="shared")
    Xs, ys, Xq, yq, mask, batch = _held_out_batch()
    before = learner.predict_distribution(learner.adapt(Xs, ys, track_graph=False), Xq)
    new = learner.algorithm.calibrated_extras(learner, [batch])
    assert set(new) == {"alpaca_log_noise"}
    with torch.no_grad():
        learner.extras["alpaca_log_noise"].copy_(new["alpaca_log_noise"])
    mean, var = learner.predict_distribution(learner.adapt(Xs, ys, track_graph=False), Xq)
    torch.testing.assert_close(mean, before[0])
    scale = var / before[1]
    torch.testing.assert_close(scale, torch.full_like(scale, float(scale[0, 0])))
    ratio = ((yq - mean) ** 2 / var * mask).sum() / mask.sum()
    assert float(ratio) == pytest.approx(1.0, rel=1e-9)
    assert learner.algorithm.calibrated_extras(learner, []) == {}


def test_calibration_of_the_per_task_noise_prior_maximizes_the_held_out_likelihood():
    """Both numbers of the inverse-gamma prior refitted: the held-out query rows' mean
    NLL is at a minimum there (lower than before and than any nearby pair), and the
    posterior mean is unchanged."""
    learner = _learner()
    Xs, ys, Xq, yq, mask, batch = _held_out_batch()
    algorithm = learner.algorithm

    def held_out_nll(values):
        with torch.no_grad():
            for name, value in values.items():
                learner.extras[name].copy_(value)
            nll = algorithm.query_nll(learner, learner.adapt(Xs, ys, track_graph=False),
                                      batch)
            return float((nll * mask).sum() / mask.sum())

    names = ("alpaca_log_noise", "alpaca_log_shape")
    original = {k: learner.extras[k].detach().clone() for k in names}
    before_mean = learner.predict_distribution(learner.adapt(Xs, ys, track_graph=False), Xq)[0]
    before = held_out_nll(original)
    new = algorithm.calibrated_extras(learner, [batch])
    assert set(new) == set(names)
    best = held_out_nll(new)
    assert best < before - 0.05
    for name in names:
        for step in (-0.05, 0.05):
            assert held_out_nll({**new, name: new[name] + step}) > best
    held_out_nll(new)
    mean = learner.predict_distribution(learner.adapt(Xs, ys, track_graph=False), Xq)[0]
    torch.testing.assert_close(mean, before_mean)
    assert algorithm.calibrated_extras(learner, []) == {}


def test_meta_fit_calibrates_the_intervals_on_the_validation_groups():
    """Training groups far less noisy than new ones (noise 0.05 against 0.6): the noise
    meta-learned on them gives intervals too narrow for new groups; refitted on the
    validation groups (which are like the new ones) they cover about 95% again."""
    rng = np.random.default_rng(1)

    def groups(n_groups, noise, first):
        X, y, g = [], [], []
        for i in range(n_groups):
            x = rng.normal(size=(20, 1))
            b0, b1 = rng.normal(0, 1.0), rng.normal(0, 0.5)
            X.append(x)
            y.append(b0 + (1.5 + b1) * x[:, 0] + rng.normal(0, noise, 20))
            g += [first + i] * 20
        return np.vstack(X), np.concatenate(y), np.array(g)

    Xt, yt, gt = groups(40, 0.05, 0)
    Xv, yv, gv = groups(15, 0.6, 100)
    Xn, yn, gn = groups(15, 0.6, 200)
    from metafit import tasks_from_groups

    val = tasks_from_groups(Xv, yv, gv, support_size=6)
    kw = dict(algorithm="alpaca", hidden_sizes=(8,), meta_iterations=120, meta_batch_size=8,
              random_state=0, verbose=0, standardize=False)
    plain = MetaInitializedRegressor(**kw).meta_fit(
        tasks_from_groups(Xt, yt, gt, support_size=6) * 25)
    est = MetaInitializedRegressor(**kw).meta_fit(
        tasks_from_groups(Xt, yt, gt, support_size=6) * 25, validation_tasks=val)
    assert est.meta_init_.metadata["calibrated_extras"] == ["alpaca_log_noise",
                                                            "alpaca_log_shape"]
    # meta-training leaves the noise prior's shape where it started (a shared level)
    assert float(plain.meta_init_.tensors["extra.alpaca_log_shape"]) == 12.0
    assert "calibrated_extras" not in plain.meta_init_.metadata

    def coverage(model):
        inside = []
        for group in np.unique(gn):
            m = np.flatnonzero(gn == group)
            mean, std = clone(model).fit(Xn[m[:6]], yn[m[:6]]).predict(Xn[m[6:]],
                                                                      return_std=True)
            inside += list(np.abs(yn[m[6:]] - mean) / std < 1.96)
        return np.mean(inside)

    narrow, calibrated = coverage(plain), coverage(est)
    assert narrow < 0.8
    assert 0.88 < calibrated < 0.99


def test_per_task_noise_fits_quiet_and_noisy_groups_alike():
    """Groups whose noise (and random effects) are 0.2 or 1.0 times as large, half
    each: one shared level, however calibrated, is far too wide for the quiet groups;
    the per-task prior, fitted on the validation groups, reads each new group's level
    from its 10 support rows and covers both groups about as a 95% interval should."""
    rng = np.random.default_rng(2)

    def groups(n_groups, first):
        X, y, g = [], [], []
        for i in range(n_groups):
            x = rng.normal(size=(20, 1))
            noise = 0.2 if i % 2 else 1.0  # the model's own: effects scale with noise
            y.append(noise * rng.normal() + (1.0 + 0.5 * noise * rng.normal()) * x[:, 0]
                     + rng.normal(0, noise, 20))
            X.append(x)
            g += [first + i] * 20
        return np.vstack(X), np.concatenate(y), np.array(g)

    Xt, yt, gt = groups(60, 0)
    Xn, yn, gn = groups(60, 500)
    coverage = {}
    for noise in ("shared", "per_task"):
        est = MetaInitializedRegressor(
            algorithm=ALPACA(n_features=4, noise=noise), hidden_sizes=(8,),
            meta_iterations=150, meta_batch_size=8, random_state=0, verbose=0,
        ).meta_fit(Xt, yt, groups=gt)
        inside = {0: [], 1: []}
        for i, group in enumerate(np.unique(gn)):
            m = np.flatnonzero(gn == group)
            mean, std = clone(est).fit(Xn[m[:10]], yn[m[:10]]).predict(
                Xn[m[10:]], return_std=True)
            inside[i % 2] += list(np.abs(yn[m[10:]] - mean) / std < 1.96)
        coverage[noise] = {quiet: np.mean(v) for quiet, v in inside.items()}
    shared, per_task = coverage["shared"], coverage["per_task"]
    assert shared[1] > 0.99  # quiet groups: far too wide (0.937 and 1.0 measured)
    assert per_task[1] < 0.985 and per_task[0] > 0.9  # 0.973 and 0.957 measured


def test_until_held_out_tasks_fit_it_the_per_task_prior_is_the_gaussian_model():
    """A per-task prior at its start (no held-out tasks) predicts exactly as one shared
    noise level: the same variances and likelihoods, not a Student-t near them."""
    g = torch.Generator().manual_seed(4)
    Xs, Xq = (torch.randn(3, n, 3, generator=g, dtype=torch.float64) for n in (5, 7))
    ys, yq = (torch.randn(3, n, generator=g, dtype=torch.float64) for n in (5, 7))
    from metafit.tasks import TaskBatch

    batch = TaskBatch(Xs, ys, Xq, yq)
    out = {}
    for noise in ("per_task", "shared"):
        torch.manual_seed(0)
        learner = MetaLearner(MLP(3, 4, hidden_sizes=(8,)), loss="mse",
                              algorithm=ALPACA(4, noise=noise), inner_lr=0.01,
                              inner_steps=1, dtype=torch.float64)
        with torch.no_grad():
            adapted = learner.adapt(Xs, ys, track_graph=False)
            out[noise] = (*learner.predict_distribution(adapted, Xq),
                          learner.algorithm.query_nll(learner, adapted, batch))
    for a, b in zip(out["per_task"], out["shared"]):
        assert torch.equal(a, b)


def _lmm_learner(n_in=2, noise="shared"):
    from metafit.algorithms import LinearMixedModel

    torch.manual_seed(0)
    net = MLP(n_in, 1, hidden_sizes=(8,))
    return MetaLearner(net, loss="mse", algorithm=LinearMixedModel(noise=noise),
                       inner_lr=0.01, inner_steps=1, dtype=torch.float64)


def test_lmm_is_a_mixed_models_blup_on_the_raw_columns_and_never_runs_the_network():
    """"lmm": the head on [x, 1] alone; with the prior set to a mixed model's fixed
    effects and random-effects covariance, its posterior mean is that model's BLUP."""
    learner = _lmm_learner()
    assert learner.extras["alpaca_prior_mean"].shape == (3,)  # two columns, intercept
    rng = np.random.default_rng(2)
    beta, s2 = np.array([0.5, -1.0, 2.0]), 0.3
    A = rng.normal(size=(3, 3))
    G = A @ A.T + 0.5 * np.eye(3)
    L = np.linalg.cholesky(s2 * np.linalg.inv(G) - 1e-5 * np.eye(3))
    with torch.no_grad():
        learner.extras["alpaca_prior_factor"].copy_(
            torch.as_tensor(np.tril(L, -1) + np.diag(np.log(np.diag(L)))))
        learner.extras["alpaca_prior_mean"].copy_(torch.as_tensor(beta))
        learner.extras["alpaca_log_noise"].fill_(0.5 * np.log(s2))
    Xs, Xq = rng.normal(size=(6, 2)), rng.normal(size=(4, 2))
    Zs, Zq = np.c_[Xs, np.ones(6)], np.c_[Xq, np.ones(4)]
    ys = Zs @ (beta + rng.multivariate_normal(np.zeros(3), G)) + rng.normal(0, s2**0.5, 6)
    b = np.linalg.solve(np.linalg.inv(G) + Zs.T @ Zs / s2, Zs.T @ (ys - Zs @ beta) / s2)
    t = lambda a: torch.as_tensor(a[None], dtype=torch.float64)  # noqa: E731
    got = learner.predict(learner.adapt(t(Xs), t(ys), track_graph=False), t(Xq))
    np.testing.assert_allclose(got[0, :, 0].numpy(), Zq @ (beta + b), rtol=1e-8, atol=1e-10)
    with torch.no_grad():  # the network's weights play no part
        for p in learner.module.parameters():
            p.mul_(-3.0)
    again = learner.predict(learner.adapt(t(Xs), t(ys), track_graph=False), t(Xq))
    torch.testing.assert_close(again, got)


def test_lmm_in_table_mode_saves_loads_and_refuses_a_network_without_a_linear_start(
    linear_groups, tmp_path
):
    from metafit.algorithms import LinearMixedModel, get_algorithm

    X, y, groups = linear_groups
    est = MetaInitializedRegressor(algorithm=LinearMixedModel(noise="shared"),
                                   meta_iterations=30, random_state=0, verbose=0)
    est.meta_fit(X, y, groups=groups)
    assert est.algorithm_ == "lmm" and est.inner_steps_ is not None
    mean, std = est.fit(X[:5], y[:5]).predict(X[5:10], return_std=True)
    assert np.all(std > 0)
    est.save_meta_init(tmp_path / "lmm.safetensors")
    loaded = MetaInitializedRegressor(meta_init=tmp_path / "lmm.safetensors")
    np.testing.assert_allclose(loaded.fit(X[:5], y[:5]).predict(X[5:10]), mean, rtol=1e-6)
    assert MetaInit.load(tmp_path / "lmm.safetensors").algorithm_options == {"noise": "shared"}
    assert get_algorithm("lmm", {"noise": "shared"}).noise == "shared"
    np.testing.assert_allclose(clone(est).fit(X[:5], y[:5]).predict(X[5:10]), mean,
                               rtol=1e-6)

    with pytest.raises(ValueError, match="algorithm='lmm' reads the input columns"):
        module = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(X.shape[1], 1))
        MetaInitializedRegressor(module, algorithm="lmm", meta_iterations=2,
                                 verbose=0).meta_fit(X, y, groups=groups)
