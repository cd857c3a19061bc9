"""metafit.plotting: each figure renders to PNG with the Agg backend and returns its Axes."""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from metafit import (  # noqa: E402
    MetaInitializedClassifier,
    MetaInitializedRegressor,
    SinusoidTasks,
    Task,
)
from metafit.plotting import (  # noqa: E402
    adaptation_curves,
    plot_adaptation,
    plot_meta_history,
    plot_predictions,
)

EVAL = SinusoidTasks(k_shot=10, random_state=2).sample(8)


@pytest.fixture(scope="module")
def est():
    return MetaInitializedRegressor(
        hidden_sizes=(20, 20),
        meta_iterations=150,
        meta_batch_size=5,
        inner_steps=1,
        validation_interval=25,
        random_state=0,
    ).meta_fit(SinusoidTasks(k_shot=10, random_state=0), SinusoidTasks(random_state=1).sample(5))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def render(ax, path):
    ax.figure.savefig(path, dpi=50)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    return data


def test_plot_meta_history(est, tmp_path):
    ax = plot_meta_history(est)
    assert isinstance(ax, matplotlib.axes.Axes)
    labels = [line.get_label() for line in ax.get_lines()]
    assert any("validation" in label for label in labels)
    assert ax.get_xlabel() == "meta-iteration"
    val_line = next(line for line in ax.get_lines() if line.get_label() == "validation loss")
    assert list(val_line.get_xdata()) == [25, 50, 75, 100, 125, 150]
    render(ax, tmp_path / "history.png")


def test_plot_meta_history_on_given_axes(est):
    fig, axs = plt.subplots(1, 2)
    assert plot_meta_history(est, axs[1]) is axs[1]
    assert not axs[0].get_lines()


def test_adaptation_curves_meta_init_adapts_best(est):
    curves = adaptation_curves(est, EVAL, steps=5, pretrain_steps=200)
    assert set(curves) == {"meta-learned", "random", "pretrained"}
    assert all(c.shape == (6,) and np.isfinite(c).all() for c in curves.values())
    # After meta-training, a few steps from the meta-init beat a few from a random init.
    assert curves["meta-learned"][5] < curves["random"][5]
    # Adaptation lowers the meta-learned loss.
    assert curves["meta-learned"][5] < curves["meta-learned"][0]


def test_adaptation_curves_are_reproducible(est):
    a = adaptation_curves(est, EVAL[:3], steps=2, pretrain_steps=20, random_state=3)
    b = adaptation_curves(est, EVAL[:3], steps=2, pretrain_steps=20, random_state=3)
    for name in a:
        np.testing.assert_allclose(a[name], b[name])


def test_plot_adaptation(est, tmp_path):
    pre = SinusoidTasks(k_shot=10, random_state=4).sample(20)
    ax = plot_adaptation(est, EVAL, steps=4, pretrain_tasks=pre, pretrain_steps=50)
    assert isinstance(ax, matplotlib.axes.Axes)
    lines = ax.get_lines()
    assert len(lines) == 3 and all(len(line.get_xdata()) == 5 for line in lines)
    assert "meta-learned (maml)" in [line.get_label() for line in lines]
    render(ax, tmp_path / "adaptation.png")


def test_plot_predictions_does_not_modify_the_estimator(est, tmp_path):
    task = EVAL[0]
    ax = plot_predictions(est, task, steps=3)
    assert isinstance(ax, matplotlib.axes.Axes)
    assert not hasattr(est, "adapted_params_")
    labels = [line.get_label() for line in ax.get_lines()]
    assert "after 3 step(s)" in labels and "support (10 points)" in labels
    before, after = (
        line for line in ax.get_lines() if line.get_label().startswith(("meta", "after"))
    )
    assert not np.allclose(before.get_ydata(), after.get_ydata())
    render(ax, tmp_path / "predictions.png")


def test_plot_predictions_rejects_non_1d_regression():
    rng = np.random.default_rng(0)
    tasks = [
        (
            rng.normal(size=(6, 3)),
            rng.permutation(np.arange(6) % 2),  # both classes in every support set
            rng.normal(size=(6, 3)),
            rng.permutation(np.arange(6) % 2),
        )
        for _ in range(4)
    ]
    clf = MetaInitializedClassifier(hidden_sizes=(4,), meta_iterations=1, meta_batch_size=2)
    clf.meta_fit(tasks)
    with pytest.raises(ValueError, match="1-D regression"):
        plot_predictions(clf, tasks[0])


def test_plots_need_a_meta_fitted_estimator():
    est = MetaInitializedRegressor()
    with pytest.raises(ValueError, match="meta_fit"):
        plot_meta_history(est)
    with pytest.raises(ValueError, match="meta_fit"):
        plot_adaptation(est, EVAL)
    with pytest.raises(ValueError, match="meta_fit"):
        plot_predictions(est, EVAL[0])


@pytest.mark.parametrize("steps, error", [(-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_steps(est, steps, error):
    with pytest.raises(error, match="steps must be an int >= 0"):
        adaptation_curves(est, EVAL, steps=steps)


def test_bad_tasks(est):
    with pytest.raises(TypeError, match="tasks"):
        adaptation_curves(est, 3)
    with pytest.raises(ValueError, match="empty"):
        adaptation_curves(est, [])


def test_missing_matplotlib_gives_a_clear_error(est, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"metafit\[plot\]"):
        plot_meta_history(est)


# ------------------------------------------------------------------ readable figures


def _legend_is_outside(ax) -> bool:
    fig = ax.get_figure()
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    return legend.x0 >= ax.get_window_extent().x1


def test_figures_have_titles_metric_labels_and_legends_off_the_data(est):
    for draw in (lambda: plot_meta_history(est), lambda: plot_adaptation(est, EVAL[:3]),
                 lambda: plot_predictions(est, EVAL[0])):
        ax = draw()
        assert ax.get_title()
        assert _legend_is_outside(ax)
    assert "MSE" in plot_meta_history(est).get_ylabel()
    assert "MSE" in plot_adaptation(est, EVAL[:3]).get_ylabel()


def test_plot_predictions_draws_the_true_sinusoid_when_known(est):
    task = EVAL[0]
    ax = plot_predictions(est, task)
    truth = next(line for line in ax.get_lines() if line.get_label() == "true function")
    x, y = truth.get_data()
    np.testing.assert_allclose(
        y, task.info["amplitude"] * np.sin(x - task.info["phase"]), rtol=1e-6, atol=1e-6
    )
    plain = type(task)(task.X_support, task.y_support, task.X_query, task.y_query)
    labels = [line.get_label() for line in plot_predictions(est, plain).get_lines()]
    assert "true function" not in labels
    labels = [line.get_label() for line in plot_predictions(
        est, plain, truth=np.cos).get_lines()]
    assert "true function" in labels


@pytest.fixture(scope="module")
def report(est, tmp_path_factory):
    import optuna

    from metafit import tune
    from metafit.plotting import write_report

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for lr in (1e-3, 1e-2, 0.1):
        study.enqueue_trial({"inner_lr": lr, "inner_steps": 2})
    tune(est, validation_tasks=EVAL[:4], n_trials=5, study=study)
    out = tmp_path_factory.mktemp("report") / "nested" / "dir"
    written, skipped = write_report(study, out)
    return out, written, skipped


def test_report_pages_work_offline_and_name_the_metric(report):
    pytest.importorskip("plotly")
    out, written, skipped = report
    pages = [p for p in written if p.suffix == ".html"]
    assert pages and (out / "plotly.min.js").is_file()
    for page in pages:
        text = page.read_text()
        assert "cdn.plot.ly" not in text and "plotly.min.js" in text
    history = (out / "optimization_history.html").read_text()
    assert "query MSE" in history


def test_report_axes_turn_logarithmic_over_two_decades():
    from types import SimpleNamespace

    from metafit.plotting import _value_axis

    def trials(*values):
        return [SimpleNamespace(value=v) for v in values]

    study = SimpleNamespace(metric_names=["query MSE"], user_attrs={})
    assert _value_axis(study, trials(0.5, 0.7, 2.0)) == ("query MSE", False)
    assert _value_axis(study, trials(0.5, 64388.0)) == ("query MSE", True)
    study = SimpleNamespace(metric_names=None, user_attrs={"metafit_metric": "accuracy"})
    assert _value_axis(study, trials(0.5, 0.9))[0] == "query accuracy"


def test_report_renders_in_headless_chromium(report, tmp_path):
    import shutil
    import subprocess

    pytest.importorskip("plotly")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from PIL import Image

    out, _, _ = report
    shot = tmp_path / "page.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=900,600",
         "--virtual-time-budget=5000", f"--screenshot={shot}",
         (out / "optimization_history.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    # a blank page (plotly.js missing) is one colour; a drawn plot has many
    assert pixels.std() > 5 and len(np.unique(pixels)) > 20


def test_plots_of_table_mode_and_closed_form_initializations():
    """Siblings of fit and predict: the plots see table mode's standardization and the
    algorithms' own adaptation, or say why they cannot draw."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 10)
    x = rng.uniform(-5, 5, size=(200, 1))
    y = 100 + 30 * np.sin(x[:, 0] + rng.normal(size=20)[groups])  # raw units
    table = MetaInitializedRegressor(algorithm="maml", hidden_sizes=(16,), meta_iterations=30,
                                     meta_batch_size=4, random_state=0, verbose=0).meta_fit(
        x, y, groups=groups)
    task = Task(x[:5], y[:5], x[5:10], y[5:10])
    curves = adaptation_curves(table, [task], steps=3, pretrain_steps=5)
    # In standardized units: a loss of order 1, not of order 30 ** 2.
    assert all(np.isfinite(v).all() and v.max() < 20 for v in curves.values())
    ax = plot_predictions(table, task, n_grid=20)
    drawn = np.concatenate([line.get_ydata() for line in ax.get_lines()])
    assert drawn.min() > 0  # predictions back in the table's units (around 100)
    plt.close("all")
    alpaca = MetaInitializedRegressor(algorithm="alpaca", hidden_sizes=(8,), meta_iterations=5,
                                      random_state=0, verbose=0)
    alpaca.meta_fit(SinusoidTasks(k_shot=5, random_state=0))
    plot_predictions(alpaca, SinusoidTasks(k_shot=5, random_state=1).sample(1)[0])
    plt.close("all")
    with pytest.raises(ValueError, match="closed form"):
        adaptation_curves(alpaca, SinusoidTasks(k_shot=5, random_state=1).sample(2))
