"""Shared test configuration and fixtures.

The engine works on many tiny tensors, where torch's intra-op thread pool costs more than
it saves (and stalls badly when another process holds the second core), so the suite runs
torch single-threaded. The library itself never changes the thread setting.

The fixtures give tests that need *some* meta-fitted estimator a tiny one (a 16x16 MLP,
5 meta-iterations); module-scoped ones are built once per test module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metafit import (
    MetaInitializedClassifier,
    MetaInitializedRegressor,
    NWayKShotTasks,
    SinusoidTasks,
)

torch.set_num_threads(1)


def _tiny_params() -> dict:
    return dict(
        hidden_sizes=(16, 16),
        meta_iterations=5,
        meta_batch_size=4,
        inner_lr=0.02,
        inner_steps=3,
        random_state=0,
    )


@pytest.fixture
def tiny_params() -> dict:
    """Constructor parameters of the tiny estimators below (a fresh dict per test)."""
    return _tiny_params()


@pytest.fixture(scope="module")
def sine_reg() -> MetaInitializedRegressor:
    """A tiny regressor meta-fitted on sinusoid tasks."""
    return MetaInitializedRegressor(**_tiny_params()).meta_fit(SinusoidTasks(random_state=0))


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Six Gaussian classes in 3-D, 10 points each: X float32 (60, 3), y int (60,)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 10)
    X = (rng.normal(size=(6, 3))[y] * 3 + rng.normal(size=(60, 3))).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def blob_clf(blobs) -> MetaInitializedClassifier:
    """A tiny classifier meta-fitted on 3-way 2-shot tasks over :func:`blobs`."""
    X, y = blobs
    tasks = NWayKShotTasks(X, y, n_way=3, k_shot=2, k_query=2, random_state=0)
    return MetaInitializedClassifier(**_tiny_params()).meta_fit(tasks)


@pytest.fixture
def break_safetensors_save(monkeypatch):
    """Call it to make every later safetensors save write half a file, then fail.

    The failure is ``OSError("disk full")``, raised after the partial write, as a full
    disk would: tests check that no half-written file is left behind.
    """
    import safetensors.torch

    def half_written_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    def arm() -> None:
        monkeypatch.setattr(safetensors.torch, "save_file", half_written_save)

    return arm
