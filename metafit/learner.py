"""The meta-learner: a module, its meta-learned tensors, and one meta-step.

:class:`MetaLearner` is the engine object the estimators delegate to. It owns the
``nn.Module`` whose parameters are the meta-learned initialization ``theta``, the extra
meta-learned tensors of the algorithm (Meta-SGD's learning rates), the meta-optimizer, and
the batched forward. It is the :class:`metafit.algorithms.base.AdaptationContext` its
algorithm reads: the algorithm decides, the learner holds the state. It trusts its inputs:
validation happens in the estimators and task constructors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metafit._task_types import Task, TaskBatch, chunk_batches
from metafit.algorithms import MetaAlgorithm, get_algorithm
from metafit.functional import (
    LOSSES,
    Params,
    inner_loop,
    make_forward,
    make_grad_fn,
    resolve_strategy,
    rows_independent,
)

__all__ = ["MetaLearner", "GradientHook"]

#: Called on the list of meta-gradients before the optimizer step (distributed averaging).
GradientHook = Callable[[list[Tensor]], None]


class MetaLearner:
    """Meta-learned initialization plus the machinery to adapt and meta-train it.

    Parameters
    ----------
    module : nn.Module
        The network; its parameters are the initialization being meta-learned.
    loss : {"mse", "cross_entropy"}
        Task loss.
    algorithm : str or MetaAlgorithm
        See :data:`metafit.algorithms.ALGORITHMS`.
    inner_lr : float
        Inner-loop learning rate (the starting value of Meta-SGD's learned rates).
    inner_steps : int
        Inner-loop steps.
    forward : {"auto", "mlp", "vmap", "loop"}, default="auto"
        Batched forward strategy, see :func:`metafit.functional.make_forward`.
    inner_grad : {"auto", "autograd"}, default="auto"
        How the inner loop differentiates the support loss: ``"auto"`` uses the
        strategy's gradient function where it has one (the analytic gradient of the
        ``"mlp"`` strategy for the built-in losses), ``"autograd"`` always
        ``torch.autograd.grad``. Both give the same numbers; ``"auto"`` is faster.
    device : str or torch.device, default="cpu"
    dtype : torch.dtype, default=torch.float32
    meta_batch_chunk : int, optional
        Compute each meta-gradient over at most this many tasks at a time and sum the
        pieces, weighted by their share: the same meta-gradient, with the memory of one
        piece (second-order graphs are freed after each).
    low_rank : bool, optional
        How the ``"mlp"`` strategy adapts a meta-batch's wide layers: None (default) keeps
        a layer as the initialization plus the low-rank change of every step while that
        is measured faster, True wherever it can, False never (dense per-task copies).
        The results are the same to rounding; see :mod:`metafit._low_rank`.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        loss: str,
        algorithm: str | MetaAlgorithm,
        inner_lr: float,
        inner_steps: int,
        forward: str = "auto",
        inner_grad: str = "auto",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        meta_batch_chunk: int | None = None,
        low_rank: bool | None = None,
    ):
        if low_rank not in (None, True, False):
            raise ValueError(f"low_rank must be None, True or False, got {low_rank!r}.")
        #: the low-rank policy of the inner loop (see :mod:`metafit._low_rank`)
        self.low_rank = low_rank
        self.device = torch.device(device)
        #: tasks per piece of a meta-step (memory of one piece at a time), None: all
        self.meta_batch_chunk = meta_batch_chunk
        self.dtype = dtype
        self.module = module.to(device=self.device, dtype=dtype)
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]
        self.algorithm = get_algorithm(algorithm)
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.strategy = resolve_strategy(self.module, forward)
        self.forward = make_forward(self.module, self.strategy)
        #: pad ragged meta-batches into one batch with row masks (no batch statistics)
        self.pad_ragged = rows_independent(self.module)
        if inner_grad not in ("auto", "autograd"):
            raise ValueError(f"inner_grad must be 'auto' or 'autograd', got {inner_grad!r}.")
        self.inner_grad = inner_grad
        # MAML++'s per-step BatchNorm: the forward of step k is the module's own at step k
        # (looked up at call time, so a replaced batched_forward is seen).
        self.step_dependent = self.algorithm.step_dependent_forward(self.module)
        self.grad_fn = (
            make_grad_fn(self.module, self.strategy, self.loss_fn)
            if inner_grad == "auto" and not self.step_dependent
            else None
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        #: meta-steps since :meth:`init_optimizer`, and how many it planned (the
        #: algorithms' schedules read them; see :class:`AdaptationContext`)
        self.iteration = 0
        self.total_iterations = 0
        self.extras: dict[str, Tensor] = self.algorithm.extra_parameters(self)
        # Where each parameter lives: params() reads these dicts instead of walking the
        # module tree (a few microseconds of every few-shot fit); a reassigned parameter
        # is still found.
        self._slots = []
        for name, _ in self.module.named_parameters():
            owner, _, leaf = name.rpartition(".")
            self._slots.append((name, self.module.get_submodule(owner)._parameters, leaf))
        self._adapted: tuple[MetaAlgorithm, list[str] | None] | None = None
        self._derived: dict[str, tuple] = {}

    # ------------------------------------------------------------------ parameters

    def params(self) -> Params:
        """The initialization ``theta``: the module's parameters, by name."""
        return {name: owner[leaf] for name, owner, leaf in self._slots}

    def from_extras(self, name: str, compute: Callable[[], Any], uses: Sequence[str]) -> Any:
        """``compute()``, a value of the extras named in ``uses`` alone, kept under
        ``name`` while they are unchanged and no graph is recorded (``fit``'s case:
        ALPACA's prior).

        Under autograd it is computed every time, so that meta-gradients flow. Unchanged
        means the same tensors holding the same values (``torch.equal`` with a copy: one
        kernel each, where the version counter is not bumped by every optimizer), so an
        optimizer step, a load or any other write recomputes it.
        """
        if torch.is_grad_enabled():
            return compute()
        now = [self.extras[k] for k in uses]
        kept = self._derived.get(name)
        if kept is not None and _same_tensors(now, kept[0]):
            return kept[1]
        value = compute()
        self._derived[name] = ([(t, t.detach().clone()) for t in now], value)
        return value

    def _step_forward(self, params, X: Tensor, step: int) -> Tensor:
        return self.module.batched_forward(params, X, step=step)

    def forward_at(self, step: int | None):
        """The batched forward of inner step ``step`` (:attr:`forward` unless the
        algorithm's forward depends on the step)."""
        if not self.step_dependent or step is None:
            return self.forward
        return lambda params, X: self._step_forward(params, X, step)

    def forward_after(self, steps: int):
        """The forward for the query after ``steps`` inner steps: the last step's (MAML++'s
        per-step BatchNorm), or the plain one when no step ran."""
        return self.forward_at(self.last_step(steps))

    @staticmethod
    def last_step(steps: int) -> int:
        """Index of the last of ``steps`` inner steps (0 when none ran): the forward whose
        per-step BatchNorm set predicts after them (MAML++)."""
        return max(int(steps) - 1, 0)

    def adapted_names(self) -> list[str] | None:
        """Names of the parameters the inner loop adapts (None: all), computed once."""
        if self._adapted is None or self._adapted[0] is not self.algorithm:
            self._adapted = (self.algorithm, self.algorithm.adapted_names(self))
        return self._adapted[1]

    def meta_parameters(self) -> list[Tensor]:
        """All meta-learned tensors: ``theta`` first, then the algorithm's extras."""
        return [*self.module.parameters(), *self.extras.values()]

    def state_tensors(self) -> dict[str, Tensor]:
        """Detached copies of ``theta`` and the extras (``extra.``-prefixed), for saving."""
        out = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        out.update({f"extra.{k}": v.detach().clone() for k, v in self.extras.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (in place, keeping optimizer references)."""
        module_state = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
        self.module.load_state_dict(module_state)
        with torch.no_grad():
            for k, v in self.extras.items():
                v.copy_(tensors[f"extra.{k}"])

    # ------------------------------------------------------------------ adaptation

    def as_tensors(self, X, y=None) -> tuple[Tensor, Tensor | None]:
        """Convert arrays to tensors of the learner's device and dtypes."""
        X = torch.as_tensor(X, dtype=self.dtype, device=self.device)
        if y is None:
            return X, None
        y_dtype = torch.long if self.loss_name == "cross_entropy" else self.dtype
        return X, torch.as_tensor(y, dtype=y_dtype, device=self.device)

    def batches(self, tasks: Sequence[Task] | TaskBatch) -> list[TaskBatch]:
        """Stack tasks into batches on the learner's device: tasks that differ in their
        numbers of rows padded into one, with row masks (unless the module's rows are not
        independent, :attr:`pad_ragged`; then one batch per shape). A :class:`TaskBatch`
        (a source's own) is moved to the device and dtypes as it is."""
        target = torch.long if self.loss_name == "cross_entropy" else self.dtype
        if isinstance(tasks, TaskBatch):  # stacked by its source already
            return [tasks.to(self.device, self.dtype, target)]
        return TaskBatch.from_tasks(
            tasks, device=self.device, dtype=self.dtype, target_dtype=target,
            pad=self.pad_ragged,
        )

    # Long function: 85 lines, of which 40 are the numpydoc of its 12 options; the body
    # hands them to the one inner loop (or to a closed-form algorithm's posterior).
    def adapt(
        self,
        X: Tensor,
        y: Tensor,
        *,
        steps: int | None = None,
        inner_lr: float | None = None,
        create_graph: bool = False,
        track_graph: bool = True,
        on_step=None,
        keep_shared: bool = False,
        mask: Tensor | None = None,
        checkpoint: bool = False,
        factored: bool = False,
        predictive: bool = True,
    ) -> Params:
        """Run the inner loop from ``theta`` on a batch of support sets.

        This is what meta-training adapts with, and what the estimators' ``fit`` calls
        with one task (``T = 1``), for which the inner loop drops the task dimension.

        Parameters
        ----------
        X, y : Tensor
            Support sets with a leading task dimension.
        steps : int, optional
            Defaults to ``inner_steps``.
        inner_lr : float, optional
            The plain learning rate for this call instead of :attr:`inner_lr`, which is
            left unchanged (so that threads may adapt with one learner at several rates).
            Learned rates (Meta-SGD's) are used whatever the value.
        create_graph, track_graph, on_step
            See :func:`metafit.functional.inner_loop`. ``track_graph=False`` also
            detaches the learning rates (no meta-gradient at all).
        keep_shared : bool, default=False
            Leave never-updated parameters without the task dimension (for
            :attr:`forward` only); see :func:`metafit.functional.inner_loop`.
        mask : Tensor of shape (T, n), optional
            The real rows of padded support sets (``TaskBatch.support_mask``).
        checkpoint : bool, default=False
            Recompute each inner step in the backward pass instead of keeping its graph
            (second order only); see :func:`metafit.functional.inner_loop`.
        factored : bool, default=False
            The caller reads the results only through :attr:`forward` (or
            :meth:`predict`), so wide layers may come back factored
            (:class:`~metafit._inner_types.LowRankWeight`), as :attr:`low_rank` says.
        predictive : bool, default=True
            A closed-form algorithm also computes what :meth:`predict_distribution` reads
            beyond the mean (ALPACA's per-task noise statistics); False for callers that
            read :meth:`predict` alone (an ensemble's members).

        Returns
        -------
        dict of str to Tensor
            Adapted parameters with the task dimension.
        """
        if self.algorithm.closed_form:  # ALPACA's posterior: no steps, no learning rate
            return self.algorithm.adapt(self, X, y, track_graph=track_graph, mask=mask,
                                        predictive=predictive)
        # With track_graph=False the loop runs outside autograd and detaches what it
        # returns: the learning rates need no detaching here.
        steps = self.inner_steps if steps is None else int(steps)
        base = None if inner_lr is None or inner_lr == self.inner_lr else float(inner_lr)
        return inner_loop(
            self.forward,
            self.loss_fn,
            self.params(),
            X,
            y,
            steps=steps,
            lr=self.algorithm.inner_lr(self, base, steps=steps),
            adapt=self.adapted_names(),
            create_graph=create_graph,
            track_graph=track_graph,
            on_step=on_step,
            grad_fn=self.grad_fn,
            shared=True,
            keep_shared=keep_shared,
            step_forward=self._step_forward if self.step_dependent else None,
            mask=mask,
            proximal=self.algorithm.proximal,
            checkpoint=checkpoint,
            factored=factored,
            low_rank=self.low_rank,
        )

    @torch.no_grad()
    def predict(self, params: Params, X: Tensor, step: int | None = None) -> Tensor:
        """Outputs of the network with batched ``params`` on ``X`` (leading task dim).

        ``step`` is the inner step whose forward to use when the forward depends on it
        (MAML++'s per-step BatchNorm: the last step adaptation ran). The algorithm
        decides (ALPACA predicts with its posterior head).
        """
        return self.algorithm.predict(self, params, X, step)

    @torch.no_grad()
    def predict_distribution(self, params: Params, X: Tensor) -> tuple[Tensor, Tensor]:
        """Predictive mean and variance (Bayesian algorithms); NotImplementedError else."""
        return self.algorithm.predictive(self, params, X)

    def evaluate(self, tasks: Sequence[Task], steps: int | None = None) -> float:
        """Mean query loss after adaptation, over ``tasks`` (no meta-gradient)."""
        total, loss = 0, 0.0
        steps = self.inner_steps if steps is None else int(steps)
        for batch in self.batches(tasks):
            phi = self.adapt(batch.X_support, batch.y_support, steps=steps, track_graph=False,
                             mask=batch.support_mask, factored=True)
            with torch.no_grad():
                q = self.algorithm.evaluation_losses(self, phi, batch, self.last_step(steps))
            loss += float(q.sum())
            total += batch.n_tasks
        return loss / total

    # ------------------------------------------------------------------ meta-training

    def init_optimizer(self, meta_lr: float | None, total_iterations: int) -> None:
        """Create the meta-optimizer (and scheduler) chosen by the algorithm."""
        lr = self.algorithm.default_meta_lr if meta_lr is None else float(meta_lr)
        self.optimizer, self.scheduler = self.algorithm.make_optimizer(
            self.meta_parameters(), lr, total_iterations
        )
        self.iteration = 0
        self.total_iterations = int(total_iterations)

    def meta_gradients(self, batches: list[TaskBatch]) -> tuple[Tensor, list[Tensor]]:
        """The algorithm's meta-loss and meta-gradients, in pieces of at most
        ``meta_batch_chunk`` tasks when that is set (each piece's graph is freed before
        the next is built)."""
        chunk = self.meta_batch_chunk
        total = sum(b.n_tasks for b in batches)
        if chunk is None or total <= chunk:
            return self.algorithm.meta_gradients(self, batches)
        loss, grads = None, None
        for piece in chunk_batches(batches, chunk):
            share = sum(b.n_tasks for b in piece) / total
            part_loss, part = self.algorithm.meta_gradients(self, piece)
            if grads is None:
                loss, grads = part_loss * share, [g * share for g in part]
            else:
                loss = loss + part_loss * share
                for g, p in zip(grads, part):
                    g.add_(p, alpha=share)
        return loss, grads

    def meta_step(
        self,
        batches: list[TaskBatch],
        *,
        grad_hook: GradientHook | None = None,
        clip_grad_norm: float | None = None,
    ) -> float:
        """One meta-update from a meta-batch; returns the meta-batch's query loss.

        Parameters
        ----------
        batches : list of TaskBatch
            The meta-batch, as equal-shape groups.
        grad_hook : callable, optional
            Receives the meta-gradients before the update and may change them in place
            (all-reduce for distributed training).
        clip_grad_norm : float, optional
            Clip the total meta-gradient norm to this value.
        """
        if self.optimizer is None:
            raise RuntimeError("call init_optimizer before meta_step.")
        loss, grads = self.meta_gradients(batches)
        if grad_hook is not None:
            grad_hook(grads)
        params = self.meta_parameters()
        for p, g in zip(params, grads):
            p.grad = g.detach()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        fast_step = getattr(self.optimizer, "fast_step", None)  # LeanAdam
        if fast_step is not None:
            fast_step()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        for p in params:  # zero_grad(set_to_none=True) without its bookkeeping
            p.grad = None
        self.iteration += 1
        return float(loss)


def _same_tensors(now: Sequence[Tensor], saved: Sequence[tuple[Tensor, Tensor]]) -> bool:
    """Whether ``now`` are the very tensors of ``saved`` (``(tensor, copy)`` pairs), still
    holding the copies' values."""
    return len(now) == len(saved) and all(
        t is kept and t.dtype == copy.dtype and t.device == copy.device and torch.equal(t, copy)
        for t, (kept, copy) in zip(now, saved)
    )
