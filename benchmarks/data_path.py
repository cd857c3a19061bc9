"""How much of meta_fit's time is the data path: the engine's meta-step alone against
meta_fit end to end (task sampling, validation, batching included), in one run.

    python benchmarks/data_path.py

Second-order MAML, 1-40-40-1, 1 inner step, meta-batch 25, SinusoidTasks (K=10 + 10),
400 meta-iterations, one torch thread. The engine run samples its batches up front with
``SinusoidTasks.sample_batch``; ``meta_fit`` draws Task objects one by one, checks them
and stacks them. Prints both rates and their ratio (the performance issue asks for 0.8).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from metafit import MetaInitializedRegressor, SinusoidTasks
from metafit.learner import MetaLearner
from metafit.models import MLP


def main(iterations: int = 400, batch: int = 25) -> None:
    torch.set_num_threads(1)
    # warm up the lazy imports and kernels of both paths
    MetaInitializedRegressor(algorithm="maml", meta_iterations=2, verbose=0, random_state=0,
                             n_threads=1).meta_fit(SinusoidTasks(10, 10, random_state=0))
    torch.manual_seed(0)
    learner = MetaLearner(MLP(1, 1, (40, 40)), loss="mse", algorithm="maml", inner_lr=0.01,
                          inner_steps=1)
    learner.init_optimizer(1e-3, iterations)
    rng = np.random.default_rng(0)
    source = SinusoidTasks(10, 10)
    batches = [source.sample_batch(batch, rng) for _ in range(iterations)]
    start = time.perf_counter()
    for b in batches:
        learner.meta_step([b])
    engine = iterations * batch / (time.perf_counter() - start)
    est = MetaInitializedRegressor(algorithm="maml", inner_lr=0.01, inner_steps=1,
                                   meta_iterations=iterations, meta_batch_size=batch,
                                   verbose=0, random_state=0, n_threads=1)
    start = time.perf_counter()
    est.meta_fit(SinusoidTasks(10, 10, random_state=0))
    end_to_end = iterations * batch / (time.perf_counter() - start)
    print(f"engine meta-step {engine:,.0f} tasks/s; meta_fit end to end {end_to_end:,.0f} "
          f"tasks/s; ratio {end_to_end / engine:.2f}")


if __name__ == "__main__":
    main()
