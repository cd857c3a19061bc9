"""MAML++ (Antoniou, Edwards & Storkey 2019): "How to train your MAML".

The paper's fixes for MAML's unstable training, each an option of :class:`MAMLPlusPlus`:

- **LSLR**, per-layer per-step learned inner learning rates: one scalar rate per parameter
  tensor and per inner step, meta-learned with the initialization;
- **MSL**, multi-step loss: the query loss after *every* inner step, weighted, with the
  weights annealed towards the last step over the first iterations (then the last step
  alone);
- **DA**, derivative-order annealing: first-order meta-gradients for the first
  iterations, second-order afterwards;
- **CA**, cosine annealing of the meta learning rate (Adam);
- **BNWB**, per-step BatchNorm: with a module built with ``bn_steps`` (e.g.
  :class:`metafit.models.Conv4` ``(bn_steps=5)``), inner step ``k`` normalizes with the
  ``k``-th set of BatchNorm scales and shifts, which the inner loop leaves alone and the
  outer loop learns. BatchNorm here always uses the batch's own statistics, so the
  paper's per-step running statistics (BNRS) have nothing to keep.

With every option off, it is second-order MAML.
"""

from __future__ import annotations

import torch

from metafit.algorithms.base import GradientMetaAlgorithm
from metafit.losses import task_losses

__all__ = ["MAMLPlusPlus", "per_step_loss_weights"]

_PREFIX = "lslr."


def per_step_loss_weights(steps: int, iteration: int, anneal_iterations: int) -> torch.Tensor:
    """Weights of the query losses after each inner step (MAML++'s multi-step loss).

    They start uniform (``1/steps``); over ``anneal_iterations`` iterations the weights
    of the steps before the last decay linearly to ``0.03/steps`` and the last one grows
    to take the rest, as in the paper's reference code.

    Returns
    -------
    Tensor of shape (steps,), summing to 1.
    """
    uniform = 1.0 / steps
    if steps == 1:
        return torch.ones(1, dtype=torch.float64)
    decay = uniform / max(anneal_iterations, 1)
    floor = 0.03 / steps
    weights = [max(uniform - iteration * decay, floor) for _ in range(steps - 1)]
    weights.append(min(uniform + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return torch.tensor(weights, dtype=torch.float64)


def _iterations(value, total: int, name: str) -> int:
    """An iteration count given as an int, or as a fraction in [0, 1] of ``total``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 or a fraction in [0, 1], got {value!r}.")
    if isinstance(value, float):
        if value > 1:
            raise ValueError(f"{name} as a float is a fraction of the iterations; got {value}.")
        return int(round(value * total))
    return value


class MAMLPlusPlus(GradientMetaAlgorithm):
    """MAML++: MAML with learned per-step rates, multi-step loss and annealing.

    Parameters
    ----------
    learn_inner_lr : bool, default=True
        Meta-learn one inner learning rate per parameter tensor and inner step (LSLR),
        starting at the estimator's ``inner_lr``. Evaluation with more steps than were
        meta-trained reuses the last step's rates.
    multi_step_loss : bool, default=True
        Use the weighted query losses after every inner step (MSL).
    msl_iterations : int or float, default=0.1
        Iterations (an int, or a fraction of ``meta_iterations``) over which the step
        weights anneal towards the last step; afterwards only the last step counts.
    first_order_iterations : int or float, default=0
        Iterations (int or fraction) that use first-order meta-gradients (DA).
    cosine_meta_lr : bool, default=True
        Anneal Adam's learning rate from ``meta_lr`` to ``min_meta_lr`` along a cosine
        over the meta-iterations (CA).
    min_meta_lr : float, default=1e-5
        The cosine's floor.
    checkpoint : bool, default=False
        Gradient checkpointing of the inner loop, as :class:`~metafit.algorithms.MAML`'s.

    Notes
    -----
    Per-step BatchNorm is on when the module has a ``bn_steps`` attribute that is not
    None; its BatchNorm parameters are then not adapted in the inner loop. The annealing
    schedules read the learner's meta-iteration counter, which restarts with every
    ``init_optimizer`` (every ``meta_fit``). The options are saved with the meta-learned
    initialization (see :meth:`get_config`).
    """

    name = "mamlpp"
    first_order = False

    def __init__(
        self,
        *,
        learn_inner_lr: bool = True,
        multi_step_loss: bool = True,
        msl_iterations: int | float = 0.1,
        first_order_iterations: int | float = 0,
        cosine_meta_lr: bool = True,
        min_meta_lr: float = 1e-5,
        checkpoint: bool = False,
    ):
        _iterations(msl_iterations, 1, "msl_iterations")
        _iterations(first_order_iterations, 1, "first_order_iterations")
        if not (isinstance(min_meta_lr, (int, float)) and min_meta_lr >= 0):
            raise ValueError(f"min_meta_lr must be a number >= 0, got {min_meta_lr!r}.")
        self.learn_inner_lr = bool(learn_inner_lr)
        self.multi_step_loss = bool(multi_step_loss)
        self.msl_iterations = msl_iterations
        self.first_order_iterations = first_order_iterations
        self.cosine_meta_lr = bool(cosine_meta_lr)
        self.min_meta_lr = float(min_meta_lr)
        self.checkpoint = bool(checkpoint)

    def get_config(self):
        return {
            "learn_inner_lr": self.learn_inner_lr,
            "multi_step_loss": self.multi_step_loss,
            "msl_iterations": self.msl_iterations,
            "first_order_iterations": self.first_order_iterations,
            "cosine_meta_lr": self.cosine_meta_lr,
            "min_meta_lr": self.min_meta_lr,
            **({"checkpoint": True} if self.checkpoint else {}),
        }

    # ------------------------------------------------------------------ engine hooks

    def step_dependent_forward(self, module):
        return getattr(module, "bn_steps", None) is not None

    def adapted_names(self, ctx):
        if not self.step_dependent_forward(ctx.module):
            return None
        norms = set(ctx.module.norm_parameter_names())
        return [name for name, _ in ctx.module.named_parameters() if name not in norms]

    def extra_parameters(self, ctx):
        if not self.learn_inner_lr:
            return {}
        steps = max(int(ctx.inner_steps), 1)
        names = self.adapted_names(ctx) or [n for n, _ in ctx.module.named_parameters()]
        p = next(ctx.module.parameters())
        return {
            _PREFIX + name: torch.full(
                (steps,), float(ctx.inner_lr), dtype=p.dtype, device=p.device
            ).requires_grad_(True)
            for name in names
        }

    @property
    def uses_inner_lr(self) -> bool:
        return not self.learn_inner_lr  # the learned per-step rates otherwise

    def inner_lr(self, ctx, base=None, steps=None):
        """One rate (dict) per inner step; steps past the learned ones reuse the last."""
        learned = max(int(ctx.inner_steps), 1)
        steps = learned if steps is None else max(int(steps), 1)
        if not self.learn_inner_lr:
            return [ctx.inner_lr if base is None else base] * steps
        tensors = {name[len(_PREFIX) :]: v for name, v in ctx.extras.items()}
        return [
            {name: v[min(k, learned - 1)] for name, v in tensors.items()} for k in range(steps)
        ]

    def make_optimizer(self, params, meta_lr, total_iterations):
        total = max(int(total_iterations), 1)
        optimizer = torch.optim.Adam(params, lr=meta_lr)
        if not self.cosine_meta_lr:
            return optimizer, None
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total, eta_min=min(self.min_meta_lr, meta_lr)
        )
        return optimizer, scheduler

    # ------------------------------------------------------------------ meta-gradient

    def step_weights(self, steps: int, iteration: int, total_iterations: int):
        """Multi-step loss weights at ``iteration`` of ``total_iterations``; None for the
        last step only."""
        until = _iterations(self.msl_iterations, max(int(total_iterations), 1), "msl_iterations")
        if not self.multi_step_loss or steps < 2 or iteration >= until:
            return None
        return per_step_loss_weights(steps, iteration, until)

    def is_first_order(self, iteration: int, total_iterations: int) -> bool:
        """Whether meta-iteration ``iteration`` uses first-order meta-gradients (DA)."""
        total = max(int(total_iterations), 1)
        return iteration < _iterations(self.first_order_iterations, total, "")

    def meta_gradients(self, ctx, batches):
        first_order = self.is_first_order(ctx.iteration, ctx.total_iterations)
        steps = int(ctx.inner_steps)
        weights = self.step_weights(steps, ctx.iteration, ctx.total_iterations)
        total = sum(b.n_tasks for b in batches)
        query_forward = ctx.forward_after(steps)  # the last step's BatchNorm set
        loss = 0.0
        reported = 0.0
        for batch in batches:
            step_losses: list[torch.Tensor] = []

            def on_step(step, params, batch=batch, step_losses=step_losses):
                out = ctx.forward_at(step)(params, batch.X_query)
                step_losses.append(
                    task_losses(ctx.loss_fn, out, batch.y_query, batch.query_mask).sum()
                )

            phi = ctx.adapt(
                batch.X_support,
                batch.y_support,
                create_graph=not first_order,
                on_step=on_step if weights is not None else None,
                keep_shared=True,
                mask=batch.support_mask,
                checkpoint=self.checkpoint,
                factored=True,
            )
            if weights is None:
                out = query_forward(phi, batch.X_query)
                last = task_losses(ctx.loss_fn, out, batch.y_query, batch.query_mask).sum()
                loss = loss + last / total
            else:
                last = step_losses[-1]
                w = weights.to(dtype=last.dtype, device=last.device)
                loss = loss + sum(w[k] * step_losses[k] for k in range(steps)) / total
            reported = reported + last.detach() / total
        meta_params = ctx.meta_parameters()
        grads = torch.autograd.grad(loss, meta_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, grads)]
        return torch.as_tensor(reported), grads
