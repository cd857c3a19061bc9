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
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from sklearn.base import clone, is_classifier

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

#: Parameters that ``fit`` uses: the only ones ``mode="adaptation"`` may tune.
ADAPTATION_PARAMS = ("inner_lr", "inner_steps")
#: Fractions of ``meta_iterations`` at which ``mode="meta"`` reports to the pruner.
META_RUNGS = (0.25, 0.5, 1.0)
#: Search-space names that are not estimator parameters; they build ``hidden_sizes``.
DERIVED_PARAMS = ("hidden_layers", "hidden_units")
_MODES = ("adaptation", "meta")
_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}
_MAX_VALIDATION_TASKS = 1000
_KNOWN_ALGORITHMS = ("maml", "fomaml", "reptile", "anil", "metasgd")
_ATTR = "metafit_"  # prefix of the study and trial attributes metafit writes


# ----------------------------------------------------------------------------- search space


def default_search_space(estimator, mode: str = "adaptation") -> dict[str, BaseDistribution]:
    """The search space :func:`tune` uses when none is given.

    Parameters
    ----------
    estimator : MetaInitializedRegressor or MetaInitializedClassifier
    mode : {"adaptation", "meta"}

    Returns
    -------
    dict of str to optuna distribution
        ``inner_lr`` (log scale, 1e-3..1) and ``inner_steps`` (1..20); in ``"meta"`` mode
        also ``meta_lr`` (log scale), ``meta_batch_size`` (log scale, 4..32), ``algorithm``
        (the gradient-based ones; Reptile's outer step size lives on another scale, so a
        Reptile estimator keeps its algorithm and gets a meta_lr range of 0.05..1) and, for
        the default MLP, ``hidden_layers`` (1..3) and ``hidden_units`` (16..128, log).
    """
    _check_mode(mode)
    space: dict[str, BaseDistribution] = {
        "inner_lr": FloatDistribution(1e-3, 1.0, log=True),
        "inner_steps": IntDistribution(1, 20),
    }
    if mode == "meta":
        params = estimator.get_params()
        if params.get("algorithm") == "reptile":
            space["meta_lr"] = FloatDistribution(0.05, 1.0, log=True)
        else:
            space["meta_lr"] = FloatDistribution(1e-4, 1e-2, log=True)
            space["algorithm"] = CategoricalDistribution(("maml", "fomaml", "anil", "metasgd"))
        space["meta_batch_size"] = IntDistribution(4, 32, log=True)
        if params.get("module") is None:
            space["hidden_layers"] = IntDistribution(1, 3)
            space["hidden_units"] = IntDistribution(16, 128, log=True)
    return space


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _encode_choice(name: str, value):
    if name == "hidden_sizes" and isinstance(value, (list, tuple)):
        return ",".join(str(int(v)) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"search_space[{name!r}]: choice {value!r} is a {type(value).__name__}; choices must "
        "be None, bool, int, float or str (hidden_sizes also takes lists of ints)."
    )


def _parse_one(name: str, spec) -> BaseDistribution:
    where = f"search_space[{name!r}]"
    if isinstance(spec, (FloatDistribution, IntDistribution, CategoricalDistribution)):
        return spec
    if isinstance(spec, BaseDistribution):
        raise TypeError(
            f"{where}: {type(spec).__name__} is not supported; use FloatDistribution, "
            "IntDistribution or CategoricalDistribution."
        )
    if isinstance(spec, (list, tuple)):
        spec = {"choices": list(spec)}
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"{where} must be an optuna distribution, a list of choices or a mapping like "
            f"{{'low': 1e-3, 'high': 1.0, 'log': True}}; got {type(spec).__name__} {spec!r}."
        )
    unknown = sorted(set(map(str, spec)) - _SPEC_KEYS)
    if unknown:
        raise ValueError(
            f"{where} has unknown key {unknown[0]!r}; allowed keys: "
            f"{', '.join(sorted(_SPEC_KEYS))}."
        )
    kind = spec.get("type")
    if kind is not None and kind not in ("float", "int", "categorical"):
        raise ValueError(f"{where}: type must be 'float', 'int' or 'categorical', got {kind!r}.")
    if "choices" in spec or kind == "categorical":
        extra = sorted(set(spec) - {"choices", "type"})
        if extra:
            raise ValueError(f"{where}: {extra[0]!r} cannot be combined with 'choices'.")
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"{where}: choices must be a non-empty list, got {choices!r}.")
        encoded = tuple(_encode_choice(name, c) for c in choices)
        if len(set(map(repr, encoded))) != len(encoded):
            raise ValueError(f"{where}: choices contain duplicates: {list(choices)!r}.")
        return CategoricalDistribution(encoded)
    for key in ("low", "high"):
        if key not in spec:
            raise ValueError(f"{where} needs {key!r} (or 'choices' for a categorical).")
        if not _is_number(spec[key]) or not math.isfinite(spec[key]):
            raise TypeError(f"{where}: {key} must be a finite number, got {spec[key]!r}.")
    low, high = spec["low"], spec["high"]
    log = spec.get("log", False)
    step = spec.get("step")
    if not isinstance(log, bool):
        raise TypeError(f"{where}: log must be true or false, got {log!r}.")
    if step is not None and (not _is_number(step) or not step > 0):
        raise ValueError(f"{where}: step must be a number > 0, got {step!r}.")
    if low > high:
        raise ValueError(f"{where}: low={low} is greater than high={high}.")
    if log and low <= 0:
        raise ValueError(f"{where}: a log scale needs low > 0, got low={low}.")
    if log and step is not None and not (kind == "int" and step == 1):
        raise ValueError(f"{where}: 'log' and 'step' cannot be combined.")
    is_int = kind == "int" or (
        kind is None
        and isinstance(low, numbers.Integral)
        and isinstance(high, numbers.Integral)
        and (step is None or isinstance(step, numbers.Integral))
    )
    if is_int:
        if low != int(low) or high != int(high) or (step is not None and step != int(step)):
            raise ValueError(f"{where}: an int range needs whole low, high and step.")
        return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return FloatDistribution(float(low), float(high), log=log, step=step)


def _check_semantics(name: str, dist: BaseDistribution) -> None:
    where = f"search_space[{name!r}]"
    positive_float = {"inner_lr", "meta_lr"}
    min_int = {"inner_steps": 0, "meta_inner_steps": 0, "meta_batch_size": 1,
               "meta_iterations": 1, "hidden_layers": 0, "hidden_units": 1}
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        if name in positive_float and dist.low <= 0:
            raise ValueError(f"{where}: {name} must be > 0, so low must be > 0 (got {dist.low}).")
        if name in min_int:
            if isinstance(dist, FloatDistribution):
                raise TypeError(f"{where}: {name} is an integer; give int low and high.")
            if dist.low < min_int[name]:
                raise ValueError(
                    f"{where}: {name} must be >= {min_int[name]}, got low={dist.low}."
                )
    if name == "algorithm":
        if not isinstance(dist, CategoricalDistribution):
            raise TypeError(f"{where}: algorithm needs a list of choices.")
        bad = [c for c in dist.choices if c not in _KNOWN_ALGORITHMS]
        if bad:
            raise ValueError(
                f"{where}: unknown algorithm {bad[0]!r}; choose from "
                f"{', '.join(_KNOWN_ALGORITHMS)}."
            )
    if name == "hidden_sizes" and isinstance(dist, CategoricalDistribution):
        for c in dist.choices:
            try:
                _decode_hidden(c)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None


def parse_search_space(search_space, estimator, mode: str = "adaptation") -> dict:
    """Validate a search space and turn simple specs into Optuna distributions.

    Parameters
    ----------
    search_space : dict or None
        Parameter name to an Optuna distribution, a list of choices, or a mapping with
        ``low``, ``high`` and optionally ``log``, ``step`` and ``type`` (``"int"``,
        ``"float"``), or ``choices``. Names are estimator parameters, or ``hidden_layers``
        and ``hidden_units`` (which set ``hidden_sizes = (hidden_units,) * hidden_layers``).
        None gives :func:`default_search_space`.
    estimator : MetaInitializedRegressor or MetaInitializedClassifier
    mode : {"adaptation", "meta"}

    Returns
    -------
    dict of str to optuna distribution

    Raises
    ------
    TypeError, ValueError
        Naming the offending parameter: unknown names, meta-training parameters in
        adaptation mode, empty or inverted ranges, log scales through zero, bad choices.
    """
    _check_mode(mode)
    if search_space is None:
        return default_search_space(estimator, mode)
    if not isinstance(search_space, Mapping):
        raise TypeError(
            f"search_space must be a dict of parameter name to distribution, got "
            f"{type(search_space).__name__}."
        )
    if not search_space:
        raise ValueError("search_space is empty; give at least one parameter or pass None.")
    valid = set(estimator.get_params()) | set(DERIVED_PARAMS)
    space = {}
    for name, spec in search_space.items():
        if not isinstance(name, str) or name not in valid:
            raise ValueError(
                f"search_space has unknown parameter {name!r}; tunable names are the "
                f"estimator's parameters ({', '.join(sorted(estimator.get_params()))}) and "
                f"{', '.join(DERIVED_PARAMS)}."
            )
        if mode == "adaptation" and name not in ADAPTATION_PARAMS:
            raise ValueError(
                f"search_space[{name!r}]: {name} is a meta-training parameter; adaptation mode "
                f"tunes only {', '.join(ADAPTATION_PARAMS)}. Use mode='meta' to tune it."
            )
        dist = _parse_one(name, spec)
        _check_semantics(name, dist)
        space[name] = dist
    if "hidden_sizes" in space and set(DERIVED_PARAMS) & set(space):
        raise ValueError(
            "search_space has both hidden_sizes and hidden_layers/hidden_units; use one or "
            "the other."
        )
    if set(DERIVED_PARAMS) & set(space) and estimator.get_params().get("module") is not None:
        raise ValueError(
            "hidden_layers/hidden_units shape the default MLP, but this estimator has its own "
            "module; tune module__<name> parameters instead."
        )
    return space


def _decode_hidden(value) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),)
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if all(p.isdigit() and int(p) > 0 for p in parts):
            return tuple(int(p) for p in parts)
    raise ValueError(
        f"hidden_sizes choice {value!r} is not a list of positive layer widths like [40, 40]."
    )


def to_estimator_params(params: Mapping[str, Any], estimator=None) -> dict[str, Any]:
    """Turn a trial's parameters into ``set_params`` keyword arguments.

    ``hidden_layers`` and ``hidden_units`` become ``hidden_sizes`` (a missing one is taken
    from ``estimator``'s current ``hidden_sizes``); a ``hidden_sizes`` choice such as
    ``"64,64"`` becomes the tuple ``(64, 64)``.
    """
    out = {k: v for k, v in params.items() if k not in DERIVED_PARAMS}
    if "hidden_sizes" in out:
        out["hidden_sizes"] = _decode_hidden(out["hidden_sizes"])
    if set(DERIVED_PARAMS) & set(params):
        current = (40, 40) if estimator is None else estimator.get_params()["hidden_sizes"]
        current = (current,) if isinstance(current, numbers.Integral) else tuple(current)
        layers = params.get("hidden_layers", len(current))
        units = params.get("hidden_units", current[0] if current else 40)
        out["hidden_sizes"] = (int(units),) * int(layers)
    return out


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


def _materialize(tasks, name: str) -> list:
    if tasks is None:
        raise ValueError(f"{name} is required: pass a list of held-out tasks.")
    if not isinstance(tasks, Iterable) or isinstance(tasks, (str, bytes)):
        raise TypeError(f"{name} must be an iterable of Task, got {type(tasks).__name__}.")
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


def _suggest_all(trial: optuna.Trial, space: Mapping[str, BaseDistribution]) -> dict:
    params = {}
    for name, d in space.items():
        if isinstance(d, FloatDistribution):
            params[name] = trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
        elif isinstance(d, IntDistribution):
            params[name] = trial.suggest_int(name, d.low, d.high, log=d.log, step=d.step)
        else:
            params[name] = trial.suggest_categorical(name, d.choices)
    return params


def _prune_diverged(trial: optuna.Trial, reason: str):
    trial.set_user_attr(_ATTR + "diverged", reason)
    _log.info("trial %d diverged: %s", trial.number, reason)
    raise optuna.TrialPruned(reason)


def _describe(params: Mapping) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


# ----------------------------------------------------------------------------- storage


def make_storage(
    storage,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = 3,
):
    """Open an Optuna storage from a URL or path.

    Parameters
    ----------
    storage : None, str, path or optuna storage
        None: in memory. ``sqlite:///file.db``, ``postgresql://user:pass@host/db`` (run
        through psycopg 3) or ``mysql+pymysql://...``: Optuna's RDB storage.
        ``journal:path`` or a path ending in ``.log`` / ``.journal``: a JournalStorage file,
        shared by the processes of one machine. A storage object is returned unchanged.
    heartbeat_interval, grace_period : int, optional
        RDB storages only: each running trial writes a heartbeat every
        ``heartbeat_interval`` seconds; a trial silent for ``grace_period`` seconds (default
        ``2 * heartbeat_interval``) is marked failed by the next worker and re-queued with
        the same parameters, at most ``max_retry`` times.
    max_retry : int or None, default=3

    Returns
    -------
    optuna storage or None

    Raises
    ------
    ValueError
        For an unsupported or malformed URL, a missing directory, or a database that
        cannot be opened (the message hides the password).
    """
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        if heartbeat_interval is not None and storage is None:
            raise ValueError("heartbeat_interval needs a database storage (sqlite:///...).")
        return storage
    if isinstance(storage, os.PathLike):
        storage = os.fspath(storage)
    if not isinstance(storage, str) or not storage.strip():
        raise TypeError(
            f"storage must be None, a URL string or an optuna storage; got {storage!r}."
        )
    storage = storage.strip()
    if heartbeat_interval is not None:
        if not isinstance(heartbeat_interval, int) or heartbeat_interval < 1:
            raise ValueError(f"heartbeat_interval must be an int >= 1, got {heartbeat_interval!r}.")
        if grace_period is not None and (not isinstance(grace_period, int) or grace_period < 1):
            raise ValueError(f"grace_period must be an int >= 1, got {grace_period!r}.")
    elif grace_period is not None:
        raise ValueError("grace_period needs heartbeat_interval as well.")

    journal = None
    if storage.startswith("journal:"):
        journal = storage[len("journal:") :]
        if journal.startswith("//"):
            journal = journal[2:]
    elif "://" not in storage and storage.endswith((".log", ".journal")):
        journal = storage
    if journal is not None:
        if heartbeat_interval is not None:
            raise ValueError(
                f"storage {storage!r}: heartbeats need a database storage (sqlite:/// or "
                "postgresql://), not a journal file."
            )
        if not journal:
            raise ValueError("storage 'journal:' needs a file path, e.g. journal:./study.log.")
        parent = Path(journal).expanduser().resolve().parent
        if not parent.is_dir():
            raise ValueError(f"storage {storage!r}: directory {parent} does not exist.")
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(Path(journal).expanduser())))
    return _rdb_storage(storage, heartbeat_interval, grace_period, max_retry)


def _normalize_url(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if "://" not in url:
        raise ValueError(
            f"storage {url!r} is neither a database URL (sqlite:///metafit.db, "
            "postgresql://user:pass@host/db) nor a journal file (journal:./study.log)."
        )
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"storage {url!r} is not a valid database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "postgres":  # Heroku-style spelling SQLAlchemy does not accept
        parsed = parsed.set(drivername="postgresql")
        backend = "postgresql"
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise ValueError(
            f"storage {url!r}: unsupported database {backend!r}; use sqlite:///file.db, "
            "postgresql://user:pass@host/db or journal:./file.log."
        )
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # SQLAlchemy 2.0 maps the bare scheme to psycopg2, 2.1 to psycopg 3; pin psycopg 3,
        # the driver of metafit[postgres].
        parsed = parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise ValueError(
                f"storage {url!r}: an in-memory SQLite database cannot be shared; give a "
                "file (sqlite:///metafit.db) or pass storage=None."
            )
        parent = Path(db).expanduser().resolve().parent
        if not parent.is_dir():
            raise ValueError(f"storage {url!r}: directory {parent} does not exist.")
    return parsed


def _rdb_storage(url, heartbeat_interval, grace_period, max_retry):
    from sqlalchemy.exc import SQLAlchemyError

    parsed = _normalize_url(url)
    shown = parsed.render_as_string(hide_password=True)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() != "sqlite":
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    if heartbeat_interval is not None:
        kwargs["heartbeat_interval"] = heartbeat_interval
        kwargs["grace_period"] = grace_period or 2 * heartbeat_interval
    try:
        with warnings.catch_warnings():
            # Heartbeats are "experimental" in Optuna since 2.8; metafit relies on them.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if "heartbeat_interval" in kwargs:
                retry = getattr(
                    optuna.storages, "RetryHeartbeatStaleTrialCallback", None
                ) or optuna.storages.RetryFailedTrialCallback
                key = (
                    "heartbeat_stale_trial_callback"
                    if retry is not optuna.storages.RetryFailedTrialCallback
                    else "failed_trial_callback"
                )
                kwargs[key] = retry(max_retry=max_retry)
            return _create_rdb_storage(parsed.render_as_string(hide_password=False), kwargs)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"storage {shown}: the database driver is not installed ({exc.name}); for "
            "PostgreSQL: pip install 'metafit[postgres]'."
        ) from None
    except (SQLAlchemyError, OSError) as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise ValueError(
            f"cannot open storage {shown}: {first[0] if first else type(exc).__name__}"
        ) from None


def _create_rdb_storage(url: str, kwargs: dict, attempts: int = 6):
    """``RDBStorage(url)``, retried when workers race to create the schema.

    Several workers started together on a fresh PostgreSQL database all issue
    ``CREATE TABLE``; all but one can fail with a duplicate-key or already-exists error
    from the catalog. The tables exist by then, so a short jittered retry succeeds.
    """
    import random
    import time

    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError) as exc:
            text = str(getattr(exc, "orig", None) or exc)
            racing = "duplicate key" in text or "already exists" in text
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) * (1 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------- tuning


def _check_mode(mode) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'adaptation' or 'meta', got {mode!r}.")


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
    if not isinstance(tasks, Iterable) or isinstance(tasks, (str, bytes)):
        raise TypeError(f"tasks must be an iterable of Task, got {type(tasks).__name__}.")
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
    for name, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(
                value, bool) or (value < 1 and not (name == "n_jobs" and value == -1))):
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
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
    sizes = params.get("hidden_sizes")
    sizes = (sizes,) if isinstance(sizes, numbers.Integral) else tuple(sizes or ())
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
