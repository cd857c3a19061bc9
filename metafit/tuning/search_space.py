"""Search spaces of :func:`metafit.tuning.tune`: defaults, validation and decoding.

A search space maps parameter names to Optuna distributions. :func:`parse_search_space`
also accepts the plain forms of a config file (``{low, high, log, step, type}`` or a list
of choices) and checks every name and range against the estimator before any trial runs;
:func:`to_estimator_params` turns a trial's values back into ``set_params`` arguments.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from metafit._checks import is_number, layer_widths
from metafit.estimators._params import PARAMETERS, Param

__all__ = [
    "ADAPTATION_PARAMS",
    "DERIVED_PARAMS",
    "default_search_space",
    "fit_algorithm",
    "parse_search_space",
    "to_estimator_params",
]

#: Parameters that ``fit`` uses: the only ones ``mode="adaptation"`` may tune.
ADAPTATION_PARAMS = ("inner_lr", "inner_steps")
#: Search-space names that are not estimator parameters; they build ``hidden_sizes``.
DERIVED_PARAMS = ("hidden_layers", "hidden_units")
_MODES = ("adaptation", "meta")
_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}
_KNOWN_ALGORITHMS = PARAMETERS["algorithm"].choices


def _check_mode(mode) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'adaptation' or 'meta', got {mode!r}.")


def default_search_space(estimator, mode: str = "adaptation") -> dict[str, BaseDistribution]:
    """The search space :func:`tune` uses when none is given.

    Parameters
    ----------
    estimator : MetaInitializedRegressor or MetaInitializedClassifier
    mode : {"adaptation", "meta"}

    Returns
    -------
    dict of str to optuna distribution
        ``inner_lr`` (log scale, 1e-3..1; not where fit uses learned rates: Meta-SGD, MAML++,
        ALPACA) and ``inner_steps`` (1..20; not for ALPACA); in ``"meta"`` mode
        also ``meta_lr`` (log scale), ``meta_batch_size`` (log scale, 4..32), ``algorithm``
        (the gradient-based ones; Reptile's outer step size lives on another scale, so a
        Reptile estimator keeps its algorithm and gets a meta_lr range of 0.05..1) and, for
        the default MLP, ``hidden_layers`` (1..3) and ``hidden_units`` (16..128, log).
    """
    _check_mode(mode)
    space: dict[str, BaseDistribution] = {}
    algorithm = fit_algorithm(estimator)
    if algorithm.uses_inner_lr:  # not Meta-SGD's or MAML++'s learned rates, not ALPACA
        space["inner_lr"] = FloatDistribution(1e-3, 1.0, log=True)
    if algorithm.uses_inner_steps:
        space["inner_steps"] = IntDistribution(1, 20)
    if mode == "adaptation" and not space:
        raise ValueError(
            f"nothing to tune in adaptation mode: fit with algorithm {algorithm.name!r} "
            "reads neither inner_lr nor inner_steps (a closed-form posterior); tune in "
            "mode='meta', or pass a search_space."
        )
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


def fit_algorithm(estimator):
    """The algorithm whose ``fit`` the study tunes: the initialization's when there is
    one (``fit`` always adapts as it was meta-trained), else the estimator's."""
    from metafit.algorithms import get_algorithm

    init = getattr(estimator, "meta_init_", None)
    if init is None and hasattr(estimator, "_resolve_meta_init"):
        try:
            init = estimator._resolve_meta_init()
        except (OSError, ValueError, TypeError):
            init = None  # tune reports an unreadable file itself
    if init is not None:
        init = init.adapting_member  # an ensemble: the member whose rate and steps it tunes
        return get_algorithm(init.metadata.get("algorithm", "maml"), init.algorithm_options)
    try:
        return get_algorithm(estimator.get_params().get("algorithm", "maml"))
    except (ValueError, TypeError):
        return get_algorithm("maml")  # the estimator reports a bad algorithm itself


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
        if not is_number(spec[key]) or not math.isfinite(spec[key]):
            raise TypeError(f"{where}: {key} must be a finite number, got {spec[key]!r}.")
    low, high = spec["low"], spec["high"]
    log = spec.get("log", False)
    step = spec.get("step")
    if not isinstance(log, bool):
        raise TypeError(f"{where}: log must be true or false, got {log!r}.")
    if step is not None and (not is_number(step) or not step > 0):
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


#: The derived names' bounds (they are not estimator parameters, so not in PARAMETERS).
_DERIVED_RULES = {"hidden_layers": Param("int", minimum=0), "hidden_units": Param("int", minimum=1)}


def _check_semantics(name: str, dist: BaseDistribution) -> None:
    where = f"search_space[{name!r}]"
    rule = PARAMETERS.get(name) or _DERIVED_RULES.get(name)
    # The bounds come from the estimators' parameter table, the one place they live.
    positive_float = {name} if rule and rule.kind == "real" and rule.strict else set()
    min_int = {name: int(rule.minimum or 0)} if rule and rule.kind == "int" else {}
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        if name in positive_float and dist.low <= (rule.minimum or 0):
            raise ValueError(f"{where}: {name} must be > 0, so low must be > 0 (got {dist.low}).")
        if rule and rule.kind == "real" and not rule.strict and dist.low < (rule.minimum or 0):
            raise ValueError(
                f"{where}: {name} must be >= {rule.minimum or 0}, got low={dist.low}."
            )
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
        current = layer_widths(current)
        layers = params.get("hidden_layers", len(current))
        units = params.get("hidden_units", current[0] if current else 40)
        out["hidden_sizes"] = (int(units),) * int(layers)
    return out


def _suggest_all(trial: optuna.Trial, space: Mapping[str, BaseDistribution]) -> dict:
    """Ask ``trial`` for a value of every parameter of ``space``."""
    params = {}
    for name, d in space.items():
        if isinstance(d, FloatDistribution):
            params[name] = trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
        elif isinstance(d, IntDistribution):
            params[name] = trial.suggest_int(name, d.low, d.high, log=d.log, step=d.step)
        else:
            params[name] = trial.suggest_categorical(name, d.choices)
    return params
