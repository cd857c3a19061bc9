"""The up-front memory estimate of second-order meta-training against the real peak.

For each configuration a fresh process meta-fits 2 iterations (meta-batch 25, K=50
support and 50 query rows of sine waves) and prints the estimate of
``metafit._memory.inner_graph_bytes`` beside the growth of the process's peak resident
memory (``ru_maxrss``) over the run.

Usage::

    python benchmarks/memory_estimate.py
"""

from __future__ import annotations

import subprocess
import sys

CONFIGS = [("maml", (400, 400), 5), ("maml", (400, 400), 20), ("maml", (400, 400), 60),
           ("maml", (40, 40), 100), ("anil", (400, 400), 20)]

_CHILD = """
import resource, sys
from metafit import MetaInitializedRegressor, SinusoidTasks
from metafit._memory import inner_graph_bytes
from metafit.models import MLP
algo, steps, hidden = sys.argv[1], int(sys.argv[2]), tuple(int(h) for h in sys.argv[3:])
net = MLP(1, 1, hidden_sizes=hidden)
head = [n for n, _ in net.named_parameters()][-2:] if algo == "anil" else None
estimate = inner_graph_bytes(net, (1,), n_support=50, n_query=50, n_tasks=25, steps=steps,
                             adapted_names=head)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
MetaInitializedRegressor(algorithm=algo, meta_iterations=2, meta_batch_size=25,
                         meta_inner_steps=steps, hidden_sizes=hidden, random_state=0,
                         verbose=0).meta_fit(SinusoidTasks(k_shot=50, k_query=50,
                                                           random_state=0))
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(f"{estimate / 2**20:.0f} {grown:.0f}")
"""


def main() -> None:
    print(f"{'algorithm':<10}{'network':<12}{'steps':>6}{'estimate MiB':>14}{'peak MiB':>10}")
    for algo, hidden, steps in CONFIGS:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, algo, str(steps), *map(str, hidden)],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        net = "-".join(map(str, hidden))
        print(f"{algo:<10}{net:<12}{steps:>6}{out[0]:>14}{out[1]:>10}")


if __name__ == "__main__":
    main()
