"""``inner_lr="auto"`` / ``inner_steps="auto"``: the small search ``meta_fit`` runs on the
validation tasks, and what ``fit`` then uses (metafit/estimators/_adaptation.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.base import clone

from metafit import MetaInitializedRegressor
from metafit.estimators._adaptation import LR_FACTORS, STEP_CANDIDATES
from metafit.persistence import MetaInit
from metafit.tasks import SinusoidTasks, Task
from metafit.tuning import evaluate

SMALL = dict(hidden_sizes=(16,), meta_batch_size=4, meta_iterations=20, random_state=0,
             verbose=0)


@pytest.fixture(scope="module")
def val_tasks():
    return SinusoidTasks(k_shot=5, k_query=10, random_state=1).sample(6)


@pytest.fixture(scope="module")
def searched(val_tasks):
    return MetaInitializedRegressor(**SMALL).meta_fit(SinusoidTasks(random_state=0),
                                                      val_tasks)


def test_auto_scores_the_grid_on_the_validation_tasks_and_fit_uses_the_best(searched,
                                                                            val_tasks):
    scores = searched.adaptation_scores_
    rates = sorted({lr for lr, _ in scores})
    assert rates == pytest.approx([0.01 * f for f in LR_FACTORS])
    assert sorted({s for _, s in scores}) == list(STEP_CANDIDATES)
    best = min(scores, key=scores.get)
    assert (searched.inner_lr_, searched.inner_steps_) == best
    # Each score is what fit + predict of that pair gives on the validation tasks.
    for lr, steps in [best, (rates[0], 1), (rates[-1], 20), (rates[2], 0), (rates[3], 5)]:
        pair = clone(searched).set_params(inner_lr=lr, inner_steps=steps)
        want = evaluate(pair, val_tasks)
        if math.isfinite(scores[(lr, steps)]):
            assert scores[(lr, steps)] == pytest.approx(want, rel=1e-4, abs=1e-7)
        else:  # diverged on some task
            assert not math.isfinite(want) or want > 1e6
    task = val_tasks[0]
    fitted = clone(searched).fit(task.X_support, task.y_support)
    assert (fitted.inner_lr_, fitted.inner_steps_) == best
    same = clone(searched).set_params(inner_lr=best[0], inner_steps=best[1])
    np.testing.assert_allclose(fitted.predict(task.X_query),
                               same.fit(task.X_support, task.y_support).predict(task.X_query),
                               rtol=1e-6)


def test_the_choice_travels_with_clone_save_and_meta_init(searched, val_tasks, tmp_path):
    path = tmp_path / "init.safetensors"
    searched.save_meta_init(path)
    chosen = MetaInit.load(path).metadata["adaptation"]
    assert (chosen["inner_lr"], chosen["inner_steps"]) == (searched.inner_lr_,
                                                           searched.inner_steps_)
    task = val_tasks[1]
    loaded = MetaInitializedRegressor(meta_init=path, hidden_sizes=(16,)).fit(
        task.X_support, task.y_support)
    assert (loaded.inner_lr_, loaded.inner_steps_) == (searched.inner_lr_,
                                                       searched.inner_steps_)
    params = MetaInit.load(path).estimator_params()
    assert (params["inner_lr"], params["inner_steps"]) == (searched.inner_lr_,
                                                           searched.inner_steps_)


def test_a_number_given_is_used_and_only_the_other_is_searched(val_tasks):
    tasks = SinusoidTasks(random_state=0)
    lr_fixed = MetaInitializedRegressor(inner_lr=0.05, **SMALL).meta_fit(tasks, val_tasks)
    assert {lr for lr, _ in lr_fixed.adaptation_scores_} == {0.05}
    assert lr_fixed.inner_lr_ == 0.05
    steps_fixed = MetaInitializedRegressor(inner_steps=3, **SMALL).meta_fit(tasks, val_tasks)
    assert {s for _, s in steps_fixed.adaptation_scores_} == {3}
    assert steps_fixed.inner_steps_ == 3
    both = MetaInitializedRegressor(inner_lr=0.05, inner_steps=3, **SMALL).meta_fit(
        tasks, val_tasks)
    assert not hasattr(both, "adaptation_scores_")
    assert "adaptation" not in both.meta_init_.metadata
    assert (both.inner_lr_, both.inner_steps_) == (0.05, 3)


def test_without_validation_auto_means_the_meta_training_values():
    est = MetaInitializedRegressor(meta_inner_lr=0.03, meta_inner_steps=2, **SMALL)
    est.meta_fit(SinusoidTasks(random_state=0))
    assert not hasattr(est, "adaptation_scores_")
    assert (est.inner_lr_, est.inner_steps_) == (0.03, 2)
    assert est.meta_init_.metadata["inner_lr"] == 0.03
    plain = MetaInitializedRegressor(**SMALL).meta_fit(SinusoidTasks(random_state=0))
    assert (plain.inner_lr_, plain.inner_steps_) == (0.01, 5)


def test_table_mode_chooses_on_its_held_out_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 12)
    X = rng.normal(size=(360, 2))
    y = rng.normal(size=30)[groups] * 2 + X @ [1.0, -0.5] + 0.1 * rng.normal(size=360)
    est = MetaInitializedRegressor(algorithm="maml", **SMALL).meta_fit(X, y, groups=groups)
    assert len(est.adaptation_scores_) == len(LR_FACTORS) * len(STEP_CANDIDATES)
    assert all(math.isfinite(v) for v in est.adaptation_scores_.values())
    # The groups' intercepts differ: some adaptation beats none on new groups.
    assert est.inner_steps_ > 0
    assert min(est.adaptation_scores_.values()) < min(
        v for (_, s), v in est.adaptation_scores_.items() if s == 0)


def test_algorithms_choose_only_what_fit_reads(val_tasks):
    tasks = SinusoidTasks(random_state=0)
    alpaca = MetaInitializedRegressor(algorithm="alpaca", **SMALL).meta_fit(tasks, val_tasks)
    assert not hasattr(alpaca, "adaptation_scores_")  # a closed form: nothing to choose
    metasgd = MetaInitializedRegressor(algorithm="metasgd", **SMALL).meta_fit(tasks, val_tasks)
    assert len({lr for lr, _ in metasgd.adaptation_scores_}) == 1  # learned rates
    mamlpp = MetaInitializedRegressor(algorithm="mamlpp", **SMALL).meta_fit(tasks, val_tasks)
    assert len({lr for lr, _ in mamlpp.adaptation_scores_}) == 1  # learned per-step rates
    assert {s for _, s in mamlpp.adaptation_scores_} == set(STEP_CANDIDATES)


def test_a_diverging_pair_never_wins(val_tasks):
    far = [Task(t.X_support, t.y_support * 30, t.X_query, t.y_query * 30)
           for t in val_tasks]
    est = MetaInitializedRegressor(**SMALL).meta_fit(SinusoidTasks(random_state=0), far)
    assert any(math.isinf(v) for v in est.adaptation_scores_.values())
    assert math.isfinite(est.adaptation_scores_[(est.inner_lr_, est.inner_steps_)])


@pytest.mark.parametrize("value", ["fast", "0.1", [0.1]])
def test_anything_but_a_number_or_auto_is_refused(value):
    est = MetaInitializedRegressor(inner_lr=value, **SMALL)
    with pytest.raises(TypeError, match='inner_lr must be a number or "auto"'):
        est.meta_fit(SinusoidTasks(random_state=0))


def _slopes_table(seed=0, n_groups=30, rows=12):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), rows)
    X = rng.normal(size=(n_groups * rows, 2))
    slope = 1.0 + rng.normal(size=n_groups)
    y = rng.normal(size=n_groups)[groups] + slope[groups] * X[:, 0] - 0.5 * X[:, 1]
    return X, y + 0.1 * rng.normal(size=len(y)), groups


def test_algorithm_auto_trains_maml_alpaca_and_lmm_and_keeps_them_weighted():
    X, y, groups = _slopes_table()
    est = MetaInitializedRegressor(**SMALL).meta_fit(X, y, groups=groups)
    assert set(est.algorithm_scores_) == {"maml", "alpaca", "lmm"}
    assert est.algorithm_ == "maml+alpaca+lmm"
    assert est.meta_init_.metadata["algorithm"] == est.algorithm_
    assert est.algorithm == "auto"  # the parameter is left as given
    # Each score is that algorithm's own meta_fit, run alone with the same seed, and the
    # kept ensemble predicts the mean of those two runs' predictions, each weighted by
    # the inverse of its validation score.
    preds, inverse = [], []
    for name, score in est.algorithm_scores_.items():
        alone = MetaInitializedRegressor(algorithm=name, **SMALL).meta_fit(X, y, groups=groups)
        assert score == pytest.approx(alone.meta_init_.metadata["validation_score"], rel=1e-5)
        preds.append(alone.fit(X[:6], y[:6]).predict(X[6:12]))
        inverse.append(1 / score)
    weights = np.array(inverse) / sum(inverse)
    assert list(est.algorithm_weights_.values()) == pytest.approx(weights)
    assert est.meta_init_.metadata["weights"] == pytest.approx(weights)
    np.testing.assert_allclose(est.fit(X[:6], y[:6]).predict(X[6:12]),
                               weights @ np.array(preds), rtol=1e-5, atol=1e-6)
    cloned = clone(est).fit(X[:6], y[:6])
    assert cloned.meta_init_ is est.meta_init_


def test_algorithm_auto_is_maml_in_task_mode_and_without_validation():
    tasks = SinusoidTasks(random_state=0)
    est = MetaInitializedRegressor(**SMALL).meta_fit(tasks)
    assert est.algorithm_ == "maml" and not hasattr(est, "algorithm_scores_")
    X, y, groups = _slopes_table()
    none_held_out = MetaInitializedRegressor(validation_fraction=0, **SMALL).meta_fit(
        X, y, groups=groups)
    assert none_held_out.algorithm_ == "maml"
    two_targets = MetaInitializedRegressor(**SMALL).meta_fit(
        X, np.column_stack([y, y]), groups=groups)
    assert two_targets.algorithm_ == "maml"


def test_algorithm_auto_warm_start_continues_the_kept_algorithm():
    X, y, groups = _slopes_table()
    est = MetaInitializedRegressor(**SMALL).meta_fit(X, y, groups=groups)
    kept = est.algorithm_
    est.set_params(warm_start=True, meta_iterations=30).meta_fit(X, y, groups=groups)
    assert est.algorithm_ == kept and len(est.meta_history_) == 30
