"""The interface every meta-learning algorithm implements, and the gradient-based default.

An algorithm is a small, stateless policy. It reads an :class:`AdaptationContext` (the
learner's module, losses, extra tensors, inner-loop settings and meta-iteration counter)
and never assigns to it. It says which parameters the inner loop adapts and at which
rates, which extra tensors it meta-learns, which meta-optimizer it wants, whether its
forward depends on the inner step, and how a meta-batch becomes meta-gradients. Applying
those gradients (and averaging them across processes) happens outside, in
:meth:`metafit.learner.MetaLearner.meta_step`. Its options (:meth:`MetaAlgorithm.get_config`)
are saved with the meta-learned initialization, so that ``fit`` rebuilds the algorithm that
was meta-trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from metafit import _torch_compat as compat
from metafit._inner_types import Params
from metafit.losses import task_losses

if TYPE_CHECKING:
    from metafit._task_types import TaskBatch

__all__ = ["AdaptationContext", "MetaAlgorithm", "GradientMetaAlgorithm", "LeanAdam"]

BatchedForward = Callable[..., Tensor]


class AdaptationContext(Protocol):
    """What an algorithm may read of the learner it serves (and call, never assign).

    :class:`metafit.learner.MetaLearner` is the implementation; tests may pass any object
    with these members.
    """

    module: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    extras: Mapping[str, Tensor]
    inner_lr: float
    #: inner steps of meta-training (the number of per-step rates MAML++ learns)
    inner_steps: int
    #: meta-steps taken since the meta-optimizer was made, and how many are planned
    iteration: int
    total_iterations: int

    def params(self) -> Params: ...

    def from_extras(self, name: str, compute: Callable[[], Any], uses: Sequence[str]
                    ) -> Any: ...

    def meta_parameters(self) -> list[Tensor]: ...

    def forward(self, params: Mapping[str, Tensor], X: Tensor) -> Tensor: ...

    def forward_at(self, step: int) -> BatchedForward: ...

    def forward_after(self, steps: int) -> BatchedForward: ...

    def adapt(
        self,
        X: Tensor,
        y: Tensor,
        *,
        steps: int | None = None,
        create_graph: bool = False,
        track_graph: bool = True,
        on_step: Callable[[int, Params], None] | None = None,
        keep_shared: bool = False,
        mask: Tensor | None = None,
        checkpoint: bool = False,
        factored: bool = False,
        predictive: bool = True,
    ) -> Params: ...


class LeanAdam(torch.optim.Adam):
    """Fused Adam whose step goes straight to the fused kernel.

    ``torch.optim.Adam.step`` spends about 0.1 ms in Python bookkeeping per call, as much
    as 5% of a small meta-step. Once the state exists, this class calls the same fused
    kernel directly (:func:`metafit._torch_compat.fused_adam_`); anything unusual (a
    closure, several groups, weight decay, amsgrad, maximize, a missing gradient, a step
    hook, a torch without the kernel) takes the ordinary path. Same numbers, same state,
    same ``state_dict``.
    """

    def _fast_ok(self) -> bool:
        group = self.param_groups[0]
        return (
            compat.HAS_FUSED_ADAM
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
        beta1, beta2 = group["betas"]
        compat.fused_adam_(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
        )

    def step(self, closure=None):
        if closure is None and self._fast_ok():
            self._fused_step()
            return None
        return super().step(closure)

    def fast_step(self) -> None:
        """:meth:`step` without the hook wrapper, unless step hooks are registered."""
        if compat.optimizer_hooks_registered(self) or not self._fast_ok():
            self.step()
            return
        self._opt_called = True  # what an LR scheduler's step-counting wrapper records
        self._fused_step()


class MetaAlgorithm:
    """Base class of the algorithms; subclasses set the class attributes and override hooks.

    Every hook is a pure function of its arguments and the algorithm's options: an
    algorithm holds no state that meta-training changes, so one instance may serve any
    number of learners, threads and clones.

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
    #: adaptation is the algorithm's own :meth:`adapt` (a closed form), not the inner loop
    closed_form: ClassVar[bool] = False
    #: a model of real targets only (ALPACA's Gaussian likelihood)
    regression_only: ClassVar[bool] = False
    #: strength of a proximal term ``lam / 2 ||phi - theta||^2`` added to the inner
    #: objective, in meta-training and in ``fit`` (iMAML's); None for none
    proximal: float | None = None

    @property
    def uses_inner_lr(self) -> bool:
        """Whether ``fit`` reads ``inner_lr`` (not with learned rates or a closed form)."""
        return not self.closed_form

    @property
    def uses_inner_steps(self) -> bool:
        """Whether ``fit`` reads ``inner_steps`` (not with a closed form)."""
        return not self.closed_form

    @property
    def keeps_inner_graph(self) -> bool:
        """Whether meta-training keeps every inner step's graph (memory grows with them)."""
        return not self.first_order and not self.closed_form

    def default_module(self, n_features: int, n_outputs: int, hidden_sizes, activation):
        """``(module, constructor kwargs)`` of the network the estimator builds when it is
        given none, or None for the default :class:`metafit.models.MLP` (CAVIA's has a
        context input)."""
        return None

    def module_outputs(self, n_outputs: int) -> int:
        """Outputs of the network for ``n_outputs`` targets (ALPACA's: its features)."""
        return n_outputs

    def adapt(
        self, ctx: AdaptationContext, X: Tensor, y: Tensor, *, track_graph: bool = True,
        mask: Tensor | None = None, predictive: bool = True,
    ):
        """Closed-form adaptation of ``closed_form`` algorithms: the adapted "parameters"
        that :meth:`predict` reads (``mask``: the real rows of padded tasks), and with
        ``predictive`` also what :meth:`predictive` reads beyond them (False: the caller
        reads the mean alone). Gradient-based algorithms use the inner loop."""
        raise NotImplementedError

    def predictive(self, ctx: AdaptationContext, adapted, X: Tensor):
        """Predictive mean and variance, each (T, n), of Bayesian algorithms (ALPACA)."""
        raise NotImplementedError(
            f"algorithm {self.name!r} has no predictive distribution; 'alpaca' has one."
        )

    def calibrated_extras(self, ctx: AdaptationContext, batches) -> dict[str, Tensor]:
        """New values of extra tensors fitted on held-out meta-batches after meta-training
        (ALPACA's noise level, so that its predictive variance matches new tasks' query
        residuals); none by default. Reads ``ctx``, changes nothing."""
        return {}

    def fitted_extras(self, ctx: AdaptationContext, groups) -> dict[str, Tensor]:
        """New values of extra tensors estimated in closed form from the meta-training
        groups of a table, replacing what meta-training learned (``"lmm"``'s prior, by
        REML); none by default. ``groups`` is a list of ``(X, y)`` tensors, each one
        group's rows whole, in the standardized units of meta-training. Table mode calls
        it before the validation groups score the result (and before
        :meth:`calibrated_extras`). Reads ``ctx``, changes nothing."""
        return {}

    def predict(self, ctx: AdaptationContext, adapted, X: Tensor, step: int | None = None):
        """Outputs for ``X`` (leading task dimension) from adapted parameters: the
        network's forward (of inner step ``step`` where the forward depends on it)."""
        return ctx.forward_at(step)(adapted, X)

    def evaluation_losses(self, ctx: AdaptationContext, adapted, batch: TaskBatch,
                          step: int | None = None) -> Tensor:
        """Per-task loss of adapted parameters on the query sets, which validation
        reports and keeps the best state by: the task loss of :meth:`predict`'s outputs
        (ALPACA's: the negative log predictive likelihood, so that the state kept is
        calibrated as well as accurate)."""
        out = self.predict(ctx, adapted, batch.X_query, step)
        return task_losses(ctx.loss_fn, out, batch.y_query, batch.query_mask)

    def get_config(self) -> dict[str, Any]:
        """The algorithm's options, JSON-able: ``type(self)(**get_config())`` rebuilds it.

        Saved with the meta-learned initialization (``MetaInit.metadata``) so that ``fit``,
        ``clone`` and ``meta_init=`` rebuild the algorithm that was meta-trained.
        """
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MetaAlgorithm:
        """Rebuild the algorithm from :meth:`get_config`'s output, also one saved by an
        earlier version (an algorithm that gained an option says here what its absence
        meant)."""
        return cls(**config)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({options})"

    def extra_parameters(self, ctx: AdaptationContext) -> dict[str, Tensor]:
        """New tensors meta-learned besides the initialization (none by default)."""
        return {}

    def adapted_names(self, ctx: AdaptationContext) -> list[str] | None:
        """Names of the parameters the inner loop adapts; None for all."""
        return None

    def step_dependent_forward(self, module: nn.Module) -> bool:
        """Whether the forward of inner step ``k`` differs from the others (MAML++'s
        per-step BatchNorm); the learner then calls ``module.batched_forward(..., step=k)``.
        """
        return False

    def inner_lr(
        self, ctx: AdaptationContext, base: float | None = None, steps: int | None = None
    ):
        """Learning rate(s) of the inner loop, as :func:`metafit.functional.inner_loop` takes.

        ``base`` is the plain rate to use instead of ``ctx.inner_lr`` (an estimator's
        ``fit`` with another ``inner_lr`` than meta-training had); learned rates ignore it.
        ``steps`` is the number of steps about to run (per-step rates need it).
        """
        return ctx.inner_lr if base is None else base

    def fit_warning(self, fit_steps: int, trained_steps: int | None) -> str | None:
        """A warning for ``fit`` with ``fit_steps`` inner steps from an initialization
        meta-trained with ``trained_steps``, or None when there is nothing to say."""
        return None

    def make_optimizer(
        self, params: list[Tensor], meta_lr: float, total_iterations: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The meta-optimizer (Adam by default) and an optional per-iteration scheduler."""
        return LeanAdam(params, lr=meta_lr, fused=True), None

    def meta_gradients(
        self, ctx: AdaptationContext, batches: Sequence[TaskBatch]
    ) -> tuple[Tensor, list[Tensor]]:
        """Mean post-adaptation query loss and the gradients of the meta-parameters.

        Returns
        -------
        loss : Tensor
            Detached scalar, the mean query loss over all tasks of ``batches``.
        grads : list of Tensor
            One per entry of ``ctx.meta_parameters()``, in that order.
        """
        raise NotImplementedError


class GradientMetaAlgorithm(MetaAlgorithm):
    """MAML-style meta-gradient: differentiate the query loss through the inner loop.

    A ragged meta-batch arrives padded with row masks (or, for modules with batch
    statistics, as several equal-shape groups, whose losses are weighted by group size):
    either way the result equals the per-task computation averaged over all tasks.
    ``checkpoint`` (an option of MAML and MAML++) recomputes each inner step in the
    backward pass instead of keeping its graph.
    """

    #: recompute the inner steps in the backward pass (gradient checkpointing)
    checkpoint: bool = False

    @property
    def keeps_inner_graph(self) -> bool:
        """Checkpointed steps keep only their parameters, not their graphs."""
        return super().keeps_inner_graph and not self.checkpoint

    def meta_gradients(self, ctx, batches):
        total = sum(b.n_tasks for b in batches)
        meta_params = ctx.meta_parameters()
        parts = []
        for batch in batches:
            phi = ctx.adapt(
                batch.X_support,
                batch.y_support,
                create_graph=not self.first_order,
                keep_shared=True,
                mask=batch.support_mask,
                checkpoint=self.checkpoint,
                factored=True,
            )
            query = task_losses(
                ctx.loss_fn, ctx.forward(phi, batch.X_query), batch.y_query, batch.query_mask
            )
            parts.append(query.mean() if len(batches) == 1 else query.sum() / total)
        loss = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
        grads = torch.autograd.grad(loss, meta_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, grads)]
        return loss.detach(), grads
