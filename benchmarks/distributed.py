"""Distributed meta-training throughput: tasks/s on 1, 2, ... processes and the scaling.

Meta-trains a sinusoid MAML regressor (network 1-40-40-1, K=10 support and 10 query points,
1 inner step, meta-batch 32 tasks by default) with ``meta_fit`` once per process count.
Each count runs as that many processes on 127.0.0.1 with the gloo backend, started the way
``torchrun`` starts them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so
the timed code is exactly the one a ``torchrun`` launch runs. Every process uses **one**
intra-op thread (``torch.set_num_threads(1)``), so P processes use P cores.

Throughput is wall-clock tasks per second of the meta-training loop, read from rank 0's
``meta_history_`` (process start-up, rendezvous and the first iteration excluded), the best
of ``--repeats`` runs. Scaling efficiency is ``tasks/s(P) / (P * tasks/s(1))``. On a shared
machine (other jobs on the same cores) the multi-process figures are pessimistic: a rank
that loses its core makes the others wait at the all-reduce.

Usage::

    python benchmarks/distributed.py                       # 1 and 2 processes
    python benchmarks/distributed.py --procs 1 2 4 8 --iterations 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts")
    p.add_argument("--iterations", type=int, default=100, help="meta-iterations per run")
    p.add_argument("--meta-batch", type=int, default=32, help="tasks per global meta-batch")
    p.add_argument("--hidden", type=int, nargs="+", default=[40, 40])
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--algorithm", default="maml")
    p.add_argument("--repeats", type=int, default=1, help="runs per count; the best is kept")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One rank: meta-train and, on rank 0, print the timing as a JSON line."""
    import torch

    torch.set_num_threads(1)
    from metafit import MetaInitializedRegressor, SinusoidTasks

    est = MetaInitializedRegressor(
        hidden_sizes=tuple(args.hidden),
        algorithm=args.algorithm,
        inner_lr=0.01,
        inner_steps=args.inner_steps,
        meta_lr=1e-3,
        meta_batch_size=args.meta_batch,
        meta_iterations=args.iterations,
        random_state=0,
    )
    est.meta_fit(SinusoidTasks(k_shot=10, k_query=10, random_state=0))
    times = est.meta_history_.column("time")
    if int(os.environ.get("RANK", "0")) == 0:
        seconds = times[-1] - times[0]
        tasks = (len(times) - 1) * args.meta_batch
        print("RESULT " + json.dumps({"seconds": seconds, "tasks": tasks}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, args: argparse.Namespace) -> float:
    """Launch ``procs`` ranks; return rank 0's tasks/s."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"]
    cmd += ["--iterations", str(args.iterations), "--meta-batch", str(args.meta_batch)]
    cmd += ["--hidden", *map(str, args.hidden), "--inner-steps", str(args.inner_steps)]
    cmd += ["--algorithm", args.algorithm]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    base["OMP_NUM_THREADS"] = "1"
    port = _free_port()
    children = []
    for rank in range(procs):
        env = dict(base)
        if procs > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(procs),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        children.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outputs = []
    deadline = time.monotonic() + args.timeout
    for child in children:
        out, _ = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
        if child.returncode != 0:
            raise SystemExit(f"a rank of the {procs}-process run failed ({child.returncode})")
        outputs.append(out)
    line = next(x for x in outputs[0].splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    return result["tasks"] / result["seconds"]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.meta_batch < max(args.procs):
        raise SystemExit("--meta-batch must be at least the largest process count")
    import torch

    print(
        f"# metafit distributed benchmark: {args.algorithm}, sinusoid, MLP 1-"
        f"{'-'.join(map(str, args.hidden))}-1, meta-batch {args.meta_batch}, "
        f"{args.inner_steps} inner step(s), {args.iterations} iterations, best of "
        f"{args.repeats}; gloo on 127.0.0.1, 1 thread per process"
    )
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at start"
    )
    print(f"{'processes':>9} {'tasks/s':>10} {'speedup':>8} {'efficiency':>10}")
    base = None
    for procs in args.procs:
        tps = max(run(procs, args) for _ in range(args.repeats))
        base = tps if base is None and procs == 1 else base
        if base is None:
            print(f"{procs:>9} {tps:>10.0f}")
            continue
        speedup = tps / base
        print(f"{procs:>9} {tps:>10.0f} {speedup:>8.2f} {speedup / procs:>10.0%}", flush=True)


if __name__ == "__main__":
    main()
