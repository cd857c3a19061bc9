"""A short Conv4 meta-training run on the real Omniglot data beats chance clearly.

Uses the shared data folder (``$METAFIT_DATA`` or ``../shared/data``); skipped without it.
Small on purpose (14x14 images, 16 filters, 60 first-order iterations: about 6 s of CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
from _shared_data import SHARED_DATA

from metafit import MetaInitializedClassifier
from metafit.models import Conv4

DATA = SHARED_DATA
pytestmark = pytest.mark.skipif(
    not (DATA / "omniglot" / "images_background.npz").exists(),
    reason=f"Omniglot data absent from {DATA}",
)


def _accuracy(est, tasks) -> float:
    return float(
        np.mean([est.fit(t.X_support, t.y_support).score(t.X_query, t.y_query) for t in tasks])
    )


def test_conv4_meta_fit_on_omniglot_beats_chance():
    from metafit.datasets import omniglot_tasks

    common = dict(n_way=5, k_shot=1, k_query=5, image_size=14, path=DATA / "omniglot")
    train = omniglot_tasks("train", random_state=0, **common)
    test = omniglot_tasks("test", random_state=1, **common).sample(40)
    assert test[0].X_support.shape == (5, 1, 14, 14)

    def estimator(iterations):
        return MetaInitializedClassifier(
            module=Conv4,
            module__input_shape=(1, 14, 14),
            module__hidden_channels=16,
            algorithm="fomaml",
            inner_lr=0.4,
            inner_steps=1,
            meta_batch_size=8,
            meta_iterations=iterations,
            meta_lr=0.01,
            random_state=0,
        )

    trained = estimator(60).meta_fit(train)
    losses = [r["meta_loss"] for r in trained.meta_history_]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2
    untrained = estimator(1).meta_fit(train)
    acc, base = _accuracy(trained, test), _accuracy(untrained, test)
    assert acc > 0.4, acc  # chance is 0.2
    assert acc > base + 0.1, (acc, base)
