"""The meta-training loop: meta-batches in, meta-steps, validation and history out.

The estimators call :func:`meta_train`; the algorithms never see the loop. Extra behaviour
(progress bars, early stopping, checkpoints, distributed averaging) plugs in through
:class:`TrainingCallback` hooks (see :mod:`metafit.callbacks`) and the ``grad_hook`` of
:meth:`MetaLearner.meta_step`.

The loop itself guarantees two things whatever happens inside an iteration:

* a ``KeyboardInterrupt`` leaves the learner (its tensors *and* its meta-optimizer) exactly
  as it was after the last completed iteration;
* a NaN or infinite loss or meta-gradient stops training with a :class:`DivergenceError`
  that names the learning rate to lower, again with the last finite state restored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from metafit import _torch_compat as compat
from metafit._task_types import Task
from metafit.learner import GradientHook, MetaLearner

__all__ = [
    "DivergenceError",
    "HistoryRecord",
    "InterruptedTrainingWarning",
    "MetaHistory",
    "StopTraining",
    "TrainingCallback",
    "TrainingResult",
    "TrainingState",
    "meta_train",
]

logger = logging.getLogger(__name__)
# A library logs but never prints by itself: configure the "metafit" logger to see messages.
logging.getLogger("metafit").addHandler(logging.NullHandler())


class DivergenceError(ValueError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient.

    A :class:`ValueError` (the learning rate was a bad value) and a
    :class:`FloatingPointError`. The message names the learning rate to lower. Raised by
    :func:`meta_train`, it carries the partial :class:`TrainingResult` as ``result``.
    """

    result: TrainingResult | None = None


class InterruptedTrainingWarning(UserWarning):
    """Meta-training was interrupted (Ctrl-C); the estimator kept its best state so far."""


@dataclass
class HistoryRecord:
    """One meta-iteration of the history: ``iteration`` counts from 1."""

    iteration: int
    meta_loss: float
    validation_loss: float | None
    time: float

    def as_dict(self) -> dict:
        """The record as a plain dict."""
        return {
            "iteration": self.iteration,
            "meta_loss": self.meta_loss,
            "validation_loss": self.validation_loss,
            "time": self.time,
        }


class MetaHistory(list):
    """The meta-training history: a plain list of dicts, one per meta-iteration.

    Each dict has the keys ``iteration``, ``meta_loss``, ``validation_loss`` (None where
    validation did not run) and ``time`` (seconds since meta-training began, continued
    across warm starts). It pickles like a list and needs nothing but the standard library;
    :meth:`to_frame` turns it into a pandas DataFrame.

    Examples
    --------
    >>> h = MetaHistory([{"iteration": 1, "meta_loss": 2.0, "validation_loss": None,
    ...                   "time": 0.1}])
    >>> h.column("meta_loss")
    [2.0]
    """

    columns = ("iteration", "meta_loss", "validation_loss", "time")

    def __getitem__(self, key):
        """List indexing, plus skorch's ``History`` slicing: ``h[:, "meta_loss"]`` (a
        column), ``h[-1, "validation_loss"]`` (one value)."""
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], str):
            rows, name = key
            if name not in self.columns:
                raise KeyError(f"no column {name!r}; the history has {', '.join(self.columns)}.")
            selected = list.__getitem__(self, rows)
            if isinstance(rows, slice):
                return [row[name] for row in selected]
            return selected[name]
        return list.__getitem__(self, key)

    def column(self, name: str) -> list:
        """The values of one key, in iteration order."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; the history has {', '.join(self.columns)}.")
        return [row[name] for row in self]

    def to_frame(self):
        """The history as a :class:`pandas.DataFrame` indexed by iteration.

        Raises
        ------
        ImportError
            If pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - pandas is a test dependency
            raise ImportError(
                "MetaHistory.to_frame needs pandas: pip install pandas (or use the list of "
                "dicts directly)."
            ) from exc
        frame = pd.DataFrame(list(self), columns=list(self.columns))
        frame["validation_loss"] = frame["validation_loss"].astype(float)
        return frame.set_index("iteration")

    def __repr__(self) -> str:
        return f"MetaHistory({list.__repr__(self)})"


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, like StopIteration
    """Raised by a callback to end meta-training cleanly after the current iteration."""


class TrainingCallback:
    """Hooks called by :func:`meta_train`; override the ones you need.

    The names follow skorch's callbacks (``on_train_begin``, ``on_train_end``), with one
    meta-iteration where skorch has an epoch. Given to an estimator (``callbacks=``), a
    callback is deep-copied for each ``meta_fit`` (the parameter is never changed), the
    copy gets :meth:`initialize` first and is kept in ``callbacks_``.
    """

    def initialize(self, context) -> None:
        """Before ``meta_fit`` trains: ``context`` is a
        :class:`metafit.callbacks.MetaFitContext` (what the run knows: how to build its
        :class:`~metafit.persistence.MetaInit`, whether it validates). Raise here, before
        any work, when the callback cannot serve this run."""

    def on_train_begin(self, learner: MetaLearner, total: int) -> None:
        """Before the first meta-step."""

    def on_iteration_end(self, learner: MetaLearner, record: HistoryRecord) -> None:
        """After every meta-step; raise :class:`StopTraining` to stop."""

    def on_train_end(self, learner: MetaLearner, history: list[HistoryRecord]) -> None:
        """After the last meta-step, also when stopped early, interrupted or diverged."""


@dataclass
class TrainingState:
    """Everything needed to resume meta-training exactly: tensors, optimizer, scheduler.

    Plain tensors and dicts, so it pickles and deep-copies.
    """

    iteration: int
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None

    @classmethod
    def capture(cls, learner: MetaLearner, iteration: int) -> TrainingState:
        """Snapshot ``learner`` (copies, unaffected by later steps)."""
        opt = learner.optimizer
        sched = learner.scheduler
        return cls(
            iteration=int(iteration),
            tensors=learner.state_tensors(),
            optimizer=None if opt is None else _copy_tree(opt.state_dict()),
            scheduler=None if sched is None else _copy_tree(_scheduler_state(sched)),
        )

    def restore(self, learner: MetaLearner, keep_lr: bool = False) -> None:
        """Load this snapshot into ``learner`` (its optimizer must exist for that part).

        Parameters
        ----------
        learner : MetaLearner
        keep_lr : bool, default=False
            Keep the learner's current base learning rates (a warm start with a new
            ``meta_lr``) instead of the saved ones; the moments, step counts and the
            scheduler's progress are restored either way.
        """
        learner.load_state_tensors(self.tensors)
        opt, sched = learner.optimizer, learner.scheduler
        if opt is None or self.optimizer is None:
            return
        fresh = [g.get("initial_lr", g["lr"]) for g in opt.param_groups]
        # Copies: load_state_dict may keep our tensors, which the next step would change.
        opt.load_state_dict(_copy_tree(self.optimizer))
        if sched is not None and self.scheduler is not None:
            sched.load_state_dict(_copy_tree(self.scheduler))
        if keep_lr:
            for group, base in zip(opt.param_groups, fresh):
                old_base = group.get("initial_lr", group["lr"])
                ratio = group["lr"] / old_base if old_base else 1.0
                group["lr"] = base * ratio
                if "initial_lr" in group:
                    group["initial_lr"] = base
            if sched is not None:
                sched.base_lrs = list(fresh)

    def to_cpu(self) -> TrainingState:
        """A copy with every tensor on the CPU (for pickling a GPU-trained estimator)."""
        return TrainingState(
            self.iteration,
            _copy_tree(self.tensors, True),
            _copy_tree(self.optimizer, True),
            _copy_tree(self.scheduler, True),
        )


class _Snapshots:
    """One run's per-iteration :class:`TrainingState`\\ s, reusing the tensors of the
    state that the newest one replaces.

    A full capture clones every parameter and optimizer moment and builds two state
    dicts, 5-10% of a small meta-step. A snapshot into a state this run captured before
    instead copies the learner's current tensors into that state's own with one foreach
    copy. The module's tensors stay the same objects for a run (restores copy into them);
    the optimizer's state tensors are looked up anew each time, since ``load_state_dict``
    replaces them, and any change of structure falls back to a full capture.
    """

    def __init__(self, learner: MetaLearner):
        self.learner = learner
        self.module_sources: list[torch.Tensor] | None = None  # in ``tensors`` order

    def capture(self, iteration: int, spare: TrainingState | None = None) -> TrainingState:
        """A snapshot of the learner now, written into ``spare`` (a state this run
        captured) where possible."""
        if spare is not None and self._refill(spare):
            spare.iteration = int(iteration)
            return spare
        state = TrainingState.capture(self.learner, iteration)
        if self.module_sources is None:
            live = self.learner.module.state_dict(keep_vars=True)
            self.module_sources = [
                self.learner.extras[k[len("extra."):]] if k.startswith("extra.") else live[k]
                for k in state.tensors
            ]
        return state

    def _refill(self, state: TrainingState) -> bool:
        learner, opt = self.learner, self.learner.optimizer
        if self.module_sources is None or len(self.module_sources) != len(state.tensors):
            return False
        state.iteration = -1  # never mistaken for a completed iteration while half-written
        targets, sources = list(state.tensors.values()), list(self.module_sources)
        if state.optimizer is not None:
            saved = state.optimizer["state"]
            if opt is None or len(opt.state) != len(saved):
                return False
            params = [p for group in opt.param_groups for p in group["params"]]
            for i, entry in saved.items():
                live = opt.state[params[i]]
                for key, old in entry.items():
                    value = live.get(key)
                    if not isinstance(old, torch.Tensor):
                        entry[key] = value
                    elif isinstance(value, torch.Tensor):
                        targets.append(old)
                        sources.append(value)
                    else:
                        return False
            for saved_group, group in zip(state.optimizer["param_groups"], opt.param_groups):
                saved_group.update(
                    (k, _copy_tree(v)) for k, v in group.items() if k != "params"
                )
        with torch.no_grad():
            compat.foreach_copy_(targets, sources)
        sched = learner.scheduler
        state.scheduler = None if sched is None else _copy_tree(_scheduler_state(sched))
        return True


def _copy_tree(obj, to_cpu: bool = False):
    """Copy nested dicts and lists, cloning tensors (10x faster than ``copy.deepcopy``)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone() if to_cpu else obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy_tree(v, to_cpu) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_tree(v, to_cpu) for v in obj]
    return obj


def _scheduler_state(scheduler) -> dict:
    # LambdaLR stores its lambdas as None for plain functions; what remains is plain data.
    return {k: v for k, v in scheduler.state_dict().items() if not callable(v)}


@dataclass
class TrainingResult:
    """What :func:`meta_train` returns.

    Attributes
    ----------
    history : list of HistoryRecord
        Records of the iterations completed by this call.
    stopped_early : bool
        A callback raised :class:`StopTraining`.
    interrupted : bool
        A ``KeyboardInterrupt`` ended training (only with ``catch_interrupt=True``).
    last_state : TrainingState
        The learner after the last completed iteration (also loaded into the learner).
    """

    history: list[HistoryRecord] = field(default_factory=list)
    stopped_early: bool = False
    interrupted: bool = False
    last_state: TrainingState | None = None

    @property
    def last_iteration(self) -> int:
        """Number of the last completed iteration (counting warm-started ones)."""
        return 0 if self.last_state is None else self.last_state.iteration


class _NonFiniteGradient(Exception):  # noqa: N818 - internal signal
    pass


def _all_finite(tensors) -> bool:
    """Whether every entry is finite: one fused norm per tensor and a single sync.

    A norm also overflows for entries beyond ~1e19, which counts as diverged too.
    """
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(compat.foreach_norm(tensors))).all())


def _lr_of(learner: MetaLearner) -> float:
    return float(learner.optimizer.param_groups[0]["lr"]) if learner.optimizer else float("nan")


def _adapts_finitely(learner: MetaLearner, batch: Sequence[Task]) -> bool:
    try:
        return math.isfinite(learner.evaluate(batch))
    except RuntimeError:
        return False


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


#: Standardized data stay within a few units; a divergence on data beyond this is blamed on
#: their scale rather than on a learning rate.
_LARGE_DATA = 100.0


def data_scale(**arrays) -> tuple[float, str] | None:
    """``(largest |value|, name)`` of the first of ``arrays`` (name: list of arrays) whose
    values exceed ``_LARGE_DATA``, else None. Only called once something diverged."""
    for what, values in arrays.items():
        values = [np.asarray(v) for v in values]
        values = [v for v in values if np.issubdtype(v.dtype, np.number) and v.size]
        largest = max((float(np.max(np.abs(v))) for v in values), default=0.0)
        if largest > _LARGE_DATA:
            return largest, what
    return None


def _data_scale(batch: Sequence[Task]) -> tuple[float, str] | None:
    return data_scale(
        y=[a for t in batch for a in (t.y_support, t.y_query)],
        X=[a for t in batch for a in (t.X_support, t.X_query)],
    )


def _divergence_message(
    learner: MetaLearner,
    batch: Sequence[Task] | None,
    iteration: int,
    what: str,
    start: TrainingState,
    restored: int,
) -> str:
    """Say what diverged and which learning rate to lower, after the state was restored.

    The meta-update is blamed when it has blown the initialization up (its norm grew more
    than tenfold in this run, or its loss before adaptation is no longer finite); the inner
    loop when the loss is finite before adaptation and not after it.
    """
    meta_lr, inner_lr = _lr_of(learner), learner.inner_lr
    scale = _data_scale(batch) if batch else None
    if scale is not None:
        largest, where = scale
        return (
            f"meta-training diverged at iteration {iteration}: the {what} is NaN or "
            f"infinite, most likely because of the data's scale: {where} of this "
            f"meta-batch reaches {largest:.3g}, and gradient steps on data this large "
            "explode. Standardize the features and targets (e.g. StandardScaler, "
            "TransformedTargetRegressor) rather than lowering the learning rates. The "
            f"meta-parameters were restored to the last finite state (iteration {restored})."
        )
    suspect = "meta_lr"
    before = after = float("nan")
    if batch:
        try:
            before = learner.evaluate(batch, steps=0)
            after = learner.evaluate(batch)
        except RuntimeError:
            pass
    grown = _norm(learner.state_tensors()) > 10 * _norm(start.tensors)
    stepped = iteration - 1 > start.iteration
    if what == "validation loss" or (
        math.isfinite(before) and not math.isfinite(after) and not (stepped and grown)
    ):
        suspect = "inner_lr"
    if suspect == "inner_lr" and not learner.algorithm.uses_inner_lr:
        advice = (
            f"the inner loop diverges with {learner.algorithm.name}'s learned inner rates "
            f"(inner_lr={inner_lr:g} only starts them): lower meta_lr (now {meta_lr:g}), e.g. "
            f"to {meta_lr / 10:g}, or set clip_grad_norm (e.g. 1), so that the rates grow "
            "more slowly"
        )
    elif suspect == "inner_lr":
        advice = (
            f"the inner loop diverges: lower inner_lr (now {inner_lr:g}), e.g. to "
            f"{inner_lr / 10:g}, or use fewer inner steps; if that does not help, lower "
            f"meta_lr (now {meta_lr:g})"
        )
    else:
        advice = (
            f"the meta-update diverges: lower meta_lr (now {meta_lr:g}), e.g. to "
            f"{meta_lr / 10:g}, or set clip_grad_norm (e.g. 10); if that does not help, lower "
            f"inner_lr (now {inner_lr:g})"
        )
    return (
        f"meta-training diverged at iteration {iteration}: the {what} is NaN or infinite; "
        f"{advice}. The meta-parameters were restored to the last finite state "
        f"(iteration {restored})."
    )


# Long function: 99 lines, of which 45 are the numpydoc of its 14 options; the loop itself
# is 40 lines and each iteration's work is _Loop.iterate.
def meta_train(
    learner: MetaLearner,
    meta_batches: Iterator[list[Task]],
    *,
    iterations: int,
    validation_tasks: Sequence[Task] | None = None,
    validation_interval: int = 1,
    validation_steps: int | None = None,
    callbacks: Sequence[TrainingCallback] = (),
    grad_hook: GradientHook | None = None,
    clip_grad_norm: float | None = None,
    start_iteration: int = 0,
    start_time: float = 0.0,
    check_finite: bool = True,
    catch_interrupt: bool = False,
) -> TrainingResult:
    """Run meta-steps until ``iterations`` are done or the meta-batches run out.

    Parameters
    ----------
    learner : MetaLearner
        Its optimizer must be initialized.
    meta_batches : iterator of list of Task
        Already validated meta-batches.
    iterations : int
        Total number of meta-iterations (``start_iteration`` of them already done).
    validation_tasks : sequence of Task, optional
        Evaluated every ``validation_interval`` iterations and at the last one.
    validation_steps : int, optional
        Inner steps for validation; defaults to the learner's.
    callbacks : sequence of TrainingCallback
    grad_hook, clip_grad_norm
        Passed to :meth:`MetaLearner.meta_step`.
    start_iteration : int, default=0
        Iterations already done (warm start); numbering continues from it.
    start_time : float, default=0.0
        Seconds already spent (warm start); the history's ``time`` continues from it.
    check_finite : bool, default=True
        Stop with :class:`DivergenceError` on a NaN or infinite meta-gradient, meta-loss or
        validation loss, after restoring the last finite state. The gradient check runs
        after ``grad_hook``, so all processes of a distributed run agree.
    catch_interrupt : bool, default=False
        On ``KeyboardInterrupt`` the learner is always restored to the last completed
        iteration; with True the interrupt is then swallowed and the result says
        ``interrupted=True``, otherwise it propagates.

    Returns
    -------
    TrainingResult

    Raises
    ------
    DivergenceError
        See ``check_finite``.
    """
    loop = _Loop(learner, start_iteration, grad_hook if not check_finite else None, check_finite)
    if check_finite:
        loop.grad_hook = loop.checked_hook(grad_hook)
    logger.info(
        "meta-training %s with %s from iteration %d to %d",
        type(learner.module).__name__,
        learner.algorithm.name,
        start_iteration,
        iterations,
    )
    for cb in callbacks:
        cb.on_train_begin(learner, iterations)
    loop.start = time.perf_counter() - float(start_time)
    iteration = start_iteration
    result = loop.result
    try:
        while iteration < iterations:
            batch = next(meta_batches, None)
            if batch is None:
                _warn_ran_out(iteration, iterations)
                break
            iteration += 1
            validate = bool(validation_tasks) and (
                iteration % validation_interval == 0 or iteration == iterations
            )
            record = loop.iterate(
                batch, iteration, clip_grad_norm, validation_tasks if validate else None,
                validation_steps,
            )
            try:
                for cb in callbacks:
                    cb.on_iteration_end(learner, record)
            except StopTraining:
                result.stopped_early = True
                logger.info("stopped early after iteration %d", iteration)
                break
    except KeyboardInterrupt:
        loop.restore_after_interrupt()
        if not catch_interrupt:
            raise
    except DivergenceError:
        raise
    except Exception as exc:
        # A task that fails validation late (another feature count at iteration 15), or any
        # other error: the completed iterations are kept, as after an interrupt.
        loop.restore_after_interrupt(interrupted=False)
        with contextlib.suppress(AttributeError):  # exceptions with __slots__
            exc.result = result
        raise
    finally:
        for cb in callbacks:
            cb.on_train_end(learner, result.history)
    return result


def _warn_ran_out(done: int, planned: int) -> None:
    message = (
        f"the tasks ran out after {done} of meta_iterations={planned} meta-iterations; pass "
        "more tasks, an endless sampler (SinusoidTasks, NWayKShotTasks), or fewer "
        "meta_iterations"
    )
    logger.info(message)
    warnings.warn(message + ".", UserWarning, stacklevel=5)


class _Loop:
    """The state of one :func:`meta_train` run: the result so far, the last two states
    (a divergence may need to go one iteration back), and one iteration's work."""

    def __init__(self, learner: MetaLearner, start_iteration: int, grad_hook, check_finite):
        self.learner = learner
        self.result = TrainingResult()
        self.snapshots = _Snapshots(learner)
        self.result.last_state = self.first_state = self.snapshots.capture(start_iteration)
        self.start_iteration = start_iteration
        self.previous_state: TrainingState | None = None
        self.grad_hook = grad_hook
        self.check_finite = check_finite
        self.start = 0.0

    @staticmethod
    def checked_hook(grad_hook):
        def hook(grads):
            if grad_hook is not None:
                grad_hook(grads)
            if not _all_finite(grads):
                raise _NonFiniteGradient

        return hook

    def iterate(self, batch, iteration, clip_grad_norm, validation_tasks, steps):
        """One meta-step (and validation); record it, or raise DivergenceError."""
        learner, diverged = self.learner, None
        try:
            loss = learner.meta_step(
                learner.batches(batch), grad_hook=self.grad_hook, clip_grad_norm=clip_grad_norm
            )
        except _NonFiniteGradient:
            loss, diverged = float("nan"), "meta-gradient"
        if diverged is None and self.check_finite and not math.isfinite(loss):
            diverged = "meta-loss"
        val = None
        if diverged is None and validation_tasks:
            val = learner.evaluate(validation_tasks, steps=steps)
            if self.check_finite and not math.isfinite(val):
                diverged = "validation loss"
        if diverged is not None:
            self.diverged(batch, iteration, diverged)
        record = HistoryRecord(iteration, loss, val, time.perf_counter() - self.start)
        # the state this one replaces lends its tensors (never the run's first state)
        spare = self.previous_state if self.previous_state is not self.first_state else None
        state = self.snapshots.capture(iteration, spare)
        self.previous_state, self.result.last_state = self.result.last_state, state
        self.result.history.append(record)
        logger.debug("iteration %d: meta_loss=%.4g validation_loss=%s", iteration, loss, val)
        return record

    def diverged(self, batch, iteration: int, what: str):
        """Restore the last finite state and raise the DivergenceError that says so."""
        result, learner = self.result, self.learner
        result.last_state.restore(learner)
        if self.previous_state is not None and not _adapts_finitely(learner, batch):
            # The last step may already have ruined the initialization: go one step back,
            # unless the state before it fails on this batch too (then the batch is at
            # fault, and the last step was a good one).
            self.previous_state.restore(learner)
            if _adapts_finitely(learner, batch):
                result.last_state = self.previous_state
                result.history.pop()
            else:
                result.last_state.restore(learner)
        message = _divergence_message(
            learner, batch, iteration, what, self.first_state, result.last_iteration
        )
        logger.error(message)
        error = DivergenceError(message)
        error.result = result
        raise error

    def restore_after_interrupt(self, interrupted: bool = True) -> None:
        # The interrupt may have landed anywhere, even inside an optimizer step, or
        # between taking the snapshot of an iteration and recording it.
        result = self.result
        recorded = result.history[-1].iteration if result.history else self.start_iteration
        if result.last_state.iteration != recorded and self.previous_state is not None:
            result.last_state = self.previous_state
        result.last_state.restore(self.learner)
        result.interrupted = interrupted
        logger.info("meta-training stopped; restored iteration %d", result.last_iteration)
