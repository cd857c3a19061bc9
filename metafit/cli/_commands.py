"""The ``metafit`` subcommands, one :class:`~metafit.cli._base.Command` class each.

    metafit meta-fit CONFIG -o init.safetensors     meta-train, save the initialization
    metafit tune CONFIG [--storage URL] [--study-name NAME] [--n-trials N] [--timeout S]
    metafit evaluate CONFIG --init FILE             score on the config's test tasks
    metafit report [--storage URL] [--study-name NAME] -o DIR     plots of a study
    metafit best [--storage URL] [--study-name NAME]              best trial of a study
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from metafit.cli._base import (
    Command,
    explicit_threads,
    non_negative_int,
    positive_float,
    positive_int,
    quiet_interrupt_tracebacks,
    resolve,
    storage_url,
)
from metafit.cli._errors import UsageError

__all__ = ["COMMANDS"]


def _open_storage(url: str, **kwargs):
    from metafit.tuning.storage import make_storage

    try:
        return make_storage(url, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _load(path):
    from metafit.cli.config import load_config

    return load_config(path)


def _metric(estimator_type: str) -> str:
    from metafit.tuning import metric_name

    return metric_name("accuracy" if estimator_type == "classifier" else "mse")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _params_line(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _estimator_overrides(config, args) -> dict:
    """Overrides of the config's estimator parameters: the thread count of ``--threads`` /
    ``$METAFIT_THREADS`` when one was given (otherwise the estimator picks the fastest for
    its network)."""
    params = config.estimator.get("params", {})
    out = {}
    threads = explicit_threads(getattr(args, "threads", None))
    if threads is not None and "n_threads" not in params:
        out["n_threads"] = threads
    return out


def _summary(est, tasks) -> str:
    """``mean ± standard error`` over the tasks, and how many diverged (those are left out
    of the mean and named, instead of aborting the whole table)."""
    import numpy as np

    from metafit.tuning import score_spread, task_scores

    scores, _ = task_scores(est, tasks, stop_at_nan=False)
    finite = scores[np.isfinite(scores)]
    if not len(finite):
        return f"diverged on all {len(scores)} tasks (lower inner_lr or inner_steps)"
    mean, sem = score_spread(finite)
    text = f"{_fmt(mean)} ± {sem:.2g} (standard error)"
    if len(finite) < len(scores):
        text += f"; diverged on {len(scores) - len(finite)} of {len(scores)} tasks, left out"
    return text


def _check_search_space(space, est, mode: str) -> None:
    """The study's search space, resolved now so that an unusable one (ALPACA has nothing
    to tune in adaptation mode) is reported before the minutes of meta-training."""
    from metafit.tuning.search_space import parse_search_space

    try:
        parse_search_space(space, est, mode)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _existing_file(flag: str, path) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{flag}: file not found: {path}")


class MetaFitCommand(Command):
    """Meta-train the config's estimator and save the initialization."""

    name = "meta-fit"
    help = "meta-train and save the initialization"

    def add_arguments(self, parser):
        parser.add_argument("config", help="YAML or TOML config")
        parser.add_argument("-o", "--output", required=True, help="file to write (.safetensors)")

    def take_action(self, args) -> int:
        from metafit.distributed import is_main_process
        from metafit.tuning import evaluate

        config = _load(args.config)
        out = Path(args.output)
        if not out.parent.is_dir():
            raise UsageError(f"--output: directory {out.parent} does not exist")
        splits = config.build_tasks()
        est = config.build_estimator(**_estimator_overrides(config, args))
        n = est.get_params()["meta_iterations"]
        rank0 = is_main_process()  # under torchrun, rank 0 alone reports and writes the file
        if rank0:
            print(f"meta-training {type(est).__name__} ({est.algorithm}) for {n} iterations ...")
        start = time.perf_counter()
        try:
            est.meta_fit(splits.train, splits.validation)
        except Exception:
            # A late error (a divergence, a bad task at iteration 15) leaves the completed
            # iterations in the estimator: write them before reporting the error.
            if rank0 and hasattr(est, "meta_init_"):
                est.save_meta_init(out)
                done = est.meta_init_.metadata["iteration"]
                print(f"stopped by an error; saved the state after iteration {done} to {out}",
                      file=sys.stderr)
            raise
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


#: seconds between heartbeats of a running trial on a database storage: a worker killed by
#: kill -9 or a lost machine leaves its trial RUNNING, and the next worker fails and retries
#: it once it has been silent for twice this long. One short write a minute per worker.
DEFAULT_HEARTBEAT = 60


def _heartbeat(args, tune_section: dict, url: str) -> dict:
    """Heartbeat options for ``make_storage``: on by default for database storages
    (SQLite, PostgreSQL), off for journal files (Optuna has no heartbeats there) and when
    the flag or the config says 0."""
    from metafit.tuning.storage import is_database_url

    interval = resolve(args.heartbeat, tune_section.get("heartbeat_interval"))
    grace = resolve(args.grace_period, tune_section.get("grace_period"))
    if interval is None and is_database_url(url):
        interval = DEFAULT_HEARTBEAT
    if interval == 0:
        if grace is not None:
            raise UsageError("--grace-period needs heartbeats; drop it or set --heartbeat S.")
        interval = None
    return {"heartbeat_interval": interval, "grace_period": grace}


class TuneCommand(Command):
    """Tune hyperparameters in a study that many workers may share."""

    name = "tune"
    help = "tune hyperparameters in a (shared) Optuna study"
    parents = ("storage",)

    def add_arguments(self, parser):
        parser.add_argument("config", help="YAML or TOML config")
        parser.add_argument("--n-trials", type=positive_int, help="trials for this worker")
        parser.add_argument("--timeout", type=positive_float, help="stop after this many seconds")
        parser.add_argument("--mode", choices=("adaptation", "meta"), help="override tune.mode")
        parser.add_argument("--init", help="adapt from this saved initialization instead of "
                            "meta-training one (adaptation mode; share it between workers)")
        parser.add_argument("--seed", type=int, help="sampler seed (give each worker its own)")
        parser.add_argument("--n-jobs", type=positive_int, help="threads of this worker")
        parser.add_argument("--heartbeat", type=non_negative_int, metavar="SECONDS",
                            help="heartbeat interval: stale trials of killed workers are failed "
                            f"and retried (database storages; default {DEFAULT_HEARTBEAT}, "
                            "0 turns heartbeats off)")
        parser.add_argument("--grace-period", type=positive_int, metavar="SECONDS",
                            help="silence after which a trial is stale (default 2x heartbeat)")

    def take_action(self, args) -> int:
        from metafit.tuning import tune

        config = _load(args.config)
        t = config.tune
        mode = resolve(args.mode, t.get("mode"), "adaptation")
        url = storage_url(args, config)
        storage = _open_storage(url, max_retry=t.get("max_retry", 3), **_heartbeat(args, t, url))
        study_name = resolve(args.study_name, t.get("study_name"), Path(args.config).stem)
        n_trials = resolve(args.n_trials, t.get("n_trials"))
        timeout = resolve(args.timeout, t.get("timeout"))
        if n_trials is None and timeout is None:
            n_trials = 20
        init = resolve(args.init, config.meta_init)
        _existing_file("--init" if args.init else "estimator.params.meta_init", init)
        splits = config.build_tasks()
        est = config.build_estimator(meta_init=init, **_estimator_overrides(config, args))
        if "on_interrupt" in est.get_params():
            est.set_params(on_interrupt="raise")  # Ctrl-C ends the command
        if mode == "adaptation" and init is None:
            _check_search_space(config.search_space, est, mode)  # before meta-training
            self._meta_fit(est, splits)
        self._announce(study_name, mode, n_trials, timeout, len(splits.validation),
                       getattr(args, "log_level_value", 30))
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
            n_jobs=resolve(args.n_jobs, t.get("n_jobs"), 1),
            mode=mode,
            evaluate_defaults=True,
        )
        _print_best(study, config.estimator_type)
        return 0

    @staticmethod
    def _meta_fit(est, splits) -> None:
        n = est.get_params()["meta_iterations"]
        print(f"meta-training the initialization ({n} iterations) ...", flush=True)
        start = time.perf_counter()
        est.meta_fit(splits.train)
        print(f"meta-trained in {time.perf_counter() - start:.1f} s", flush=True)

    @staticmethod
    def _announce(study_name, mode, n_trials, timeout, n_validation, level) -> None:
        import logging

        import optuna

        # one log line per trial by default; -q silences them, -vv shows Optuna's debug
        optuna.logging.set_verbosity(min(level, logging.INFO) if level < logging.ERROR
                                     else logging.ERROR)
        quiet_interrupt_tracebacks()
        budget = f"{n_trials} trials" if n_trials else "until timeout"
        if n_trials and timeout:
            budget += f", timeout {timeout:g} s"
        print(
            f"tuning study {study_name!r} ({mode} mode, {budget}) on "
            f"{n_validation} validation tasks",
            flush=True,
        )


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


class EvaluateCommand(Command):
    """Score a saved initialization on the config's test (or validation) tasks."""

    name = "evaluate"
    help = "score a saved initialization on the test tasks"
    parents = ("storage",)

    def add_arguments(self, parser):
        parser.add_argument("config", help="YAML or TOML config")
        parser.add_argument("--init", required=True, help="saved initialization (meta-fit -o)")
        parser.add_argument("--split", choices=("test", "validation"), default="test",
                            help="which held-out tasks of the config to score (default test)")
        parser.add_argument("--param", action="append", metavar="KEY=VALUE",
                            help="also score with this parameter changed; repeat it for "
                            "several (--param inner_steps=10 --param inner_lr=0.05)")

    def take_action(self, args) -> int:
        config = _load(args.config)
        _existing_file("--init", args.init)
        splits = config.build_tasks()
        est = config.build_estimator(meta_init=args.init)
        overrides = self._overrides(args, config, est)
        name = _metric(config.estimator_type)
        split = splits.test if args.split == "test" else splits.validation
        print(f"{args.split} {name} over {len(split)} tasks: {_summary(est, split)} "
              f"({_params_line(_own(est, split[0] if split else None))})")
        if overrides:
            try:
                est.set_params(**overrides)
            except ValueError as exc:
                raise UsageError(f"--param: {exc}") from None
            print(f"{args.split} {name} with {_params_line(overrides)}: {_summary(est, split)}")
        return 0

    @staticmethod
    def _overrides(args, config, est) -> dict:
        from metafit.tuning import to_estimator_params

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
                raise UsageError(
                    f"--param {item!r}: write KEY=VALUE, e.g. --param inner_steps=10"
                )
            overrides[key] = _parse_value(value)
        return overrides


def _own(est, task=None) -> dict:
    """The estimator's inner_lr and inner_steps; an "auto" one with the value it stands for
    (what a fit on ``task`` used), and the algorithm of the initialization."""
    from sklearn.base import clone

    p = est.get_params()
    own = {"inner_lr": p["inner_lr"], "inner_steps": p["inner_steps"]}
    if task is None or "auto" not in (own["inner_lr"], own["inner_steps"], p["algorithm"]):
        return own
    from metafit.tuning.search_space import fit_algorithm

    probe = clone(est).fit(task.X_support, task.y_support)
    algorithm = fit_algorithm(probe)  # an ensemble's: the member its rate and steps reach
    out = {"algorithm": probe.algorithm_}
    if algorithm.uses_inner_lr:
        out["inner_lr"] = own["inner_lr"] if own["inner_lr"] != "auto" else probe.inner_lr_
    if algorithm.uses_inner_steps:
        steps = own["inner_steps"]
        out["inner_steps"] = steps if steps != "auto" else probe.inner_steps_
    return out


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _open_existing_storage(url: str):
    """A storage for commands that only read (a missing file or schema is an error)."""
    return _open_storage(url, read_only=True)


def _load_study(args, config=None):
    import optuna


    url = storage_url(args, config)
    storage = _open_existing_storage(url)
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


class BestCommand(Command):
    """Print the best trial of a study."""

    name = "best"
    help = "print the best trial of a study"
    parents = ("storage",)

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def take_action(self, args) -> int:
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


class ReportCommand(Command):
    """Plot a study: history, importances, slices (PNG, and HTML with plotly)."""

    name = "report"
    help = "plot a study: history, importances, slices"
    parents = ("storage",)

    def add_arguments(self, parser):
        parser.add_argument("-o", "--output", required=True, help="directory for the figures")

    def take_action(self, args) -> int:
        from metafit.plotting import write_report

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


class StudiesCommand(Command):
    """List the studies of a storage: trials by state and the best value (read-only)."""

    name = "studies"
    help = "list the studies of a storage"
    parents = ("storage",)

    def take_action(self, args) -> int:
        import optuna
        from optuna.trial import TrialState

        url = storage_url(args)
        storage = _open_existing_storage(url)
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=True)
        if not summaries:
            print(f"no study in {url}")
            return 0
        print(f"{'study':<32} {'direction':<9} {'complete':>8} {'pruned':>6} {'fail':>5} "
              f"{'best':>10}")
        for summary in sorted(summaries, key=lambda x: x.study_name):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            states = [t.state for t in study.get_trials(deepcopy=False)]
            best = summary.best_trial.value if summary.best_trial is not None else None
            print(
                f"{summary.study_name:<32} {summary.direction.name.lower():<9} "
                f"{states.count(TrialState.COMPLETE):>8} {states.count(TrialState.PRUNED):>6} "
                f"{states.count(TrialState.FAIL):>5} {_fmt(best) if best is not None else '-':>10}"
            )
        return 0


#: The subcommands, in the order ``metafit --help`` lists them.
COMMANDS: tuple[type[Command], ...] = (
    MetaFitCommand,
    TuneCommand,
    EvaluateCommand,
    ReportCommand,
    BestCommand,
    StudiesCommand,
)
