"""The low-rank inner loop (metafit._low_rank) against the dense one: values and
meta-gradients in float64, for every algorithm that adapts an MLP's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metafit import _low_rank
from metafit._inner_types import LowRankWeight
from metafit.algorithms import MAMLPlusPlus, get_algorithm
from metafit.functional import (
    cross_entropy_loss,
    inner_loop,
    make_forward,
    make_grad_fn,
    mse_loss,
)
from metafit.learner import MetaLearner
from metafit.losses import task_losses
from metafit.models import MLP
from metafit.tasks import Task, TaskBatch


def _net(n_in=3, n_out=2, width=12, activation="relu", seed=0):
    torch.manual_seed(seed)
    return MLP(n_in, n_out, (width, width), activation=activation).double()


def _data(n_tasks=4, n_support=5, n_query=7, n_in=3, n_out=2, classes=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tasks, n_support, n_in, generator=g, dtype=torch.float64)
    Xq = torch.randn(n_tasks, n_query, n_in, generator=g, dtype=torch.float64)
    if classes:
        y = torch.randint(0, classes, (n_tasks, n_support), generator=g)
        yq = torch.randint(0, classes, (n_tasks, n_query), generator=g)
    else:
        y = torch.randn(n_tasks, n_support, n_out, generator=g, dtype=torch.float64)
        yq = torch.randn(n_tasks, n_query, n_out, generator=g, dtype=torch.float64)
    return X, y, Xq, yq


def _run(net, loss_fn, data, *, policy, lr, steps=3, create_graph=True, track_graph=True,
         mask=None, adapt=None, extra=()):
    """Query outputs and the meta-gradients of (theta, extra) for one inner loop."""
    X, y, Xq, yq = data
    forward, grad_fn = make_forward(net, "mlp"), make_grad_fn(net, "mlp", loss_fn)
    params = dict(net.named_parameters())
    seen = []
    phi = inner_loop(
        forward, loss_fn, params, X, y, steps=steps, lr=lr, adapt=adapt, grad_fn=grad_fn,
        shared=True, keep_shared=True, create_graph=create_graph, track_graph=track_graph,
        mask=mask, factored=True, low_rank=policy,
        on_step=lambda step, p: seen.append(forward(p, Xq).detach()),
    )
    out = forward(phi, Xq)
    kinds = {k: type(v) for k, v in phi.items()}
    if not track_graph:
        return out.detach(), None, kinds, seen
    loss = task_losses(loss_fn, out, yq).sum()
    wrt = [*params.values(), *extra]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return out.detach(), grads, kinds, seen


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)
    for x, y in zip(a[3], b[3]):  # what on_step saw after every step
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    if a[1] is None:
        return
    for x, y in zip(a[1], b[1]):
        if x is None or y is None:
            assert x is None and y is None or float((x if x is not None else y).abs().max()) == 0
            continue
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "elu"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("order", ["second", "first", "none"])
def test_factored_loop_equals_the_dense_loop(activation, loss, order):
    classes = 4 if loss == "cross_entropy" else None
    net = _net(n_out=classes or 2, activation=activation)
    loss_fn = cross_entropy_loss if classes else mse_loss
    data = _data(classes=classes)
    kw = dict(create_graph=order == "second", track_graph=order != "none", lr=0.1)
    dense = _run(net, loss_fn, data, policy=False, **kw)
    factored = _run(net, loss_fn, data, policy=True, **kw)
    assert all(v is not LowRankWeight for v in dense[2].values())
    assert factored[2]["layers.1.weight"] is LowRankWeight
    _assert_same(factored, dense)


@pytest.mark.parametrize("rates", ["per-name tensors", "per-step", "per-step tensors"])
def test_scalar_tensor_and_per_step_rates_get_their_meta_gradients(rates):
    net = _net()
    data = _data()
    names = [n for n, _ in net.named_parameters()]
    rate = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    per_step = [torch.tensor(r, dtype=torch.float64, requires_grad=True) for r in (.1, .05, .2)]
    if rates == "per-name tensors":
        lr, extra = {n: rate for n in names}, [rate]
    elif rates == "per-step":
        lr, extra = [0.1, 0.05, 0.2], []
    else:
        lr, extra = [{n: r for n in names} for r in per_step], per_step
    dense = _run(net, mse_loss, data, policy=False, lr=lr, extra=extra)
    factored = _run(net, mse_loss, data, policy=True, lr=lr, extra=extra)
    assert factored[2]["layers.1.weight"] is LowRankWeight
    _assert_same(factored, dense)
    assert all(g is not None and float(g.abs()) > 0 for g in factored[1][len(names):])


def test_padded_rows_and_adapting_the_head_only():
    net = _net(width=10)
    data = _data(n_support=6)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    head = ["layers.2.weight", "layers.2.bias"]
    for adapt in (None, head):
        dense = _run(net, mse_loss, data, policy=False, lr=0.1, mask=mask, adapt=adapt)
        factored = _run(net, mse_loss, data, policy=True, lr=0.1, mask=mask, adapt=adapt)
        assert factored[2]["layers.2.weight"] is LowRankWeight
        _assert_same(factored, dense)


def test_the_default_switches_a_layer_to_dense_once_its_rank_passes_the_limit(monkeypatch):
    # 12-wide hidden layer: limit RANK_RATIO * 6; 5 rows per step, 3 steps
    net = _net()
    data = _data()
    monkeypatch.setattr(_low_rank, "SWITCH_MIN_WEIGHTS", 144)  # a 12 x 12 layer may switch
    monkeypatch.setattr(_low_rank, "RANK_RATIO", 1.5)  # limit 9: factored 1 step, then dense
    assert _low_rank.rank_limit(12, 12) == 9
    switched = _run(net, mse_loss, data, policy=None, lr=0.1)
    assert switched[2]["layers.1.weight"] is torch.Tensor
    monkeypatch.setattr(_low_rank, "RANK_RATIO", 3.0)  # limit 18: factored throughout
    kept = _run(net, mse_loss, data, policy=None, lr=0.1)
    assert kept[2]["layers.1.weight"] is LowRankWeight
    dense = _run(net, mse_loss, data, policy=False, lr=0.1)
    _assert_same(switched, dense)
    _assert_same(kept, dense)


def test_only_wide_layers_switch_half_way():
    """Rank 10 a step: a 128 x 128 layer (limit 64) is factored for 6 steps and dense from
    the start beyond; a 256 x 256 layer (limit 128) is factored up to 12 steps and switches
    half-way up to 25 (twice the limit)."""
    for width, factored_up_to, switched_up_to in ((128, 6, 6), (256, 12, 25)):
        net = MLP(1, 1, (width, width))
        params = dict(net.named_parameters())
        path = make_grad_fn(net, "mlp", mse_loss).path
        for steps in (1, factored_up_to, factored_up_to + 1, switched_up_to,
                      switched_up_to + 1):
            rates = [{n: 0.1 for n in params}] * steps
            got = _low_rank.low_rank_layers(path, params, list(params), rates, 10)
            assert ("layers.1.weight" in got) == (steps <= switched_up_to), (width, steps)


def test_narrow_layers_tensor_rates_and_single_tasks_stay_dense():
    net = _net()
    params = dict(net.named_parameters())
    path = make_grad_fn(net, "mlp", mse_loss).path
    names = list(params)
    rates = [{n: 0.1 for n in names}] * 2
    # by default only the 12 x 12 layer can be factored, and only with few rows
    one_step = rates[:1]
    assert set(_low_rank.low_rank_layers(path, params, names, one_step, 5)) == {
        "layers.1.weight"
    }
    assert _low_rank.low_rank_layers(path, params, names, one_step, 7) == {}
    # two steps of 5 rows would pass the limit of 6 of this small layer: dense from the start
    assert _low_rank.low_rank_layers(path, params, names, rates, 5) == {}
    meta_sgd = [{n: torch.full_like(p, 0.1) for n, p in params.items()}] * 2
    assert _low_rank.low_rank_layers(path, params, names, meta_sgd, 5, policy=True) == {}
    X, y, _, _ = _data(n_tasks=1)
    phi = inner_loop(make_forward(net, "mlp"), mse_loss, params, X, y, steps=2, lr=0.1,
                     grad_fn=make_grad_fn(net, "mlp", mse_loss), shared=True,
                     factored=True, low_rank=True)
    assert all(isinstance(v, torch.Tensor) and v.shape[0] == 1 for v in phi.values())


def test_low_rank_weight_is_its_dense_sum():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 4, generator=g, dtype=torch.float64)
    w = LowRankWeight(base, torch.randn(3, 2, 5, generator=g, dtype=torch.float64),
                      torch.randn(3, 2, 4, generator=g, dtype=torch.float64))
    w = w.appended(torch.randn(3, 1, 5, generator=g, dtype=torch.float64),
                   torch.randn(3, 1, 4, generator=g, dtype=torch.float64))
    dense = base + w.left.mT @ w.right
    assert w.rank == 3 and w.shape == (3, 5, 4) and "rank=3" in repr(w)
    torch.testing.assert_close(w.dense(), dense)
    h = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    d = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(w.linear(h, bias), h @ dense.mT + bias[:, None])
    torch.testing.assert_close(w.linear(h, bias[0]), h @ dense.mT + bias[0])
    torch.testing.assert_close(w.backward_input(d), d @ dense)


def _tasks(n=6, k=5, q=6, seed=2):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.uniform(-3, 3, (k + q, 2))
        y = np.sin(x[:, 0] * rng.uniform(0.5, 2)) + 0.3 * x[:, 1]
        out.append(Task(x[:k], y[:k], x[k:], y[k:]))
    return out


def _learner(algorithm, low_rank, steps=3):
    torch.manual_seed(0)
    algorithm = get_algorithm(algorithm)
    own = algorithm.default_module(2, 1, (16, 16), "relu")  # CAVIA's context network
    net = MLP(2, 1, (16, 16)) if own is None else own[0]
    return MetaLearner(net, loss="mse", algorithm=algorithm, inner_lr=0.05, inner_steps=steps,
                       dtype=torch.float64, low_rank=low_rank)


ALGORITHMS = ["maml", "fomaml", "anil", "metasgd", "reptile", "imaml", "cavia", "mamlpp",
              MAMLPlusPlus(multi_step_loss=True, learn_inner_lr=True)]


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=str)
def test_every_algorithms_meta_gradients_and_evaluation_are_unchanged(algorithm):
    batch = TaskBatch.from_tasks(_tasks(), dtype=torch.float64)  # a list of batches
    results = []
    for policy in (False, True):
        learner = _learner(algorithm, policy)
        loss, grads = learner.meta_gradients(batch)
        results.append((float(loss), grads, learner.evaluate(_tasks(seed=5))))
    (l0, g0, e0), (l1, g1, e1) = results
    assert l1 == pytest.approx(l0, rel=1e-10)
    assert e1 == pytest.approx(e0, rel=1e-10)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_learner_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match="low_rank must be None, True or False"):
        _learner("maml", "yes")
