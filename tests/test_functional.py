"""The functional core: forwards, analytic inner gradients, the inner loop, its memory."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch import nn

from metafit.functional import (
    LOSSES,
    expand_params,
    head_parameter_names,
    inner_loop,
    make_forward,
    make_grad_fn,
    mse_loss,
    reference_inner_loop,
    resolve_strategy,
)
from metafit.models import MLP

T, N = 4, 6


def _net(activation="relu", n_in=3, n_out=2, hidden=(5, 4), seed=0):
    torch.manual_seed(seed)  # tests only: the library never touches the global RNG
    return MLP(n_in, n_out, hidden, activation).double()


def _data(loss, n_in=3, n_out=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(T, N, n_in, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, n_out, (T, N), generator=gen)
    elif loss == "mse_1d":
        y = torch.randn(T, N, generator=gen, dtype=torch.float64)
    else:
        y = torch.randn(T, N, n_out, generator=gen, dtype=torch.float64)
    return X, y


def _batched_params(net, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (v.detach().unsqueeze(0) + 0.3 * torch.randn(T, *v.shape, generator=gen, dtype=v.dtype))
        .requires_grad_(True)
        for k, v in net.named_parameters()
    }


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu", "elu"])
@pytest.mark.parametrize("loss", ["mse", "mse_1d", "cross_entropy"])
@pytest.mark.parametrize("shared", [False, True])
def test_analytic_gradient_and_its_derivative_equal_autograd(activation, loss, shared):
    net = _net(activation)
    X, y = _data(loss)
    loss_fn = LOSSES["mse" if loss == "mse_1d" else loss]
    grad_fn = make_grad_fn(net, "mlp", loss_fn)
    forward = make_forward(net, "mlp")
    if shared:
        params = {k: v for k, v in net.named_parameters()}
        expanded = expand_params(params, T)
    else:
        params = expanded = _batched_params(net)
    names = list(params)
    want = torch.autograd.grad(
        loss_fn(forward(expanded, X), y).sum(), [expanded[n] for n in names], create_graph=True
    )
    got = grad_fn(params, X, y, names, -0.5)
    for n, w in zip(names, want):
        assert got[n].shape == (T, *net.get_parameter(n).shape)
        torch.testing.assert_close(got[n], -0.5 * w, rtol=1e-10, atol=1e-12)
    # Second order: derivatives of the gradients agree too.
    probe = {n: torch.randn(got[n].shape, dtype=torch.float64) for n in names}
    inputs = list(params.values())
    d_got = torch.autograd.grad(sum((got[n] * probe[n]).sum() for n in names), inputs)
    d_want = torch.autograd.grad(
        sum((-0.5 * w * probe[n]).sum() for n, w in zip(names, want)), inputs
    )
    for a, b in zip(d_got, d_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_relu_derivative_is_autograds_to_second_order_at_exact_zeros_too():
    """The analytic ReLU derivative multiplies by a constant 0/1 mask: the values of
    threshold_backward (0 where the activation is exactly 0), and a backward that passes
    the incoming gradient through the same mask and sends nothing to the activation."""
    from metafit._mlp_path import _ACTIVATION_GRADS

    z = torch.tensor([[-1.0, 0.0, 2.0], [3.0, -0.0, 0.5]], dtype=torch.float64)
    z = z.requires_grad_(True)
    a = torch.relu(z)
    d = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    got = _ACTIVATION_GRADS["relu"](d, a)
    want = torch.ops.aten.threshold_backward(d, a, 0.0)
    assert torch.equal(got, want)
    assert torch.equal(got, torch.autograd.grad(a, z, d, create_graph=True)[0])
    probe = torch.randn(2, 3, dtype=torch.float64)
    d_got, z_got = torch.autograd.grad(got, [d, z], probe, allow_unused=True)
    assert torch.equal(d_got, torch.ops.aten.threshold_backward(probe, a, 0.0))
    assert z_got is None  # the mask is constant: no second derivative through it


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu", "elu"])
def test_analytic_gradient_without_a_graph_equals_autograd(activation):
    """``fit``'s case: the gradient computed under no_grad (where the ReLU derivative
    takes its one-kernel branch) is autograd's, exact zeros of the activation included."""
    from metafit._mlp_path import _ACTIVATION_GRADS

    net = _net(activation)
    X, y = _data("mse")
    grad_fn = make_grad_fn(net, "mlp", mse_loss)
    forward = make_forward(net, "mlp")
    params = _batched_params(net)
    names = list(params)
    want = torch.autograd.grad(mse_loss(forward(params, X), y).sum(), list(params.values()))
    with torch.no_grad():
        got = grad_fn(params, X, y, names, -0.5)
    for n, w in zip(names, want):
        assert not got[n].requires_grad
        torch.testing.assert_close(got[n], -0.5 * w, rtol=1e-10, atol=1e-12)
    if activation == "relu":
        a = torch.relu(torch.tensor([[-1.0, 0.0, 2.0], [3.0, -0.0, 0.5]], dtype=torch.float64))
        d = torch.randn(2, 3, dtype=torch.float64)
        with torch.no_grad():
            assert torch.equal(_ACTIVATION_GRADS["relu"](d, a), d * (a > 0))


def test_analytic_gradient_of_a_subset_skips_the_rest():
    net = _net()
    X, y = _data("mse")
    grad_fn = make_grad_fn(net, "mlp", mse_loss)
    params = _batched_params(net)
    head = head_parameter_names(net)
    got = grad_fn(params, X, y, head, None)
    assert set(got) == set(head)
    loss = mse_loss(make_forward(net, "loop")(params, X), y).sum()
    want = torch.autograd.grad(loss, [params[n] for n in head])
    for n, w in zip(head, want):
        torch.testing.assert_close(got[n], w)


def test_no_analytic_gradient_for_unknown_losses_or_generic_paths():
    net = _net()
    assert make_grad_fn(net, "mlp", lambda out, y: (out - y).abs().mean((1, 2))) is None
    assert make_grad_fn(net, "vmap", mse_loss) is None
    assert make_grad_fn(net, "loop", mse_loss) is None


class _Generic(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("module", [_net("tanh"), _Generic().double()])
def test_forward_strategies_agree_with_the_module_per_task(module):
    X, _ = _data("mse")
    batched = _batched_params(module)
    shared = dict(module.named_parameters())
    head = head_parameter_names(module)
    mixed = {**shared, **{k: batched[k] for k in head}}  # body shared, head per task
    strategies = ["vmap", "loop"] + (["mlp"] if isinstance(module, MLP) else [])
    call = torch.func.functional_call
    for strategy in strategies:
        forward = make_forward(module, strategy)
        out, out_mixed, out_shared = forward(batched, X), forward(mixed, X), forward(shared, X)
        for t in range(T):
            per_task = {k: v[t] for k, v in batched.items()}
            torch.testing.assert_close(out[t], call(module, per_task, (X[t],)))
            mixed_t = {**shared, **{k: per_task[k] for k in head}}
            torch.testing.assert_close(out_mixed[t], call(module, mixed_t, (X[t],)))
            torch.testing.assert_close(out_shared[t], module(X[t]))


def test_resolve_strategy():
    assert resolve_strategy(_net()) == "mlp"
    assert resolve_strategy(_Generic()) == "vmap"
    g = _Generic()
    g.preferred_forward = "loop"
    assert resolve_strategy(g) == "loop"
    with pytest.raises(ValueError, match="only with metafit.models.MLP"):
        make_forward(_Generic(), "mlp")
    with pytest.raises(ValueError, match="unknown forward strategy 'fast'"):
        make_forward(_net(), "fast")


def test_head_parameter_names_of_a_generic_module():
    assert head_parameter_names(_Generic()) == ["b.weight", "b.bias"]
    with pytest.raises(ValueError, match="no parameters"):
        head_parameter_names(nn.ReLU())


@pytest.mark.parametrize("use_grad_fn", [False, True])
def test_inner_loop_per_step_rates_on_step_and_shared_results(use_grad_fn):
    net = _net()
    X, y = _data("mse")
    forward = make_forward(net, "mlp")
    grad_fn = make_grad_fn(net, "mlp", mse_loss) if use_grad_fn else None
    theta = {k: v.detach() for k, v in net.named_parameters()}
    seen = []
    out = inner_loop(
        forward, mse_loss, theta, X, y, steps=2, lr=[0.1, 0.05], grad_fn=grad_fn, shared=True,
        track_graph=False, on_step=lambda s, p: seen.append((s, p["layers.0.weight"].shape)),
    )
    assert seen == [(0, (T, 5, 3)), (1, (T, 5, 3))]
    # Reference: plain per-task SGD with autograd.
    p = expand_params(theta, T)
    for rate in (0.1, 0.05):
        p = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        g = torch.autograd.grad(mse_loss(forward(p, X), y).sum(), list(p.values()))
        p = {k: v - rate * gg for (k, v), gg in zip(p.items(), g)}
    for k in p:
        torch.testing.assert_close(out[k], p[k].detach())
    np_rates = inner_loop(
        forward, mse_loss, theta, X, y, steps=2, lr=[np.float64(0.1), np.float32(0.05)],
        grad_fn=grad_fn, shared=True, track_graph=False,
    )
    for k in p:
        torch.testing.assert_close(np_rates[k], p[k].detach(), rtol=1e-6, atol=1e-9)
    zero = inner_loop(forward, mse_loss, theta, X, y, steps=0, lr=0.1, shared=True, grad_fn=grad_fn)
    assert all(zero[k].shape == (T, *theta[k].shape) for k in theta)
    kept = inner_loop(
        forward, mse_loss, theta, X, y, steps=1, lr=0.1, shared=True, grad_fn=grad_fn,
        adapt=["layers.2.weight"], keep_shared=True,
    )
    body_shape = theta["layers.0.weight"].shape
    assert kept["layers.0.weight"].shape == (body_shape if use_grad_fn else (T, *body_shape))
    assert kept["layers.2.weight"].shape == (T, *theta["layers.2.weight"].shape)


# --------------------------------------------------------------------------- memory


def _retained_graph_bytes(fn):
    """Bytes of tensors that autograd saved while ``fn`` ran and still holds after it.

    Every tensor saved for backward is wrapped; a weak reference tells whether the graph
    that saved it is still alive once ``fn`` returns its result.
    """

    class Saved:
        def __init__(self, t):
            self.t = t

    refs = []

    def pack(t):
        box = Saved(t)
        refs.append((weakref.ref(box), t.numel() * t.element_size()))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        result = fn()
    return sum(size for ref, size in refs if ref() is not None), result


@pytest.mark.parametrize("use_grad_fn", [False, True])
def test_first_order_memory_is_flat_in_steps_second_order_grows(use_grad_fn):
    net = MLP(1, 1, (32, 32))
    X, y = torch.randn(8, 10, 1), torch.randn(8, 10)
    forward = make_forward(net, "mlp")
    grad_fn = make_grad_fn(net, "mlp", mse_loss) if use_grad_fn else None
    theta = dict(net.named_parameters())

    def retained(steps, **kw):
        size, phi = _retained_graph_bytes(
            lambda: inner_loop(
                forward, mse_loss, theta, X, y, steps=steps, lr=0.01, grad_fn=grad_fn,
                shared=True, **kw
            )
        )
        assert all(v.requires_grad == kw.get("track_graph", True) for v in phi.values())
        return size

    first = [retained(s) for s in (1, 5, 10)]
    second = [retained(s, create_graph=True) for s in (1, 5, 10)]
    detached = [retained(s, track_graph=False) for s in (1, 5, 10)]
    assert first[0] == first[1] == first[2]
    assert detached == [0, 0, 0]
    assert second[0] > 0 and second[1] > 4 * second[0] and second[2] > 1.8 * second[1]


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu", "elu"])
def test_mlp_forward_equals_the_module_for_every_activation(activation):
    net = _net(activation)
    X, _ = _data("mse")
    out = make_forward(net, "mlp")(dict(net.named_parameters()), X)
    for t in range(T):
        torch.testing.assert_close(out[t], net(X[t]))


# --------------------------------------------------------------------------- one task


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("loss", ["mse", "mse_1d", "cross_entropy"])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("shared", [True, False])
def test_single_task_loop_equals_that_task_in_a_batch_to_second_order(
    activation, loss, adapt, shared
):
    """T = 1 drops the task dimension inside the loop; values and meta-gradients agree."""
    net = _net(activation)
    X, y = _data(loss)
    loss_fn = LOSSES["mse" if loss == "mse_1d" else loss]
    forward, grad_fn = make_forward(net, "mlp"), make_grad_fn(net, "mlp", loss_fn)
    theta = dict(net.named_parameters())
    names = head_parameter_names(net) if adapt == "head" else None
    kw = dict(steps=3, lr=0.3, adapt=names, create_graph=True, grad_fn=grad_fn)

    def run(t, n_tasks):
        Xt, yt = X[t : t + n_tasks], y[t : t + n_tasks]
        start = theta if shared else expand_params(theta, n_tasks)
        phi = inner_loop(forward, loss_fn, start, Xt, yt, shared=shared, **kw)
        assert all(v.shape[0] == n_tasks for v in phi.values())
        query = loss_fn(forward(phi, Xt), yt)[0]  # the first task's post-adaptation loss
        return phi, torch.autograd.grad(query, list(theta.values()), allow_unused=True)

    one, d_one = run(1, 1)
    many, d_many = run(1, 3)
    for k in theta:
        torch.testing.assert_close(one[k][0], many[k][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(d_one, d_many):
        if b is None:
            assert a is None or float(a.abs().max()) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # and plain autograd on the one task gives the same adapted parameters
    ref = inner_loop(
        forward, loss_fn, theta, X[1:2], y[1:2], shared=True, **{**kw, "grad_fn": None}
    )
    for k in theta:
        torch.testing.assert_close(one[k], ref[k], rtol=1e-10, atol=1e-12)


def test_single_task_keep_shared_and_detached_results():
    net = _net()
    X, y = _data("mse")
    forward, grad_fn = make_forward(net, "mlp"), make_grad_fn(net, "mlp", mse_loss)
    theta = dict(net.named_parameters())
    head = head_parameter_names(net)
    kept = inner_loop(
        forward, mse_loss, theta, X[:1], y[:1], steps=2, lr=0.1, adapt=head, grad_fn=grad_fn,
        shared=True, keep_shared=True,
    )
    assert kept["layers.0.weight"] is theta["layers.0.weight"]  # never updated: as given
    assert kept["layers.2.weight"].shape == (1, *theta["layers.2.weight"].shape)
    out = inner_loop(
        forward, mse_loss, theta, X[:1], y[:1], steps=2, lr=0.1, grad_fn=grad_fn, shared=True,
        track_graph=False,
    )
    assert all(v.shape[0] == 1 and not v.requires_grad for v in out.values())
    assert all(not p.grad_fn for p in theta.values())  # the module's tensors are untouched


@pytest.mark.parametrize("n_tasks", [1, 3])
def test_on_step_sees_every_step_even_though_later_steps_update_in_place(n_tasks):
    net = _net()
    X, y = _data("mse")
    forward, grad_fn = make_forward(net, "mlp"), make_grad_fn(net, "mlp", mse_loss)
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    before = {k: v.clone() for k, v in theta.items()}
    seen = []
    kw = dict(lr=0.1, grad_fn=grad_fn, shared=True, track_graph=False)
    Xt, yt = X[:n_tasks], y[:n_tasks]
    final = inner_loop(
        forward, mse_loss, theta, Xt, yt, steps=3, on_step=lambda s, p: seen.append(p), **kw
    )
    for step, params in enumerate(seen):
        want = inner_loop(forward, mse_loss, theta, Xt, yt, steps=step + 1, **kw)
        for k in want:
            torch.testing.assert_close(params[k], want[k], rtol=0, atol=0)
    for k in final:
        torch.testing.assert_close(final[k], seen[-1][k], rtol=0, atol=0)
        assert torch.equal(theta[k], before[k])  # the in-place steps never touch theta


# ------------------------------------------------------------ the reference inner loop


def _rates(kind, net, steps):
    names = [n for n, _ in net.named_parameters()]
    if kind == "number":
        return 0.07
    if kind == "per-name":
        return {n: torch.full((), 0.05 + 0.01 * i, dtype=torch.float64, requires_grad=True)
                for i, n in enumerate(names)}
    return [  # per step, tensors (MAML++)
        {n: torch.tensor(0.04 + 0.01 * k, dtype=torch.float64, requires_grad=True)
         for n in names}
        for k in range(steps)
    ]


@pytest.mark.parametrize("strategy", ["mlp", "vmap", "loop"])
@pytest.mark.parametrize("n_tasks", [1, 3])
@pytest.mark.parametrize("lr_kind", ["number", "per-name", "per-step"])
@pytest.mark.parametrize("head_only", [False, True])
@pytest.mark.parametrize("create_graph", [False, True])
def test_every_fast_path_equals_the_reference_loop(strategy, n_tasks, lr_kind, head_only,
                                                   create_graph):
    """Values and meta-gradients (to theta and the learned rates) of every named fast path
    (shared first step, analytic gradient, one-task loop) against the plain loop."""
    net = _net()
    X, y = _data("mse")
    X, y = X[:n_tasks], y[:n_tasks]
    steps = 3
    forward = make_forward(net, strategy)
    grad_fn = make_grad_fn(net, strategy, mse_loss)
    theta = dict(net.named_parameters())
    adapt = head_parameter_names(net) if head_only else None
    lr = _rates(lr_kind, net, steps)
    ref = reference_inner_loop(forward, mse_loss, expand_params(theta, n_tasks), X, y,
                               steps=steps, lr=lr, adapt=adapt, create_graph=create_graph)
    fast = inner_loop(forward, mse_loss, theta, X, y, steps=steps, lr=lr, adapt=adapt,
                      create_graph=create_graph, grad_fn=grad_fn, shared=True)
    leaves = [*theta.values(), *_rate_leaves(lr)]
    grads = []
    for out in (ref, fast):
        assert set(out) == set(ref)
        for k in ref:
            assert out[k].shape == ref[k].shape
        loss = mse_loss(forward(out, X), y).sum()
        grads.append(torch.autograd.grad(loss, leaves, allow_unused=True))
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().sum()) == 0
            continue
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def _rate_leaves(lr):
    if isinstance(lr, dict):
        return list(lr.values())
    if isinstance(lr, list):
        return [v for step in lr for v in step.values()]
    return []


@pytest.mark.parametrize("strategy", ["mlp", "vmap"])
@pytest.mark.parametrize("n_tasks", [1, 3])
def test_the_no_graph_fast_paths_equal_the_reference_loop(strategy, n_tasks):
    """Outside autograd (fit, Reptile): in-place updates, with and without on_step."""
    net = _net()
    X, y = _data("mse")
    X, y = X[:n_tasks], y[:n_tasks]
    forward = make_forward(net, strategy)
    grad_fn = make_grad_fn(net, strategy, mse_loss)
    theta = dict(net.named_parameters())
    ref = reference_inner_loop(forward, mse_loss, expand_params(theta, n_tasks), X, y,
                               steps=4, lr=0.05)
    seen = []
    for on_step in (None, lambda step, p: seen.append(step)):
        out = inner_loop(forward, mse_loss, theta, X, y, steps=4, lr=0.05, track_graph=False,
                         grad_fn=grad_fn, shared=True, on_step=on_step)
        for k in ref:
            assert not out[k].requires_grad
            torch.testing.assert_close(out[k], ref[k].detach(), rtol=1e-10, atol=1e-12)
    assert seen == [0, 1, 2, 3]


def test_a_step_dependent_forward_gets_the_step_index():
    net = _net()
    X, y = _data("mse")
    forward = make_forward(net, "vmap")
    calls = []

    def step_forward(params, X, step):
        calls.append(step)
        return forward(params, X) * (1.0 + 0.1 * step)

    theta = dict(net.named_parameters())
    ref = reference_inner_loop(forward, mse_loss, expand_params(theta, T), X, y, steps=3,
                               lr=0.05, step_forward=step_forward)
    assert calls == [0, 1, 2]
    out = inner_loop(forward, mse_loss, theta, X, y, steps=3, lr=0.05, shared=True,
                     grad_fn=make_grad_fn(net, "mlp", mse_loss), step_forward=step_forward)
    assert calls == [0, 1, 2, 0, 1, 2]
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-10, atol=1e-12)
