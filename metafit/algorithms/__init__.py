"""Meta-learning algorithms, selected by name.

Each algorithm is a small class over the functional core; :func:`get_algorithm` maps the
``algorithm=`` string of the estimators onto one.
"""

from __future__ import annotations

from metafit.algorithms.alpaca import ALPACA, LinearMixedModel
from metafit.algorithms.anil import ANIL
from metafit.algorithms.base import AdaptationContext, GradientMetaAlgorithm, MetaAlgorithm
from metafit.algorithms.cavia import CAVIA
from metafit.algorithms.imaml import IMAML
from metafit.algorithms.joint import JointPretraining
from metafit.algorithms.maml import FOMAML, MAML
from metafit.algorithms.mamlpp import MAMLPlusPlus
from metafit.algorithms.metasgd import MetaSGD
from metafit.algorithms.reptile import Reptile

__all__ = [
    "ALGORITHMS",
    "ALPACA",
    "CAVIA",
    "IMAML",
    "ANIL",
    "AdaptationContext",
    "FOMAML",
    "MAML",
    "MAMLPlusPlus",
    "GradientMetaAlgorithm",
    "JointPretraining",
    "LinearMixedModel",
    "MetaAlgorithm",
    "MetaSGD",
    "Reptile",
    "get_algorithm",
]

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {
    cls.name: cls
    for cls in (
        MAML, FOMAML, Reptile, ANIL, MetaSGD, MAMLPlusPlus, ALPACA, LinearMixedModel, CAVIA,
        JointPretraining, IMAML,
    )
}


def get_algorithm(algorithm: str | MetaAlgorithm, options: dict | None = None) -> MetaAlgorithm:
    """Return an algorithm instance from its name, or ``algorithm`` itself if an instance.

    Parameters
    ----------
    algorithm : str or MetaAlgorithm
    options : dict, optional
        Constructor options of a named algorithm (what :meth:`MetaAlgorithm.get_config`
        returned, e.g. from a saved initialization).

    Raises
    ------
    ValueError
        If the name is unknown (the message lists the known names), or the options are
        not the algorithm's.
    """
    if isinstance(algorithm, MetaAlgorithm):
        return algorithm
    if isinstance(algorithm, str) and algorithm.lower() in ALGORITHMS:
        cls = ALGORITHMS[algorithm.lower()]
        try:
            return cls() if options is None else cls.from_config(dict(options))
        except TypeError as exc:
            raise ValueError(
                f"options {options!r} are not those of the {cls.name!r} algorithm: {exc}"
            ) from None
    raise ValueError(
        f"unknown algorithm {algorithm!r}; choose one of {', '.join(sorted(ALGORITHMS))} "
        "or pass a metafit.algorithms.MetaAlgorithm instance."
    )
