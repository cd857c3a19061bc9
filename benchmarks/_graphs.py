"""Fixed-shape meta-steps captured whole, for ``omniglot.py --graph`` (the GPU path).

Two ways to remove the per-kernel launch overhead of a meta-step whose shapes never
change (Omniglot's N-way K-shot episodes):

- ``compiled_step``: ``torch.compile`` of the meta-gradient computation,
  ``mode="reduce-overhead"`` (CUDA graphs inside on a GPU; inductor's fused kernels on a
  CPU, where it also runs, so it can be tried anywhere);
- ``cuda_graph_step``: one ``torch.cuda.CUDAGraph`` of the whole step (meta-gradients,
  their copy into static ``.grad`` buffers, and a capturable Adam), replayed after copying
  each new batch into static input tensors. CUDA only.

Both keep the learner's own tensors (its parameters are updated in place), so evaluation
and saving work as usual between steps. Neither is part of the library: the issue asks to
measure which is faster before one becomes an option of ``MetaLearner``.
"""

from __future__ import annotations

import torch

from metafit.learner import MetaLearner
from metafit.tasks import TaskBatch

_FIELDS = ("X_support", "y_support", "X_query", "y_query")


def eager_step(learner: MetaLearner):
    """The ordinary meta-step, for comparison."""
    return lambda batch: learner.meta_step([batch])


def compiled_step(learner: MetaLearner, mode: str = "reduce-overhead"):
    """``step(batch)``: meta-gradients through ``torch.compile``, then the optimizer."""
    gradients = torch.compile(learner.meta_gradients, mode=mode, dynamic=False)
    params = learner.meta_parameters()

    def step(batch: TaskBatch) -> float:
        loss, grads = gradients([batch])
        for p, g in zip(params, grads):
            p.grad = g.detach().clone()  # compiled outputs may be overwritten by the next call
        learner.optimizer.step()
        return float(loss)

    return step


def cuda_graph_step(learner: MetaLearner, example: TaskBatch, meta_lr: float, warmup: int = 3):
    """``step(batch)`` replaying one captured CUDA graph of the meta-step of ``example``'s
    shapes. The learner's optimizer is replaced by a capturable Adam at ``meta_lr`` (the
    warm-up steps are real meta-steps on ``example``)."""
    if example.X_support.device.type != "cuda":
        raise RuntimeError("a CUDA graph needs the learner and the batch on a CUDA device.")
    params = learner.meta_parameters()
    learner.optimizer = torch.optim.Adam(params, lr=meta_lr, capturable=True, foreach=True)
    static = TaskBatch(*(getattr(example, f).clone() for f in _FIELDS))
    for p in params:
        p.grad = torch.zeros_like(p)

    def body():
        loss, grads = learner.meta_gradients([static])
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        learner.optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graph asks
        for _ in range(warmup):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = body()

    def step(batch: TaskBatch) -> float:
        for f in _FIELDS:
            getattr(static, f).copy_(getattr(batch, f))
        graph.replay()
        return static_loss  # a device tensor; read it only when needed (one sync)

    return step


STEPS = {"none": eager_step, "compile": compiled_step, "cuda": cuda_graph_step}
