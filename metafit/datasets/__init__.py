"""Data sets for few-shot learning: Omniglot (npz or PNG layout) and scikit-learn's digits.

See docs/datasets.md for formats, path resolution and the train/val/test protocols.
"""

from __future__ import annotations

from metafit.datasets.digits import load_digits_split, load_digits_tasks
from metafit.datasets.omniglot import (
    OmniglotData,
    clear_omniglot_cache,
    data_home,
    load_omniglot,
    load_omniglot_split,
    omniglot_split_indices,
    omniglot_splits,
    omniglot_tasks,
)

__all__ = [
    "OmniglotData",
    "clear_omniglot_cache",
    "data_home",
    "load_digits_split",
    "load_digits_tasks",
    "load_omniglot",
    "load_omniglot_split",
    "omniglot_split_indices",
    "omniglot_splits",
    "omniglot_tasks",
]
