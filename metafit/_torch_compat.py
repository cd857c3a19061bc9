"""Every private torch API metafit uses, in one place, each with a public fallback.

The ``torch._foreach_*`` kernels update or measure a list of tensors in one call instead
of one Python-level op per tensor; the fused Adam kernel and the optimizer-hook registries
let :class:`metafit.algorithms.base.LeanAdam` skip ``Adam.step``'s bookkeeping. They are
not public API, so each is looked up once here (a feature check); when one is missing, the
functions below do the same arithmetic with public per-tensor ops, giving the same numbers
more slowly. Nothing else in metafit touches ``torch._*``.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

__all__ = [
    "HAS_FOREACH",
    "HAS_FUSED_ADAM",
    "foreach_add",
    "foreach_add_",
    "foreach_addcmul",
    "foreach_addcmul_",
    "foreach_copy_",
    "foreach_norm",
    "fused_adam_",
    "optimizer_hooks_registered",
]

HAS_FOREACH = all(
    hasattr(torch, name)
    for name in (
        "_foreach_add",
        "_foreach_add_",
        "_foreach_addcmul",
        "_foreach_addcmul_",
        "_foreach_norm",
        "_foreach_copy_",
    )
)

# ``import torch.optim.optimizer as m`` fails on some torch versions whose torch.optim
# namespace does not expose the submodule; importlib always finds it.
_optim_module = importlib.import_module("torch.optim.optimizer")
_GLOBAL_HOOKS = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
HAS_FUSED_ADAM = hasattr(torch, "_fused_adam_") and all(
    hasattr(_optim_module, name) for name in _GLOBAL_HOOKS
)


# The lists are passed through as they are (the callers build lists): a copy per call
# would cost a few percent of a few-shot fit.


def foreach_add(tensors: list[Tensor], others: list[Tensor], alpha: float) -> list:
    """``[t + alpha * o for t, o in zip(tensors, others)]``, one kernel where possible."""
    if HAS_FOREACH:
        return torch._foreach_add(tensors, others, alpha=alpha)
    return [torch.add(t, o, alpha=alpha) for t, o in zip(tensors, others)]


def foreach_add_(tensors: list[Tensor], others: list[Tensor], alpha: float) -> None:
    """In place: ``t += alpha * o`` for every pair."""
    if HAS_FOREACH:
        torch._foreach_add_(tensors, others, alpha=alpha)
        return
    for t, o in zip(tensors, others):
        t.add_(o, alpha=alpha)


def foreach_addcmul(
    tensors: list[Tensor], rates: list[Tensor], others: list[Tensor], value: float
) -> list:
    """``[t + value * r * o ...]`` (Meta-SGD's and MAML++'s tensor learning rates)."""
    if HAS_FOREACH:
        return torch._foreach_addcmul(tensors, rates, others, value=value)
    return [torch.addcmul(t, r, o, value=value) for t, r, o in zip(tensors, rates, others)]


def foreach_addcmul_(
    tensors: list[Tensor], rates: list[Tensor], others: list[Tensor], value: float
) -> None:
    """In place: ``t += value * r * o`` for every triple."""
    if HAS_FOREACH:
        torch._foreach_addcmul_(tensors, rates, others, value=value)
        return
    for t, r, o in zip(tensors, rates, others):
        t.addcmul_(r, o, value=value)


def foreach_copy_(tensors: list[Tensor], sources: list[Tensor]) -> None:
    """In place: ``t.copy_(s)`` for every pair."""
    if HAS_FOREACH:
        torch._foreach_copy_(tensors, sources)
        return
    for t, s in zip(tensors, sources):
        t.copy_(s)


def foreach_norm(tensors: list[Tensor], ord: float = 2) -> list:
    """The ``ord``-norm of every tensor, 2 or ``math.inf`` (the largest magnitude); one
    fused kernel where possible."""
    if HAS_FOREACH:
        return torch._foreach_norm(tensors, ord)
    return [torch.linalg.vector_norm(t, ord) for t in tensors]


def optimizer_hooks_registered(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any step hook (the optimizer's own or a global one) is registered."""
    hooks = [optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks]
    hooks += [getattr(_optim_module, name, None) for name in _GLOBAL_HOOKS]
    return any(bool(h) for h in hooks)


def fused_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One fused Adam update in place (the kernel ``Adam(fused=True).step`` calls).

    Only called when :data:`HAS_FUSED_ADAM` is true; callers take ``Adam.step`` otherwise.
    """
    with torch.no_grad():
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
