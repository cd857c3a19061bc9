"""iMAML: implicit meta-gradients (Rajeswaran, Finn, Kakade and Levine 2019, "Meta-learning
with implicit gradients").

The inner loop minimizes each task's support loss plus a proximal term that keeps the
adapted parameters near the initialization,

    phi_t = argmin_phi  L_t(phi) + lam / 2 * ||phi - theta||^2,

approximately, by the usual SGD steps (no graph kept). At that optimum
``d phi_t / d theta = (I + H_t / lam)^-1``, with ``H_t`` the Hessian of the support loss at
``phi_t``, so the meta-gradient of the query loss is ``(I + H_t / lam)^-1 g_t``, ``g_t`` the
query loss's gradient at ``phi_t``: a linear system solved by a few conjugate-gradient
iterations, each one Hessian-vector product of all tasks at once. Memory does not grow
with the inner steps: only the last ``phi_t`` is needed, not the path to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metafit.algorithms.base import MetaAlgorithm
from metafit.losses import task_losses

__all__ = ["IMAML"]


def _dots(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Per-task inner products of two lists of batched tensors: (T,)."""
    return sum((x * y).flatten(1).sum(1) for x, y in zip(a, b))


def _scaled(c: Tensor, x: Tensor) -> Tensor:
    """``c`` (T,) times each task's slice of ``x`` (T, ...)."""
    return c.view(-1, *([1] * (x.dim() - 1))) * x


class IMAML(MetaAlgorithm):
    """Implicit MAML: a proximal inner loop and an implicit meta-gradient by conjugate
    gradients; memory flat in the number of inner steps.

    Parameters
    ----------
    lam : float, default=1.0
        Strength of the proximal term (the paper's lambda): larger keeps ``phi`` closer to
        ``theta``. ``fit`` adapts with the same proximal term.
    cg_steps : int, default=5
        Conjugate-gradient iterations per meta-gradient (the paper uses 5).

    Notes
    -----
    The implicit gradient is exact at the proximal optimum; with few inner steps it is an
    approximation, better the closer the inner loop gets to convergence (more steps, or a
    larger ``inner_lr``). Adapts every parameter; plain inner rate.
    """

    name = "imaml"
    first_order = False

    def __init__(self, lam: float = 1.0, cg_steps: int = 5):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0:
            raise ValueError(f"lam must be a number > 0, got {lam!r}.")
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"cg_steps must be an int >= 1, got {cg_steps!r}.")
        self.lam = float(lam)
        self.cg_steps = cg_steps

    def get_config(self):
        return {"lam": self.lam, "cg_steps": self.cg_steps}

    @property
    def proximal(self) -> float:
        return self.lam

    @property
    def keeps_inner_graph(self) -> bool:
        return False

    def meta_gradients(self, ctx, batches):
        total = sum(b.n_tasks for b in batches)
        theta = ctx.params()
        names = list(theta)
        grads = [torch.zeros_like(p) for p in theta.values()]
        loss = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
        for batch in batches:
            phi = ctx.adapt(batch.X_support, batch.y_support, track_graph=False,
                            mask=batch.support_mask)
            leaves = {n: phi[n].detach().requires_grad_(True) for n in names}
            with torch.enable_grad():
                query = task_losses(ctx.loss_fn, ctx.forward(leaves, batch.X_query),
                                    batch.y_query, batch.query_mask)
                g = torch.autograd.grad(query.sum(), [leaves[n] for n in names])
                support = task_losses(ctx.loss_fn, ctx.forward(leaves, batch.X_support),
                                      batch.y_support, batch.support_mask)
                dsupport = torch.autograd.grad(support.sum(), [leaves[n] for n in names],
                                               create_graph=True)
            x = self._solve(dsupport, [leaves[n] for n in names], list(g))
            for acc, xi in zip(grads, x):
                acc.add_(xi.sum(0), alpha=1.0 / total)
            loss = loss + query.detach().sum() / total
        grads += [torch.zeros_like(e) for e in ctx.extras.values()]
        return loss, grads

    def _solve(self, dsupport, leaves, b: list[Tensor]) -> list[Tensor]:
        """``(I + H / lam) x = b`` for every task at once, by conjugate gradients.

        ``H v`` is the gradient of ``<d support / d phi, v>``; tasks are separable, so one
        backward gives every task's product.
        """
        lam = self.lam

        def apply(v: list[Tensor]) -> list[Tensor]:
            with torch.enable_grad():
                hv = torch.autograd.grad(dsupport, leaves, grad_outputs=v, retain_graph=True)
            return [vi + hvi / lam for vi, hvi in zip(v, hv)]

        x = [torch.zeros_like(bi) for bi in b]
        r = [bi.clone() for bi in b]
        p = [bi.clone() for bi in b]
        rr = _dots(r, r)
        # A task whose support loss curves downwards along p (I + H / lam not positive
        # there: phi is not near a minimum) stops at the x it has, as truncated CG does;
        # at the first iteration that is b itself, the first-order meta-gradient.
        active = rr > 0
        for step in range(self.cg_steps):
            if not bool(active.any()):
                break
            ap = apply(p)
            pap = _dots(p, ap)
            if step == 0:  # x is still 0: the tasks that stop now keep b
                stop = (active & (pap <= 0)).to(rr.dtype)
                x = [_scaled(stop, bi) for bi in b]
            active = active & (pap > 0)
            alpha = torch.where(active, rr / torch.where(active, pap, 1.0), 0.0)
            x = [xi + _scaled(alpha, pi) for xi, pi in zip(x, p)]
            r = [ri - _scaled(alpha, api) for ri, api in zip(r, ap)]
            rr_new = _dots(r, r)
            active = active & (rr_new > 0)
            beta = torch.where(active, rr_new / torch.where(rr > 0, rr, 1.0), 0.0)
            p = [ri + _scaled(beta, pi) for ri, pi in zip(r, p)]
            rr = rr_new
        return x
