"""The interface every meta-learning algorithm implements, and the gradient-based default.

An algorithm is a small object over :class:`metafit.learner.MetaLearner`. It says which
parameters the inner loop adapts and at which rates, which extra tensors it meta-learns,
which meta-optimizer it wants, and how to turn a meta-batch into meta-gradients. Applying
those gradients (and averaging them across processes) happens outside, in
:meth:`metafit.learner.MetaLearner.meta_step`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

# ``import torch.optim.optimizer as m`` fails on some torch versions whose torch.optim
# namespace does not expose the submodule; importlib always finds it.
_optim_module = importlib.import_module("torch.optim.optimizer")
# LeanAdam's shortcut uses torch internals; without any of them it takes the public path.
_HAS_FUSED_KERNEL = hasattr(torch, "_fused_adam_") and all(
    hasattr(_optim_module, name)
    for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
)

if TYPE_CHECKING:
    from metafit.learner import MetaLearner
    from metafit.tasks import TaskBatch

__all__ = ["MetaAlgorithm", "GradientMetaAlgorithm", "LeanAdam"]


class LeanAdam(torch.optim.Adam):
    """Fused Adam whose step goes straight to the fused kernel.

    ``torch.optim.Adam.step`` spends about 0.1 ms in Python bookkeeping per call, as much
    as 5% of a small meta-step. Once the state exists, this class calls the same fused
    kernel directly; anything unusual (a closure, several groups, weight decay, amsgrad,
    maximize, a missing gradient) takes the ordinary path. Same numbers, same state, same
    ``state_dict``. :meth:`fast_step` also skips the step-hook wrapper when no hook is
    registered (what :meth:`metafit.learner.MetaLearner.meta_step` calls).
    """

    def _fast_ok(self) -> bool:
        group = self.param_groups[0]
        return (
            _HAS_FUSED_KERNEL
            and len(self.param_groups) == 1
            and bool(group.get("fused"))
            and not group["amsgrad"]
            and not group["maximize"]
            and group["weight_decay"] == 0
            and not isinstance(group["lr"], Tensor)
            and all(p.grad is not None and p in self.state for p in group["params"])
        )

    def _fused_step(self) -> None:
        group = self.param_groups[0]
        params = group["params"]
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        beta1, beta2 = group["betas"]
        with torch.no_grad():
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [],
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )

    def step(self, closure=None):
        if closure is None and self._fast_ok():
            self._fused_step()
            return None
        return super().step(closure)

    def fast_step(self) -> None:
        """:meth:`step` without the hook wrapper, unless step hooks are registered."""
        if not _HAS_FUSED_KERNEL:
            self.step()
            return
        hooks = (
            self._optimizer_step_pre_hooks,
            self._optimizer_step_post_hooks,
            _optim_module._global_optimizer_pre_hooks,
            _optim_module._global_optimizer_post_hooks,
        )
        if any(hooks) or not self._fast_ok():
            self.step()
            return
        self._opt_called = True  # what an LR scheduler's step-counting wrapper records
        self._fused_step()


class MetaAlgorithm:
    """Base class of the algorithms; subclasses set the class attributes and override hooks.

    Attributes
    ----------
    name : str
        Registry name (``algorithm=`` of the estimators).
    first_order : bool
        Whether meta-gradients ignore second derivatives (memory flat in inner steps).
    default_meta_lr : float
        Meta learning rate used when the estimator's ``meta_lr`` is None.
    """

    name: ClassVar[str] = ""
    first_order: ClassVar[bool] = False
    default_meta_lr: ClassVar[float] = 1e-3

    def extra_parameters(self, learner: MetaLearner) -> dict[str, Tensor]:
        """Tensors meta-learned besides the initialization (none by default)."""
        return {}

    def adapted_names(self, learner: MetaLearner) -> list[str] | None:
        """Names of the parameters the inner loop adapts; None for all."""
        return None

    def inner_lr(self, learner: MetaLearner, base: float | None = None):
        """Learning rate(s) of the inner loop, as :func:`metafit.functional.inner_loop` takes.

        ``base`` is the plain rate to use instead of ``learner.inner_lr`` (an estimator's
        ``fit`` with another ``inner_lr`` than meta-training had); learned rates ignore it.
        """
        return learner.inner_lr if base is None else base

    def make_optimizer(
        self, params: list[Tensor], meta_lr: float, total_iterations: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The meta-optimizer (Adam by default) and an optional per-iteration scheduler."""
        return LeanAdam(params, lr=meta_lr, fused=True), None

    def meta_gradients(
        self, learner: MetaLearner, batches: list[TaskBatch]
    ) -> tuple[Tensor, list[Tensor]]:
        """Mean post-adaptation query loss and the gradients of the meta-parameters.

        Returns
        -------
        loss : Tensor
            Detached scalar, the mean query loss over all tasks of ``batches``.
        grads : list of Tensor
            One per entry of ``learner.meta_parameters()``, in that order.
        """
        raise NotImplementedError


class GradientMetaAlgorithm(MetaAlgorithm):
    """MAML-style meta-gradient: differentiate the query loss through the inner loop.

    Ragged meta-batches arrive as several equal-shape groups; their losses are weighted by
    group size so that the result equals the vectorized one over all tasks.
    """

    def meta_gradients(self, learner, batches):
        total = sum(b.n_tasks for b in batches)
        meta_params = learner.meta_parameters()
        parts = []
        for batch in batches:
            phi = learner.adapt(
                batch.X_support,
                batch.y_support,
                create_graph=not self.first_order,
                keep_shared=True,
            )
            query = learner.loss_fn(learner.forward(phi, batch.X_query), batch.y_query)
            parts.append(query.mean() if len(batches) == 1 else query.sum() / total)
        loss = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
        grads = torch.autograd.grad(loss, meta_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, grads)]
        return loss.detach(), grads
