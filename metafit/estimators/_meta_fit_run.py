"""One ``meta_fit`` call as a small object: check the tasks, train, hand back the result.

:class:`MetaFitRun` does everything :meth:`MetaInitializedEstimator.meta_fit` needs
between validating the parameters and storing the result: it reads the first meta-batch
and the validation tasks (every check that can run before training runs here), finds where
a warm start continues (a typed :class:`WarmStart`), builds the learner through the
:class:`LearnerFactory`, assembles the callbacks the parameters ask for, runs
:func:`metafit.training.meta_train`, and turns its result into a :class:`MetaFitOutcome`.
It never assigns to the estimator: the estimator stores the outcome.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from metafit._checks import is_number
from metafit._memory import available_memory, check_inner_graph_memory, inner_graph_bytes
from metafit._task_types import Task, TaskBatch, check_finite_batch, iter_meta_batches
from metafit._threads import threads_for, torch_threads
from metafit.algorithms import get_algorithm
from metafit.algorithms.base import MetaAlgorithm
from metafit.callbacks import (
    BestState,
    Checkpoint,
    EarlyStopping,
    MetaFitContext,
    ProgressBar,
    check_checkpoint_path,
)
from metafit.distributed import distributed_training
from metafit.estimators._adaptation import (
    choose_adaptation,
    fit_settings,
    search_grid,
    training_steps,
)
from metafit.estimators._inputs import SeededTorch, seed_from
from metafit.estimators._learners import LearnerFactory
from metafit.grouped import GroupEpisodes
from metafit.persistence import MetaInit, module_spec
from metafit.training import (
    DivergenceError,
    InterruptedTrainingWarning,
    MetaHistory,
    TrainingResult,
    TrainingState,
    meta_train,
)

__all__ = ["MetaFitOutcome", "MetaFitRun", "WarmStart"]

_MAX_VALIDATION_TASKS = 100


@dataclass
class WarmStart:
    """Where ``warm_start=True`` continues: the training state and the bookkeeping around.

    ``meta_init`` is the initialization this record belongs to: when the estimator's
    ``meta_init_`` is replaced, only its tensors are known and the record is dropped.
    """

    state: TrainingState
    algorithm: str | None
    history: list = field(default_factory=list)
    time: float = 0.0
    best_loss: float = math.inf
    best_iteration: int | None = None
    best_tensors: dict | None = None
    wait: int = 0
    meta_init: MetaInit | None = None

    @classmethod
    def from_init(cls, init: MetaInit, history: list) -> WarmStart:
        """The record of an initialization read from a file or set by hand."""
        meta = init.metadata
        done = history[-1]["iteration"] if history else meta.get("iteration", 0)
        return cls(
            state=TrainingState(int(done), init.tensors),
            algorithm=meta.get("algorithm"),
            history=history,
            time=history[-1]["time"] if history else 0.0,
            best_loss=float(meta.get("best_validation_loss", math.inf)),
            best_iteration=meta.get("best_iteration"),
            best_tensors=init.tensors if "best_iteration" in meta else None,
        )


@dataclass
class MetaFitOutcome:
    """What a run hands back: the estimator's new ``meta_init_`` and ``meta_history_``,
    the record a later warm start continues, and whether Ctrl-C ended it."""

    meta_init: MetaInit
    history: MetaHistory
    warm: WarmStart
    interrupted: bool
    last_iteration: int


class MetaFitRun:
    """One meta-training run of an estimator (read-only access to its parameters).

    Parameters
    ----------
    est : MetaInitializedEstimator
        Its parameters are read, never assigned (the shell hands over its fitted state
        explicitly, in :meth:`warm_start_point`).
    target : TargetKind
    table_metadata : dict, optional
        Table mode: the preprocessing's ``MetaInit.metadata`` entries (standardization,
        encoding), saved with the initialization; the best validation state is kept.
    """

    def __init__(self, est, target, table_metadata=None):
        self.est = est
        self.target = target
        self.factory = LearnerFactory.of(est, target)
        self.user_callbacks: list[tuple[str, object]] = []
        self.table_metadata = table_metadata
        #: table mode: the episodes' source, whose groups :meth:`_fitted_extras` reads
        self.episodes: GroupEpisodes | None = None

    # ------------------------------------------------------------------ before training

    def read_tasks(self, tasks: Iterable, validation_tasks: Iterable | None):
        """The checked first meta-batch, the stream of the others, the validation tasks."""
        if isinstance(tasks, (Task, np.ndarray)) or not isinstance(tasks, Iterable):
            raise TypeError(
                "tasks must be an iterable of Task or (X_support, y_support, X_query, "
                f"y_query) tuples, got {type(tasks).__name__}."
            )
        # A built-in sampler yields stacked TaskBatches (the same tasks, no Task objects).
        batches = iter_meta_batches(tasks, self.est.meta_batch_size, stacked=True)
        first = next(batches, None)
        if first is None or not len(first):
            raise ValueError("tasks is empty: meta_fit needs at least one task.")
        first_tasks = [self.target.prepare_task(t) for t in first]  # a batch's, one by one
        self._first = first_tasks
        self.feature_shape = first_tasks[0].feature_shape
        self.n_outputs = self.target.meta_outputs(first_tasks)
        self._checked(first_tasks, prepared=True)  # all against the first one
        if not isinstance(first, TaskBatch):
            first = first_tasks
        val = None
        if validation_tasks is not None:
            val = next(iter_meta_batches(validation_tasks, _MAX_VALIDATION_TASKS), [])
            if not val:
                raise ValueError("validation_tasks is empty; pass None or at least one task.")
        val = self._checked(val) if val else None
        if self.est.patience is not None and val is None:
            raise ValueError(
                "patience (early stopping) needs validation_tasks: call "
                "meta_fit(tasks, validation_tasks=held_out_tasks) or set patience=None."
            )
        if isinstance(tasks, GroupEpisodes):
            self.episodes = tasks
        stream = itertools.chain([first], (self._checked(b) for b in batches))
        if self.est.checkpoint_path is not None:
            check_checkpoint_path(self.est.checkpoint_path)  # before any work is done
        self.prepare_user_callbacks(val is not None)
        return stream, val

    def _checked(self, batch, prepared: bool = False) -> list[Task] | TaskBatch:
        """``batch`` (a list of tasks, ``prepared`` already, or a source's TaskBatch)
        checked against the first task's features and targets."""
        if isinstance(batch, TaskBatch):  # in bulk: one reduction per tensor
            if tuple(batch.X_support.shape[2:]) != self.feature_shape:
                raise ValueError(
                    f"a meta-batch has feature shape {tuple(batch.X_support.shape[2:])} but "
                    f"the first task had {self.feature_shape}; all tasks must share their "
                    "features."
                )
            largest = check_finite_batch(batch)
            self.target.check_batch(batch, self.n_outputs, largest)
            return batch
        out = []
        for t in batch:
            t = t if prepared else self.target.prepare_task(t)
            if t.feature_shape != self.feature_shape:
                raise ValueError(
                    f"a task has feature shape {t.feature_shape} but the first task had "
                    f"{self.feature_shape}; all tasks must share their features."
                )
            self.target.check_task(t, self.n_outputs)
            out.append(t)
        return out

    def warm_start_point(
        self, init: MetaInit | None, history: list, saved: WarmStart | None
    ) -> WarmStart | None:
        """Where ``warm_start=True`` continues from.

        ``init`` is the estimator's ``meta_init_`` (with its ``meta_history_`` as
        ``history`` and the record ``saved`` by its last run), else the initialization of
        ``meta_init=`` (no history, no record). A record that belongs to another
        initialization (``meta_init_`` was replaced since) is not used: only the tensors
        are known then.
        """
        if init is None:
            return None
        if saved is not None and saved.meta_init is not init:
            saved = None
        shape = init.metadata.get("feature_shape")
        if (shape is not None and list(shape) != list(self.feature_shape)) or (
            init.n_outputs != self.n_outputs
        ):
            raise ValueError(
                f"warm_start=True continues a meta-initialization for feature shape "
                f"{tuple(shape or ())} and {init.n_outputs} output(s), but these tasks have "
                f"{tuple(self.feature_shape)} and {self.n_outputs}; pass matching tasks or "
                "set warm_start=False to start over."
            )
        if saved is not None:
            return replace(saved, history=history)
        return WarmStart.from_init(init, history)

    # ------------------------------------------------------------------ training

    def run(self, stream, val, resume: WarmStart | None) -> MetaFitOutcome:
        """Meta-train; a DivergenceError carries the outcome so far as ``outcome``."""
        est = self.est
        n_features = int(np.prod(self.feature_shape))
        meta_steps = training_steps(est)
        # Under torchrun / in a process group: this rank's share of each meta-batch.
        parallel = distributed_training(est.meta_batch_size, est.device)
        with parallel, SeededTorch(seed_from(est.random_state), est.device):
            learner, kwargs = self.factory.for_training(n_features, self.n_outputs, meta_steps)
            learner.init_optimizer(est.meta_lr, est.meta_iterations)
            if learner.algorithm.keeps_inner_graph and meta_steps > 0:
                self._check_memory(learner, meta_steps)
            if resume is not None:
                self._restore(learner, resume)
            self._artifact = self._describe(learner, n_features, module_spec(learner.module,
                                                                             kwargs))
            callbacks, best, stopper = self._callbacks(resume, val)
            with torch_threads(threads_for(learner.module, est.n_threads)):
                result = self._train(
                    learner, parallel, stream, val, resume, callbacks, best, stopper
                )
        use_best = (
            result.interrupted or est.patience is not None or self.table_metadata is not None
        )
        outcome = self._outcome(result, resume, best, stopper, use_best, val)
        checkpoint = next((cb for cb in callbacks if isinstance(cb, Checkpoint)), None)
        if checkpoint is not None and parallel.rank == 0 and (use_best or val):
            # the checkpoints wrote the last state; what is kept differs (the best state,
            # the choices and estimates made on the validation and whole groups). Rank 0
            # alone writes files, as it alone keeps the Checkpoint callback.
            checkpoint.save(outcome.meta_init, outcome.meta_init.metadata["iteration"])
        return outcome

    def _check_memory(self, learner, steps: int) -> None:
        """Refuse (or warn about) a second-order run whose graph cannot fit in memory."""
        first = self._first
        module = learner.module
        n_tasks = min(len(first), learner.meta_batch_chunk or len(first))  # one piece
        needed = inner_graph_bytes(
            module, self.feature_shape,
            n_support=max(t.n_support for t in first), n_query=max(t.n_query for t in first),
            n_tasks=n_tasks, steps=steps,
            adapted_names=learner.algorithm.adapted_names(learner),
        )
        device = next(module.parameters(), torch.empty(0)).device
        check_inner_graph_memory(needed, available_memory(device), steps=steps,
                                 n_tasks=n_tasks, algorithm=learner.algorithm.name)

    def _train(self, learner, parallel, stream, val, resume, callbacks, best, stopper):
        est = self.est
        try:
            return meta_train(
                learner,
                parallel.shard(stream),
                iterations=est.meta_iterations,
                validation_tasks=val,
                validation_interval=est.validation_interval,
                validation_steps=self._validation_steps(),
                callbacks=parallel.prepare(learner, callbacks),
                grad_hook=parallel.grad_hook,
                clip_grad_norm=est.clip_grad_norm,
                start_iteration=0 if resume is None else resume.state.iteration,
                start_time=0.0 if resume is None else resume.time,
                catch_interrupt=True,
            )
        except Exception as exc:
            # Keep what was learned up to the last finite (or completed) iteration, then
            # report: a divergence, a task that fails validation late, any other error.
            result = getattr(exc, "result", None)
            if isinstance(result, TrainingResult) and result.history:
                diverged = isinstance(exc, DivergenceError)  # the last finite state, always
                exc.outcome = self._outcome(
                    result, resume, None if diverged else best, stopper,
                    not diverged and est.patience is not None, val,
                )
            raise

    @staticmethod
    def _restore(learner, resume: WarmStart) -> None:
        state = resume.state
        if resume.algorithm != learner.algorithm.name:
            state = TrainingState(state.iteration, state.tensors)  # fresh optimizer
        try:
            state.restore(learner, keep_lr=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(
                "warm_start=True, but the meta-initialization to continue does not fit this "
                f"estimator's module or algorithm ({exc}); use the same module and "
                "algorithm, or set warm_start=False to start over."
            ) from exc

    def _describe(self, learner, n_features: int, spec: dict) -> tuple[dict, dict]:
        metadata = {
            "estimator": self.target.kind,
            "algorithm": learner.algorithm.name,
            "algorithm_options": learner.algorithm.get_config(),
            "inner_lr": float(learner.inner_lr),  # of meta-training
            "inner_steps": self._validation_steps(),
            "meta_inner_steps": int(learner.inner_steps),
            "n_features": n_features,
            "feature_shape": list(self.feature_shape),
            "n_outputs": int(self.n_outputs),
            "loss": self.target.loss,
            "versions": _versions(),
        }
        if self.table_metadata is not None:
            metadata.update(self.table_metadata)
        return metadata, spec

    def _learner_meta_init(self, learner, iteration: int) -> MetaInit:
        """The artifact of ``learner``'s current state (what checkpoints write)."""
        return self.make_meta_init(learner.state_tensors(), iteration)

    def make_meta_init(self, tensors, iteration: int, **extra) -> MetaInit:
        """The artifact of ``tensors`` after ``iteration`` meta-iterations."""
        metadata, spec = self._artifact
        meta = {**metadata, "meta_iterations": int(iteration), "iteration": int(iteration)}
        return MetaInit(tensors, spec, {**meta, **extra})

    def _callbacks(self, resume: WarmStart | None, val):
        """The callbacks the parameters ask for, plus the best-state tracker."""
        est = self.est
        callbacks, best, stopper = [], None, None
        if val is not None:
            best = BestState()
            if resume is not None:
                best = BestState(resume.best_loss, resume.best_iteration, resume.best_tensors)
            callbacks.append(best)
        if est.patience is not None:
            stopper = EarlyStopping(
                int(est.patience),
                float(est.min_delta),
                best_loss=math.inf if resume is None else resume.best_loss,
                wait=0 if resume is None else resume.wait,
            )
            callbacks.append(stopper)
        if est.checkpoint_path is not None:
            callbacks.append(
                Checkpoint(
                    est.checkpoint_path,
                    int(est.checkpoint_interval),
                    self._learner_meta_init,
                )
            )
        if est.verbose is None or est.verbose:
            # None: a bar on a terminal only (never into a redirected file); >= 1: always
            disable = None if est.verbose is None else False
            callbacks.append(ProgressBar(desc=f"meta_fit {type(est).__name__}", disable=disable))
        callbacks += [cb for _, cb in self.user_callbacks]
        return callbacks, best, stopper

    def prepare_user_callbacks(self, has_validation: bool) -> None:
        """Deep copies of the ``callbacks=`` parameter, named and initialized (their
        errors come before any training)."""
        named, seen = [], {}
        for item in self.est.callbacks or ():
            name, cb = item if isinstance(item, tuple) else (type(item).__name__, item)
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f"{name}_{seen[name]}"
            named.append((name, copy.deepcopy(cb)))
        context = MetaFitContext(
            make_meta_init=self._learner_meta_init,
            has_validation=has_validation,
            estimator=type(self.est).__name__,
        )
        for _, cb in named:
            cb.initialize(context)
        self.user_callbacks = named

    def _validation_steps(self) -> int:
        """Steps of the validation adaptations during training: ``fit``'s when given,
        else meta-training's."""
        steps = self.est.inner_steps
        return int(steps) if is_number(steps) else training_steps(self.est)

    def _fitted_extras(self, meta_init: MetaInit, held_out: bool = False) -> MetaInit:
        """``meta_init`` with the extras its algorithm estimates in closed form from the
        whole meta-training groups (table mode; ``"lmm"``'s REML prior), if any; with
        ``held_out``, from the validation groups too, leaving the extras calibrated on
        them as they are."""
        if self.episodes is None or (held_out and not self.episodes.held_out):
            return meta_init
        algorithm = get_algorithm(meta_init.metadata["algorithm"], meta_init.algorithm_options)
        if type(algorithm).fitted_extras is MetaAlgorithm.fitted_extras:
            return meta_init  # the default estimates nothing: no learner, no tensors
        learner = self.factory.from_init(meta_init)
        groups = [(torch.as_tensor(X, dtype=torch.float64),
                   torch.as_tensor(y, dtype=torch.float64))
                  for X, y in self.episodes.whole_groups(held_out)]
        calibrated = set(meta_init.metadata.get("calibrated_extras", ()))
        fitted = {k: v for k, v in learner.algorithm.fitted_extras(learner, groups).items()
                  if k not in calibrated}
        return _with_extras(meta_init, fitted, "fitted_extras")

    def _choose_adaptation(self, meta_init: MetaInit, val) -> MetaInit:
        """``meta_init`` with the ``inner_lr`` / ``inner_steps`` chosen for ``fit`` on the
        validation tasks (where a parameter is "auto", see
        :mod:`metafit.estimators._adaptation`), and ``validation_score``: the validation
        tasks' mean query loss after ``fit``'s adaptation (``algorithm="auto"`` compares
        the candidates by it)."""
        if not val:
            return meta_init
        meta = dict(meta_init.metadata)
        algorithm = get_algorithm(meta["algorithm"], meta_init.algorithm_options)
        grid = search_grid(self.est, algorithm, float(meta["inner_lr"]),
                           int(meta_init.trained_inner_steps))
        learner = self.factory.from_init(meta_init)
        searched = grid is not None
        if not searched:  # score what fit will use: the numbers given, or the closed form
            lr, steps = fit_settings(self.est, meta_init)
            grid = [lr], [0 if algorithm.closed_form else steps]
        with torch_threads(threads_for(learner.module, self.est.n_threads)):
            choice = choose_adaptation(learner, val, *grid)
            calibrated = learner.algorithm.calibrated_extras(learner, learner.batches(val))
        if searched:
            meta["adaptation"] = choice.to_metadata()
        score = choice.scores[(choice.inner_lr, choice.inner_steps)]
        meta["validation_score"] = float(score) if math.isfinite(score) else None
        # fitted on the validation tasks, saved with the initialization
        return _with_extras(replace(meta_init, metadata=meta), calibrated, "calibrated_extras")

    def _outcome(self, result, resume, best, stopper, use_best: bool, val=None
                 ) -> MetaFitOutcome:
        previous = [] if resume is None else resume.history
        history = MetaHistory([*previous, *(r.as_dict() for r in result.history)])
        last = result.last_state.to_cpu()
        tensors, extra = last.tensors, {}
        if use_best and best is not None and best.best_tensors is not None:
            tensors = best.best_tensors
            extra = {"best_iteration": best.best_iteration, "best_validation_loss": best.best_loss}
        # A closed-form estimate is scored on the validation groups, then refitted with
        # them: it has no iteration to choose, and on small tables every group counts.
        meta_init = self._choose_adaptation(
            self._fitted_extras(self.make_meta_init(tensors, last.iteration, **extra)), val
        )
        meta_init = self._fitted_extras(meta_init, held_out=True)
        warm = WarmStart(
            state=last,
            algorithm=meta_init.metadata["algorithm"],
            time=history[-1]["time"] if history else 0.0,
            best_loss=math.inf if best is None else best.best_loss,
            best_iteration=None if best is None else best.best_iteration,
            best_tensors=None if best is None else best.best_tensors,
            wait=0 if stopper is None else stopper.wait,
            meta_init=meta_init,
        )
        return MetaFitOutcome(meta_init, history, warm, result.interrupted, result.last_iteration)


def _with_extras(meta_init: MetaInit, values: dict, record: str) -> MetaInit:
    """``meta_init`` with new values of extra tensors (in its own dtype and device),
    their names listed in ``metadata[record]``; unchanged when ``values`` is empty."""
    if not values:
        return meta_init
    tensors = dict(meta_init.tensors)
    for name, value in values.items():
        key = f"extra.{name}"
        tensors[key] = value.detach().to(tensors[key].device, tensors[key].dtype)
    meta = {**meta_init.metadata, record: sorted(values)}
    return replace(meta_init, tensors=tensors, metadata=meta)


def warn_kept(meta_init: MetaInit, last_iteration: int, error: BaseException | None = None):
    """Say what the estimator kept after an interrupt, or after an error raised late
    (``error``), and how to continue."""
    meta = meta_init.metadata
    if "best_iteration" in meta:
        kept = (
            f"the initialization with the best validation loss "
            f"({meta['best_validation_loss']:.4g}, iteration {meta['best_iteration']})"
        )
    else:
        kept = f"the initialization of the last completed iteration ({meta['iteration']})"
    if error is None:
        head = f"meta_fit was interrupted after {last_iteration} meta-iterations"
        tail = "Call meta_fit again with warm_start=True to resume."
    else:
        head = (f"meta_fit stopped after {last_iteration} meta-iterations by an error "
                f"({type(error).__name__}, raised next)")
        tail = "Fix the cause and call meta_fit again with warm_start=True to continue."
    warnings.warn(f"{head}; the estimator keeps {kept} and is ready for fit. {tail}",
                  InterruptedTrainingWarning, stacklevel=3)


def warn_already_done(done: int, meta_iterations: int) -> None:
    """``warm_start=True`` with nothing left to do."""
    warnings.warn(
        f"meta_fit with warm_start=True: {done} meta-iterations are already done and "
        f"meta_iterations={meta_iterations}; increase meta_iterations to train further. The "
        "estimator was left unchanged.",
        UserWarning,
        stacklevel=3,
    )


def _versions() -> dict:
    import sklearn

    from metafit._version import __version__

    return {"metafit": __version__, "torch": torch.__version__, "sklearn": sklearn.__version__}
