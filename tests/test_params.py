"""The parameter table (metafit.estimators._params): one set of rules for the estimators'
checks, the config loader, the search spaces and the docstrings."""

from __future__ import annotations

import inspect
import re

import pytest

from metafit import MetaInitializedClassifier, MetaInitializedRegressor
from metafit.algorithms import ALGORITHMS
from metafit.cli import config as config_module
from metafit.estimators import PARAMETERS, MetaInitializedEstimator
from metafit.functional import STRATEGIES
from metafit.tuning import parse_search_space


def test_the_table_lists_exactly_the_constructor_parameters():
    signature = inspect.signature(MetaInitializedEstimator).parameters
    assert list(PARAMETERS) == [n for n in signature if n != "kwargs"]


def _documented() -> dict[str, str]:
    """``name -> type line`` of the numpydoc Parameters section (continuation lines of a
    type ending in a backslash joined)."""
    doc = inspect.getdoc(MetaInitializedEstimator)
    section = doc.split("Parameters\n----------\n", 1)[1].split("\n\n", 1)[0]
    section = re.split(r"\nAttributes\n", section)[0].replace("\\\n", "")
    out = {}
    for line in section.splitlines():
        match = re.match(r"^(\w+) : (.*)$", line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def test_the_docstring_documents_every_parameter_and_every_choice():
    documented = _documented()
    for name, rule in PARAMETERS.items():
        assert name in documented, name
        kind = documented[name]
        for choice in rule.choices:
            assert f'"{choice}"' in kind, f"{name}: {choice} missing from {kind!r}"
    assert set(PARAMETERS["algorithm"].choices) == set(ALGORITHMS)
    assert set(PARAMETERS["forward"].choices) == set(STRATEGIES)


@pytest.mark.parametrize("name", [n for n, r in PARAMETERS.items() if r.kind in ("int", "real")])
def test_the_estimator_and_the_search_space_share_the_bounds(name):
    rule = PARAMETERS[name]
    low = (rule.minimum or 0) - 1
    est = MetaInitializedRegressor(**{name: low})
    with pytest.raises((TypeError, ValueError), match=re.escape(name)):
        est.fit([[0.0], [1.0]], [0.0, 1.0])
    if rule.kind == "int":
        space = {name: {"low": int(low), "high": int(low) + 5}}
    else:
        space = {name: {"low": float(low), "high": float(low) + 5}}
    mode = "adaptation" if name in ("inner_lr", "inner_steps") else "meta"
    with pytest.raises(ValueError, match=re.escape(name)):
        parse_search_space(space, MetaInitializedRegressor(), mode)


def test_the_config_types_come_from_the_table():
    for name, rule in PARAMETERS.items():
        if name == "module":
            continue
        assert name in config_module._PARAM_TYPES
        assert (name in config_module._NULLABLE) == rule.nullable


@pytest.mark.parametrize("cls", [MetaInitializedRegressor, MetaInitializedClassifier])
@pytest.mark.parametrize(
    "name, value",
    [("on_interrupt", "ignore"), ("forward", "fast"), ("algorithm", "sgd"), ("warm_start", 1)],
)
def test_choices_are_checked_with_the_table(cls, name, value):
    with pytest.raises((TypeError, ValueError), match=name):
        cls(**{name: value}).fit([[0.0], [1.0]], [0, 1])
