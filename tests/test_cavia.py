"""Tests of CAVIA, context adaptation (``metafit.algorithms.cavia``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch.func import functional_call

from metafit import MetaInitializedRegressor, SinusoidTasks
from metafit.algorithms import CAVIA
from metafit.learner import MetaLearner
from metafit.models import MLP, ContextMLP


def _learner(steps, context_lr=0.7):
    torch.manual_seed(0)
    net = ContextMLP(1, 1, (8,), context_size=3)
    with torch.no_grad():
        net.context.normal_()  # a start away from zero: its gradient is tested too
    return MetaLearner(net, loss="mse", algorithm=CAVIA(3, context_lr), inner_lr=0.01,
                       inner_steps=steps, forward="vmap", dtype=torch.float64)


def _reference(learner, tasks, steps, lr):
    """The per-task loop: only the context moves, second order through the steps."""
    net = learner.module
    theta = dict(net.named_parameters())
    total = 0.0
    for task in tasks:
        t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
        p = dict(theta)
        for _ in range(steps):
            loss = ((functional_call(net, p, (t(task.X_support),))[:, 0]
                     - t(task.y_support)) ** 2).mean()
            (g,) = torch.autograd.grad(loss, [p["context"]], create_graph=True)
            p["context"] = p["context"] - lr * g
        query = ((functional_call(net, p, (t(task.X_query),))[:, 0] - t(task.y_query)) ** 2)
        total = total + query.mean() / len(tasks)
    return torch.autograd.grad(total, list(theta.values()))


@pytest.mark.parametrize("steps", [1, 3])
def test_context_meta_gradients_match_the_per_task_loop(steps):
    learner = _learner(steps)
    tasks = SinusoidTasks(k_shot=5, k_query=6, random_state=0).sample(4)
    _, grads = learner.algorithm.meta_gradients(learner, learner.batches(tasks))
    want = _reference(learner, tasks, steps, 0.7)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-11)


def test_only_the_context_adapts_and_inner_lr_is_not_read():
    learner = _learner(2)
    task = SinusoidTasks(k_shot=5, random_state=1).sample(1)[0]
    X, y = learner.as_tensors(task.X_support[None], task.y_support[None])
    adapted = learner.adapt(X, y, track_graph=False)
    theta = learner.params()
    for name, value in adapted.items():
        same = torch.allclose(value.reshape(theta[name].shape), theta[name])
        assert same == (name != "context"), name
    again = learner.adapt(X, y, inner_lr=0.5, track_graph=False)
    torch.testing.assert_close(again["context"], adapted["context"])


def test_cavia_through_the_estimator_saves_clones_and_learns_sine_waves(tmp_path):
    from metafit.tuning import evaluate

    common = dict(meta_iterations=200, meta_batch_size=10, hidden_sizes=(32, 32),
                  random_state=0, verbose=0)
    est = MetaInitializedRegressor(algorithm="cavia", **common)
    est.meta_fit(SinusoidTasks(k_shot=10, random_state=0))
    held_out = SinusoidTasks(k_shot=10, random_state=7).sample(30)
    random_start = MetaInitializedRegressor(**common).set_params(meta_iterations=1)
    random_start.meta_fit(SinusoidTasks(k_shot=10, random_state=0))
    assert evaluate(est, held_out) < 0.8 * evaluate(random_start, held_out)
    path = tmp_path / "cavia.safetensors"
    est.save_meta_init(path)
    task = held_out[0]
    ref = clone(est).fit(task.X_support, task.y_support).predict(task.X_query)
    loaded = MetaInitializedRegressor(meta_init=path).fit(task.X_support, task.y_support)
    np.testing.assert_allclose(loaded.predict(task.X_query), ref, rtol=1e-5, atol=1e-6)
    assert loaded.meta_init is not None and "context" in dict(
        loaded._learner.module.named_parameters())


def test_cavia_needs_a_context_and_sane_options():
    with pytest.raises(ValueError, match="parameter named 'context'"):
        MetaInitializedRegressor(algorithm="cavia", module=MLP(1, 1), meta_iterations=2,
                                 random_state=0).meta_fit(SinusoidTasks(k_shot=4))
    for bad in ({"context_size": 0}, {"context_lr": -1.0}, {"context_size": True}):
        with pytest.raises(ValueError):
            CAVIA(**bad)


def test_cavia_in_table_mode():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 10)
    X = rng.normal(size=(120, 2))
    y = rng.normal(size=12)[groups] + X[:, 0]
    est = MetaInitializedRegressor(algorithm="cavia", meta_iterations=20, meta_batch_size=4,
                                   hidden_sizes=(8,), random_state=0, verbose=0)
    est.meta_fit(X, y, groups=groups)
    assert est.fit(X[:5], y[:5]).predict(X[5:10]).shape == (5,)
