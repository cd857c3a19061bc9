"""Sinusoid regression benchmark: the protocol of Finn et al. (2017), section 5.1.

Meta-trains every algorithm on the sinusoid family (network 1-40-40-1 ReLU, K=10 support
and 10 query points, inner SGD lr 0.01 with 1 inner step, meta-batch 25 tasks, Adam 1e-3;
Reptile uses its own outer rule, SGD with a linearly annealed step size, and 5 inner steps
because one step of Reptile is joint training), then prints:

1. the mean query MSE on 500 held-out tasks (K=10 support, 100 query points each) after 0,
   1, 5 and 10 adaptation steps at lr 0.01, for every algorithm and two baselines: the
   random initialization, and one network pretrained jointly on all tasks (MSE over all
   points of a meta-batch, Adam 1e-3) for the same number of gradient steps;
2. meta-training throughput (tasks/s);
3. memory and speed of one meta-step with 1, 5, 20 and 50 inner steps (second-order
   MAML's graph grows with them; iMAML's, first order's and Reptile's do not);
4. the speed of a second-order MAML meta-step against a straightforward per-task Python
   loop (``functional_call`` + ``autograd.grad(create_graph=True)`` task by task), measured
   in the same run, for the built-in ``"mlp"`` path and the generic ``"vmap"`` path.

5. with ``--compare``: tasks/s of second-order MAML meta-steps on wider networks (up to
   1-256-256-1), metafit's default path against its previous, dense path
   (``MetaLearner(low_rank=False)``) and against learn2learn, higher (where installed),
   the torch.func ``vmap`` recipe and a plain loop, all on the same batches and initial
   weights, at one thread: 15 interleaved rounds, each speed-up the median of the rounds'
   paired ratios, and the rounds' range against learn2learn.

Usage::

    python benchmarks/sinusoid.py --iterations 3000 --out sinusoid_3000.txt
    python benchmarks/sinusoid.py --quick            # a smoke run of a few seconds
    python benchmarks/sinusoid.py --compare --skip training,memory,speed  # the peers only

Timings are CPU time of the running thread (``time.thread_time``) with one intra-op
thread, minimum over interleaved repeats: robust to other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import time
import weakref

import numpy as np
import torch
from _peers import PEERS, interleaved_ms, regression_batch
from torch.func import functional_call

from metafit.algorithms import MAML
from metafit.learner import MetaLearner
from metafit.models import MLP
from metafit.tasks import SinusoidTasks, TaskBatch

ALGORITHMS = ("maml", "fomaml", "reptile", "anil", "metasgd", "imaml")
EVAL_STEPS = (0, 1, 5, 10)
MEMORY_STEPS = (1, 5, 20, 50)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=3000, help="70000 in the paper")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated names")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 iterations, 100 tasks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--reptile-steps", type=int, default=5, help="Reptile's inner steps in training")
    p.add_argument("--reptile-lr", type=float, default=1.0, help="Reptile's initial outer step")
    p.add_argument("--eval-tasks", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--skip", default="",
                   help="comma-separated: training,baselines,memory,speed")
    p.add_argument("--compare", action="store_true",
                   help="wider networks against the dense path and other libraries")
    p.add_argument("--_rss", nargs=2, help=argparse.SUPPRESS)  # internal: ALGORITHM STEPS
    args = p.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 200)
        args.eval_tasks = min(args.eval_tasks, 100)
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = set(args.algorithms) - set(ALGORITHMS)
    if unknown:
        p.error(f"unknown algorithms {sorted(unknown)}; choose from {', '.join(ALGORITHMS)}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


# --------------------------------------------------------------------------- set-up


def make_net(seed: int) -> MLP:
    with torch.random.fork_rng(devices=[]):  # a script may seed; the library never does
        torch.manual_seed(seed)
        return MLP(1, 1, (40, 40))


def make_learner(algorithm: str, args, inner_steps: int | None = None, forward="mlp"):
    steps = args.reptile_steps if algorithm == "reptile" else 1
    learner = MetaLearner(
        make_net(args.seed),
        loss="mse",
        # "maml-checkpoint": MAML with gradient checkpointing of the inner steps
        algorithm=MAML(checkpoint=True) if algorithm == "maml-checkpoint" else algorithm,
        inner_lr=0.01,
        inner_steps=steps if inner_steps is None else inner_steps,
        forward=forward,
        device=args.device,
    )
    learner.init_optimizer(args.reptile_lr if algorithm == "reptile" else 1e-3, args.iterations)
    return learner


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- training


def meta_train(learner: MetaLearner, args) -> tuple[float, float]:
    """Meta-train; returns (engine tasks/s, end-to-end tasks/s including sampling)."""
    family = SinusoidTasks(10, 10)
    rng = np.random.default_rng(args.seed + 1)
    engine = 0.0
    start = time.perf_counter()
    for _ in range(args.iterations):
        batch = family.sample_batch(args.meta_batch, rng, device=args.device)
        t = time.perf_counter()
        learner.meta_step([batch])
        sync(args.device)
        engine += time.perf_counter() - t
    total = time.perf_counter() - start
    tasks = args.iterations * args.meta_batch
    return tasks / engine, tasks / total


def pretrain(args) -> MetaLearner:
    """One network trained on the pooled points of every meta-batch (no adaptation)."""
    learner = make_learner("maml", args)
    net = learner.module
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    family = SinusoidTasks(10, 10)
    rng = np.random.default_rng(args.seed + 1)
    for _ in range(args.iterations):
        b = family.sample_batch(args.meta_batch, rng, device=args.device)
        X = torch.cat([b.X_support, b.X_query], 1).reshape(-1, 1)
        y = torch.cat([b.y_support, b.y_query], 1).reshape(-1, 1)
        loss = torch.nn.functional.mse_loss(net(X), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return learner


def evaluate(learner: MetaLearner, batch: TaskBatch) -> dict[int, float]:
    """Mean query MSE after each number of adaptation steps in ``EVAL_STEPS``."""
    losses = {}

    def record(step, params):
        if step + 1 in EVAL_STEPS:
            with torch.no_grad():
                q = learner.loss_fn(learner.forward(params, batch.X_query), batch.y_query)
            losses[step + 1] = float(q.mean())

    with torch.no_grad():
        q = learner.loss_fn(learner.forward(learner.params(), batch.X_query), batch.y_query)
        losses[0] = float(q.mean())
    learner.adapt(
        batch.X_support, batch.y_support, steps=max(EVAL_STEPS), track_graph=False, on_step=record
    )
    return losses


# --------------------------------------------------------------------------- memory


def saved_graph_peak(fn) -> int:
    """Peak bytes of distinct tensors held by autograd for backward while ``fn`` runs."""
    live: dict[tuple, int] = {}
    state = {"now": 0, "peak": 0}

    class Box:
        def __init__(self, t):
            self.t = t

    def release(key, size):
        live[key] -= 1
        if live[key] == 0:
            del live[key]
            state["now"] -= size

    def pack(t):
        size = t.untyped_storage().nbytes()
        key = (t.untyped_storage().data_ptr(), size)
        if key not in live:
            live[key] = 0
            state["now"] += size
            state["peak"] = max(state["peak"], state["now"])
        live[key] += 1
        box = Box(t)
        weakref.finalize(box, release, key, size)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        fn()
    return state["peak"]


def memory_row(algorithm: str, args, batch: TaskBatch) -> list[str]:
    cells = []
    for steps in MEMORY_STEPS:
        learner = make_learner(algorithm, args, inner_steps=steps)
        learner.meta_step([batch])
        graph = saved_graph_peak(lambda learner=learner: learner.meta_step([batch]))
        rss = rss_in_subprocess(algorithm, steps, args)
        start = time.thread_time()
        for _ in range(3):
            learner.meta_step([batch])
        rate = 3 * batch.n_tasks / max(time.thread_time() - start, 1e-9)
        cells.append(f"{graph / 1e6:.2f} / {rss:.1f} / {rate:,.0f}")
    return cells


def rss_in_subprocess(algorithm: str, steps: int, args) -> float:
    """Peak RSS growth (MB) over the first 3 meta-steps of a fresh interpreter."""
    cmd = [sys.executable, __file__, "--_rss", algorithm, str(steps), "--device", args.device]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return math.nan


def _rss_child(args) -> None:
    torch.set_num_threads(args.threads)
    algorithm, steps = args._rss[0], int(args._rss[1])
    args.iterations = 100
    learner = make_learner(algorithm, args, inner_steps=steps)
    rng = np.random.default_rng(0)
    batches = [SinusoidTasks(10, 10).sample_batch(args.meta_batch, rng) for _ in range(3)]
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_kb("VmRSS")
    for b in batches[:3]:  # includes one-time costs (optimizer state, lazy init)
        learner.meta_step([b])
    print(max(0.0, _status_kb("VmHWM") - before) / 1024)


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return math.nan


# --------------------------------------------------------------------------- speed


def loop_baseline(net: MLP, batch: TaskBatch):
    """A straightforward second-order MAML meta-step: one task at a time."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    data = [
        (batch.X_support[t], batch.y_support[t], batch.X_query[t], batch.y_query[t])
        for t in range(batch.n_tasks)
    ]

    def step():
        theta = dict(net.named_parameters())
        total = 0.0
        for Xs, ys, Xq, yq in data:
            loss = ((functional_call(net, theta, (Xs,))[:, 0] - ys) ** 2).mean()
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
            phi = {k: v - 0.01 * g for (k, v), g in zip(theta.items(), grads)}
            query = ((functional_call(net, phi, (Xq,))[:, 0] - yq) ** 2).mean()
            total = total + query / len(data)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def speed_table(args, batch: TaskBatch) -> tuple[dict[str, float], dict[str, float]]:
    """CPU ms per second-order meta-step (min over interleaved repeats), and wall ms."""
    steps = {"loop": loop_baseline(make_net(args.seed).to(args.device), batch)}
    for forward in ("mlp", "vmap"):
        learner = make_learner("maml", args, forward=forward)
        steps[forward] = lambda learner=learner: learner.meta_step([batch])
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    wall: dict[str, list[float]] = {k: [] for k in steps}
    repeats = 3 if args.quick else 7
    for _ in range(repeats):
        for name, fn in steps.items():
            n = (5 if args.quick else 20) if name == "loop" else (30 if args.quick else 200)
            fn()
            sync(args.device)
            c, w = time.thread_time(), time.perf_counter()
            for _ in range(n):
                fn()
            sync(args.device)
            cpu[name].append((time.thread_time() - c) / n * 1e3)
            wall[name].append((time.perf_counter() - w) / n * 1e3)
    return {k: min(v) for k, v in cpu.items()}, {k: min(v) for k, v in wall.items()}


#: (name, input features, width, K, inner steps, first order, meta-batch)
COMPARE = [
    ("1-40-40-1, K=10, 1 step", 1, 40, 10, 1, False, 25),
    ("1-40-40-1, K=10, 5 steps", 1, 40, 10, 5, False, 25),
    ("1-40-40-1, K=10, 5 steps, FO", 1, 40, 10, 5, True, 25),
    ("20-128-128-1, K=20, 5 steps", 20, 128, 20, 5, False, 32),
    ("1-256-256-1, K=10, 5 steps", 1, 256, 10, 5, False, 25),
    ("20-256-256-1, K=10, 1 step", 20, 256, 10, 1, False, 25),
]


def compare_table(args, emit) -> None:
    """Tasks/s of metafit's meta-step on wider networks against its dense path and peers."""
    torch.set_num_threads(1)
    emit()
    emit("second-order MAML meta-steps (FO: first order), tasks/s at 1 thread, median of "
         f"{3 if args.quick else 15} interleaved rounds, same batches and initial weights;")
    emit("tasks/s: metafit's default path; 'x dense': its speed-up over its previous, dense "
         "path (MetaLearner(low_rank=False)); 'x NAME': over each contender (n/a: not "
         "installed), the median over the rounds of each round's ratio; 'l2l range': the "
         "rounds' lowest and highest ratio to learn2learn")
    names = list(PEERS)
    emit(f"{'network, task':<30}{'tasks/s':>9}{'x dense':>9}"
         + "".join(f"{'x ' + n:>15}" for n in names) + f"{'l2l range':>14}")
    configs = COMPARE[:2] if args.quick else COMPARE
    for label, d, width, k, steps, first_order, tasks in configs:
        batch = (SinusoidTasks(k, 10).sample_batch(tasks, np.random.default_rng(2))
                 if d == 1 else regression_batch(d, k, tasks))

        def net(d=d, width=width):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                return MLP(d, 1, (width, width))

        fns = {}
        for policy, key in ((None, "metafit"), (False, "dense")):
            learner = MetaLearner(net(), loss="mse", algorithm="fomaml" if first_order else "maml",
                                  inner_lr=0.01, inner_steps=steps, low_rank=policy)
            learner.init_optimizer(1e-3, 1000)
            fns[key] = lambda learner=learner, batch=batch: learner.meta_step([batch])
        for name in names:
            fn = PEERS[name](net(), batch, steps, first_order)
            if fn is not None:
                fns[name] = fn
        times = interleaved_ms(fns, 3 if args.quick else 15, 0.05 if args.quick else 0.12)
        own = np.array(times["metafit"])
        # Speed-ups as the median of each round's paired ratio: the rounds share the
        # machine's load, so pairing cancels most of it (single rounds still spread by
        # 20-40% on a busy VM; the learn2learn column's range is printed).
        ratio = {k: float(np.median(np.array(v) / own)) for k, v in times.items()}
        cells = "".join(
            f"{ratio[n]:>14.2f}x" if n in ratio else f"{'n/a':>15}" for n in names
        )
        spread = "n/a"
        if "learn2learn" in times:
            paired = np.array(times["learn2learn"]) / own
            spread = f"{paired.min():.1f}-{paired.max():.1f}x"
        emit(f"{label:<30}{tasks / (np.median(own) / 1e3):>9.0f}{ratio['dense']:>8.2f}x"
             + cells + f"{spread:>14}")


# --------------------------------------------------------------------------- report


def _num(x: float) -> str:
    return f"{x:10.3f}" if abs(x) < 1e5 else f"{x:10.2g}"


def training_table(args, emit) -> None:
    """Meta-train every algorithm; print held-out losses after 0-10 steps and speed."""
    held_out = SinusoidTasks(10, 100).sample_batch(
        args.eval_tasks, np.random.default_rng(10_000 + args.seed), device=args.device
    )
    emit()
    header = "method        " + "".join(f"{f'{s} steps':>10}" for s in EVAL_STEPS)
    header += f"{'tasks/s':>10}{'(w/ data)':>11}{'train s':>9}"
    emit(header)
    emit("-" * len(header))

    def row(name, losses, extra=""):
        emit(f"{name:<14}" + "".join(_num(losses[s]) for s in EVAL_STEPS) + extra)

    if "baselines" not in args.skip:
        row("random init", evaluate(make_learner("maml", args), held_out))
        t = time.perf_counter()
        pre = pretrain(args)
        row("pretrained", evaluate(pre, held_out), f"{'':31}{time.perf_counter() - t:8.0f}")
    for algorithm in args.algorithms:
        learner = make_learner(algorithm, args)
        t = time.perf_counter()
        engine, end_to_end = meta_train(learner, args)
        took = time.perf_counter() - t
        row(algorithm, evaluate(learner, held_out), f"{engine:10.0f}{end_to_end:11.0f}{took:9.0f}")
    emit()
    emit(
        "Adaptation uses SGD at lr 0.01 on all parameters, except anil (head only) and "
        "metasgd (its learned per-parameter rates)."
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._rss:
        _rss_child(args)
        return
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    emit(
        f"metafit sinusoid benchmark: {args.iterations} meta-iterations, meta-batch "
        f"{args.meta_batch}, K=10 (+10 query), inner lr 0.01, 1 inner step "
        f"(reptile {args.reptile_steps}), Adam 1e-3 (reptile SGD {args.reptile_lr} annealed "
        f"linearly to 0), {args.eval_tasks} held-out tasks x 100 query points"
    )
    emit(
        f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}, seed {args.seed}"
    )
    if "training" not in args.skip:
        training_table(args, emit)

    if "memory" not in args.skip:
        batch = SinusoidTasks(10, 10).sample_batch(args.meta_batch, np.random.default_rng(1))
        emit()
        emit("one meta-step: autograd graph peak MB / peak RSS growth MB (subprocess) / "
             "tasks/s")
        emit("method        " + "".join(f"{f'{s} inner steps':>24}" for s in MEMORY_STEPS))
        extra = ["maml-checkpoint"] if "maml" in args.algorithms else []
        for algorithm in [*args.algorithms, *extra]:
            cells = memory_row(algorithm, args, batch)
            emit(f"{algorithm:<14}" + "".join(f"{c:>24}" for c in cells))
        emit(
            "graph = distinct tensors autograd keeps for the backward pass (saved-tensor hooks); "
            "RSS = peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the "
            "first 3 meta-steps of a fresh process (includes one-time costs; Linux only)."
        )

    if "speed" not in args.skip:
        batch = SinusoidTasks(10, 10).sample_batch(
            args.meta_batch, np.random.default_rng(2), device=args.device
        )
        cpu, wall = speed_table(args, batch)
        emit()
        emit("second-order MAML meta-step (1 inner step, 25 tasks), same run:")
        emit(f"{'path':<34}{'CPU ms':>9}{'wall ms':>9}{'speed-up':>10}")
        labels = {
            "loop": "per-task Python loop (baseline)",
            "mlp": "metafit forward='mlp' (built-in)",
            "vmap": "metafit forward='vmap' (generic)",
        }
        for k, label in labels.items():
            emit(f"{label:<34}{cpu[k]:9.3f}{wall[k]:9.3f}{cpu['loop'] / cpu[k]:9.1f}x")

    if args.compare:
        compare_table(args, emit)

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
