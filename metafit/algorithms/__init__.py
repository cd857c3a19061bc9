"""Meta-learning algorithms, selected by name.

Each algorithm is a small class over the functional core; :func:`get_algorithm` maps the
``algorithm=`` string of the estimators onto one.
"""

from __future__ import annotations

from metafit.algorithms.anil import ANIL
from metafit.algorithms.base import GradientMetaAlgorithm, MetaAlgorithm
from metafit.algorithms.maml import FOMAML, MAML
from metafit.algorithms.mamlpp import MAMLPlusPlus
from metafit.algorithms.metasgd import MetaSGD
from metafit.algorithms.reptile import Reptile

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "FOMAML",
    "MAML",
    "MAMLPlusPlus",
    "GradientMetaAlgorithm",
    "MetaAlgorithm",
    "MetaSGD",
    "Reptile",
    "get_algorithm",
]

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {
    cls.name: cls for cls in (MAML, FOMAML, Reptile, ANIL, MetaSGD, MAMLPlusPlus)
}


def get_algorithm(algorithm: str | MetaAlgorithm) -> MetaAlgorithm:
    """Return an algorithm instance from its name, or ``algorithm`` itself if an instance.

    Raises
    ------
    ValueError
        If the name is unknown; the message lists the known names.
    """
    if isinstance(algorithm, MetaAlgorithm):
        return algorithm
    if isinstance(algorithm, str) and algorithm.lower() in ALGORITHMS:
        return ALGORITHMS[algorithm.lower()]()
    raise ValueError(
        f"unknown algorithm {algorithm!r}; choose one of {', '.join(sorted(ALGORITHMS))} "
        "or pass a metafit.algorithms.MetaAlgorithm instance."
    )
