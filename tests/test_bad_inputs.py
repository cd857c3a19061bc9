"""A table of bad inputs across tasks, estimators, training, plotting, tuning and configs.

Every row must raise ValueError or TypeError whose message says what to fix, and leave
nothing behind: the estimator it was called on keeps exactly its attributes, and no file
appears in the working folder. Numeric parameters are also probed with hypothesis.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metafit import (
    MetaInit,
    MetaInitializedClassifier,
    MetaInitializedRegressor,
    NWayKShotTasks,
    SinusoidTasks,
    Task,
    tasks_from_groups,
)
from metafit.training import DivergenceError, InterruptedTrainingWarning

RNG = np.random.default_rng(0)
X4, Y4 = RNG.normal(size=(4, 1)), RNG.normal(size=4)
REG_TASKS = SinusoidTasks(k_shot=4, k_query=4, random_state=0).sample(4)
CLF_TASKS = [
    Task(
        RNG.normal(size=(6, 3)),
        np.tile([0, 1, 2], 2),
        RNG.normal(size=(6, 3)),
        np.tile([0, 1, 2], 2),
    )
    for _ in range(4)
]
QUICK = dict(hidden_sizes=(4,), meta_iterations=2, meta_batch_size=2, random_state=0)

_FITTED: dict[str, Any] = {}


def fitted_regressor():
    if "reg" not in _FITTED:
        _FITTED["reg"] = MetaInitializedRegressor(**QUICK).meta_fit(REG_TASKS)
    return _FITTED["reg"]


def fitted_classifier():
    if "clf" not in _FITTED:
        _FITTED["clf"] = MetaInitializedClassifier(**QUICK).meta_fit(CLF_TASKS)
    return _FITTED["clf"]


@dataclass
class Case:
    """``make(tmp)`` returns ``(target, action)``; ``action()`` must raise ``error``."""

    id: str
    make: Callable
    error: type
    match: str


def reg(**kw):
    return MetaInitializedRegressor(**{**QUICK, **kw})


def meta_fit_with(**kw):
    def make(tmp):
        est = reg(**kw)
        return est, lambda: est.meta_fit(REG_TASKS, REG_TASKS[:2])

    return make


def call(fn, *args, **kw):
    def make(tmp):
        return None, lambda: fn(*args, **kw)

    return make


def on_fitted(method, *args, which="reg", **params):
    def make(tmp):
        import copy

        base = fitted_regressor() if which == "reg" else fitted_classifier()
        est = copy.deepcopy(base).set_params(**params)
        return est, lambda: getattr(est, method)(*args)

    return make


def est_call(method, *args, **params):
    """``reg(**params).method(*args)``; a param given as a function of tmp is called first."""

    def make(tmp):
        resolved = {
            k: v(tmp) if callable(v) and not isinstance(v, type) else v for k, v in params.items()
        }
        est = reg(**resolved)
        return est, lambda: getattr(est, method)(*args)

    return make


def tasks_case(*args):
    return call(Task, *args)


def fresh_meta_fit(tasks, estimator=MetaInitializedRegressor, validation=None):
    def make(tmp):
        est = estimator(**QUICK)
        return est, lambda: est.meta_fit(tasks, validation)

    return make


def _tuning_cases():
    from metafit import tuning

    def tune(**kw):
        def make(tmp):
            est = fitted_regressor()
            args = dict(validation_tasks=REG_TASKS[:2], n_trials=1, storage=f"sqlite:///{tmp}/s.db")
            args.update(kw)
            return est, lambda: tuning.tune(est, **args)

        return make

    return [
        Case(
            "tune-not-an-estimator",
            call(tuning.tune, object(), validation_tasks=REG_TASKS),
            TypeError,
            "must be a MetaInitializedRegressor",
        ),
        Case("tune-n_trials-zero", tune(n_trials=0), ValueError, "n_trials must be an int >= 1"),
        Case("tune-timeout-negative", tune(timeout=-5), ValueError, "timeout must be .* > 0"),
        Case("tune-bad-mode", tune(mode="fast"), ValueError, "mode"),
        Case(
            "tune-space-low-above-high",
            tune(search_space={"inner_lr": {"low": 1.0, "high": 0.1}}),
            ValueError,
            "inner_lr",
        ),
        Case(
            "tune-space-unknown-param",
            tune(search_space={"learning_rate": {"low": 0.1, "high": 1}}),
            ValueError,
            "learning_rate",
        ),
        Case(
            "tune-meta-param-in-adaptation-mode",
            tune(search_space={"meta_lr": {"low": 1e-4, "high": 1e-2}}),
            ValueError,
            "meta",
        ),
        Case("tune-empty-validation", tune(validation_tasks=[]), ValueError, "validation_tasks"),
        Case(
            "tune-storage-bad-url",
            call(tuning.make_storage, "ftp://nowhere/db"),
            ValueError,
            "storage",
        ),
    ]


GOOD_CONFIG = """\
tasks: {source: sinusoid, k_shot: 5, validation_tasks: 3, test_tasks: 3}
estimator:
  type: regressor
  params: {hidden_sizes: [4], meta_iterations: 2, meta_batch_size: 2, random_state: 0}
tune: {mode: adaptation, n_trials: 1}
search_space:
  inner_lr: {low: 0.001, high: 0.1, log: true}
"""

#: (id, file name, text, words the message must contain)
CONFIG_ROWS = [
    ("config-unknown-format", "c.json", "{}", r"use \.yaml, \.yml or \.toml"),
    ("config-invalid-yaml", "c.yaml", "tasks: [1, 2\n", "invalid YAML at line"),
    ("config-invalid-toml", "c.toml", "tasks = [", "invalid TOML"),
    ("config-empty", "c.yaml", "", "needs at least a tasks section"),
    ("config-not-a-mapping", "c.yaml", "- tasks\n", "must be a mapping of sections"),
    (
        "config-section-typo",
        "c.yaml",
        GOOD_CONFIG.replace("tune:", "tuning:"),
        "unknown key 'tuning' .allowed:",
    ),
    ("config-missing-tasks", "c.yaml", "estimator: {type: regressor}\n", "missing section 'tasks'"),
    (
        "config-unknown-source",
        "c.yaml",
        GOOD_CONFIG.replace("sinusoid", "sinus"),
        "tasks.source must be one of",
    ),
    (
        "config-task-key-typo",
        "c.yaml",
        GOOD_CONFIG.replace("k_shot", "k_shots"),
        "unknown key 'k_shots'",
    ),
    (
        "config-k_shot-zero",
        "c.yaml",
        GOOD_CONFIG.replace("k_shot: 5", "k_shot: 0"),
        "tasks.k_shot must be >= 1",
    ),
    (
        "config-table-without-group",
        "c.yaml",
        "tasks: {source: table, path: t.csv, target: y}\n",
        "tasks.group is required",
    ),
    (
        "config-estimator-type",
        "c.yaml",
        GOOD_CONFIG.replace("type: regressor", "type: ranker"),
        "estimator.type must be 'regressor' or 'classifier'",
    ),
    (
        "config-unknown-model",
        "c.yaml",
        GOOD_CONFIG.replace("type: regressor", "type: regressor\n  model: ResNet50"),
        "is not a network of metafit.models",
    ),
    (
        "config-unknown-param",
        "c.yaml",
        GOOD_CONFIG.replace("random_state: 0}", "lr: 0.1}"),
        "unknown parameter 'lr'; known:",
    ),
    (
        "config-param-wrong-type",
        "c.yaml",
        GOOD_CONFIG.replace("random_state: 0}", "inner_lr: fast}"),
        "inner_lr must be a number",
    ),
    (
        "config-tune-mode",
        "c.yaml",
        GOOD_CONFIG.replace("mode: adaptation", "mode: full"),
        "tune.mode must be 'adaptation' or 'meta'",
    ),
    (
        "config-n_trials-zero",
        "c.yaml",
        GOOD_CONFIG.replace("n_trials: 1", "n_trials: 0"),
        "tune.n_trials must be >= 1",
    ),
    (
        "config-unknown-sampler",
        "c.yaml",
        GOOD_CONFIG.replace("n_trials: 1}", "n_trials: 1, sampler: {name: bayes}}"),
        "tune.sampler.name must be one of",
    ),
    (
        "config-space-low-above-high",
        "c.yaml",
        GOOD_CONFIG.replace("low: 0.001, high: 0.1", "low: 0.1, high: 0.001"),
        "low=0.1 is greater than high=0.001",
    ),
]


def _config_cases():
    """Rows for metafit.config: each writes a config file, then loads it."""
    from metafit.config import load_config

    def make_loader(name, text):
        def make(tmp):
            path = tmp / name
            path.write_text(text)
            return None, lambda: load_config(path)

        return make

    rows = [Case(i, make_loader(n, t), ValueError, m) for i, n, t, m in CONFIG_ROWS]
    rows.append(
        Case(
            "config-missing-file",
            call(load_config, "no/such/config.yaml"),
            ValueError,
            "config file not found",
        )
    )
    return rows


CASES = [
    # ---- tasks
    Case("task-X-1d", tasks_case(np.zeros(4), Y4, X4, Y4), ValueError, r"reshape\(-1, 1\)"),
    Case(
        "task-empty-support",
        tasks_case(np.zeros((0, 1)), np.zeros(0), X4, Y4),
        ValueError,
        "every task needs examples",
    ),
    Case(
        "task-nan-X", tasks_case(np.full((4, 1), np.nan), Y4, X4, Y4), ValueError, "clean or impute"
    ),
    Case("task-inf-y", tasks_case(X4, np.full(4, np.inf), X4, Y4), ValueError, "clean or impute"),
    Case("task-length-mismatch", tasks_case(X4, Y4[:3], X4, Y4), ValueError, "must match"),
    Case(
        "task-feature-mismatch",
        tasks_case(X4, Y4, np.zeros((4, 2)), Y4),
        ValueError,
        "same features",
    ),
    Case(
        "task-target-mismatch", tasks_case(X4, Y4, X4, np.zeros((4, 2))), ValueError, "same targets"
    ),
    Case("task-string-X", tasks_case(np.full((4, 1), "a"), Y4, X4, Y4), ValueError, "real numbers"),
    Case(
        "task-tuple-3-items",
        call(Task.from_tuple, (X4, Y4, X4)),
        ValueError,
        r"\(X_support, y_support, X_query, y_query\)",
    ),
    Case("sinusoid-k_shot-zero", call(SinusoidTasks, k_shot=0), ValueError, "k_shot must be"),
    Case("sinusoid-k_shot-float", call(SinusoidTasks, k_shot=2.5), TypeError, "k_shot must be"),
    Case(
        "nway-more-ways-than-classes",
        call(NWayKShotTasks, RNG.normal(size=(20, 2)), np.repeat([0, 1], 10), n_way=3, k_shot=1),
        ValueError,
        "n_way",
    ),
    Case(
        "nway-shots-exceed-class-size",
        call(
            NWayKShotTasks,
            RNG.normal(size=(8, 2)),
            np.repeat([0, 1], 4),
            n_way=2,
            k_shot=3,
            k_query=3,
        ),
        ValueError,
        "k_shot",
    ),
    Case(
        "groups-X-1d",
        call(tasks_from_groups, np.zeros(6), np.zeros(6), np.zeros(6)),
        ValueError,
        "2-D",
    ),
    Case(
        "groups-length-mismatch",
        call(tasks_from_groups, np.zeros((6, 1)), np.zeros(5), np.zeros(6)),
        ValueError,
        "same length",
    ),
    Case(
        "groups-support-fraction-above-1",
        call(tasks_from_groups, np.zeros((6, 1)), np.zeros(6), np.zeros(6), support_size=1.5),
        ValueError,
        r"\(0, 1\)",
    ),
    Case(
        "groups-support-size-str",
        call(tasks_from_groups, np.zeros((6, 1)), np.zeros(6), np.zeros(6), support_size="half"),
        TypeError,
        "support_size must be an int or a float",
    ),
    Case(
        "groups-none-large-enough",
        call(tasks_from_groups, np.zeros((4, 1)), np.zeros(4), np.arange(4)),
        ValueError,
        "group",
    ),
    # ---- estimator parameters (checked before any training)
    Case(
        "est-unknown-kwarg",
        est_call("meta_fit", REG_TASKS, learning_rate=0.1),
        TypeError,
        "module__<name>",
    ),
    Case("est-inner_lr-zero", meta_fit_with(inner_lr=0.0), ValueError, "inner_lr must be"),
    Case("est-inner_lr-str", meta_fit_with(inner_lr="0.1"), TypeError, "inner_lr must be a number"),
    Case(
        "est-inner_steps-negative",
        meta_fit_with(inner_steps=-1),
        ValueError,
        "inner_steps must be an int >= 0",
    ),
    Case(
        "est-meta_batch_size-zero",
        meta_fit_with(meta_batch_size=0),
        ValueError,
        "meta_batch_size must be an int >= 1",
    ),
    Case(
        "est-meta_iterations-float",
        meta_fit_with(meta_iterations=10.0),
        TypeError,
        "meta_iterations must be an int",
    ),
    Case(
        "est-validation_interval-zero",
        meta_fit_with(validation_interval=0),
        ValueError,
        "validation_interval must be an int >= 1",
    ),
    Case(
        "est-unknown-algorithm",
        meta_fit_with(algorithm="maml2"),
        ValueError,
        "algorithm must be one of",
    ),
    Case(
        "est-unknown-forward", meta_fit_with(forward="fast"), ValueError, "forward must be one of"
    ),
    Case(
        "est-hidden_sizes-zero",
        meta_fit_with(hidden_sizes=(4, 0)),
        ValueError,
        "hidden_sizes must be a tuple of positive ints",
    ),
    Case(
        "est-module-not-a-module",
        meta_fit_with(module="resnet"),
        TypeError,
        "nn.Module subclass or instance",
    ),
    Case("est-bogus-device", meta_fit_with(device="gpu:x"), ValueError, "not a torch device"),
    Case(
        "est-bad-random_state",
        meta_fit_with(random_state="seed"),
        ValueError,
        "random_state must be None, an int",
    ),
    # ---- training parameters (this module's wiring)
    Case("train-patience-zero", meta_fit_with(patience=0), ValueError, "patience must be"),
    Case("train-patience-float", meta_fit_with(patience=2.5), TypeError, "patience must be an int"),
    Case(
        "train-min_delta-negative",
        meta_fit_with(min_delta=-0.1),
        ValueError,
        "min_delta must be a finite number >= 0",
    ),
    Case(
        "train-clip-zero",
        meta_fit_with(clip_grad_norm=0),
        ValueError,
        "clip_grad_norm must be a finite number > 0",
    ),
    Case(
        "train-clip-str",
        meta_fit_with(clip_grad_norm="1"),
        TypeError,
        "clip_grad_norm must be a number or None",
    ),
    Case(
        "train-checkpoint-is-folder",
        est_call("meta_fit", REG_TASKS, checkpoint_path=lambda tmp: tmp),
        ValueError,
        "must name a file, not a folder",
    ),
    Case(
        "train-checkpoint-not-path",
        meta_fit_with(checkpoint_path=3),
        TypeError,
        "checkpoint_path must be None, a str or a path",
    ),
    Case(
        "train-checkpoint_interval-zero",
        est_call(
            "meta_fit",
            REG_TASKS,
            checkpoint_path=lambda tmp: tmp / "c.st",
            checkpoint_interval=0,
        ),
        ValueError,
        "checkpoint_interval must be",
    ),
    Case(
        "train-on_interrupt-unknown",
        meta_fit_with(on_interrupt="ignore"),
        ValueError,
        'on_interrupt must be "warn" or "raise"',
    ),
    Case(
        "train-warm_start-str",
        meta_fit_with(warm_start="yes"),
        TypeError,
        "warm_start must be True or False",
    ),
    Case("train-verbose-negative", meta_fit_with(verbose=-1), ValueError, "verbose must be"),
    Case(
        "train-patience-without-validation",
        est_call("meta_fit", REG_TASKS, patience=2),
        ValueError,
        "needs validation_tasks",
    ),
    Case(
        "train-warm-start-other-features",
        on_fitted(
            "meta_fit",
            CLF_TASKS[:0] or [Task(np.zeros((4, 2)), np.zeros(4), np.zeros((4, 2)), np.zeros(4))],
            warm_start=True,
            meta_iterations=5,
        ),
        ValueError,
        "warm_start=False to start over",
    ),
    # ---- meta_fit inputs
    Case("meta_fit-single-task", fresh_meta_fit(REG_TASKS[0]), TypeError, "iterable of Task"),
    Case("meta_fit-array", fresh_meta_fit(np.zeros((3, 4))), TypeError, "iterable of Task"),
    Case("meta_fit-empty", fresh_meta_fit([]), ValueError, "at least one task"),
    Case(
        "meta_fit-feature-mismatch",
        fresh_meta_fit([REG_TASKS[0], Task(np.zeros((4, 2)), Y4, np.zeros((4, 2)), Y4)]),
        ValueError,
        "must share their features",
    ),
    Case(
        "meta_fit-empty-validation",
        fresh_meta_fit(REG_TASKS, validation=[]),
        ValueError,
        "pass None or at least one task",
    ),
    Case(
        "meta_fit-classifier-float-labels",
        fresh_meta_fit([Task(X4, Y4, X4, Y4)] * 2, MetaInitializedClassifier),
        ValueError,
        "integer class indices",
    ),
    Case(
        "meta_fit-regressor-output-mismatch",
        fresh_meta_fit([Task(X4, Y4, X4, Y4), Task(X4, np.zeros((4, 2)), X4, np.zeros((4, 2)))]),
        ValueError,
        "must share their targets",
    ),
    # ---- fit / predict inputs
    Case("fit-nan-X", on_fitted("fit", np.full((4, 1), np.nan), Y4), ValueError, "NaN"),
    Case(
        "fit-wrong-feature-count",
        on_fitted("fit", np.zeros((4, 3)), Y4),
        ValueError,
        "features used in meta-training",
    ),
    Case(
        "fit-wrong-output-count",
        on_fitted("fit", X4, np.zeros((4, 2))),
        ValueError,
        "use the targets of meta-training",
    ),
    Case(
        "fit-classifier-too-many-classes",
        on_fitted("fit", np.zeros((5, 3)), np.arange(5), which="clf"),
        ValueError,
        "n_way >= 5",
    ),
    Case(
        "fit-meta_init-wrong-type",
        est_call("fit", X4, Y4, meta_init=3),
        TypeError,
        "meta_init must be None, a path or a MetaInit",
    ),
    Case(
        "fit-meta_init-not-safetensors",
        est_call("fit", X4, Y4, meta_init=lambda tmp: _write(tmp / "x.safetensors", b"hi")),
        ValueError,
        "not a readable safetensors file",
    ),
    Case(
        "fit-classifier-init-on-regressor",
        est_call(
            "fit",
            np.zeros((4, 3)),
            np.zeros((4, 3)),
            meta_init=lambda tmp: fitted_classifier().meta_init_,
        ),
        ValueError,
        "cannot serve a regressor",
    ),
    # ---- plotting
    Case(
        "plot-history-before-meta_fit",
        lambda tmp: (
            None,
            lambda: __import__("metafit.plotting").plotting.plot_meta_history(
                MetaInitializedRegressor()
            ),
        ),
        ValueError,
        "call meta_fit",
    ),
    Case(
        "plot-adaptation-negative-steps",
        lambda tmp: (
            None,
            lambda: __import__("metafit.plotting").plotting.plot_adaptation(
                fitted_regressor(), REG_TASKS, steps=-1
            ),
        ),
        ValueError,
        "steps must be an int >= 0",
    ),
    Case(
        "plot-predictions-classifier",
        lambda tmp: (
            None,
            lambda: __import__("metafit.plotting").plotting.plot_predictions(
                fitted_classifier(), CLF_TASKS[0]
            ),
        ),
        ValueError,
        "1-D regression",
    ),
    *_tuning_cases(),
    *_config_cases(),
]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _snapshot(obj):
    if obj is None:
        return None
    return {k: id(v) for k, v in vars(obj).items()}


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target, action = case.make(tmp_path)
    files_before = sorted(os.listdir(tmp_path))
    state_before = _snapshot(target)
    assert issubclass(case.error, (ValueError, TypeError))
    with pytest.raises(case.error, match=case.match) as info:
        action()
    assert type(info.value) is not AssertionError
    assert _snapshot(target) == state_before, "the call changed attributes before failing"
    assert sorted(os.listdir(tmp_path)) == files_before, "the call left a file behind"


# ---------------------------------------------------------------------------- hypothesis

POSITIVE_FLOATS = ("inner_lr", "meta_lr", "clip_grad_norm")
bad_floats = st.one_of(
    st.floats(max_value=0.0),
    st.sampled_from([float("nan"), float("inf"), -float("inf")]),
)
not_numbers = st.one_of(st.text(max_size=3), st.lists(st.integers(), max_size=2), st.just(True))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(POSITIVE_FLOATS), value=bad_floats)
def test_positive_float_params_reject_bad_values(name, value):
    est = reg(**{name: value})
    with pytest.raises(ValueError, match=f"{name} must be a finite"):
        est.meta_fit(REG_TASKS)
    assert not hasattr(est, "meta_init_")


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(POSITIVE_FLOATS + ("min_delta", "meta_iterations", "patience")),
    value=not_numbers,
)
def test_numeric_params_reject_non_numbers(name, value):
    est = reg(**{name: value})
    with pytest.raises(TypeError, match=f"{name} must be"):
        est.meta_fit(REG_TASKS)
    assert not hasattr(est, "meta_init_")


INT_MINIMUMS = {
    "inner_steps": 0,
    "meta_batch_size": 1,
    "meta_iterations": 1,
    "validation_interval": 1,
    "patience": 1,
    "checkpoint_interval": 1,
}


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_int_params_reject_values_below_their_minimum(data):
    name = data.draw(st.sampled_from(sorted(INT_MINIMUMS)))
    value = data.draw(st.integers(max_value=INT_MINIMUMS[name] - 1))
    est = reg(**{name: value})
    with pytest.raises(ValueError, match=f"{name} must be"):
        est.meta_fit(REG_TASKS)
    assert not hasattr(est, "meta_init_")


@settings(max_examples=30, deadline=None)
@given(
    n_support=st.integers(1, 5),
    n_y=st.integers(0, 5),
    n_features=st.integers(1, 3),
)
def test_task_lengths_must_agree(n_support, n_y, n_features):
    X = np.zeros((n_support, n_features))
    if n_y == n_support:
        Task(X, np.zeros(n_y), X, np.zeros(n_support))
        return
    with pytest.raises(ValueError, match="must match"):
        Task(X, np.zeros(n_y), X, np.zeros(n_support))


@settings(max_examples=20, deadline=None)
@given(bad=st.sampled_from([np.nan, np.inf, -np.inf]), row=st.integers(0, 3))
def test_non_finite_fit_data_is_rejected_and_keeps_the_fit(bad, row):
    import copy

    est = copy.deepcopy(fitted_regressor()).fit(X4, Y4)
    before = est.predict(X4)
    X = X4.copy()
    X[row, 0] = bad
    with pytest.raises(ValueError, match="NaN|infinity"):
        est.fit(X, Y4)
    np.testing.assert_array_equal(est.predict(X4), before)


def test_good_config_loads(tmp_path):
    from metafit.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(GOOD_CONFIG)
    assert load_config(path).tasks["k_shot"] == 5  # the bad rows differ from a good file


@pytest.mark.parametrize("row", CONFIG_ROWS[:6], ids=[r[0] for r in CONFIG_ROWS[:6]])
def test_cli_reports_bad_configs_in_one_line_and_writes_nothing(row, tmp_path, monkeypatch, capsys):
    from metafit.cli import main

    _, name, text, match = row
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_text(text)
    storage = f"sqlite:///{tmp_path}/study.db"
    status = main(["tune", str(path), "--storage", storage, "--n-trials", "1"])
    err = capsys.readouterr().err
    assert status != 0
    assert err.startswith("metafit: error:") and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    assert sorted(os.listdir(tmp_path)) == [name]


def test_meta_init_is_not_written_on_bad_input(tmp_path):
    path = tmp_path / "m.safetensors"
    est = reg(checkpoint_path=path, checkpoint_interval=1, inner_lr=-1)
    with pytest.raises(ValueError):
        est.meta_fit(REG_TASKS)
    assert not path.exists() and not os.listdir(tmp_path)
    assert isinstance(fitted_regressor().meta_init_, MetaInit)


# ------------------------------------------------------------ issue 13: checkpoint paths


def _tiny_regressor(**kw):
    from metafit import MetaInitializedRegressor

    params = dict(hidden_sizes=(4,), meta_iterations=3, meta_batch_size=2, random_state=0,
                  verbose=0)
    return MetaInitializedRegressor(**{**params, **kw})


@pytest.mark.parametrize("where", ["under-a-file", "existing-csv", "read-only-folder"])
def test_checkpoint_paths_that_cannot_work_fail_before_training(tmp_path, where):
    from metafit import SinusoidTasks
    from metafit.callbacks import Checkpoint

    if where == "under-a-file":
        (tmp_path / "plain").write_text("x")
        path = tmp_path / "plain" / "sub" / "ck.safetensors"
        match = "which is a file"
    elif where == "existing-csv":
        path = tmp_path / "train.csv"
        path.write_text("a,b\n1,2\n")
        match = "not a metafit checkpoint"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        path = folder / "ck.safetensors"
        match = "not writable"
    before = path.read_bytes() if path.is_file() else None
    for est in (_tiny_regressor(checkpoint_path=path),
                _tiny_regressor(callbacks=[Checkpoint(path, interval=1)])):
        with pytest.raises(ValueError, match=match):
            est.meta_fit(SinusoidTasks(k_shot=5, random_state=0))
        assert not hasattr(est, "meta_init_")
    if before is not None:
        assert path.read_bytes() == before  # train.csv is untouched


def test_an_existing_checkpoint_may_be_overwritten(tmp_path):
    from metafit import SinusoidTasks

    path = tmp_path / "ck.safetensors"
    _tiny_regressor(checkpoint_path=path).meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    _tiny_regressor(checkpoint_path=path, meta_iterations=4).meta_fit(
        SinusoidTasks(k_shot=5, random_state=0))
    from metafit import MetaInit

    assert MetaInit.load(path).metadata["iteration"] == 4


def test_save_errors_name_the_file_not_the_temporary_one(tmp_path):
    from metafit import SinusoidTasks

    est = _tiny_regressor().meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    (tmp_path / "plain").write_text("x")
    target = tmp_path / "plain" / "m.safetensors"
    with pytest.raises(OSError) as info:
        est.save_meta_init(target)
    assert str(target) in str(info.value) and ".tmp" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["plain"]


# ------------------------------------------------------ issue 13: internal errors made clear


@pytest.mark.parametrize("params, error, match", [
    ({"device": "cuda"}, ValueError, "no usable CUDA device"),
    ({"device": "cuda:7"}, ValueError, "CUDA"),
    ({"device": "meta"}, ValueError, "cannot hold the network"),
    ({"hidden_sizes": None}, ValueError, "hidden_sizes must be a tuple"),
    ({"hidden_sizes": 2.5}, ValueError, "hidden_sizes must be a tuple"),
    ({"hidden_sizes": (10**9, 10**9)}, ValueError, "could not be allocated"),
    ({"hidden_sizes": (50_000, 50_000)}, ValueError, "could not be allocated"),
    ({"algorithm": ["maml"]}, ValueError, "algorithm must be one of"),
    ({"random_state": 2**64}, ValueError, r"random_state must be an int in \[0, 2\*\*63\)"),
    ({"random_state": -1}, ValueError, r"random_state must be an int"),
])
def test_parameters_that_crashed_inside_now_say_what_to_fix(params, error, match):
    import torch

    from metafit import MetaInitializedRegressor, SinusoidTasks

    if params.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    est = MetaInitializedRegressor(meta_iterations=2, **params)
    with pytest.raises(error, match=match):
        est.meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    with pytest.raises(error, match=match):
        est.fit(np.zeros((4, 1), np.float32), np.zeros(4, np.float32))


def test_the_default_mlp_refuses_3d_x_with_a_fix():
    from metafit import MetaInitializedRegressor

    est = MetaInitializedRegressor(random_state=0)
    with pytest.raises(ValueError, match="default MLP takes 2-D X.*reshape"):
        est.fit(np.zeros((4, 2, 3), np.float32), np.zeros(4, np.float32))
    assert not hasattr(est, "n_features_in_")


def test_sparse_matrices_are_refused_clearly():
    import scipy.sparse as sp

    from metafit import MetaInitializedRegressor, Task

    X = sp.random(6, 3, density=0.5, format="csr", random_state=0)
    with pytest.raises(TypeError, match=r"sparse matrix.*toarray"):
        Task(X, np.zeros(6), X, np.zeros(6))
    with pytest.raises(TypeError, match="[Ss]parse"):
        MetaInitializedRegressor().fit(X, np.zeros(6))


def test_sparse_matrices_are_refused_in_every_entry_point():
    """Siblings of the Task case: ``np.asarray`` wraps a sparse matrix in a 0-d object
    array, so each entry point that takes arrays names the sparse one itself."""
    import scipy.sparse as sp

    from metafit.tuning import evaluate

    X = sp.random(12, 3, density=0.5, format="csr", random_state=0)
    dense_X, groups = np.zeros((12, 3)), np.repeat([0, 1], 6)
    column = sp.csr_matrix(np.ones((12, 1)))
    with pytest.raises(TypeError, match=r"tasks_from_groups: X is a sparse matrix"):
        tasks_from_groups(X, np.zeros(12), groups, support_size=3)
    with pytest.raises(TypeError, match=r"tasks_from_groups: y is a sparse matrix"):
        tasks_from_groups(dense_X, column, groups, support_size=3)
    with pytest.raises(TypeError, match=r"fit: y is a sparse matrix"):
        MetaInitializedRegressor().fit(dense_X, column)
    with pytest.raises(TypeError, match="[Ss]parse"):
        MetaInitializedClassifier().fit(X, groups)
    est = MetaInitializedRegressor(meta_iterations=2, meta_batch_size=2, random_state=0)
    sparse_task = (sp.csr_matrix(np.ones((4, 1))), np.ones(4), np.ones((4, 1)), np.ones(4))
    with pytest.raises(TypeError, match="support set: X is a sparse matrix"):
        est.meta_fit(REG_TASKS, validation_tasks=[sparse_task])
    est.meta_fit(REG_TASKS).fit(X4, Y4)
    for call in (est.predict, lambda a: est.score(a, np.ones(4))):
        with pytest.raises(TypeError, match="[Ss]parse"):
            call(sp.csr_matrix(np.ones((4, 1))))
    with pytest.raises(TypeError, match="sparse matrix"):
        evaluate(est, [sparse_task])


def test_values_beyond_float32_and_overflowing_targets_blame_the_data():
    """1e39 is finite in float64 but infinite in float32, where metafit computes; targets
    of 1e30 overflow the squared error. Both are data errors, not learning-rate advice."""
    ones = np.ones((4, 1))
    with pytest.raises(ValueError, match=r"support set: X reaches 1e\+39, beyond float32"):
        Task(np.full((4, 1), 1e39), np.ones(4), ones, np.ones(4))
    with pytest.raises(ValueError, match=r"query set: y reaches 1e\+39, beyond float32"):
        Task(ones, np.ones(4), ones, np.full(4, 1e39))
    big_y = Task(ones, np.full(4, 1e30), ones, np.full(4, 1e30))
    est = MetaInitializedRegressor(meta_iterations=3, meta_batch_size=2, random_state=0)
    with pytest.raises(ValueError, match=r"targets reach 1e\+30.*no learning rate.*Rescale y"):
        est.meta_fit([REG_TASKS[0], big_y])  # one meta-batch: refused before any work
    assert not hasattr(est, "meta_init_")
    est.meta_fit(REG_TASKS)
    with pytest.raises(ValueError, match=r"fit: the targets reach 1e\+30.*Rescale y"):
        est.fit(X4, np.full(4, 1e30))
    with pytest.raises(ValueError, match="float32"):
        est.fit(np.full((4, 1), 1e39), Y4)


def test_a_divergence_caused_by_the_data_keeps_the_good_iteration_and_blames_the_data():
    """Task 6 has targets of 1e9: the state after iteration 5 fails on it, and so does the
    state before; the batch is at fault, so iteration 5 is kept and the data are named."""
    tasks = SinusoidTasks(k_shot=5, random_state=0).sample(12)
    ones = np.ones((5, 1))
    tasks[5] = Task(ones, np.full(5, 1e9), ones, np.full(5, 1e9))
    est = MetaInitializedRegressor(meta_iterations=10, meta_batch_size=1, random_state=0)
    with pytest.raises(DivergenceError, match=r"data's scale: y of this meta-batch reaches "
                       r"1e\+09.*Standardize.*\(iteration 5\)") as info:
        est.meta_fit(tasks)
    assert "lower meta_lr" not in str(info.value) and "lower inner_lr" not in str(info.value)
    assert est.meta_init_.metadata["iteration"] == 5
    est.fit(X4, Y4)
    with pytest.raises(DivergenceError, match=r"data's scale: y reaches 1e\+09"):
        est.fit(X4, np.full(4, 1e9))


def test_a_late_bad_task_keeps_the_completed_iterations(tmp_path, monkeypatch, capsys):
    """Another feature count at iteration 7 of 10: the error is raised, but the six
    completed iterations stay in the estimator (and the CLI writes them)."""
    tasks = SinusoidTasks(k_shot=5, random_state=0).sample(12)
    tasks[6] = Task(np.zeros((5, 2)), np.zeros(5), np.zeros((5, 2)), np.zeros(5))
    est = MetaInitializedRegressor(meta_iterations=10, meta_batch_size=1, random_state=0)
    with pytest.warns(InterruptedTrainingWarning, match="after 6 meta-iterations by an error"):
        with pytest.raises(ValueError, match="feature shape"):
            est.meta_fit(tasks)
    assert est.meta_init_.metadata["iteration"] == 6 and len(est.meta_history_) == 6
    est.fit(X4, Y4)
    est.set_params(warm_start=True).meta_fit(tasks[7:] + tasks[:5])
    assert est.meta_init_.metadata["iteration"] == 10
    # The classifier's sibling: a later task with more classes than the head has.
    two, four = np.array([0, 1, 0, 1]), np.array([0, 1, 2, 3])
    clf = MetaInitializedClassifier(**QUICK)
    with pytest.warns(InterruptedTrainingWarning, match="after 1 meta-iterations"):
        with pytest.raises(ValueError, match="same n_way"):
            clf.meta_fit([Task(X4, two, X4, two)] * 2 + [Task(X4, four, X4, four)])
    assert clf.meta_init_.metadata["iteration"] == 1
    clf.fit(X4, two)

    from metafit.cli import config as config_module
    from metafit.cli import main

    real = config_module.Config.build_tasks

    def with_a_bad_task(self):
        splits = real(self)
        good = iter(splits.train)
        bad = Task(np.zeros((5, 2)), np.zeros(5), np.zeros((5, 2)), np.zeros(5))
        splits.train = itertools.chain(itertools.islice(good, 12), [bad], good)
        return splits

    monkeypatch.setattr(config_module.Config, "build_tasks", with_a_bad_task)
    config = tmp_path / "c.yaml"
    config.write_text(
        "tasks: {source: sinusoid, k_shot: 5, k_query: 5, validation_tasks: 3, "
        "test_tasks: 3}\nestimator:\n  params: {hidden_sizes: [8], meta_batch_size: 4, "
        "meta_iterations: 6, random_state: 0, verbose: 0}\n"
    )
    out = tmp_path / "init.safetensors"
    assert main(["meta-fit", str(config), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "saved the state after iteration 3" in err and "feature shape" in err
    assert MetaInit.load(out).metadata["iteration"] == 3


@pytest.mark.parametrize("bad", [None, float("nan")])
def test_missing_group_labels_are_refused(bad):
    from metafit import tasks_from_groups

    groups = np.array(["a", "a", "a", bad, "b", "b", "b", "b"], dtype=object)
    X, y = np.zeros((8, 1)), np.zeros(8)
    with pytest.raises(ValueError, match=r"missing label.*row 3"):
        tasks_from_groups(X, y, groups, support_size=1)


def test_absurd_task_sizes_are_one_line_errors(tmp_path):
    from metafit import SinusoidTasks
    from metafit.config import ConfigError, load_config

    with pytest.raises(ValueError, match="beyond any few-shot task"):
        SinusoidTasks(k_shot=2_000_000_000)
    path = tmp_path / "c.yaml"
    path.write_text("tasks:\n  source: sinusoid\n  k_shot: 2000000000\n")
    with pytest.raises(ConfigError, match=r"tasks.k_shot must be <= 100,000"):
        load_config(path)


# ------------------------------------------------ issue 13: classification labels checked


def _clf_task(y_s, y_q):
    from metafit import Task

    rng = np.random.default_rng(0)
    return Task(rng.normal(size=(len(y_s), 2)), np.asarray(y_s), rng.normal(size=(len(y_q), 2)),
                np.asarray(y_q))


def test_class_indices_far_beyond_the_classes_are_refused():
    from metafit import MetaInitializedClassifier

    est = MetaInitializedClassifier(meta_iterations=2, meta_batch_size=2, random_state=0)
    with pytest.raises(ValueError, match="head would get 1,000,001 outputs"):
        est.meta_fit([_clf_task([0, 1000000, 0, 1000000], [0, 1000000])] * 2)
    assert not hasattr(est, "meta_init_")


@pytest.mark.parametrize("y_s, y_q, match", [
    ([1, 1, 1, 1], [1, 1], "single class"),
    ([0, 1, 0, 1], [0, 2], "never shows"),
])
def test_classification_tasks_that_teach_little_say_so(y_s, y_q, match):
    from metafit import MetaInitializedClassifier

    est = MetaInitializedClassifier(meta_iterations=2, meta_batch_size=2, random_state=0,
                                    verbose=0)
    with pytest.warns(UserWarning, match=match):
        est.meta_fit([_clf_task(y_s, y_q), _clf_task([0, 1, 0, 1], [0, 1])])


def test_missing_labels_in_fit_are_not_a_class():
    from metafit import MetaInitializedClassifier

    X = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="missing labels"):
        MetaInitializedClassifier().fit(X, np.array(["a", None, "b", "a"], dtype=object))
    with pytest.raises(ValueError):
        MetaInitializedClassifier().fit(X, np.array([0.0, np.nan, 1.0, 0.0]))
