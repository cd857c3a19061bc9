"""CUDA check of the engine: the same numbers on the GPU as on the CPU, and how fast.

Run on a machine with a CUDA GPU (metafit never needs one)::

    python benchmarks/cuda_check.py            # about 1 minute
    python benchmarks/cuda_check.py --quick    # a few seconds

It prints three tables:

1. meta-gradients of every algorithm on the MLP and on Conv4, float64, CPU vs CUDA
   (max relative difference; the check fails above 1e-9);
2. an estimator meta-fitted and fitted with ``device="cuda"`` against the same on the CPU
   (predictions after a short float32 meta-training);
3. meta-training throughput (tasks/s) on CPU and CUDA for the sinusoid MLP (both forward
   strategies) and 5-way 1-shot Conv4 at 28x28.

Exit status 1 if a correctness row fails, 2 if no CUDA device is present.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from metafit import MetaInitializedRegressor
from metafit.algorithms import ALGORITHMS
from metafit.learner import MetaLearner
from metafit.models import MLP, Conv4
from metafit.tasks import NWayKShotTasks, SinusoidTasks


def _conv_tasks(n: int, n_way: int = 5, k_shot: int = 1, size: int = 28, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.random((n_way * 4 * (k_shot + 5), 1, size, size), dtype=np.float32)
    y = np.repeat(np.arange(n_way * 4), k_shot + 5)
    return NWayKShotTasks(X, y, n_way, k_shot, 5, random_state=seed).sample(n)


def _learner(kind: str, algorithm: str, device: str, dtype, seed: int = 0) -> MetaLearner:
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        module = MLP(1, 1, (40, 40))
        loss, lr = "mse", 0.01
    else:
        module = Conv4(n_outputs=5, hidden_channels=16)
        loss, lr = "cross_entropy", 0.4
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return MetaLearner(
        module, loss=loss, algorithm=algorithm, inner_lr=lr, inner_steps=2,
        device=device, dtype=dtype,
    )


def check_gradients(quick: bool) -> bool:
    print("\n1. meta-gradients, float64, CPU vs CUDA (max relative difference)")
    print(f"{'model':6} {'algorithm':10} {'rel. diff':>10}  ok")
    ok = True
    tasks = {"mlp": SinusoidTasks(random_state=0).sample(8), "conv4": _conv_tasks(4)}
    kinds = ["mlp"] if quick else ["mlp", "conv4"]
    for kind in kinds:
        for name in sorted(ALGORITHMS):
            grads = {}
            for device in ("cpu", "cuda"):
                learner = _learner(kind, name, device, torch.float64)
                _, g = learner.algorithm.meta_gradients(learner, learner.batches(tasks[kind]))
                grads[device] = [t.detach().cpu() for t in g]
            num = max(float((a - b).abs().max()) for a, b in zip(grads["cpu"], grads["cuda"]))
            den = max(float(a.abs().max()) for a in grads["cpu"]) or 1.0
            rel = num / den
            row_ok = rel < 1e-9
            ok &= row_ok
            print(f"{kind:6} {name:10} {rel:10.2e}  {'yes' if row_ok else 'NO'}")
    return ok


def check_estimator(quick: bool) -> bool:
    print("\n2. estimator on CUDA vs CPU (float32, same seed)")
    iters = 50 if quick else 300
    task = SinusoidTasks(k_query=100, random_state=7).sample(1)[0]
    preds = {}
    for device in ("cpu", "cuda"):
        est = MetaInitializedRegressor(
            meta_iterations=iters, inner_steps=1, device=device, random_state=0
        )
        est.meta_fit(SinusoidTasks(random_state=0))
        est.set_params(inner_steps=5).fit(task.X_support, task.y_support)
        preds[device] = est.predict(task.X_query)
    diff = float(np.abs(preds["cpu"] - preds["cuda"]).max())
    mse = {d: float(np.mean((p - task.y_query) ** 2)) for d, p in preds.items()}
    # float32 reductions differ in order between devices; after a few hundred Adam steps
    # the two trajectories drift slightly apart, so compare loosely.
    row_ok = diff < 0.05 * (1 + float(np.abs(preds["cpu"]).max()))
    print(f"meta_iterations={iters}: max |pred_cpu - pred_cuda| = {diff:.2e}; query MSE "
          f"cpu {mse['cpu']:.3f}, cuda {mse['cuda']:.3f}  {'yes' if row_ok else 'NO'}")
    return row_ok


def throughput(quick: bool) -> None:
    print("\n3. meta-training throughput, second-order MAML (tasks/s)")
    print(f"{'workload':34} {'cpu':>9} {'cuda':>9}")
    rows = [
        ("sinusoid MLP, mlp path, batch 25", "mlp", "mlp", 25),
        ("sinusoid MLP, vmap path, batch 25", "mlp", "vmap", 25),
        ("Conv4 5w1s 28px, batch 32", "conv4", "auto", 32),
    ]
    n_iter = 5 if quick else 30
    for label, kind, forward, batch in rows:
        out = []
        for device in ("cpu", "cuda"):
            learner = _learner(kind, "maml", device, torch.float32)
            if kind == "conv4":
                learner = MetaLearner(
                    Conv4(n_outputs=5), loss="cross_entropy", algorithm="maml",
                    inner_lr=0.4, inner_steps=1, device=device,
                )
                tasks = _conv_tasks(batch * n_iter, seed=1)
            else:
                learner = MetaLearner(
                    MLP(1, 1, (40, 40)), loss="mse", algorithm="maml", inner_lr=0.01,
                    inner_steps=1, forward=forward, device=device,
                )
                tasks = SinusoidTasks(random_state=1).sample(batch * n_iter)
            learner.init_optimizer(None, n_iter)
            batches = [learner.batches(tasks[i * batch:(i + 1) * batch]) for i in range(n_iter)]
            learner.meta_step(batches[0])  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for b in batches[1:]:
                learner.meta_step(b)
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(batch * (n_iter - 1) / (time.perf_counter() - start))
        print(f"{label:34} {out[0]:9.0f} {out[1]:9.0f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and iterations")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    ok = check_gradients(args.quick)
    ok &= check_estimator(args.quick)
    throughput(args.quick)
    print("\nall correctness rows passed" if ok else "\nSOME CORRECTNESS ROWS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
