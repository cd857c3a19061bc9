"""Hyperparameter tuning of the meta-learned estimators with Optuna.

:func:`tune` runs an Optuna study whose objective is the mean post-adaptation query loss
(regressors, minimized) or accuracy (classifiers, maximized) on held-out validation tasks:
each validation task's support set goes to ``fit``, its query set is predicted.

``mode="adaptation"`` (the default, cheap) keeps one meta-learned initialization and tunes
what ``fit`` uses, ``inner_lr`` and ``inner_steps``. ``mode="meta"`` also tunes meta-training
(``meta_lr``, ``algorithm``, ``meta_batch_size``, the hidden layers...), re-running
``meta_fit`` in every trial; it reports intermediate values so that Optuna's pruners stop bad
trials early. Only the estimators' public API is used: ``clone``, ``set_params``,
``meta_fit``, ``fit``, ``predict`` and ``decision_function``.

Search spaces live in :mod:`metafit.search_space` and storages in :mod:`metafit.storage`;
their public functions are importable from here as well.
"""


from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Iterable, Mapping

import numpy as np
import optuna
from sklearn.base import clone, is_classifier

from metafit._checks import check_int, is_number, layer_widths
from metafit.search_space import (
    ADAPTATION_PARAMS,
    _check_mode,
    _suggest_all,
    default_search_space,
    parse_search_space,
    to_estimator_params,
)
from metafit.storage import make_storage
from metafit.tasks import as_task

__all__ = [
    "ADAPTATION_PARAMS",
    "META_RUNGS",
    "default_search_space",
    "evaluate",
    "make_storage",
    "parse_search_space",
    "to_estimator_params",
    "tune",
    "tuned_estimator",
]

_log = logging.getLogger(__name__)

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
        predictions).
    """
    tasks = _materialize(tasks, "tasks")
    scores = []
    for task in tasks:
        s = _query_score(estimator, task)
        if math.isnan(s):
            return math.nan
        scores.append(s)
    return float(np.mean(scores))


def _check_iterable(tasks, name: str) -> None:
    if not isinstance(tasks, Iterable) or isinstance(tasks, (str, bytes)):
        raise TypeError(f"{name} must be an iterable of Task, got {type(tasks).__name__}.")


def _materialize(tasks, name: str) -> list:
    if tasks is None:
        raise ValueError(f"{name} is required: pass a list of held-out tasks.")
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


_DIVERGENCE_WORDS = ("nan", "inf", "diverg", "non-finite", "not finite", "overflow")


def _is_divergence(exc: BaseException) -> bool:
    if isinstance(exc, ArithmeticError):
        return True
    if isinstance(exc, (ValueError, RuntimeError)):
        msg = str(exc).lower()
        return any(w in msg for w in _DIVERGENCE_WORDS)
    return False


def _prune_diverged(trial: optuna.Trial, reason: str):
    trial.set_user_attr(_ATTR + "diverged", reason)
    _log.info("trial %d diverged: %s", trial.number, reason)
    raise optuna.TrialPruned(reason)


def _describe(params: Mapping) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


# ----------------------------------------------------------------------------- tuning


def _has_meta_init(estimator) -> bool:
    return hasattr(estimator, "meta_init_") or estimator.get_params().get("meta_init") is not None


def _init_fingerprint(estimator) -> str | None:
    init = getattr(estimator, "meta_init_", None)
    if init is None:
        return None
    h = hashlib.sha256()
    for key in sorted(init.tensors):
        h.update(key.encode())
        h.update(init.tensors[key].detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _fresh(estimator, params: Mapping):
    """A new, never meta-fitted estimator with ``estimator``'s parameters and ``params``."""
    est = type(estimator)(**estimator.get_params(deep=False))
    return est.set_params(**to_estimator_params(params, estimator))


def _check_reiterable(tasks) -> None:
    if tasks is None:
        raise ValueError("mode='meta' needs tasks to meta-train on in every trial.")
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


def _adaptation_objective(estimator, space, validation):
    def objective(trial: optuna.Trial) -> float:
        params = _suggest_all(trial, space)
        est = clone(estimator).set_params(**to_estimator_params(params, estimator))
        try:
            value = evaluate(est, validation)
        except Exception as exc:
            if _is_divergence(exc):
                _prune_diverged(trial, f"{type(exc).__name__}: {exc}")
            raise
        if math.isnan(value):
            _prune_diverged(trial, f"non-finite query predictions with {_describe(params)}")
        return value

    return objective


def _meta_objective(estimator, space, tasks, validation):
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
            try:
                _meta_fit(est, tasks, validation)
                value = evaluate(est, validation)
            except Exception as exc:
                if _is_divergence(exc):
                    _prune_diverged(trial, f"{type(exc).__name__} at {budget} meta-iterations: "
                                           f"{exc}")
                raise
            if math.isnan(value):
                _prune_diverged(
                    trial,
                    f"non-finite query predictions after {budget} meta-iterations with "
                    f"{_describe(params)}",
                )
            steps = len(est.meta_history_)
            trial.report(value, steps)
            if budget != rungs[-1] and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at {steps} meta-iterations ({value:.4g})")
            if steps < budget:  # a finite task list ran out: longer budgets change nothing
                break
        trial.set_user_attr(_ATTR + "meta_iterations", len(est.meta_history_))
        return value

    return objective


def tune(
    estimator,
    tasks=None,
    *,
    validation_tasks,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage=None,
    study_name: str | None = None,
    search_space=None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    n_jobs: int = 1,
    mode: str = "adaptation",
    evaluate_defaults: bool | None = None,
    callbacks=None,
) -> optuna.Study:
    """Tune an estimator's hyperparameters with Optuna on held-out validation tasks.

    Parameters
    ----------
    estimator : MetaInitializedRegressor or MetaInitializedClassifier
        In adaptation mode, an estimator without a meta-learned initialization (no
        ``meta_init_`` and no ``meta_init=``) is first meta-fitted **in place** on
        ``tasks``, so that the tuned parameters apply to it. In meta mode it is not changed.
    tasks : iterable of Task, optional
        Meta-training tasks: needed in meta mode (re-iterable: a list or a sampler), and in
        adaptation mode when the estimator has no initialization yet.
    validation_tasks : iterable of Task
        Finite held-out tasks (not used for meta-training) that score every trial.
    n_trials, timeout : optional
        Stop after this many trials of this call / seconds; both None runs until
        interrupted, as in :meth:`optuna.Study.optimize`.
    storage : None, str, path or optuna storage
        See :func:`make_storage`; None keeps the study in memory.
    study_name : str, optional
        An existing study of that name in ``storage`` is resumed.
    search_space : dict, optional
        See :func:`parse_search_space`; default :func:`default_search_space`.
    sampler, pruner : optuna sampler and pruner, optional
        Optuna's defaults (TPE, median) when None. Pruning acts in meta mode, where each
        trial reports the validation score after 1/4, 1/2 and all of ``meta_iterations``.
    n_jobs : int, default=1
        Threads of :meth:`optuna.Study.optimize`; for more cores start several processes
        on a shared storage instead (torch releases the GIL only in large kernels).
    mode : {"adaptation", "meta"}, default="adaptation"
    evaluate_defaults : bool, optional
        Score the estimator's own parameters once and store the value in the study's
        ``user_attrs["metafit_default_value"]`` (if not there yet). Default: True in
        adaptation mode (it costs one trial), False in meta mode (it costs a meta_fit).
    callbacks : list of callables, optional
        Passed to :meth:`optuna.Study.optimize`.

    Returns
    -------
    optuna.Study
        Direction "minimize" (query MSE) for regressors, "maximize" (query accuracy) for
        classifiers. Apply the result with :func:`tuned_estimator`. A trial whose learning
        rates make training or adaptation diverge is pruned, with the reason in its
        ``user_attrs["metafit_diverged"]``; it never stops the study.
    """
    _check_mode(mode)
    if not hasattr(estimator, "meta_fit") or not hasattr(estimator, "get_params"):
        raise TypeError(
            "estimator must be a MetaInitializedRegressor or MetaInitializedClassifier, got "
            f"{type(estimator).__name__}."
        )
    check_int("n_trials", n_trials, allow=(None,))
    check_int("n_jobs", n_jobs, allow=(None, -1))
    if timeout is not None and (not is_number(timeout) or timeout <= 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}.")
    space = parse_search_space(search_space, estimator, mode)
    validation = _materialize(validation_tasks, "validation_tasks")
    _check_disjoint(tasks, validation)
    if mode == "meta":
        _check_reiterable(tasks)
    elif not _has_meta_init(estimator):
        if tasks is None:
            raise ValueError(
                "the estimator has no meta-learned initialization: pass tasks to meta-fit it, "
                "call meta_fit first, or construct it with meta_init=<file>."
            )
        estimator.meta_fit(tasks)

    direction = "maximize" if is_classifier(estimator) else "minimize"
    study = optuna.create_study(
        storage=make_storage(storage),
        study_name=study_name,
        sampler=sampler,
        pruner=pruner,
        direction=direction,
        load_if_exists=True,
    )
    _check_study(study, direction, mode)
    fingerprint = _init_fingerprint(estimator) if mode == "adaptation" else None
    attrs = study.user_attrs
    if _ATTR + "mode" not in attrs:
        study.set_user_attr(_ATTR + "mode", mode)
        study.set_user_attr(_ATTR + "metric", "accuracy" if direction == "maximize" else "mse")
        study.set_user_attr(_ATTR + "estimator", type(estimator).__name__)
        if fingerprint:
            study.set_user_attr(_ATTR + "init", fingerprint)
    elif fingerprint and attrs.get(_ATTR + "init") not in (None, fingerprint):
        _log.warning(
            "study %r was started from another meta-learned initialization; trials of this "
            "worker are not comparable with the others. Share one with meta_init=<file>.",
            study.study_name,
        )
    if evaluate_defaults is None:
        evaluate_defaults = mode == "adaptation"
    if evaluate_defaults and _ATTR + "default_value" not in attrs:
        _store_default(study, estimator, space, tasks, validation, mode)

    if mode == "adaptation":
        objective = _adaptation_objective(estimator, space, validation)
    else:
        objective = _meta_objective(estimator, space, tasks, validation)
    study.optimize(objective, n_trials=n_trials, timeout=timeout, n_jobs=n_jobs,
                   callbacks=callbacks)
    return study


def _check_study(study: optuna.Study, direction: str, mode: str) -> None:
    if study.direction.name.lower() != direction:
        raise ValueError(
            f"study {study.study_name!r} already exists and {study.direction.name.lower()}s; "
            f"this estimator's score must be {direction}d. Use another study_name."
        )
    old = study.user_attrs.get(_ATTR + "mode")
    if old is not None and old != mode:
        raise ValueError(
            f"study {study.study_name!r} was tuned in mode={old!r}; resume it with that mode "
            "or use another study_name."
        )


def _store_default(study, estimator, space, tasks, validation, mode) -> None:
    params = estimator.get_params()
    defaults = {k: params[k] for k in space if k in params}
    sizes = layer_widths(params.get("hidden_sizes"))
    if "hidden_layers" in space:
        defaults["hidden_layers"] = len(sizes)
    if "hidden_units" in space and sizes and len(set(sizes)) == 1:
        defaults["hidden_units"] = int(sizes[0])
    if mode == "adaptation":
        value = evaluate(estimator, validation)
    else:
        est = _fresh(estimator, {})
        _meta_fit(est, tasks, validation)
        value = evaluate(est, validation)
    study.set_user_attr(_ATTR + "default_params", {k: _jsonable(v) for k, v in defaults.items()})
    study.set_user_attr(_ATTR + "default_value", None if math.isnan(value) else value)


def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v if v is None or isinstance(v, (bool, int, float, str, list)) else repr(v)


def tuned_estimator(estimator, study: optuna.Study | Mapping, *, tasks=None,
                    validation_tasks=None):
    """The estimator with the study's best parameters set.

    Parameters
    ----------
    estimator : MetaInitializedRegressor or MetaInitializedClassifier
        The estimator that was tuned (unchanged).
    study : optuna.Study or dict
        A study from :func:`tune`, or a dict of parameters such as ``study.best_params``.
    tasks : iterable of Task, optional
        For a meta-mode study: meta-train the tuned estimator on these tasks. Without them
        the returned estimator is not meta-fitted yet.
    validation_tasks : iterable of Task, optional
        Passed to ``meta_fit`` (meta mode); the trials used them only for early stopping,
        when the estimator has ``patience`` set.

    Returns
    -------
    estimator
        Adaptation mode: a clone (with the meta-learned initialization) with the best
        ``inner_lr`` and ``inner_steps``. Meta mode: a new estimator with the best
        parameters, meta-fitted on ``tasks`` when given.
    """
    if isinstance(study, optuna.Study):
        try:
            params = study.best_params
        except ValueError:
            raise ValueError(
                f"study {study.study_name!r} has no completed trial yet; run more trials."
            ) from None
        mode = study.user_attrs.get(_ATTR + "mode", "adaptation")
    elif isinstance(study, Mapping):
        params = dict(study)
        mode = "meta" if set(params) - set(ADAPTATION_PARAMS) else "adaptation"
    else:
        raise TypeError(f"study must be an optuna.Study or a dict, got {type(study).__name__}.")
    if mode == "adaptation":
        return clone(estimator).set_params(**to_estimator_params(params, estimator))
    est = _fresh(estimator, params)
    if tasks is not None:
        est.meta_fit(tasks, validation_tasks)
    return est
