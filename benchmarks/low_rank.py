"""Where the low-rank inner loop pays: dense against factored meta-steps, by rank and width.

For each network ``d-w-w-1`` (ReLU), support size K and inner step count s, times one
second-order MAML meta-step (meta-batch 25, 10 query rows, one torch thread) with every
wide layer dense (``MetaLearner(low_rank=False)``) and with every layer factored for all
steps (``low_rank=True``, never switching), and prints the speed-up next to the hidden
layer's final rank ``s * K`` as a fraction of ``w / 2`` (= ``in * out / (in + out)``
for a ``w x w`` layer).
:data:`metafit._low_rank.RANK_RATIO` is read from this table: the fraction up to which
the factored step is faster. The default policy (``low_rank=None``) is also timed: it
keeps a layer factored up to that limit and turns it dense after, or keeps it dense
throughout when the last step's rank would pass ``SWITCH_FACTOR`` times the limit.

Usage::

    python benchmarks/low_rank.py            # about two minutes
    python benchmarks/low_rank.py --quick    # a smoke run

Timings are CPU time of the running thread (``time.thread_time``), minimum over
interleaved repeats: robust to other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import platform

import torch
from _peers import interleaved_ms, regression_batch

from metafit._low_rank import RANK_RATIO
from metafit.learner import MetaLearner
from metafit.models import MLP

#: (input features, width, support rows K, inner steps)
CONFIGS = [
    (1, 40, 10, 1), (1, 40, 10, 5),
    (1, 64, 10, 1), (1, 64, 10, 3), (1, 64, 10, 5), (1, 64, 10, 7),
    (1, 128, 10, 10), (1, 128, 10, 15),
    (20, 128, 20, 1), (20, 128, 20, 2), (20, 128, 20, 3), (20, 128, 20, 5),
    (1, 256, 10, 1), (1, 256, 10, 5), (1, 256, 10, 10), (1, 256, 10, 20), (1, 256, 10, 30),
    (20, 256, 10, 1), (20, 256, 20, 5),
    (1, 512, 10, 5), (1, 512, 10, 20), (1, 512, 20, 20),
]


def learner_for(n_features: int, width: int, steps: int, low_rank) -> MetaLearner:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = MLP(n_features, 1, (width, width))
    learner = MetaLearner(net, loss="mse", algorithm="maml", inner_lr=0.01, inner_steps=steps,
                          low_rank=low_rank)
    learner.init_optimizer(1e-3, 1000)
    return learner


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    configs = CONFIGS[:3] if args.quick else CONFIGS
    repeats, seconds = (2, 0.05) if args.quick else (5, 0.2)
    print(f"# low-rank inner loop, second-order MAML, meta-batch 25, 1 thread; torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"# RANK_RATIO = {RANK_RATIO}: the default keeps a w x w layer factored while "
          f"rank <= {RANK_RATIO} * w / 2")
    print(f"{'network':>14} {'K':>3} {'steps':>5} {'rank/(w/2)':>10} {'dense ms':>9} "
          f"{'factored ms':>11} {'speed-up':>8} {'default ms':>10} {'default x':>9}")
    for d, w, k, s in configs:
        batch = regression_batch(d, k, 25)
        fns = {}
        for policy in (False, True, None):
            learner = learner_for(d, w, s, policy)
            fns[policy] = lambda learner=learner, batch=batch: learner.meta_step([batch])
        ms = {k: min(v) for k, v in interleaved_ms(fns, repeats, seconds).items()}
        print(f"{f'{d}-{w}-{w}-1':>14} {k:>3} {s:>5} {s * k / (w / 2):>10.2f} "
              f"{ms[False]:>9.3f} {ms[True]:>11.3f} {ms[False] / ms[True]:>7.2f}x "
              f"{ms[None]:>10.3f} {ms[False] / ms[None]:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
