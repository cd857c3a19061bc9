"""Tests of metafit.tuning: objectives, modes, pruning, divergence, search spaces, storages."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

import metafit
from metafit import MetaInitializedClassifier, MetaInitializedRegressor, SinusoidTasks
from metafit.tasks import NWayKShotTasks
from metafit.tuning import (
    default_search_space,
    evaluate,
    make_storage,
    parse_search_space,
    to_estimator_params,
    tune,
    tuned_estimator,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SMALL = dict(hidden_sizes=(16,), meta_batch_size=4, meta_iterations=30, random_state=0)


@pytest.fixture(scope="module")
def val_tasks():
    return SinusoidTasks(random_state=1).sample(8)


@pytest.fixture(scope="module")
def meta_fitted():
    return MetaInitializedRegressor(**SMALL).meta_fit(SinusoidTasks(random_state=0))


def _states(study):
    return [t.state for t in study.trials]


# ----------------------------------------------------------------------------- adaptation


def test_adaptation_tune_best_params_reproduce_value(meta_fitted, val_tasks):
    study = tune(
        meta_fitted, validation_tasks=val_tasks, n_trials=6,
        sampler=optuna.samplers.RandomSampler(seed=0),
        search_space={"inner_lr": {"low": 1e-3, "high": 0.02, "log": True},
                      "inner_steps": {"low": 1, "high": 10}},
    )
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert len(study.trials) == 6
    assert set(study.best_params) == {"inner_lr", "inner_steps"}
    tuned = tuned_estimator(meta_fitted, study)
    assert tuned.inner_lr == study.best_params["inner_lr"]
    assert hasattr(tuned, "meta_init_")  # the clone keeps the initialization
    assert evaluate(tuned, val_tasks) == pytest.approx(study.best_value, rel=1e-9)
    # The estimator's own parameters were scored once, for the "improvement" line.
    assert study.user_attrs["metafit_default_value"] == pytest.approx(
        evaluate(meta_fitted, val_tasks)
    )
    # "auto" is recorded as what it stood for: without validation tasks in meta_fit, the
    # meta-training values
    assert study.user_attrs["metafit_default_params"] == {"inner_lr": 0.01, "inner_steps": 5}
    assert meta_fitted.inner_lr == "auto"  # unchanged


def test_adaptation_meta_fits_in_place_once(val_tasks):
    est = MetaInitializedRegressor(**SMALL)
    with pytest.raises(ValueError, match="no meta-learned initialization"):
        tune(est, validation_tasks=val_tasks, n_trials=1)
    tune(est, SinusoidTasks(random_state=0), validation_tasks=val_tasks, n_trials=2)
    assert hasattr(est, "meta_init_")
    first = est.meta_init_
    tune(est, SinusoidTasks(random_state=0), validation_tasks=val_tasks, n_trials=1)
    assert est.meta_init_ is first  # not meta-fitted again


def test_divergent_trial_is_pruned_with_reason_and_study_goes_on(meta_fitted, val_tasks):
    study = optuna.create_study(study_name="div", storage=None)
    storage = study._storage
    study.enqueue_trial({"inner_lr": 1e6, "inner_steps": 20})
    study.enqueue_trial({"inner_lr": 0.01, "inner_steps": 3})
    study = tune(meta_fitted, validation_tasks=val_tasks, n_trials=2, storage=storage,
                 study_name="div")
    bad, good = study.trials
    assert bad.state == TrialState.PRUNED
    reason = bad.user_attrs["metafit_diverged"]
    assert "inner_lr" in reason or "non-finite" in reason
    assert good.state == TrialState.COMPLETE and np.isfinite(good.value)


def test_evaluate_returns_nan_on_divergence(meta_fitted, val_tasks):
    est = metafit.tuned_estimator(meta_fitted, {"inner_lr": 1e6, "inner_steps": 20})
    try:
        value = evaluate(est, val_tasks)
    except ArithmeticError:  # the estimator's own divergence guard
        return
    assert np.isnan(value)


def test_classifier_maximizes_accuracy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4)) + np.repeat(np.eye(4) * 3, 50, axis=0)[:, :4]
    y = np.repeat(np.arange(4), 50)
    train = NWayKShotTasks(X[:120], y[:120], n_way=2, k_shot=3, k_query=5, random_state=0)
    held = NWayKShotTasks(X, y, n_way=2, k_shot=3, k_query=5).sample(6, random_state=1)
    est = MetaInitializedClassifier(hidden_sizes=(8,), meta_iterations=10, meta_batch_size=4,
                                    random_state=0)
    study = tune(est, train, validation_tasks=held, n_trials=3,
                 sampler=optuna.samplers.RandomSampler(seed=0))
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.user_attrs["metafit_metric"] == "accuracy"
    assert 0.0 <= study.best_value <= 1.0
    assert evaluate(tuned_estimator(est, study), held) == pytest.approx(study.best_value)


def test_n_jobs_threads(meta_fitted, val_tasks):
    study = tune(meta_fitted, validation_tasks=val_tasks, n_trials=4, n_jobs=2,
                 search_space={"inner_lr": {"low": 1e-3, "high": 0.01, "log": True}})
    assert len(study.trials) == 4
    assert all(s == TrialState.COMPLETE for s in _states(study))


def test_resume_same_study_and_mode_mismatch(meta_fitted, val_tasks, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    space = {"inner_steps": {"low": 1, "high": 3}}
    tune(meta_fitted, validation_tasks=val_tasks, n_trials=2, storage=url, study_name="s",
         search_space=space)
    study = tune(meta_fitted, validation_tasks=val_tasks, n_trials=2, storage=url,
                 study_name="s", search_space=space)
    assert len(study.trials) == 4
    with pytest.raises(ValueError, match="mode='adaptation'"):
        tune(meta_fitted, SinusoidTasks(random_state=0), validation_tasks=val_tasks,
             n_trials=1, storage=url, study_name="s", mode="meta")


# ----------------------------------------------------------------------------- meta mode


def _meta_study(pruner, enqueue, n_trials, val_tasks, name=None):
    est = MetaInitializedRegressor(**{**SMALL, "meta_iterations": 16})
    study = optuna.create_study(study_name=name)
    for params in enqueue:
        study.enqueue_trial(params)
    space = {"meta_lr": {"low": 1e-6, "high": 1e-2, "log": True},
             "inner_lr": {"low": 1e-4, "high": 0.01, "log": True}}
    return est, tune(est, SinusoidTasks(random_state=0), validation_tasks=val_tasks,
                     n_trials=n_trials, storage=study._storage, pruner=pruner,
                     study_name=study.study_name, search_space=space, mode="meta")


GOOD = {"meta_lr": 3e-3, "inner_lr": 0.01}
BAD = {"meta_lr": 1e-6, "inner_lr": 1e-4}


@pytest.mark.parametrize(
    "pruner",
    [
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
    ],
    ids=["median", "successive_halving"],
)
def test_meta_mode_reports_rungs_and_prunes_bad_trials(pruner, val_tasks):
    est, study = _meta_study(pruner, [GOOD, {**GOOD, "meta_lr": 2e-3}, BAD, BAD], 4, val_tasks)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert done
    # Intermediate values at 1/4, 1/2 and all of meta_iterations.
    assert sorted(done[0].intermediate_values) == [4, 8, 16]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, [t.intermediate_values for t in study.trials]
    assert all(len(t.intermediate_values) < 3 for t in pruned)
    bad = [t for t in study.trials if t.params["meta_lr"] == BAD["meta_lr"]]
    assert all(t.state == TrialState.PRUNED for t in bad)
    assert "meta_init_" not in vars(est)  # meta mode leaves the estimator alone


def test_meta_mode_with_hyperband(val_tasks):
    # Hyperband assigns trials to brackets by hashing the study name and trial number;
    # with this name, both BAD trials share a bracket with better ones.
    pruner = optuna.pruners.HyperbandPruner(min_resource=4, max_resource=16, reduction_factor=3)
    order = [GOOD, {**GOOD, "meta_lr": 2e-3}, BAD, BAD, GOOD, BAD]
    _, study = _meta_study(pruner, order, 6, val_tasks, name="hb")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.params["meta_lr"] == BAD["meta_lr"] for t in pruned)
    assert all(len(t.intermediate_values) == 1 for t in pruned)


def test_meta_mode_best_reproduces_with_tuned_estimator(val_tasks):
    est, study = _meta_study(optuna.pruners.NopPruner(), [GOOD], 1, val_tasks)
    tuned = tuned_estimator(est, study, tasks=SinusoidTasks(random_state=0))
    assert tuned.meta_lr == GOOD["meta_lr"]
    assert evaluate(tuned, val_tasks) == pytest.approx(study.best_value, rel=1e-6)
    unfitted = tuned_estimator(est, study)
    assert not hasattr(unfitted, "meta_init_")


def test_meta_mode_default_space_and_hidden_sizes(val_tasks):
    est = MetaInitializedRegressor(**{**SMALL, "meta_iterations": 4})
    space = default_search_space(est, "meta")
    assert {"meta_lr", "algorithm", "meta_batch_size", "hidden_layers", "hidden_units"} <= set(
        space
    )
    reptile = default_search_space(MetaInitializedRegressor(algorithm="reptile"), "meta")
    assert "algorithm" not in reptile and reptile["meta_lr"].high == 1.0
    params = {"hidden_layers": 2, "hidden_units": 8, "meta_lr": 1e-3}
    assert to_estimator_params(params, est)["hidden_sizes"] == (8, 8)
    assert to_estimator_params({"hidden_sizes": "8,4"})["hidden_sizes"] == (8, 4)
    study = tune(est, SinusoidTasks(random_state=0), validation_tasks=val_tasks, n_trials=1,
                 mode="meta", search_space={"hidden_sizes": [[8], [8, 8]]},
                 sampler=optuna.samplers.RandomSampler(seed=0))
    assert study.best_params["hidden_sizes"] in ("8", "8,8")


def test_meta_mode_needs_reiterable_tasks(val_tasks):
    est = MetaInitializedRegressor(**SMALL)
    with pytest.raises(TypeError, match="re-iterable"):
        tune(est, iter(SinusoidTasks(random_state=0)), validation_tasks=val_tasks,
             n_trials=1, mode="meta")


# ----------------------------------------------------------------------------- validation


def test_validation_task_checks(meta_fitted):
    with pytest.raises(ValueError, match="endless"):
        tune(meta_fitted, validation_tasks=SinusoidTasks(random_state=1), n_trials=1)
    with pytest.raises(ValueError, match="empty"):
        tune(meta_fitted, validation_tasks=[], n_trials=1)
    tasks = SinusoidTasks(random_state=0).sample(6)
    with pytest.raises(ValueError, match="overlap"):
        tune(meta_fitted, tasks, validation_tasks=tasks[:2], n_trials=1)
    with pytest.raises(ValueError, match="mode"):
        tune(meta_fitted, validation_tasks=tasks, mode="fast")
    with pytest.raises(ValueError, match="n_trials"):
        tune(meta_fitted, validation_tasks=tasks, n_trials=0)
    with pytest.raises(ValueError, match="timeout"):
        tune(meta_fitted, validation_tasks=tasks, timeout=-1)
    with pytest.raises(TypeError, match="MetaInitializedRegressor"):
        tune(object(), validation_tasks=tasks)


def test_simple_specs_become_distributions():
    est = MetaInitializedRegressor()
    space = parse_search_space(
        {
            "inner_lr": {"low": 1e-3, "high": 1.0, "log": True},
            "inner_steps": {"low": 1, "high": 9, "step": 2},
            "meta_batch_size": [4, 8],
            "meta_lr": FloatDistribution(1e-4, 1e-2, log=True),
            "algorithm": {"choices": ["maml", "anil"]},
            "hidden_units": {"low": 4, "high": 8, "type": "int"},
        },
        est,
        "meta",
    )
    assert space["inner_lr"] == FloatDistribution(1e-3, 1.0, log=True)
    assert space["inner_steps"] == IntDistribution(1, 9, step=2)
    assert space["meta_batch_size"] == CategoricalDistribution((4, 8))
    assert space["algorithm"] == CategoricalDistribution(("maml", "anil"))
    assert isinstance(space["hidden_units"], IntDistribution)


@pytest.mark.parametrize(
    "space, mode, exc, match",
    [
        ({"inner_rate": {"low": 0.1, "high": 1}}, "adaptation", ValueError, "inner_rate"),
        ({"meta_lr": {"low": 1e-4, "high": 1e-2}}, "adaptation", ValueError, "mode='meta'"),
        ({"inner_lr": {"low": 1.0, "high": 0.1}}, "adaptation", ValueError, "greater than"),
        ({"inner_lr": {"low": 0.0, "high": 0.1, "log": True}}, "adaptation", ValueError, "low > 0"),
        ({"inner_lr": {"low": 0.01, "high": 0.1, "scale": "log"}}, "adaptation", ValueError,
         "'scale'"),
        ({"inner_lr": {"low": "a", "high": 0.1}}, "adaptation", TypeError, "low must be"),
        ({"inner_lr": {"high": 0.1}}, "adaptation", ValueError, "needs 'low'"),
        ({"inner_steps": {"low": -1, "high": 3}}, "adaptation", ValueError, ">= 0"),
        ({"inner_steps": {"low": 1.0, "high": 3.5}}, "adaptation", TypeError, "integer"),
        ({"inner_lr": {"choices": []}}, "adaptation", ValueError, "non-empty"),
        ({"inner_lr": {"low": 0.1, "high": 1, "log": "yes"}}, "adaptation", TypeError, "log"),
        ({"inner_lr": 0.1}, "adaptation", TypeError, "optuna distribution"),
        ({"algorithm": ["maml", "sgd"]}, "meta", ValueError, "'sgd'"),
        ({"hidden_sizes": [[8], [0]]}, "meta", ValueError, "hidden_sizes"),
        ({"meta_batch_size": [{"a": 1}]}, "meta", TypeError, "choice"),
        ([("inner_lr", 0.1)], "adaptation", TypeError, "dict"),
        ({}, "adaptation", ValueError, "empty"),
    ],
)
def test_bad_search_spaces(space, mode, exc, match):
    with pytest.raises(exc, match=match):
        parse_search_space(space, MetaInitializedRegressor(), mode)


def test_search_space_accepts_every_algorithm_of_the_estimator():
    from metafit.algorithms import ALGORITHMS

    est = MetaInitializedRegressor()
    space = parse_search_space({"algorithm": sorted(ALGORITHMS)}, est, "meta")
    assert set(space["algorithm"].choices) == set(ALGORITHMS)


def test_derived_params_need_default_mlp():
    from torch import nn

    est = MetaInitializedRegressor(module=nn.Linear(1, 1))
    with pytest.raises(ValueError, match="own module"):
        parse_search_space({"hidden_units": {"low": 4, "high": 8}}, est, "meta")


# ----------------------------------------------------------------------------- storages


def test_storages(tmp_path):
    assert make_storage(None) is None
    journal = make_storage(f"journal:{tmp_path / 'j.log'}")
    assert isinstance(journal, optuna.storages.JournalStorage)
    assert isinstance(make_storage(tmp_path / "k.log"), optuna.storages.JournalStorage)
    rdb = make_storage(f"sqlite:///{tmp_path / 'a.db'}", heartbeat_interval=5)
    assert isinstance(rdb, optuna.storages.RDBStorage)
    assert rdb.get_heartbeat_interval() == 5
    assert make_storage(rdb) is rdb


@pytest.mark.parametrize(
    "url, match",
    [
        ("foo://x/y", "unsupported database 'foo'"),
        ("metafit.db", "neither a database URL"),
        ("sqlite:///no/such/dir/x.db", "does not exist"),
        ("sqlite://", "in-memory"),
        ("journal:", "needs a file path"),
        ("journal:/no/such/dir/x.log", "does not exist"),
        ("postgresql://user:secret@127.0.0.1:1/db", "postgresql\\+psycopg://user:\\*\\*\\*"),
    ],
)
def test_bad_storage_urls(url, match):
    with pytest.raises(ValueError, match=match) as info:
        make_storage(url)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    "url, path",
    [
        ("journal:./study.log", "./study.log"),
        ("journal:///abs/study.log", "/abs/study.log"),
        ("journal:", ""),
        ("runs/study.journal", "runs/study.journal"),
        ("sqlite:///study.log", None),
        ("metafit.db", None),
    ],
)
def test_journal_path_reads_every_spelling(url, path):
    from metafit.storage import journal_path

    assert journal_path(url) == path


def test_heartbeat_needs_database(tmp_path):
    with pytest.raises(ValueError, match="heartbeats need a database"):
        make_storage(f"journal:{tmp_path / 'j.log'}", heartbeat_interval=1)
    with pytest.raises(ValueError, match="heartbeat_interval must be"):
        make_storage(f"sqlite:///{tmp_path / 'a.db'}", heartbeat_interval=0)


# ----------------------------------------------------------------------------- OptunaSearchCV


def test_optuna_search_cv_uses_the_meta_init(meta_fitted):
    from optuna_integration import OptunaSearchCV

    task = SinusoidTasks(k_shot=30, random_state=5).sample(1)[0]
    search = OptunaSearchCV(
        meta_fitted,
        {"inner_lr": FloatDistribution(1e-3, 0.02, log=True),
         "inner_steps": IntDistribution(1, 10)},
        n_trials=4, cv=3, random_state=0,
    )
    search.fit(task.X_support, task.y_support)
    assert len(search.trials_) == 4
    assert hasattr(search.best_estimator_, "meta_init_")
    assert search.best_estimator_.meta_init_ is meta_fitted.meta_init_
    assert np.isfinite(search.score(task.X_query, task.y_query))


@pytest.mark.parametrize(
    "error, state",
    [
        (RuntimeError("cannot infer the shape: inf"), TrialState.FAIL),
        (ValueError("input contains NaN"), TrialState.FAIL),
        (metafit.DivergenceError("fit diverged: lower inner_lr"), TrialState.PRUNED),
    ],
)
def test_divergence_is_recognised_by_type_not_by_words(meta_fitted, val_tasks, monkeypatch,
                                                       error, state):
    """A bug whose message mentions "inf" or "NaN" fails its trial (so it is seen);
    only a DivergenceError is a diverged, pruned trial."""
    from metafit.tuning import _objectives

    def broken(estimator, tasks):
        raise error

    monkeypatch.setattr(_objectives, "task_scores", broken)
    study = optuna.create_study()
    tune(meta_fitted, validation_tasks=val_tasks, n_trials=1, storage=study._storage,
         study_name=study.study_name, evaluate_defaults=False, catch=(Exception,))
    (trial,) = study.trials
    assert trial.state == state


def test_make_objective_drives_a_hand_written_study(meta_fitted, val_tasks):
    from metafit.tuning import make_objective

    study = optuna.create_study()
    study.enqueue_trial({"inner_lr": 0.9, "inner_steps": 20})  # diverges
    study.enqueue_trial({"inner_lr": 0.01, "inner_steps": 3})
    study.optimize(make_objective(meta_fitted, val_tasks), n_trials=2)
    bad, good = study.trials
    assert bad.state == TrialState.PRUNED and "DivergenceError" in bad.user_attrs[
        "metafit_diverged"]
    assert good.state == TrialState.COMPLETE
    assert good.value == pytest.approx(evaluate(
        tuned_estimator(meta_fitted, {"inner_lr": 0.01, "inner_steps": 3}), val_tasks))
    with pytest.raises(ValueError, match="no meta-learned initialization"):
        make_objective(MetaInitializedRegressor(**SMALL), val_tasks)


def test_tune_accepts_an_existing_study_and_names_its_own(meta_fitted, val_tasks, tmp_path):
    mine = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    got = tune(meta_fitted, validation_tasks=val_tasks, n_trials=2, study=mine,
               gc_after_trial=True)
    assert got is mine and len(mine.trials) == 2
    assert mine.metric_names == ["query MSE"]
    with pytest.raises(ValueError, match="study= and storage"):
        tune(meta_fitted, validation_tasks=val_tasks, n_trials=1, study=mine,
             storage=f"sqlite:///{tmp_path / 'x.db'}")
    url = f"sqlite:///{tmp_path / 's.db'}"
    named = tune(meta_fitted, validation_tasks=val_tasks, n_trials=1, storage=url)
    assert named.study_name == "metafit-regressor-adaptation"
    again = tune(meta_fitted, validation_tasks=val_tasks, n_trials=1, storage=url)
    assert len(again.trials) == 2  # the default name resumes the same study


def test_completed_trials_carry_spread_and_fit_time(meta_fitted, val_tasks):
    study = optuna.create_study()
    for lr in (0.01, 0.02):
        study.enqueue_trial({"inner_lr": lr, "inner_steps": 3})
    tune(meta_fitted, validation_tasks=val_tasks, n_trials=2, study=study)
    for trial in study.trials:
        assert trial.state == TrialState.COMPLETE
        attrs = trial.user_attrs
        assert attrs["metafit_score_std"] >= 0 and attrs["metafit_score_sem"] >= 0
        assert 0 < attrs["metafit_fit_seconds"] < 10
    from metafit.tuning import task_scores

    scores, seconds = task_scores(meta_fitted, val_tasks)
    assert len(scores) == len(val_tasks) and np.isfinite(scores).all()
    assert float(np.mean(scores)) == pytest.approx(evaluate(meta_fitted, val_tasks))


def test_a_huge_but_finite_loss_is_a_diverged_trial(meta_fitted, val_tasks, monkeypatch):
    """64,388 (or 5.8e25) recorded as COMPLETE would ruin every plot of the study."""
    from metafit.tuning import _objectives, trivial_mse

    bound = _objectives.BLOWUP_FACTOR * trivial_mse(val_tasks)

    def huge(estimator, tasks):
        return np.full(len(val_tasks), 2 * bound), np.zeros(len(val_tasks))

    monkeypatch.setattr(_objectives, "task_scores", huge)
    study = tune(meta_fitted, validation_tasks=val_tasks, n_trials=1, evaluate_defaults=False)
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED
    assert "over 100 times" in trial.user_attrs["metafit_diverged"]


def test_the_study_names_the_file_its_initialization_came_from(meta_fitted, val_tasks,
                                                                tmp_path):
    path = tmp_path / "init.safetensors"
    meta_fitted.save_meta_init(path)
    est = MetaInitializedRegressor(meta_init=path, hidden_sizes=meta_fitted.hidden_sizes)
    study = tune(est, validation_tasks=val_tasks, n_trials=1)
    assert study.user_attrs["metafit_init_file"] == str(path)
    assert len(study.user_attrs["metafit_init"]) == 16


def test_evaluate_in_a_hand_written_objective_never_ends_the_study(meta_fitted, val_tasks):
    study = optuna.create_study()
    study.enqueue_trial({"inner_lr": 1e6, "inner_steps": 20})
    study.enqueue_trial({"inner_lr": 0.01, "inner_steps": 3})

    def objective(trial):
        lr = trial.suggest_float("inner_lr", 1e-3, 1e6, log=True)
        steps = trial.suggest_int("inner_steps", 1, 20)
        return evaluate(tuned_estimator(meta_fitted, {"inner_lr": lr, "inner_steps": steps}),
                        val_tasks)

    study.optimize(objective, n_trials=2)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_an_interrupt_between_trials_is_deferred_to_the_next_trial(meta_fitted, val_tasks):
    """Raised while Optuna creates or records a trial, an interrupt could leave that trial
    RUNNING forever; deferred, it fails the next trial inside its objective instead."""
    from metafit.tuning import _objectives

    class Stop(KeyboardInterrupt):
        pass

    def request_after_first(study, trial):
        if trial.number == 0:
            assert _objectives.request_interrupt(Stop)  # not inside an objective: deferred

    study = optuna.create_study()
    for _ in range(2):
        study.enqueue_trial({"inner_lr": 0.01, "inner_steps": 3})  # converging trials
    with pytest.raises(Stop):
        tune(meta_fitted, validation_tasks=val_tasks, n_trials=5, study=study,
             evaluate_defaults=False, callbacks=[request_after_first])
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.COMPLETE and states[1:] == [TrialState.FAIL]
    assert _objectives.INTERRUPTS.pending is None and _objectives.INTERRUPTS.tuning == 0
    assert not _objectives.request_interrupt(Stop)  # outside tune: the caller raises


def test_the_default_space_tunes_only_what_fit_reads():
    """Meta-SGD's and MAML++'s fit use learned rates; ALPACA's fit is a closed form."""
    from metafit import MetaInitializedRegressor, SinusoidTasks
    from metafit.algorithms import MAMLPlusPlus
    from metafit.tuning import default_search_space

    def space(**kw):
        return set(default_search_space(MetaInitializedRegressor(**kw)))

    assert space() == {"inner_lr", "inner_steps"}
    assert space(algorithm="metasgd") == {"inner_steps"}
    assert space(algorithm="mamlpp") == {"inner_steps"}
    assert space(algorithm=MAMLPlusPlus(learn_inner_lr=False)) == {"inner_lr", "inner_steps"}
    with pytest.raises(ValueError, match="nothing to tune in adaptation mode.*alpaca"):
        space(algorithm="alpaca")
    meta = set(default_search_space(MetaInitializedRegressor(algorithm="alpaca"), "meta"))
    assert "inner_lr" not in meta and "meta_lr" in meta
    # The initialization's algorithm decides, not the parameter.
    est = MetaInitializedRegressor(algorithm="metasgd", meta_iterations=2, random_state=0,
                                   verbose=0).meta_fit(SinusoidTasks(k_shot=4))
    assert set(default_search_space(est.set_params(algorithm="maml"))) == {"inner_steps"}


def test_the_group_algorithms_tune_like_the_others():
    """CAVIA tunes its inner steps (its context rate is its own); ALPACA, which has no
    inner loop, is tuned in meta mode."""
    from metafit import MetaInitializedRegressor, SinusoidTasks
    from metafit.tuning import tune

    tasks = SinusoidTasks(k_shot=5, random_state=0)
    val = SinusoidTasks(k_shot=5, random_state=1).sample(5)
    cavia = MetaInitializedRegressor(algorithm="cavia", hidden_sizes=(8,), meta_iterations=3,
                                     meta_batch_size=4, random_state=0, verbose=0)
    study = tune(cavia.meta_fit(tasks), tasks, validation_tasks=val, n_trials=2)
    assert set(study.best_params) == {"inner_steps"}
    alpaca = MetaInitializedRegressor(algorithm="alpaca", hidden_sizes=(8,), meta_iterations=3,
                                      meta_batch_size=4, random_state=0, verbose=0)
    study = tune(alpaca, tasks, validation_tasks=val, n_trials=2, mode="meta",
                 search_space={"meta_lr": {"low": 1e-3, "high": 1e-1, "log": True}})
    assert len(study.trials) == 2 and "meta_lr" in study.best_params


# ------------------------------------------------------- validation tasks held out by tune


def _grouped_table(n_groups=20, rows=12, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"g{i}" for i in range(n_groups)], rows)
    X = rng.normal(size=(len(groups), 2))
    offsets = dict(zip(np.unique(groups), rng.normal(size=n_groups)))
    y = X @ [1.0, -0.5] + np.array([offsets[g] for g in groups]) + 0.1 * rng.normal(
        size=len(groups))
    return X, y, groups


TABLE = dict(hidden_sizes=(8,), meta_batch_size=4, meta_iterations=5, random_state=0,
             verbose=0)


@pytest.mark.parametrize("mode", ["adaptation", "meta"])
def test_tune_holds_out_whole_groups_of_a_table(monkeypatch, mode):
    """Without validation_tasks, tune scores on groups that meta_fit never sees."""
    from metafit.grouped import GroupedTable

    X, y, groups = _grouped_table()
    seen = []
    real = MetaInitializedRegressor.meta_fit

    def spy(self, X, y=None, *args, groups=None, **kwargs):
        table = X if isinstance(X, GroupedTable) else GroupedTable(X, y, groups)
        seen.append(table)
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(MetaInitializedRegressor, "meta_fit", spy)
    adapted = []  # every validation task's support rows go to fit
    real_fit = MetaInitializedRegressor.fit

    def spy_fit(self, X, y):
        adapted.append(np.asarray(X))
        return real_fit(self, X, y)

    monkeypatch.setattr(MetaInitializedRegressor, "fit", spy_fit)
    est = MetaInitializedRegressor(algorithm="maml", **TABLE)
    space = ({"inner_steps": {"low": 1, "high": 3}} if mode == "adaptation"
             else {"meta_lr": {"low": 1e-3, "high": 1e-2, "log": True}})
    study = tune(est, GroupedTable(X, y, groups), n_trials=2, mode=mode, search_space=space)
    assert len(study.trials) == 2
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert seen and adapted
    for table in seen:  # 20 groups, 0.2 of them held out: 16 meta-train
        assert len(np.unique(table.groups)) == 16 and len(table.y) == 16 * 12
    train_rows = {tuple(r) for table in seen for r in np.asarray(table.X)}
    assert {len(a) for a in adapted} == {2, 6, 10}  # support_range (2, 10): ends, middle
    assert not any(tuple(r) in train_rows for a in adapted for r in a)
    if mode == "adaptation":
        assert hasattr(est, "meta_init_")  # meta-fitted in place, on the 16 groups


def test_tune_holds_out_the_same_groups_in_every_worker():
    """The split depends on the data and random_state only: workers of a shared study
    score on the same tasks."""
    from metafit.grouped import GroupedTable
    from metafit.tuning._holdout import hold_out_validation

    X, y, groups = _grouped_table()
    est = MetaInitializedRegressor(**TABLE)
    first = hold_out_validation(est, GroupedTable(X, y, groups), initialized=False)
    second = hold_out_validation(est, GroupedTable(X, y, groups), initialized=False)
    assert np.array_equal(first[0].groups, second[0].groups)
    assert all(np.array_equal(a.X_support, b.X_support) for a, b in zip(first[1], second[1]))
    seedless = MetaInitializedRegressor(**{**TABLE, "random_state": None})
    third = hold_out_validation(seedless, GroupedTable(X, y, groups), initialized=False)
    fourth = hold_out_validation(seedless, GroupedTable(X, y, groups), initialized=False)
    assert np.array_equal(third[0].groups, fourth[0].groups)
    # validation_fraction decides how many groups: 0.4 of 20
    wide = MetaInitializedRegressor(**{**TABLE, "validation_fraction": 0.4})
    kept, _ = hold_out_validation(wide, GroupedTable(X, y, groups), initialized=False)
    assert len(np.unique(kept.groups)) == 12
    # 0 holds nothing out of meta_fit's groups; tune still needs some: the default 0.2
    none = MetaInitializedRegressor(**{**TABLE, "validation_fraction": 0})
    kept, _ = hold_out_validation(none, GroupedTable(X, y, groups), initialized=False)
    assert len(np.unique(kept.groups)) == 16


def test_tune_holds_out_part_of_a_list_of_tasks(val_tasks):
    tasks = SinusoidTasks(k_shot=5, random_state=0).sample(10)
    est = MetaInitializedRegressor(**{**SMALL, "meta_iterations": 2, "verbose": 0})
    trained, adapted = [], []
    real, real_fit = MetaInitializedRegressor.meta_fit, MetaInitializedRegressor.fit

    def spy(self, tasks, *args, **kwargs):
        tasks = list(tasks)
        trained.extend(tasks)
        return real(self, tasks, *args, **kwargs)

    def spy_fit(self, X, y):
        adapted.append(np.asarray(X))
        return real_fit(self, X, y)

    try:
        MetaInitializedRegressor.meta_fit = spy
        MetaInitializedRegressor.fit = spy_fit
        study = tune(est, tasks, n_trials=2, search_space={"inner_steps": {"low": 1, "high": 3}})
    finally:
        MetaInitializedRegressor.meta_fit, MetaInitializedRegressor.fit = real, real_fit
    assert len(study.trials) == 2
    assert len({id(t) for t in trained}) == 8  # 0.2 of 10 held out (auto meta-fits twice)
    assert all(any(t is u for u in tasks) for t in trained)
    held = [t for t in tasks if not any(t is u for u in trained)]
    assert adapted and all(any(np.array_equal(a, t.X_support) for t in held) for a in adapted)


def test_tune_without_validation_tasks_refuses_what_it_cannot_hold_out(meta_fitted):
    from metafit.grouped import GroupedTable

    X, y, groups = _grouped_table()
    table = GroupedTable(X, y, groups)
    # already meta-fitted: which groups did it see?
    with pytest.raises(ValueError, match="already meta-fitted"):
        tune(meta_fitted, table, n_trials=1)
    # an endless sampler
    with pytest.raises(ValueError, match="neither a GroupedTable nor a list"):
        tune(MetaInitializedRegressor(**SMALL), SinusoidTasks(), n_trials=1, mode="meta")
    # no tasks at all
    with pytest.raises(ValueError, match="validation_tasks is required"):
        tune(meta_fitted, n_trials=1)
    # too few groups or tasks
    with pytest.raises(ValueError, match="needs at least 3"):
        tune(MetaInitializedRegressor(**TABLE), GroupedTable(X[:24], y[:24], groups[:24]),
             n_trials=1)
    with pytest.raises(ValueError, match="at least 3 are needed"):
        tune(MetaInitializedRegressor(**SMALL), SinusoidTasks().sample(2), n_trials=1)
    # categorical columns cannot travel in numeric tasks
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": X[:, 0], "c": pd.Categorical(np.where(X[:, 1] > 0, "u", "v"))})
    with pytest.raises(ValueError, match="non-numeric columns"):
        tune(MetaInitializedRegressor(**TABLE, categorical_features="from_dtype"),
             GroupedTable(frame, y, groups), n_trials=1)
