"""Does LeanAdam still pay for itself? Its step and a whole meta-step against Adam(fused).

    python benchmarks/optimizer_step.py

Second-order MAML on the sinusoid network (1-40-40-1, 25 tasks, K=10, one inner step),
one torch thread; the two optimizers are timed interleaved in one run.
"""

from __future__ import annotations

import argparse
import timeit

import torch

from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.tasks import SinusoidTasks


def _learner(lean: bool, tasks):
    torch.manual_seed(0)
    learner = MetaLearner(
        MLP(1, 1, (40, 40)), loss="mse", algorithm="maml", inner_lr=0.01, inner_steps=1
    )
    learner.init_optimizer(1e-3, 100)
    if not lean:
        learner.optimizer = torch.optim.Adam(learner.meta_parameters(), lr=1e-3, fused=True)
    batches = learner.batches(tasks)
    learner.meta_step(batches)  # creates the optimizer state
    return learner, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--number", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = SinusoidTasks(k_shot=10, random_state=0).sample(25)
    meta, step = {True: [], False: []}, {True: [], False: []}
    for _ in range(args.repeats):
        for lean in (True, False):
            learner, batches = _learner(lean, tasks)
            t = timeit.repeat(
                lambda lr=learner, b=batches: lr.meta_step(b), number=args.number, repeat=3
            )
            meta[lean].append(min(t) / args.number * 1e3)
            for p in learner.meta_parameters():
                p.grad = torch.zeros_like(p)
            run = learner.optimizer.fast_step if lean else learner.optimizer.step
            t = timeit.repeat(run, number=args.number * 10, repeat=3)
            step[lean].append(min(t) / (args.number * 10) * 1e6)
    print("optimizer          step (us)   meta-step (ms)")
    for lean, name in ((True, "LeanAdam"), (False, "Adam(fused=True)")):
        print(f"{name:<18} {min(step[lean]):9.1f}   {min(meta[lean]):13.3f}")


if __name__ == "__main__":
    main()
