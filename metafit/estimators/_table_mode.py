"""Table mode of ``meta_fit``: from ``(X, y, groups)`` to the tasks the engine trains on.

The estimator shell calls :func:`table_tasks` when ``meta_fit`` gets ``groups=``. It splits
whole groups into meta-training and validation (``validation_fraction``), learns the
standardization from the meta-training rows, and returns an endless stream of episodes
(:class:`metafit.grouped.GroupEpisodes`, resampled every meta-batch) with fixed
validation episodes, all in standardized units. The standardization goes into the
meta-learned initialization, so that ``fit`` and ``predict`` take and return the table's
own units.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metafit._task_types import Task, as_task
from metafit.estimators._inputs import seed_from
from metafit.estimators._targets import TableClassificationTarget, label_codes
from metafit.grouped import (
    CategoricalEncoding,
    GroupedTable,
    GroupEpisodes,
    Standardization,
    check_table,
    split_groups,
    validation_episodes,
    warn_skipped,
)

__all__ = [
    "InTableUnits",
    "TablePreprocessing",
    "TableTasks",
    "meta_fit_inputs",
    "standardize_tasks",
    "table_tasks",
]


@dataclass(frozen=True)
class TablePreprocessing:
    """What table mode learned from the meta-training rows and saves with the
    initialization: the one-hot encoding of categorical columns (if any), the
    standardization, and a classifier's classes (the labels of the table, in the order
    of the head's outputs). ``fit`` and ``predict`` apply it; a regressor's predictions
    are put back in the target's units with ``scaling.inverse_y``."""

    scaling: Standardization
    encoding: CategoricalEncoding | None = None
    classes: np.ndarray | None = None

    @classmethod
    def of(cls, init) -> TablePreprocessing | None:
        """The preprocessing saved with a meta-learned initialization, if any."""
        if init is None or "standardization" not in init.metadata:
            return None
        meta = init.metadata
        encoding = None
        if "encoding" in meta:
            encoding = CategoricalEncoding.from_metadata(meta["encoding"], init.n_features)
        classes = None
        if "classes" in meta:
            classes = np.asarray(meta["classes"])
            if classes.ndim != 1 or len(classes) != init.n_outputs:
                raise ValueError(
                    f"'classes' must list one label per output ({init.n_outputs}), got "
                    f"{meta['classes']!r}"
                )
        return cls(Standardization.from_metadata(meta["standardization"], init.n_features),
                   encoding, classes)

    def metadata(self) -> dict:
        """The ``MetaInit.metadata`` entries."""
        out = {"standardization": self.scaling.to_metadata()}
        if self.encoding is not None:
            out["encoding"] = self.encoding.to_metadata()
        if self.classes is not None:
            out["classes"] = self.classes.tolist()
        return out

    def in_table_units(self, network: nn.Module) -> InTableUnits:
        """``network`` as a module that takes and returns the table's units (for
        ``to_skorch``); a ValueError when categorical columns are one-hot encoded, which a
        module of tensors cannot do."""
        if self.encoding is not None:
            raise ValueError(
                "this initialization one-hot encodes categorical columns "
                f"({', '.join(map(str, list(self.encoding.categories)[:5]))}), which a skorch "
                "net's tensors cannot carry; meta-fit on numeric columns (encode them "
                "yourself) to export the network."
            )
        return InTableUnits(network, self.scaling)

    def labels(self, y: np.ndarray) -> np.ndarray:
        """A classifier's labels as indices of :attr:`classes` (a regressor's ``y`` as
        it is); a ValueError names labels that are not among them."""
        if self.classes is None:
            return y
        return TableClassificationTarget(self.classes).encode(y, False).y


class InTableUnits(nn.Module):
    """A network trained in standardized units, wrapped to take the table's features and
    (a regressor) return the table's targets: ``network((X - x_mean) / x_scale)``, times
    ``y_scale`` plus ``y_mean``. The statistics are buffers, so training the wrapper
    (skorch's ``partial_fit``) trains the network only. It computes in float32, where
    ``fit`` standardizes in float64: features with large offsets (timestamps) lose digits.
    """

    def __init__(self, network: nn.Module, scaling: Standardization):
        super().__init__()
        self.network = network
        self.register_buffer("x_mean", torch.as_tensor(scaling.x_mean, dtype=torch.float32))
        self.register_buffer("x_scale", torch.as_tensor(scaling.x_scale, dtype=torch.float32))
        self.regression = scaling.y_mean is not None
        if self.regression:
            self.register_buffer("y_mean", torch.as_tensor(scaling.y_mean, dtype=torch.float32))
            self.register_buffer("y_scale",
                                 torch.as_tensor(scaling.y_scale, dtype=torch.float32))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        out = self.network((X - self.x_mean) / self.x_scale)
        return out * self.y_scale + self.y_mean if self.regression else out


@dataclass(frozen=True)
class TableTasks:
    """What table mode hands to the usual ``meta_fit`` path."""

    episodes: GroupEpisodes
    validation: list | None
    preprocessing: TablePreprocessing


def meta_fit_arguments(X, y, groups, validation_tasks):
    """``meta_fit``'s arguments as ``(X, y, groups, validation_tasks)`` of one of its two
    modes: without ``groups``, ``y`` is the positional validation tasks of
    ``meta_fit(tasks, validation_tasks)`` (then ``y`` is None), and a
    :class:`~metafit.grouped.GroupedTable` as ``X`` is unpacked into table mode."""
    if groups is not None:
        return X, y, groups, validation_tasks
    table = isinstance(X, GroupedTable)
    if y is not None and validation_tasks is not None:
        hint = "" if table else "; for a table, pass groups="
        raise TypeError(
            f"meta_fit({'table' if table else 'tasks'}, validation_tasks) got validation "
            f"tasks twice (second argument and keyword){hint}."
        )
    validation_tasks = y if validation_tasks is None else validation_tasks
    if table:
        return X.X, X.y, X.groups, validation_tasks
    return X, None, None, validation_tasks


def meta_fit_inputs(est, X, y, groups, validation_tasks, *, regression: bool, previous=None):
    """``(tasks, validation tasks, TablePreprocessing or None)`` of ``meta_fit``'s modes,
    from the arguments of :func:`meta_fit_arguments`.

    Without ``groups``, ``X`` holds the tasks (standardized when ``standardize=True``).
    With ``groups``, the table is encoded, split, standardized and sampled
    (:func:`table_tasks`), and user-given validation tasks are standardized.
    ``previous`` is the preprocessing of the initialization a warm start continues.
    """
    if groups is None:
        if est.standardize is not True:
            return X, validation_tasks, None
        return scaled_task_inputs(X, validation_tasks, regression=regression,
                                  previous=previous)
    table = table_tasks(est, X, y, groups, regression=regression, previous=previous,
                        hold_out=validation_tasks is None)
    prep = table.preprocessing
    if validation_tasks is None:
        return table.episodes, table.validation, prep
    return table.episodes, standardize_tasks(validation_tasks, prep), prep


#: task mode's ``standardize=True`` learns the statistics from this many first tasks
_STATISTICS_TASKS = 100


def scaled_task_inputs(tasks, validation_tasks, *, regression: bool, previous=None):
    """Task mode with ``standardize=True``: ``(tasks, validation tasks, preprocessing)``
    in standardized units, the statistics from the rows of the first
    ``_STATISTICS_TASKS`` tasks (or ``previous``'s, for a warm start). The stream is read
    lazily; the tasks peeked at come first."""
    if isinstance(tasks, (Task, np.ndarray)) or not isinstance(tasks, Iterable):
        return tasks, validation_tasks, None  # read_tasks says what is wrong
    stream = iter(tasks)
    head = [as_task(t) for t in itertools.islice(stream, _STATISTICS_TASKS)]
    if not head:
        return [], validation_tasks, None  # "tasks is empty", from read_tasks
    if any(t.X_support.ndim != 2 for t in head):
        raise ValueError(
            "standardize=True scales 2-D features (n_samples, n_features); these tasks "
            f"have X of shape {head[0].X_support.shape[1:]} per example. Leave it False "
            "for images and other n-D inputs."
        )
    scaling = previous.scaling if previous is not None else None
    if scaling is None:
        X = np.concatenate([a for t in head for a in (t.X_support, t.X_query)])
        y = None
        if regression:
            y = np.concatenate([a for t in head for a in (t.y_support, t.y_query)])
        scaling = Standardization.fit(X, y)
    scaled = (_scaled(t, scaling) for t in itertools.chain(head, map(as_task, stream)))
    prep = TablePreprocessing(scaling)
    val = None if validation_tasks is None else standardize_tasks(validation_tasks, prep)
    return scaled, val, prep


def _scaled(task: Task, scaling: Standardization) -> Task:
    return Task(scaling.transform_X(task.X_support), scaling.transform_y(task.y_support),
                scaling.transform_X(task.X_query), scaling.transform_y(task.y_query),
                task.info)


def standardize_tasks(tasks, prep: TablePreprocessing) -> list[Task]:
    """User-given validation tasks of table mode, in the standardized units (a
    classifier's labels, the table's, as indices of its classes)."""
    out = []
    for task in map(as_task, tasks):
        if prep.classes is not None:
            task = Task(task.X_support, prep.labels(task.y_support), task.X_query,
                        prep.labels(task.y_query), task.info)
        out.append(_scaled(task, prep.scaling))
    return out


def table_tasks(est, X, y, groups, *, regression: bool, previous=None, hold_out: bool = True
                ) -> TableTasks:
    """Encode, split, standardize and sample the table ``(X, y, groups)`` for
    ``est.meta_fit``.

    ``previous`` (warm start) is the preprocessing of the initialization to continue;
    otherwise it is learned from the rows (the standardization from the meta-training
    rows only). ``hold_out=False`` (the user gave validation tasks) trains on every group.

    Raises
    ------
    ValueError
        For a malformed table (lengths, missing group labels, non-numeric or non-finite
        values), or when no group is large enough for an episode.
        For a classifier, also for fewer than 2 classes, missing labels or (warm start)
        labels the initialization does not know.
    """
    if y is None:
        raise TypeError("meta_fit(X, y, groups=groups) needs y, the target of each row.")
    encoding = previous.encoding if previous is not None else None
    if previous is None and est.categorical_features == "from_dtype":
        encoding = CategoricalEncoding.fit(X)
    if encoding is not None:
        X = encoding.transform(X, "meta_fit")
    classes = None
    if not regression:  # labels of any kind, as indices of the table's classes
        y, classes = _class_indices(y, None if previous is None else previous.classes)
    X, y, groups = check_table(X, y, groups)
    if regression and not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"meta_fit: y must be numeric for a regressor, got dtype {y.dtype}.")
    rng = np.random.default_rng(seed_from(est.random_state))
    fraction = est.validation_fraction if hold_out else None
    train, val = split_groups(groups, fraction, rng)
    scaling = previous.scaling if previous is not None else None
    if scaling is None and est.standardize is False:  # raw values, as asked
        scaling = Standardization(np.zeros(X.shape[1]), np.ones(X.shape[1]))
        if regression:
            outputs = 1 if y.ndim == 1 else y.shape[1]
            scaling = Standardization(scaling.x_mean, scaling.x_scale, np.zeros(outputs),
                                      np.ones(outputs))
    if scaling is None:
        scaling = Standardization.fit(X[train], y[train] if regression else None)
    elif len(scaling.x_mean) != X.shape[1]:
        raise ValueError(
            f"warm_start=True continues an initialization for {len(scaling.x_mean)} "
            f"features, but X has {X.shape[1]}; pass the same columns or set "
            "warm_start=False."
        )
    Xs = scaling.transform_X(X)
    ys = scaling.transform_y(y.astype(np.float64)) if regression else y
    lo, hi = est.support_range
    Xv, yv, gv = Xs[val], ys[val], groups[val]
    held_out = [(Xv[gv == g], yv[gv == g]) for g in np.unique(gv)]
    episodes = GroupEpisodes(
        Xs[train], ys[train], groups[train],
        support_range=(lo, hi), batch_size=est.meta_batch_size, random_state=rng,
        held_out=held_out,
    )
    warn_skipped(episodes.n_skipped_, episodes.n_groups_ + episodes.n_skipped_, lo)
    validation = None
    if val.any():
        # the ends and the middle of the range: the choices must serve any few-shot fit
        sizes = sorted({lo, (lo + hi + 1) // 2, hi})
        validation = validation_episodes(Xs[val], ys[val], groups[val],
                                         support_sizes=sizes, rng=rng) or None
    if fraction and validation is None:
        _warn_no_validation(fraction, len(np.unique(groups)), val.any(), lo)
    return TableTasks(episodes, validation, TablePreprocessing(scaling, encoding, classes))


def _class_indices(y, known: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's table labels as ``(indices, classes)``: the classes sorted, or
    ``known`` (the initialization a warm start continues), which must hold them all."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"meta_fit: a classifier's y is one label per row; got shape {y.shape}."
        )
    if known is not None:
        return TableClassificationTarget(known).encode(y, False).y, known
    classes, codes = label_codes(y)
    if len(classes) < 2:
        raise ValueError(
            f"meta_fit: y holds one class only ({classes[0]!r}); a classifier's table needs "
            "at least 2 classes."
        )
    return codes.astype(np.int64), classes


def _warn_no_validation(fraction: float, n_groups: int, held_out: bool, least: int) -> None:
    """Say that the table leaves ``validation_fraction`` without validation groups."""
    why = (f"its held-out groups are too small for an episode ({least} support rows and "
           "at least one query row)" if held_out else
           f"a table of {n_groups} group(s) holds none out (3 are needed: 2 stay for "
           "meta-training)")
    warnings.warn(
        f"validation_fraction={fraction:g} gave no validation tasks: {why}. Meta-training "
        "runs without them: no early stopping, fit adapts with meta-training's inner_lr and "
        "inner_steps (\"auto\" chooses nothing), and algorithm=\"auto\" is MAML. Pass "
        "validation_tasks, or more or larger groups.",
        UserWarning, stacklevel=5,
    )
