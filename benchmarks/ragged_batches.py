"""Ragged meta-batches: padded with row masks (today's path) against one batch per shape.

    python benchmarks/ragged_batches.py                 # mathach and nlschools
    python benchmarks/ragged_batches.py --tables radon --iterations 50

Real groups have different sizes. ``tasks_from_groups`` turns each group of a table in
``$METAFIT_DATA/grouped`` (default ``../shared/data/grouped``) into one task with 5
support rows and the rest as query: on MathAchieve, 160 schools with 14 to 67 students,
so nearly every task of a meta-batch has its own query size. The engine pads such a
meta-batch into one batch and masks the padding; before, it split the batch into one
batch per distinct shape. Both paths compute the same meta-gradients
(``tests/test_algorithms.py``); this times them on the same meta-batches and initial
weights, interleaved, one torch thread, and prints the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from grouped_tables import data_dir, load  # the same tables, read the same way

from metafit.algorithms import ALPACA
from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.tasks import tasks_from_groups


def table_tasks(folder: Path, name: str, k: int):
    X, y, groups, _ = load(folder, name)
    X = (X - X.mean(0)) / (X.std(0) + 1e-12)
    y = (y - y.mean()) / y.std()
    return tasks_from_groups(X, y, groups, support_size=k, min_query=1, random_state=0)


def time_path(tasks, algorithm: str, pad: bool, iterations: int, batch: int) -> float:
    torch.manual_seed(0)
    algorithm = ALPACA() if algorithm == "alpaca" else algorithm
    n_out = algorithm.n_features if isinstance(algorithm, ALPACA) else 1
    net = MLP(tasks[0].X_support.shape[1], n_out, (64, 64))
    learner = MetaLearner(net, loss="mse", algorithm=algorithm, inner_lr=0.03,
                          inner_steps=5)
    learner.pad_ragged = pad
    learner.init_optimizer(None, iterations)
    rng = np.random.default_rng(0)
    order = [rng.choice(len(tasks), batch, replace=False) for _ in range(iterations)]
    start = time.perf_counter()
    for index in order:
        learner.meta_step(learner.batches([tasks[i] for i in index]))
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder of the CSV files (default: see above)")
    parser.add_argument("--tables", nargs="+", default=["mathach", "nlschools"])
    parser.add_argument("--algorithms", nargs="+", default=["maml", "alpaca"])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = data_dir(args.data)
    if not folder.is_dir():
        raise SystemExit(f"no data folder {folder}: pass --data or set METAFIT_DATA")
    print(f"{args.iterations} meta-iterations of {args.batch} tasks, k={args.k}, "
          f"MLP 64-64, 5 inner steps, 1 thread; median of {args.repeats}\n")
    print("| table | algorithm | query sizes | shapes per meta-batch | padded / real rows "
          "| one batch per shape | padded | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.tables:
        tasks = table_tasks(folder, name, args.k)
        sizes = [t.n_query for t in tasks]
        rng = np.random.default_rng(0)
        shapes, cells = [], []
        for _ in range(50):
            chosen = [tasks[i] for i in rng.choice(len(tasks), args.batch, replace=False)]
            shapes.append(len({t.n_query for t in chosen}))
            cells.append(max(t.n_query for t in chosen) * len(chosen)
                         / sum(t.n_query for t in chosen))
        for algorithm in args.algorithms:
            runs = {True: [], False: []}
            for _ in range(args.repeats):
                for pad in (False, True):
                    runs[pad].append(time_path(tasks, algorithm, pad, args.iterations,
                                               args.batch))
            grouped, padded = np.median(runs[False]), np.median(runs[True])
            print(f"| {name} | {algorithm} | {min(sizes)}-{max(sizes)} | "
                  f"{np.mean(shapes):.1f} | {np.mean(cells):.2f} | {grouped:.2f} s | "
                  f"{padded:.2f} s | {grouped / padded:.1f}x |")


if __name__ == "__main__":
    main()
