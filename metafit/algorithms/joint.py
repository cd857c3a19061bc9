"""Joint pretraining: the baseline that meta-learning must beat."""

from __future__ import annotations

import torch

from metafit.algorithms.base import MetaAlgorithm
from metafit.losses import task_losses

__all__ = ["JointPretraining"]


def _rows(X: torch.Tensor, mask: torch.Tensor | None):
    """Real rows per task: (T,) counts of a padded batch, else the common count."""
    return X.shape[1] if mask is None else mask.sum(1)


class JointPretraining(MetaAlgorithm):
    """Train one network on every task's rows pooled, with no inner loop; ``fit`` then
    fine-tunes it on a new task's rows like any initialization.

    This is what most users would do without meta-learning ("pretrain on all the old
    groups, fine-tune on the new one"), inside the same estimator, data path, scaling and
    search, so that the comparison with MAML and the others is like for like. The
    meta-gradient is the plain gradient of the mean loss over the support and query rows
    of the meta-batch at the initialization itself.
    """

    name = "joint"
    first_order = True

    def meta_gradients(self, ctx, batches):
        theta = ctx.meta_parameters()
        total = sum(b.n_tasks for b in batches)
        parts = []
        for batch in batches:
            phi = ctx.adapt(batch.X_support, batch.y_support, steps=0, create_graph=True,
                            keep_shared=True)
            support = task_losses(ctx.loss_fn, ctx.forward(phi, batch.X_support),
                                  batch.y_support, batch.support_mask)
            query = task_losses(ctx.loss_fn, ctx.forward(phi, batch.X_query),
                                batch.y_query, batch.query_mask)
            n_s, n_q = _rows(batch.X_support, batch.support_mask), _rows(
                batch.X_query, batch.query_mask)
            # The mean over all of a task's rows, weighted by the task's share of the batch.
            per_task = (support * n_s + query * n_q) / (n_s + n_q)
            parts.append(per_task.sum() / total)
        loss = torch.stack(parts).sum()
        grads = torch.autograd.grad(loss, theta, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(theta, grads)]
        return loss.detach(), grads
