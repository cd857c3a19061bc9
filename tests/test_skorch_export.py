"""Tests of ``to_skorch``: the exported net holds our weights and trains on with skorch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from skorch import NeuralNetClassifier, NeuralNetRegressor
from skorch.callbacks import Callback

from metafit import (
    MetaInitializedClassifier,
    MetaInitializedRegressor,
    SinusoidTasks,
)


class EpochCounter(Callback):
    def initialize(self):
        self.epochs = 0
        return self

    def on_epoch_end(self, net, **kwargs):
        self.epochs += 1


@pytest.fixture(scope="module")
def task():
    return SinusoidTasks(random_state=3).sample(1)[0]


def assert_same_weights(module, tensors):
    state = module.state_dict()
    assert state.keys() == tensors.keys()
    for name, value in tensors.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)


def test_export_of_the_meta_init(sine_reg, task, tiny_params):
    net = sine_reg.to_skorch(verbose=0)
    assert isinstance(net, NeuralNetRegressor)
    assert_same_weights(net.module_, sine_reg.meta_init_.tensors)
    # With zero adaptation steps our predictions are the meta-init's own outputs.
    ours = MetaInitializedRegressor(**{**tiny_params, "inner_steps": 0})
    ours.meta_init_ = sine_reg.meta_init_
    ours.fit(task.X_support, task.y_support)
    np.testing.assert_allclose(
        net.predict(task.X_query)[:, 0], ours.predict(task.X_query), rtol=1e-6, atol=1e-6
    )


def test_export_of_the_adapted_weights_and_further_training(sine_reg, task, tiny_params):
    est = MetaInitializedRegressor(**tiny_params)
    est.meta_init_ = sine_reg.meta_init_
    est.fit(task.X_support, task.y_support)
    expected = est.predict(task.X_query)
    counter = EpochCounter()
    net = est.to_skorch(max_epochs=4, callbacks=[counter], verbose=0)
    assert_same_weights(net.module_, {k: v[0] for k, v in est.adapted_params_.items()})
    np.testing.assert_allclose(net.predict(task.X_query)[:, 0], expected, rtol=1e-5, atol=1e-6)
    y2 = task.y_support.reshape(-1, 1)
    start = float(np.mean((net.predict(task.X_support) - y2) ** 2))
    net.partial_fit(task.X_support, y2)
    assert counter.epochs == 4
    losses = net.history[:, "train_loss"]
    assert losses[0] == pytest.approx(start, rel=1e-5)  # training starts from our weights
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(est.predict(task.X_query), expected)  # we are untouched
    fresh = est.to_skorch(max_epochs=2, verbose=0)
    fresh.fit(task.X_support, y2)  # skorch keeps a module instance's weights on fit too
    assert fresh.history[0, "train_loss"] == pytest.approx(start, rel=1e-5)


def test_classifier_export(blob_clf, blobs):
    X, y = blobs
    clf = pickle.loads(pickle.dumps(blob_clf))
    mask = np.isin(y, [0, 2, 4])
    labels = np.array(list("abcdef"))[y[mask]]
    clf.fit(X[mask], labels)
    net = clf.to_skorch(max_epochs=2, verbose=0)
    assert isinstance(net, NeuralNetClassifier)
    np.testing.assert_allclose(net.predict_proba(X), clf.predict_proba(X), rtol=1e-5, atol=1e-6)
    codes = np.searchsorted(clf.classes_, labels)
    net.partial_fit(X[mask], codes)
    assert len(net.history) == 2
    assert net.predict_proba(X).shape == (len(X), 3)


def test_nothing_to_export():
    with pytest.raises(NotFittedError, match="no weights to export"):
        MetaInitializedRegressor().to_skorch()
    est = MetaInitializedRegressor(hidden_sizes=(4,), random_state=0).fit(
        np.zeros((5, 2), dtype=np.float32), np.zeros(5, dtype=np.float32)
    )
    net = est.to_skorch(verbose=0)  # no meta-init, but fitted: the adapted weights
    assert_same_weights(net.module_, {k: v[0] for k, v in est.adapted_params_.items()})


def test_a_table_mode_export_takes_and_returns_the_tables_units():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 10)
    X = rng.normal(500.0, 50.0, size=(120, 2))  # far from standardized units
    y = 1000.0 + 30.0 * X[:, 0] / 50 + 20.0 * rng.normal(size=12)[groups]
    params = dict(hidden_sizes=(8,), meta_iterations=5, random_state=0, verbose=0)
    reg = MetaInitializedRegressor(algorithm="maml", **params).meta_fit(X, y, groups=groups)
    net = reg.to_skorch(verbose=0)  # the meta-learned start, before any fit
    reg.set_params(inner_steps=0).fit(X[:5], y[:5])  # zero steps: predicts the start
    np.testing.assert_allclose(net.predict(X.astype(np.float32))[:, 0], reg.predict(X),
                               rtol=1e-4)
    reg.set_params(inner_steps=5).fit(X[:5], y[:5])
    net = reg.to_skorch(verbose=0)
    np.testing.assert_allclose(net.predict(X.astype(np.float32))[:, 0], reg.predict(X),
                               rtol=1e-4)
    before = {k: v.clone() for k, v in net.module_.state_dict().items() if "mean" in k}
    net.partial_fit(X[:5].astype(np.float32), y[:5].astype(np.float32).reshape(-1, 1))
    assert all(torch.equal(v, net.module_.state_dict()[k]) for k, v in before.items())
    labels = np.where(y > np.median(y), "high", "low")
    clf = MetaInitializedClassifier(**params).meta_fit(X, labels, groups=groups)
    clf.fit(X[:5], labels[:5])
    net = clf.to_skorch(verbose=0)
    np.testing.assert_allclose(net.predict_proba(X.astype(np.float32)), clf.predict_proba(X),
                               rtol=1e-4, atol=1e-6)


def test_a_table_with_categorical_columns_is_not_exported():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=60),
                          "shop": pd.Categorical(rng.choice(["a", "b"], 60))})
    est = MetaInitializedRegressor(algorithm="maml", hidden_sizes=(8,), meta_iterations=3,
                                   random_state=0, verbose=0)
    est.meta_fit(frame, rng.normal(size=60), groups=np.repeat(np.arange(6), 10))
    with pytest.raises(ValueError, match="one-hot encodes categorical columns \\(shop\\)"):
        est.to_skorch()
