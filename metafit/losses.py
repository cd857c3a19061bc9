"""Task losses with a leading task dimension: one value per task of a meta-batch.

:mod:`metafit.functional` re-exports them; the ``"mlp"`` strategy's analytic gradients
recognise these two functions by identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["mse_loss", "cross_entropy_loss", "task_losses", "row_mean", "LOSSES"]


def row_mean(per_row: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over each task's rows of ``per_row`` (T, n): the real rows only with ``mask``."""
    if mask is None:
        return per_row.mean(1)
    return (per_row * mask).sum(1) / mask.sum(1)


def mse_loss(outputs: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per task.

    Parameters
    ----------
    outputs : Tensor of shape (T, n, n_outputs)
    y : Tensor of shape (T, n) or (T, n, n_outputs)
        With 2-D targets, only the first output column is compared.
    mask : Tensor of shape (T, n), optional
        1 for a real row, 0 for padding (:class:`metafit.tasks.TaskBatch`); the mean is
        over the real rows.

    Returns
    -------
    Tensor of shape (T,)
    """
    if y.dim() == 2:
        outputs = outputs[..., 0]
    if mask is None:
        return (outputs - y).pow(2).flatten(1).mean(1)
    per_row = (outputs - y).pow(2)
    if per_row.dim() > 2:
        per_row = per_row.flatten(2).mean(2)
    return row_mean(per_row, mask)


def cross_entropy_loss(outputs: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy per task; ``y`` holds class indices of shape (T, n) (``mask``
    as in :func:`mse_loss`)."""
    T, n = y.shape
    per_row = F.cross_entropy(outputs.reshape(T * n, -1), y.reshape(-1), reduction="none")
    return row_mean(per_row.view(T, n), mask)


def task_losses(loss_fn: Callable[..., Tensor], outputs: Tensor, y: Tensor,
                mask: Tensor | None = None) -> Tensor:
    """``loss_fn(outputs, y)`` per task, over the real rows of ``mask`` when there is one
    (a loss of two arguments serves unpadded batches)."""
    return loss_fn(outputs, y) if mask is None else loss_fn(outputs, y, mask)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": mse_loss,
    "cross_entropy": cross_entropy_loss,
}
