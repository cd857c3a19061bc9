"""The ``metafit`` command line (also ``python -m metafit``).

Subcommands::

    metafit meta-fit CONFIG -o init.safetensors     meta-train, save the initialization
    metafit tune CONFIG [--storage URL] [--study-name NAME] [--n-trials N] [--timeout S]
    metafit evaluate CONFIG --init FILE             score on the config's test tasks
    metafit report [--storage URL] [--study-name NAME] -o DIR     plots of a study
    metafit best [--storage URL] [--study-name NAME]              best trial of a study

The storage comes from ``--storage``, else ``$METAFIT_STORAGE``, else the config's
``tune.storage``, else ``sqlite:///metafit.db`` in the working directory. Errors in the
config or the arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_STORAGE = "sqlite:///metafit.db"
ENV_STORAGE = "METAFIT_STORAGE"


class UsageError(ValueError):
    """Bad arguments or config: reported on one line, exit status 2."""


def _storage_url(args, config=None) -> str:
    return (
        args.storage
        or os.environ.get(ENV_STORAGE)
        or (config.tune.get("storage") if config is not None else None)
        or DEFAULT_STORAGE
    )


def _open_storage(url: str, **kwargs):
    from metafit.storage import make_storage

    try:
        return make_storage(url, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _load(path):
    from metafit.config import load_config

    return load_config(path)


def _metric(estimator_type: str) -> str:
    return "query accuracy" if estimator_type == "classifier" else "query MSE"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _params_line(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


# ----------------------------------------------------------------------------- meta-fit


def _cmd_meta_fit(args) -> int:
    from metafit.tuning import evaluate

    config = _load(args.config)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise UsageError(f"--output: directory {out.parent} does not exist")
    splits = config.build_tasks()
    est = config.build_estimator(**_verbose(config))
    n = est.get_params()["meta_iterations"]
    from metafit.distributed import is_main_process

    rank0 = is_main_process()  # under torchrun, rank 0 alone reports and writes the file
    if rank0:
        print(f"meta-training {type(est).__name__} ({est.algorithm}) for {n} iterations ...")
    start = time.perf_counter()
    est.meta_fit(splits.train, splits.validation)
    took = time.perf_counter() - start
    if not rank0:
        return 0
    est.save_meta_init(out)
    score = evaluate(est, splits.validation)
    print(
        f"done in {took:.1f} s; validation {_metric(config.estimator_type)} "
        f"{_fmt(score)} over {len(splits.validation)} tasks; saved {out}"
    )
    return 0


def _verbose(config) -> dict:
    # Progress bars on in the command line unless the config decides.
    return {} if "verbose" in config.estimator.get("params", {}) else {"verbose": 1}


# ----------------------------------------------------------------------------- tune


def _cmd_tune(args) -> int:
    import optuna

    from metafit.tuning import tune

    config = _load(args.config)
    t = config.tune
    mode = args.mode or t.get("mode", "adaptation")
    heartbeat = args.heartbeat if args.heartbeat is not None else t.get("heartbeat_interval")
    storage = _open_storage(
        _storage_url(args, config),
        heartbeat_interval=heartbeat,
        grace_period=args.grace_period or t.get("grace_period"),
        max_retry=t.get("max_retry", 3),
    )
    study_name = args.study_name or t.get("study_name") or Path(args.config).stem
    n_trials = args.n_trials if args.n_trials is not None else t.get("n_trials")
    timeout = args.timeout if args.timeout is not None else t.get("timeout")
    if n_trials is None and timeout is None:
        n_trials = 20
    if args.init is not None and not Path(args.init).is_file():
        raise UsageError(f"--init: file not found: {args.init}")
    splits = config.build_tasks()
    est = config.build_estimator(meta_init=args.init, **_verbose(config))
    if "on_interrupt" in est.get_params():
        est.set_params(on_interrupt="raise")  # Ctrl-C ends the command
    if mode == "adaptation" and args.init is None:
        n = est.get_params()["meta_iterations"]
        print(f"meta-training the initialization ({n} iterations) ...", flush=True)
        start = time.perf_counter()
        est.meta_fit(splits.train)
        print(f"meta-trained in {time.perf_counter() - start:.1f} s", flush=True)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    budget = f"{n_trials} trials" if n_trials else "until timeout"
    if n_trials and timeout:
        budget += f", timeout {timeout:g} s"
    print(
        f"tuning study {study_name!r} ({mode} mode, {budget}) on "
        f"{len(splits.validation)} validation tasks",
        flush=True,
    )
    study = tune(
        est,
        splits.train,
        validation_tasks=splits.validation,
        n_trials=n_trials,
        timeout=timeout,
        storage=storage,
        study_name=study_name,
        search_space=config.search_space,
        sampler=config.make_sampler(seed=args.seed),
        pruner=config.make_pruner(),
        n_jobs=args.n_jobs or t.get("n_jobs", 1),
        mode=mode,
        evaluate_defaults=True,
    )
    _print_best(study, config.estimator_type)
    return 0


def _print_best(study, estimator_type: str | None = None) -> None:
    from optuna.trial import TrialState

    metric = study.user_attrs.get("metafit_metric")
    if estimator_type is None:
        estimator_type = "classifier" if metric == "accuracy" else "regressor"
    counts = {s: 0 for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    for tr in study.get_trials(deepcopy=False):
        counts[tr.state.name] = counts.get(tr.state.name, 0) + 1
    print(
        f"study {study.study_name!r}: "
        + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    )
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print("no completed trial yet")
        return
    best = study.best_trial
    name = _metric(estimator_type)
    print(f"best trial #{best.number}: {name} {_fmt(best.value)}")
    print(f"best parameters: {_params_line(best.params)}")
    default = study.user_attrs.get("metafit_default_value")
    dparams = study.user_attrs.get("metafit_default_params") or {}
    if default is None:
        return
    label = f"defaults ({_params_line(dparams)})" if dparams else "defaults"
    if estimator_type == "classifier":
        gain = 100 * (best.value - default)
        verdict = f"the best parameters gain {gain:+.1f} points"
        better = gain > 0
    elif default > 0 and math.isfinite(default):
        change = 100 * (default - best.value) / default
        word = "lower" if change >= 0 else "higher"
        verdict = f"the best parameters are {abs(change):.1f}% {word}"
        better = change > 0
    else:
        return
    print(f"{label}: {name} {_fmt(default)}; {verdict}")
    if not better:
        print("no trial beat the defaults yet: run more trials or widen the search space")


# ----------------------------------------------------------------------------- evaluate


def _cmd_evaluate(args) -> int:
    from metafit.tuning import evaluate, to_estimator_params

    config = _load(args.config)
    if not Path(args.init).is_file():
        raise UsageError(f"--init: file not found: {args.init}")
    splits = config.build_tasks()
    est = config.build_estimator(meta_init=args.init)
    overrides = {}
    if args.study_name:
        study = _load_study(args, config)
        if study.user_attrs.get("metafit_mode", "adaptation") != "adaptation":
            raise UsageError(
                f"study {study.study_name!r} tuned meta-training; meta-fit with its best "
                "parameters first (metafit best shows them)"
            )
        overrides = to_estimator_params(study.best_params, est)
    for item in args.param or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--param {item!r}: write KEY=VALUE, e.g. --param inner_steps=10")
        overrides[key] = _parse_value(value)
    name = _metric(config.estimator_type)
    split = splits.test if args.split == "test" else splits.validation
    base = evaluate(est, split)
    print(f"{args.split} {name} over {len(split)} tasks: {_fmt(base)} ({_params_line(_own(est))})")
    if overrides:
        try:
            est.set_params(**overrides)
        except ValueError as exc:
            raise UsageError(f"--param: {exc}") from None
        tuned = evaluate(est, split)
        print(f"{args.split} {name} with {_params_line(overrides)}: {_fmt(tuned)}")
    return 0


def _own(est) -> dict:
    p = est.get_params()
    return {"inner_lr": p["inner_lr"], "inner_steps": p["inner_steps"]}


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# ----------------------------------------------------------------------------- study tools


def _load_study(args, config=None):
    import optuna

    from metafit.storage import journal_path

    url = _storage_url(args, config)
    local = url[len("sqlite:///"):] if url.startswith("sqlite:///") else journal_path(url)
    if local and not Path(local).expanduser().is_file():
        raise UsageError(f"storage {url}: file {local} does not exist (no study was run there)")
    storage = _open_storage(url)
    names = optuna.get_all_study_names(storage)
    found = ", ".join(names) if names else "none"
    name = args.study_name
    if name is None:
        if len(names) != 1:
            raise UsageError(
                f"--study-name is required: storage {url} holds {len(names)} "
                f"studies ({found})"
            )
        name = names[0]
    if name not in names:
        raise UsageError(
            f"--study-name: no study {name!r} in {url} (studies: {found})"
        )
    return optuna.load_study(study_name=name, storage=storage)


def _cmd_best(args) -> int:
    study = _load_study(args)
    if args.json:
        from optuna.trial import TrialState

        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = study.best_trial if done else None
        print(json.dumps({
            "study_name": study.study_name,
            "direction": study.direction.name.lower(),
            "n_trials": len(study.trials),
            "best_trial": None if best is None else best.number,
            "best_value": None if best is None else best.value,
            "best_params": None if best is None else best.params,
            "default_value": study.user_attrs.get("metafit_default_value"),
            "default_params": study.user_attrs.get("metafit_default_params"),
        }, indent=2))
        return 0
    _print_best(study)
    return 0


def _cmd_report(args) -> int:
    study = _load_study(args)
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output: cannot create {out}: {exc.strerror}") from None
    written, skipped = write_report(study, out)
    for path in written:
        print(f"wrote {path}")
    for why in skipped:
        print(f"skipped {why}")
    return 0 if written else 1


_PLOTS = (
    ("optimization_history", "plot_optimization_history"),
    ("param_importances", "plot_param_importances"),
    ("slice", "plot_slice"),
    ("intermediate_values", "plot_intermediate_values"),
)


def write_report(study, out: Path) -> tuple[list[Path], list[str]]:
    """Write a study's plots into ``out``: PNGs (matplotlib), plus HTML when plotly is there.

    Returns
    -------
    written : list of Path
    skipped : list of str
        One reason per plot that could not be drawn (e.g. too few trials).
    """
    import warnings

    from optuna.trial import TrialState

    written: list[Path] = []
    skipped: list[str] = []
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return written, [f"all plots: study {study.study_name!r} has no completed trial"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        ovm = None
        skipped.append("PNG plots: matplotlib is not installed (pip install 'metafit[plot]')")
    try:
        import plotly  # noqa: F401
        from optuna import visualization as ovp
    except ImportError:
        ovp = None
    has_intermediate = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
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
                    axes = getattr(ovm, func)(study)
                    first = axes.flat[0] if hasattr(axes, "flat") else axes
                    fig = first.get_figure()
                    if name == "slice":  # one panel per parameter, plus a colorbar
                        n = len(getattr(axes, "flat", [axes]))
                        fig.set_size_inches(max(6.4, 3.6 * n + 1.5), 4.8)
                    path = out / f"{name}.png"
                    fig.savefig(path, dpi=100, bbox_inches="tight")
                    plt.close(fig)
                    written.append(path)
                if ovp is not None:
                    path = out / f"{name}.html"
                    getattr(ovp, func)(study).write_html(str(path), include_plotlyjs="cdn")
                    written.append(path)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                skipped.append(f"{name}: {exc}")
    return written, skipped


# ----------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``metafit``."""
    from metafit import __version__

    parser = argparse.ArgumentParser(
        prog="metafit",
        description="Meta-learn initializations and tune them with Optuna.",
    )
    parser.add_argument("--version", action="version", version=f"metafit {__version__}")
    parser.add_argument(
        "--threads", type=_positive_int, default=None,
        help="torch CPU threads (default: $METAFIT_THREADS, else 1: the small networks of "
        "meta-learning run fastest single-threaded; raise it for conv nets on idle cores)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    storage_help = (
        f"Optuna storage: sqlite:///file.db, postgresql://user:pass@host/db or "
        f"journal:./file.log (default: ${ENV_STORAGE}, then the config's tune.storage, "
        f"then {DEFAULT_STORAGE})"
    )

    p = sub.add_parser("meta-fit", help="meta-train and save the initialization")
    p.add_argument("config", help="YAML or TOML config")
    p.add_argument("-o", "--output", required=True, help="file to write (.safetensors)")
    p.set_defaults(func=_cmd_meta_fit)

    p = sub.add_parser("tune", help="tune hyperparameters in a (shared) Optuna study")
    p.add_argument("config", help="YAML or TOML config")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--study-name", help="study to create or resume (default: the config's "
                   "tune.study_name, else the config file's name)")
    p.add_argument("--n-trials", type=_positive_int, help="trials for this worker")
    p.add_argument("--timeout", type=_positive_float, help="stop after this many seconds")
    p.add_argument("--mode", choices=("adaptation", "meta"), help="override tune.mode")
    p.add_argument("--init", help="adapt from this saved initialization instead of "
                   "meta-training one (adaptation mode; share it between workers)")
    p.add_argument("--seed", type=int, help="sampler seed (give each worker its own)")
    p.add_argument("--n-jobs", type=_positive_int, help="threads of this worker")
    p.add_argument("--heartbeat", type=_positive_int, metavar="SECONDS",
                   help="heartbeat interval: stale trials of killed workers are failed and "
                   "retried (database storages)")
    p.add_argument("--grace-period", type=_positive_int, metavar="SECONDS",
                   help="silence after which a trial is stale (default 2x heartbeat)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("evaluate", help="score a saved initialization on the test tasks")
    p.add_argument("config", help="YAML or TOML config")
    p.add_argument("--init", required=True, help="saved initialization (meta-fit -o)")
    p.add_argument("--split", choices=("test", "validation"), default="test")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="also score with this parameter changed (repeatable)")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--study-name", help="also score with this study's best parameters")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("report", help="plot a study: history, importances, slices")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--study-name", help="study (optional when the storage holds one)")
    p.add_argument("-o", "--output", required=True, help="directory for the figures")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("best", help="print the best trial of a study")
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--study-name", help="study (optional when the storage holds one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_best)
    return parser


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is None:
        env = os.environ.get("METAFIT_THREADS", "1")
        try:
            threads = int(env)
        except ValueError:
            raise UsageError(f"METAFIT_THREADS must be an integer, got {env!r}") from None
        if threads < 1:
            raise UsageError(f"METAFIT_THREADS must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from metafit.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _set_threads(args.threads)
        return args.func(args)
    except (ConfigError, UsageError) as exc:
        print(f"metafit: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        # Raised by the library with a message that says what to fix (bad parameter
        # values, tasks that do not fit the estimator...).
        msg = str(exc).strip().splitlines()
        print(f"metafit: error: {msg[0] if msg else type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("metafit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
