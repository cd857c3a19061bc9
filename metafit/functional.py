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
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metafit import _torch_compat as compat
from metafit._checks import is_number
from metafit._inner_types import Params, PreparedGradFn, StepGradients
from metafit._low_rank import low_rank_inner_loop
from metafit._mlp_path import MLPGradient, MLPPath
from metafit.losses import LOSSES, cross_entropy_loss, mse_loss, task_losses

__all__ = [
    "Params",
    "BatchedForward",
    "GradFn",
    "PreparedGradFn",
    "StepForward",
    "StepGradients",
    "make_forward",
    "make_grad_fn",
    "resolve_strategy",
    "mse_loss",
    "cross_entropy_loss",
    "LOSSES",
    "expand_params",
    "inner_loop",
    "reference_inner_loop",
    "head_parameter_names",
    "rows_independent",
]

BatchedForward = Callable[[Mapping[str, Tensor], Tensor], Tensor]
#: ``grad_fn(params, X, y, names, scale) -> {name: scale * d(sum_t loss_t)/d params[name]}``
#: for the names in ``names``; every result has the task dimension. ``scale`` None means 1.
GradFn = Callable[[Mapping[str, Tensor], Tensor, Tensor, Sequence[str], "float | None"], Params]
LearningRate = float | Tensor | Mapping[str, Tensor]
#: ``step_forward(params, X, step) -> outputs``: a forward that depends on the inner step.
StepForward = Callable[[Mapping[str, Tensor], Tensor, int], Tensor]




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


_BATCH_STATISTICS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def rows_independent(module: nn.Module) -> bool:
    """Whether ``module`` computes each row's output from that row alone, so that padding
    rows change nothing of the real rows' outputs (then ragged tasks are padded into one
    batch, :class:`~metafit.tasks.TaskBatch`).

    A module (or submodule) says so with a ``rows_independent`` attribute (Conv4, whose
    BatchNorm uses the batch's statistics, sets it False); otherwise any torch BatchNorm
    in training statistics makes the answer False.
    """
    flag = getattr(module, "rows_independent", None)
    if flag is not None:
        return bool(flag)
    for sub in module.modules():
        if getattr(sub, "rows_independent", True) is False or isinstance(sub, _BATCH_STATISTICS):
            return False
    return True


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


def _per_step(lr) -> bool:
    """Whether ``lr`` is a sequence with one learning rate per step (MAML++)."""
    return not is_number(lr) and isinstance(lr, Sequence) and not isinstance(lr, (str, Tensor))


def reference_inner_loop(
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
    step_forward: StepForward | None = None,
    mask: Tensor | None = None,
    proximal: float | None = None,
) -> Params:
    """The inner loop written plainly: the specification :func:`inner_loop` must meet.

    ``params`` carry the task dimension and require grad; every step is one autograd
    gradient of the summed task losses and one SGD update per adapted tensor. The fast
    paths of :func:`inner_loop` (shared first step, analytic gradients, one-task loop,
    in-place updates) are tested equal to this, values and meta-gradients.
    """
    names = list(params) if adapt is None else list(adapt)
    rates = lr if _per_step(lr) else [lr] * steps
    current = dict(params)
    for step in range(steps):
        out = forward(current, X) if step_forward is None else step_forward(current, X, step)
        loss = task_losses(loss_fn, out, y, mask).sum()
        grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=create_graph)
        for name, grad in zip(names, grads):
            if proximal is not None:
                grad = grad + proximal * (current[name] - params[name])
            current[name] = current[name] - _rate(rates[step], name) * grad
    return current


# Long function: the docstring documents every option of the one inner loop; the body is
# about 30 lines, the rest of the work is in _Layout, _gradient_source and _run_steps.
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
    step_forward: StepForward | None = None,
    mask: Tensor | None = None,
    proximal: float | None = None,
    checkpoint: bool = False,
    factored: bool = False,
    low_rank: bool | None = None,
) -> Params:
    """Adapt batched parameters by ``steps`` steps of gradient descent on ``(X, y)``.

    The only inner loop in metafit: meta-training differentiates through it (second
    order), through its parameter path only (first order), or not at all (Reptile,
    ``fit``). It computes what :func:`reference_inner_loop` computes, faster.

    Parameters
    ----------
    forward, loss_fn
        Batched forward (:func:`make_forward`) and per-task loss (``-> (T,)``).
    params : mapping of str to Tensor
        Parameters with a leading task dimension, or without it if ``shared``.
    X, y : Tensor
        Support inputs ``(T, n, ...)`` and targets ``(T, n, ...)``.
    steps : int
        Gradient steps; 0 returns ``params`` unchanged.
    lr : float, Tensor, mapping, or a sequence of those
        One rate for all parameters, one per name (Meta-SGD), or one per step (MAML++);
        tensors that require grad receive meta-gradients.
    adapt : sequence of str, optional
        Names of the parameters to adapt (ANIL: the head); default all.
    create_graph : bool, default=False
        Keep each inner gradient's graph (second order); else memory is flat in ``steps``.
    track_graph : bool, default=True
        If False the updates run outside autograd (Reptile, ``fit``).
    on_step : callable, optional
        ``on_step(step, params)`` after every update (multi-step losses, curves).
    grad_fn : GradFn or PreparedGradFn, optional
        The strategy's gradient function (:func:`make_grad_fn`) instead of autograd. A
        :class:`PreparedGradFn` is prepared once per loop, and with one task (``T = 1``)
        the loop then runs on module-shaped parameters.
    shared : bool, default=False
        ``params`` are the one initialization of all ``T`` tasks (no task dimension).
    keep_shared : bool, default=False
        Return never-updated parameters (ANIL's body) without the task dimension.
    step_forward : callable, optional
        ``step_forward(params, X, step)``, the forward of inner step ``step`` when it
        depends on the step (MAML++'s per-step BatchNorm); used with autograd gradients.
    mask : Tensor of shape (T, n), optional
        1 for a real support row, 0 for padding (a padded :class:`~metafit.tasks.TaskBatch`):
        each task's loss is the mean over its real rows, as if it had been alone.
    proximal : float, optional
        Add ``proximal / 2 * ||phi - params||^2`` to every task's loss (iMAML's inner
        objective: the adapted parameters stay near the initialization).
    checkpoint : bool, default=False
        With ``create_graph``: keep only each step's adapted parameters for the backward
        pass and recompute the step's forward and inner gradient there
        (:func:`torch.utils.checkpoint.checkpoint`): the same meta-gradient, with the
        memory of the parameters instead of every step's activations.
    factored : bool, default=False
        The caller passes the results only to the ``"mlp"`` forward, so wide adapted
        weights may come back as :class:`~metafit._inner_types.LowRankWeight` (the
        initialization plus the rank-``n`` change of every step) instead of ``T`` dense
        copies: the exact low-rank loop of :mod:`metafit._low_rank`, used with the
        ``"mlp"`` gradient function, several tasks, scalar rates and neither
        ``proximal`` nor ``checkpoint``.
    low_rank : bool, optional
        With ``factored``: None keeps a layer factored while that is measured faster
        (:func:`metafit._low_rank.rank_limit`), True keeps every layer it can factored,
        False never factors.
    """
    names = list(params) if adapt is None else list(adapt)
    if proximal is not None and ((create_graph and track_graph) or step_forward is not None):
        raise ValueError(
            "the proximal inner loop serves implicit meta-gradients (iMAML): it keeps no "
            "graph and has one forward; pass create_graph=False and no step_forward."
        )
    if step_forward is not None or (mask is not None and not isinstance(grad_fn, PreparedGradFn)):
        grad_fn = None  # the analytic gradients know one forward only, and masks if prepared
    if (factored and low_rank is not False and steps > 0 and shared and X.shape[0] > 1
            and isinstance(grad_fn, MLPGradient) and proximal is None and not checkpoint):
        rates = [{n: _rate(r, n) for n in names} for r in (lr if _per_step(lr) else [lr] * steps)]
        adapted = low_rank_inner_loop(
            grad_fn.path, grad_fn.loss_fn, params, X, y, names=names, rates=rates,
            create_graph=create_graph, track_graph=track_graph, on_step=on_step, mask=mask,
            keep_shared=keep_shared, policy=low_rank,
        )
        if adapted is not None:
            return adapted
    layout = _Layout(names, X.shape[0], steps, grad_fn, shared, keep_shared)
    current = layout.start(params, track_graph)
    if steps <= 0:
        return layout.result(current)
    grad_mode = create_graph and track_graph  # second order needs a differentiable gradient
    mode = _GradMode()
    try:
        mode.set(grad_mode)
        step_grads, factor = _gradient_source(
            forward, loss_fn, current, X, y, layout, grad_fn, track_graph, grad_mode,
            step_forward, mask,
        )
        if proximal is not None:
            step_grads, factor = _proximal(step_grads, factor, proximal, current, layout)
        _run_steps(current, step_grads, factor, lr, layout, mode, grad_mode, track_graph, on_step,
                   checkpoint and grad_mode, fused=layout.prepared and proximal is None)
    finally:
        mode.restore()
    return layout.result(current)


class _GradMode:
    """``torch.set_grad_enabled`` that switches only when the mode changes, and restores
    the caller's mode (each switch costs about a microsecond; fit takes a few hundred)."""

    def __init__(self):
        self.caller = self.mode = torch.is_grad_enabled()

    def set(self, wanted: bool) -> None:
        if wanted != self.mode:
            torch.set_grad_enabled(wanted)
            self.mode = wanted

    def restore(self) -> None:
        self.set(self.caller)


class _Layout:
    """Which shape the loop's tensors have, decided once: per-task copies, shared
    (module-shaped, first step only) or one task without the task dimension."""

    def __init__(self, names, n_tasks, steps, grad_fn, shared, keep_shared):
        self.names, self.n_tasks, self.steps = names, n_tasks, steps
        self.prepared = isinstance(grad_fn, PreparedGradFn)
        # One task: drop the task dimension for the whole loop (module-shaped parameters,
        # unbatched kernels) and put it back at the end.
        self.single = self.prepared and n_tasks == 1
        self.shared = shared and grad_fn is not None  # autograd: expanded up front
        self.expand = shared and grad_fn is None
        self.keep_shared = keep_shared
        self.unbatched: set[str] = set()

    def start(self, params: Mapping[str, Tensor], track_graph: bool) -> Params:
        current = expand_params(params, self.n_tasks) if self.expand else dict(params)
        if not track_graph:
            # The updates run outside autograd; only what they never touch needs detaching.
            adapted = set(self.names) if self.steps > 0 else ()
            current = {
                k: (v.detach() if v.requires_grad and k not in adapted else v)
                for k, v in current.items()
            }
        if self.single and not self.shared:
            current = {k: v[0] for k, v in current.items()}
        if self.shared and not self.single:
            self.unbatched = set(current)
        return current

    def updated(self) -> None:
        self.unbatched.difference_update(self.names)

    def result(self, current: Params) -> Params:
        if self.single:
            kept = ()
            if self.shared and self.keep_shared:
                kept = set(current).difference(self.names if self.steps else ())
            return {k: (v if k in kept else v.unsqueeze(0)) for k, v in current.items()}
        # A new dict: on_step may keep it while the loop goes on updating ``current``.
        if self.keep_shared:
            return dict(current)
        return _batched(current, self.unbatched, self.n_tasks)


def _gradient_source(
    forward, loss_fn, current, X, y, layout, grad_fn, track_graph, grad_mode, step_fwd, mask
):
    """Where a step's gradients come from: ``(step_grads, factor)`` such that
    ``factor * step_grads(current)`` are the gradients (``step_grads(current, scale)``
    also multiplies the output gradient by ``scale``, where supported). A
    :class:`PreparedGradFn` is prepared here, once for the loop, from its first state."""
    names = layout.names
    if grad_fn is None:
        step = _AutogradStep(forward, loss_fn, X, y, names, track_graph, grad_mode, step_fwd, mask)
        return step, 1.0
    if layout.prepared:
        return grad_fn.prepare(current, X, y, names, single=layout.single, mask=mask)

    def step_grads(p, scale=None):
        g = grad_fn(p, X, y, names, scale)
        return [g[n] for n in names]

    return step_grads, 1.0


def _proximal(step_grads, factor, strength: float, start: Params, layout):
    """The step gradients of the proximal objective: ``factor * g + strength * (phi -
    phi_0)`` for each adapted tensor, with the loop's starting values as ``phi_0``."""
    anchor = {n: start[n] for n in layout.names}
    autograd = isinstance(step_grads, _AutogradStep)

    def with_pull(current, scale=None, step=0):
        raw = step_grads(current, step=step) if autograd else step_grads(current)
        f = 1.0 if autograd else factor
        return [f * g + strength * (current[n] - anchor[n]) for n, g in zip(layout.names, raw)]

    return with_pull, 1.0


def _step_gradients(step_grads, current, step, rate, factor, autograd, grad_mode):
    """One step's ``(gradients, rate, factor)`` for :class:`_SGDUpdate`."""
    if autograd:
        return step_grads(current, step=step), rate, factor
    if grad_mode:
        # Under a graph, scale the small output gradient inside the gradient function:
        # folded into the updates, the constant would cost a multiply of every
        # parameter-sized gradient in the backward pass.
        number = is_number(rate)
        grads = step_grads(current, -float(rate) * factor if number else factor)
        # The gradients now hold -rate * factor * gradient for a number rate.
        return (grads, 1.0, -1.0) if number else (grads, rate, 1.0)
    return step_grads(current), rate, factor


def _run_steps(current, step_grads, factor, lr, layout, mode, grad_mode, track_graph, on_step,
               checkpointed=False, fused=False):
    """The SGD steps, updating ``current`` (the loop's own dict); ``fused``: the step
    function can return the updated parameters itself (a prepared step's ``update``)."""
    per_step = _per_step(lr)
    update = _SGDUpdate(layout.names, None if per_step else lr)
    autograd = isinstance(step_grads, _AutogradStep)
    # Outside autograd, once the first step made the adapted tensors the loop's own, later
    # steps update them in place (unless on_step may keep them).
    in_place, own = not track_graph and on_step is None, None
    # Second order only: first order computes the step without a graph but not the update,
    # and without any graph the in-place updates are faster for small networks.
    fuse_steps = fused and grad_mode
    names = layout.names
    for step in range(layout.steps):
        rate = lr[step] if per_step else lr
        if checkpointed:  # the step recomputed in the backward pass, its graph not kept

            def one_step(*tensors, step=step, rate=rate):
                state = {**current, **dict(zip(names, tensors))}
                grads, rate_now, factor_now = _step_gradients(
                    step_grads, state, step, rate, factor, autograd, grad_mode)
                update(state, grads, rate_now, factor_now)
                return tuple(state[n] for n in names)

            outs = torch.utils.checkpoint.checkpoint(
                one_step, *(current[n] for n in names), use_reentrant=False)
            current.update(zip(names, outs))
            layout.updated()
            if on_step is not None:
                on_step(step, layout.result(current))
            continue
        mode.set(grad_mode)
        if fuse_steps and is_number(rate):  # the step returns the updated parameters
            current.update(zip(names, step_grads(current, -float(rate) * factor, update=True)))
            layout.updated()
        else:
            grads, rate_now, factor_now = _step_gradients(
                step_grads, current, step, rate, factor, autograd, grad_mode)
            mode.set(track_graph)
            if own is not None:
                update.in_place(own, grads, rate_now, factor_now)
            else:
                update(current, grads, rate_now, factor_now)
                layout.updated()
                if in_place:
                    own = [current[n] for n in layout.names]
        if on_step is not None:
            mode.set(mode.caller)
            on_step(step, layout.result(current))


class _AutogradStep:
    """The inner gradient by ``torch.autograd.grad``, for strategies without a GradFn."""

    def __init__(self, forward, loss_fn, X, y, names, track_graph, create_graph, step_fwd, mask):
        self.forward, self.loss_fn, self.X, self.y, self.mask = forward, loss_fn, X, y, mask
        self.names, self.track_graph, self.create_graph = names, track_graph, create_graph
        self.step_forward = step_fwd

    def __call__(self, current: Params, scale=None, step: int = 0) -> Sequence[Tensor]:
        with torch.enable_grad():
            leaves = {
                n: (v if self.track_graph and v.requires_grad else v.detach().requires_grad_(True))
                for n, v in ((n, current[n]) for n in self.names)
            }
            state = {**current, **leaves}
            if self.step_forward is None:
                out = self.forward(state, self.X)
            else:
                out = self.step_forward(state, self.X, step)
            loss = task_losses(self.loss_fn, out, self.y, self.mask).sum()
            return torch.autograd.grad(
                loss, list(leaves.values()), create_graph=self.create_graph
            )


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
        grads = grads if type(grads) is list else list(grads)
        kind = self.kind if self.fixed else self._kind(rate)
        params = [current[n] for n in names]
        if not torch.is_grad_enabled() and kind != "mixed":
            if kind == "number":
                new = compat.foreach_add(params, grads, alpha=-float(rate) * factor)
            else:  # Meta-SGD, MAML++: tensor rates
                rates = self.rates if self.fixed else [_rate(rate, n) for n in names]
                new = compat.foreach_addcmul(params, rates, grads, value=-factor)
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
        grads = grads if type(grads) is list else list(grads)
        kind = self.kind if self.fixed else self._kind(rate)
        if kind == "number":
            compat.foreach_add_(params, grads, alpha=-float(rate) * factor)
        elif kind == "tensors":
            rates = self.rates if self.fixed else [_rate(rate, n) for n in self.names]
            compat.foreach_addcmul_(params, rates, grads, value=-factor)
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
