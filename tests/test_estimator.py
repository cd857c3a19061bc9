"""Tests of the scikit-learn estimators: fit/predict, clone and searches, determinism, errors."""

from __future__ import annotations

import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, KFold, RandomizedSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from metafit import (
    MetaInitializedClassifier,
    MetaInitializedRegressor,
    NWayKShotTasks,
    SinusoidTasks,
    Task,
)
from metafit.estimators._base import NoMetaInitWarning
from metafit.functional import inner_loop
from metafit.models import MLP
from metafit.persistence import MetaInit, module_spec
from metafit.tasks import TaskBatch

# Reptile meta-trains a useful sinusoid initialization in ~2 s on one core.
META = dict(
    algorithm="reptile",
    meta_iterations=600,
    meta_batch_size=10,
    inner_lr=0.02,
    inner_steps=10,
    random_state=0,
)


@pytest.fixture(scope="module")
def sinusoid_est():
    return MetaInitializedRegressor(**META).meta_fit(SinusoidTasks(random_state=0))


@pytest.fixture(scope="module")
def new_tasks():
    return SinusoidTasks(k_shot=10, k_query=100, random_state=123).sample(3)


def query_mse(est, task):
    return float(
        np.mean((est.fit(task.X_support, task.y_support).predict(task.X_query) - task.y_query) ** 2)
    )


def small_classification(n_features=4, n_classes=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(n_classes, n_features))
    y = np.repeat(np.arange(n_classes), 12)
    X = (centers[y] + rng.normal(size=(len(y), n_features))).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def meta_classifier():
    X, y = small_classification()
    tasks = NWayKShotTasks(X, y, n_way=3, k_shot=2, k_query=3, random_state=0)
    est = MetaInitializedClassifier(
        hidden_sizes=(16,), meta_iterations=20, meta_batch_size=4, inner_lr=0.1, random_state=0
    )
    return est.meta_fit(tasks)


# ---------------------------------------------------------------------------- basics


def test_fit_predict_shapes_and_score(sinusoid_est, new_tasks):
    task = new_tasks[0]
    est = clone(sinusoid_est).fit(task.X_support, task.y_support)
    pred = est.predict(task.X_query)
    assert pred.shape == (100,) and pred.dtype == np.float64
    assert est.n_features_in_ == 1
    assert est.score(task.X_query, task.y_query) > 0.5
    y2 = task.y_support.reshape(-1, 1)
    assert clone(sinusoid_est).fit(task.X_support, y2).predict(task.X_query).shape == (100, 1)


def test_meta_fit_learns_an_initialization(sinusoid_est, new_tasks):
    scratch = MetaInitializedRegressor(inner_lr=0.02, inner_steps=10, random_state=0)
    meta = np.mean([query_mse(clone(sinusoid_est), t) for t in new_tasks])
    base = np.mean([query_mse(scratch, t) for t in new_tasks])
    assert meta < 0.5 * base
    assert len(sinusoid_est.meta_history_) == META["meta_iterations"]


def test_float64_and_lists_give_the_same_predictions(sinusoid_est, new_tasks):
    task = new_tasks[0]
    a = clone(sinusoid_est).fit(task.X_support, task.y_support).predict(task.X_query)
    b = (
        clone(sinusoid_est)
        .fit(task.X_support.astype(np.float64).tolist(), task.y_support.tolist())
        .predict(task.X_query.tolist())
    )
    c = (
        clone(sinusoid_est)
        .fit(
            np.asfortranarray(task.X_support.astype(np.float64)), task.y_support.astype(np.float64)
        )
        .predict(task.X_query)
    )
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-6)


def test_feature_names_follow_scikit_learn(sinusoid_est, new_tasks):
    pd = pytest.importorskip("pandas")
    task = new_tasks[0]
    frame = pd.DataFrame(task.X_support, columns=["x"])
    est = clone(sinusoid_est).fit(frame, task.y_support)
    np.testing.assert_array_equal(est.feature_names_in_, ["x"])
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        est.predict(task.X_query)
    est.fit(task.X_support, task.y_support)  # the fast path drops the old names
    assert not hasattr(est, "feature_names_in_") and est.n_features_in_ == 1
    with pytest.warns(UserWarning, match="fitted without feature names"):
        est.predict(pd.DataFrame(task.X_query, columns=["x"]))


def _random_meta_init(algorithm, activation, n_out, kind, gen):
    """A MetaInit with random weights (and random Meta-SGD rates) for a 4-8-6-n_out MLP."""
    kwargs = {"n_inputs": 4, "n_outputs": n_out, "hidden_sizes": [8, 6], "activation": activation}
    module = MLP(**kwargs)
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in module.state_dict().items()}
    if algorithm == "metasgd":
        for k, v in module.named_parameters():
            tensors[f"extra.inner_lr.{k}"] = torch.rand(v.shape, generator=gen) * 0.1
    metadata = {
        "estimator": kind,
        "algorithm": algorithm,
        "inner_lr": 0.05,
        "inner_steps": 3,
        "meta_inner_steps": 3,
        "n_features": 4,
        "n_outputs": n_out,
    }
    return MetaInit(tensors, module_spec(module, kwargs), metadata)


def _reference_sgd(init, X, y, loss, steps, lr, algorithm):
    """Plain autograd SGD on a copy of the module: what fit must compute."""
    spec = init.spec["kwargs"]
    net = MLP(spec["n_inputs"], spec["n_outputs"], spec["hidden_sizes"], spec["activation"])
    net.load_state_dict({k: v for k, v in init.tensors.items() if not k.startswith("extra.")})
    params = dict(net.named_parameters())
    adapted = net.head_parameter_names() if algorithm == "anil" else list(params)
    X, y = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
    for _ in range(steps):
        out = net(X)
        if loss == "cross_entropy":
            value = torch.nn.functional.cross_entropy(out, y)
        else:
            value = torch.nn.functional.mse_loss(out[:, 0] if y.dim() == 1 else out, y.float())
        grads = torch.autograd.grad(value, [params[n] for n in adapted])
        with torch.no_grad():
            for n, g in zip(adapted, grads):
                rate = init.tensors[f"extra.inner_lr.{n}"] if algorithm == "metasgd" else lr
                params[n] -= rate * g
    return net


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "anil", "metasgd"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("target", ["y1", "y2", "classes"])
def test_fit_equals_plain_autograd_sgd_on_a_copy_of_the_module(algorithm, activation, target):
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    X, Xq = rng.normal(size=(10, 4)), rng.normal(size=(7, 4))
    y = {
        "y1": rng.normal(size=10),
        "y2": rng.normal(size=(10, 2)),
        "classes": np.array([0, 1, 2, 2, 1, 0, 0, 2, 1, 1]),
    }[target]
    classifier = target == "classes"
    n_out = 3 if classifier else y.reshape(10, -1).shape[1]
    kind = "classifier" if classifier else "regressor"
    init = _random_meta_init(algorithm, activation, n_out, kind, gen)
    cls = MetaInitializedClassifier if classifier else MetaInitializedRegressor
    # inner_lr differs from the initialization's 0.05: fit's own rate must be the one used
    est = cls(hidden_sizes=(8, 6), activation=activation, inner_lr=0.03, inner_steps=3)
    est.set_params(meta_init=init).fit(X, y)
    ref = _reference_sgd(init, X, y, "cross_entropy" if classifier else "mse", 3, 0.03, algorithm)
    for name, want in ref.named_parameters():
        got = est.adapted_params_[name]
        assert got.shape == (1, *want.shape)
        torch.testing.assert_close(got[0], want.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = ref(torch.as_tensor(Xq, dtype=torch.float32)).double().numpy()
    if classifier:
        np.testing.assert_allclose(est.decision_function(Xq), out, rtol=1e-5, atol=1e-5)
    else:
        want = out[:, 0] if target == "y1" else out
        np.testing.assert_allclose(est.predict(Xq), want, rtol=1e-5, atol=1e-5)


def test_fit_runs_the_engine_inner_loop(monkeypatch):
    import metafit.learner

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["steps"])
        return inner_loop(*args, **kwargs)

    monkeypatch.setattr(metafit.learner, "inner_loop", spy)
    X = np.random.default_rng(0).normal(size=(6, 2))
    for algorithm in ("maml", "anil", "metasgd"):
        MetaInitializedRegressor(algorithm=algorithm, inner_steps=4, random_state=0).fit(X, X[:, 0])
    assert calls == [4, 4, 4]


def test_metasgd_warns_when_fit_takes_more_steps_than_meta_training():
    tasks = SinusoidTasks(k_shot=5, k_query=5, random_state=0)
    est = MetaInitializedRegressor(
        algorithm="metasgd",
        hidden_sizes=(8,),
        meta_inner_steps=1,
        inner_steps=3,
        meta_iterations=2,
        meta_batch_size=2,
        random_state=0,
    ).meta_fit(tasks)
    task = tasks.sample(1)[0]
    with pytest.warns(UserWarning, match="meta-trained with 1 inner step") as record:
        est.fit(task.X_support, task.y_support)
    assert len([w for w in record if "Meta-SGD" in str(w.message)]) == 1  # once per fit
    assert "inner_steps=3" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clone(est).set_params(inner_steps=1).fit(task.X_support, task.y_support)
        # MAML's single rate has no such limit, nor a Meta-SGD net never meta-trained
        maml = MetaInitializedRegressor(
            meta_inner_steps=1,
            inner_steps=3,
            meta_iterations=2,
            meta_batch_size=2,
            hidden_sizes=(8,),
            random_state=0,
        )
        maml.meta_fit(tasks).fit(task.X_support, task.y_support)
        # (a never meta-trained net says so, with its own warning, issue 14)
        warnings.simplefilter("ignore", NoMetaInitWarning)
        MetaInitializedRegressor(algorithm="metasgd", inner_steps=9, random_state=0).fit(
            task.X_support, task.y_support
        )


def test_custom_module_class_with_module_params():
    class Net(torch.nn.Module):
        def __init__(self, n_inputs, n_outputs, width=4):
            super().__init__()
            self.lin1 = torch.nn.Linear(n_inputs, width)
            self.lin2 = torch.nn.Linear(width, n_outputs)

        def forward(self, X):
            return self.lin2(torch.tanh(self.lin1(X)))

    est = MetaInitializedRegressor(module=Net, module__width=7, random_state=0)
    assert est.get_params()["module__width"] == 7
    est.set_params(module__width=5)
    X = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    est.fit(X, X[:, 0])
    assert est._learner.module.lin1.out_features == 5
    assert clone(est).get_params()["module__width"] == 5


def test_unknown_keyword_is_stored_then_rejected_by_fit():
    est = MetaInitializedRegressor(widht=3)  # a typo of a module__ argument
    assert est.get_params()["widht"] == 3
    with pytest.raises(TypeError, match="unexpected keyword argument 'widht'"):
        est.fit(np.zeros((3, 1)), np.zeros(3))


# ---------------------------------------------------------------------------- classifier


def test_classifier_string_labels_probabilities_and_fewer_classes(meta_classifier):
    X, y = small_classification(seed=1)
    mask = np.isin(y, [0, 1])
    labels = np.array(["cat", "dog"])[y[mask]]
    est = clone(meta_classifier).fit(X[mask], labels)  # 2 classes on a 3-output head
    assert list(est.classes_) == ["cat", "dog"]
    proba = est.predict_proba(X[mask])
    assert proba.shape == (mask.sum(), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    decision = est.decision_function(X[mask])
    assert decision.shape == (mask.sum(),)
    np.testing.assert_array_equal(est.predict(X[mask]), est.classes_[(decision > 0).astype(int)])
    np.testing.assert_allclose(np.exp(est.predict_log_proba(X[mask])), proba, rtol=1e-6)
    assert est.score(X[mask], labels) > 0.9


def test_classifier_int_labels_three_classes(meta_classifier):
    X, y = small_classification(seed=2)
    mask = np.isin(y, [2, 5, 7])
    labels = np.array([10, 20, 30, 40, 50, 60, 70, 80])[y[mask]]
    est = clone(meta_classifier).set_params(inner_steps=20).fit(X[mask], labels)
    np.testing.assert_array_equal(est.classes_, [30, 60, 80])
    assert est.decision_function(X[mask]).shape == (mask.sum(), 3)
    assert est.predict_proba(X[mask]).shape == (mask.sum(), 3)
    assert set(est.predict(X[mask])) <= {30, 60, 80}
    assert est.score(X[mask], labels) > 0.8


def test_classifier_too_many_classes_and_single_class(meta_classifier):
    X, y = small_classification(seed=3)
    est = clone(meta_classifier)
    with pytest.raises(ValueError, match="4 classes but the meta-learned head has 3 outputs"):
        est.fit(X[y < 4], y[y < 4])
    with pytest.raises(ValueError, match="only one class"):
        est.fit(X[y == 0], y[y == 0])
    assert not hasattr(est, "classes_")


# ---------------------------------------------------------------------------- clone, searches


def test_clone_keeps_the_meta_init(sinusoid_est):
    copy = clone(sinusoid_est)
    assert copy.meta_init_ is sinusoid_est.meta_init_
    assert copy.get_params() == sinusoid_est.get_params()
    assert not hasattr(copy, "adapted_params_")
    assert not hasattr(clone(MetaInitializedRegressor()), "meta_init_")


def test_grid_search_adapts_from_the_meta_init(sinusoid_est, new_tasks):
    grid = {"inner_lr": [0.003, 0.01, 0.02], "inner_steps": [1, 5, 10]}

    def search_error(est, task):
        search = GridSearchCV(
            est, grid, cv=KFold(5), scoring="neg_mean_squared_error", error_score="raise"
        )
        search.fit(task.X_support, task.y_support)
        assert search.best_estimator_.__dict__.get("meta_init_") is est.__dict__.get("meta_init_")
        pred = search.predict(task.X_query)
        return float(np.mean((pred - task.y_query) ** 2))

    scratch = MetaInitializedRegressor(random_state=0)
    meta = np.mean([search_error(sinusoid_est, t) for t in new_tasks])
    base = np.mean([search_error(scratch, t) for t in new_tasks])
    assert meta < 0.3 * base, (meta, base)


def test_randomized_search_and_cross_val_score_use_the_meta_init(sinusoid_est, new_tasks):
    task = new_tasks[1]
    search = RandomizedSearchCV(
        sinusoid_est, {"inner_lr": [0.005, 0.01, 0.02]}, n_iter=2, cv=2, random_state=0
    ).fit(task.X_support, task.y_support)
    assert search.best_estimator_.meta_init_ is sinusoid_est.meta_init_
    X = np.concatenate([task.X_support, task.X_query[:10]])
    y = np.concatenate([task.y_support, task.y_query[:10]])
    meta = cross_val_score(
        sinusoid_est,
        X,
        y,
        cv=KFold(2, shuffle=True, random_state=0),
        scoring="neg_mean_squared_error",
    )
    base = cross_val_score(
        MetaInitializedRegressor(**{**META, "meta_iterations": 1000}),
        X,
        y,
        cv=KFold(2, shuffle=True, random_state=0),
        scoring="neg_mean_squared_error",
    )
    assert -meta.mean() < 0.5 * -base.mean()


def test_clones_share_the_network_built_from_the_meta_init(sinusoid_est, new_tasks):
    task = new_tasks[2]
    a = clone(sinusoid_est).fit(task.X_support, task.y_support)
    b = clone(sinusoid_est).set_params(inner_lr=0.005).fit(task.X_support, task.y_support)
    assert a._learner is b._learner  # built once, not once per clone
    assert "_learners" not in pickle.loads(pickle.dumps(sinusoid_est.meta_init_)).__dict__
    # fit never mutates a shared learner: concurrent fits with different rates agree
    # with sequential ones.
    rates = [0.002, 0.005, 0.01, 0.02] * 4
    sequential = [
        clone(sinusoid_est)
        .set_params(inner_lr=r)
        .fit(task.X_support, task.y_support)
        .predict(task.X_query)
        for r in rates
    ]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(
            pool.map(
                lambda r: (
                    clone(sinusoid_est)
                    .set_params(inner_lr=r)
                    .fit(task.X_support, task.y_support)
                    .predict(task.X_query)
                ),
                rates,
            )
        )
    # Threads may split a matrix product differently (float32 rounding, ~1e-7); a fit
    # that read another thread's rate would be off by the rates' effect, checked here to
    # be thousands of times larger than the tolerance.
    for x, y in zip(sequential, threaded):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert np.abs(sequential[0] - sequential[1]).max() > 1e-3


def test_pipeline_with_per_task_scaler_runs(sinusoid_est, new_tasks):
    task = new_tasks[0]
    pipe = make_pipeline(StandardScaler(), sinusoid_est)
    pred = pipe.fit(task.X_support, task.y_support).predict(task.X_query)
    assert pred.shape == (100,)
    assert clone(pipe).steps[1][1].meta_init_ is sinusoid_est.meta_init_


def test_fixed_scaling_keeps_the_meta_init_valid_per_task_scaling_does_not(sinusoid_est, new_tasks):
    """What docs/estimators.md recommends: scale with statistics fixed before meta-training.

    A StandardScaler inside the pipeline is refitted on each task's 10 points, which shifts
    and stretches the inputs away from the distribution the initialization was learned on.
    """
    source = SinusoidTasks(random_state=0)
    sample = source.sample(50, random_state=99)
    scaler = StandardScaler().fit(np.concatenate([t.X_support for t in sample]))

    def scaled(tasks):
        for t in tasks:
            yield Task(
                scaler.transform(t.X_support), t.y_support, scaler.transform(t.X_query), t.y_query
            )

    est = MetaInitializedRegressor(**META).meta_fit(scaled(source))
    fixed = make_pipeline(FrozenEstimator(scaler), est)
    per_task = make_pipeline(StandardScaler(), sinusoid_est)
    fixed_err = np.mean([query_mse(clone(fixed), t) for t in new_tasks])
    per_task_err = np.mean([query_mse(clone(per_task), t) for t in new_tasks])
    raw_err = np.mean([query_mse(clone(sinusoid_est), t) for t in new_tasks])
    assert fixed_err < 2 * raw_err
    assert per_task_err > 2 * fixed_err, (per_task_err, fixed_err)


# ---------------------------------------------------------------------------- determinism


def test_same_random_state_same_predictions_and_global_rng_untouched(new_tasks):
    task = new_tasks[0]
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()  # noqa: NPY002
    kw = dict(hidden_sizes=(16, 16), meta_iterations=5, meta_batch_size=4, random_state=3)
    preds = []
    for algorithm in ("maml", "maml", "reptile"):
        est = MetaInitializedRegressor(algorithm=algorithm, **kw)
        est.meta_fit(SinusoidTasks(random_state=0))
        preds.append(est.fit(task.X_support, task.y_support).predict(task.X_query))
    np.testing.assert_array_equal(preds[0], preds[1])
    assert not np.array_equal(preds[0], preds[2])
    scratch = [
        MetaInitializedRegressor(hidden_sizes=(8,), random_state=s)
        .fit(task.X_support, task.y_support)
        .predict(task.X_query)
        for s in (1, 1, 2)
    ]
    np.testing.assert_array_equal(scratch[0], scratch[1])
    assert not np.array_equal(scratch[0], scratch[2])
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])


def test_dropout_module_is_seeded_and_leaves_global_rng(new_tasks):
    class DropNet(torch.nn.Module):
        def __init__(self, n_inputs, n_outputs):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Linear(n_inputs, 16),
                torch.nn.ReLU(),
                torch.nn.Dropout(0.5),
                torch.nn.Linear(16, n_outputs),
            )

        def forward(self, X):
            return self.body(X)

    task = new_tasks[0]
    state = torch.get_rng_state()
    runs = [
        MetaInitializedRegressor(module=DropNet, random_state=4)
        .fit(task.X_support, task.y_support)
        .adapted_params_
        for _ in range(2)
    ]
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=0)
    est = MetaInitializedRegressor(module=DropNet, random_state=4)
    est.fit(task.X_support, task.y_support)
    # predict runs the module in eval mode: dropout off, the same output every time
    np.testing.assert_array_equal(est.predict(task.X_query), est.predict(task.X_query))
    assert est._learner.module.training
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------- bad input


def snapshot(est):
    return {k: v for k, v in est.__dict__.items()}


def assert_unchanged(est, before, X, pred):
    assert est.__dict__.keys() == before.keys()
    assert all(est.__dict__[k] is v for k, v in before.items())
    np.testing.assert_array_equal(est.predict(X), pred)


BAD_FIT = [
    (np.array([[1.0], [np.nan], [2.0]]), np.zeros(3), "NaN"),
    (np.array([[1.0], [np.inf], [2.0]]), np.zeros(3), "infinity"),
    (np.zeros((3, 1)), np.array([0.0, np.nan, 1.0]), "NaN"),
    (np.zeros(3), np.zeros(3), "Expected 2D array"),
    (np.zeros((0, 1)), np.zeros(0), "0 sample"),
    (np.zeros((3, 1)), np.zeros(4), "inconsistent numbers of samples"),
    (np.array([["a"], ["b"], ["c"]]), np.zeros(3), "could not convert string to float"),
    (
        np.zeros((3, 2)),
        np.zeros(3),
        r"2 feature\(s\), but the meta-learned initialization "
        r"expects 1",
    ),
    (np.zeros((3, 1)), np.zeros((3, 2)), "2 output column"),
]


@pytest.mark.parametrize("X, y, match", BAD_FIT)
def test_bad_fit_input_raises_and_leaves_the_estimator_unchanged(
    sinusoid_est, new_tasks, X, y, match
):
    task = new_tasks[0]
    est = clone(sinusoid_est).fit(task.X_support, task.y_support)
    pred = est.predict(task.X_query)
    before = snapshot(est)
    with pytest.raises(ValueError, match=match):
        est.fit(X, y)
    assert_unchanged(est, before, task.X_query, pred)


def test_bad_predict_input(sinusoid_est, new_tasks):
    task = new_tasks[0]
    est = clone(sinusoid_est)
    with pytest.raises(Exception, match="not fitted"):
        est.predict(task.X_query)
    est.fit(task.X_support, task.y_support)
    for X, match in [
        (np.zeros((2, 3)), "X has 3 features, but MetaInitializedRegressor is expecting 1"),
        (np.array([[np.nan]]), "NaN"),
        (np.zeros(2), "2D"),
    ]:
        with pytest.raises(ValueError, match=match):
            est.predict(X)


def test_classifier_continuous_targets(meta_classifier):
    X, _ = small_classification()
    est = clone(meta_classifier)
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        est.fit(X[:10], np.linspace(0, 1, 10))
    assert not hasattr(est, "n_features_in_")


def test_meta_fit_errors_leave_the_estimator_unchanged(sinusoid_est):
    est = clone(sinusoid_est)
    before = snapshot(est)
    good = SinusoidTasks(random_state=0).sample(2)
    other = Task(np.zeros((5, 2)), np.zeros(5), np.zeros((5, 2)), np.zeros(5))
    with pytest.raises(ValueError, match="tasks is empty"):
        est.meta_fit([])
    with pytest.raises(ValueError, match="feature shape"):
        est.meta_fit([*good, other])
    with pytest.raises(ValueError, match="same features"):
        Task(np.zeros((5, 1)), np.zeros(5), np.zeros((5, 2)), np.zeros(5))
    with pytest.raises(TypeError, match="iterable of Task"):
        est.meta_fit(good[0])
    assert est.__dict__.keys() == before.keys()
    assert all(est.__dict__[k] is v for k, v in before.items())
    # A late task, after meta-steps ran: the error comes, and the completed steps stay.
    with pytest.warns(UserWarning, match="stopped after"):
        with pytest.raises(ValueError, match="feature shape"):
            est.meta_fit(iter([*good] * 10 + [other]))
    assert est.meta_init_.metadata["iteration"] == len(est.meta_history_) > 0


def test_bad_parameters_are_reported_at_fit():
    X, y = np.zeros((4, 1)), np.zeros(4)
    for params, exc, match in [
        ({"inner_lr": -1.0}, ValueError, "inner_lr"),
        ({"inner_steps": 2.5}, TypeError, "inner_steps"),
        ({"algorithm": "sgd"}, ValueError, "algorithm must be one of"),
        ({"hidden_sizes": (0,)}, ValueError, "hidden_sizes"),
        ({"module": "mlp"}, TypeError, "module must be"),
    ]:
        with pytest.raises(exc, match=match):
            MetaInitializedRegressor(**params).fit(X, y)


# ---------------------------------------------------------------------------- data path


def test_a_built_in_source_trains_on_its_stacked_batches_exactly_as_on_its_tasks():
    kw = dict(hidden_sizes=(16,), meta_iterations=6, meta_batch_size=4, inner_steps=2,
              random_state=0)
    stacked = MetaInitializedRegressor(**kw).meta_fit(SinusoidTasks(5, 5, random_state=3))
    plain = MetaInitializedRegressor(**kw).meta_fit(
        t for t in SinusoidTasks(5, 5, random_state=3))  # a generator: Task objects
    for k, v in stacked.meta_init_.tensors.items():
        torch.testing.assert_close(v, plain.meta_init_.tensors[k], rtol=1e-6, atol=1e-7)
    X, y = small_classification()
    source = NWayKShotTasks(X, y, n_way=3, k_shot=2, k_query=3, random_state=0)
    kw = dict(hidden_sizes=(16,), meta_iterations=5, meta_batch_size=4, inner_lr=0.1,
              random_state=0)
    a = MetaInitializedClassifier(**kw).meta_fit(source)
    b = MetaInitializedClassifier(**kw).meta_fit(t for t in source)
    for k, v in a.meta_init_.tensors.items():
        torch.testing.assert_close(v, b.meta_init_.tensors[k], rtol=1e-6, atol=1e-7)


class _StackedSource:
    """A source with its own stacked meta-batches: good ones, then ``bad`` ones."""

    def __init__(self, bad, after=2):
        self.bad, self.after = bad, after

    def __iter__(self):
        return iter(SinusoidTasks(3, 3, random_state=0))

    def meta_batches(self, size):
        good = SinusoidTasks(3, 3, random_state=0).meta_batches(size)
        for _ in range(self.after):
            yield next(good)
        batch = next(good)
        yield self.bad(batch)


def _nan(batch):
    batch.y_query[0, 1] = float("nan")
    return batch


def _wide(batch):
    return TaskBatch(batch.X_support.repeat(1, 1, 2), batch.y_support,
                     batch.X_query.repeat(1, 1, 2), batch.y_query)


def _huge(batch):
    batch.y_support[1, 0] = 1e30
    return batch


@pytest.mark.parametrize("bad, match", [(_nan, "y_query contains NaN"),
                                        (_wide, "feature shape"),
                                        (_huge, "targets reach 1e\\+30")])
def test_a_bad_stacked_batch_is_refused_first_or_later(bad, match):
    est = MetaInitializedRegressor(hidden_sizes=(8,), meta_iterations=10, meta_batch_size=3,
                                   random_state=0)
    if bad is not _wide:  # a first batch sets the feature shape
        with pytest.raises(ValueError, match="NaN" if bad is _nan else match):
            est.meta_fit(_StackedSource(bad, after=0))  # the first batch: before any work
        assert not hasattr(est, "meta_init_")
    with pytest.warns(UserWarning, match="stopped after"):
        with pytest.raises(ValueError, match=match):
            est.meta_fit(_StackedSource(bad, after=2))
    assert est.meta_init_.metadata["iteration"] == 2


def test_a_stacked_classification_batch_with_bad_labels_is_refused():
    X, y = small_classification()
    source = NWayKShotTasks(X, y, n_way=3, k_shot=2, k_query=3, random_state=0)

    class Relabelled:
        def __init__(self, change):
            self.change = change

        def __iter__(self):
            return iter(source)

        def meta_batches(self, size):
            batches = source.meta_batches(size)
            yield next(batches)
            yield self.change(next(batches))

    est = MetaInitializedClassifier(hidden_sizes=(8,), meta_iterations=5, meta_batch_size=2,
                                    random_state=0)
    for change, match in [(lambda b: TaskBatch(b.X_support, b.y_support + 3, b.X_query,
                                               b.y_query), "class index 5"),
                          (lambda b: TaskBatch(b.X_support, b.y_support - 1, b.X_query,
                                               b.y_query), "integer class indices >= 0"),
                          (lambda b: TaskBatch(b.X_support, b.y_support.double(), b.X_query,
                                               b.y_query), "integer class indices")]:
        with pytest.warns(UserWarning, match="stopped after"):
            with pytest.raises(ValueError, match=match):
                clone(est).meta_fit(Relabelled(change))
