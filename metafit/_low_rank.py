"""Exact low-rank inner updates of the ``"mlp"`` strategy, for wide layers.

After one SGD step on ``n`` support rows, a linear layer's weight is
``W' = W - lr * D^T A``, with ``A`` (n x in) the layer's inputs and ``D`` (n x out) the
loss gradients at its outputs: a change of rank at most ``n``; after ``s`` steps, at most
``s * n``. :func:`low_rank_inner_loop` keeps such a layer as
:class:`~metafit._inner_types.LowRankWeight` (the shared initialization plus the stacked
factors of every step, one growing pair of tensors per layer) instead of ``T`` dense
copies. Its forward is then one large shared product over all tasks' rows plus
``O(rank * (in + out))`` per row, its inner gradient needs no ``D^T A`` product at all,
and second order differentiates through the factors like any other expression. The
results equal the dense loop's to rounding (tested in float64, values and
meta-gradients).

A layer is kept low rank while its rank stays at most :data:`RANK_RATIO` times
``in * out / (in + out)`` (the rank at which the factors hold as many numbers as the
weight); the step that would pass the limit turns it into dense per-task weights, and
the loop goes on with those, where the layer has at least :data:`SWITCH_MIN_WEIGHTS`
weights; a smaller one, or one that would pass :data:`SWITCH_FACTOR` times the limit by
the last step, stays dense throughout. Layers whose inner rate is a tensor per
weight (Meta-SGD's) stay dense.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from metafit._checks import is_number
from metafit._inner_types import LowRankWeight, Params
from metafit._mlp_path import MLPPath

__all__ = [
    "RANK_RATIO",
    "SWITCH_FACTOR",
    "SWITCH_MIN_WEIGHTS",
    "rank_limit",
    "low_rank_layers",
    "low_rank_inner_loop",
]

#: A layer stays low rank while ``rank <= RANK_RATIO * in * out / (in + out)``. Measured
#: by ``python benchmarks/low_rank.py`` (second-order MAML meta-steps, one thread, 2-core
#: x86 CPU): factored steps were 1.04-1.08x faster than dense at 0.94 of that rank
#: (widths 64 and 128), 1.3-2.5x at 0.78 (widths 256 and 512), and 0.73-1.18x at 1.56.
RANK_RATIO = 1.0
#: A layer whose rank after all steps would pass ``SWITCH_FACTOR`` times its limit stays
#: dense from the start (same benchmark: 1-40-40-1 with 5 steps of 10 rows, 2.5 times the
#: limit, was 5% slower switched than dense; 1.56 times was 7-22% faster switched for
#: 256x256 and 512x512 layers).
SWITCH_FACTOR = 2.0
#: Only a layer of at least this many weights switches half-way; a smaller one whose rank
#: would pass its limit stays dense from the start (same benchmark, with the fused dense
#: updates: switched at 1.56 times the limit was 0.85-0.99x of dense for 64x64 and
#: 128x128 layers, 1.07-1.22x for 256x256 and 512x512 in two runs).
SWITCH_MIN_WEIGHTS = 256 * 256


def rank_limit(n_in: int, n_out: int) -> int:
    """The largest rank at which a ``n_out x n_in`` layer is kept low rank."""
    return int(RANK_RATIO * n_in * n_out / (n_in + n_out))


def _scalar(rate) -> bool:
    return is_number(rate) or (isinstance(rate, Tensor) and rate.dim() == 0)


def low_rank_layers(
    path: MLPPath,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    rates: Sequence[Mapping[str, object]],
    n_rows: int,
    policy: bool | None = None,
) -> dict[str, int]:
    """``{weight name: rank limit}`` of the layers the low-rank loop keeps factored.

    A layer qualifies when its weight is adapted, shared (module-shaped, the loop's
    start) and has a scalar rate at every step. ``policy`` None keeps it factored when one
    step's rank ``n_rows`` is within :func:`rank_limit`; True keeps every qualifying layer
    factored for all ``len(rates)`` steps (tests, benchmarks).
    """
    adapted = set(names)
    limits = {}
    for w, _ in path.names:
        weight = params.get(w)
        if w not in adapted or weight is None or weight.dim() != 2:
            continue
        if not all(_scalar(r[w]) for r in rates):
            continue
        final = n_rows * len(rates)
        limit = final if policy else rank_limit(weight.shape[1], weight.shape[0])
        # A layer that would turn dense half-way pays for the switch with its dense steps
        # after it: only a wide one, and only when the final rank is within twice the
        # limit (measured).
        switches = final <= SWITCH_FACTOR * limit and weight.numel() >= SWITCH_MIN_WEIGHTS
        if n_rows <= limit and (final <= limit or switches):
            limits[w] = limit
    return limits


def low_rank_inner_loop(
    path: MLPPath,
    loss_fn: Callable,
    params: Mapping[str, Tensor],
    X: Tensor,
    y: Tensor,
    *,
    names: Sequence[str],
    rates: Sequence[Mapping[str, object]],
    create_graph: bool,
    track_graph: bool,
    on_step: Callable[[int, Params], None] | None,
    mask: Tensor | None,
    keep_shared: bool,
    policy: bool | None = None,
) -> Params | None:
    """The inner loop of :func:`metafit.functional.inner_loop` with factored layers.

    ``params`` are the shared initialization (module shapes), ``rates[k][name]`` the rate
    of step ``k``. The other arguments mean what they mean there. Returns the adapted
    parameters, the factored layers as :class:`LowRankWeight` (which only the ``"mlp"``
    forward reads), or None when no layer qualifies (:func:`low_rank_layers`); the caller
    then runs the dense loop.
    """
    limits = low_rank_layers(path, params, names, rates, X.shape[-2], policy)
    if not limits:
        return None
    names = list(names)
    n_tasks = X.shape[0]
    grad_mode = create_graph and track_graph
    caller = torch.is_grad_enabled()
    current = dict(params) if track_graph else {k: v.detach() for k, v in params.items()}
    factored = frozenset(limits)
    try:
        torch.set_grad_enabled(grad_mode)
        step_grads, factor = path.prepare(loss_fn, current, X, y, names, mask=mask)
        for step, step_rates in enumerate(rates):
            values = [step_rates[n] for n in names]
            torch.set_grad_enabled(grad_mode)
            if all(is_number(v) for v in values) and len({float(v) for v in values}) == 1:
                # One number for all: folded into the output gradient, as the dense loop does;
                # the dense layers come back updated where the update has the step's grad mode.
                fused = grad_mode == track_graph
                grads = step_grads(current, -float(values[0]) * factor, factored, update=fused)
                coefs = [None] * len(names)
            else:
                fused, grads = False, step_grads(current, factor, factored)
                coefs = [-v for v in values]
            torch.set_grad_enabled(track_graph)
            for name, grad, coef in zip(names, grads, coefs):
                if type(grad) is tuple:
                    current[name] = _appended(current[name], grad, coef, limits[name])
                elif fused:  # already the updated tensor
                    current[name] = grad
                else:
                    current[name] = current[name] + (grad if coef is None else coef * grad)
            factored = frozenset(n for n in factored if type(current[n]) is LowRankWeight)
            if on_step is not None:
                torch.set_grad_enabled(caller)
                on_step(step, _result(current, names, keep_shared, n_tasks))
    finally:
        torch.set_grad_enabled(caller)
    return _result(current, names, keep_shared, n_tasks)


def _appended(weight, factors: tuple[Tensor, Tensor], coef, limit: int):
    """``weight + coef * D^T A`` as a :class:`LowRankWeight`, or dense past ``limit``."""
    D, A = factors
    if coef is not None:
        D = D * coef
    if type(weight) is LowRankWeight:
        new = weight.appended(D, A)
    else:  # the shared initialization: the first step
        new = LowRankWeight(weight, D, A)
    return new.dense() if new.rank > limit else new


def _result(current: Params, names: list[str], keep_shared: bool, n_tasks: int) -> Params:
    """A new dict (``on_step`` may keep it); the never-updated tensors keep their shared
    module shape with ``keep_shared``, else get the task dimension (a view)."""
    if keep_shared:
        return dict(current)
    adapted = set(names)
    return {
        k: (v if k in adapted else v.unsqueeze(0).expand(n_tasks, *v.shape))
        for k, v in current.items()
    }
