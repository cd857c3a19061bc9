"""CAVIA: fast context adaptation (Zintgraf, Shiarlis, Kurin, Hofmann and Whiteson 2019)."""

from __future__ import annotations

from metafit.algorithms.base import GradientMetaAlgorithm

__all__ = ["CAVIA"]


class CAVIA(GradientMetaAlgorithm):
    """Adapt only a small context vector fed to the network; meta-learn everything else.

    The network (:class:`metafit.models.ContextMLP` when the estimator builds it) takes
    each row together with a ``context`` parameter. The inner loop adapts the context
    alone, from the network's meta-learned start, with its own rate ``context_lr``; the
    meta-gradient (second order, through the inner steps) trains the shared weights.
    Few adapted numbers per task: little to overfit on a handful of rows.

    Parameters
    ----------
    context_size : int, default=4
        Length of the context vector.
    context_lr : float, default=1.0
        Inner-loop rate of the context (the paper's value). ``fit`` uses it in place of
        the estimator's ``inner_lr``, which it does not read.
    """

    name = "cavia"
    first_order = False

    def __init__(self, context_size: int = 4, context_lr: float = 1.0):
        if isinstance(context_size, bool) or not isinstance(context_size, int) or not (
            1 <= context_size <= 1024
        ):
            raise ValueError(f"context_size must be an int in [1, 1024], got {context_size!r}.")
        if isinstance(context_lr, bool) or not isinstance(context_lr, (int, float)) or not (
            context_lr > 0
        ):
            raise ValueError(f"context_lr must be a number > 0, got {context_lr!r}.")
        self.context_size = context_size
        self.context_lr = float(context_lr)

    def get_config(self):
        return {"context_size": self.context_size, "context_lr": self.context_lr}

    @property
    def uses_inner_lr(self) -> bool:
        return False

    def default_module(self, n_features, n_outputs, hidden_sizes, activation):
        from metafit.models import ContextMLP

        kwargs = {"n_inputs": int(n_features), "n_outputs": int(n_outputs),
                  "hidden_sizes": list(hidden_sizes), "activation": activation,
                  "context_size": self.context_size}
        return ContextMLP(**kwargs), kwargs

    def adapted_names(self, ctx):
        names = [n for n, _ in ctx.module.named_parameters() if n.rpartition(".")[2] == "context"]
        if len(names) != 1:
            raise ValueError(
                "algorithm='cavia' adapts one parameter named 'context' (see "
                f"metafit.models.ContextMLP); {type(ctx.module).__name__} has "
                f"{len(names)}. Leave module=None, or give your module such a parameter."
            )
        return names

    def inner_lr(self, ctx, base=None, steps=None):
        return self.context_lr
