"""The functional core: batched forward passes, task losses and the one inner loop.

Every tensor of parameters here carries a leading *task* dimension ``T``: the inner loop
adapts ``T`` copies of the parameters at once, one per task of a meta-batch, and the
meta-gradient flows back into the shared initialization through the ``expand`` that made
those copies. ``fit`` on a single task is the same code with ``T = 1``.

Three forward strategies share one signature, ``forward(params, X) -> outputs`` with
``params[name]`` of shape ``(T, *param_shape)``, ``X`` of shape ``(T, n, *features)`` and
outputs of shape ``(T, n, n_outputs)``:

- ``"mlp"``: a hand-batched forward for :class:`metafit.models.MLP` (one ``baddbmm`` per
  layer), the fastest path on a CPU and the one the benchmarks use;
- ``"vmap"``: :func:`torch.func.vmap` over :func:`torch.func.functional_call`, for any
  ``nn.Module``;
- ``"loop"``: a Python loop over tasks calling ``functional_call``; slower for small
  models but sometimes faster for convolutions on a CPU, where batched kernels are poor.

Whatever the strategy, the gradients of all tasks come from one ``torch.autograd.grad``
call on the sum of the task losses (task ``t``'s loss depends only on copy ``t``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = [
    "Params",
    "BatchedForward",
    "make_forward",
    "mse_loss",
    "cross_entropy_loss",
    "LOSSES",
    "expand_params",
    "inner_loop",
    "head_parameter_names",
]

Params = dict[str, Tensor]
BatchedForward = Callable[[Mapping[str, Tensor], Tensor], Tensor]
LearningRate = float | Tensor | Mapping[str, Tensor]


# --------------------------------------------------------------------------- losses


def mse_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per task.

    Parameters
    ----------
    outputs : Tensor of shape (T, n, n_outputs)
    y : Tensor of shape (T, n) or (T, n, n_outputs)

    Returns
    -------
    Tensor of shape (T,)
    """
    if y.dim() == 2:
        outputs = outputs[..., 0]
    return (outputs - y).pow(2).flatten(1).mean(1)


def cross_entropy_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy per task; ``y`` holds class indices of shape (T, n)."""
    T, n = y.shape
    return F.cross_entropy(outputs.reshape(T * n, -1), y.reshape(-1), reduction="none").view(
        T, n
    ).mean(1)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": mse_loss,
    "cross_entropy": cross_entropy_loss,
}


# --------------------------------------------------------------------------- forwards

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "elu": F.elu,
}


def _mlp_forward(names: Sequence[tuple[str, str]], activation: Callable) -> BatchedForward:
    last = len(names) - 1

    def forward(params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        h = X.flatten(2) if X.dim() > 3 else X
        for i, (w, b) in enumerate(names):
            h = torch.baddbmm(params[b].unsqueeze(1), h, params[w].transpose(1, 2))
            if i < last:
                h = activation(h)
        return h

    return forward


def _vmap_forward(module: nn.Module) -> BatchedForward:
    buffers = dict(module.named_buffers())

    def single(params, x):
        return functional_call(module, (params, buffers), (x,))

    # randomness="different": each task draws its own dropout masks, as a loop would.
    batched = vmap(single, in_dims=(0, 0), randomness="different")

    def forward(params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        return batched(dict(params), X)

    return forward


def _loop_forward(module: nn.Module) -> BatchedForward:
    buffers = dict(module.named_buffers())

    def forward(params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        outs = []
        for t in range(X.shape[0]):
            p = {k: v[t] for k, v in params.items()}
            outs.append(functional_call(module, (p, buffers), (X[t],)))
        return torch.stack(outs)

    return forward


def make_forward(module: nn.Module, strategy: str = "auto") -> BatchedForward:
    """Return a batched forward function for ``module``.

    Parameters
    ----------
    module : nn.Module
        The network. Its own parameters are ignored by the returned function, which takes
        the parameters as its first argument.
    strategy : {"auto", "mlp", "vmap", "loop"}, default="auto"
        ``"auto"`` picks ``"mlp"`` for :class:`metafit.models.MLP`, otherwise the
        module's ``preferred_forward`` attribute if it has one, else ``"vmap"``.

    Returns
    -------
    callable
        ``forward(params, X)`` with a leading task dimension on both arguments.
    """
    from metafit.models import MLP  # local: models imports this module's helpers

    if strategy == "auto":
        if isinstance(module, MLP):
            strategy = "mlp"
        else:
            strategy = getattr(module, "preferred_forward", "vmap")
    if strategy == "mlp":
        if not isinstance(module, MLP):
            raise ValueError("strategy='mlp' works only with metafit.models.MLP.")
        return _mlp_forward(module.weight_bias_names(), _ACTIVATIONS[module.activation])
    if strategy == "vmap":
        return _vmap_forward(module)
    if strategy == "loop":
        return _loop_forward(module)
    raise ValueError(f"unknown forward strategy {strategy!r}; use auto, mlp, vmap or loop.")


def head_parameter_names(module: nn.Module) -> list[str]:
    """Names of the parameters of the last submodule that owns parameters (the head).

    ANIL adapts only these in its inner loop. A module may override the choice with a
    ``head_parameter_names()`` method.
    """
    if hasattr(module, "head_parameter_names"):
        return list(module.head_parameter_names())
    last = None
    for name, sub in module.named_modules():
        if any(True for _ in sub.parameters(recurse=False)):
            last = name
    if last is None:
        raise ValueError("the module has no parameters.")
    prefix = f"{last}." if last else ""
    return [prefix + n for n, _ in module.get_submodule(last).named_parameters(recurse=False)]


# --------------------------------------------------------------------------- inner loop


def expand_params(params: Mapping[str, Tensor], n_tasks: int) -> Params:
    """Give every parameter a leading task dimension of size ``n_tasks`` (a view)."""
    return {k: v.unsqueeze(0).expand(n_tasks, *v.shape) for k, v in params.items()}


def _rate(lr: LearningRate, name: str):
    return lr[name] if isinstance(lr, Mapping) else lr


def inner_loop(
    forward: BatchedForward,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    params: Mapping[str, Tensor],
    X: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: LearningRate | Sequence[LearningRate],
    adapt: Sequence[str] | None = None,
    create_graph: bool = False,
    track_graph: bool = True,
    on_step: Callable[[int, Params], None] | None = None,
) -> Params:
    """Adapt batched parameters by ``steps`` steps of gradient descent on ``(X, y)``.

    This is the only inner loop in metafit: meta-training differentiates through it
    (second order), through its parameter path only (first order), or not at all
    (Reptile, ``fit``).

    Parameters
    ----------
    forward : callable
        Batched forward, see :func:`make_forward`.
    loss_fn : callable
        Per-task loss, ``loss_fn(outputs, y) -> Tensor of shape (T,)``.
    params : mapping of str to Tensor
        Parameters with a leading task dimension. Those in ``adapt`` must require grad
        (or be part of a graph that does).
    X, y : Tensor
        Support inputs ``(T, n, ...)`` and targets ``(T, n, ...)``.
    steps : int
        Number of gradient steps; 0 returns ``params`` unchanged.
    lr : float, Tensor, mapping, or a sequence of those
        Learning rate: one for all parameters, one per parameter name (Meta-SGD), or a
        sequence with one entry per step (MAML++). Tensors may require grad, in which
        case they receive meta-gradients.
    adapt : sequence of str, optional
        Names of the parameters to adapt (ANIL adapts only the head); default all.
    create_graph : bool, default=False
        Keep the graph of each inner gradient so that the result can be differentiated
        through them (second-order MAML). Otherwise inner gradients are constants and
        memory stays flat in ``steps``.
    track_graph : bool, default=True
        If False, updates are made outside autograd: the result carries no graph back
        to ``params`` (Reptile, ``fit``).
    on_step : callable, optional
        Called as ``on_step(step, params)`` after every update (multi-step losses,
        adaptation curves).

    Returns
    -------
    dict of str to Tensor
        The adapted parameters, with the same task dimension.
    """
    names = list(params) if adapt is None else list(adapt)
    per_step = isinstance(lr, Sequence) and not isinstance(lr, (str, Tensor))
    current: Params = dict(params)
    if not track_graph:
        current = {
            k: (v.detach().requires_grad_(True) if k in names else v.detach())
            for k, v in current.items()
        }
    for step in range(steps):
        rate = lr[step] if per_step else lr
        loss = loss_fn(forward(current, X), y).sum()
        grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=create_graph)
        if track_graph:
            for n, g in zip(names, grads):
                current[n] = current[n] - _rate(rate, n) * g
        else:
            with torch.no_grad():
                for n, g in zip(names, grads):
                    current[n] = (current[n] - _rate(rate, n) * g).requires_grad_(True)
        if on_step is not None:
            on_step(step, current)
    return current
