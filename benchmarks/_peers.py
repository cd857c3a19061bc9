"""Second-order MAML meta-steps written with other libraries, for ``sinusoid.py --compare``.

Each ``*_step(net, batch, steps, first_order)`` returns a function doing one meta-step
(inner SGD at lr 0.01, query MSE averaged over the tasks, Adam 1e-3) on the same batch
from the same initial weights. learn2learn and higher are used where installed (neither
is a dependency of metafit): learn2learn 0.2.0 is loaded without its dataset modules,
which import torchvision and requests; only ``learn2learn.algorithms.maml`` and
``learn2learn.utils`` are needed for MAML.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import types

import torch
from torch.func import functional_call, grad, vmap

from metafit.tasks import TaskBatch

LR = 0.01


def interleaved_ms(fns: dict, repeats: int, seconds: float) -> dict[str, list[float]]:
    """CPU ms per call of each function (``time.thread_time``), one entry per repeat: the
    functions take turns, each for at least ``seconds``, after one warm-up call each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            n, start = 0, time.thread_time()
            while True:
                fn()
                n += 1
                elapsed = time.thread_time() - start
                if elapsed > seconds:
                    break
            times[name].append(elapsed / n * 1e3)
    return times


def regression_batch(n_features: int, k: int, n_tasks: int, n_query: int = 10) -> TaskBatch:
    """A meta-batch of random ``y = sin(w . x)`` tasks with ``n_features`` inputs."""
    g = torch.Generator().manual_seed(0)
    Xs = torch.randn(n_tasks, k, n_features, generator=g)
    Xq = torch.randn(n_tasks, n_query, n_features, generator=g)
    w = torch.randn(n_tasks, n_features, generator=g)
    ys = torch.sin((Xs * w[:, None]).sum(-1))
    yq = torch.sin((Xq * w[:, None]).sum(-1))
    return TaskBatch(Xs, ys, Xq, yq)


def _mse(out, y):
    return ((out[..., 0] - y) ** 2).mean()


def _tasks(batch: TaskBatch):
    return [
        (batch.X_support[t], batch.y_support[t], batch.X_query[t], batch.y_query[t])
        for t in range(batch.n_tasks)
    ]


def loop_step(net, batch: TaskBatch, steps: int, first_order: bool):
    """A plain per-task Python loop: ``functional_call`` and ``autograd.grad``."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    data = _tasks(batch)

    def step():
        theta = dict(net.named_parameters())
        total = 0.0
        for Xs, ys, Xq, yq in data:
            phi = theta
            for _ in range(steps):
                loss = _mse(functional_call(net, phi, (Xs,)), ys)
                grads = torch.autograd.grad(loss, list(phi.values()), create_graph=not first_order)
                phi = {k: v - LR * g for (k, v), g in zip(phi.items(), grads)}
            total = total + _mse(functional_call(net, phi, (Xq,)), yq) / len(data)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def func_step(net, batch: TaskBatch, steps: int, first_order: bool):
    """The torch.func recipe: ``vmap`` over tasks of an inner loop of ``torch.func.grad``."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def support_loss(params, x, y):
        return _mse(functional_call(net, params, (x,)), y)

    def query_loss(params, xs, ys, xq, yq):
        phi = params
        for _ in range(steps):
            g = grad(support_loss)(phi, xs, ys)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            phi = {k: phi[k] - LR * g[k] for k in phi}
        return support_loss(phi, xq, yq)

    batched = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))

    def step():
        params = dict(net.named_parameters())
        loss = batched(params, batch.X_support, batch.y_support, batch.X_query,
                       batch.y_query).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _learn2learn_maml():
    """learn2learn's MAML class, or None when learn2learn is not installed."""
    if "learn2learn" not in sys.modules:
        spec = importlib.util.find_spec("learn2learn")
        if spec is None or spec.origin is None:
            return None
        root = os.path.dirname(spec.origin)
        for name, path in (("learn2learn", root), ("learn2learn.algorithms", f"{root}/algorithms")):
            package = types.ModuleType(name)  # bare packages: skip the dataset imports
            package.__path__ = [path]
            sys.modules[name] = package
    from learn2learn.algorithms.maml import MAML

    return MAML


def learn2learn_step(net, batch: TaskBatch, steps: int, first_order: bool):
    MAML = _learn2learn_maml()
    if MAML is None:
        return None
    maml = MAML(net, lr=LR, first_order=first_order)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    data = _tasks(batch)

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for Xs, ys, Xq, yq in data:
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(_mse(learner(Xs), ys))
            total = total + _mse(learner(Xq), yq) / len(data)
        total.backward()
        opt.step()

    return step


def higher_step(net, batch: TaskBatch, steps: int, first_order: bool):
    if importlib.util.find_spec("higher") is None:
        return None
    import higher

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    inner = torch.optim.SGD(net.parameters(), lr=LR)
    data = _tasks(batch)

    def step():
        opt.zero_grad(set_to_none=True)
        for Xs, ys, Xq, yq in data:
            with higher.innerloop_ctx(net, inner, copy_initial_weights=False,
                                      track_higher_grads=not first_order) as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(_mse(fnet(Xs), ys))
                (_mse(fnet(Xq), yq) / len(data)).backward()
        opt.step()

    return step


PEERS = {
    "learn2learn": learn2learn_step,
    "torch.func": func_step,
    "higher": higher_step,
    "loop": loop_step,
}
