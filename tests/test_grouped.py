"""Tests of grouped tables as data (``metafit.grouped``) and of table mode,
``meta_fit(X, y, groups=...)`` (``metafit.estimators._table_mode``)."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from sklearn.base import clone

from metafit import MetaInit, MetaInitializedClassifier, MetaInitializedRegressor
from metafit.grouped import GroupEpisodes, Standardization, split_groups
from metafit.tasks import SinusoidTasks, Task, TaskBatch

QUICK = dict(meta_iterations=30, meta_batch_size=4, hidden_sizes=(16,), random_state=0,
             verbose=0)


def grouped_table(n_groups=20, sizes=(6, 30), n_features=3, seed=0, scale=100.0):
    """A table whose groups differ by a level and a slope, in large raw units."""
    rng = np.random.default_rng(seed)
    X, y, groups = [], [], []
    for g in range(n_groups):
        n = int(rng.integers(*sizes))
        Xg = rng.normal(5.0, 3.0, size=(n, n_features))
        level, slope = rng.normal(0, 2), 1 + rng.normal(0, 0.5)
        X.append(Xg)
        y.append(scale * (level + slope * Xg[:, 0] - Xg[:, 1] + 0.1 * rng.normal(size=n)))
        groups += [f"g{g}"] * n
    return np.vstack(X), np.concatenate(y), np.array(groups)


# ---------------------------------------------------------------- the data side


def test_episodes_are_resampled_share_shapes_per_block_and_cover_the_range():
    X, y, groups = grouped_table()
    rng = np.random.default_rng(0)
    episodes = GroupEpisodes(X, y, groups, support_range=(2, 6), query_size=5, batch_size=4,
                             random_state=rng)
    blocks = [episodes.block() for _ in range(60)]
    ks = set()
    for block in blocks:
        assert len(block) == 4
        shapes = {(t.X_support.shape, t.X_query.shape) for t in block}
        assert len(shapes) == 1  # one vectorized batch, however ragged the groups
        ks.add(block[0].n_support)
        assert block[0].n_query == 5
    assert ks == {2, 3, 4, 5, 6}
    first, again = blocks[0][0], blocks[1][0]
    assert not np.array_equal(first.X_support, again.X_support)  # drawn anew
    # Support and query rows of an episode come from one group and never overlap.
    row_of = {tuple(r): i for i, r in enumerate(X)}
    for task in blocks[0]:
        s = {row_of[tuple(r)] for r in task.X_support}
        q = {row_of[tuple(r)] for r in task.X_query}
        assert not s & q and len({groups[i] for i in s | q}) == 1


def test_stacked_episodes_are_the_blocks_of_iteration_in_order():
    X, y, groups = grouped_table()
    plain, stacked = (GroupEpisodes(X, y, groups, support_range=(2, 6), query_size=5,
                                    batch_size=4, random_state=np.random.default_rng(3))
                      for _ in range(2))
    tasks, batches = iter(plain), stacked.meta_batches(4)
    for _ in range(5):
        batch = next(batches)
        assert isinstance(batch, TaskBatch) and batch.support_mask is None
        for got in batch:
            want = next(tasks)
            for name in ("X_support", "y_support", "X_query", "y_query"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def test_tiny_groups_are_skipped_and_counted():
    X, y, groups = grouped_table(n_groups=6, sizes=(8, 9))
    groups = groups.copy()
    groups[:2] = "tiny"  # a group of 2 rows: no episode with 2 support rows + 1 query
    groups[2] = "single"
    episodes = GroupEpisodes(X, y, groups, support_range=(2, 4), query_size=3, batch_size=2,
                             random_state=np.random.default_rng(0))
    assert episodes.n_skipped_ == 2 and episodes.n_groups_ == 6
    with pytest.raises(ValueError, match="no group has more than 50 rows"):
        GroupEpisodes(X, y, groups, support_range=(50, 60), query_size=3, batch_size=2,
                      random_state=np.random.default_rng(0))


def test_groups_are_split_whole():
    groups = np.repeat(np.arange(10), 5)
    train, val = split_groups(groups, 0.2, np.random.default_rng(0))
    assert len(np.unique(groups[val])) == 2
    assert not set(groups[train]) & set(groups[val])
    assert not split_groups(np.repeat([0, 1], 3), 0.5, np.random.default_rng(0))[1].any()
    assert not split_groups(groups, None, np.random.default_rng(0))[1].any()


def test_standardization_round_trips_and_survives_its_metadata():
    rng = np.random.default_rng(0)
    X = rng.normal(10, 5, size=(50, 3))
    X[:, 2] = 7.0  # a constant column is only centred
    y = rng.normal(-3, 20, size=50)
    s = Standardization.fit(X, y)
    Z = s.transform_X(X)
    np.testing.assert_allclose(Z[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(Z[:, :2].std(0), 1, rtol=1e-5)
    assert np.all(Z[:, 2] == 0) and s.x_scale[2] == 1
    np.testing.assert_allclose(s.inverse_y(s.transform_y(y)), y, rtol=1e-5)
    back = Standardization.from_metadata(s.to_metadata(), 3)
    np.testing.assert_array_equal(back.x_mean, s.x_mean)
    for bad, match in [
        ({"x_mean": [0.0]}, "x_mean and x_scale"),
        ({"x_mean": [0.0], "x_scale": [0.0]}, "must be > 0"),
        ({"x_mean": ["a"], "x_scale": [1.0]}, "list of numbers"),
        ({"x_mean": [0.0, 1.0], "x_scale": [1.0, 1.0]}, "for 3 features"),
        ({"x_mean": [0, 0, 0], "x_scale": [1, 1, 1], "y_mean": [0.0]}, "together"),
    ]:
        with pytest.raises(ValueError, match=match):
            Standardization.from_metadata(bad, 3)


# ---------------------------------------------------------------- table mode


def _largest(groups):
    labels, counts = np.unique(groups, return_counts=True)
    return labels[np.argmax(counts)]


@pytest.fixture(scope="module")
def table_est():
    X, y, groups = grouped_table()
    est = MetaInitializedRegressor(**{**QUICK, "meta_iterations": 200})
    return est.meta_fit(X, y, groups=groups), (X, y, groups)


def test_table_mode_trains_in_standard_units_and_predicts_in_the_tables(table_est):
    est, (X, y, groups) = table_est
    meta = est.meta_init_.metadata
    assert "standardization" in meta and "best_iteration" in meta  # held-out groups
    assert len(est.meta_history_) == 200  # an endless stream: never runs out
    m = groups == _largest(groups)
    est.fit(X[m][:5], y[m][:5])
    pred = est.predict(X[m][5:])
    # In the table's units (hundreds), not in standardized ones.
    assert abs(pred.mean() - y[m][5:].mean()) < 3 * y.std()
    assert pred.std() > 0.1 * y.std()
    # Better than the group's own query mean, which no model without the rows can know.
    baseline = np.mean((y[m][5:] - y[m][5:].mean()) ** 2)
    assert np.mean((pred - y[m][5:]) ** 2) < baseline


def test_the_standardization_travels_with_clone_pickle_and_save(table_est, tmp_path):
    est, (X, y, groups) = table_est
    m = groups == _largest(groups)
    ref = clone(est).fit(X[m][:5], y[m][:5]).predict(X[m][5:])
    copies = [
        clone(est).fit(X[m][:5], y[m][:5]),
        pickle.loads(pickle.dumps(clone(est).fit(X[m][:5], y[m][:5]))),
    ]
    path = tmp_path / "init.safetensors"
    est.save_meta_init(path)
    assert "standardization" in MetaInit.load(path).metadata
    loaded = MetaInitializedRegressor(meta_init=path, hidden_sizes=(16,))
    copies.append(loaded.fit(X[m][:5], y[m][:5]))
    for c in copies:
        np.testing.assert_allclose(c.predict(X[m][5:]), ref, rtol=1e-4, atol=1e-3)


def test_a_damaged_standardization_in_a_file_is_named(table_est, tmp_path):
    est, _ = table_est
    init = est.meta_init_
    meta = dict(init.metadata, standardization={"x_mean": [0.0], "x_scale": [1.0]})
    path = MetaInit(init.tensors, init.spec, meta).save(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad.safetensors.*standardization.*damaged"):
        MetaInit.load(path)


def test_table_mode_takes_dataframes_any_labels_and_warns_about_tiny_groups():
    pd = pytest.importorskip("pandas")
    X, y, groups = grouped_table(n_groups=8)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    labels = np.array([int(g[1:]) * 1000 for g in groups])  # any hashable labels
    labels[:1] = -1  # a one-row group
    est = MetaInitializedRegressor(**QUICK, validation_fraction=0)
    with pytest.warns(UserWarning, match="1 of 9 meta-training groups"):
        est.meta_fit(frame, pd.Series(y), groups=pd.Series(labels))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "NumPy array is not writable" from torch
        est.fit(frame.iloc[:5], pd.Series(y[:5]))
        assert est.predict(frame.iloc[5:10]).shape == (5,)


def test_warm_start_in_table_mode_keeps_the_first_standardization():
    X, y, groups = grouped_table()
    est = MetaInitializedRegressor(**{**QUICK, "meta_iterations": 10}).meta_fit(
        X, y, groups=groups)
    first = est.meta_init_.metadata["standardization"]
    est.set_params(warm_start=True, meta_iterations=20).meta_fit(X * 2, y, groups=groups)
    assert est.meta_init_.metadata["standardization"] == first
    assert len(est.meta_history_) == 20
    with pytest.raises(ValueError, match="3 features, but X has 2"):
        est.set_params(meta_iterations=30).meta_fit(X[:, :2], y, groups=groups)


@pytest.mark.parametrize("bad, error, match", [
    (dict(y=None), TypeError, "needs y"),
    (dict(groups=np.array([None] * 10)), ValueError, "missing label"),
    (dict(groups=np.zeros(3)), ValueError, "same length"),
    (dict(X=np.full((10, 2), np.nan)), ValueError, "NaN"),
    (dict(y=np.array(list("abcdefghij"))), ValueError, "numeric"),
])
def test_bad_tables_are_refused_before_any_work(bad, error, match):
    args = dict(X=np.ones((10, 2)), y=np.arange(10.0), groups=np.repeat([0, 1], 5))
    args.update(bad)
    est = MetaInitializedRegressor(**QUICK)
    with pytest.raises(error, match=match):
        est.meta_fit(args["X"], args["y"], groups=args["groups"])
    assert not hasattr(est, "meta_init_")


def test_table_mode_parameters_are_checked():
    X, y, groups = grouped_table(n_groups=5)
    for params, match in [
        ({"support_range": (5, 2)}, "support_range"),
        ({"support_range": 3}, "support_range"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
    ]:
        with pytest.raises(ValueError, match=match):
            MetaInitializedRegressor(**QUICK, **params).meta_fit(X, y, groups=groups)


def test_task_mode_still_takes_validation_tasks_as_the_second_argument():
    from metafit import SinusoidTasks

    tasks = SinusoidTasks(k_shot=5, random_state=0)
    val = SinusoidTasks(k_shot=5, random_state=1).sample(3)
    est = MetaInitializedRegressor(**QUICK).meta_fit(tasks, val)
    assert est.meta_history_[-1]["validation_loss"] is not None
    assert "standardization" not in est.meta_init_.metadata
    with pytest.raises(TypeError, match="twice"):
        est.meta_fit(tasks, val, validation_tasks=val)


def test_given_validation_tasks_leave_every_group_to_meta_training():
    X, y, groups = grouped_table(n_groups=12)
    groups = groups.copy()
    groups[0] = "single"  # a one-row group, counted among the meta-training groups
    val = [Task(X[:5], y[:5], X[5:10], y[5:10])]
    est = MetaInitializedRegressor(**{**QUICK, "meta_iterations": 5})
    with pytest.warns(UserWarning, match="1 of 13 meta-training groups"):
        est.meta_fit(X, y, groups=groups, validation_tasks=val)
    assert est.meta_history_[-1]["validation_loss"] is not None


@pytest.mark.parametrize("n_groups", [1, 2])
def test_a_table_too_small_to_hold_groups_out_says_so_and_auto_runs_maml_alone(n_groups):
    X, y, groups = grouped_table(n_groups=n_groups, sizes=(20, 30))
    est = MetaInitializedRegressor(**{**QUICK, "meta_iterations": 5, "algorithm": "auto"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.meta_fit(X, y, groups=groups)
    said = [str(w.message) for w in caught]
    assert any(f"a table of {n_groups} group(s) holds none out" in m for m in said), said
    assert not any("no candidate had a finite validation loss" in m for m in said), said
    assert est.algorithm_ == "maml" and not hasattr(est, "algorithm_scores_")
    assert "validation_score" not in est.meta_init_.metadata
    assert est.fit(X[:5], y[:5]).predict(X[5:8]).shape == (3,)


def _table_with_categories(seed=0):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(seed)
    n_groups, per = 24, 12
    groups = np.repeat(np.arange(n_groups), per)
    kind = rng.choice(["house", "flat", "farm"], size=len(groups))
    effect = {"house": 2.0, "flat": -1.0, "farm": 0.5}
    x = rng.normal(size=len(groups))
    y = rng.normal(size=n_groups)[groups] + x + np.array([effect[k] for k in kind])
    frame = pd.DataFrame({"x": x, "kind": pd.Categorical(kind), "note": kind.astype(object)})
    return frame, y, groups


def test_categorical_columns_are_one_hot_from_the_dtype_and_unseen_ones_are_zeros():
    pd = pytest.importorskip("pandas")
    frame, y, groups = _table_with_categories()
    est = MetaInitializedRegressor(**{**QUICK, "meta_iterations": 60})
    est.meta_fit(frame, y, groups=groups)
    meta = est.meta_init_.metadata
    assert meta["encoding"]["categories"] == {"kind": ["farm", "flat", "house"],
                                              "note": ["farm", "flat", "house"]}
    assert meta["n_features"] == 1 + 3 + 3
    est.fit(frame.iloc[:6], y[:6])
    assert est.n_features_in_ == 3 and list(est.feature_names_in_) == ["x", "kind", "note"]
    pred = est.predict(frame.iloc[6:12])
    assert pred.shape == (6,) and np.isfinite(pred).all()
    # A category never seen in meta-training: all zeros in its one-hot block.
    new = frame.iloc[6:12].copy()
    new["note"] = "castle"
    new["kind"] = pd.Categorical(["castle"] * 6)
    assert np.isfinite(est.predict(new)).all()
    from metafit.grouped import CategoricalEncoding

    enc = CategoricalEncoding.from_metadata(meta["encoding"], meta["n_features"])
    encoded = enc.transform(new)
    assert encoded.shape == (6, 7) and encoded[:, 1:].sum() == 0
    # Columns in another order are matched by name; a missing one is named.
    assert np.allclose(est.predict(frame.iloc[6:12][["note", "x", "kind"]]), pred)
    with pytest.raises(ValueError, match=r"lacks the columns \['kind'\]"):
        est.predict(frame.iloc[6:12][["x", "note"]])
    with pytest.raises(TypeError, match="pass a DataFrame"):
        est.predict(np.zeros((3, 3)))


def test_the_encoding_travels_with_save_clone_and_pickle(tmp_path):
    frame, y, groups = _table_with_categories()
    est = MetaInitializedRegressor(**QUICK).meta_fit(frame, y, groups=groups)
    ref = clone(est).fit(frame.iloc[:6], y[:6]).predict(frame.iloc[6:12])
    path = tmp_path / "cat.safetensors"
    est.save_meta_init(path)
    loaded = MetaInitializedRegressor(meta_init=path, hidden_sizes=(16,))
    for other in (loaded.fit(frame.iloc[:6], y[:6]),
                  pickle.loads(pickle.dumps(clone(est).fit(frame.iloc[:6], y[:6])))):
        np.testing.assert_allclose(other.predict(frame.iloc[6:12]), ref, rtol=1e-5)


def test_categorical_columns_can_be_refused_and_bad_ones_are_named():
    frame, y, groups = _table_with_categories()
    with pytest.raises(ValueError, match="non-numeric columns.*from_dtype"):
        MetaInitializedRegressor(**QUICK, categorical_features=None).meta_fit(
            frame, y, groups=groups)
    holes = frame.copy()
    holes.loc[3, "note"] = None
    with pytest.raises(ValueError, match="'note' has missing values"):
        MetaInitializedRegressor(**QUICK).meta_fit(holes, y, groups=groups)
    ids = pytest.importorskip("pandas").concat([frame] * 5, ignore_index=True)
    ids["note"] = [f"id{i}" for i in range(len(ids))]  # 1,440 distinct values
    with pytest.raises(ValueError, match="too many for a category"):
        MetaInitializedRegressor(**QUICK).meta_fit(ids, np.tile(y, 5), groups=np.tile(groups, 5))


def test_group_labels_of_any_hashable_kind_and_an_empty_table():
    X, y, groups = grouped_table(n_groups=6, sizes=(8, 9))
    mixed = np.array([int(g[1:]) if int(g[1:]) % 2 else g for g in groups], dtype=object)
    tuples = [(g, 1) for g in groups]
    for labels in (mixed, tuples):
        est = MetaInitializedRegressor(**{**QUICK, "meta_iterations": 3})
        assert est.meta_fit(X, y, groups=labels).meta_init_.metadata["iteration"] == 3
    with pytest.raises(ValueError, match="must be hashable"):
        MetaInitializedRegressor(**QUICK).meta_fit(X, y, groups=[[g] for g in groups])
    with pytest.raises(ValueError, match="X is empty"):
        MetaInitializedRegressor(**QUICK).meta_fit(X[:0], y[:0], groups=groups[:0])


def test_fit_standardizes_in_float64_so_large_offsets_keep_their_digits():
    """A column like a timestamp (1.7e9 s, varying by tens): float32 before scaling would
    round it to multiples of 128 and lose the signal."""
    X, y, groups = grouped_table(n_groups=12, sizes=(12, 13), scale=1.0)
    X = X.copy()
    X[:, 0] = 1.7e9 + 10 * X[:, 0]
    est = MetaInitializedRegressor(**{**QUICK, "meta_iterations": 100})
    est.meta_fit(X, y, groups=groups)
    m = groups == "g0"
    pred = est.fit(X[m][:6], y[m][:6]).predict(X[m][6:])
    shifted = X[m][6:].copy()
    shifted[:, 0] += 5.0  # half a unit of the original column, below float32's spacing
    assert np.abs(est.predict(shifted) - pred).max() > 1e-3


def test_table_fit_takes_every_input_kind_alike_and_names_bad_ones(table_est, monkeypatch):
    """Plain float arrays skip validate_data (the fast path): the same predictions as a
    list, a float32 array or a strided view, which go through it; bad inputs are named
    either way, before the estimator changes."""
    pd = pytest.importorskip("pandas")
    est, (X, y, groups) = table_est
    est = clone(est)
    m = groups == _largest(groups)
    Xs, ys, Xq = X[m][:6], y[m][:6], X[m][6:]
    with monkeypatch.context() as patch:  # plain arrays take the fast path
        patch.setattr("metafit.estimators._inputs.validate_data", None)
        ref = est.fit(Xs, ys).predict(Xq)
    for Xg, yg in [(Xs.tolist(), ys.tolist()), (np.asfortranarray(Xs), ys),
                   (Xs.astype(np.float32), ys.astype(np.float32)),
                   (pd.DataFrame(Xs), pd.Series(ys))]:
        got = est.fit(Xg, yg).predict(Xq)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3 * np.abs(y).std())
    assert not hasattr(est, "feature_names_in_") and est.n_features_in_ == 3
    before = est.adapted_params_
    nan = Xs.copy()
    nan[0, 0] = np.nan
    for bad_X, bad_y, match in [(nan, ys, "NaN"), (Xs[:, :2], ys, "2 feature.*expects 3"),
                                (Xs, ys[:-1], "inconsistent numbers of samples"),
                                (Xs, np.full(6, np.inf), "infinity")]:
        with pytest.raises(ValueError, match=match):
            est.fit(bad_X, bad_y)
        assert est.adapted_params_ is before
    with pytest.raises(ValueError, match="2 features"):
        est.predict(Xq[:, :2])


def _offset_tasks(n, seed=0):
    """Sinusoid tasks far from standard units: x around 50, y around 1000."""
    out = []
    for t in SinusoidTasks(k_shot=5, k_query=10, random_state=seed).sample(n):
        out.append(Task(t.X_support * 3 + 50, t.y_support * 100 + 1000,
                        t.X_query * 3 + 50, t.y_query * 100 + 1000))
    return out


def test_task_mode_can_opt_in_to_standardization_and_predicts_in_raw_units():
    from metafit.estimators._table_mode import _scaled

    tasks = _offset_tasks(120)
    kw = dict(algorithm="maml", hidden_sizes=(16,), meta_batch_size=4, meta_iterations=20,
              random_state=0, verbose=0, inner_lr=0.01, inner_steps=3)
    est = MetaInitializedRegressor(standardize=True, **kw).meta_fit(tasks)
    scaling = Standardization.from_metadata(est.meta_init_.metadata["standardization"], 1)
    head = tasks[:100]  # the statistics come from the first 100 tasks' rows
    rows = np.concatenate([a for t in head for a in (t.X_support, t.X_query)])
    targets = np.concatenate([a for t in head for a in (t.y_support, t.y_query)])
    np.testing.assert_allclose(scaling.x_mean, rows.mean(0))
    np.testing.assert_allclose(scaling.y_scale, [targets.std()])
    # The same as training on the tasks standardized by hand, then undoing it.
    by_hand = MetaInitializedRegressor(**kw).meta_fit([_scaled(t, scaling) for t in tasks])
    new = _offset_tasks(1, seed=5)[0]
    got = est.fit(new.X_support, new.y_support).predict(new.X_query)
    z = by_hand.fit(scaling.transform_X(new.X_support), scaling.transform_y(new.y_support))
    want = scaling.inverse_y(z.predict(scaling.transform_X(new.X_query)))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert np.mean((got - new.y_query) ** 2) < np.var(new.y_query) * 4


def test_task_mode_standardization_reads_a_stream_once_and_loses_no_task():
    tasks = _offset_tasks(40)
    kw = dict(algorithm="maml", hidden_sizes=(8,), meta_batch_size=4, meta_iterations=50,
              random_state=0, verbose=0)
    with pytest.warns(UserWarning, match="ran out after 10"):
        est = MetaInitializedRegressor(standardize=True, **kw).meta_fit(iter(tasks))
    assert len(est.meta_history_) == 10  # 40 tasks, 4 per meta-batch: none lost, none twice


def test_task_mode_standardization_refuses_images_and_keeps_class_labels():
    images = [Task(np.zeros((2, 1, 4, 4)), [0, 1], np.zeros((2, 1, 4, 4)), [0, 1])]
    with pytest.raises(ValueError, match="standardize=True scales 2-D features"):
        MetaInitializedClassifier(standardize=True, verbose=0).meta_fit(images)
    rng = np.random.default_rng(0)
    tasks = [Task(rng.normal(100, 10, (6, 2)), [0, 1, 0, 1, 0, 1],
                  rng.normal(100, 10, (6, 2)), [1, 0, 1, 0, 1, 0]) for _ in range(8)]
    clf = MetaInitializedClassifier(standardize=True, hidden_sizes=(8,), meta_batch_size=4,
                                    meta_iterations=3, random_state=0, verbose=0)
    clf.meta_fit(tasks)
    assert "y_mean" not in clf.meta_init_.metadata["standardization"]
    assert set(clf.fit(tasks[0].X_support, tasks[0].y_support).predict(
        tasks[0].X_query)) <= {0, 1}


def test_table_mode_standardize_false_trains_on_the_raw_values():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 8)
    X = rng.normal(5, 2, size=(96, 2))
    y = X[:, 0] + rng.normal(size=12)[groups]
    est = MetaInitializedRegressor(standardize=False, algorithm="maml", hidden_sizes=(8,),
                                   meta_iterations=3, random_state=0, verbose=0)
    est.meta_fit(X, y, groups=groups)
    s = est.meta_init_.metadata["standardization"]
    assert s["x_mean"] == [0.0, 0.0] and s["x_scale"] == [1.0, 1.0] and s["y_mean"] == [0.0]
    with pytest.raises(ValueError, match='standardize must be "auto", True or False'):
        MetaInitializedRegressor(standardize="yes").meta_fit(X, y, groups=groups)
