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

The objective and :func:`evaluate` live in :mod:`metafit.tuning._objectives`, search
spaces in :mod:`metafit.tuning.search_space` and storages in :mod:`metafit.tuning.storage`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Mapping

import numpy as np
import optuna
from sklearn.base import clone, is_classifier

from metafit._checks import check_int, is_number, layer_widths
from metafit.tuning._holdout import hold_out_validation
from metafit.tuning._objectives import (
    _ATTR,
    INTERRUPTS,
    _adaptation_objective,
    _check_disjoint,
    _check_reiterable,
    _fresh,
    _has_meta_init,
    _materialize,
    _meta_fit,
    _meta_objective,
    evaluate,
    metric_name,
)
from metafit.tuning.search_space import (
    ADAPTATION_PARAMS,
    _check_mode,
    parse_search_space,
    to_estimator_params,
)
from metafit.tuning.storage import make_storage

__all__ = ["tune", "tuned_estimator"]

_log = logging.getLogger("metafit.tuning")


def _init_fingerprint(estimator) -> str | None:
    """A hash of the initialization the estimator adapts from (``meta_init_``, else its
    ``meta_init=`` file or object): workers that share a study must share it."""
    from metafit.persistence import MetaInit

    init = getattr(estimator, "meta_init_", None)
    if init is None:
        source = estimator.get_params().get("meta_init")
        if isinstance(source, MetaInit):
            init = source
        elif source is not None:
            init = MetaInit.load(source)
    if init is None:
        return None
    h = hashlib.sha256()
    for key in sorted(init.tensors):
        h.update(key.encode())
        h.update(init.tensors[key].detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# Long function: 97 lines, of which 55 are the numpydoc of the Optuna options it passes on;
# the body is a sequence of calls to the helpers below.
def tune(
    estimator,
    tasks=None,
    *,
    validation_tasks=None,
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
    study: optuna.Study | None = None,
    catch=(),
    show_progress_bar: bool = False,
    gc_after_trial: bool = False,
) -> optuna.Study:
    """Tune an estimator's hyperparameters with Optuna on held-out validation tasks.

    Parameters
    ----------
    estimator : MetaInitializedRegressor or MetaInitializedClassifier
        In adaptation mode, an estimator without a meta-learned initialization (no
        ``meta_init_`` and no ``meta_init=``) is first meta-fitted **in place** on
        ``tasks``, so that the tuned parameters apply to it. In meta mode it is not changed.
    tasks : iterable of Task or GroupedTable, optional
        Meta-training tasks: needed in meta mode (re-iterable: a list, a sampler or a
        :class:`~metafit.grouped.GroupedTable`), and in adaptation mode when the
        estimator has no initialization yet.
    validation_tasks : iterable of Task, optional
        Finite held-out tasks (not used for meta-training) that score every trial.
        Default: held out from ``tasks`` where ``tune`` meta-trains (meta mode, or an
        estimator without an initialization): whole groups of a ``GroupedTable``
        (``validation_fraction`` of them, 0.2 when that is None or 0, one episode per group
        and support size at the ends and middle of ``support_range``), or that fraction
        of a list of tasks, drawn with ``random_state`` (0 when None) so that every
        worker of a shared study holds out the same; see
        :mod:`metafit.tuning._holdout`. Required for an already meta-fitted estimator
        in adaptation mode and for endless samplers.
    n_trials, timeout : optional
        Stop after this many trials of this call / seconds (both None: until interrupted).
    storage : None, str, path or optuna storage
        See :func:`make_storage`; None keeps the study in memory.
    study_name : str, optional
        An existing study of that name in ``storage`` is resumed. Default
        ``"metafit-<estimator>-<mode>"`` (e.g. ``"metafit-regressor-adaptation"``).
    search_space : dict, optional
        See :func:`parse_search_space`; default :func:`default_search_space`.
    sampler, pruner : optuna sampler and pruner, optional
        Optuna's defaults (TPE, median) when None. Pruning acts in meta mode, where each
        trial reports the validation score after 1/4, 1/2 and all of ``meta_iterations``.
    n_jobs : int, default=1
        Threads of :meth:`optuna.Study.optimize`; for more cores start several processes
        on a shared storage instead.
    mode : {"adaptation", "meta"}, default="adaptation"
    evaluate_defaults : bool, optional
        Score the estimator's own parameters once and store the value in the study's
        ``user_attrs["metafit_default_value"]`` (if not there yet). Default: True in
        adaptation mode (it costs one trial), False in meta mode (it costs a meta_fit).
    callbacks, catch, show_progress_bar, gc_after_trial
        Passed to :meth:`optuna.Study.optimize`.
    study : optuna.Study, optional
        Optimize this existing study (its direction must match the estimator's score)
        instead of creating or loading one from ``storage``, ``study_name``,
        ``sampler`` and ``pruner``, which must then be left unset.

    Returns
    -------
    optuna.Study
        Direction "minimize" (query MSE) for regressors, "maximize" (query accuracy) for
        classifiers. Apply the result with :func:`tuned_estimator`. A trial whose learning
        rates make training or adaptation diverge is pruned, with the reason in its
        ``user_attrs["metafit_diverged"]``; it never stops the study.
    """
    _check_tune_args(estimator, mode, n_trials, n_jobs, timeout)
    space = parse_search_space(search_space, estimator, mode)
    if validation_tasks is None and tasks is not None:
        tasks, validation_tasks = hold_out_validation(
            estimator, tasks, initialized=mode == "adaptation" and _has_meta_init(estimator))
    validation = _materialize(validation_tasks, "validation_tasks")
    _check_disjoint(tasks, validation)
    direction = "maximize" if is_classifier(estimator) else "minimize"
    study = _open_study(study, estimator, mode, direction, storage, study_name, sampler, pruner)
    _ensure_meta_init(estimator, tasks, mode)
    _record_study(study, estimator, mode, direction)
    if evaluate_defaults is None:
        evaluate_defaults = mode == "adaptation"
    if evaluate_defaults and _ATTR + "default_value" not in study.user_attrs:
        _store_default(study, estimator, space, tasks, validation, mode)
    if mode == "adaptation":
        objective = _adaptation_objective(estimator, space, validation)
    else:
        objective = _meta_objective(estimator, space, tasks, validation)
    _optimize(
        study,
        objective,
        n_trials=n_trials,
        timeout=timeout,
        n_jobs=n_jobs,
        callbacks=callbacks,
        catch=catch,
        show_progress_bar=show_progress_bar,
        gc_after_trial=gc_after_trial,
    )
    return study


def _optimize(study, objective, **kwargs) -> None:
    """``study.optimize`` with interrupts that leave no trial RUNNING (see
    :class:`metafit.tuning._objectives._InterruptGuard`)."""
    INTERRUPTS.tuning += 1
    try:
        study.optimize(objective, **kwargs)
    finally:
        INTERRUPTS.tuning -= 1
        pending, INTERRUPTS.pending = INTERRUPTS.pending, None
    if pending is not None:  # arrived after the last trial: nothing left RUNNING
        raise pending


def _ensure_meta_init(estimator, tasks, mode: str) -> None:
    """Meta mode: check the tasks can be re-read per trial. Adaptation mode: meta-fit the
    estimator in place when it has no initialization yet."""
    if mode == "meta":
        _check_reiterable(tasks)
    elif not _has_meta_init(estimator):
        if tasks is None:
            raise ValueError(
                "the estimator has no meta-learned initialization: pass tasks to meta-fit it, "
                "call meta_fit first, or construct it with meta_init=<file>."
            )
        estimator.meta_fit(tasks)


def _check_tune_args(estimator, mode, n_trials, n_jobs, timeout) -> None:
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


def default_study_name(estimator, mode: str) -> str:
    """The study name :func:`tune` uses when none is given (readable, not a uuid)."""
    kind = "classifier" if is_classifier(estimator) else "regressor"
    return f"metafit-{kind}-{mode}"


def _open_study(study, estimator, mode, direction, storage, study_name, sampler, pruner):
    if study is not None:
        if not isinstance(study, optuna.Study):
            raise TypeError(f"study must be an optuna.Study, got {type(study).__name__}.")
        given = {"storage": storage, "study_name": study_name, "sampler": sampler,
                 "pruner": pruner}
        clash = [k for k, v in given.items() if v is not None]
        if clash:
            raise ValueError(
                f"tune() got study= and {', '.join(clash)}; the study already has its "
                "storage, name, sampler and pruner: pass either study= or those."
            )
    else:
        study = optuna.create_study(
            storage=make_storage(storage),
            study_name=study_name or default_study_name(estimator, mode),
            sampler=sampler,
            pruner=pruner,
            direction=direction,
            load_if_exists=True,
        )
    _check_study(study, direction, mode)
    return study


def _record_study(study, estimator, mode: str, direction: str) -> None:
    """The study's metafit attributes: mode, metric, estimator, initialization."""
    fingerprint = _init_fingerprint(estimator) if mode == "adaptation" else None
    attrs = study.user_attrs
    if _ATTR + "mode" not in attrs:
        metric = "accuracy" if direction == "maximize" else "mse"
        study.set_user_attr(_ATTR + "mode", mode)
        study.set_user_attr(_ATTR + "metric", metric)
        study.set_user_attr(_ATTR + "estimator", type(estimator).__name__)
        if fingerprint:
            study.set_user_attr(_ATTR + "init", fingerprint)
            source = estimator.get_params().get("meta_init")
            if isinstance(source, str) or hasattr(source, "__fspath__"):
                study.set_user_attr(_ATTR + "init_file", str(source))
        with warnings.catch_warnings():  # experimental in Optuna 4
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric_name(metric)])
    elif fingerprint and attrs.get(_ATTR + "init") not in (None, fingerprint):
        _log.warning(
            "study %r was started from another meta-learned initialization; trials of this "
            "worker are not comparable with the others. Share one with meta_init=<file>.",
            study.study_name,
        )


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
    fitted = estimator if mode == "adaptation" else est
    for name in ("inner_lr", "inner_steps"):  # "auto": the value meta_fit chose
        if defaults.get(name) == "auto" and hasattr(fitted, name + "_"):
            defaults[name] = getattr(fitted, name + "_")
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
