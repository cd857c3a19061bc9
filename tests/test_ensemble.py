"""Tests of the ensemble ``algorithm="auto"`` keeps on a table (``metafit.ensemble``,
``MetaInit.ensemble``): its predictions, persistence, clones, searches and warm starts."""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from metafit import MetaInit, MetaInitializedRegressor
from metafit.ensemble import EnsembleLearner
from metafit.estimators._auto_algorithm import AUTO_CANDIDATES
from metafit.persistence import member_entries

SMALL = dict(hidden_sizes=(16,), meta_batch_size=4, meta_iterations=20, random_state=0,
             verbose=0)


def _table(seed=0, n_groups=30, rows=12):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), rows)
    X = rng.normal(size=(n_groups * rows, 2)) * 3 + 10  # raw units: the scaling travels
    slope = 1.0 + rng.normal(size=n_groups)
    y = 50 + rng.normal(size=n_groups)[groups] + slope[groups] * X[:, 0] - 0.5 * X[:, 1]
    return X, y + 0.1 * rng.normal(size=len(y)), groups


@pytest.fixture(scope="module")
def table():
    return _table()


@pytest.fixture(scope="module")
def kept(table):
    X, y, groups = table
    return MetaInitializedRegressor(**SMALL).meta_fit(X, y, groups=groups)


@pytest.fixture(scope="module")
def alone(table):
    """Each candidate meta-fitted by itself, with the same seed as "auto"'s."""
    X, y, groups = table
    return {name: MetaInitializedRegressor(algorithm=name, **SMALL).meta_fit(
        X, y, groups=groups) for name in AUTO_CANDIDATES}


def _mean_of(alone, X, y, Xq, **params):
    """The members' predictions, each weighted by the inverse of its validation score."""
    inverse = np.array([1 / e.meta_init_.metadata["validation_score"] for e in alone.values()])
    preds = [clone(e).set_params(**params).fit(X, y).predict(Xq) for e in alone.values()]
    return (inverse / inverse.sum()) @ np.array(preds)


def test_the_ensemble_predicts_the_weighted_mean_of_its_members_at_any_rate(kept, alone,
                                                                             table):
    X, y, _ = table
    np.testing.assert_allclose(kept.fit(X[:6], y[:6]).predict(X[6:12]),
                               _mean_of(alone, X[:6], y[:6], X[6:12]), rtol=1e-5)
    weights = kept.algorithm_weights_
    assert list(weights) == ["maml", "alpaca", "lmm"]
    assert sum(weights.values()) == pytest.approx(1)
    for name in ("alpaca", "lmm"):
        assert weights["maml"] / weights[name] == pytest.approx(
            kept.algorithm_scores_[name] / kept.algorithm_scores_["maml"])
    # fit's rate and steps are MAML's (chosen on the held-out groups); set, they reach it
    maml_choice = alone["maml"].meta_init_.metadata["adaptation"]
    assert (kept.inner_lr_, kept.inner_steps_) == (maml_choice["inner_lr"],
                                                   maml_choice["inner_steps"])
    other = clone(kept).set_params(inner_lr=0.05, inner_steps=3)
    np.testing.assert_allclose(
        other.fit(X[:6], y[:6]).predict(X[6:12]),
        _mean_of(alone, X[:6], y[:6], X[6:12], inner_lr=0.05, inner_steps=3), rtol=1e-5)
    assert not np.allclose(other.predict(X[6:12]), kept.predict(X[6:12]))


def test_the_ensemble_travels_with_save_load_clone_pickle_and_meta_init(kept, table, tmp_path):
    X, y, _ = table
    ref = clone(kept).fit(X[:6], y[:6]).predict(X[6:12])
    path = tmp_path / "ensemble.safetensors"
    kept.save_meta_init(path)
    loaded = MetaInit.load(path)
    assert loaded.metadata["algorithm"] == "maml+alpaca+lmm"
    assert [m.metadata["algorithm"] for m in loaded.members] == ["maml", "alpaca", "lmm"]
    assert "standardization" in loaded.metadata
    params = loaded.estimator_params()
    assert params["algorithm"] == "auto" and params["hidden_sizes"] == (16,)
    copies = [
        MetaInitializedRegressor(meta_init=path, **params),
        MetaInitializedRegressor(meta_init=loaded, **params),
        pickle.loads(pickle.dumps(clone(kept))),
    ]
    for est in copies:
        np.testing.assert_allclose(est.fit(X[:6], y[:6]).predict(X[6:12]), ref, rtol=1e-5)
        assert est.algorithm_ == "maml+alpaca+lmm"
    fitted = pickle.loads(pickle.dumps(clone(kept).fit(X[:6], y[:6])))
    np.testing.assert_allclose(fitted.predict(X[6:12]), ref, rtol=1e-5)


def test_a_search_adapts_the_ensemble_with_each_rate(kept, table):
    X, y, _ = table
    search = GridSearchCV(kept, {"inner_lr": [0.001, 0.01], "inner_steps": [1, 5]}, cv=2)
    search.fit(X[:12], y[:12])
    assert search.best_estimator_.algorithm_ == "maml+alpaca+lmm"
    assert search.best_estimator_.meta_init_ is kept.meta_init_


def test_what_one_network_or_one_posterior_would_need_is_refused_clearly(kept, table):
    X, y, _ = table
    est = clone(kept).fit(X[:6], y[:6])
    with pytest.raises(ValueError, match="ensemble of maml\\+alpaca\\+lmm.*algorithm='alpaca'"):
        est.predict(X[6:8], return_std=True)
    for e in (est, clone(kept)):
        with pytest.raises(ValueError, match="to_skorch exports one network.*ensemble"):
            e.to_skorch()


def test_a_warm_start_continues_every_member_from_its_own_state(table):
    X, y, groups = table
    est = MetaInitializedRegressor(**SMALL).meta_fit(X, y, groups=groups)
    est.set_params(warm_start=True, meta_iterations=30).meta_fit(X, y, groups=groups)
    assert est.algorithm_ == "maml+alpaca+lmm" and len(est.meta_history_) == 30
    for member in est.meta_init_.members:
        assert member.metadata["iteration"] == 30  # continued, not started over
    # each member is what its algorithm's own warm start gives: its record, optimizer
    # state included, was continued
    for name, member in zip(AUTO_CANDIDATES, est.meta_init_.members):
        own = MetaInitializedRegressor(algorithm=name, **SMALL).meta_fit(X, y, groups=groups)
        own.set_params(warm_start=True, meta_iterations=30).meta_fit(X, y, groups=groups)
        for k, v in own.meta_init_.tensors.items():
            torch.testing.assert_close(member.tensors[k], v, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="continues an ensemble.*algorithm='auto'"):
        clone(est).set_params(algorithm="maml").meta_fit(X, y, groups=groups)


def test_a_candidate_that_diverges_is_left_out(table, monkeypatch):
    from metafit.estimators import _auto_algorithm

    X, y, groups = table
    real = MetaInitializedRegressor.meta_fit

    def failing(self, *args, **kwargs):
        if self.algorithm == "alpaca":
            from metafit.training import DivergenceError

            raise DivergenceError("meta-training diverged (test)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MetaInitializedRegressor, "meta_fit", failing)
    est = MetaInitializedRegressor(**SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _auto_algorithm.meta_fit_auto(est, X, y, groups, None, ("maml", "alpaca"))
    assert est.algorithm_ == "maml" and est.meta_init_.members is None
    assert est.algorithm_scores_["alpaca"] == float("inf")
    # of three, the two that did not diverge are kept, weighted
    est = MetaInitializedRegressor(**SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.meta_fit(X, y, groups=groups)
    assert est.algorithm_ == "maml+lmm" and len(est.meta_init_.members) == 2
    assert set(est.algorithm_weights_) == {"maml", "lmm"}
    assert est.algorithm_scores_["alpaca"] == float("inf")


def test_an_ensemble_file_is_checked_when_read(kept, tmp_path):
    init = kept.meta_init_
    for damage, match in [
        (lambda m: m.update(weights=[1.0]), "members, specs and weights do not agree"),
        (lambda m: m["members"][1].update(n_features="two"), r"member 1.*n_features"),
    ]:
        meta = {**init.metadata, "members": [dict(x) for x in init.metadata["members"]]}
        damage(meta)
        path = MetaInit(init.tensors, init.spec, meta).save(tmp_path / "bad.safetensors")
        with pytest.raises(ValueError, match=match):
            MetaInit.load(path)
    stray = {**init.tensors, "other.weight": torch.zeros(1)}
    path = MetaInit(stray, init.spec, init.metadata).save(tmp_path / "stray.safetensors")
    with pytest.raises(ValueError, match="do not belong to its members"):
        MetaInit.load(path)
    with pytest.raises(ValueError, match="at least two"):
        MetaInit.ensemble(init.members[:1])
    with pytest.raises(ValueError, match="summing to 1"):
        MetaInit.ensemble(init.members, [0.5, 0.6])


def test_inverse_loss_weights():
    from metafit.estimators._auto_algorithm import inverse_loss_weights

    assert inverse_loss_weights([0.2, 0.2]) == pytest.approx([0.5, 0.5])
    assert inverse_loss_weights([0.1, 0.3]) == pytest.approx([0.75, 0.25])
    assert inverse_loss_weights([0.0, 0.3]) == [1.0, 0.0]  # exact on the held-out groups
    assert inverse_loss_weights([0.0, 0.0]) == [0.5, 0.5]
    for bad in ([], [math.inf, 0.1], [-0.1, 0.1], [math.nan, 0.1]):
        with pytest.raises(ValueError, match="finite losses"):
            inverse_loss_weights(bad)


def test_unequal_weights_weigh_the_members(kept, table):
    X, y, _ = table
    est = clone(kept).fit(X[:6], y[:6])
    learner = est._learner
    assert isinstance(learner, EnsembleLearner)
    Xt, _ = learner.as_tensors(est._table_prep.scaling.transform_X(X[6:12]))
    Xt = Xt.unsqueeze(0)
    each = [m.predict(member_entries(est.adapted_params_, i), Xt,
                      step=m.last_step(est.inner_steps_))
            for i, m in enumerate(learner.members)]
    weighted = EnsembleLearner(learner.members, [0.25, 0.6, 0.15])
    got = weighted.predict(est.adapted_params_, Xt, step=est.inner_steps_)
    torch.testing.assert_close(got, 0.25 * each[0] + 0.6 * each[1] + 0.15 * each[2])
    with pytest.raises(ValueError, match="one weight per member"):
        EnsembleLearner(learner.members, [1.0])


def test_the_adaptation_plot_draws_the_member_that_adapts_by_steps(kept, alone, table):
    pytest.importorskip("matplotlib")
    from metafit.plotting import adaptation_curves, plot_adaptation
    from metafit.tasks import Task

    X, y, groups = table
    tasks = [Task(X[groups == g][:5], y[groups == g][:5], X[groups == g][5:],
                  y[groups == g][5:]) for g in range(3)]
    got = adaptation_curves(kept, tasks, steps=2)["meta-learned"]
    want = adaptation_curves(alone["maml"], tasks, steps=2)["meta-learned"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    ax = plot_adaptation(kept, tasks, steps=2)
    assert "meta-learned (maml)" in [t.get_text() for t in ax.get_legend().get_texts()]



def test_a_warm_start_from_an_ensemble_file_continues_each_member(kept, table, tmp_path):
    X, y, groups = table
    path = kept.meta_init_.save(tmp_path / "ensemble.safetensors")
    est = MetaInitializedRegressor(meta_init=path, warm_start=True,
                                   **{**SMALL, "meta_iterations": 25})
    est.meta_fit(X, y, groups=groups)
    assert est.algorithm_ == "maml+alpaca+lmm"
    assert [m.metadata["iteration"] for m in est.meta_init_.members] == [25, 25, 25]


def test_the_members_adapt_for_the_mean_alone(kept, table):
    """No member computes what only a predictive distribution reads (ALPACA's per-task
    noise statistics): an ensemble has none. Their posterior means are unchanged."""
    X, y, groups = table
    rows = groups == 3
    est = clone(kept).fit(X[rows][:6], y[rows][:6])
    learner = est._learner
    assert not [k for k in est.adapted_params_ if k.endswith(("alpaca.rows", "alpaca.surprise"))]
    scaling = est._table_prep.scaling  # fit adapts in the table's standardized units
    Xt, yt = learner.as_tensors(scaling.transform_X(X[rows][:6])[None],
                                scaling.transform_y(y[rows][:6])[None])
    for i, member in enumerate(learner.members):
        if not member.algorithm.closed_form:
            continue
        full = member.adapt(Xt, yt, track_graph=False)
        assert {"alpaca.rows", "alpaca.surprise"} <= set(full)
        mine = member_entries(est.adapted_params_, i)
        assert set(full) - set(mine) == {"alpaca.rows", "alpaca.surprise"}
        for key, value in mine.items():
            torch.testing.assert_close(value, full[key], rtol=1e-6, atol=1e-7)
