"""Tests of a classifier's table mode, ``MetaInitializedClassifier().meta_fit(X, y,
groups=...)`` (``metafit.estimators._table_mode`` and ``TableClassificationTarget``).
The regressor's table mode, shared with the data side, is tested in ``test_grouped.py``."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression

from metafit import MetaInit, MetaInitializedClassifier
from metafit.grouped import GroupedTable
from metafit.tasks import Task

QUICK = dict(meta_iterations=60, meta_batch_size=4, hidden_sizes=(16,), random_state=0,
             verbose=0)
LABELS = np.array(["no", "yes"])


def labelled_table(n_groups=30, n_rows=24, seed=0, labels=LABELS):
    """Groups whose own offset moves the boundary: the same features mean another class
    in another group, which a pooled model cannot know and a few rows reveal."""
    rng = np.random.default_rng(seed)
    X, y, groups = [], [], []
    for g in range(n_groups):
        Xg = rng.normal(size=(n_rows, 3))
        logit = 2 * (Xg @ np.array([1.5, -1.0, 0.5]) + rng.normal(0, 2.0))
        X.append(Xg)
        y.append(labels[(logit > 0).astype(int)])
        groups += [f"site{g}"] * n_rows
    return np.vstack(X), np.concatenate(y), np.array(groups)


@pytest.fixture(scope="module")
def table():
    X, y, groups = labelled_table()
    new = np.isin(groups, np.unique(groups)[:8])  # 8 groups meta-training never sees
    return X, y, groups, new


@pytest.fixture(scope="module")
def meta_fitted(table):
    X, y, groups, new = table
    return MetaInitializedClassifier(**QUICK).meta_fit(X[~new], y[~new], groups=groups[~new])


def _new_group_accuracy(est, X, y, groups, names, k=5, **params):
    scores = []
    for name in names:
        rows = groups == name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # inner_steps=0: "fewer steps than trained"
            est.set_params(**params).fit(X[rows][:k], y[rows][:k])
        scores.append(est.score(X[rows][k:], y[rows][k:]))
    return float(np.mean(scores))


def test_a_classifier_meta_fits_a_labelled_table_and_adapts_to_a_new_group(table,
                                                                           meta_fitted):
    X, y, groups, new = table
    est = meta_fitted
    assert est.meta_init_.metadata["classes"] == ["no", "yes"]
    assert est.meta_init_.n_outputs == 2
    assert est.meta_history_[-1]["validation_loss"] is not None  # held-out groups
    names = np.unique(groups[new])
    adapted = _new_group_accuracy(est, X, y, groups, names)
    unadapted = _new_group_accuracy(clone(est), X, y, groups, names, inner_steps=0)
    pooled = LogisticRegression().fit(X[~new], y[~new])
    pooled_acc = np.mean([pooled.score(X[groups == n][5:], y[groups == n][5:]) for n in names])
    # Five rows of a new group move its boundary: better than the meta-learned start
    # alone and than a pooled model that cannot see the group (0.87, 0.78, 0.77 when
    # written).
    assert adapted > unadapted + 0.03
    assert adapted > pooled_acc + 0.03
    est.fit(X[groups == names[0]][:5], y[groups == names[0]][:5])
    assert list(est.classes_) == ["no", "yes"]
    assert est.predict_proba(X[:7]).shape == (7, 2)
    assert set(est.predict(X[:50])) <= {"no", "yes"}


def test_a_group_showing_one_class_keeps_the_tables_classes(meta_fitted, table):
    X = table[0]
    est = clone(meta_fitted).fit(X[:3], np.array(["yes"] * 3))
    assert list(est.classes_) == ["no", "yes"]
    proba = est.predict_proba(X[:4])
    assert proba.shape == (4, 2) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("labels, match", [
    (["maybe", "yes", "no"], r"'maybe'.*never saw.*\['no', 'yes'\]"),
    ([0, 1, 1], "never saw"),
    (np.array(["no", None, "yes"], dtype=object), "missing labels"),
    ([0.5, 1.5, 2.5], "Unknown label type"),
])
def test_fit_names_labels_the_table_did_not_have(meta_fitted, table, labels, match):
    est = clone(meta_fitted)
    with pytest.raises(ValueError, match=match):
        est.fit(table[0][:3], labels)
    assert not hasattr(est, "classes_")  # nothing half-fitted


def test_the_classes_travel_with_clone_pickle_and_save(meta_fitted, table, tmp_path):
    X, y = table[0], table[1]
    est = clone(meta_fitted).fit(X[:6], y[:6])
    expected = est.predict_proba(X[:10])
    path = tmp_path / "init.pt"
    est.meta_init_.save(path)
    assert MetaInit.load(path).metadata["classes"] == ["no", "yes"]
    for other in [pickle.loads(pickle.dumps(est)),
                  clone(est).fit(X[:6], y[:6]),
                  MetaInitializedClassifier(meta_init=path, hidden_sizes=(16,)).fit(X[:6], y[:6])]:
        assert list(other.classes_) == ["no", "yes"]
        np.testing.assert_allclose(other.predict_proba(X[:10]), expected, atol=1e-5)


def test_integer_labels_of_three_classes_and_a_grouped_table(table):
    X, _, groups, _ = table
    rng = np.random.default_rng(1)
    offsets = {g: rng.normal() for g in np.unique(groups)}
    score = X[:, 0] + np.array([offsets[g] for g in groups])
    y = np.digitize(score, [-0.7, 0.7]) * 10  # the labels 0, 10 and 20
    est = MetaInitializedClassifier(**{**QUICK, "meta_iterations": 10})
    est.meta_fit(GroupedTable(X, y, groups))
    assert est.meta_init_.metadata["classes"] == [0, 10, 20]
    est.fit(X[:5], y[:5])
    assert list(est.classes_) == [0, 10, 20]
    assert est.predict_proba(X[:3]).shape == (3, 3)
    assert set(est.predict(X)) <= {0, 10, 20}


def test_given_validation_tasks_carry_the_tables_labels(table):
    X, y, groups, new = table
    rows = np.flatnonzero(new)
    val = [Task(X[rows[:5]], y[rows[:5]], X[rows[5:20]], y[rows[5:20]])]
    est = MetaInitializedClassifier(**{**QUICK, "meta_iterations": 10})
    est.meta_fit(X[~new], y[~new], groups=groups[~new], validation_tasks=val)
    assert est.meta_history_[-1]["validation_loss"] is not None
    bad = [Task(X[:3], np.array(["no", "yes", "perhaps"]), X[3:6], y[3:6])]
    with pytest.raises(ValueError, match="perhaps"):
        MetaInitializedClassifier(**QUICK).meta_fit(X, y, groups=groups, validation_tasks=bad)


def test_warm_start_keeps_the_classes_and_refuses_new_ones(table):
    X, y, groups, _ = table
    est = MetaInitializedClassifier(**{**QUICK, "meta_iterations": 5}, warm_start=True)
    est.meta_fit(X, y, groups=groups)
    est.set_params(meta_iterations=10).meta_fit(X, y, groups=groups)
    assert est.meta_init_.metadata["iteration"] == 10
    assert est.meta_init_.metadata["classes"] == ["no", "yes"]
    relabelled = np.where(y == "yes", "maybe", y)
    with pytest.raises(ValueError, match="'maybe'.*never saw"):
        est.set_params(meta_iterations=15).meta_fit(X, relabelled, groups=groups)
    assert est.meta_init_.metadata["iteration"] == 10  # unchanged by the refusal


@pytest.mark.parametrize("y, match", [
    (np.full(720, "yes"), "one class only"),
    (np.ones((720, 2), dtype=int), "one label per row"),
    (np.linspace(0, 1, 720), "Unknown label type"),
])
def test_unusable_labels_are_refused_before_meta_training(table, y, match):
    X, _, groups, _ = table
    est = MetaInitializedClassifier(**QUICK)
    with pytest.raises(ValueError, match=match):
        est.meta_fit(X, y, groups=groups)
    assert not hasattr(est, "meta_init_")


def test_auto_is_maml_for_a_classifier_and_gaussian_heads_are_refused(table):
    X, y, groups, _ = table
    est = MetaInitializedClassifier(**{**QUICK, "meta_iterations": 5}, algorithm="auto")
    assert est.meta_fit(X, y, groups=groups).meta_init_.metadata["algorithm"] == "maml"
    for name in ("alpaca", "lmm"):
        with pytest.raises(ValueError, match="real targets"):
            MetaInitializedClassifier(**QUICK, algorithm=name).meta_fit(X, y, groups=groups)


def test_categorical_columns_and_raw_values_for_a_classifier(table):
    pd = pytest.importorskip("pandas")
    X, y, groups, _ = table
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    frame["shop"] = pd.Categorical(np.where(X[:, 2] > 0, "big", "small"))
    est = MetaInitializedClassifier(**{**QUICK, "meta_iterations": 5})
    est.meta_fit(frame, y, groups=groups)
    est.fit(frame.iloc[:5], y[:5])
    assert list(est.feature_names_in_) == ["a", "b", "c", "shop"]
    assert est.predict_proba(frame.iloc[:3]).shape == (3, 2)
    raw = MetaInitializedClassifier(**{**QUICK, "meta_iterations": 5}, standardize=False)
    scaling = raw.meta_fit(X, y, groups=groups).meta_init_.metadata["standardization"]
    assert np.allclose(scaling["x_mean"], 0) and np.allclose(scaling["x_scale"], 1)


def test_a_study_tunes_a_table_classifier_on_groups_with_their_labels(meta_fitted, table):
    optuna = pytest.importorskip("optuna")
    import metafit

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    X, y, groups, new = table
    tasks = [Task(X[groups == n][:5], y[groups == n][:5], X[groups == n][5:],
                  y[groups == n][5:]) for n in np.unique(groups[new])[:4]]
    study = metafit.tune(clone(meta_fitted), validation_tasks=tasks, n_trials=2)
    assert 0.0 <= study.best_value <= 1.0  # the accuracy of the given labels
    assert set(study.best_params) == {"inner_lr", "inner_steps"}
