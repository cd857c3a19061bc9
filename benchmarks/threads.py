"""Which torch thread count trains fastest: meta_fit tasks/s at 1, 2, ... threads.

    python benchmarks/threads.py [--busy 1]

For the built-in MLP (sinusoid, 1-40-40-1), a wider MLP (20-128-128-1 on tabular-like
tasks), a generic module (the same MLP as a plain nn.Sequential, forward="vmap") and
Conv4 (5-way 1-shot on 28x28 images; random pixels, the speed does not depend on them).
``--busy N`` runs N busy loops of its own meanwhile, as a loaded machine would have, and
stops them at the end. The estimator's default (n_threads=None) is marked with a *.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import numpy as np
from torch import nn

from metafit import MetaInitializedClassifier, MetaInitializedRegressor
from metafit._threads import threads_for
from metafit.models import Conv4
from metafit.tasks import SinusoidTasks, Task


def _spin(stop):  # pragma: no cover - a busy loop in another process
    while not stop.is_set():
        pass


def _table_tasks(n, rng, n_features=20):
    out = []
    for _ in range(n):
        w = rng.normal(size=n_features)
        Xs, Xq = rng.normal(size=(20, n_features)), rng.normal(size=(20, n_features))
        out.append(Task(Xs, Xs @ w, Xq, Xq @ w))
    return out


def _image_tasks(n, rng):
    y = np.repeat(np.arange(5), 1)
    yq = np.repeat(np.arange(5), 5)
    return [
        Task(rng.normal(size=(5, 1, 28, 28)), y, rng.normal(size=(25, 1, 28, 28)), yq)
        for _ in range(n)
    ]


def _cases(rng):
    sine = SinusoidTasks(k_shot=10, random_state=0)
    table = _table_tasks(64, rng)
    generic = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                            nn.Linear(40, 1))
    return [
        ("MLP 1-40-40-1 (sinusoid)", lambda n: MetaInitializedRegressor(
            meta_iterations=n, meta_batch_size=25, random_state=0, verbose=0), sine, 40),
        ("MLP 20-128-128-1 (table)", lambda n: MetaInitializedRegressor(
            hidden_sizes=(128, 128), meta_iterations=n, meta_batch_size=16,
            random_state=0, verbose=0), table * 50, 20),
        ("generic nn.Sequential (vmap)", lambda n: MetaInitializedRegressor(
            module=generic, forward="vmap", meta_iterations=n, meta_batch_size=25,
            random_state=0, verbose=0), sine, 20),
        ("Conv4 5-way 1-shot 28x28", lambda n: MetaInitializedClassifier(
            module=Conv4, module__n_outputs=5, module__input_shape=(1, 28, 28),
            inner_lr=0.4, inner_steps=1, meta_iterations=n, meta_batch_size=4,
            random_state=0, verbose=0), _image_tasks(40, rng), 4),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=0, help="busy loops to run meanwhile")
    parser.add_argument("--threads", default=None, help="comma-separated counts to try")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = [int(t) for t in args.threads.split(",")] if args.threads else \
        sorted({1, 2, cores})
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    rng = np.random.default_rng(0)
    print(f"{cores} cores, {args.busy} busy loop(s); meta_fit tasks/s (best of 3)")
    print(f"{'network':<30}" + "".join(f"{f'{t} thr':>12}" for t in counts))
    try:
        for name, make, tasks, iterations in _cases(rng):
            row, default = [], None
            for t in counts:
                best = 0.0
                for _ in range(3):
                    est = make(iterations).set_params(n_threads=t)
                    start = time.perf_counter()
                    est.meta_fit(tasks)
                    took = time.perf_counter() - start
                    best = max(best, iterations * est.meta_batch_size / took)
                row.append(best)
            default = threads_for(est._factory().from_init(est.meta_init_).module, None)
            cells = "".join(
                f"{f'{v:,.0f}' + ('*' if t == default else ' '):>12}" for t, v in zip(counts, row)
            )
            print(f"{name:<30}{cells}")
    finally:
        stop.set()
        for p in spinners:
            p.join()


if __name__ == "__main__":
    main()
