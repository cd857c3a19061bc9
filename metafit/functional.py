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
losses (task ``t``'s loss depends only on copy ``t``). The ``"mlp"`` strategy computes the
gradient of the MSE and cross-entropy losses by explicit backpropagation with batched
matrix products; the result is an ordinary differentiable expression, so second-order
MAML needs a single backward pass instead of a double backward. It equals
``torch.autograd.grad`` to rounding (tested in float64). Its ``prepare`` method does, once
per inner loop, what every step shares (targets, one-hot classes, the frozen layers before
the first adapted one) and leaves the loss's constant factor to the update, which folds it
into the step size: about 20 tensor operations per step for a 2-hidden-layer MLP.
"""

from __future__ import annotations

import functools
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


# --------------------------------------------------------------------------- forwards

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "elu": F.elu,
}


def _kernel(op):
    """The C++ entry point of an aten overload, else the overload itself.

    The Python wrapper costs a frame per call, a measurable share of a few-microsecond
    operation.
    """
    return getattr(op, "_op", op)


_threshold_backward = _kernel(torch.ops.aten.threshold_backward.default)
_tanh_backward = _kernel(torch.ops.aten.tanh_backward.default)
_sigmoid_backward = _kernel(torch.ops.aten.sigmoid_backward.default)
_gelu_backward = _kernel(torch.ops.aten.gelu_backward.default)
_elu_backward = _kernel(torch.ops.aten.elu_backward.default)

# Derivatives as (grad, saved) -> grad * act'(z), one kernel each and no Python frame where
# possible (ReLU: d * (a > 0) in one op instead of two). ``saved`` is the activation's
# output a, or its input z for the activations in _SAVES_INPUT. The aten backward kernels
# are themselves differentiable, which second-order MAML needs.
_ACTIVATION_GRADS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "relu": functools.partial(_threshold_backward, threshold=0.0),
    "tanh": _tanh_backward,
    "sigmoid": _sigmoid_backward,
    "gelu": functools.partial(_gelu_backward, approximate="none"),
    "elu": lambda d, z: _elu_backward(d, 1.0, 1, 1, False, z),
}
_SAVES_INPUT = frozenset({"gelu", "elu"})


def _linear(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``h @ w.T + b`` for batched ``h`` (T, n, in) and shared or batched ``w``, ``b``.

    With a shared ``w`` and ``b`` this is one ``F.linear``, whatever the dimensions of
    ``h`` (a single task's ``(n, in)`` too).
    """
    if w.dim() == 2:
        if b.dim() == 1:
            return F.linear(h, w, b)
        return F.linear(h, w) + b.unsqueeze(1)
    return torch.baddbmm(b.unsqueeze(-2), h, w.mT)


#: A prepared gradient: ``step(params, scale=None) -> raw gradients`` (a list in the order
#: of the adapted names) and the constant ``factor``; the gradient of the summed loss is
#: ``factor * raw``, and ``step(params, s)`` returns ``s * raw``. See
#: :meth:`_MLPGradient.prepare`.
PreparedGrad = tuple[Callable[[Mapping[str, Tensor]], list[Tensor]], float]


class _MLPPath:
    """Hand-batched forward and analytic loss gradient of :class:`metafit.models.MLP`."""

    def __init__(self, names: Sequence[tuple[str, str]], activation: str):
        self.names = list(names)
        self.act = _ACTIVATIONS[activation]
        self.act_grad = _ACTIVATION_GRADS[activation]
        self.saves_input = activation in _SAVES_INPUT
        self._plans: dict[tuple[str, ...], tuple] = {}

    def _plan(self, names: Sequence[str]) -> tuple:
        """``(first, layers)`` for the adapted ``names``, computed once per name set.

        ``first`` is the first layer with an adapted parameter; ``layers`` lists, from
        there on, each layer's index from ``first``, weight and bias names, and the
        positions of their gradients in the result (None where not adapted).
        """
        key = tuple(names)
        plan = self._plans.get(key)
        if plan is None:
            slot = {k: i for i, k in enumerate(key)}
            need = [w in slot or b in slot for w, b in self.names]
            first = need.index(True) if any(need) else len(self.names)
            layers = [
                (i - first, w, b, slot.get(w), slot.get(b))
                for i, (w, b) in enumerate(self.names)
            ][first:]
            plan = self._plans[key] = (first, layers)
        return plan

    def forward(self, params: Mapping[str, Tensor], X: Tensor) -> Tensor:
        h = X.flatten(2) if X.dim() > 3 else X
        last = len(self.names) - 1
        for i, (w, b) in enumerate(self.names):
            h = _linear(h, params[w], params[b])
            if i < last:
                h = self.act(h)
        return h

    def prepare(
        self,
        loss_fn: Callable,
        params: Mapping[str, Tensor],
        X: Tensor,
        y: Tensor,
        names: Sequence[str],
        single: bool = False,
    ) -> PreparedGrad:
        """Precompute what every inner step shares; return the step's gradient function.

        Done once per inner loop: the flattened inputs, the targets in the shape of the
        outputs (or the one-hot classes), and the activations of the layers before the
        first adapted one (ANIL's frozen body), which no step changes. The loss's constant
        factor (``2 / numel`` for the MSE, ``1 / n`` for the mean cross-entropy) is left
        to the caller, who folds it into the step size: one operation less per step.

        With ``single``, ``X`` and ``y`` hold one task (``T = 1``) and every parameter has
        its module shape: the task dimension is dropped and each layer is one
        ``F.linear`` forward and two ``mm`` backward, without batched kernels.
        """
        first, plan = self._plan(names)
        if not plan:
            return (lambda current: []), 1.0
        if single:
            X, y = X[0], y[0]
            h = X.flatten(1) if X.dim() > 2 else X
        else:
            h = X.flatten(2) if X.dim() > 3 else X
        act, act_grad, keep_pre = self.act, self.act_grad, self.saves_input
        for w, b in self.names[:first]:  # the frozen body: once, not every step
            h = act(_linear(h, params[w], params[b]))
        body = h
        n, n_out = h.shape[-2], params[self.names[-1][0]].shape[-2]
        column = y.dim() == h.dim() - 1  # one target per example
        output_grad, target = None, None  # None: the output gradient is ``out - target``
        if loss_fn is mse_loss:
            target = y.unsqueeze(-1) if column else y
            factor = 2.0 / (n if column else n * y.shape[-1])
            if column and n_out > 1:  # only the first output is compared

                def output_grad(out):
                    return F.pad(out[..., :1] - target, (0, n_out - 1))
        elif loss_fn is cross_entropy_loss:
            onehot = F.one_hot(y, n_out).to(h.dtype)
            factor = 1.0 / n

            def output_grad(out):
                return torch.softmax(out, -1) - onehot
        else:  # pragma: no cover - make_grad_fn only builds this for the losses above
            raise ValueError(f"no analytic gradient for the loss {loss_fn!r}.")
        if single:  # module-shaped parameters: plain 2-D kernels
            linear, mm, back = F.linear, torch.mm, torch.mm
        else:
            linear, mm = _linear, torch.bmm

            def back(d, w):
                return torch.matmul(d, w) if w.dim() == 2 else torch.bmm(d, w)

        backward_plan = plan[::-1]
        hidden, n_names = len(plan) - 1, len(names)

        def step(current: Mapping[str, Tensor], scale: float | None = None) -> list[Tensor]:
            # inputs[j] is layer j's input, so inputs[j] (j >= 1) is also the activation
            # output of layer j - 1; pre holds the activation inputs where they are needed.
            h = body
            inputs, pre = [], []
            for j, w, b, _, _ in plan:
                inputs.append(h)
                h = linear(h, current[w], current[b])
                if j < hidden:
                    if keep_pre:
                        pre.append(h)
                    h = act(h)
            d = h - target if output_grad is None else output_grad(h)
            if scale is not None:
                d = d * scale
            grads = [None] * n_names
            for j, w, _, sw, sb in backward_plan:
                if sw is not None:
                    grads[sw] = mm(d.mT, inputs[j])
                if sb is not None:
                    grads[sb] = d.sum(-2)
                if j:
                    d = act_grad(back(d, current[w]), pre[j - 1] if keep_pre else inputs[j])
            return grads

        return step, factor


class _MLPGradient:
    """The ``"mlp"`` strategy's :data:`GradFn`, plus :meth:`prepare` for the inner loop."""

    def __init__(self, path: _MLPPath, loss_fn: Callable):
        self.path = path
        self.loss_fn = loss_fn

    def __call__(self, params, X, y, names, scale=None) -> Params:
        names = list(names)
        step, factor = self.path.prepare(self.loss_fn, params, X, y, names)
        c = factor * (1.0 if scale is None else float(scale))
        return dict(zip(names, step(params, c)))

    def prepare(self, params, X, y, names, single: bool = False) -> PreparedGrad:
        """See :meth:`_MLPPath.prepare`; :func:`inner_loop` calls this once per loop."""
        return self.path.prepare(self.loss_fn, params, X, y, names, single)


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
    if strategy == "mlp" and loss_fn in (mse_loss, cross_entropy_loss):
        return _MLPGradient(_MLPPath(module.weight_bias_names(), module.activation), loss_fn)
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


def _is_number(rate) -> bool:
    if type(rate) is float:  # the common case, without the ABC check
        return True
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
    per_step = not _is_number(lr) and isinstance(lr, Sequence) and not isinstance(lr, (str, Tensor))
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
                number = _is_number(rate)
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
        if _is_number(rate):
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
                if _is_number(r)
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
                if _is_number(r):
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
