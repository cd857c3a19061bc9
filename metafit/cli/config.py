"""Configuration files of the ``metafit`` command: tasks, estimator, tuning, search space.

A config is a YAML (loaded with ``yaml.safe_load``) or TOML file with four sections::

    tasks:         where tasks come from (sinusoid, digits, omniglot, or a CSV/Parquet table)
    estimator:     regressor or classifier, model, constructor parameters
    tune:          mode, study name, trials, sampler, pruner, storage, heartbeats
    search_space:  parameter -> {low, high, log, step} or {choices: [...]}

Everything is checked when the file is loaded, so a typo fails in a second with one line
naming the key, not after an hour of meta-training. See docs/tuning.md for the reference.
"""

from __future__ import annotations

import numbers
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from metafit.cli._errors import ConfigError
from metafit.cli._sources import EpochTasks, TaskSplits, build_task_splits
from metafit.estimators._params import PARAMETERS

__all__ = ["Config", "ConfigError", "EpochTasks", "TaskSplits", "load_config"]


_NUMBER = "a number"
_INT = "an int"
_STR = "a string"
_BOOL = "true or false"
_LIST_INT = "a list of ints"
_PAIR = "a [low, high] pair of numbers"
_ANY = "a scalar"

_SOURCES: dict[str, dict[str, str]] = {
    "sinusoid": {
        "k_shot": _INT, "k_query": _INT, "amplitude_range": _PAIR, "phase_range": _PAIR,
        "input_range": _PAIR, "random_state": _INT, "validation_tasks": _INT,
        "test_tasks": _INT,
    },
    "digits": {
        "n_way": _INT, "k_shot": _INT, "k_query": _INT, "random_state": _INT,
        "validation_tasks": _INT, "test_tasks": _INT, "as_images": _BOOL,
    },
    "omniglot": {
        "path": _STR, "n_way": _INT, "k_shot": _INT, "k_query": _INT, "image_size": _INT,
        "rotations": _BOOL, "protocol": _STR, "random_state": _INT,
        "validation_tasks": _INT, "test_tasks": _INT,
    },
    "table": {
        "path": _STR, "group": _STR, "target": _STR, "features": "a list of column names",
        "support_size": _NUMBER, "min_query": _INT, "validation_fraction": _NUMBER,
        "test_fraction": _NUMBER, "random_state": _INT,
    },
}
_SOURCE_DEFAULT_TYPE = {
    "sinusoid": "regressor", "digits": "classifier", "omniglot": "classifier",
    "table": "regressor",
}
_ESTIMATOR_KEYS = {"type": _STR, "model": _STR, "module_params": "a mapping", "params": "a mapping"}
# What a config value of each parameter kind (metafit.estimators._params) must be; the
# estimator then checks the value itself (bounds, choices).
_KIND_TYPES = {
    "int": _INT, "real": _NUMBER, "choice": _STR, "bool": _BOOL, "sizes": _LIST_INT,
    "path": _STR, "seed": _INT, "device": _STR, "algorithm": _STR, "verbose": _INT,
    "range": _LIST_INT, "fraction": _NUMBER,
}
_PARAM_TYPES = {
    name: _KIND_TYPES.get(rule.kind, _ANY) for name, rule in PARAMETERS.items()
}
_PARAM_TYPES["activation"] = _STR
_PARAM_TYPES["meta_init"] = _STR
_NULLABLE = {name for name, rule in PARAMETERS.items() if rule.nullable}
_AUTO = {name for name, rule in PARAMETERS.items() if rule.auto}
_TUNE_KEYS = {
    "mode": _STR, "study_name": _STR, "storage": _STR, "n_trials": _INT, "timeout": _NUMBER,
    "n_jobs": _INT, "sampler": "a mapping", "pruner": "a mapping", "heartbeat_interval": _INT,
    "grace_period": _INT, "max_retry": _INT,
}
_SAMPLERS = {
    "tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler",
    "qmc": "QMCSampler", "gp": "GPSampler",
}
_PRUNERS = {
    "median": "MedianPruner", "percentile": "PercentilePruner",
    "hyperband": "HyperbandPruner", "successive_halving": "SuccessiveHalvingPruner",
    "none": "NopPruner",
}
_SECTIONS = ("tasks", "estimator", "tune", "search_space")
#: The largest k_shot, k_query, n_way a config may ask for: few-shot tasks are small, and
#: a typo like 2000000000 must be a one-line error, not a numpy allocation failure.
_MAX_TASK_SIZE = 100_000


def _typename(v) -> str:
    return "null" if v is None else type(v).__name__


def _coerce(where: str, value, kind: str):
    """Check ``value`` against ``kind``; numbers written as strings ("1e-3") are accepted."""
    if kind == _ANY:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
    elif kind == _NUMBER:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value
    elif kind == _INT:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif kind == _STR:
        if isinstance(value, str) and value:
            return value
    elif kind == _BOOL:
        if isinstance(value, bool):
            return value
    elif kind == _LIST_INT:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return (int(value),)
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
        ):
            return tuple(int(v) for v in value)
    elif kind == _PAIR:
        if isinstance(value, (list, tuple)) and len(value) == 2:
            pair = [_coerce(where, v, _NUMBER) for v in value]
            return tuple(float(v) for v in pair)
    elif kind == "a mapping":
        if isinstance(value, Mapping):
            return dict(value)
    elif kind == "a list of column names":
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return list(value)
    raise ConfigError(f"{where} must be {kind}, got {_typename(value)} {value!r}")


def _check_keys(where: str, section: Mapping, allowed, extra_hint: str = "") -> None:
    for key in section:
        if key not in allowed:
            names = ", ".join(sorted(allowed))
            raise ConfigError(
                f"{where}: unknown key {key!r} (allowed: {names}){extra_hint}"
            )


@dataclass
class Config:
    """A validated configuration (see :func:`load_config`)."""

    path: Path
    tasks: dict
    estimator: dict
    tune: dict
    search_space: dict | None
    raw: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ estimator

    @property
    def estimator_type(self) -> str:
        """"regressor" or "classifier"."""
        return self.estimator.get("type") or _SOURCE_DEFAULT_TYPE[self.tasks["source"]]

    @property
    def meta_init(self) -> Path | None:
        """``estimator.params.meta_init`` resolved against the config's folder, or None."""
        value = self.estimator.get("params", {}).get("meta_init")
        return None if value is None else self.resolve(value)

    def build_estimator(self, meta_init=None, **overrides):
        """A new estimator from the ``estimator`` section.

        Parameters
        ----------
        meta_init : path, optional
            A saved initialization to adapt from (``meta_init=``).
        **overrides
            Parameters that win over the file's.
        """
        from metafit import MetaInitializedClassifier, MetaInitializedRegressor

        cls = (
            MetaInitializedClassifier
            if self.estimator_type == "classifier"
            else MetaInitializedRegressor
        )
        params = dict(self.estimator.get("params", {}))
        # Paths in a config are relative to the config file's folder, as everywhere in it.
        for key in ("checkpoint_path", "meta_init"):
            if isinstance(params.get(key), str):
                params[key] = str(self.resolve(params[key]))
        model = self.estimator.get("model", "mlp")
        if model != "mlp":
            from metafit import models

            params["module"] = getattr(models, model)
            for k, v in self.estimator.get("module_params", {}).items():
                params[f"module__{k}"] = v
        params.update(overrides)
        if meta_init is not None:
            params["meta_init"] = str(meta_init)
        return cls(**params)

    # ------------------------------------------------------------------ tasks

    def build_tasks(self) -> TaskSplits:
        """Load or sample the tasks of the ``tasks`` section.

        Raises
        ------
        ConfigError
            When a file is missing or unreadable, or the data do not fit the section.
        """
        spec = dict(self.tasks)
        source = spec.pop("source")
        try:
            return build_task_splits(source, spec, self)
        except ConfigError:
            raise
        except FileNotFoundError as exc:
            missing = exc.filename or exc
            raise ConfigError(f"{self.path}: tasks: file not found: {missing}") from None
        except (ValueError, TypeError, KeyError, OSError, ImportError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{self.path}: tasks ({source}): {msg}") from None

    def resolve(self, p) -> Path:
        """A path of the config, relative to the config file's folder unless absolute."""
        p = Path(os.path.expandvars(str(p))).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)

    # ------------------------------------------------------------------ optuna objects

    def make_sampler(self, seed: int | None = None):
        """The Optuna sampler of ``tune.sampler`` (TPE by default)."""
        import optuna

        spec = dict(self.tune.get("sampler") or {"name": "tpe"})
        name = spec.pop("name", "tpe")
        if seed is not None:
            spec["seed"] = seed
        cls = getattr(optuna.samplers, _SAMPLERS[name])
        try:
            return cls(**spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.path}: tune.sampler ({name}): {exc}") from None

    def make_pruner(self):
        """The Optuna pruner of ``tune.pruner`` (Optuna's median pruner by default)."""
        import optuna

        spec = dict(self.tune.get("pruner") or {"name": "median"})
        name = spec.pop("name", "median")
        cls = getattr(optuna.pruners, _PRUNERS[name])
        try:
            return cls(**spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.path}: tune.pruner ({name}): {exc}") from None


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    elif suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigError(
                    "TOML configs on Python 3.10 need tomli: pip install tomli"
                ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    else:
        raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .yml or .toml")
    if data is None:
        raise ConfigError(f"{path}: the config is empty; it needs at least a tasks section")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the config must be a mapping of sections, got {_typename(data)}"
        )
    return data


def _section(path: Path, data: dict, name: str, required: bool = False) -> dict:
    value = data.get(name)
    if value is None:
        if required:
            raise ConfigError(f"{path}: missing section {name!r}")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {name} must be a mapping, got {_typename(value)} {value!r}")
    return dict(value)


def load_config(path) -> Config:
    """Read and validate a YAML or TOML config file.

    Parameters
    ----------
    path : str or path

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        One line naming the file, the key and what is wrong: unknown sections or keys,
        wrong types, unknown task source, sampler, pruner or estimator parameter, or an
        invalid search space.
    """
    path = Path(path)
    data = _read(path)
    _check_keys(str(path), data, _SECTIONS)
    p = str(path)
    tasks = _check_tasks(p, _section(path, data, "tasks", required=True))
    est = _check_estimator(p, _section(path, data, "estimator"))
    tune_ = _check_tune(p, _section(path, data, "tune"))
    config = Config(path, tasks, est, tune_, None, raw=data)
    config.search_space = _check_space(
        p, data.get("search_space"), config, tune_.get("mode", "adaptation")
    )
    # Build the sampler and pruner once now: a typo in their options (``sed: 0``) must
    # fail at load time, not after an hour of meta-training.
    config.make_sampler()
    config.make_pruner()
    return config


def _check_tasks(p: str, tasks: dict) -> dict:
    source = tasks.get("source")
    if source not in _SOURCES:
        raise ConfigError(
            f"{p}: tasks.source must be one of {', '.join(_SOURCES)}, got {source!r}"
        )
    allowed = _SOURCES[source]
    _check_keys(f"{p}: tasks (source {source})", {k: 0 for k in tasks if k != "source"},
                allowed)
    for key, kind in allowed.items():
        if key in tasks:
            tasks[key] = _coerce(f"{p}: tasks.{key}", tasks[key], kind)
    for key in ("path", "group", "target") if source == "table" else ():
        if key not in tasks:
            raise ConfigError(f"{p}: tasks.{key} is required for source 'table'")
    for key in ("validation_tasks", "test_tasks", "k_shot", "k_query", "n_way", "min_query"):
        if key in tasks and tasks[key] < 1:
            raise ConfigError(f"{p}: tasks.{key} must be >= 1, got {tasks[key]}")
    for key in ("validation_tasks", "test_tasks"):
        if tasks.get(key, 0) > 1000:
            raise ConfigError(f"{p}: tasks.{key} must be <= 1000, got {tasks[key]}")
    for key in ("k_shot", "k_query", "n_way", "min_query"):
        if tasks.get(key, 0) > _MAX_TASK_SIZE:
            raise ConfigError(
                f"{p}: tasks.{key} must be <= {_MAX_TASK_SIZE:,} (a few-shot task), got "
                f"{tasks[key]:,}"
            )
    return tasks


def _check_estimator(p: str, est: dict) -> dict:
    _check_keys(f"{p}: estimator", est, _ESTIMATOR_KEYS)
    for key, kind in _ESTIMATOR_KEYS.items():
        if key in est:
            est[key] = _coerce(f"{p}: estimator.{key}", est[key], kind)
    if est.get("type", "regressor") not in ("regressor", "classifier"):
        raise ConfigError(
            f"{p}: estimator.type must be 'regressor' or 'classifier', got {est['type']!r}"
        )
    _check_model(p, est)
    _check_params(p, est)
    return est


def _check_tune(p: str, tune_: dict) -> dict:
    _check_keys(f"{p}: tune", tune_, _TUNE_KEYS)
    for key, kind in _TUNE_KEYS.items():
        if key in tune_ and tune_[key] is not None:
            tune_[key] = _coerce(f"{p}: tune.{key}", tune_[key], kind)
    if tune_.get("mode", "adaptation") not in ("adaptation", "meta"):
        raise ConfigError(f"{p}: tune.mode must be 'adaptation' or 'meta', got {tune_['mode']!r}")
    for key in ("n_trials", "n_jobs", "heartbeat_interval", "grace_period"):
        value = tune_.get(key)
        allowed = {"n_jobs": -1, "heartbeat_interval": 0}.get(key)  # all cores; heartbeats off
        if value is not None and value < 1 and value != allowed:
            low = ">= 1" if allowed is None else f">= 1 (or {allowed})"
            raise ConfigError(f"{p}: tune.{key} must be {low}, got {value}")
    if tune_.get("timeout") is not None and tune_["timeout"] <= 0:
        raise ConfigError(f"{p}: tune.timeout must be > 0 seconds, got {tune_['timeout']}")
    for key, table in (("sampler", _SAMPLERS), ("pruner", _PRUNERS)):
        spec = tune_.get(key)
        if spec is None:
            continue
        name = spec.get("name")
        if name not in table:
            raise ConfigError(
                f"{p}: tune.{key}.name must be one of {', '.join(table)}, got {name!r}"
            )
        for k, v in spec.items():
            _coerce(f"{p}: tune.{key}.{k}", v, _ANY)
    return tune_


def _check_model(p: str, est: dict) -> None:
    model = est.get("model", "mlp")
    if model == "mlp":
        if est.get("module_params"):
            raise ConfigError(f"{p}: estimator.module_params needs a model other than 'mlp'")
        return
    import inspect

    from torch import nn

    from metafit import models

    cls = getattr(models, model, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        names = [n for n in getattr(models, "__all__", []) if n != "MLP"]
        raise ConfigError(
            f"{p}: estimator.model {model!r} is not a network of metafit.models (use 'mlp'"
            + (f" or one of {', '.join(names)})" if names else ")")
        )
    accepted = inspect.signature(cls).parameters
    takes_kwargs = any(a.kind is inspect.Parameter.VAR_KEYWORD for a in accepted.values())
    for k, v in est.get("module_params", {}).items():
        if k not in accepted and not takes_kwargs:
            raise ConfigError(
                f"{p}: estimator.module_params: {model} takes no argument {k!r} "
                f"(it takes {', '.join(accepted)})"
            )
        _coerce(f"{p}: estimator.module_params.{k}", v, _ANY if not isinstance(v, list)
                else _LIST_INT)


def _check_params(p: str, est: dict) -> None:
    from metafit import MetaInitializedRegressor

    params = est.get("params", {})
    known = set(MetaInitializedRegressor().get_params()) - {"module"}
    for key, value in list(params.items()):
        if key not in known:
            hint = " (set the network with estimator.model)" if key == "module" else ""
            raise ConfigError(
                f"{p}: estimator.params: unknown parameter {key!r}{hint}; known: "
                f"{', '.join(sorted(known))}"
            )
        if (value is None and key in _NULLABLE) or (value == "auto" and key in _AUTO):
            continue
        params[key] = _coerce(f"{p}: estimator.params.{key}", value, _PARAM_TYPES.get(key, _ANY))
    est["params"] = params


def _check_space(p: str, space, config: Config, mode: str):
    if space is None:
        return None
    if not isinstance(space, dict):
        raise ConfigError(f"{p}: search_space must be a mapping, got {_typename(space)}")
    space = {k: dict(v) if isinstance(v, Mapping) else v for k, v in space.items()}
    for name, spec in space.items():
        if isinstance(spec, dict):
            for k in ("low", "high", "step"):
                if isinstance(spec.get(k), str):
                    spec[k] = _coerce(f"{p}: search_space.{name}.{k}", spec[k], _NUMBER)
    from metafit.tuning.search_space import parse_search_space

    try:
        parse_search_space(space, config.build_estimator(), mode)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return space
