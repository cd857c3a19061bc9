"""scikit-learn integration: Pipeline, GridSearchCV and cross-validation on a new task.

The meta-learned initialization travels with ``clone``, so every candidate of a grid
search and every cross-validation fold adapts from it. Preprocessing is fitted once on the
meta-training data and frozen (``FrozenEstimator``): refitting a scaler on a 20-point task
would move the inputs away from what the initialization was learned on.

Run::

    python examples/grid_search_pipeline.py          # about 20 s on 2 CPU cores
    python examples/grid_search_pipeline.py --quick  # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from metafit import MetaInitializedRegressor, SinusoidTasks, Task


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for CI")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("METAFIT_EXAMPLE_QUICK") == "1"

    # 1. Meta-training tasks, scaled by a scaler fitted once on all their inputs.
    raw = SinusoidTasks(k_shot=10, random_state=0).sample(200 if quick else 2000)
    scaler = StandardScaler().fit(np.concatenate([t.X_support for t in raw]))

    def scaled(t):
        return Task(
            scaler.transform(t.X_support), t.y_support, scaler.transform(t.X_query), t.y_query
        )

    est = MetaInitializedRegressor(
        meta_iterations=20 if quick else 1500,
        meta_batch_size=10,
        meta_inner_steps=1,
        inner_steps=5,
        random_state=0,
    )
    est.meta_fit([scaled(t) for t in raw] * (1 if quick else 8))

    # 2. One new task: 20 labelled points, 100 to predict.
    task = SinusoidTasks(k_shot=20, k_query=100, random_state=7).sample(1)[0]
    X, y = task.X_support, task.y_support

    # 3. A pipeline with the frozen scaler; searching inner_lr and inner_steps by 5-fold CV
    #    on the 20 points. Each candidate is a clone, and each clone keeps meta_init_.
    pipe = make_pipeline(FrozenEstimator(scaler), est)
    grid = {
        "metainitializedregressor__inner_lr": [0.003, 0.01, 0.03],
        "metainitializedregressor__inner_steps": [1, 5, 20],
    }
    search = GridSearchCV(
        pipe, grid, cv=KFold(5, shuffle=True, random_state=0), scoring="neg_mean_squared_error"
    )
    search.fit(X, y)
    best = {k.split("__")[1]: v for k, v in search.best_params_.items()}
    print(f"best adaptation parameters by 5-fold CV on 20 points: {best}")

    cv = cross_val_score(search.best_estimator_, X, y, cv=5, scoring="neg_mean_squared_error")
    print(f"cross-validated MSE of the best pipeline: {-cv.mean():.3f} (+- {cv.std():.3f})")

    test_mse = float(np.mean((search.predict(task.X_query) - task.y_query) ** 2))
    default = make_pipeline(FrozenEstimator(scaler), est).fit(X, y)
    default_mse = float(np.mean((default.predict(task.X_query) - task.y_query) ** 2))
    print(
        f"MSE on the task's 100 held-out points: tuned {test_mse:.3f}, "
        f"default parameters {default_mse:.3f}"
    )
    return {"best_params": best, "test_mse": test_mse, "default_mse": default_mse}


if __name__ == "__main__":
    main()
