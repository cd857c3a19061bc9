"""Figures of meta-training and adaptation (needs matplotlib: ``pip install metafit[plot]``).

* :func:`plot_meta_history` — meta-loss and validation loss against meta-iterations;
* :func:`plot_adaptation` — query loss against inner steps from the meta-learned
  initialization, a random one and a jointly pretrained one (Finn et al. 2017, figure 3);
* :func:`plot_predictions` — a 1-D regression task: its points, and the predictions before
  and after adaptation.

Every function draws on ``ax`` (a new figure when None) and returns the Axes. matplotlib
is imported only when a function is called.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from sklearn.base import clone
from torch import nn

from metafit._atomic import atomic_path
from metafit._checks import check_int
from metafit._task_types import Task, as_task
from metafit.estimators._adaptation import fit_settings
from metafit.estimators._learners import learner_factory
from metafit.estimators._table_mode import TablePreprocessing, standardize_tasks
from metafit.learner import MetaLearner
from metafit.losses import task_losses
from metafit.persistence import MetaInit

__all__ = [
    "adaptation_curves",
    "plot_adaptation",
    "plot_meta_history",
    "plot_predictions",
    "write_report",
]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is a test dependency
        raise ImportError(
            "metafit.plotting needs matplotlib: pip install 'metafit[plot]' "
            "(or pip install matplotlib)."
        ) from exc
    return plt


def _axes(ax):
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(6, 4))
    else:
        _pyplot()
    return ax


def _meta_init(est) -> MetaInit:
    init = est._resolve_meta_init() if hasattr(est, "_resolve_meta_init") else None
    if init is None:
        raise ValueError(
            f"{type(est).__name__} has no meta-learned initialization: call meta_fit first "
            "(or construct it with meta_init=)."
        )
    return init


def _in_model_units(init: MetaInit, tasks: list[Task]) -> list[Task]:
    """Tasks as the network sees them: standardized for a table-mode initialization."""
    prep = TablePreprocessing.of(init)
    if prep is None:
        return tasks
    if prep.encoding is not None:
        raise ValueError(
            "this initialization one-hot encodes categorical columns; the adaptation curves "
            "take numeric tasks only."
        )
    return standardize_tasks(tasks, prep)


def _tasks(tasks, name: str = "tasks") -> list[Task]:
    if isinstance(tasks, Task):
        return [tasks]
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
        raise TypeError(f"{name} must be a Task or a list of Task, got {type(tasks).__name__}.")
    out = [as_task(t) for t in tasks]
    if not out:
        raise ValueError(f"{name} is empty; pass at least one task.")
    return out


def _check_steps(steps) -> int:
    return check_int("steps", steps, minimum=0)


def plot_meta_history(est, ax=None, *, log_scale: bool = True):
    """Meta-loss and validation loss against meta-iterations.

    Parameters
    ----------
    est : MetaInitializedEstimator
        After :meth:`meta_fit` (uses ``meta_history_``).
    ax : matplotlib Axes, optional
    log_scale : bool, default=True
        Logarithmic loss axis when the losses are positive and span more than 20x.

    Returns
    -------
    matplotlib.axes.Axes
    """
    history = getattr(est, "meta_history_", None)
    if not history:
        raise ValueError(
            f"{type(est).__name__} has no meta_history_: call meta_fit before plotting it."
        )
    ax = _axes(ax)
    it = np.array([r["iteration"] for r in history])
    loss = np.array([r["meta_loss"] for r in history], dtype=float)
    ax.plot(it, loss, color="C0", alpha=0.35, lw=1, label="meta-loss (meta-batch)")
    window = max(1, len(loss) // 25)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(it[window - 1 :], smooth, color="C0", lw=2, label=f"meta-loss ({window}-avg)")
    val = [(r["iteration"], r["validation_loss"]) for r in history]
    val = np.array([(i, v) for i, v in val if v is not None], dtype=float).reshape(-1, 2)
    if len(val):
        ax.plot(val[:, 0], val[:, 1], "o-", color="C1", ms=3, lw=1.5, label="validation loss")
    best = getattr(est, "meta_init_", None)
    best_it = None if best is None else best.metadata.get("best_iteration")
    if best_it is not None:
        ax.axvline(best_it, color="C1", ls=":", lw=1, label=f"kept (iteration {best_it})")
    values = np.concatenate([loss, val[:, 1]]) if len(val) else loss
    finite = values[np.isfinite(values)]
    if log_scale and len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_yscale("log")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"query {_loss_name(best)} after adaptation")
    ax.set_title(f"meta-training ({best.metadata.get('algorithm', '')})" if best else
                 "meta-training")
    _legend_outside(ax)
    return ax


def _loss_name(init) -> str:
    loss = None if init is None else init.metadata.get("loss")
    return {"mse": "MSE", "cross_entropy": "cross-entropy"}.get(loss, "loss")


def _legend_outside(ax, **kwargs) -> None:
    """The legend right of the axes, never over the data (``savefig(bbox_inches="tight")``
    and ``constrained_layout`` keep it in the picture)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def _random_module(module: nn.Module, seed: int) -> nn.Module:
    fresh = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for sub in fresh.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    return fresh


def _pretrain(module: nn.Module, tasks: list[Task], loss: str, steps: int, lr: float, seed):
    """One network trained on all tasks' examples pooled (the usual transfer baseline)."""
    X = np.concatenate([np.concatenate([t.X_support, t.X_query]) for t in tasks])
    y = np.concatenate([np.concatenate([t.y_support, t.y_query]) for t in tasks])
    param = next(module.parameters())
    Xt = torch.as_tensor(X, dtype=param.dtype, device=param.device)
    if loss == "cross_entropy":
        yt = torch.as_tensor(y, dtype=torch.long, device=param.device)
        criterion = nn.functional.cross_entropy
    else:
        yt = torch.as_tensor(y, dtype=param.dtype, device=param.device)
        yt = yt.unsqueeze(1) if yt.dim() == 1 else yt
        criterion = nn.functional.mse_loss
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    batch = min(len(Xt), 256)
    module.train()
    for _ in range(steps):
        idx = torch.randperm(len(Xt), generator=gen)[:batch].to(param.device)
        optimizer.zero_grad()
        criterion(module(Xt[idx]), yt[idx]).backward()
        optimizer.step()
    return module


def _batch_curve(learner: MetaLearner, batch, steps: int) -> list[float]:
    """Summed query loss of one batch (padded or not) after 0..steps inner steps."""

    def query_loss(params):
        with torch.no_grad():
            out = learner.forward(params, batch.X_query)
            return float(task_losses(learner.loss_fn, out, batch.y_query, batch.query_mask).sum())

    mask = batch.support_mask
    start = learner.adapt(batch.X_support, batch.y_support, steps=0, track_graph=False,
                          mask=mask)
    losses = [query_loss(start)]
    learner.adapt(
        batch.X_support,
        batch.y_support,
        steps=steps,
        track_graph=False,
        on_step=lambda step, params: losses.append(query_loss(params)),
        mask=mask,
        factored=True,
    )
    if len(losses) != steps + 1:  # pragma: no cover - on_step runs after every step
        raise RuntimeError("the inner loop did not report every step")
    return losses


def _curve(learner: MetaLearner, tasks: list[Task], steps: int) -> np.ndarray:
    """Mean query loss after 0..steps inner steps, over ``tasks``."""
    totals = np.zeros(steps + 1)
    n = 0
    for batch in learner.batches(tasks):
        losses = _batch_curve(learner, batch, steps)
        totals += np.array(losses)
        n += batch.n_tasks
    return totals / n


def adaptation_curves(
    est,
    tasks,
    steps: int = 10,
    *,
    pretrain_tasks=None,
    pretrain_steps: int = 500,
    pretrain_lr: float = 1e-3,
    random_state: int = 0,
) -> dict[str, np.ndarray]:
    """Mean query loss after 0..``steps`` inner steps from three starting points.

    Parameters
    ----------
    est : MetaInitializedEstimator
        Meta-fitted (or built with ``meta_init=``); its ``inner_lr`` and algorithm adapt
        every starting point alike. For the ensemble ``algorithm="auto"`` keeps, the
        curves are those of its member that adapts by steps (MAML).
    tasks : Task or list of Task
        Evaluation tasks: adapt on their support sets, score on their query sets.
    steps : int, default=10
    pretrain_tasks : list of Task, optional
        Tasks whose examples (support and query, pooled) train the pretrained baseline with
        Adam. Use meta-training tasks; the default pools the *support* sets of ``tasks``,
        the same examples adaptation sees.
    pretrain_steps : int, default=500
        Adam steps (mini-batches of up to 256 examples) of the pretrained baseline.
    pretrain_lr : float, default=1e-3
    random_state : int, default=0
        Seeds the random initialization and the pretraining.

    Returns
    -------
    dict
        ``{"meta-learned": array, "random": array, "pretrained": array}``, each of
        length ``steps + 1`` (entry 0 is before adaptation).
    """
    steps = _check_steps(steps)
    init = _meta_init(est).adapting_member
    tasks = _in_model_units(init, _tasks(tasks))
    factory = learner_factory(est)
    meta = factory.from_init(init)
    if meta.algorithm.closed_form:
        raise ValueError(
            f"algorithm {meta.algorithm.name!r} adapts in closed form, with no inner steps: "
            "there is no curve over steps to draw; compare metafit.tuning.evaluate scores."
        )
    meta.inner_lr = fit_settings(est, init)[0]
    if pretrain_tasks is None:
        pool = [Task(t.X_support, t.y_support, t.X_support, t.y_support) for t in tasks]
    else:
        pool = _tasks(pretrain_tasks, "pretrain_tasks")

    def learner_for(module):
        return factory.around(module, meta.algorithm, steps)

    random_module = _random_module(meta.module, random_state)
    pretrained = _pretrain(
        _random_module(meta.module, random_state),
        pool,
        meta.loss_name,
        int(pretrain_steps),
        float(pretrain_lr),
        random_state,
    )
    return {
        "meta-learned": _curve(meta, tasks, steps),
        "random": _curve(learner_for(random_module), tasks, steps),
        "pretrained": _curve(learner_for(pretrained), tasks, steps),
    }


def plot_adaptation(est, tasks, steps: int = 10, ax=None, **kwargs):
    """Query loss against inner steps: meta-learned vs random vs jointly pretrained init.

    The figure of the MAML paper: a good meta-initialization reaches a low loss in one or
    a few steps, where a random one barely moves and a network pretrained on all tasks
    pooled starts at the average function and adapts slowly. Keyword arguments go to
    :func:`adaptation_curves`.

    Returns
    -------
    matplotlib.axes.Axes
    """
    curves = adaptation_curves(est, tasks, steps, **kwargs)
    ax = _axes(ax)
    x = np.arange(len(curves["meta-learned"]))
    init = _meta_init(est).adapting_member
    algorithm = init.metadata.get("algorithm", "meta")
    styles = {
        "meta-learned": dict(color="C0", marker="o", label=f"meta-learned ({algorithm})"),
        "pretrained": dict(color="C2", marker="s", label="pretrained (all tasks pooled)"),
        "random": dict(color="C7", marker="^", label="random initialization"),
    }
    for name in ("meta-learned", "pretrained", "random"):
        ax.plot(x, curves[name], ms=4, lw=1.8, **styles[name])
    ax.set_xlabel(f"inner gradient steps (inner_lr={fit_settings(est, init)[0]:g})")
    ax.set_ylabel(f"mean query {_loss_name(init)} over {len(_tasks(tasks))} tasks")
    ax.set_xticks(x if len(x) <= 11 else x[:: max(1, len(x) // 10)])
    finite = np.concatenate([c[np.isfinite(c)] for c in curves.values()])
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 30:
        ax.set_yscale("log")
    ax.set_title("adaptation to new tasks from three initializations")
    _legend_outside(ax)
    return ax


def plot_predictions(
    est, task, ax=None, *, steps: int | None = None, n_grid: int = 200, truth=None
):
    """One 1-D regression task: its points, and predictions before and after adaptation.

    Parameters
    ----------
    est : MetaInitializedRegressor
        With a meta-learned initialization for one input and one output. It is not
        modified: adaptation runs on a copy of the initialization.
    task : Task or 4-tuple
    ax : matplotlib Axes, optional
    steps : int, optional
        Inner steps; defaults to those ``fit`` takes (``est.inner_steps``, or the count
        ``meta_fit`` chose for ``"auto"``).
    n_grid : int, default=200
        Points of the prediction curves.
    truth : callable, optional
        ``truth(x) -> y`` of the task's true function, drawn as a curve. By default the
        true curve is drawn when the task knows it (a :class:`~metafit.tasks.SinusoidTasks`
        task's ``info``).

    Returns
    -------
    matplotlib.axes.Axes
    """
    task = as_task(task)
    if truth is None and task.info.get("function") == "sinusoid":
        amplitude, phase = task.info["amplitude"], task.info["phase"]

        def truth(x):
            return amplitude * np.sin(x - phase)
    init = _meta_init(est)
    if init.metadata.get("loss", "mse") != "mse" or init.n_features != 1 or init.n_outputs != 1:
        raise ValueError(
            "plot_predictions draws 1-D regression (one feature, one output, mse loss); this "
            f"initialization has {init.n_features} feature(s) and {init.n_outputs} output(s)."
        )
    steps = fit_settings(est, init)[1] if steps is None else _check_steps(steps)
    xs_all = np.concatenate([task.X_support[:, 0], task.X_query[:, 0]])
    lo, hi = float(xs_all.min()), float(xs_all.max())
    pad = 0.05 * (hi - lo or 1.0)
    grid = np.linspace(lo - pad, hi + pad, int(n_grid), dtype=np.float32)[:, None]
    # Through the estimator itself (clones keep the initialization), so that table mode's
    # standardization and every algorithm's own adaptation apply as in fit and predict.
    y_support = np.ravel(task.y_support)
    before = clone(est).set_params(inner_steps=0).fit(task.X_support, y_support).predict(grid)
    after = clone(est).set_params(inner_steps=steps).fit(task.X_support, y_support).predict(
        grid)

    ax = _axes(ax)
    if truth is not None:
        ax.plot(grid[:, 0], truth(grid[:, 0]), "-", color="0.25", lw=1, label="true function")
    order = np.argsort(task.X_query[:, 0])
    ax.plot(
        task.X_query[order, 0],
        np.ravel(task.y_query)[order],
        ".",
        color="0.55",
        ms=5,
        label="query points (truth)",
    )
    ax.plot(grid[:, 0], before, "--", color="C1", lw=1.5, label="meta-init, before adaptation")
    ax.plot(grid[:, 0], after, "-", color="C0", lw=2, label=f"after {steps} step(s)")
    ax.plot(
        task.X_support[:, 0],
        np.ravel(task.y_support),
        "o",
        color="C3",
        ms=7,
        mec="k",
        label=f"support ({task.n_support} points)",
    )
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"a new task: {task.n_support} support points, {steps} inner step(s)")
    _legend_outside(ax, fontsize="small")
    return ax


# --------------------------------------------------------------------------- study report

_PLOTS = (
    ("optimization_history", "plot_optimization_history"),
    ("param_importances", "plot_param_importances"),
    ("slice", "plot_slice"),
    ("intermediate_values", "plot_intermediate_values"),
)


def write_report(study, out) -> tuple[list, list[str]]:
    """Write a study's plots into ``out``: PNGs (matplotlib), plus HTML when plotly is there.

    The value axes name the study's metric ("query MSE", "query accuracy") and turn
    logarithmic when the values span more than two decades. The HTML pages load
    ``plotly.min.js`` from the same folder (written there once), so they work offline.

    Returns
    -------
    written : list of Path
    skipped : list of str
        One reason per plot that could not be drawn (e.g. too few trials).
    """
    import warnings
    from pathlib import Path

    from optuna.trial import TrialState

    out = Path(out)
    written: list[Path] = []
    skipped: list[str] = []
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return written, [f"all plots: study {study.study_name!r} has no completed trial"]
    out.mkdir(parents=True, exist_ok=True)
    ovm, ovp = _optuna_backends(skipped)
    has_intermediate = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
    axis = _value_axis(study, done)
    for name, func in _PLOTS:
        if name == "intermediate_values" and not has_intermediate:
            continue
        if name == "param_importances" and (len(done) < 2 or not done[0].params):
            skipped.append(f"{name}: needs at least 2 completed trials with parameters")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if ovm is not None:
                    written.append(_write_png(ovm, func, name, study, out, axis))
                if ovp is not None:
                    written.append(_write_html(ovp, func, name, study, out, axis))
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                skipped.append(f"{name}: {exc}")
    return written, skipped


def _optuna_backends(skipped: list[str]):
    """Optuna's matplotlib and plotly visualization modules (None where not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        ovm = None
        skipped.append("PNG plots: matplotlib is not installed (pip install 'metafit[plot]')")
    try:
        import plotly  # noqa: F401
        from optuna import visualization as ovp
    except ImportError:
        ovp = None
    return ovm, ovp


def _value_axis(study, done) -> tuple[str, bool]:
    """The metric's name and whether its axis should be logarithmic."""
    from metafit.tuning import metric_name

    names = getattr(study, "metric_names", None)
    metric = study.user_attrs.get("metafit_metric")
    label = names[0] if names and names[0] else metric_name(metric)
    values = np.array([t.value for t in done], dtype=float)
    values = values[np.isfinite(values)]
    log = bool(len(values) and values.min() > 0 and values.max() / values.min() > 100)
    return label, log


_VALUE_PLOTS = ("optimization_history", "slice", "intermediate_values")


def _write_png(ovm, func, name, study, out, axis):
    import matplotlib.pyplot as plt

    axes = getattr(ovm, func)(study)
    panels = list(getattr(axes, "flat", [axes]))
    fig = panels[0].get_figure()
    if name == "slice":  # one panel per parameter, plus a colorbar
        fig.set_size_inches(max(6.4, 3.6 * len(panels) + 1.5), 4.8)
    if name in _VALUE_PLOTS:
        label, log = axis
        for panel in panels:
            panel.set_ylabel(label)
            if log:
                panel.set_yscale("log")
    path = out / f"{name}.png"
    try:
        with atomic_path(path) as tmp:  # an interrupted report leaves no half-drawn file
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _write_html(ovp, func, name, study, out, axis):
    figure = getattr(ovp, func)(study)
    if name in _VALUE_PLOTS:
        label, log = axis
        figure.update_yaxes(title_text=label, type="log" if log else None)
    path = out / f"{name}.html"
    # plotly.min.js is written once beside the pages, which then work offline (a CDN
    # link leaves them blank there).
    with atomic_path(path) as tmp:
        figure.write_html(str(tmp), include_plotlyjs="directory")
    return path
