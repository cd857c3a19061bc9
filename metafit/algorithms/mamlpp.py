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

from collections.abc import Sequence

import torch

from metafit.algorithms.base import GradientMetaAlgorithm

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


class _StepCursor:
    """The inner step the forward is at, for per-step BatchNorm."""

    def __init__(self):
        self.step = 0


class _StepForward:
    """``forward(params, X)`` of a per-step-BatchNorm module at the cursor's step."""

    def __init__(self, module, cursor: _StepCursor):
        self.module = module
        self.cursor = cursor

    def __call__(self, params, X):
        return self.module.batched_forward(params, X, step=self.cursor.step)


class _StepRates(Sequence):
    """Per-step learning rates; indexing step ``k`` also moves the cursor to ``k``.

    :func:`metafit.functional.inner_loop` reads ``lr[k]`` right before the forward of
    step ``k``, so the cursor tells the forward which BatchNorm set to use; after the
    loop it stays at the last step, which the query forward then uses (as the paper).
    Steps past the learned ones reuse the last rate (evaluation with more steps).
    """

    def __init__(self, rates: list, cursor: _StepCursor | None):
        self.rates = rates
        self.cursor = cursor
        if cursor is not None:
            cursor.step = 0

    def __len__(self) -> int:
        return len(self.rates)

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.rates[step]
        if self.cursor is not None:
            self.cursor.step = step
        return self.rates[min(step, len(self.rates) - 1)]


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

    Notes
    -----
    Per-step BatchNorm is on when the module has a ``bn_steps`` attribute that is not
    None; its BatchNorm parameters are then not adapted in the inner loop. The
    iteration counter restarts with every ``init_optimizer`` (every ``meta_fit``).
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
        self.iteration = 0
        self._msl_until = _iterations(msl_iterations, 1, "msl_iterations")
        self._first_order_until = _iterations(first_order_iterations, 1, "")
        self._cursor: _StepCursor | None = None

    # ------------------------------------------------------------------ engine hooks

    @staticmethod
    def _per_step_bn(learner) -> bool:
        return getattr(learner.module, "bn_steps", None) is not None

    def adapted_names(self, learner):
        if not self._per_step_bn(learner):
            return None
        norms = set(learner.module.norm_parameter_names())
        return [name for name, _ in learner.module.named_parameters() if name not in norms]

    def extra_parameters(self, learner):
        if self._per_step_bn(learner):
            # The forward must know the inner step; _StepRates moves the cursor.
            self._cursor = _StepCursor()
            learner.forward = _StepForward(learner.module, self._cursor)
            learner.grad_fn = None
        if not self.learn_inner_lr:
            return {}
        steps = max(int(learner.inner_steps), 1)
        names = self.adapted_names(learner) or [n for n, _ in learner.module.named_parameters()]
        p = next(learner.module.parameters())
        return {
            _PREFIX + name: torch.full(
                (steps,), float(learner.inner_lr), dtype=p.dtype, device=p.device
            ).requires_grad_(True)
            for name in names
        }

    def inner_lr(self, learner, base=None):
        steps = max(int(learner.inner_steps), 1)
        if self.learn_inner_lr:
            rates = [
                {name[len(_PREFIX) :]: v[k] for name, v in learner.extras.items()}
                for k in range(steps)
            ]
        else:
            rates = [learner.inner_lr if base is None else base] * steps
        return _StepRates(rates, self._cursor)

    def make_optimizer(self, params, meta_lr, total_iterations):
        total = max(int(total_iterations), 1)
        self.iteration = 0
        self._msl_until = _iterations(self.msl_iterations, total, "msl_iterations")
        self._first_order_until = _iterations(
            self.first_order_iterations, total, "first_order_iterations"
        )
        optimizer = torch.optim.Adam(params, lr=meta_lr)
        if not self.cosine_meta_lr:
            return optimizer, None
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total, eta_min=min(self.min_meta_lr, meta_lr)
        )
        return optimizer, scheduler

    # ------------------------------------------------------------------ meta-gradient

    def step_weights(self, steps: int) -> torch.Tensor | None:
        """Multi-step loss weights at the current iteration; None for the last step only."""
        if not self.multi_step_loss or steps < 2 or self.iteration >= self._msl_until:
            return None
        return per_step_loss_weights(steps, self.iteration, self._msl_until)

    def meta_gradients(self, learner, batches):
        first_order = self.iteration < self._first_order_until
        steps = int(learner.inner_steps)
        weights = self.step_weights(steps)
        total = sum(b.n_tasks for b in batches)
        meta_params = learner.meta_parameters()
        loss = 0.0
        reported = 0.0
        for batch in batches:
            step_losses: list[torch.Tensor] = []

            def on_step(step, params, batch=batch, step_losses=step_losses):
                out = learner.forward(params, batch.X_query)
                step_losses.append(learner.loss_fn(out, batch.y_query).sum())

            phi = learner.adapt(
                batch.X_support,
                batch.y_support,
                create_graph=not first_order,
                on_step=on_step if weights is not None else None,
                keep_shared=True,
            )
            if weights is None:
                out = learner.forward(phi, batch.X_query)
                last = learner.loss_fn(out, batch.y_query).sum()
                loss = loss + last / total
            else:
                last = step_losses[-1]
                w = weights.to(dtype=last.dtype, device=last.device)
                loss = loss + sum(w[k] * step_losses[k] for k in range(steps)) / total
            reported = reported + last.detach() / total
        grads = torch.autograd.grad(loss, meta_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, grads)]
        self.iteration += 1
        return torch.as_tensor(reported), grads
