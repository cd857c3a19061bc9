"""The tuning objective: fit on each validation task's support set, score its query set.

:func:`evaluate` is the score; :func:`make_objective` wraps it as an Optuna objective for
either mode, so that a hand-written ``study.optimize(make_objective(...))`` behaves as
:func:`metafit.tune` does: a trial that diverges (a
:class:`~metafit.training.DivergenceError`, or non-finite predictions) is pruned with its
reason in ``user_attrs["metafit_diverged"]``; any other error fails the trial.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Iterable, Mapping

import numpy as np
import optuna
from sklearn.base import clone, is_classifier

from metafit._task_types import as_task
from metafit.grouped import GroupedTable
from metafit.training import DivergenceError
from metafit.tuning.search_space import (
    _check_mode,
    _suggest_all,
    parse_search_space,
    to_estimator_params,
)

__all__ = [
    "BLOWUP_FACTOR", "META_RUNGS", "evaluate", "make_objective", "task_scores", "trivial_mse",
]

_log = logging.getLogger("metafit.tuning")

#: Fractions of ``meta_iterations`` at which ``mode="meta"`` reports to the pruner.
META_RUNGS = (0.25, 0.5, 1.0)
_MAX_VALIDATION_TASKS = 1000
_ATTR = "metafit_"  # prefix of the study and trial attributes metafit writes


# ----------------------------------------------------------------------------- evaluation


def _query_score(estimator, task) -> float:
    """Query MSE (regressor) or accuracy (classifier) after fitting on the support set."""
    est = clone(estimator).fit(task.X_support, task.y_support)
    with np.errstate(all="ignore"):
        if is_classifier(est):
            logits = est.decision_function(task.X_query)
            if not np.all(np.isfinite(logits)):
                return math.nan
            if logits.ndim == 1:  # binary: sklearn's one-column decision function
                pred = est.classes_[(logits > 0).astype(int)]
            else:
                pred = est.classes_[np.argmax(logits, axis=1)]
            return float(np.mean(pred == task.y_query))
        pred = np.asarray(est.predict(task.X_query), dtype=np.float64)
        err = float(np.mean((pred - np.asarray(task.y_query, dtype=np.float64)) ** 2))
    return err if math.isfinite(err) else math.nan


def evaluate(estimator, tasks: Iterable) -> float:
    """Mean post-adaptation score of ``estimator`` over ``tasks``: the tuning objective.

    For every task a clone of the estimator (which keeps its meta-learned initialization)
    is fitted on the support set and scored on the query set.

    Parameters
    ----------
    estimator : MetaInitializedRegressor or MetaInitializedClassifier
    tasks : iterable of Task or 4-tuples
        Finite; at most 1000 tasks.

    Returns
    -------
    float
        Mean query mean-squared error (regressor, lower is better) or mean query accuracy
        (classifier, higher is better). NaN when some adaptation diverged (non-finite
        predictions, or ``fit``'s DivergenceError), never an exception for that: for a
        study, prefer :func:`make_objective`, which prunes such trials with the reason.
    """
    try:
        scores, _ = task_scores(estimator, tasks)
    except DivergenceError:
        # A hand-written objective returning evaluate(...) then records a failed trial
        # (Optuna's rule for NaN) instead of a DivergenceError that ends the study.
        return math.nan
    return math.nan if np.isnan(scores).any() else float(np.mean(scores))


def task_scores(estimator, tasks: Iterable, *, stop_at_nan: bool = True):
    """Each task's post-adaptation score and ``fit`` time, as :func:`evaluate` computes them.

    Returns
    -------
    scores : ndarray of float
        Query MSE or accuracy per task, NaN where adaptation diverged (non-finite
        predictions). With ``stop_at_nan`` (the objective's way) scoring stops at the
        first NaN.
    seconds : ndarray of float
        Wall time of each task's ``fit``.

    Raises
    ------
    metafit.DivergenceError
        When ``fit`` itself detects divergence (unless ``stop_at_nan`` is False, which
        records NaN for that task and goes on).
    """
    tasks = _materialize(tasks, "tasks")
    scores, seconds = [], []
    for task in tasks:
        start = time.perf_counter()
        try:
            s = _query_score(estimator, task)
        except DivergenceError:
            if stop_at_nan:
                raise
            s = math.nan
        seconds.append(time.perf_counter() - start)
        scores.append(s)
        if stop_at_nan and math.isnan(s):
            break
    return np.asarray(scores, dtype=np.float64), np.asarray(seconds, dtype=np.float64)


#: A regressor trial whose query MSE is over this many times that of the trivial
#: predictor (each task's support mean) has diverged, even if every number is finite.
BLOWUP_FACTOR = 100.0


def trivial_mse(tasks) -> float:
    """Query MSE of predicting each task's mean support target: a model-free yardstick."""
    errs = []
    for t in tasks:
        y_s, y_q = np.asarray(t.y_support, np.float64), np.asarray(t.y_query, np.float64)
        errs.append(float(np.mean((y_q - y_s.mean(axis=0)) ** 2)))
    return float(np.mean(errs))


def metric_name(metric: str | None) -> str:
    """The objective's name from ``study.user_attrs["metafit_metric"]`` ("mse" or
    "accuracy"): what the command line prints and the plots put on their axes."""
    return {"accuracy": "query accuracy", "mse": "query MSE"}.get(metric, "objective value")


def score_spread(scores: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of per-task scores (0 for a single task)."""
    sem = float(scores.std(ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else 0.0
    return float(scores.mean()), sem


@contextlib.contextmanager
def _pruned_on_divergence(trial, where: str):
    """Turn a divergence (by type, :func:`_is_divergence`) into a pruned trial."""
    try:
        yield
    except Exception as exc:
        if _is_divergence(exc):
            _prune_diverged(trial, f"{type(exc).__name__}{where}: {exc}")
        raise


def _blowup_bound(estimator, validation) -> float:
    """The query MSE beyond which a regressor trial has diverged (inf for classifiers,
    whose accuracy is bounded); computed once per objective."""
    if is_classifier(estimator):
        return math.inf
    return BLOWUP_FACTOR * trivial_mse(validation)


def _score_trial(trial, est, validation, where: str, params, bound: float) -> float:
    """Score ``est`` for ``trial``: prune on divergence (an error, NaN, or a finite loss
    beyond ``bound``); record the spread and times."""
    with _pruned_on_divergence(trial, where):
        scores, seconds = task_scores(est, validation)
    if np.isnan(scores).any():
        _prune_diverged(trial, f"non-finite query predictions{where} with {_describe(params)}")
    value, sem = score_spread(scores)
    if value > bound:
        _prune_diverged(
            trial,
            f"query MSE {value:.4g}{where} is over {BLOWUP_FACTOR:g} times that of "
            f"predicting each task's support mean ({bound / BLOWUP_FACTOR:.4g}) with "
            f"{_describe(params)}",
        )
    trial.set_user_attr(_ATTR + "score_std", float(scores.std()))
    trial.set_user_attr(_ATTR + "score_sem", sem)
    trial.set_user_attr(_ATTR + "fit_seconds", float(seconds.mean()))
    return value


def _check_iterable(tasks, name: str) -> None:
    if not isinstance(tasks, Iterable) or isinstance(tasks, (str, bytes)):
        raise TypeError(f"{name} must be an iterable of Task, got {type(tasks).__name__}.")


def _materialize(tasks, name: str) -> list:
    if tasks is None:
        raise ValueError(
            f"{name} is required: pass a list of held-out tasks, or pass tasks (a "
            "GroupedTable or a list) for tune to meta-train on and hold them out from."
        )
    _check_iterable(tasks, name)
    out = list(itertools.islice(iter(tasks), _MAX_VALIDATION_TASKS + 1))
    if len(out) > _MAX_VALIDATION_TASKS:
        raise ValueError(
            f"{name} has more than {_MAX_VALIDATION_TASKS} tasks (is it an endless sampler?); "
            "pass a list, e.g. SinusoidTasks(random_state=1).sample(100)."
        )
    if not out:
        raise ValueError(f"{name} is empty; tuning needs at least one held-out task.")
    return [as_task(t) for t in out]


def _is_divergence(exc: BaseException) -> bool:
    """Whether ``exc`` says training or adaptation diverged: metafit raises
    :class:`~metafit.training.DivergenceError` (a FloatingPointError) for that, and only
    for that; any other error (a genuine bug) fails the trial instead of pruning it."""
    return isinstance(exc, FloatingPointError)


def _prune_diverged(trial: optuna.Trial, reason: str):
    trial.set_user_attr(_ATTR + "diverged", reason)
    _log.info("trial %d diverged: %s", trial.number, reason)
    raise optuna.TrialPruned(reason)


def _describe(params: Mapping) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def _fresh(estimator, params: Mapping):
    """A new, never meta-fitted estimator with ``estimator``'s parameters and ``params``."""
    est = type(estimator)(**estimator.get_params(deep=False))
    return est.set_params(**to_estimator_params(params, estimator))


def _check_reiterable(tasks) -> None:
    if tasks is None:
        raise ValueError("mode='meta' needs tasks to meta-train on in every trial.")
    if isinstance(tasks, GroupedTable):  # table mode draws new episodes every time
        return
    _check_iterable(tasks, "tasks")
    if iter(tasks) is tasks:
        raise TypeError(
            "mode='meta' re-runs meta_fit in every trial, so tasks must be re-iterable (a "
            "list or a sampler such as SinusoidTasks), not a one-shot iterator or generator."
        )


def _check_disjoint(tasks, validation: list) -> None:
    if isinstance(tasks, (list, tuple)):
        seen = {id(t) for t in tasks}
        if any(id(t) in seen for t in validation):
            raise ValueError(
                "validation_tasks overlap the meta-training tasks; tune on tasks that were "
                "not used for meta-training."
            )


def _meta_fit(est, tasks, validation) -> None:
    # Early stopping (patience) needs validation tasks; otherwise skip their cost.
    if est.get_params().get("patience") is not None:
        est.meta_fit(tasks, validation)
    else:
        est.meta_fit(tasks)


class _InterruptGuard:
    """Where an interrupt may land during :func:`metafit.tune`, so that no trial is left
    RUNNING: inside an objective, Optuna fails the trial and re-raises; between trials
    (``study.ask`` and storage writes) an interrupt is deferred to the start of the next
    objective (see :func:`request_interrupt`), which then fails that trial cleanly."""

    def __init__(self):
        self.tuning = 0
        self.inside = 0
        self.pending: type[BaseException] | None = None

    def __call__(self, objective):
        def guarded(trial):
            self.inside += 1
            try:
                if self.pending is not None:
                    pending, self.pending = self.pending, None
                    raise pending
                return objective(trial)
            finally:
                self.inside -= 1

        return guarded


INTERRUPTS = _InterruptGuard()


def request_interrupt(exc_type: type[BaseException]) -> bool:
    """Interrupt the running study safely: raise ``exc_type`` now if an objective is
    running (return False: the caller raises), else defer it to the next objective's
    start (return True). Outside :func:`metafit.tune` nothing is deferred."""
    if INTERRUPTS.tuning and not INTERRUPTS.inside:
        INTERRUPTS.pending = exc_type
        return True
    return False


def _adaptation_objective(estimator, space, validation):
    bound = _blowup_bound(estimator, validation)

    def objective(trial: optuna.Trial) -> float:
        params = _suggest_all(trial, space)
        est = clone(estimator).set_params(**to_estimator_params(params, estimator))
        return _score_trial(trial, est, validation, "", params, bound)

    return INTERRUPTS(objective)


def _meta_objective(estimator, space, tasks, validation):
    bound = _blowup_bound(estimator, validation)

    def objective(trial: optuna.Trial) -> float:
        params = _suggest_all(trial, space)
        est = _fresh(estimator, params)
        if "on_interrupt" in est.get_params():
            est.set_params(on_interrupt="raise")  # Ctrl-C stops the study, not one rung
        total = int(est.get_params()["meta_iterations"])
        rungs = sorted({max(1, round(f * total)) for f in META_RUNGS})
        value = math.nan
        for budget in rungs:
            # Each rung is a complete meta_fit with its own budget (successive-halving
            # style), so the last rung is exactly the run tuned_estimator reproduces.
            est.set_params(meta_iterations=budget)
            where = f" after {budget} meta-iterations"
            with _pruned_on_divergence(trial, where):
                _meta_fit(est, tasks, validation)
            value = _score_trial(trial, est, validation, where, params, bound)
            steps = len(est.meta_history_)
            trial.report(value, steps)
            if budget != rungs[-1] and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at {steps} meta-iterations ({value:.4g})")
            if steps < budget:  # a finite task list ran out: longer budgets change nothing
                break
        trial.set_user_attr(_ATTR + "meta_iterations", len(est.meta_history_))
        return value

    return INTERRUPTS(objective)


def make_objective(estimator, validation_tasks, tasks=None, *, mode="adaptation",
                   search_space=None):
    """An Optuna objective that scores ``estimator``'s trial parameters, as :func:`tune`.

    Parameters
    ----------
    estimator : MetaInitializedRegressor or MetaInitializedClassifier
        In adaptation mode it must already have a meta-learned initialization.
    validation_tasks : iterable of Task
        Finite held-out tasks.
    tasks : iterable of Task, optional
        Meta-training tasks (mode="meta"; re-iterable).
    mode : {"adaptation", "meta"}
    search_space : dict, optional
        See :func:`metafit.tuning.parse_search_space`.

    Returns
    -------
    callable
        ``objective(trial) -> float`` for :meth:`optuna.Study.optimize`.
    """
    _check_mode(mode)
    space = parse_search_space(search_space, estimator, mode)
    validation = _materialize(validation_tasks, "validation_tasks")
    if mode == "meta":
        _check_reiterable(tasks)
        return _meta_objective(estimator, space, tasks, validation)
    if not _has_meta_init(estimator):
        raise ValueError(
            "the estimator has no meta-learned initialization: call meta_fit first, or "
            "construct it with meta_init=<file>."
        )
    return _adaptation_objective(estimator, space, validation)


def _has_meta_init(estimator) -> bool:
    return hasattr(estimator, "meta_init_") or estimator.get_params().get("meta_init") is not None
