"""The types the inner loop is written against, below every module that implements them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LowRankWeight", "Params", "PreparedGradFn", "StepGradients"]

Params = dict[str, Tensor]
#: ``step(current, scale=None) -> gradients in names order`` (without the loss's factor).
#: A prepared step (:meth:`PreparedGradFn.prepare`) also takes ``update=True`` with a
#: ``scale``: it then returns ``current[name] + scale * gradient`` instead, fused.
StepGradients = Callable[..., list[Tensor]]


class PreparedGradFn(ABC):
    """A gradient function that precomputes, once per inner loop, what all steps share.

    Calling it, ``grad_fn(params, X, y, names, scale=None)``, gives
    ``{name: scale * d(sum_t loss_t)/d params[name]}``; :meth:`prepare` returns
    ``(step, factor)`` with ``factor * step(current)`` the gradients of the adapted
    ``names`` at every step, and with ``single`` (one task) the parameters have their module
    shape; ``mask`` (T, n) marks the real rows of padded tasks. The ``"mlp"`` strategy's
    analytic gradient
    (:class:`metafit._mlp_path.MLPGradient`) is one; the inner loop recognises the type.
    """

    @abstractmethod
    def __call__(
        self, params: Mapping[str, Tensor], X: Tensor, y: Tensor, names: Sequence[str],
        scale: float | None = None, mask: Tensor | None = None,
    ) -> Params: ...

    @abstractmethod
    def prepare(
        self, params: Mapping[str, Tensor], X: Tensor, y: Tensor, names: Sequence[str],
        single: bool = False, mask: Tensor | None = None,
    ) -> tuple[StepGradients, float]: ...


class LowRankWeight:
    """A batch of per-task weights kept as the shared weight plus a low-rank change:
    ``W_t = base + left_t^T @ right_t``.

    After ``s`` SGD steps on ``n`` support rows, a linear layer's adapted weight is the
    initialization plus a change of rank at most ``s * n`` (each step adds
    ``-lr * D^T A``, with ``A`` the layer's inputs and ``D`` the loss gradients at its
    outputs). Kept in this form, the layer's forward ``x W_t^T`` is the shared product
    ``x base^T`` for all tasks' rows at once plus ``(x right_t^T) left_t``, which costs
    ``O(rank * (in + out))`` per row instead of ``O(in * out)``
    (:mod:`metafit._low_rank` runs the inner loop this way).

    Parameters
    ----------
    base : Tensor of shape (out, in)
        The shared initialization.
    left : Tensor of shape (T, rank, out)
        The scaled output gradients of every step so far, stacked along the rank.
    right : Tensor of shape (T, rank, in)
        The matching layer inputs.
    """

    __slots__ = ("base", "left", "right")

    def __init__(self, base: Tensor, left: Tensor, right: Tensor):
        self.base, self.left, self.right = base, left, right

    @property
    def rank(self) -> int:
        """The number of stacked rows (an upper bound on the change's rank)."""
        return self.left.shape[-2]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense weights, ``(T, out, in)``."""
        return (self.left.shape[0], *self.base.shape)

    def linear(self, h: Tensor, bias: Tensor) -> Tensor:
        """``h @ W_t^T + bias`` for ``h`` of shape (T, n, in) and a shared or batched bias."""
        if bias.dim() == 1:
            out = F.linear(h, self.base, bias)
        else:
            out = F.linear(h, self.base) + bias.unsqueeze(-2)
        return torch.baddbmm(out, torch.bmm(h, self.right.mT), self.left)

    def backward_input(self, d: Tensor) -> Tensor:
        """``d @ W_t`` for output gradients ``d`` of shape (T, n, out)."""
        return torch.baddbmm(torch.matmul(d, self.base), torch.bmm(d, self.left.mT), self.right)

    def dense(self) -> Tensor:
        """The weights as one tensor of shape (T, out, in)."""
        return torch.baddbmm(self.base, self.left.mT, self.right)

    def appended(self, left: Tensor, right: Tensor) -> LowRankWeight:
        """These weights plus ``left^T @ right`` (both with the task dimension)."""
        return LowRankWeight(
            self.base, torch.cat((self.left, left), -2), torch.cat((self.right, right), -2)
        )

    def __repr__(self) -> str:
        return f"LowRankWeight(shape={self.shape}, rank={self.rank})"
