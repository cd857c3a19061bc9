"""The interface every meta-learning algorithm implements, and the gradient-based default.

An algorithm is a small object over :class:`metafit.learner.MetaLearner`. It says which
parameters the inner loop adapts and at which rates, which extra tensors it meta-learns,
which meta-optimizer it wants, and how to turn a meta-batch into meta-gradients. Applying
those gradients (and averaging them across processes) happens outside, in
:meth:`metafit.learner.MetaLearner.meta_step`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from metafit.learner import MetaLearner
    from metafit.tasks import TaskBatch

__all__ = ["MetaAlgorithm", "GradientMetaAlgorithm"]


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

    def inner_lr(self, learner: MetaLearner):
        """Learning rate(s) of the inner loop, as :func:`metafit.functional.inner_loop` takes."""
        return learner.inner_lr

    def make_optimizer(
        self, params: list[Tensor], meta_lr: float, total_iterations: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The meta-optimizer (Adam by default) and an optional per-iteration scheduler."""
        return torch.optim.Adam(params, lr=meta_lr, foreach=False, fused=True), None

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
        loss = 0.0
        for batch in batches:
            phi = learner.adapt(
                batch.X_support,
                batch.y_support,
                create_graph=not self.first_order,
                keep_shared=True,
            )
            query = learner.loss_fn(learner.forward(phi, batch.X_query), batch.y_query)
            loss = loss + query.sum() / total
        grads = torch.autograd.grad(loss, meta_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, grads)]
        return loss.detach(), grads
