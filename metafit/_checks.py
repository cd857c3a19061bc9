"""The one integer-argument check shared by the whole package.

Kept free of heavy imports so that :mod:`metafit.tasks` and :mod:`metafit.models` can use it.
"""

from __future__ import annotations

import numbers

__all__ = ["check_int"]


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
