"""Time fit()+predict of one few-shot task: metafit vs MLPRegressor vs skorch.

One 10-point sinusoid task, 5 gradient steps, the 1-40-40-1 network (``--width`` for
another hidden width), the same run for all three. This is the unit of work that
``GridSearchCV`` and tuning repeat thousands of times.

    python3 benchmarks/bench_fit.py [--repeats 7] [--number 200] [--threads 1] [--width 40]

torch runs single-threaded by default (``--threads``): on a small shared machine torch's
intra-op thread pool stalls for milliseconds whenever another process holds a core, and
for tensors this small a second thread never helps. Each configuration is timed
``--repeats`` times over ``--number`` calls; the table shows the median per call and the
spread (min-max of the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def _task():
    from metafit.tasks import SinusoidTasks

    task = SinusoidTasks(k_shot=10, k_query=10, random_state=0).sample(1)[0]
    return task.X_support, task.y_support, task.X_query


def _candidates(X, y, Xq, width: int = 40):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor
    from skorch import NeuralNetRegressor

    from metafit import MetaInitializedRegressor, SinusoidTasks

    warnings.filterwarnings("ignore", category=ConvergenceWarning)

    meta = MetaInitializedRegressor(
        hidden_sizes=(width, width), inner_lr=0.01, inner_steps=5, meta_iterations=2,
        random_state=0,
    ).meta_fit(SinusoidTasks(random_state=0))
    scratch = MetaInitializedRegressor(hidden_sizes=(width, width), inner_steps=5,
                                       random_state=0)
    mlp = MLPRegressor(
        hidden_layer_sizes=(width, width),
        solver="sgd",
        learning_rate_init=0.01,
        max_iter=5,
        tol=0.0,
        n_iter_no_change=10**6,
        batch_size=10,
        random_state=0,
    )

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = torch.nn.Sequential(
                torch.nn.Linear(1, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, width),
                torch.nn.ReLU(),
                torch.nn.Linear(width, 1),
            )

        def forward(self, X):
            return self.seq(X)

    skorch_net = NeuralNetRegressor(
        Net, max_epochs=5, lr=0.01, batch_size=-1, train_split=None, verbose=0
    )
    y2 = y.reshape(-1, 1)

    def plain_torch():
        torch.manual_seed(0)
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y2)
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(Xt), yt)
            loss.backward()
            opt.step()
        with torch.no_grad():
            return net(torch.from_numpy(Xq)).numpy()

    return {
        "metafit (meta-fitted)": lambda: meta.fit(X, y).predict(Xq),
        "metafit (no meta-init)": lambda: scratch.fit(X, y).predict(Xq),
        "plain torch loop": plain_torch,
        "sklearn MLPRegressor": lambda: mlp.fit(X, y).predict(Xq),
        "skorch NeuralNetRegressor": lambda: skorch_net.fit(X, y2).predict(Xq),
    }


def _time(fn, number: int, repeats: int) -> list[float]:
    for _ in range(max(3, number // 10)):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - start) / number)
    return out


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--number", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--width", type=int, default=40, help="hidden width of both layers")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    X, y, Xq = _task()
    cands = _candidates(X, y, Xq, args.width)
    medians, spreads = {}, {}
    # Interleave the repeats so that a burst of load from elsewhere hits all candidates.
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(args.repeats):
        for name, fn in cands.items():
            number = args.number if "skorch" not in name else max(20, args.number // 4)
            times[name] += _time(fn, number, 1)
    for name, ts in times.items():
        medians[name] = statistics.median(ts)
        spreads[name] = (min(ts), max(ts))

    mlp = medians["sklearn MLPRegressor"]
    sk = medians["skorch NeuralNetRegressor"]
    print(
        f"fit()+predict, one 10-point sinusoid task, 5 steps, 1-{args.width}-{args.width}-1 "
        "net; "
        f"torch threads={torch.get_num_threads()}, torch {torch.__version__}, "
        f"{args.repeats} repeats"
    )
    print(
        f"{'':28s} {'median ms':>10s} {'min-max ms':>15s} {'vs MLPRegressor':>16s} "
        f"{'vs skorch':>10s}"
    )
    for name, med in medians.items():
        lo, hi = spreads[name]
        print(
            f"{name:28s} {med * 1e3:10.3f} {lo * 1e3:7.3f}-{hi * 1e3:<7.3f} "
            f"{med / mlp:15.2f}x {sk / med:9.1f}x"
        )
    print("(vs MLPRegressor: time ratio, lower is faster; vs skorch: speed-up over skorch)")
    return medians


if __name__ == "__main__":
    main()
