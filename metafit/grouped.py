"""Grouped tables as meta-learning data: episodes drawn anew from the groups, the split of
groups into meta-training and validation, and the standardization learned from the
meta-training rows.

This is the data side of table mode, ``meta_fit(X, y, groups=groups)``: numpy only, no
torch, no estimator. :class:`GroupEpisodes` never runs out (every meta-batch draws new
support and query rows), and the tasks of one meta-batch share their shapes, so that the
engine adapts them in one vectorized call however ragged the groups are.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from metafit._task_types import Task, TaskBatch, refuse_sparse
from metafit.task_sources import check_group_labels

__all__ = [
    "CategoricalEncoding",
    "GroupEpisodes",
    "GroupedTable",
    "Standardization",
    "check_table",
    "split_groups",
]


@dataclass(frozen=True, eq=False)
class GroupedTable:
    """A table with a group column, as one argument: what ``meta_fit(X, y, groups=)``
    takes, for the callers that pass meta-training data along (``metafit.tune`` in meta
    mode, the command line's ``table`` source).

    ``est.meta_fit(GroupedTable(X, y, groups), validation_tasks)`` is
    ``est.meta_fit(X, y, groups=groups, validation_tasks=validation_tasks)``.

    Parameters
    ----------
    X : array-like or DataFrame of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
    groups : array-like of shape (n_samples,)
        The group label of each row, any hashable values.
    """

    X: object
    y: object
    groups: object


#: at most this many categories per column: more is an identifier, not a category
_MAX_CATEGORIES = 1000


@dataclass(frozen=True)
class CategoricalEncoding:
    """One-hot columns for a DataFrame's categorical and object columns, learned from the
    meta-training rows (scikit-learn's ``categorical_features="from_dtype"``).

    Numeric columns pass unchanged; a category unseen in meta-training (a new school's
    new district) encodes as all zeros. Saved in the meta-learned initialization's
    metadata, so that ``fit`` and ``predict`` encode a new group's rows the same way.
    """

    columns: tuple[str, ...]
    categories: dict  # column -> tuple of category labels (as strings)

    @classmethod
    def fit(cls, frame) -> CategoricalEncoding | None:
        """The encoding of ``frame``'s non-numeric columns, or None when all are numeric."""
        if not hasattr(frame, "select_dtypes"):
            return None
        cats = list(frame.select_dtypes(include=["category", "object", "string"]).columns)
        if not cats:
            return None
        found = {}
        for col in cats:
            values = frame[col]
            if values.isna().any():
                raise ValueError(
                    f"meta_fit: categorical column {col!r} has missing values; fill them "
                    "(e.g. with 'missing') first."
                )
            labels = sorted({str(v) for v in values})
            if len(labels) > _MAX_CATEGORIES:
                raise ValueError(
                    f"meta_fit: column {col!r} has {len(labels)} distinct values, too many "
                    "for a category (an identifier?); drop it or encode it yourself."
                )
            found[str(col)] = tuple(labels)
        return cls(tuple(str(c) for c in frame.columns), found)

    @property
    def n_encoded(self) -> int:
        """Columns after encoding."""
        return sum(len(self.categories.get(c, (None,))) for c in self.columns)

    def transform(self, frame, where: str = "fit") -> np.ndarray:
        """The encoded float64 array of ``frame`` (a DataFrame with the same columns)."""
        import pandas as pd  # a DataFrame was given: pandas is there

        if not hasattr(frame, "columns"):
            raise TypeError(
                f"{where}: this initialization was meta-trained on a DataFrame with "
                f"categorical columns {sorted(self.categories)}; pass a DataFrame with the "
                f"columns {list(self.columns)}."
            )
        names = [str(c) for c in frame.columns]
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise ValueError(f"{where}: X lacks the columns {missing} of meta-training.")
        frame = frame.rename(columns=str)
        parts = []
        for col in self.columns:
            if col in self.categories:
                labels = self.categories[col]
                # pandas codes the labels in one pass; an unseen one is -1 (a Categorical
                # with unseen values would do the same, but that is deprecated in pandas 3)
                idx = pd.Index(labels).get_indexer(frame[col].astype(str).to_numpy())
                onehot = np.zeros((len(frame), len(labels)))
                seen = idx >= 0
                onehot[np.flatnonzero(seen), idx[seen]] = 1.0
                parts.append(onehot)
            else:
                try:
                    parts.append(frame[col].to_numpy(np.float64).reshape(-1, 1))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{where}: column {col!r} was numeric in meta-training but is not "
                        "here."
                    ) from None
        return np.hstack(parts)

    def to_metadata(self) -> dict:
        return {"columns": list(self.columns),
                "categories": {k: list(v) for k, v in self.categories.items()}}

    @classmethod
    def from_metadata(cls, value, n_features: int | None = None) -> CategoricalEncoding:
        """Rebuild from :meth:`to_metadata`'s dict; a ValueError says what is malformed."""
        ok = (
            isinstance(value, dict) and isinstance(value.get("columns"), list)
            and isinstance(value.get("categories"), dict)
            and all(isinstance(c, str) for c in value["columns"])
            and all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                    for v in value["categories"].values())
            and set(value["categories"]) <= set(value["columns"])
        )
        if not ok:
            raise ValueError("'encoding' must hold columns (strings) and categories "
                             "(lists of strings, for some of the columns)")
        out = cls(tuple(value["columns"]),
                  {k: tuple(v) for k, v in value["categories"].items()})
        if n_features is not None and out.n_encoded != n_features:
            raise ValueError(f"'encoding' makes {out.n_encoded} columns for {n_features} "
                             "features")
        return out


def check_table(X, y, groups, where: str = "meta_fit") -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """``X`` (2-D float64), ``y`` and ``groups`` as arrays of one length, or a clear error."""
    refuse_sparse(where, X=X, y=y, groups=groups)
    if hasattr(X, "select_dtypes") and len(X.select_dtypes(exclude=["number", "bool"]).columns):
        bad = list(X.select_dtypes(exclude=["number", "bool"]).columns)[:3]
        raise ValueError(
            f"{where}: X has non-numeric columns {bad}; set categorical_features="
            "'from_dtype' (one-hot inside), or encode them first (OneHotEncoder)."
        )
    if not isinstance(X, np.ndarray):
        try:
            X = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: X must be numeric; encode text or categorical columns first."
            ) from None
    y, groups = np.asarray(y), group_codes(groups, where)
    if X.ndim != 2:
        raise ValueError(
            f"{where}: X must be 2-D (n_samples, n_features), got shape {X.shape}; reshape "
            "a single feature with X.reshape(-1, 1)."
        )
    if not (len(X) == len(y) == len(groups)):
        raise ValueError(
            f"{where}: X, y and groups must have the same length, got {len(X)}, {len(y)} "
            f"and {len(groups)}."
        )
    if len(X) == 0:
        raise ValueError(f"{where}: X is empty (0 rows); table mode needs the old groups' rows.")
    X = X.astype(np.float64, copy=False)
    if not np.isfinite(X).all():
        raise ValueError(f"{where}: X contains NaN or infinity; clean or impute it first.")
    if np.issubdtype(y.dtype, np.number) and not np.isfinite(y).all():
        raise ValueError(f"{where}: y contains NaN or infinity; clean or impute it first.")
    return X, y, groups


def group_codes(groups, where: str = "meta_fit") -> np.ndarray:
    """Integer codes of any hashable group labels (strings and ints mixed, tuples), in
    order of first appearance; None and NaN labels are refused, naming the first row."""
    if isinstance(groups, np.ndarray):
        if groups.ndim != 1:
            raise ValueError(
                f"{where}: groups must be 1-D, one label per row; got shape {groups.shape}."
            )
        values = groups.tolist()
    else:
        values = list(groups)
    check_group_labels(values)
    index: dict = {}
    try:
        return np.fromiter((index.setdefault(g, len(index)) for g in values), dtype=np.int64,
                           count=len(values))
    except TypeError:
        raise ValueError(
            f"{where}: group labels must be hashable (strings, numbers, tuples); got "
            f"{type(next(g for g in values if not _hashable(g))).__name__}."
        ) from None


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def split_groups(
    groups: np.ndarray, validation_fraction: float | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Row masks of the meta-training and validation groups (whole groups, never rows).

    At least one group is held out when the fraction asks for any, and at least two stay
    for training; with fewer than 3 groups nothing is held out.
    """
    labels = np.unique(groups)
    n_val = 0
    if validation_fraction and len(labels) >= 3:
        n_val = min(max(1, round(validation_fraction * len(labels))), len(labels) - 2)
    held_out = rng.permutation(len(labels))[:n_val]
    val = np.isin(groups, labels[held_out])
    return ~val, val


@dataclass(frozen=True)
class Standardization:
    """Means and scales of the features and (for regression) the target, learned from the
    meta-training rows; applied before the network and undone on its outputs.

    Constant columns get scale 1 (they are only centred). Saved in the meta-learned
    initialization's metadata (:meth:`to_metadata`), so that ``fit`` and ``predict``
    apply the same transformation wherever the initialization goes.
    """

    x_mean: np.ndarray
    x_scale: np.ndarray
    y_mean: np.ndarray | None = None
    y_scale: np.ndarray | None = None

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray | None = None) -> Standardization:
        """Statistics of ``X`` (and ``y`` when given: regression)."""
        x_mean, x_scale = _mean_scale(np.asarray(X, np.float64))
        if y is None:
            return cls(x_mean, x_scale)
        y_mean, y_scale = _mean_scale(np.asarray(y, np.float64).reshape(len(y), -1))
        return cls(x_mean, x_scale, y_mean, y_scale)

    def transform_X(self, X: np.ndarray) -> np.ndarray:
        """Standardized float32 features."""
        return ((X - self.x_mean) / self.x_scale).astype(np.float32)

    def transform_y(self, y: np.ndarray) -> np.ndarray:
        """Standardized float32 targets (unchanged without target statistics)."""
        if self.y_mean is None:
            return y
        mean, scale = (self.y_mean[0], self.y_scale[0]) if y.ndim == 1 else (
            self.y_mean, self.y_scale)
        return ((y - mean) / scale).astype(np.float32)

    def inverse_y(self, pred: np.ndarray) -> np.ndarray:
        """Predictions back in the target's units; ``pred`` is (n,) or (n, n_outputs)."""
        if self.y_mean is None:
            return pred
        if pred.ndim == 1:
            return pred * self.y_scale[0] + self.y_mean[0]
        return pred * self.y_scale + self.y_mean

    def inverse_std(self, std: np.ndarray) -> np.ndarray:
        """Predictive standard deviations back in the target's units."""
        if self.y_scale is None:
            return std
        return std * (self.y_scale[0] if std.ndim == 1 else self.y_scale)

    def to_metadata(self) -> dict:
        """A JSON-able dict for ``MetaInit.metadata["standardization"]``."""
        out = {"x_mean": self.x_mean.tolist(), "x_scale": self.x_scale.tolist()}
        if self.y_mean is not None:
            out.update(y_mean=self.y_mean.tolist(), y_scale=self.y_scale.tolist())
        return out

    @classmethod
    def from_metadata(cls, value, n_features: int | None = None) -> Standardization:
        """Rebuild from :meth:`to_metadata`'s dict; a ValueError says what is malformed."""
        if not isinstance(value, dict) or not {"x_mean", "x_scale"} <= set(value):
            raise ValueError("'standardization' must be a mapping with x_mean and x_scale")
        arrays = {}
        for key in ("x_mean", "x_scale", "y_mean", "y_scale"):
            if key not in value:
                continue
            try:
                a = np.asarray(value[key], dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"standardization.{key} must be a list of numbers") from None
            if a.ndim != 1 or not np.isfinite(a).all():
                raise ValueError(f"standardization.{key} must be a 1-D list of finite numbers")
            if key.endswith("scale") and not (a > 0).all():
                raise ValueError(f"standardization.{key} must be > 0")
            arrays[key] = a
        if arrays["x_mean"].shape != arrays["x_scale"].shape or (
            n_features is not None and len(arrays["x_mean"]) != n_features
        ):
            raise ValueError(
                f"standardization has {len(arrays['x_mean'])} feature means and "
                f"{len(arrays['x_scale'])} scales for {n_features} features"
            )
        if ("y_mean" in arrays) != ("y_scale" in arrays) or (
            "y_mean" in arrays and arrays["y_mean"].shape != arrays["y_scale"].shape
        ):
            raise ValueError("standardization needs y_mean and y_scale together, of one length")
        return cls(**arrays)


def _mean_scale(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = a.mean(axis=0)
    scale = a.std(axis=0)
    scale[~(scale > 1e-12 * np.maximum(np.abs(mean), 1.0))] = 1.0  # constant columns
    return mean, scale


class GroupEpisodes:
    """An endless stream of few-shot episodes drawn from the groups of a table.

    Every block of ``batch_size`` episodes (one meta-batch) draws one support size ``k``
    from ``support_range``, then ``batch_size`` groups with more than ``k`` rows (without
    replacement while there are enough), and for each a random support set of ``k`` rows
    and a query set of ``query_size`` rows from the others (with replacement from a group
    too small to give them all, which keeps the query loss an unbiased estimate of the
    group's). The tasks of a block share their shapes: the engine adapts them together.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
    groups : ndarray of shape (n_samples,)
    support_range : (int, int)
        Smallest and largest support size, both included.
    query_size : int, optional
        Query rows per episode; by default what a median group leaves after the smallest
        support, at most 20 (more adds little to the estimate of the loss, and costs every
        meta-step).
    batch_size : int
        Episodes per block (the estimator's ``meta_batch_size``).
    random_state : numpy Generator
    held_out : list of (ndarray, ndarray), optional
        The groups held out of the episodes for validation, each as ``(X, y)`` of all
        its rows. Never drawn; :meth:`whole_groups` adds them with ``held_out=True``.

    Attributes
    ----------
    n_groups_ : int
        Groups that can give an episode of the smallest support size.
    n_skipped_ : int
        Groups too small for any episode (one row or fewer than ``support_range[0] + 1``).
    """

    def __init__(self, X, y, groups, *, support_range, batch_size, random_state,
                 query_size=None, held_out=None):
        lo, hi = support_range
        self.held_out = list(held_out or [])
        self.X, self.y = X, y
        self.support_range = (int(lo), int(hi))
        self.batch_size = int(batch_size)
        self.rng = random_state
        labels, inverse = np.unique(groups, return_inverse=True)
        rows = [np.flatnonzero(inverse == i) for i in range(len(labels))]
        self.rows = [r for r in rows if len(r) >= lo + 1]
        self.sizes = np.array([len(r) for r in self.rows])
        self.n_groups_ = len(self.rows)
        self.n_skipped_ = len(rows) - len(self.rows)
        if not self.rows:
            raise ValueError(
                f"no group has more than {lo} rows, the smallest support size: every "
                f"episode needs {lo} support rows and at least one query row. Lower "
                "support_range or collect more rows per group."
            )
        if query_size is None:
            query_size = min(20, max(1, math.floor(np.median(self.sizes) - lo)))
        self.query_size = int(query_size)

    def __iter__(self) -> Iterator[Task]:
        while True:
            yield from self.block()

    def whole_groups(self, held_out: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every group that gives episodes, as ``(X, y)`` of all its rows, and with
        ``held_out`` the validation groups too: what a closed-form estimate from the
        whole table reads (:meth:`MetaAlgorithm.fitted_extras
        <metafit.algorithms.base.MetaAlgorithm.fitted_extras>`)."""
        own = [(self.X[r], self.y[r]) for r in self.rows]
        return own + self.held_out if held_out else own

    def block(self) -> list[Task]:
        """One meta-batch of episodes with equal shapes."""
        support, query = self._draw(self.batch_size)
        return [Task(self.X[s], self.y[s], self.X[q], self.y[q]) for s, q in zip(support, query)]

    def meta_batches(self, size: int) -> Iterator[TaskBatch]:
        """The endless stream of :meth:`block` s of ``size`` episodes, stacked: the same
        episodes (the same draws), gathered from the table as index arrays at once,
        without a :class:`Task` object each (what ``meta_fit`` reads)."""
        while True:
            yield TaskBatch.gather(self.X, self.y, *self._draw(int(size)))

    def _draw(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Row indices ``(support (size, k), query (size, query_size))`` of one block."""
        lo, hi = self.support_range
        k = int(self.rng.integers(lo, hi + 1))
        eligible = np.flatnonzero(self.sizes >= k + 1)
        if len(eligible) == 0:  # k above every group: the largest k some group allows
            k = int(self.sizes.max()) - 1
            eligible = np.flatnonzero(self.sizes >= k + 1)
        chosen = self.rng.choice(eligible, size, replace=len(eligible) < size)
        support = np.empty((size, k), dtype=np.int64)
        query = np.empty((size, self.query_size), dtype=np.int64)
        for i, g in enumerate(chosen):
            rows = self.rng.permutation(self.rows[g])
            rest = rows[k:]
            support[i] = rows[:k]
            query[i] = self.rng.choice(rest, self.query_size, replace=len(rest) < self.query_size)
        return support, query


def validation_episodes(X, y, groups, *, support_sizes, rng, limit: int = 100) -> list[Task]:
    """Fixed episodes of the validation groups: one per group and support size (fewer
    rows for a small group, which keeps at least one query row), the others as query.

    Several sizes across the support range make the choices made on them (the state
    kept, ``inner_lr="auto"``, ``algorithm="auto"``) hold for any few-shot ``fit``.
    Beyond ``limit``, episodes are dropped at random (the groups and sizes stay mixed).
    (Drawing each size several times for tables of few groups was measured worse on the
    benchmark's small tables, and left out.)
    """
    tasks = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if len(members) < 2:
            continue
        for size in support_sizes:
            rows = rng.permutation(members)
            k = min(int(size), len(rows) - 1)
            tasks.append(Task(X[rows[:k]], y[rows[:k]], X[rows[k:]], y[rows[k:]]))
    if len(tasks) > limit:
        tasks = [tasks[i] for i in sorted(rng.choice(len(tasks), limit, replace=False))]
    return tasks


def warn_skipped(n_skipped: int, n_groups: int, smallest: int) -> None:
    """Say how many groups were too small for an episode (they are left out)."""
    if n_skipped:
        warnings.warn(
            f"{n_skipped} of {n_groups} meta-training groups have {smallest} rows or fewer, "
            f"too few for an episode (support_range starts at {smallest}, plus one query "
            "row); they are left out of meta-training.",
            UserWarning,
            stacklevel=4,
        )
