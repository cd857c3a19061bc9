"""The shared argument checks: types, bounds, allowed extras and their messages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metafit._checks import check_int, check_real, is_number, layer_widths


def test_check_int_accepts_ints_and_allowed_values():
    assert check_int("n", 3) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_int("steps", 0, minimum=0) == 0
    assert check_int("n_jobs", -1, allow=(-1,)) == -1
    assert check_int("patience", None, allow=(None,)) is None


@pytest.mark.parametrize(
    "value, error, message",
    [
        (0, ValueError, "n must be an int >= 1, got 0."),
        (2.0, TypeError, "n must be an int >= 1, got 2.0."),
        (True, TypeError, "n must be an int >= 1, got True."),
        ("3", TypeError, "n must be an int >= 1, got '3'."),
        (None, TypeError, "n must be an int >= 1, got None."),
    ],
)
def test_check_int_rejects(value, error, message):
    with pytest.raises(error) as info:
        check_int("n", value)
    assert str(info.value) == message


def test_check_int_names_the_allowed_extras():
    with pytest.raises(ValueError, match=r"n_jobs must be an int >= 1 or -1, got -2"):
        check_int("n_jobs", -2, allow=(-1,))
    # -1.0 equals -1 but is not an int: not allowed
    with pytest.raises(TypeError):
        check_int("n_jobs", -1.0, allow=(-1,))


def test_check_real():
    assert check_real("lr", 0.1, strict=True) == 0.1
    assert check_real("min_delta", 0) == 0
    assert check_real("clip", None, strict=True, allow=(None,)) is None
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got 0.0"):
        check_real("lr", 0.0, strict=True)
    with pytest.raises(ValueError, match="finite number >= 0, got inf"):
        check_real("min_delta", math.inf)
    with pytest.raises(ValueError, match="finite"):
        check_real("min_delta", math.nan)
    with pytest.raises(TypeError, match="clip must be a number or None, got '1'"):
        check_real("clip", "1", allow=(None,))
    with pytest.raises(TypeError, match="lr must be a number, got True"):
        check_real("lr", True)


def test_is_number_and_layer_widths():
    assert is_number(1.5) and is_number(2) and is_number(np.float32(1.0))
    assert not is_number(True) and not is_number("1") and not is_number(None)
    assert layer_widths(40) == (40,)
    assert layer_widths([40, 20]) == (40, 20)
    assert layer_widths(()) == () and layer_widths(None) == ()
