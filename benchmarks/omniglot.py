"""Omniglot few-shot benchmark: MAML, first-order MAML, Reptile and MAML++ with Conv4.

Meta-trains on Omniglot (Vinyals/MAML protocol: 1,100 training characters, 423 test
characters, 90-degree rotations as extra classes; or Lake's background/evaluation sets with
``--protocol lake``) and reports, for every N-way K-shot configuration and algorithm, the
query accuracy with a 95% interval over ``--episodes`` test episodes (600 by default) next to
the meta-training throughput (tasks/s). Settings follow the papers:

- MAML and first-order MAML (Finn et al. 2017): 5-way: inner lr 0.4, 1 step in training,
  3 at test, meta-batch 32; 20-way: inner lr 0.1, 5 steps, meta-batch 16; Adam 1e-3;
- Reptile (Nichol et al. 2018): 5 inner steps in training, 50 at test, meta-batch 5, outer
  step 1.0 annealed linearly to 0 (inner plain SGD at lr 0.1 where the paper uses Adam);
- MAML++ (Antoniou et al. 2019): 5 inner steps (training and test), inner lr 0.1 learned
  per layer and step, multi-step loss, per-step BatchNorm, meta-batch 16 (8 for 20-way),
  Adam 1e-3 cosine-annealed.

BatchNorm uses batch statistics of each task's support set during adaptation and of its
query set at prediction, as the reference MAML does. ``--minutes`` caps the training wall
clock of each run (evaluations are not counted); ``--eval-at`` adds evaluations at given
iterations. ``--compare`` times metafit's meta-step against a per-task loop in the same
run: learn2learn's ``MAML`` if ``import learn2learn`` works, else the same algorithm written
the way learn2learn runs it (copy the parameters per task, ``autograd.grad(create_graph=True)``
per task, backward per task), labelled "per-task loop (learn2learn-style)".

Usage::

    python benchmarks/omniglot.py --configs 5w1s --algorithms maml --minutes 10
    python benchmarks/omniglot.py --device cuda --configs 5w1s,5w5s,20w1s,20w5s \\
        --algorithms maml,fomaml,reptile,mamlpp --iterations 60000
    python benchmarks/omniglot.py --quick          # smoke run, a minute on a CPU
    python benchmarks/omniglot.py --memory         # graph memory and tasks/s vs steps
    python benchmarks/omniglot.py --device cuda --graph-compare   # eager/compile/CUDA graph
    python benchmarks/omniglot.py --device cuda --graph cuda --minutes 8 \
        --eval-minutes 1,2,4                        # accuracy against time, graphed step

``--memory`` prints, for second-order MAML, MAML with checkpointed inner steps, MAML with
``meta_batch_chunk=4``, first-order MAML and iMAML, the peak bytes autograd holds for the
backward pass of one meta-step (saved-tensor hooks) and the tasks/s of that step, at each
of ``--memory-steps`` inner steps.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _graphs import STEPS
from torch import nn
from torch.func import functional_call

from metafit.algorithms import MAMLPlusPlus
from metafit.datasets import load_omniglot_split
from metafit.learner import MetaLearner
from metafit.models import Conv4
from metafit.tasks import TaskBatch

#: The data folder beside this repository (the project's layout, not a user's).
REPO_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

PUBLISHED = {  # accuracy in % for 5w1s, 5w5s, 20w1s, 20w5s
    "maml": (98.7, 99.9, 95.8, 98.9),
    "fomaml": (98.3, 99.2, 89.4, 97.9),
    "reptile": (95.39, 98.90, 88.14, 96.65),
    "mamlpp": (99.47, 99.85, 97.65, 99.33),
}
CONFIGS = ("5w1s", "5w5s", "20w1s", "20w5s")


@dataclass
class Setting:
    inner_lr: float
    train_steps: int
    test_steps: int
    meta_batch: int
    meta_lr: float | None


def paper_setting(algorithm: str, n_way: int) -> Setting:
    """The published hyper-parameters of ``algorithm`` for ``n_way``-way Omniglot."""
    if algorithm in ("maml", "fomaml"):
        if n_way <= 5:
            return Setting(0.4, 1, 3, 32, 1e-3)
        return Setting(0.1, 5, 5, 16, 1e-3)
    if algorithm == "reptile":
        return Setting(0.1, 5, 50, 5, 1.0)
    if algorithm == "mamlpp":
        return Setting(0.1, 5, 5, 16 if n_way <= 5 else 8, 1e-3)
    raise ValueError(f"unknown algorithm {algorithm!r}; use maml, fomaml, reptile or mamlpp.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="5w1s", help=f"comma-separated, from {CONFIGS}")
    p.add_argument("--algorithms", default="maml", help="maml,fomaml,reptile,mamlpp")
    p.add_argument("--iterations", type=int, default=60000, help="cap (and schedule length)")
    p.add_argument("--minutes", type=float, default=None, help="training wall-clock cap per run")
    p.add_argument("--eval-at", default="", help="extra evaluations, e.g. 300,1000")
    p.add_argument("--eval-minutes", default="", help="extra evaluations at training minutes")
    p.add_argument("--episodes", type=int, default=600, help="test episodes per evaluation")
    p.add_argument("--k-query", type=int, default=15, help="query images per class")
    p.add_argument("--protocol", default="vinyals", choices=("vinyals", "lake"))
    p.add_argument("--meta-batch", type=int, default=None, help="override the paper's")
    p.add_argument("--inner-lr", type=float, default=None, help="override the paper's")
    p.add_argument("--meta-lr", type=float, default=None, help="override the paper's")
    p.add_argument("--train-steps", type=int, default=None, help="override the paper's")
    p.add_argument("--test-steps", type=int, default=None, help="override the paper's")
    p.add_argument("--hidden", type=int, default=64, help="Conv4 filters")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument(
        "--kernel",
        default="auto",
        help="Conv4 kernel: auto, loop, grouped, hybrid; a list for --compare",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--compare", action="store_true", help="time against a per-task loop")
    p.add_argument("--compare-steps", type=int, default=6, help="interleaved timed steps")
    p.add_argument("--compare-only", action="store_true", help="timings only, no training")
    p.add_argument(
        "--data", default=os.environ.get("METAFIT_DATA", str(REPO_DATA)),
        help="folder with the Omniglot files (default: $METAFIT_DATA, else this "
        "repository's ../shared/data)",
    )
    p.add_argument("--memory", action="store_true",
                   help="only the memory and speed of one 5-way 1-shot meta-step versus inner "
                        "steps, on random images (no data needed)")
    p.add_argument("--memory-steps", default="1,5,20", help="inner steps of --memory")
    p.add_argument("--memory-batch", type=int, default=32, help="meta-batch of --memory")
    p.add_argument("--graph", default="none", choices=sorted(STEPS),
                   help="train with the meta-step captured whole: torch.compile "
                        "(reduce-overhead) or one CUDA graph (CUDA only)")
    p.add_argument("--graph-compare", action="store_true",
                   help="only time one meta-step eager, compiled and (CUDA) graphed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also append the report to this file")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budget and net")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.episodes, args.hidden = 5, 20, 8
        args.meta_batch = args.meta_batch or 4
        args.compare_steps = 2
    return args


# ----------------------------------------------------------------------------- episodes


class Episodes:
    """Vectorized N-way K-shot episodes straight from the class-by-drawer image array."""

    def __init__(self, images: np.ndarray, n_way: int, k_shot: int, k_query: int, device):
        self.images = torch.as_tensor(np.ascontiguousarray(images), device=device)
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.device = device

    def sample(self, n_tasks: int, rng: np.random.Generator) -> TaskBatch:
        """``n_tasks`` episodes as one TaskBatch (support and query labels 0..n_way-1)."""
        n_classes, n_drawers, h, w = self.images.shape
        k, q = self.k_shot, self.k_query
        classes = np.argsort(rng.random((n_tasks, n_classes)), axis=1)[:, : self.n_way]
        drawers = np.argsort(rng.random((n_tasks, self.n_way, n_drawers)), axis=2)[..., : k + q]
        ci = torch.as_tensor(classes[:, :, None], device=self.device)
        di = torch.as_tensor(drawers, device=self.device)
        imgs = self.images[ci, di]  # (T, n_way, k+q, h, w)
        imgs = imgs.transpose(1, 2).unsqueeze(3)  # (T, k+q, n_way, 1, h, w)
        labels = torch.arange(self.n_way, device=self.device)
        return TaskBatch(
            X_support=imgs[:, :k].reshape(n_tasks, k * self.n_way, 1, h, w),
            y_support=labels.repeat(k).expand(n_tasks, -1),
            X_query=imgs[:, k:].reshape(n_tasks, q * self.n_way, 1, h, w),
            y_query=labels.repeat(q).expand(n_tasks, -1),
        )


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- metafit


def make_learner(algorithm: str, n_way: int, s: Setting, args, kernel=None) -> MetaLearner:
    torch.manual_seed(args.seed)
    kernel = kernel or args.kernel.split(",")[0]
    bn_steps = s.train_steps if algorithm == "mamlpp" else None
    module = Conv4(
        n_way, (1, args.image_size, args.image_size), args.hidden, bn_steps=bn_steps, kernel=kernel
    )
    algo = MAMLPlusPlus() if algorithm == "mamlpp" else algorithm
    learner = MetaLearner(
        module,
        loss="cross_entropy",
        algorithm=algo,
        inner_lr=s.inner_lr,
        inner_steps=s.train_steps,
        device=args.device,
    )
    learner.init_optimizer(s.meta_lr, args.iterations)
    return learner


def evaluate(learner: MetaLearner, episodes: Episodes, s: Setting, args) -> tuple[float, float]:
    """Mean query accuracy (%) and the half-width of its 95% interval."""
    rng = np.random.default_rng(10_000 + args.seed)
    accs = []
    left = args.episodes
    while left > 0:
        n = min(left, 50)
        b = episodes.sample(n, rng)
        phi = learner.adapt(b.X_support, b.y_support, steps=s.test_steps, track_graph=False)
        pred = learner.predict(phi, b.X_query).argmax(-1)
        accs.append((pred == b.y_query).float().mean(1).cpu().numpy())
        left -= n
    acc = np.concatenate(accs) * 100
    return float(acc.mean()), float(1.96 * acc.std(ddof=1) / math.sqrt(len(acc)))


def train_and_evaluate(algorithm, n_way, k_shot, data, args, emit) -> None:
    s = paper_setting(algorithm, n_way)
    s.meta_batch = args.meta_batch or s.meta_batch
    s.inner_lr = args.inner_lr or s.inner_lr
    s.meta_lr = args.meta_lr or s.meta_lr
    s.train_steps = args.train_steps or s.train_steps
    s.test_steps = args.test_steps or s.test_steps
    train = Episodes(data["train"], n_way, k_shot, args.k_query, args.device)
    test = Episodes(data["test"], n_way, k_shot, args.k_query, args.device)
    val = Episodes(data["val"], n_way, k_shot, args.k_query, args.device) if "val" in data else None
    learner = make_learner(algorithm, n_way, s, args)
    rng = np.random.default_rng(args.seed)
    step = None if args.graph == "none" else make_step(args.graph, learner, s, train, args)
    checkpoints = {int(x) for x in args.eval_at.split(",") if x}
    marks = sorted(float(x) * 60 for x in args.eval_minutes.split(",") if x)
    budget = math.inf if args.minutes is None else args.minutes * 60
    trained, cpu, iteration = 0.0, 0.0, 0
    while iteration < args.iterations and trained < budget:
        batch = train.sample(s.meta_batch, rng)
        sync(args.device)
        start, cpu0 = time.perf_counter(), time.thread_time()
        if step is None:
            learner.meta_step([batch])
        else:
            step(batch)
        sync(args.device)
        trained += time.perf_counter() - start
        cpu += time.thread_time() - cpu0
        iteration += 1
        done = iteration >= args.iterations or trained >= budget
        at_mark = bool(marks) and trained >= marks[0]
        while marks and trained >= marks[0]:
            marks.pop(0)
        if iteration in checkpoints or at_mark or done:
            acc, half = evaluate(learner, test, s, args)
            rate = iteration * s.meta_batch / trained
            val_note = ""
            if val is not None:  # for choosing settings without looking at the test split
                val_note = "  val {:6.2f} +- {:4.2f} %".format(*evaluate(learner, val, s, args))
            emit(
                f"{n_way:>3}-way {k_shot}-shot  {algorithm:8s} {iteration:>7} it "
                f"{trained / 60:6.2f} min ({cpu / 60:5.2f} thread-CPU)  {rate:6.1f} tasks/s   "
                f"{acc:6.2f} +- {half:4.2f} %   (published "
                f"{PUBLISHED[algorithm][CONFIGS.index(f'{n_way}w{k_shot}s')]}){val_note}"
            )


def make_step(kind: str, learner: MetaLearner, s: Setting, train: Episodes, args):
    """The meta-step of ``--graph``: compiled, or one CUDA graph of the fixed shapes."""
    if kind == "cuda":
        example = train.sample(s.meta_batch, np.random.default_rng(args.seed + 1))
        return STEPS["cuda"](learner, example, s.meta_lr)
    return STEPS[kind](learner)


def graph_compare(algorithm, n_way, k_shot, data, args, emit) -> None:
    """Milliseconds per meta-step, eager against compiled and (on CUDA) graphed, the same
    batches, medians of interleaved repeats after warm-up."""
    s = paper_setting(algorithm, n_way)
    s.meta_batch = args.meta_batch or s.meta_batch
    train = Episodes(data["train"], n_way, k_shot, args.k_query, args.device)
    kinds = ["none", "compile"] + (["cuda"] if torch.device(args.device).type == "cuda" else [])
    steps, first = {}, {}
    batches = [train.sample(s.meta_batch, np.random.default_rng(i)) for i in range(4)]
    for kind in kinds:
        learner = make_learner(algorithm, n_way, s, args)
        started = time.perf_counter()
        steps[kind] = STEPS["none"](learner) if kind == "none" else make_step(
            kind, learner, s, train, args)
        steps[kind](batches[0])  # compiles / warms up
        sync(args.device)
        first[kind] = time.perf_counter() - started
    times = {k: [] for k in kinds}
    for _ in range(3 if args.quick else 7):
        for kind in kinds:
            sync(args.device)
            start = time.perf_counter()
            for b in batches:
                steps[kind](b)
            sync(args.device)
            times[kind].append((time.perf_counter() - start) / len(batches) * 1e3)
    base = float(np.median(times["none"]))
    for kind in kinds:
        ms = float(np.median(times[kind]))
        emit(f"{n_way}-way {k_shot}-shot {algorithm} meta-batch {s.meta_batch}, "
             f"--graph {kind:8s}: {ms:8.2f} ms per meta-step ({base / ms:4.2f}x eager); "
             f"first step incl. compile/capture {first[kind]:6.1f} s")


# ----------------------------------------------------------------------------- baseline


class L2LStyleCNN(nn.Module):
    """learn2learn's OmniglotCNN: conv-BN-ReLU blocks with nn.BatchNorm2d, mean pooling."""

    def __init__(self, n_way: int, hidden: int):
        super().__init__()
        layers, c = [], 1
        for _ in range(4):
            layers += [
                nn.Conv2d(c, hidden, 3, 2, 1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
            ]
            c = hidden
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden, n_way)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def loop_baseline(n_way: int, s: Setting, first_order: bool, args):
    """One meta-step done per task, learn2learn's way; real learn2learn when importable."""
    try:
        import learn2learn as l2l

        model = l2l.vision.models.OmniglotCNN(n_way, hidden_size=args.hidden).to(args.device)
        maml = l2l.algorithms.MAML(model, lr=s.inner_lr, first_order=first_order)
        optimizer = torch.optim.Adam(maml.parameters(), 1e-3)

        def step(batch: TaskBatch) -> None:
            optimizer.zero_grad()
            for t in range(batch.n_tasks):
                learner = maml.clone()
                for _ in range(s.train_steps):
                    learner.adapt(F.cross_entropy(learner(batch.X_support[t]), batch.y_support[t]))
                loss = F.cross_entropy(learner(batch.X_query[t]), batch.y_query[t])
                (loss / batch.n_tasks).backward()
            optimizer.step()

        return f"learn2learn {l2l.__version__} MAML", step
    except ImportError:
        pass
    model = L2LStyleCNN(n_way, args.hidden).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def step(batch: TaskBatch) -> None:
        optimizer.zero_grad()
        for t in range(batch.n_tasks):
            params = {k: v.clone() for k, v in model.named_parameters()}
            for _ in range(s.train_steps):
                out = functional_call(model, params, (batch.X_support[t],))
                loss = F.cross_entropy(out, batch.y_support[t])
                grads = torch.autograd.grad(
                    loss, list(params.values()), create_graph=not first_order
                )
                params = {k: v - s.inner_lr * g for (k, v), g in zip(params.items(), grads)}
            out = functional_call(model, params, (batch.X_query[t],))
            (F.cross_entropy(out, batch.y_query[t]) / batch.n_tasks).backward()
        optimizer.step()

    return "per-task loop (learn2learn-style)", step


def compare(algorithm, n_way, k_shot, data, args, emit) -> None:
    """Interleaved timing of metafit's meta-step and the per-task loop's, same batches."""
    s = paper_setting(algorithm, n_way)
    s.meta_batch = args.meta_batch or s.meta_batch
    s.inner_lr = args.inner_lr or s.inner_lr
    s.train_steps = args.train_steps or s.train_steps
    episodes = Episodes(data["train"], n_way, k_shot, args.k_query, args.device)
    name, baseline = loop_baseline(n_way, s, algorithm == "fomaml", args)
    rng = np.random.default_rng(args.seed)
    runs = {}
    for kernel in args.kernel.split(","):
        learner = make_learner(algorithm, n_way, s, args, kernel)
        resolved = learner.module.resolve_kernel(args.device)
        runs[f"metafit (Conv4 kernel {resolved})"] = lambda b, lr=learner: lr.meta_step([b])
    runs[name] = baseline
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for _ in range(args.compare_steps + 1):
        batch = episodes.sample(s.meta_batch, rng)
        for key, fn in runs.items():
            sync(args.device)
            w0, c0 = time.perf_counter(), time.thread_time()
            fn(batch)
            sync(args.device)
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.thread_time() - c0)
    rates = {}
    for key in runs:  # the first, warm-up step is dropped; min is robust to other load
        rates[key] = (s.meta_batch / min(wall[key][1:]), s.meta_batch / min(cpu[key][1:]))
        emit(
            f"{n_way:>3}-way {k_shot}-shot  {algorithm:8s} {key:36s} "
            f"{rates[key][0]:7.1f} tasks/s wall  {rates[key][1]:7.1f} tasks/s thread-CPU"
        )
    theirs = rates[name]
    for key, ours in rates.items():
        if key != name:
            emit(
                f"    {key}: {ours[0] / theirs[0]:.2f}x wall, {ours[1] / theirs[1]:.2f}x "
                "thread-CPU the per-task loop's speed"
            )


# ----------------------------------------------------------------------------- main


def memory_table(args, emit) -> None:
    """Graph memory and speed of one meta-step against the number of inner steps."""
    from sinusoid import saved_graph_peak  # the same measurement as the sinusoid table

    from metafit.algorithms import MAML

    n_way, k_query, size = 5, args.k_query, args.image_size
    rng = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.memory_batch, n_way * (1 + k_query), 1, size, size, generator=rng)
    labels = torch.arange(n_way).repeat(1 + k_query).expand(args.memory_batch, -1)
    batch = TaskBatch(images[:, :n_way].to(args.device), labels[:, :n_way].to(args.device),
                      images[:, n_way:].to(args.device), labels[:, n_way:].to(args.device))
    variants = {"maml": ("maml", None), "maml checkpoint": (MAML(checkpoint=True), None),
                "maml chunk 4": ("maml", 4), "fomaml": ("fomaml", None),
                "imaml": ("imaml", None)}
    steps = [int(s) for s in args.memory_steps.split(",")]
    emit(f"# one 5-way 1-shot meta-step of Conv4 ({args.hidden} filters), {args.memory_batch} "
         f"tasks, {k_query} query images per class: graph MB / tasks/s")
    emit(f"{'method':<18}" + "".join(f"{f'{s} steps':>22}" for s in steps))
    for label, (algorithm, chunk) in variants.items():
        cells = []
        for n in steps:
            torch.manual_seed(args.seed)
            learner = MetaLearner(Conv4(n_way, (1, size, size), args.hidden),
                                  loss="cross_entropy", algorithm=algorithm, inner_lr=0.4,
                                  inner_steps=n, device=args.device, meta_batch_chunk=chunk)
            learner.init_optimizer(1e-3, 10)
            start = time.perf_counter()
            peak = saved_graph_peak(lambda learner=learner: learner.meta_step([batch]))
            sync(args.device)
            rate = batch.n_tasks / (time.perf_counter() - start)
            cells.append(f"{peak / 2**20:,.0f} / {rate:.1f}")
        emit(f"{label:<18}" + "".join(f"{c:>22}" for c in cells))


def main(argv=None) -> None:
    args = parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    if args.memory:
        memory_table(args, emit)
        return

    emit(
        f"# omniglot benchmark  {time.strftime('%Y-%m-%d %H:%M')}  device={args.device} "
        f"threads={torch.get_num_threads()}  torch {torch.__version__}  "
        f"{platform.processor() or platform.machine()}  python {sys.version.split()[0]}"
    )
    emit(f"# argv: {' '.join(sys.argv[1:] if argv is None else argv)}")
    test_split = "test"
    data = {
        "train": load_omniglot_split(
            "train", args.protocol, path=args.data, image_size=args.image_size, rotations=True
        ).images,
        "test": load_omniglot_split(
            test_split, args.protocol, path=args.data, image_size=args.image_size, rotations=True
        ).images,
    }
    if args.protocol == "vinyals":
        data["val"] = load_omniglot_split(
            "val", args.protocol, path=args.data, image_size=args.image_size, rotations=True
        ).images
    emit(
        f"# protocol {args.protocol}: {len(data['train'])} training classes, "
        f"{len(data['test'])} test classes (with rotations); {args.episodes} test episodes, "
        f"{args.k_query} query images per class"
    )
    for config in args.configs.split(","):
        if config not in CONFIGS:
            raise SystemExit(f"unknown config {config!r}; use {', '.join(CONFIGS)}")
        n_way, k_shot = int(config.split("w")[0]), int(config.split("w")[1][:-1])
        for algorithm in args.algorithms.split(","):
            if args.graph_compare:
                graph_compare(algorithm, n_way, k_shot, data, args, emit)
                continue
            if (args.compare or args.compare_only) and algorithm in ("maml", "fomaml"):
                compare(algorithm, n_way, k_shot, data, args, emit)
            if not args.compare_only:
                train_and_evaluate(algorithm, n_way, k_shot, data, args, emit)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
