"""The meta-training loop: meta-batches in, meta-steps, validation and history out.

The estimators call :func:`meta_train`; the algorithms never see the loop. Extra behaviour
(progress bars, early stopping, checkpoints, distributed averaging) plugs in through
:class:`TrainingCallback` hooks and the ``grad_hook`` of :meth:`MetaLearner.meta_step`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from metafit.learner import GradientHook, MetaLearner
from metafit.tasks import Task

__all__ = ["HistoryRecord", "TrainingCallback", "StopTraining", "meta_train"]


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


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, like StopIteration
    """Raised by a callback to end meta-training cleanly after the current iteration."""


class TrainingCallback:
    """Hooks called by :func:`meta_train`; override the ones you need."""

    def on_train_begin(self, learner: MetaLearner, total: int) -> None:
        """Before the first meta-step."""

    def on_iteration_end(self, learner: MetaLearner, record: HistoryRecord) -> None:
        """After every meta-step; raise :class:`StopTraining` to stop."""

    def on_train_end(self, learner: MetaLearner, history: list[HistoryRecord]) -> None:
        """After the last meta-step, also when stopped early."""


@dataclass
class TrainingResult:
    """What :func:`meta_train` returns."""

    history: list[HistoryRecord] = field(default_factory=list)
    stopped_early: bool = False


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

    Returns
    -------
    TrainingResult
    """
    result = TrainingResult()
    for cb in callbacks:
        cb.on_train_begin(learner, iterations)
    start = time.perf_counter()
    iteration = start_iteration
    try:
        while iteration < iterations:
            batch = next(meta_batches, None)
            if batch is None:
                break
            iteration += 1
            loss = learner.meta_step(
                learner.batches(batch), grad_hook=grad_hook, clip_grad_norm=clip_grad_norm
            )
            val = None
            if validation_tasks and (
                iteration % validation_interval == 0 or iteration == iterations
            ):
                val = learner.evaluate(validation_tasks, steps=validation_steps)
            record = HistoryRecord(iteration, loss, val, time.perf_counter() - start)
            result.history.append(record)
            try:
                for cb in callbacks:
                    cb.on_iteration_end(learner, record)
            except StopTraining:
                result.stopped_early = True
                break
    finally:
        for cb in callbacks:
            cb.on_train_end(learner, result.history)
    return result
