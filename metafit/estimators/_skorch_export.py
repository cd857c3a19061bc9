"""Export of an estimator's network to a skorch net (``to_skorch``).

The estimator's method holds the documentation and delegates here: which weights to
export (the adapted ones after ``fit``, else the meta-learned initialization), the
refusals (an ensemble, a closed-form head), and the table's units around the network.
"""

from __future__ import annotations

import copy

from sklearn.exceptions import NotFittedError

from metafit.estimators._adaptation import fit_settings

__all__ = ["skorch_net_of"]


def skorch_net_of(est, kwargs: dict):
    """The skorch net of :meth:`MetaInitializedEstimator.to_skorch` for ``est``."""
    init = est._resolve_meta_init()
    if init is not None and init.members is not None:
        raise ValueError(
            f"to_skorch exports one network, but this initialization is an ensemble of "
            f"{init.metadata['algorithm']} (what algorithm='auto' keeps on a table), "
            "whose predictions are averaged; meta-fit with one algorithm (e.g. "
            "algorithm='maml') to export it."
        )
    fitted = hasattr(est, "adapted_params_")
    if fitted and est._learner.algorithm.closed_form:
        raise ValueError(
            f"to_skorch exports a network's weights, but {est._learner.algorithm.name}'s "
            "adaptation is a posterior over its head, which a skorch net cannot hold; "
            "export before fit to get the feature network, or keep this estimator."
        )
    if fitted:
        module = copy.deepcopy(est._learner.module)
        state = {k: v[0] for k, v in est.adapted_params_.items()}
        module.load_state_dict({**module.state_dict(), **state})
        lr = est.inner_lr_
    else:
        if init is None:
            raise NotFittedError(
                f"this {type(est).__name__} has no weights to export yet: call meta_fit "
                "or fit first (or pass meta_init)."
            )
        module = est._factory().from_init(init).module
        lr = fit_settings(est, init)[0]
    prep = est._preprocessing_for(init)
    if prep is not None:  # a table's network works in standardized units
        module = prep.in_table_units(module)
    kwargs = {"device": str(est.device), **kwargs}
    return est._target.skorch_net(module, kwargs, lr)
