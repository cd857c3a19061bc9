"""Several meta-learned initializations adapted to one task, their predictions weighted.

``algorithm="auto"`` on a table meta-trains MAML, ALPACA and a linear mixed model and
keeps them all: on small tables the held-out groups cannot tell reliably which will do
better on new groups (float rounding alone, on another CPU, flipped the choice between
MAML and ALPACA on the benchmark's tables), while the mean of those two's predictions
was better than the choice on 8 of the 10 table/k cells of
``benchmarks/grouped_tables.py --blend`` and never much worse than the better one: each
member errs where the other does not, and averaging cancels part of it.
The weights are the estimator's business (inverse validation MSEs, see
:mod:`metafit.estimators._auto_algorithm`); this module applies any.

:class:`EnsembleLearner` is what ``fit`` and ``predict`` see in place of one
:class:`~metafit.learner.MetaLearner`: each member adapts as it was meta-trained (MAML by
gradient steps at the chosen rate, ALPACA by its closed-form posterior), and the
prediction is the weighted mean of the members'. Its adapted parameters are one dict, the
members' under ``member<i>.`` prefixes, so that everything that reads a dict of tensors
(the divergence check, pickling) works unchanged. It is an engine object: it builds
nothing and knows no estimator (:class:`~metafit.estimators._learners.LearnerFactory`
builds it from the members of an ensemble :class:`~metafit.persistence.MetaInit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metafit.models import MemberModules
from metafit.persistence import member_entries, member_prefix

__all__ = ["EnsembleAlgorithm", "EnsembleLearner"]


@dataclass(frozen=True)
class EnsembleAlgorithm:
    """What the estimators read of an ensemble's "algorithm": its name (the members'
    joined by ``+``), whether ``fit``'s rate and steps matter (to any member), and the
    members' warnings about a step count."""

    members: tuple

    @property
    def name(self) -> str:
        return "+".join(a.name for a in self.members)

    @property
    def uses_inner_lr(self) -> bool:
        return any(a.uses_inner_lr for a in self.members)

    @property
    def uses_inner_steps(self) -> bool:
        return any(a.uses_inner_steps for a in self.members)

    #: an ensemble is not one posterior: nothing reads it as such
    closed_form = False

    def fit_warning(self, fit_steps: int, trained_steps: int | None) -> str | None:
        for algorithm in self.members:
            message = algorithm.fit_warning(fit_steps, trained_steps)
            if message:
                return message
        return None


class EnsembleLearner:
    """Members adapted to the same support rows; predictions averaged with ``weights``.

    Parameters
    ----------
    members : sequence of MetaLearner
        Learners built from the members' initializations (same features and outputs).
    weights : sequence of float
        One per member, summing to 1.
    """

    def __init__(self, members: Sequence, weights: Sequence[float]):
        if len(members) != len(weights) or not members:
            raise ValueError("an ensemble needs one weight per member, and a member.")
        self.members = list(members)
        self.weights = [float(w) for w in weights]
        self.module = MemberModules([m.module for m in self.members])
        self.algorithm = EnsembleAlgorithm(tuple(m.algorithm for m in self.members))

    def as_tensors(self, X, y=None) -> tuple[Tensor, Tensor | None]:
        return self.members[0].as_tensors(X, y)

    @staticmethod
    def last_step(steps: int) -> int:
        """The step count itself: each member maps it to its own forward in
        :meth:`predict`."""
        return int(steps)

    def adapt(self, X: Tensor, y: Tensor, *, steps: int | None = None,
              inner_lr: float | None = None, track_graph: bool = False, **kwargs
              ) -> dict[str, Tensor]:
        """Every member's adaptation (the rate and steps go to those that read them),
        as one dict of prefixed tensors. The members compute what their mean prediction
        reads, nothing for a predictive distribution, which an ensemble has not."""
        out = {}
        kwargs["predictive"] = False
        for i, member in enumerate(self.members):
            params = member.adapt(X, y, steps=steps, inner_lr=inner_lr,
                                  track_graph=track_graph, **kwargs)
            out.update({member_prefix(i) + k: v for k, v in params.items()})
        return out

    @torch.no_grad()
    def predict(self, params: dict, X: Tensor, step: int | None = None) -> Tensor:
        """The weighted mean of the members' outputs; ``step`` is the step count that
        :meth:`adapt` ran (see :meth:`last_step`)."""
        total = None
        for i, (member, weight) in enumerate(zip(self.members, self.weights)):
            own = None if step is None else member.last_step(step)
            out = weight * member.predict(member_entries(params, i), X, step=own)
            total = out if total is None else total + out
        return total

    def predict_distribution(self, params: dict, X: Tensor):
        """Not defined: a mean of predictions is not one predictive distribution."""
        raise NotImplementedError(
            f"an ensemble of {self.algorithm.name}, whose mean prediction has no one "
            "predictive distribution"
        )
