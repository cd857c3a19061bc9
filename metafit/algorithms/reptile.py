"""Reptile (Nichol, Achiam & Schulman 2018)."""

from __future__ import annotations

import torch

from metafit.algorithms.base import MetaAlgorithm
from metafit.losses import task_losses

__all__ = ["Reptile"]


class Reptile(MetaAlgorithm):
    """Move the initialization towards the parameters adapted to each task.

    With ``phi_i`` the result of ``inner_steps`` SGD steps on task ``i``'s support set,
    the update is ``theta <- theta + eps * mean_i(phi_i - theta)`` (the batched version of
    the paper). It is expressed as the pseudo-gradient ``theta - mean_i(phi_i)`` fed to
    plain SGD whose step size ``eps`` (``meta_lr``, default 1.0) is annealed linearly to 0
    over the meta-iterations, so that distributed averaging treats it like any gradient.
    No graph is kept: memory is flat in the number of inner steps. The reported loss is the
    query loss of the adapted parameters.
    """

    name = "reptile"
    first_order = True
    default_meta_lr = 1.0

    def make_optimizer(self, params, meta_lr, total_iterations):
        optimizer = torch.optim.SGD(params, lr=meta_lr)
        total = max(int(total_iterations), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: max(0.0, 1.0 - it / total)
        )
        return optimizer, scheduler

    def meta_gradients(self, ctx, batches):
        total = sum(b.n_tasks for b in batches)
        theta = ctx.params()
        drift = {name: torch.zeros_like(p) for name, p in theta.items()}
        loss = torch.zeros((), dtype=next(iter(theta.values())).dtype)
        for batch in batches:
            phi = ctx.adapt(batch.X_support, batch.y_support, track_graph=False,
                            mask=batch.support_mask)
            with torch.no_grad():
                for name, p in theta.items():
                    drift[name] += (p.detach().unsqueeze(0) - phi[name]).sum(0)
                query = task_losses(ctx.loss_fn, ctx.forward(phi, batch.X_query),
                                    batch.y_query, batch.query_mask)
                loss = loss + query.sum().cpu() / total
        grads = [drift[name] / total for name in theta]
        grads += [torch.zeros_like(e) for e in ctx.extras.values()]
        return loss, grads
