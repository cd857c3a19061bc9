"""Tests of MAML++ (metafit.algorithms.mamlpp) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metafit import MetaInitializedClassifier
from metafit.algorithms import MAMLPlusPlus, get_algorithm
from metafit.algorithms.mamlpp import per_step_loss_weights
from metafit.learner import MetaLearner
from metafit.models import MLP, Conv4
from metafit.tasks import Task


def _tasks(n=3, n_features=4, n_way=3, seed=0, shape=None):
    rng = np.random.default_rng(seed)
    shape = shape or (n_features,)
    out = []
    for _ in range(n):
        y_s = np.arange(n_way).repeat(2)
        y_q = np.arange(n_way).repeat(3)
        out.append(
            Task(rng.normal(size=(len(y_s), *shape)), y_s, rng.normal(size=(len(y_q), *shape)), y_q)
        )
    return out


def _learner(algorithm, module=None, steps=2):
    torch.manual_seed(0)
    module = module or MLP(4, 3, (5,))
    return MetaLearner(
        module,
        loss="cross_entropy",
        algorithm=algorithm,
        inner_lr=0.3,
        inner_steps=steps,
        dtype=torch.float64,
    )


def _hand_meta_grads(learner, tasks, weights, second_order):
    """MAML++ meta-gradients written out: per-task loop, per-step learned rates."""
    theta = dict(learner.module.named_parameters())
    rates = learner.extras
    total = 0.0
    for task in tasks:
        b = learner.batches([task])[0]
        phi = dict(theta)
        step_losses = []
        for k in range(len(weights)):
            out = torch.func.functional_call(learner.module, phi, (b.X_support[0],))
            loss = torch.nn.functional.cross_entropy(out, b.y_support[0])
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=second_order)
            phi = {n: p - rates[f"lslr.{n}"][k] * g for (n, p), g in zip(phi.items(), grads)}
            q = torch.func.functional_call(learner.module, phi, (b.X_query[0],))
            step_losses.append(torch.nn.functional.cross_entropy(q, b.y_query[0]))
        total = total + sum(w * s for w, s in zip(weights, step_losses)) / len(tasks)
    return torch.autograd.grad(total, learner.meta_parameters())


def test_registered_by_name():
    assert isinstance(get_algorithm("mamlpp"), MAMLPlusPlus)


def test_step_weights_anneal_to_last_step():
    w0 = per_step_loss_weights(4, 0, 100)
    torch.testing.assert_close(w0, torch.full((4,), 0.25, dtype=torch.float64))
    w_mid = per_step_loss_weights(4, 50, 100)
    w_end = per_step_loss_weights(4, 100, 100)
    for w in (w_mid, w_end):
        assert math.isclose(float(w.sum()), 1.0)
    assert w_mid[-1] > 0.25 > w_mid[0]
    torch.testing.assert_close(w_end[:3], torch.full((3,), 0.03 / 4, dtype=torch.float64))
    algo = MAMLPlusPlus(msl_iterations=2)
    assert algo.step_weights(3, 0, 10) is not None
    assert algo.step_weights(3, 2, 10) is None  # after the annealing: the last step alone
    # a fraction of the planned iterations: 0.1 of 100 is 10
    assert MAMLPlusPlus(msl_iterations=0.1).step_weights(3, 9, 100) is not None
    assert MAMLPlusPlus(msl_iterations=0.1).step_weights(3, 10, 100) is None


def test_multi_step_loss_and_learned_rates_match_hand_computation():
    algo = MAMLPlusPlus(msl_iterations=10)
    learner = _learner(algo)
    learner.init_optimizer(1e-3, 100)
    with torch.no_grad():  # distinct rates per step and tensor
        for i, v in enumerate(learner.extras.values()):
            v.copy_(torch.tensor([0.3 + 0.01 * i, 0.2 - 0.01 * i]))
    tasks = _tasks()
    weights = per_step_loss_weights(2, 0, 10)
    loss, grads = algo.meta_gradients(learner, learner.batches(tasks))
    expected = _hand_meta_grads(learner, tasks, [float(w) for w in weights], second_order=True)
    assert len(grads) == len(expected)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    rate_grads = grads[-len(learner.extras) :]
    assert all(g.shape == (2,) and bool((g != 0).all()) for g in rate_grads)


def test_first_order_then_second_order():
    algo = MAMLPlusPlus(first_order_iterations=1, multi_step_loss=False)
    learner = _learner(algo)
    learner.init_optimizer(1e-3, 10)
    tasks = _tasks()
    batches = learner.batches(tasks)
    first = algo.meta_gradients(learner, batches)[1]
    learner.iteration = 1  # what meta_step counts; the algorithm only reads it
    second = algo.meta_gradients(learner, batches)[1]
    for got, order in ((first, False), (second, True)):
        expected = _hand_meta_grads(learner, tasks, [0.0, 1.0], second_order=order)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(first[0], second[0])


def test_cosine_annealed_meta_lr():
    algo = MAMLPlusPlus(min_meta_lr=1e-4)
    learner = _learner(algo)
    learner.init_optimizer(1e-2, 4)
    lrs = []
    for _ in range(4):
        lrs.append(learner.optimizer.param_groups[0]["lr"])
        learner.meta_step(learner.batches(_tasks(2)))
    expected = [1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * i / 4)) / 2 for i in range(4)]
    np.testing.assert_allclose(lrs, expected)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert (
        MAMLPlusPlus(cosine_meta_lr=False).make_optimizer(
            [torch.zeros(1, requires_grad=True)], 1e-3, 4
        )[1]
        is None
    )


def test_per_step_batchnorm_uses_the_step_index():
    module = Conv4(3, input_shape=(1, 6, 6), hidden_channels=4, n_blocks=2, bn_steps=2)
    learner = _learner(MAMLPlusPlus(msl_iterations=10), module=module.double(), steps=2)
    learner.init_optimizer(1e-3, 10)
    seen = []
    original = module.batched_forward

    def spy(params, X, step=None):
        seen.append((X.shape[1], step))
        return original(params, X, step=step)

    module.batched_forward = spy
    tasks = _tasks(2, shape=(1, 6, 6))
    _, grads = learner.algorithm.meta_gradients(learner, learner.batches(tasks))
    # support step 0, query after step 0, support step 1, query after step 1
    assert seen == [(6, 0), (9, 0), (6, 1), (9, 1)]
    names = [n for n, _ in module.named_parameters()]
    assert "lslr.norms.0.weight" not in learner.extras  # BN sets are not adapted
    for name, g in zip(names, grads):
        if name.startswith("norms."):
            assert bool((g.abs().sum(1) > 0).all()), name  # both sets learn
    seen.clear()
    b = learner.batches(tasks)[0]
    phi = learner.adapt(b.X_support, b.y_support, steps=3, track_graph=False)
    learner.predict(phi, b.X_query, step=2)  # the step is an argument, not a side effect
    assert seen == [(6, 0), (6, 1), (6, 2), (9, 2)]  # step 2 clamps to the last set


def test_estimator_meta_fit_and_save(tmp_path):
    tasks = _tasks(8)
    est = MetaInitializedClassifier(
        algorithm="mamlpp",
        hidden_sizes=(8,),
        inner_steps=2,
        meta_batch_size=4,
        meta_iterations=4,
        random_state=0,
    )
    est.meta_fit(tasks)
    assert any(k.startswith("extra.lslr.") for k in est.meta_init_.tensors)
    t = tasks[0]
    before = est.fit(t.X_support, t.y_support).predict_proba(t.X_query)
    est.save_meta_init(tmp_path / "m.safetensors")
    loaded = MetaInitializedClassifier(
        meta_init=tmp_path / "m.safetensors", hidden_sizes=(8,), inner_steps=2
    )
    after = loaded.fit(t.X_support, t.y_support).predict_proba(t.X_query)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs", [{"msl_iterations": -1}, {"first_order_iterations": 1.5}, {"min_meta_lr": -1.0}]
)
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        MAMLPlusPlus(**kwargs)


# ---------------------------------------------------------------- saved algorithm state


def _regression_tasks(n=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = rng.normal(size=3)
        Xs, Xq = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
        out.append(Task(Xs, Xs @ w, Xq, Xq @ w))
    return out


def _mamlpp_regressor(**kw):
    from metafit import MetaInitializedRegressor

    params = dict(hidden_sizes=(6,), meta_batch_size=3, meta_iterations=3, random_state=0)
    return MetaInitializedRegressor(**{**params, **kw})


def _hand_fit(init, X, y, steps):
    """SGD with MAML++'s learned per-step rates, steps past the learned ones reusing the
    last (the documented rule), by plain autograd in float64."""
    tensors = {k: v.double() for k, v in init.tensors.items()}
    module = MLP(3, 1, (6,)).double()
    theta = {n: tensors[n].clone().requires_grad_(True) for n, _ in module.named_parameters()}
    X, y = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    for k in range(steps):
        out = torch.func.functional_call(module, theta, (X,))[:, 0]
        grads = torch.autograd.grad(((out - y) ** 2).mean(), list(theta.values()))
        theta = {
            n: (p - tensors[f"extra.lslr.{n}"][min(k, 1)] * g).detach().requires_grad_(True)
            for (n, p), g in zip(theta.items(), grads)
        }
    return theta, module


@pytest.mark.parametrize("warm_cache", [False, True])
def test_mamlpp_init_fitted_with_more_inner_steps_than_meta_trained(warm_cache):
    from sklearn.base import clone

    tasks = _regression_tasks()
    est = _mamlpp_regressor(algorithm="mamlpp", inner_steps=2).meta_fit(tasks)
    assert est.meta_init_.tensors["extra.lslr.layers.0.weight"].shape == (2,)
    t = tasks[0]
    if warm_cache:  # a learner built for 2 steps is cached on the initialization first
        clone(est).fit(t.X_support, t.y_support)
    got = clone(est).set_params(inner_steps=4).fit(t.X_support, t.y_support).predict(t.X_query)
    theta, module = _hand_fit(est.meta_init_, t.X_support, t.y_support, 4)
    want = torch.func.functional_call(module, theta, (torch.as_tensor(t.X_query),))[:, 0]
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=1e-5)
    # and back to the meta-trained count: the cache serves any step count alike
    two = clone(est).fit(t.X_support, t.y_support).predict(t.X_query)
    theta, module = _hand_fit(est.meta_init_, t.X_support, t.y_support, 2)
    want = torch.func.functional_call(module, theta, (torch.as_tensor(t.X_query),))[:, 0]
    np.testing.assert_allclose(two, want.detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"learn_inner_lr": False},
        {"learn_inner_lr": False, "multi_step_loss": False, "cosine_meta_lr": False},
        {"msl_iterations": 2, "first_order_iterations": 0.5, "min_meta_lr": 1e-4},
    ],
)
def test_mamlpp_options_survive_save_load_and_clone(tmp_path, options):
    from sklearn.base import clone

    from metafit import MetaInit, MetaInitializedRegressor

    tasks = _regression_tasks()
    est = _mamlpp_regressor(algorithm=MAMLPlusPlus(**options), inner_steps=2).meta_fit(tasks)
    t = tasks[1]
    before = est.fit(t.X_support, t.y_support).predict(t.X_query)
    est.save_meta_init(tmp_path / "m.safetensors")
    loaded = MetaInitializedRegressor(
        meta_init=tmp_path / "m.safetensors", hidden_sizes=(6,), inner_steps=2
    )
    for other in (est, loaded, clone(est), clone(loaded)):
        after = other.fit(t.X_support, t.y_support).predict(t.X_query)
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
        assert other._learner.algorithm == MAMLPlusPlus(**options)
    saved = est.meta_init_.algorithm_options
    assert {k: saved[k] for k in options} == options
    assert MetaInit.load(tmp_path / "m.safetensors").algorithm_options == saved
    # estimator_params() hands back the algorithm with its options
    params = MetaInit.load(tmp_path / "m.safetensors").estimator_params()
    assert params["algorithm"] == MAMLPlusPlus(**options)


def test_algorithms_are_pure_policies():
    """Meta-training leaves an algorithm instance exactly as it was (no counters, no
    cursors, nothing assigned to the learner it serves)."""
    algo = MAMLPlusPlus(msl_iterations=2)
    before = dict(vars(algo))
    learner = _learner(algo)
    forward, grad_fn = learner.forward, learner.grad_fn
    learner.init_optimizer(1e-3, 4)
    for _ in range(3):
        learner.meta_step(learner.batches(_tasks(2)))
    assert vars(algo) == before
    assert learner.forward is forward and learner.grad_fn is grad_fn
    assert learner.iteration == 3
