"""Tests of metafit.models.Conv4: shapes, batched kernels, BatchNorm per task, estimator use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metafit import MetaInitializedClassifier
from metafit.functional import cross_entropy_loss, inner_loop, make_forward
from metafit.models import Conv4
from metafit.tasks import Task

KERNELS = ("loop", "grouped", "hybrid")


def _net(**kwargs) -> Conv4:
    torch.manual_seed(0)
    kwargs = {"hidden_channels": 6, "input_shape": (1, 12, 12), **kwargs}
    return Conv4(5, **kwargs).double()


def _forward(net: Conv4, how: str):
    """A batched forward: one of the module's kernels or a generic engine strategy."""
    if how in ("vmap", "engine-loop"):
        return make_forward(net, how.removeprefix("engine-"))

    def forward(params, X):
        net.kernel = how
        return net.batched_forward(params, X)

    return forward


def _data(T=3, n_support=5, n_query=10, side=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    Xs = torch.rand(T, n_support, 1, side, side, generator=g, dtype=torch.float64)
    Xq = torch.rand(T, n_query, 1, side, side, generator=g, dtype=torch.float64)
    ys = (torch.arange(n_support) % 5).expand(T, -1)
    yq = (torch.arange(n_query) % 5).expand(T, -1)
    return Xs, ys, Xq, yq


def _meta_grads(net, forward, Xs, ys, Xq, yq, *, steps=2, second_order=True, task=None):
    theta = dict(net.named_parameters())
    phi = inner_loop(
        forward,
        cross_entropy_loss,
        theta,
        Xs,
        ys,
        steps=steps,
        lr=0.4,
        create_graph=second_order,
        shared=True,
    )
    losses = cross_entropy_loss(forward(phi, Xq), yq)
    loss = losses.sum() if task is None else losses[task]
    grads = torch.autograd.grad(loss, list(theta.values()))
    return torch.cat([g.flatten() for g in grads])


# ----------------------------------------------------------------------------- shapes


def test_forward_accepts_images_and_flat_rows():
    net = Conv4(5, hidden_channels=4)
    X = torch.rand(7, 1, 28, 28)
    assert net(X).shape == (7, 5)
    torch.testing.assert_close(net(X.reshape(7, 784)), net(X))
    params = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in net.named_parameters()}
    out = net.batched_forward(params, X.reshape(1, 7, 784).expand(2, -1, -1))
    assert out.shape == (2, 7, 5)


@pytest.mark.parametrize("downsampling", ["stride", "maxpool"])
@pytest.mark.parametrize("pooling", ["mean", "flatten"])
def test_variants_shapes(downsampling, pooling):
    net = Conv4(
        3,
        input_shape=(3, 20, 20),
        hidden_channels=4,
        n_blocks=3,
        downsampling=downsampling,
        pooling=pooling,
    )
    assert net(torch.rand(2, 3, 20, 20)).shape == (2, 3)
    expected = 4 if pooling == "mean" else 4 * 3 * 3
    assert net.head.in_features == expected


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"input_shape": (28, 28)}, ValueError, "input_shape"),
        ({"input_shape": (1, 0, 28)}, ValueError, "input_shape"),
        ({"hidden_channels": 0}, ValueError, "hidden_channels must be an int >= 1, got 0"),
        ({"n_blocks": 2.5}, TypeError, "n_blocks must be an int >= 1, got 2.5"),
        ({"downsampling": "avg"}, ValueError, "downsampling"),
        ({"pooling": "max"}, ValueError, "pooling"),
        ({"bn_steps": 0}, ValueError, "bn_steps must be an int >= 1 or None, got 0"),
        ({"kernel": "fast"}, ValueError, "kernel"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Conv4(5, **kwargs)


def test_wrong_input_shape_message():
    net = Conv4(5, hidden_channels=4)
    with pytest.raises(ValueError, match="input_shape"):
        net(torch.rand(2, 100))


def test_resolve_kernel_by_device():
    net = Conv4(5)
    assert net.resolve_kernel("cpu") == "loop"
    assert net.resolve_kernel("cuda") == "grouped"
    assert Conv4(5, hidden_channels=16).resolve_kernel("cpu") == "grouped"
    assert Conv4(5, kernel="hybrid").resolve_kernel("cuda") == "hybrid"


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("how", [*KERNELS, "vmap", "engine-loop"])
def test_batched_forward_equals_per_task_module(how):
    net = _net()
    T = 3
    g = torch.Generator().manual_seed(1)
    params = {
        k: v.detach() + 0.1 * torch.randn(T, *v.shape, generator=g, dtype=v.dtype)
        for k, v in net.named_parameters()
    }
    X = _data(T)[2]
    out = _forward(net, how)(params, X)
    for t in range(T):
        single = torch.func.functional_call(net, {k: v[t] for k, v in params.items()}, (X[t],))
        torch.testing.assert_close(out[t], single, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
def test_shared_parameters_equal_expanded(kernel):
    net = _net(kernel=kernel)
    shared = {k: v.detach() for k, v in net.named_parameters()}
    X = _data(2)[2]
    expanded = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in shared.items()}
    torch.testing.assert_close(net.batched_forward(shared, X), net.batched_forward(expanded, X))


@pytest.mark.parametrize("how", [*KERNELS, "vmap"])
def test_second_order_meta_gradients_with_batchnorm_match_per_task_loop(how):
    # The trap: vmapped F.batch_norm gave second-order gradients 6e-3 off.
    net = _net()
    data = _data()
    reference = _meta_grads(net, _forward(net, "engine-loop"), *data)
    grads = _meta_grads(net, _forward(net, how), *data)
    assert float((grads - reference).norm() / reference.norm()) < 1e-6


@pytest.mark.parametrize("how", [*KERNELS, "vmap"])
def test_batchnorm_statistics_never_mix_tasks(how):
    net = _net()
    forward = _forward(net, how)
    Xs, ys, Xq, yq = _data()
    other_s, other_q = Xs.clone(), Xq.clone()
    other_s[1] = 5.0 * other_s[1] + 3.0  # task 1 gets very different statistics
    other_q[1] = -2.0 * other_q[1]
    theta = {k: v.detach() for k, v in net.named_parameters()}
    out_a = forward(theta, Xq)
    out_b = forward(theta, other_q)
    torch.testing.assert_close(out_a[[0, 2]], out_b[[0, 2]], rtol=0, atol=1e-12)
    assert not torch.allclose(out_a[1], out_b[1])
    g_a = _meta_grads(net, forward, Xs, ys, Xq, yq, task=0)
    g_b = _meta_grads(net, forward, other_s, ys, other_q, yq, task=0)
    torch.testing.assert_close(g_a, g_b, rtol=0, atol=1e-12)


def test_per_step_batchnorm_sets():
    net = _net(bn_steps=3)
    assert net.norms[0].weight.shape == (3, 6)
    with torch.no_grad():
        for norm in net.norms:
            norm.weight.copy_(torch.rand(3, 6, dtype=torch.float64) + 0.5)
    X = _data(1)[2][0]
    outs = [net(X, step=k) for k in range(4)]
    assert not torch.allclose(outs[0], outs[1])
    torch.testing.assert_close(outs[3], outs[2])  # steps past the last reuse the last set
    params = {k: v.unsqueeze(0) for k, v in net.named_parameters()}
    for kernel in KERNELS:
        net.kernel = kernel
        torch.testing.assert_close(net.batched_forward(params, X[None], step=1)[0], outs[1])


# ----------------------------------------------------------------------------- estimator


def _digit_tasks(n, seed):
    from metafit.datasets import load_digits_tasks

    return load_digits_tasks(5, 1, 5, random_state=seed, as_images=True).sample(n)


def test_conv4_as_estimator_module_roundtrip(tmp_path):
    est = MetaInitializedClassifier(
        module=Conv4,
        module__input_shape=(1, 8, 8),
        module__hidden_channels=8,
        module__n_blocks=2,
        inner_lr=0.4,
        inner_steps=1,
        meta_batch_size=4,
        meta_iterations=3,
        random_state=0,
    )
    est.meta_fit(_digit_tasks(12, 0))
    task = _digit_tasks(1, 1)[0]
    proba = est.fit(task.X_support, task.y_support).predict_proba(task.X_query)
    assert proba.shape == (25, 5)
    flat = Task(
        task.X_support.reshape(5, 64), task.y_support, task.X_query.reshape(25, 64), task.y_query
    )
    proba_flat = est.fit(flat.X_support, flat.y_support).predict_proba(flat.X_query)
    np.testing.assert_allclose(proba_flat, proba, rtol=1e-5, atol=1e-6)
    path = tmp_path / "conv4.safetensors"
    est.save_meta_init(path)
    loaded = MetaInitializedClassifier(meta_init=path, inner_lr=0.4, inner_steps=1)
    np.testing.assert_allclose(
        loaded.fit(task.X_support, task.y_support).predict_proba(task.X_query),
        proba,
        rtol=1e-5,
        atol=1e-6,
    )
