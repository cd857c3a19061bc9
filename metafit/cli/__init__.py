"""The ``metafit`` command line (also ``python -m metafit``).

The command-line wing, on top of everything: the subcommands (:mod:`._commands`, one
class each) read a config (:mod:`.config`, with the task sources of :mod:`._sources`) and
call the estimators and :func:`metafit.tune`.

Subcommands::

    metafit meta-fit CONFIG -o init.safetensors     meta-train, save the initialization
    metafit tune CONFIG [--storage URL] [--study-name NAME] [--n-trials N] [--timeout S]
    metafit evaluate CONFIG --init FILE             score on the config's test tasks
    metafit report [--storage URL] [--study-name NAME] -o DIR     plots of a study
    metafit best [--storage URL] [--study-name NAME]              best trial of a study
    metafit studies [--storage URL]                                the studies of a storage

The storage comes from ``--storage``, else ``$METAFIT_STORAGE``, else the config's
``tune.storage``, else ``sqlite:///metafit.db`` in the working directory. Global options
(``--threads``, ``-v``/``-q``, ``--log-level``) go before or after the subcommand. Errors
in the config or the arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from metafit.cli._base import (
    DEFAULT_STORAGE,
    ENV_STORAGE,
    check_threads,
    global_flags,
    log_level,
)
from metafit.cli._base import storage_flags as _storage_flags
from metafit.cli._commands import COMMANDS
from metafit.cli._errors import ConfigError, UsageError

__all__ = ["DEFAULT_STORAGE", "ENV_STORAGE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``metafit``."""
    from metafit._version import __version__

    parser = argparse.ArgumentParser(
        prog="metafit",
        description="Meta-learn initializations and tune them with Optuna.",
        parents=[global_flags(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"metafit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parents = {"storage": _storage_flags()}
    for cls in COMMANDS:
        command = cls()
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=(cls.__doc__ or command.help).strip(),
            parents=[global_flags(suppress=True), *(parents[n] for n in cls.parents)],
        )
        command.add_arguments(p)
        p.set_defaults(func=command.take_action)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and systemd send), handled like Ctrl-C: Optuna fails
    the running trial, ``meta_fit`` keeps its best state, the command says so."""


_terminated = False


def _on_sigterm(signum, frame):
    global _terminated
    _terminated = True  # meta_fit re-raises a plain KeyboardInterrupt after keeping state
    from metafit.tuning._objectives import request_interrupt

    # Between two trials of a study, raising now could leave the trial Optuna just
    # created RUNNING forever: the next trial's objective raises instead.
    if not request_interrupt(Terminated):
        raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (130 after Ctrl-C, 143 after
    SIGTERM, 2 for a usage or config error, 1 for an error while running)."""
    import signal
    import threading

    global _terminated
    _terminated = False
    parser = build_parser()
    args = parser.parse_args(argv)
    level = log_level(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("metafit").setLevel(level)
    args.log_level_value = level
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = _dispatch(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if _terminated and code == 0:
        # meta-fit keeps and saves the best state on SIGTERM, then ends here, not with 0
        print("metafit: terminated (SIGTERM) after saving what was done", file=sys.stderr)
        return 143
    return code


def _dispatch(args) -> int:
    import torch

    try:
        torch.set_num_threads(check_threads(args.threads))
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
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated) or _terminated:
            print(
                "metafit: terminated (SIGTERM); the running trial was marked failed and "
                "the study keeps every finished trial: run the same command again to "
                "continue",
                file=sys.stderr,
            )
            return 143
        print("metafit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
