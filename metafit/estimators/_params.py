"""The estimators' parameters, declared once: what each accepts, read by every checker.

:data:`PARAMETERS` is the one table of the constructor parameters' rules (the model is
scikit-learn's ``_parameter_constraints``). :func:`check_params` validates an estimator
with it; :mod:`metafit.config` coerces config values by its ``kind``; the search spaces
of :mod:`metafit.tuning` check their ranges against its bounds and choices; and a test
holds the estimators' docstrings to it, so that the four cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from metafit._checks import check_int, check_real
from metafit.algorithms import ALGORITHMS, MetaAlgorithm
from metafit.estimators._inputs import seed_from
from metafit.functional import STRATEGIES
from metafit.training import TrainingCallback

__all__ = ["PARAMETERS", "Param", "check_params"]


@dataclass(frozen=True)
class Param:
    """The rule of one constructor parameter.

    Attributes
    ----------
    kind : {"int", "real", "choice", "bool", "sizes", "module", "path", "seed", "device",
        "algorithm", "range", "fraction", "any"}
        What values are: ``int`` and ``real`` with ``minimum`` (``strict``: above it),
        ``choice`` one of ``choices``, and the special kinds checked by their own rule.
    nullable : bool
        None is accepted (meaning "the default behaviour").
    auto : bool
        The string ``"auto"`` is accepted besides the numbers (``inner_lr``,
        ``inner_steps``: chosen by ``meta_fit`` on the validation tasks).
    """

    kind: str
    minimum: float | None = None
    strict: bool = False
    nullable: bool = False
    choices: tuple = field(default=())
    auto: bool = False

    def check(self, name: str, value) -> None:
        """Raise TypeError/ValueError naming ``name`` and the fix when ``value`` breaks it."""
        _checker(self)(name, value)


def _checker(rule: Param):
    """The check function of ``rule``. :func:`check_params` makes them once (``_COMPILED``):
    fit validates every parameter on every call, a few microseconds of a sub-millisecond
    fit."""
    allow = (None,) if rule.nullable else ()
    if rule.auto:
        plain = _checker(Param(rule.kind, rule.minimum, rule.strict, rule.nullable))

        what = "an int" if rule.kind == "int" else "a number"

        def check(name, value):
            if isinstance(value, str) and value == "auto":
                return
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f'{name} must be {what} or "auto", got {value!r}.')
            plain(name, value)

        return check
    if rule.kind == "int":
        minimum = int(rule.minimum or 0)

        def check(name, value):
            if type(value) is int and value >= minimum:  # the common case, cheaply
                return
            check_int(name, value, minimum=minimum, allow=allow)

    elif rule.kind == "real":
        minimum, strict = rule.minimum or 0, rule.strict

        def check(name, value):
            if type(value) is float and (value > minimum if strict else value >= minimum) \
                    and value < math.inf:
                return
            check_real(name, value, minimum, strict=strict, allow=allow)

    elif rule.kind == "choice":
        choices = rule.choices

        def check(name, value):
            if (isinstance(value, str) and value in choices) or (value is None and allow):
                return
            if allow:
                raise ValueError(
                    f"{name} must be None or one of {', '.join(choices)}; got {value!r}."
                )
            if len(choices) == 2:
                raise ValueError(f'{name} must be "{choices[0]}" or "{choices[1]}", got {value!r}.')
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")

    elif rule.kind == "bool":

        def check(name, value):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {value!r}.")

    else:
        special = _SPECIAL[rule.kind]

        def check(name, value):
            if value is None and rule.nullable:
                return
            special(name, value)

    return check


def _check_algorithm(name, value) -> None:
    if isinstance(value, MetaAlgorithm) or (
        isinstance(value, str) and (value in ALGORITHMS or value == "auto")
    ):
        return
    raise ValueError(
        f"{name} must be one of auto, {', '.join(sorted(ALGORITHMS))} or a "
        f"metafit.algorithms.MetaAlgorithm instance; got {value!r}."
    )


#: Widths beyond which a hidden layer cannot be allocated on any machine metafit targets
#: (a 10^5 x 10^5 float32 layer is 40 GB): refused with a message, not an allocator error.
_MAX_WIDTH = 100_000
_MAX_LAYER_WEIGHTS = 500_000_000


def _check_sizes(name, value) -> None:
    try:
        if type(value) is tuple and _sizes_known_good(value):
            return
    except TypeError:  # unhashable entries: the full check says what is wrong
        pass
    _check_sizes_fully(name, value)


@functools.lru_cache(maxsize=64)
def _sizes_known_good(sizes: tuple) -> bool:
    """Whether a hidden_sizes tuple passes (remembered: fit checks it on every call)."""
    try:
        _check_sizes_fully("hidden_sizes", sizes)
    except ValueError:
        return False
    return True


def _check_sizes_fully(name, value) -> None:
    sizes = (value,) if isinstance(value, numbers.Integral) else value
    ok = isinstance(sizes, (tuple, list)) and all(
        isinstance(h, numbers.Integral) and not isinstance(h, bool) and h > 0 for h in sizes
    )
    if not ok:
        raise ValueError(f"{name} must be a tuple of positive ints, got {value!r}.")
    sizes = [int(h) for h in sizes]
    if any(h > _MAX_WIDTH for h in sizes) or any(
        a * b > _MAX_LAYER_WEIGHTS for a, b in zip(sizes, sizes[1:])
    ):
        raise ValueError(
            f"{name}={value!r} asks for layers of more than {_MAX_LAYER_WEIGHTS:,} weights "
            f"(or wider than {_MAX_WIDTH:,}); the network could not be allocated. Few-shot "
            "networks are small: try (40, 40) or (128, 128)."
        )


def _check_module(name, value) -> None:
    if value is None or isinstance(value, nn.Module):
        return
    if inspect.isclass(value) and issubclass(value, nn.Module):
        return
    raise TypeError(f"{name} must be None, an nn.Module subclass or instance; got {value!r}.")


def _check_device(name, value) -> None:
    if value == "cpu":  # the common case, in every fit
        return
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name} {value!r} is not a torch device: {exc}") from exc
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name}={value!r} but this torch has no usable CUDA device (a CPU build, or "
                "no GPU visible); use device='cpu'."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name}={value!r} but only {torch.cuda.device_count()} CUDA device(s) are "
                "visible; use an index below that."
            )
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{name}={value!r} but MPS is not available here; use 'cpu'.")
        return
    raise ValueError(
        f"{name}={value!r}: metafit trains on 'cpu', 'cuda' or 'mps'; a {device.type!r} "
        "device cannot hold the network's weights for training."
    )


def _check_path(name, value) -> None:
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be None, a str or a path, got {type(value).__name__}.")
    if str(value) == "" or os.path.isdir(value):
        raise ValueError(
            f"{name} {str(value)!r} must name a file, not a folder; e.g. "
            "'meta_init.safetensors'."
        )


def _check_verbose(name, value) -> None:
    if not isinstance(value, (bool, numbers.Integral)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 (0 is silent), got {value!r}.")


def _check_callbacks(name, value) -> None:
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be None or a list of TrainingCallback (or (name, callback) pairs), "
            f"got {type(value).__name__}."
        )
    for item in value:
        cb = item[1] if isinstance(item, tuple) and len(item) == 2 else item
        if isinstance(item, tuple) and (len(item) != 2 or not isinstance(item[0], str)):
            raise TypeError(f"{name}: {item!r} is not a (name, callback) pair.")
        if not isinstance(cb, TrainingCallback):
            raise TypeError(
                f"{name}: {cb!r} is not a metafit.training.TrainingCallback; subclass it and "
                "override on_train_begin / on_iteration_end / on_train_end."
            )


def _check_seed(name, value) -> None:
    seed_from(value)


def _check_range(name, value) -> None:
    ok = (
        isinstance(value, (tuple, list)) and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    )
    if not ok or not 1 <= value[0] <= value[1] <= _MAX_SUPPORT:
        raise ValueError(
            f"{name} must be a pair of ints (smallest, largest) with 1 <= smallest <= "
            f"largest <= {_MAX_SUPPORT:,}, e.g. (2, 10); got {value!r}."
        )


#: support rows per episode; a few-shot episode of more than this is not few-shot
_MAX_SUPPORT = 10_000


def _check_fraction(name, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(
            f"{name} must be a number in [0, 1) (0 or None: hold nothing out), got {value!r}."
        )


def _check_standardize(name, value) -> None:
    if value is True or value is False or (isinstance(value, str) and value == "auto"):
        return
    raise ValueError(f'{name} must be "auto", True or False, got {value!r}.')


def _no_check(name, value) -> None:
    """``meta_init`` is checked when it is read (a file's contents, a MetaInit's shape)."""


_SPECIAL = {
    "algorithm": _check_algorithm,
    "sizes": _check_sizes,
    "module": _check_module,
    "device": _check_device,
    "path": _check_path,
    "verbose": _check_verbose,
    "seed": _check_seed,
    "callbacks": _check_callbacks,
    "range": _check_range,
    "fraction": _check_fraction,
    "standardize": _check_standardize,
    "any": _no_check,
}

#: Every constructor parameter of the estimators, in signature order, with its rule.
PARAMETERS: dict[str, Param] = {
    "module": Param("module"),
    "hidden_sizes": Param("sizes"),
    "activation": Param("any"),  # checked by metafit.models.MLP, which lists the names
    "algorithm": Param("algorithm", choices=tuple(ALGORITHMS)),
    "inner_lr": Param("real", minimum=0, strict=True, auto=True),
    "inner_steps": Param("int", minimum=0, auto=True),
    "meta_inner_lr": Param("real", minimum=0, strict=True, nullable=True),
    "meta_inner_steps": Param("int", minimum=0, nullable=True),
    "meta_lr": Param("real", minimum=0, strict=True, nullable=True),
    "meta_batch_size": Param("int", minimum=1),
    "meta_batch_chunk": Param("int", minimum=1, nullable=True),
    "meta_iterations": Param("int", minimum=1),
    "validation_interval": Param("int", minimum=1),
    "forward": Param("choice", choices=STRATEGIES),
    "device": Param("device"),
    "random_state": Param("seed", nullable=True),
    "verbose": Param("verbose", nullable=True),
    "meta_init": Param("any", nullable=True),
    "warm_start": Param("bool"),
    "patience": Param("int", minimum=1, nullable=True),
    "min_delta": Param("real", minimum=0),
    "clip_grad_norm": Param("real", minimum=0, strict=True, nullable=True),
    "checkpoint_path": Param("path", nullable=True),
    "checkpoint_interval": Param("int", minimum=1),
    "on_interrupt": Param("choice", choices=("warn", "raise")),
    "callbacks": Param("callbacks", nullable=True),
    "n_threads": Param("int", minimum=1, nullable=True),
    "support_range": Param("range"),
    "validation_fraction": Param("fraction", nullable=True),
    "categorical_features": Param("choice", choices=("from_dtype",), nullable=True),
    "standardize": Param("standardize"),
}


def check_params(est) -> None:
    """Validate an estimator's constructor parameters; raise TypeError/ValueError saying how.

    scikit-learn's rule: ``__init__`` only stores, ``fit`` and ``meta_fit`` validate.
    """
    for key in est.__dict__.get("_extra_params", ()):
        raise TypeError(
            f"{type(est).__name__} got an unexpected keyword argument {key!r}; "
            "module constructor arguments are passed as module__<name>."
        )
    module_given = est.module is not None
    for name, check in _COMPILED:
        if module_given and name == "hidden_sizes":
            continue  # unused with a module of the user's
        check(name, getattr(est, name))


_COMPILED = [(name, _checker(rule)) for name, rule in PARAMETERS.items()]
