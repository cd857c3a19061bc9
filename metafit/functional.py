"""The functional core: batched forward passes, task losses and the one inner loop.

Parameters carry a leading *task* dimension ``T``: the inner loop adapts ``T`` copies of
the parameters at once, one per task of a meta-batch, and the meta-gradient flows back into
the shared initialization. A parameter may also be passed *shared*, without the task
dimension (its module shape): every forward below then uses the one tensor for all tasks.
The inner loop starts from the shared initialization, so its first forward is an ordinary
batched matrix product over all tasks' rows, and the first update broadcasts it into ``T``
per-task copies. ``fit`` on a single task is the same code with ``T = 1``; with a gradient
function that can prepare (the ``"mlp"`` strategy's), the loop then drops the task
dimension altogether: module-shaped parameters, ``F.linear`` and ``mm``, no autograd.

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
losses (task ``t``'s loss depends only on copy ``t``). The ``"mlp"`` strategy's gradient is
analytic (:mod:`metafit._mlp_path`), so second-order MAML needs a single backward pass
instead of a double backward. The losses live in :mod:`metafit.losses` and are re-exported
here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metafit._checks import is_number
from metafit._mlp_path import MLPGradient, MLPPath
from metafit.losses import LOSSES, cross_entropy_loss, mse_loss

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


# --------------------------------------------------------------------------- forwards

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


#: Forward strategies, "auto" first (see :func:`make_forward`).
STRATEGIES = ("auto", "mlp", "vmap", "loop", "module")


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
    if strategy not in STRATEGIES[1:]:
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
    strategy : {"auto", "mlp", "vmap", "loop", "module"}, default="auto"
        See :func:`resolve_strategy`.

    Returns
    -------
    callable
        ``forward(params, X)`` with a leading task dimension on ``X`` and on every
        parameter that is not shared.
    """
    strategy = resolve_strategy(module, strategy)
    if strategy == "mlp":
        return MLPPath(module.weight_bias_names(), module.activation).forward
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
    if strategy == "mlp" and loss_fn in (mse_loss, cross_entropy_loss):
        return MLPGradient(MLPPath(module.weight_bias_names(), module.activation), loss_fn)
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
    return lr[name] if type(lr) is dict or isinstance(lr, Mapping) else lr


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
        of ``torch.autograd.grad``; it must give the same numbers. If it has a
        ``prepare(params, X, y, names, single=False) -> (step, factor)`` method (the
        ``"mlp"`` strategy's), that is called once per loop and ``factor * step(params)``
        gives the gradients; with one task (``T = 1``) the loop then runs on
        module-shaped parameters (``single=True``) and adds the task dimension back at
        the end.
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
    per_step = not is_number(lr) and isinstance(lr, Sequence) and not isinstance(lr, (str, Tensor))
    n_tasks = X.shape[0]
    current: Params = dict(params)
    prepare = getattr(grad_fn, "prepare", None)
    # One task: drop the task dimension for the whole loop (module-shaped parameters,
    # unbatched kernels) and put it back at the end.
    single = prepare is not None and n_tasks == 1
    if shared and grad_fn is None:
        current = expand_params(current, n_tasks)
        shared = False
    if not track_graph:
        # The updates run outside autograd; only what they never touch needs detaching.
        adapted = set(names) if steps > 0 else ()
        current = {
            k: (v.detach() if v.requires_grad and k not in adapted else v)
            for k, v in current.items()
        }
    if single and not shared:
        current = {k: v[0] for k, v in current.items()}
    unbatched = set(current) if shared and not single else set()

    def result(current: Params) -> Params:
        if single:
            kept = set(current).difference(names if steps else ()) if shared and keep_shared else ()
            return {k: (v if k in kept else v.unsqueeze(0)) for k, v in current.items()}
        # A new dict: on_step may keep it while the loop goes on updating ``current``.
        return dict(current) if keep_shared else _batched(current, unbatched, n_tasks)

    if steps <= 0:
        return result(current)
    # Second order needs a differentiable gradient; otherwise it is a constant.
    grad_mode = create_graph and track_graph
    caller_mode = mode = torch.is_grad_enabled()

    def set_mode(wanted: bool) -> None:
        nonlocal mode
        if wanted != mode:
            torch.set_grad_enabled(wanted)
            mode = wanted

    update = _SGDUpdate(names, None if per_step else lr)
    # Outside autograd, once the first step made the adapted tensors the loop's own, later
    # steps update them in place (unless on_step may keep them).
    in_place, own = not track_graph and on_step is None, None
    try:
        if grad_fn is None:
            step_grads, factor = _autograd_step(
                forward, loss_fn, X, y, names, track_graph, grad_mode
            )
        elif prepare is not None:
            set_mode(grad_mode)
            step_grads, factor = prepare(current, X, y, names, single=single)
        else:

            def step_grads(p, scale=None):
                g = grad_fn(p, X, y, names, scale)
                return [g[n] for n in names]

            factor = 1.0
        for step in range(steps):
            rate = lr[step] if per_step else lr  # before the forward (see MAML++'s cursor)
            set_mode(grad_mode)
            if grad_mode and grad_fn is not None:
                # Under a graph, scale the small output gradient inside the gradient
                # function: folded into the updates, the constant would cost a multiply of
                # every parameter-sized gradient in the backward pass.
                number = is_number(rate)
                grads = step_grads(current, -float(rate) * factor if number else factor)
                # The gradients now hold -rate * factor * gradient for a number rate.
                rate_now, factor_now = (1.0, -1.0) if number else (rate, 1.0)
            else:
                grads = step_grads(current)
                rate_now, factor_now = rate, factor
            set_mode(track_graph)
            if own is not None and step > 0:
                update.in_place(own, grads, rate_now, factor_now)
            else:
                update(current, grads, rate_now, factor_now)
                unbatched.difference_update(names)
                if in_place:
                    own = [current[n] for n in names]
            if on_step is not None:
                set_mode(caller_mode)
                on_step(step, result(current))
    finally:
        set_mode(caller_mode)
    return result(current)


def _autograd_step(forward, loss_fn, X, y, names, track_graph, create_graph):
    """The inner gradient by ``torch.autograd.grad``, for strategies without a GradFn."""

    def step_grads(current: Params) -> Sequence[Tensor]:
        with torch.enable_grad():
            leaves = {
                n: (v if track_graph and v.requires_grad else v.detach().requires_grad_(True))
                for n, v in ((n, current[n]) for n in names)
            }
            loss = loss_fn(forward({**current, **leaves}, X), y).sum()
            return torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph)

    return step_grads, 1.0


class _SGDUpdate:
    """``current[n] -= rate_n * factor * grads[n]`` for the adapted names.

    Outside autograd one ``_foreach`` kernel updates every tensor (in place with
    :meth:`in_place`).
    Under autograd the per-tensor ops are used: the ``_foreach`` nodes save their inputs
    for backward, which would keep every step's parameters alive and break the flat
    memory of first order. ``rate`` given here (the same for every step) is inspected
    once; None means it is passed per call.
    """

    def __init__(self, names: list[str], rate):
        self.names = names
        self.fixed = rate is not None
        self.kind = self._kind(rate) if self.fixed else None
        # Meta-SGD's per-parameter rates, looked up once for all steps
        self.rates = [_rate(rate, n) for n in names] if self.kind == "tensors" else None

    def _kind(self, rate) -> str:
        if is_number(rate):
            return "number"
        rates = [_rate(rate, n) for n in self.names]
        return "tensors" if all(isinstance(r, Tensor) for r in rates) else "mixed"

    def __call__(self, current: Params, grads, rate, factor: float) -> None:
        """Replace ``current[n]`` by the updated tensors (out of place)."""
        names = self.names
        kind = self.kind if self.fixed else self._kind(rate)
        params = [current[n] for n in names]
        if not torch.is_grad_enabled() and kind != "mixed":
            if kind == "number":
                new = torch._foreach_add(params, list(grads), alpha=-float(rate) * factor)
            else:  # Meta-SGD, MAML++: tensor rates
                rates = self.rates if self.fixed else [_rate(rate, n) for n in names]
                new = torch._foreach_addcmul(params, rates, list(grads), value=-factor)
        else:
            new = [
                torch.add(p, g, alpha=-float(r) * factor)
                if is_number(r)
                else torch.addcmul(p, r, g, value=-factor)
                for p, r, g in zip(params, (_rate(rate, n) for n in names), grads)
            ]
        for n, v in zip(names, new):
            current[n] = v

    def in_place(self, params: list[Tensor], grads, rate, factor: float) -> None:
        """Update ``params`` (the adapted tensors, in ``names`` order) in place, no graph."""
        kind = self.kind if self.fixed else self._kind(rate)
        if kind == "number":
            torch._foreach_add_(params, list(grads), alpha=-float(rate) * factor)
        elif kind == "tensors":
            rates = self.rates if self.fixed else [_rate(rate, n) for n in self.names]
            torch._foreach_addcmul_(params, rates, list(grads), value=-factor)
        else:
            for p, n, g in zip(params, self.names, grads):
                r = _rate(rate, n)
                if is_number(r):
                    p.add_(g, alpha=-float(r) * factor)
                else:
                    p.addcmul_(r, g, value=-factor)


def _batched(current: Params, unbatched: set[str], n_tasks: int) -> Params:
    if not unbatched:
        return dict(current)
    return {
        k: (v.unsqueeze(0).expand(n_tasks, *v.shape) if k in unbatched else v)
        for k, v in current.items()
    }
