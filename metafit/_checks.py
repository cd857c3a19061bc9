"""Argument checks shared by the whole package: integers, real numbers, layer widths.

Kept free of heavy imports so that :mod:`metafit.tasks`, :mod:`metafit.models` and the
engine can use them.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_real", "is_number", "layer_widths"]


def check_int(name: str, value, minimum: int = 1, *, allow: tuple = ()) -> int:
    """Return ``value`` as an int after checking it is an integer ``>= minimum``.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
        What the caller passed.
    minimum : int, default=1
        The smallest accepted value.
    allow : tuple, default=()
        Values accepted besides (``None`` for an optional argument, ``-1`` for "all
        cores"); they are returned unchanged.

    Raises
    ------
    TypeError
        If ``value`` is not an integer (``bool`` included), following scikit-learn's
        convention for a value of the wrong type.
    ValueError
        If ``value`` is an integer below ``minimum``.

    Examples
    --------
    >>> check_int("k_shot", 5)
    5
    >>> check_int("n_jobs", -1, allow=(-1,))
    -1
    """
    if any(value is a or (type(value) is type(a) and value == a) for a in allow):
        return value
    extra = "".join(f" or {a!r}" for a in allow)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}{extra}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{extra}, got {value!r}.")
    return int(value)


def is_number(value) -> bool:
    """Whether ``value`` is a real number (``bool`` excluded); fast for plain floats."""
    if type(value) is float:  # the inner loop's common case, without the ABC check
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(name: str, value, minimum: float = 0, *, strict: bool = False, allow=()):
    """Return ``value`` after checking it is a finite real number ``>= minimum``.

    ``strict`` asks for ``> minimum``; ``allow`` lists values accepted besides (``None``
    for an optional argument), returned unchanged. A non-number (``bool`` included) raises
    TypeError, a number out of range or not finite ValueError.
    """
    if any(value is a for a in allow):
        return value
    if not is_number(value):
        extra = "".join(f" or {a!r}" for a in allow)
        raise TypeError(f"{name} must be a number{extra}, got {value!r}.")
    if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
        bound = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {bound} {minimum}, got {value}.")
    return value


def layer_widths(hidden_sizes) -> tuple:
    """``hidden_sizes`` as a tuple of layer widths (an int is one layer)."""
    if isinstance(hidden_sizes, numbers.Integral):
        return (hidden_sizes,)
    return tuple(hidden_sizes or ())
