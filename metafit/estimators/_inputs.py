"""Validation of the estimators' inputs, and their ``random_state``.

Everything here is called by the estimators (:mod:`metafit.estimators`); their parameters
are checked by :mod:`metafit.estimators._params`. The input checks have fast paths: a
few-shot ``fit`` takes well under a millisecond, so checking plain numpy arrays must cost
microseconds, not the 50-100 us of scikit-learn's ``validate_data`` (which still handles,
and reports, everything else). :func:`fit_data`, :func:`table_fit_data` and
:func:`predict_data` are the estimators' whole input path; like ``validate_data`` they set
the estimator's ``n_features_in_`` and ``feature_names_in_``.
"""

from __future__ import annotations

import contextlib
import copy
import numbers

import numpy as np
import torch
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from metafit._task_types import refuse_sparse

__all__ = [
    "SeededTorch",
    "check_n_features",
    "fast_X",
    "fast_xy",
    "fit_data",
    "predict_data",
    "seed_from",
    "table_fit_data",
    "unchanged_on_error",
]


# --------------------------------------------------------------------------- random_state


def seed_from(random_state) -> int:
    """An int seed from ``random_state`` without touching any global RNG."""
    if random_state is None:
        return int(np.random.default_rng().integers(2**31 - 1))
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if not 0 <= int(random_state) < 2**63:
            raise ValueError(
                f"random_state must be an int in [0, 2**63), got {random_state}; any seed "
                "in that range is as good, e.g. random_state=0."
            )
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        # Copy so that the caller's generator is not advanced by a seed draw.
        return int(copy.deepcopy(random_state).randint(2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(copy.deepcopy(random_state).integers(2**31 - 1))
    raise ValueError(
        f"random_state must be None, an int, a numpy RandomState or Generator; "
        f"got {random_state!r}."
    )


class SeededTorch:
    """Run a block with the torch CPU RNG seeded, restoring its previous state after.

    Module initializers and dropout draw from the global generator; forking it keeps
    results reproducible from ``random_state`` while leaving the user's RNG as it was.
    """

    def __init__(self, seed: int, device=None):
        self.seed = seed
        device = torch.device("cpu" if device is None else device)
        # Only the generators that are forked get seeded: torch.manual_seed would also
        # reseed every CUDA device, which fork_rng(devices=[]) does not restore (and it
        # costs ~50 us more than seeding the CPU generator alone).
        self.cuda = device.type == "cuda"
        self.index = (device.index or 0) if self.cuda else None

    def __enter__(self):
        devices = [self.index] if self.cuda else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.default_generator.manual_seed(self.seed)
        if self.cuda:
            with torch.cuda.device(self.index):
                torch.cuda.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


# --------------------------------------------------------------------------- inputs


@contextlib.contextmanager
def unchanged_on_error(estimator):
    """Restore the estimator's attributes if the block raises (fit must not half-fit)."""
    state = estimator.__dict__.copy()
    try:
        yield
    except BaseException:
        estimator.__dict__.clear()
        estimator.__dict__.update(state)
        raise


def _as_dtype(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` as ``dtype``; values beyond its range become inf quietly (the caller's finite
    check then sends them to ``validate_data``, which names the problem)."""
    if a.dtype == dtype:
        return a
    with np.errstate(over="ignore"):
        return a.astype(dtype)


def fast_xy(X, y, *, regression: bool, dtype=np.float32):
    """``(X, y)`` ready for the engine when they are plain, clean numpy arrays, else None.

    scikit-learn's ``validate_data`` costs 50-100 us, as much as a whole few-shot fit. For
    2-D float arrays with matching lengths and finite values (int labels for a classifier)
    the few checks below are all it would do; anything else returns None and goes through
    ``validate_data``, which then raises the usual errors. ``X`` (and a regressor's ``y``)
    come back as ``dtype``: float32 for the engine, float64 for table mode, which
    standardizes before it rounds to float32.
    """
    if type(X) is not np.ndarray or type(y) is not np.ndarray:
        return None
    if X.ndim != 2 or X.dtype.kind != "f" or not X.flags.c_contiguous or not X.flags.writeable:
        return None
    if X.shape[0] == 0 or X.shape[1] == 0 or y.shape[:1] != X.shape[:1]:
        return None
    if regression:
        if y.dtype.kind != "f" or y.ndim not in (1, 2) or y.size == 0:
            return None
        y = _as_dtype(y, dtype)
        if not np.isfinite(y).all():
            return None
    elif y.ndim != 1 or y.dtype.kind not in "iu":
        return None
    X = _as_dtype(X, dtype)
    if not np.isfinite(X).all():
        return None
    return X, y


def fast_X(X, n_features: int, *, dtype=np.float32):
    """``X`` as ``dtype`` for prediction when it is a plain, clean numpy array, else None.

    The checks of :func:`fast_xy` for ``X`` alone, with the feature count of ``fit``.
    """
    if (
        type(X) is np.ndarray
        and X.ndim == 2
        and X.dtype.kind == "f"
        and X.flags.c_contiguous
        and X.flags.writeable
        and X.shape[0] > 0
        and X.shape[1] == n_features
    ):
        X = _as_dtype(X, dtype)
        if np.isfinite(X).all():
            return X
    return None


# --------------------------------------------------------------------------- the estimators'


def check_n_features(given: int, expected: int) -> None:
    """Raise if ``fit``'s X has another feature count than the initialization's."""
    if given != expected:
        raise ValueError(
            f"X has {given} feature(s), but the meta-learned initialization expects "
            f"{expected} feature(s); pass the features used in meta-training."
        )


def _fast_fit_arrays(est, X, y, target, dtype):
    """:func:`fast_xy` for ``fit``, setting what ``validate_data`` would set on ``est``
    (plain arrays have no feature names); None when the arrays need ``validate_data``."""
    fast = fast_xy(X, y, regression=target.regression, dtype=dtype)
    if fast is not None:
        est.n_features_in_ = fast[0].shape[1]
        est.__dict__.pop("feature_names_in_", None)
    return fast


def fit_data(est, X, y, target) -> tuple[np.ndarray, np.ndarray, bool]:
    """``fit``'s ``X`` and ``y`` as arrays (``X`` float32), and whether they took the
    fast path.

    Plain, clean numpy arrays skip scikit-learn's ``validate_data``, which costs as much
    as a few-shot fit (:func:`fast_xy`); anything else goes through it with the target
    kind's checks and raises its usual errors. ``target`` is the estimator's
    :class:`~metafit.estimators._targets.TargetKind`.
    """
    fast = _fast_fit_arrays(est, X, y, target, np.float32)
    if fast is not None:
        return fast[0], fast[1], True
    refuse_sparse("fit", y=y)  # X: validate_data says so itself
    X, y = validate_data(est, X, y, dtype=np.float32, allow_nd=True, **target.fit_checks)
    return _writable(X), y, False


def table_fit_data(est, X, y, prep, target) -> tuple[np.ndarray, np.ndarray, bool]:
    """``fit``'s data for a table-mode initialization: categorical columns one-hot,
    checked in float64 (plain arrays by :func:`fast_xy`), standardized (a column of
    timestamps keeps its digits), and only then float32; ``y`` standardized too for a
    regressor. ``prep`` is the initialization's
    :class:`~metafit.estimators._table_mode.TablePreprocessing`."""
    encoding = prep.encoding
    fast = None
    if encoding is not None:  # categorical columns, one-hot as in meta-training
        X = encoding.transform(X, "fit")
    else:
        fast = _fast_fit_arrays(est, X, y, target, np.float64)
    if fast is not None:
        X, y = fast
    else:
        refuse_sparse("fit", y=y)
        X, y = validate_data(est, X, y, dtype=np.float64, **target.fit_checks)
    if encoding is not None:  # scikit-learn's convention: the columns given
        est.n_features_in_ = len(encoding.columns)
        est.feature_names_in_ = np.asarray(encoding.columns, dtype=object)
    check_n_features(X.shape[1], prep.scaling.x_mean.size)  # before it broadcasts
    if target.regression:  # encode checks the standardized targets' scale
        y = prep.scaling.transform_y(np.asarray(y, dtype=np.float64))
    return prep.scaling.transform_X(X), y, False


def predict_data(est, X) -> np.ndarray:
    """Validated float32 ``X`` for prediction by the fitted ``est`` (plain arrays by
    :func:`fast_X`; table mode checks in float64 and standardizes)."""
    check_is_fitted(est)
    named = "feature_names_in_" in est.__dict__
    prep = est.__dict__.get("_table_prep")
    if prep is not None:
        if prep.encoding is not None:
            X = check_array(prep.encoding.transform(X, "predict"), dtype=np.float64)
        else:
            fast = None if named else fast_X(X, est.n_features_in_, dtype=np.float64)
            X = validate_data(est, X, dtype=np.float64, reset=False) if fast is None else fast
        return prep.scaling.transform_X(X)
    checked = None if named else fast_X(X, est.n_features_in_)
    if checked is None:
        checked = _writable(validate_data(est, X, dtype=np.float32, reset=False,
                                          allow_nd=True))
    return checked


def _writable(X: np.ndarray) -> np.ndarray:
    """``X``, copied if read-only (torch warns on read-only arrays, e.g. pandas')."""
    return X if X.flags.writeable else X.copy()
