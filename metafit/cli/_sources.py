"""Where the command line's tasks come from: the ``tasks`` section's sources.

``sinusoid``, ``digits``, ``omniglot`` and ``table`` (a CSV, TSV or Parquet file with a
group column): each builder turns a checked ``tasks`` section into :class:`TaskSplits`.
The schema of the section is checked by :mod:`metafit.cli.config` before anything here
runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metafit.cli._errors import ConfigError

__all__ = ["EpochTasks", "TaskSplits", "build_task_splits"]


class EpochTasks:
    """A finite list of tasks served endlessly, reshuffled every epoch (re-iterable).

    ``meta_fit`` stops when a finite iterable runs out; a finite list of tasks is cycled
    until ``meta_iterations`` is reached. (A table is meta-trained in table mode instead,
    :class:`metafit.grouped.GroupedTable`, which draws new episodes every meta-batch.)
    """

    def __init__(self, tasks: list, random_state: int = 0):
        self.tasks = list(tasks)
        self.random_state = random_state

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        rng = np.random.default_rng(self.random_state)
        while True:
            for i in rng.permutation(len(self.tasks)):
                yield self.tasks[i]


@dataclass
class TaskSplits:
    """Meta-training tasks, validation tasks (tuning) and test tasks (``evaluate``)."""

    train: Any
    validation: list
    test: list


def build_task_splits(source: str, spec: dict, config) -> TaskSplits:
    """The tasks of source ``source`` from section ``spec`` of ``config``."""
    return _BUILDERS[source](config, spec)


def _pop_counts(spec: dict) -> tuple[int, int, int]:
    """Pop (validation_tasks, test_tasks, random_state) out of a task section."""
    n_val = int(spec.pop("validation_tasks", 100))
    n_test = int(spec.pop("test_tasks", 100))
    return n_val, n_test, spec.pop("random_state", 0)

def _splits(train, val_source, test_source, n_val: int, n_test: int, seed: int):
    # Held-out tasks get seeds of their own, apart from the training stream's.
    return TaskSplits(
        train,
        val_source.sample(n_val, random_state=seed + 1_000_003),
        test_source.sample(n_test, random_state=seed + 2_000_003),
    )

def _tasks_sinusoid(config, spec: dict) -> TaskSplits:
    from metafit.task_sources import SinusoidTasks

    n_val, n_test, seed = _pop_counts(spec)
    sampler = SinusoidTasks(**spec)
    train = SinusoidTasks(random_state=seed, **spec)
    return _splits(train, sampler, sampler, n_val, n_test, seed)

def _tasks_digits(config, spec: dict) -> TaskSplits:
    from metafit.datasets import load_digits_tasks

    n_val, n_test, seed = _pop_counts(spec)
    train = load_digits_tasks(split="train", random_state=seed, **spec)
    # The digits have two class splits: validation and test tasks are different
    # episodes over the held-out digits.
    held_out = load_digits_tasks(split="test", random_state=seed, **spec)
    return _splits(train, held_out, held_out, n_val, n_test, seed)

def _tasks_omniglot(config, spec: dict) -> TaskSplits:
    from metafit.datasets import omniglot_tasks

    n_val, n_test, seed = _pop_counts(spec)
    if "path" in spec:
        spec["path"] = str(config.resolve(spec["path"]))
    train = omniglot_tasks("train", random_state=seed, **spec)
    val, test = omniglot_tasks("val", **spec), omniglot_tasks("test", **spec)
    return _splits(train, val, test, n_val, n_test, seed)

def _tasks_table(config, spec: dict) -> TaskSplits:
    from metafit.grouped import GroupedTable
    from metafit.task_sources import tasks_from_groups

    path = config.resolve(spec.pop("path"))
    frame = _read_table(config, path)
    group, target = spec.pop("group"), spec.pop("target")
    features = _feature_columns(config, frame, path.name, group, target, spec.pop("features", None))
    X = frame[features]
    val_frac = float(spec.pop("validation_fraction", 0.2))
    test_frac = float(spec.pop("test_fraction", 0.2))
    if not (0 < val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ConfigError(
            f"{config.path}: tasks: validation_fraction ({val_frac}) and test_fraction "
            f"({test_frac}) must lie in (0, 1) and sum to less than 1"
        )
    seed = spec.pop("random_state", 0)
    groups = frame[group].to_numpy()
    names = np.unique(groups)
    if len(names) < 3:
        raise ConfigError(
            f"{config.path}: tasks.group: column {group!r} has {len(names)} groups; "
            "meta-training, validation and test need at least 3"
        )
    order = np.random.default_rng(seed).permutation(names)
    n_val = max(1, round(val_frac * len(names)))
    n_test = round(test_frac * len(names))
    parts = np.split(order, [n_val, n_val + n_test])
    y = frame[target].to_numpy()
    if config.estimator_type == "regressor":
        y = y.astype(np.float32)
    out = []
    for i, part in enumerate(parts):
        rows = np.isin(groups, part)
        if not rows.any():
            out.append([])
            continue
        out.append(
            tasks_from_groups(
                X.to_numpy(np.float32)[rows], y[rows], groups[rows],
                random_state=seed + i, **spec,
            )
        )
    val, test, train = out
    if not train:
        raise ConfigError(
            f"{config.path}: tasks: no group left for meta-training; lower "
            "validation_fraction or test_fraction"
        )
    # Table mode: new episodes every meta-batch, standardization inside (saved with the
    # initialization, with a classifier's classes), the validation groups' tasks for the
    # kept state and "auto".
    rows = ~np.isin(groups, np.concatenate(parts[:2]))
    train = GroupedTable(X[rows], y[rows], groups[rows])
    return TaskSplits(train, val, test or val)


def _read_table(config, path: Path):
    """A CSV, TSV or Parquet file as a pandas DataFrame."""
    if not path.is_file():
        raise ConfigError(f"{config.path}: tasks.path: file not found: {path}")
    try:
        import pandas as pd
    except ImportError:
        raise ConfigError("tasks.source 'table' needs pandas: pip install pandas") from None
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".txt", ".tsv"):
        return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    raise ConfigError(
        f"{config.path}: tasks.path: {path.name} is neither .csv, .tsv nor .parquet"
    )


def _feature_columns(config, frame, name, group, target, features) -> list:
    """The feature columns (all but group and target by default), checked numeric."""
    if features is None:
        features = [c for c in frame.columns if c not in (group, target)]
    for key, col in [("group", group), ("target", target)] + [("features", c) for c in features]:
        if col not in frame.columns:
            raise ConfigError(
                f"{config.path}: tasks.{key}: column {col!r} is not in {name} "
                f"(columns: {', '.join(map(str, frame.columns))})"
            )
    bad = [c for c in features if not np.issubdtype(frame[c].dtype, np.number)]
    if bad:
        raise ConfigError(
            f"{config.path}: tasks.features: column {bad[0]!r} is not numeric; encode it "
            "or leave it out of features"
        )
    return features


_BUILDERS = {
    "sinusoid": _tasks_sinusoid,
    "digits": _tasks_digits,
    "omniglot": _tasks_omniglot,
    "table": _tasks_table,
}
