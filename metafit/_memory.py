"""An up-front estimate of the memory that second-order meta-training keeps.

Second-order MAML (and ANIL, Meta-SGD, MAML++) differentiates the query loss through
every inner step, so each step's forward and backward graph stays alive until the
meta-gradient is taken: memory grows linearly with ``meta_inner_steps`` and
``meta_batch_size``. Without a check, ``meta_inner_steps=100000`` runs silently until the
allocator fails. :func:`check_inner_graph_memory` measures what one forward pass saves for
backward, on torch's ``meta`` device (no memory, no computation, no random numbers, the
real module untouched), scales it to the run, and refuses or warns before the first
meta-iteration.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["available_memory", "check_inner_graph_memory", "inner_graph_bytes"]

#: Per inner step and task, second order keeps the forward's saved tensors, about twice
#: as much again for the backward built with ``create_graph=True``, and the adapted
#: parameters' new values. ``python benchmarks/memory_estimate.py`` measures it against
#: the peak RSS on MLPs of 40 and 400 units, 5-100 steps: 0.75-2.2x the truth for MAML,
#: about 10x for ANIL (an upper bound: its frozen body is counted as if it were adapted).
_GRAPH_FACTOR = 3
_PARAM_COPIES = 1
#: Warn above this share of the available memory.
_WARN_SHARE = 0.5


def _forward_saved_bytes(module: nn.Module, feature_shape: Sequence[int], n_rows: int) -> int:
    """Bytes that one forward of ``n_rows`` rows saves for backward (measured on ``meta``)."""
    try:
        ghost = copy.deepcopy(module).to("meta")
    except Exception:  # a module that cannot be copied or moved: no estimate
        return 0
    saved = 0

    def pack(t: torch.Tensor):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    X = torch.empty((n_rows, *feature_shape), device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ghost(X)
    except Exception:  # a forward the meta device cannot run (data-dependent code)
        return 0
    return saved


def inner_graph_bytes(
    module: nn.Module,
    feature_shape: Sequence[int],
    *,
    n_support: int,
    n_query: int,
    n_tasks: int,
    steps: int,
    adapted_names: Sequence[str] | None = None,
) -> int:
    """Estimated bytes that a second-order meta-step keeps alive until its backward pass.

    Parameters
    ----------
    module : nn.Module
    feature_shape : sequence of int
        One row's shape.
    n_support, n_query : int
        Rows per task.
    n_tasks : int
        Tasks of the meta-batch (this process's share).
    steps : int
        Inner steps differentiated through.
    adapted_names : sequence of str, optional
        Parameters the inner loop adapts (None: all).

    Returns
    -------
    int
    """
    params = dict(module.named_parameters())
    names = params if adapted_names is None else adapted_names
    adapted = sum(params[n].numel() * params[n].element_size() for n in names if n in params)
    # Two probes: what grows with the rows (activations), apart from what a forward saves
    # once (the weights, already counted as adapted parameters).
    per_row = max(
        _forward_saved_bytes(module, feature_shape, 2)
        - _forward_saved_bytes(module, feature_shape, 1), 0
    )
    support = _GRAPH_FACTOR * per_row * n_support + _PARAM_COPIES * adapted
    return n_tasks * (steps * support + per_row * n_query)


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for new tensors on ``device``, or None where that is unknown."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_inner_graph_memory(needed: int, available: int | None, *, steps: int, n_tasks: int,
                             algorithm: str) -> None:
    """Raise a MemoryError-free ValueError when ``needed`` exceeds ``available``, warn when
    it takes more than half of it; say what to change either way."""
    if available is None or needed <= _WARN_SHARE * available:
        return
    gib = 2**30
    text = (
        f"second-order {algorithm} keeps every inner step's graph until the meta-gradient: "
        f"meta_inner_steps={steps} on a meta-batch of {n_tasks} tasks needs about "
        f"{needed / gib:.3g} GiB, and {available / gib:.3g} GiB are available"
    )
    fix = (
        "use fewer meta_inner_steps (fit may still take more inner_steps), "
        "meta_batch_chunk= (the same meta-gradient, a few tasks at a time) or a smaller "
        "meta_batch_size, or a first-order algorithm ('fomaml', 'reptile'), whose memory "
        "does not grow with the steps"
    )
    if needed > available:
        raise ValueError(f"{text}; {fix}. Nothing was trained.")
    warnings.warn(f"{text}: more than half. If memory runs out, {fix}.", ResourceWarning,
                  stacklevel=4)
