"""The types the inner loop is written against, below every module that implements them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

__all__ = ["Params", "PreparedGradFn", "StepGradients"]

Params = dict[str, Tensor]
#: ``step(current, scale=None) -> gradients in names order`` (without the loss's factor).
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
