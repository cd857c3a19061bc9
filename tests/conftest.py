"""Shared test configuration.

The engine works on many tiny tensors, where torch's intra-op thread pool costs more than
it saves (and stalls badly when another process holds the second core), so the suite runs
torch single-threaded. The library itself never changes the thread setting.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
