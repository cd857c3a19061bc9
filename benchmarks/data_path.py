"""How much of meta_fit's time is the data path: the engine's meta-step alone against
meta_fit end to end (task sampling, validation, batching and the per-iteration state
snapshots included), in one run.

    python benchmarks/data_path.py

Second-order MAML, 1-40-40-1, 1 inner step, meta-batch 25, SinusoidTasks (K=10 + 10),
1,000 meta-iterations, one torch thread, 3 interleaved repeats of each (CPU time of the
thread, the best repeat of each: robust to other processes). The engine run steps through
batches sampled up front with ``SinusoidTasks.sample_batch``; ``meta_fit`` reads the
source's stacked meta-batches (``SinusoidTasks.meta_batches``: the same tasks as its
iteration) and checks each in bulk. ``--tasks`` feeds ``meta_fit`` a plain generator of
Task objects instead, the path of any other iterable. Prints both rates and their ratio
(the performance issue asks for 0.8).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from metafit import MetaInitializedRegressor, SinusoidTasks
from metafit.learner import MetaLearner
from metafit.models import MLP


def engine_seconds(iterations: int, batch: int) -> float:
    torch.manual_seed(0)
    learner = MetaLearner(MLP(1, 1, (40, 40)), loss="mse", algorithm="maml", inner_lr=0.01,
                          inner_steps=1)
    learner.init_optimizer(1e-3, iterations)
    rng = np.random.default_rng(0)
    source = SinusoidTasks(10, 10)
    batches = [source.sample_batch(batch, rng) for _ in range(iterations)]
    start = time.thread_time()
    for b in batches:
        learner.meta_step([b])
    return time.thread_time() - start


def meta_fit_seconds(iterations: int, batch: int, plain_tasks: bool) -> float:
    est = MetaInitializedRegressor(algorithm="maml", inner_lr=0.01, inner_steps=1,
                                   meta_iterations=iterations, meta_batch_size=batch,
                                   verbose=0, random_state=0, n_threads=1)
    source = SinusoidTasks(10, 10, random_state=0)
    tasks = (t for t in source) if plain_tasks else source
    start = time.thread_time()
    est.meta_fit(tasks)
    return time.thread_time() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", action="store_true", help="meta_fit on a generator of Tasks")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    batch = 25
    # warm up the lazy imports and kernels of both paths
    meta_fit_seconds(2, batch, args.tasks)
    engine_seconds(2, batch)
    engine, end_to_end = [], []
    for _ in range(args.repeats):
        engine.append(engine_seconds(args.iterations, batch))
        end_to_end.append(meta_fit_seconds(args.iterations, batch, args.tasks))
    tasks = args.iterations * batch
    rate_engine, rate_fit = tasks / min(engine), tasks / min(end_to_end)
    path = "a generator of Task objects" if args.tasks else "SinusoidTasks (stacked batches)"
    print(f"meta_fit on {path}: engine meta-step {rate_engine:,.0f} tasks/s; meta_fit end "
          f"to end {rate_fit:,.0f} tasks/s; ratio {rate_fit / rate_engine:.2f} (per repeat: "
          + ", ".join(f"{e / f:.2f}" for e, f in zip(engine, end_to_end)) + ")")


if __name__ == "__main__":
    main()
