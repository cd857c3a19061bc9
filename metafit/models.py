"""Built-in networks.

:class:`MLP` is the default model of the estimators and has a hand-batched fast path in
:mod:`metafit.functional`. Any other ``nn.Module`` works through the generic paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP"]

_ACTIVATION_NAMES = ("relu", "tanh", "sigmoid", "gelu", "elu")


class MLP(nn.Module):
    """A fully connected network: ``Linear -> activation -> ... -> Linear``.

    Parameters
    ----------
    n_inputs : int
        Input features; inputs with more than one trailing dimension are flattened.
    n_outputs : int
        Outputs (1 for scalar regression, the number of classes for classification).
    hidden_sizes : sequence of int, default=(40, 40)
        Widths of the hidden layers; empty for a linear model.
    activation : {"relu", "tanh", "sigmoid", "gelu", "elu"}, default="relu"
        Non-linearity between layers.

    Examples
    --------
    >>> net = MLP(1, 1, (40, 40))
    >>> net(torch.zeros(3, 1)).shape
    torch.Size([3, 1])
    """

    preferred_forward = "mlp"

    def __init__(
        self,
        n_inputs: int,
        n_outputs: int,
        hidden_sizes: Sequence[int] = (40, 40),
        activation: str = "relu",
    ):
        super().__init__()
        if activation not in _ACTIVATION_NAMES:
            raise ValueError(
                f"activation must be one of {', '.join(_ACTIVATION_NAMES)}; got {activation!r}."
            )
        sizes = [int(n_inputs), *(int(h) for h in hidden_sizes), int(n_outputs)]
        if any(s < 1 for s in sizes):
            raise ValueError(f"layer sizes must be positive integers, got {sizes}.")
        self.n_inputs, self.n_outputs = sizes[0], sizes[-1]
        self.hidden_sizes = tuple(sizes[1:-1])
        self.activation = activation
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def weight_bias_names(self) -> list[tuple[str, str]]:
        """``(weight, bias)`` parameter names of each layer, input to output."""
        return [(f"layers.{i}.weight", f"layers.{i}.bias") for i in range(len(self.layers))]

    def head_parameter_names(self) -> list[str]:
        """Parameter names of the output layer (what ANIL adapts)."""
        return list(self.weight_bias_names()[-1])

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = X.flatten(1) if X.dim() > 2 else X
        act = getattr(torch, self.activation, None) or getattr(nn.functional, self.activation)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = act(h)
        return h
