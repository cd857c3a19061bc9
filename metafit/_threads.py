"""How many torch CPU threads a network trains fastest with, applied for one call only.

torch's intra-op thread count is one setting for the whole process. The small networks of
meta-learning run fastest on one thread: their kernels are too short to share, and on a
busy machine extra threads only wait for a core (measured in
``benchmarks/threads.py``). Convolutions gain from more threads. :func:`threads_for` makes
that choice for a module; :func:`torch_threads` applies a count for the duration of a
``meta_fit`` or ``fit`` and restores the caller's setting afterwards.

Several estimators may run at once in threads of one process: the first to enter sets
the count, the others run with it (a per-thread setting does not exist in torch), and the
last to leave restores what was there before the first.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

__all__ = ["threads_for", "torch_threads"]

_lock = threading.Lock()
_active = 0
_saved: int | None = None


def _cores() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def threads_for(module: nn.Module | None, n_threads: int | None) -> int:
    """The thread count for ``module``: ``n_threads`` when given, else 1 for networks
    without convolutions (the built-in MLP, most tabular nets), else every core this
    process may use (Conv4 and other convolutional nets)."""
    if n_threads is not None:
        return int(n_threads)
    if module is None:
        return 1
    convolutional = _CONVOLUTIONAL.get(module)
    if convolutional is None:  # walked once per network: fit calls this every time
        convolutional = any(isinstance(m, _CONVOLUTIONS) for m in module.modules())
        _CONVOLUTIONAL[module] = convolutional
    return _cores() if convolutional else 1


_CONVOLUTIONAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_CONVOLUTIONS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d
)


def torch_threads(n: int):
    """A context that runs its block with ``torch.set_num_threads(n)`` and restores the
    caller's count after (see the module docstring for concurrent callers)."""
    if not _active and torch.get_num_threads() == n:
        return nullcontext()  # nothing to set or restore: the common case of every fit
    return _set_threads(n)


@contextmanager
def _set_threads(n: int):
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved = torch.get_num_threads()
            if _saved != n:
                torch.set_num_threads(n)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                if torch.get_num_threads() != _saved:
                    torch.set_num_threads(_saved)
                _saved = None
