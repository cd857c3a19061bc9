"""The functional core: batched forward passes, task losses and the one inner loop.

Parameters carry a leading *task* dimension ``T``: the inner loop adapts ``T`` copies of
the parameters at once, one per task of a meta-batch, and the meta-gradient flows back into
the shared initialization. A parameter may also be passed *shared*, without the task
dimension (its module shape): every forward below then uses the one tensor for all tasks.
The inner loop starts from the shared initialization, so its first forward is an ordinary
batched matrix product over all tasks' rows, and the first update broadcasts it into ``T``
per-task copies. ``fit`` on a single task is the same code with ``T = 1``.

Three forward strategies share one signature, ``forward(params, X) -> outputs`` with
``params[name]`` of shape ``(T, *param_shape)`` or ``param_shape``, ``X`` of shape
``(T, n, *features)`` and outputs of shape ``(T, n, n_outputs)``:

- ``"mlp"``: a hand-batched forward for :class:`metafit.models.MLP` (``F.linear`` for
  shared layers, one ``baddbmm`` per adapted layer), the fastest path on a CPU;
- ``"vmap"``: :func:`torch.func.vmap` over :func:`torch.func.functional_call`, for any
  ``nn.Module``;
- ``"loop"``: a Python loop over tasks calling ``functional_call``; slower for small
  models but sometimes faster for convolutions on a CPU, where batched kernels are poor.

The inner gradient comes from a *gradient function* when the strategy has one (see
:func:`make_grad_fn`), else from one ``torch.autograd.grad`` call on the sum of the task
losses (task ``t``'s loss depends only on copy ``t``). The ``"mlp"`` strategy computes the
gradient of the MSE and cross-entropy losses by explicit backpropagation with batched
matrix products; the result is an ordinary differentiable expression, so second-order
MAML needs a single backward pass instead of a double backward. It equals
``torch.autograd.grad`` to rounding (tested in float64).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = [
    "Params",
    "BatchedForward",
    "GradFn",
    "make_forward",
    "make_grad_fn",
    "resolve_strategy",
    "mse_loss",
    "cross_entropy_loss",
    "LOSSES",
    "expand_params",
    "inner_loop",
    "head_parameter_names",
]

Params = dict[str, Tensor]
BatchedForward = Callable[[Mapping[str, Tensor], Tensor], Tensor]
#: ``grad_fn(params, X, y, names, scale) -> {name: scale * d(sum_t loss_t)/d params[name]}``
#: for the names in ``names``; every result has the task dimension. ``scale`` None means 1.
GradFn = Callable[[Mapping[str, Tensor], Tensor, Tensor, Sequence[str], "float | None"], Params]
LearningRate = float | Tensor | Mapping[str, Tensor]


# --------------------------------------------------------------------------- losses


def mse_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per task.

    Parameters
    ----------
    outputs : Tensor of shape (T, n, n_outputs)
    y : Tensor of shape (T, n) or (T, n, n_outputs)
        With 2-D targets, only the first output column is compared.

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


def _mse_output_grad(out: Tensor, y: Tensor, scale: float) -> Tensor:
    n = out.shape[1]
    if y.dim() == 2:
        if out.shape[-1] == 1:
            return (out - y.unsqueeze(-1)) * (2.0 * scale / n)
        d = (out[..., :1] - y.unsqueeze(-1)) * (2.0 * scale / n)
        return F.pad(d, (0, out.shape[-1] - 1))
    return (out - y) * (2.0 * scale / (n * out.shape[-1]))


def _cross_entropy_output_grad(out: Tensor, y: Tensor, scale: float) -> Tensor:
    onehot = F.one_hot(y, out.shape[-1]).to(out.dtype)
    return (torch.softmax(out, -1) - onehot) * (scale / out.shape[1])


#: d(sum over tasks of the loss)/d(outputs), times ``scale``, for the built-in losses.
_OUTPUT_GRADS: dict[Callable, Callable[[Tensor, Tensor, float], Tensor]] = {
    mse_loss: _mse_output_grad,
    cross_entropy_loss: _cross_entropy_output_grad,
}


# --------------------------------------------------------------------------- forwards

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "elu": F.elu,
}

# Derivatives as (grad, pre-activation z, activation a) -> grad * act'(z). The aten
# backward kernels are themselves differentiable, which second-order MAML needs.
_ACTIVATION_GRADS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "relu": lambda d, z, a: torch.ops.aten.threshold_backward(d, a, 0.0),
    "tanh": lambda d, z, a: torch.ops.aten.tanh_backward(d, a),
    "sigmoid": lambda d, z, a: torch.ops.aten.sigmoid_backward(d, a),
    "gelu": lambda d, z, a: torch.ops.aten.gelu_backward(d, z),
    "elu": lambda d, z, a: torch.ops.aten.elu_backward(d, 1.0, 1, 1, False, z),
}


def _linear(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``h @ w.T + b`` for batched ``h`` (T, n, in) and shared or batched ``w``, ``b``."""
    if w.dim() == 2:
        if b.dim() == 1:
            return F.linear(h, w, b)
        return F.linear(h, w) + b.unsqueeze(1)
    return torch.baddbmm(b.unsqueeze(-2), h, w.mT)


class _MLPPath:
    """Hand-batched forward and analytic loss gradient of :class:`metafit.models.MLP`."""

    def __init__(self, names: Sequence[tuple[str, str]], activation: str):
        self.names = list(names)
        self.act = _ACTIVATIONS[activation]
        self.act_grad = _ACTIVATION_GRADS[activation]

    def forward(self, params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        h = X.flatten(2) if X.dim() > 3 else X
        last = len(self.names) - 1
        for i, (w, b) in enumerate(self.names):
            h = _linear(h, params[w], params[b])
            if i < last:
                h = self.act(h)
        return h

    def loss_grad(
        self,
        output_grad: Callable[[Tensor, Tensor, float], Tensor],
        params: Mapping[str, Tensor],
        X: Tensor,
        y: Tensor,
        names: Sequence[str],
        scale: float | None,
    ) -> Params:
        wanted = set(names)
        need = [w in wanted or b in wanted for w, b in self.names]
        if not any(need):
            return {}
        first = need.index(True)
        last = len(self.names) - 1
        h = X.flatten(2) if X.dim() > 3 else X
        inputs, pre, post = [], [], []
        for i, (w, b) in enumerate(self.names):
            inputs.append(h)
            h = _linear(h, params[w], params[b])
            if i < last:
                pre.append(h)
                h = self.act(h)
                post.append(h)
        d = output_grad(h, y, 1.0 if scale is None else float(scale))
        grads: Params = {}
        for i in range(last, first - 1, -1):
            wn, bn = self.names[i]
            if wn in wanted:
                grads[wn] = torch.bmm(d.mT, inputs[i])
            if bn in wanted:
                grads[bn] = d.sum(1)
            if i > first:
                w = params[wn]
                d = torch.matmul(d, w) if w.dim() == 2 else torch.bmm(d, w)
                d = self.act_grad(d, pre[i - 1], post[i - 1])
        return grads


def _shared_flags(module: nn.Module) -> Callable[[Mapping[str, Tensor]], dict[str, int | None]]:
    """Map a parameter dict to vmap ``in_dims``: None for shared tensors, else 0."""
    ndim = {name: p.dim() for name, p in module.named_parameters()}

    def in_dims(params: Mapping[str, Tensor]) -> dict[str, int | None]:
        return {k: (None if v.dim() == ndim.get(k, -1) else 0) for k, v in params.items()}

    return in_dims


def _vmap_forward(module: nn.Module) -> BatchedForward:
    buffers = dict(module.named_buffers())
    in_dims = _shared_flags(module)
    cache: dict[tuple, Callable] = {}

    def single(params, x):
        state = {**params, **buffers} if buffers else params
        return functional_call(module, state, (x,), tie_weights=False)

    def forward(params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        dims = in_dims(params)
        key = tuple(dims.items())
        if key not in cache:
            # randomness="different": each task draws its own dropout masks, as a loop would.
            cache[key] = vmap(single, in_dims=(dims, 0), randomness="different")
        return cache[key](params, X)

    return forward


def _loop_forward(module: nn.Module) -> BatchedForward:
    buffers = dict(module.named_buffers())
    ndim = {name: p.dim() for name, p in module.named_parameters()}

    def forward(params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        outs = []
        for t in range(X.shape[0]):
            p = {k: (v if v.dim() == ndim.get(k, -1) else v[t]) for k, v in params.items()}
            state = {**p, **buffers} if buffers else p
            outs.append(functional_call(module, state, (X[t],), tie_weights=False))
        return torch.stack(outs)

    return forward


def resolve_strategy(module: nn.Module, strategy: str = "auto") -> str:
    """The concrete forward strategy ``"auto"`` stands for with ``module``.

    ``"auto"`` picks ``"mlp"`` for :class:`metafit.models.MLP`, otherwise the module's
    ``preferred_forward`` attribute if it has one, else ``"vmap"``. ``"module"`` uses the
    module's own ``batched_forward(params, X)`` (same contract as the other strategies).

    Raises
    ------
    ValueError
        If the strategy is unknown, or ``"mlp"`` is asked for another module.
    """
    from metafit.models import MLP  # local: models imports this module's helpers

    if strategy == "auto":
        default = "mlp" if isinstance(module, MLP) else "vmap"
        strategy = default if default == "mlp" else getattr(module, "preferred_forward", default)
    if strategy not in ("mlp", "vmap", "loop", "module"):
        raise ValueError(
            f"unknown forward strategy {strategy!r}; use auto, mlp, vmap, loop or module."
        )
    if strategy == "module" and not callable(getattr(module, "batched_forward", None)):
        raise ValueError("strategy='module' needs a module with batched_forward(params, X).")
    if strategy == "mlp" and not isinstance(module, MLP):
        raise ValueError("strategy='mlp' works only with metafit.models.MLP; use 'vmap'.")
    return strategy


def make_forward(module: nn.Module, strategy: str = "auto") -> BatchedForward:
    """Return a batched forward function for ``module``.

    Parameters
    ----------
    module : nn.Module
        The network. Its own parameters are ignored by the returned function, which takes
        the parameters as its first argument.
    strategy : {"auto", "mlp", "vmap", "loop"}, default="auto"
        See :func:`resolve_strategy`.

    Returns
    -------
    callable
        ``forward(params, X)`` with a leading task dimension on ``X`` and on every
        parameter that is not shared.
    """
    strategy = resolve_strategy(module, strategy)
    if strategy == "mlp":
        return _MLPPath(module.weight_bias_names(), module.activation).forward
    if strategy == "vmap":
        return _vmap_forward(module)
    if strategy == "module":  # the module batches the tasks itself (metafit.models.Conv4)
        return module.batched_forward
    return _loop_forward(module)


def make_grad_fn(
    module: nn.Module, strategy: str, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> GradFn | None:
    """The inner-loop gradient function of a strategy, or None for plain autograd.

    ``"mlp"`` has an analytic gradient for the built-in losses (:data:`LOSSES`); the
    others use ``torch.autograd.grad`` (a ``vmap(torch.func.grad(...))`` gradient was
    measured slower than autograd over the vmapped forward, whose backward runs outside
    vmap).
    """
    strategy = resolve_strategy(module, strategy)
    if strategy == "mlp":
        output_grad = _OUTPUT_GRADS.get(loss_fn)
        if output_grad is None:
            return None
        path = _MLPPath(module.weight_bias_names(), module.activation)

        def grad_fn(params, X, y, names, scale):
            return path.loss_grad(output_grad, params, X, y, names, scale)

        return grad_fn
    return None


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


def _is_number(rate) -> bool:
    return isinstance(rate, numbers.Real) and not isinstance(rate, bool)


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
    grad_fn: GradFn | None = None,
    shared: bool = False,
    keep_shared: bool = False,
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
        Parameters with a leading task dimension (or without it if ``shared``). Those in
        ``adapt`` must require grad (or be part of a graph that does) when a meta-gradient
        is wanted.
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
    grad_fn : callable, optional
        Gradient function of the forward strategy (:func:`make_grad_fn`), used instead
        of ``torch.autograd.grad``; it must give the same numbers.
    shared : bool, default=False
        ``params`` have no task dimension: they are the one initialization shared by all
        ``T`` tasks. With ``grad_fn`` the first step then runs on the shared tensors and
        its update creates the per-task copies; without, they are expanded up front.
    keep_shared : bool, default=False
        Return parameters that were never updated (ANIL's body) without the task
        dimension, for forwards of this module, which accept both. By default every
        returned tensor has the task dimension.

    Returns
    -------
    dict of str to Tensor
        The adapted parameters.
    """
    names = list(params) if adapt is None else list(adapt)
    per_step = isinstance(lr, Sequence) and not isinstance(lr, (str, Tensor))
    n_tasks = X.shape[0]
    current: Params = dict(params)
    if shared and grad_fn is None:
        current = expand_params(current, n_tasks)
        shared = False
    unbatched = set(current) if shared else set()
    if not track_graph:
        current = {k: v.detach() for k, v in current.items()}
    for step in range(steps):
        rate = lr[step] if per_step else lr
        if grad_fn is not None:
            # Second order needs a differentiable gradient; otherwise it is a constant.
            number = _is_number(rate)
            with torch.set_grad_enabled(create_graph and track_graph):
                # A number is folded into the gradient: the update is one addition.
                grads = grad_fn(current, X, y, names, -float(rate) if number else None)
            with torch.set_grad_enabled(track_graph):
                for n in names:
                    current[n] = (
                        current[n] + grads[n]
                        if number
                        else torch.addcmul(current[n], _rate(rate, n), grads[n], value=-1)
                    )
        else:
            with torch.enable_grad():
                leaves = {
                    n: (v if track_graph and v.requires_grad else v.detach().requires_grad_(True))
                    for n, v in ((n, current[n]) for n in names)
                }
                loss = loss_fn(forward({**current, **leaves}, X), y).sum()
                grads = torch.autograd.grad(
                    loss, list(leaves.values()), create_graph=create_graph and track_graph
                )
            with torch.set_grad_enabled(track_graph):
                for n, g in zip(names, grads):
                    r = _rate(rate, n)
                    current[n] = (
                        torch.add(current[n], g, alpha=-float(r))
                        if _is_number(r)
                        else torch.addcmul(current[n], r, g, value=-1)
                    )
        unbatched.difference_update(names)
        if on_step is not None:
            on_step(step, current if keep_shared else _batched(current, unbatched, n_tasks))
    return current if keep_shared else _batched(current, unbatched, n_tasks)


def _batched(current: Params, unbatched: set[str], n_tasks: int) -> Params:
    if not unbatched:
        return current
    return {
        k: (v.unsqueeze(0).expand(n_tasks, *v.shape) if k in unbatched else v)
        for k, v in current.items()
    }
