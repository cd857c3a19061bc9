"""What every ``metafit`` subcommand shares: the command class, shared flags, precedence.

Each subcommand is a :class:`Command` (the model is Optuna's ``optuna/cli.py``): a name,
a help line, :meth:`Command.add_arguments` and :meth:`Command.take_action`. Flags that
several commands take are declared once, in the parent parsers of :func:`storage_flags`
and :func:`global_flags`. Where a value can come from a flag, the config or a default,
:func:`resolve` is the one rule: the flag wins, then the config, then the default.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, ClassVar

from metafit.cli._errors import UsageError

__all__ = [
    "DEFAULT_STORAGE",
    "ENV_STORAGE",
    "Command",
    "explicit_threads",
    "log_level",
    "global_flags",
    "resolve",
    "storage_flags",
    "storage_url",
]

DEFAULT_STORAGE = "sqlite:///metafit.db"
ENV_STORAGE = "METAFIT_STORAGE"


def resolve(flag: Any, config_value: Any = None, default: Any = None) -> Any:
    """The value of a setting: the flag if given, else the config's, else ``default``.

    "Given" means not None: a flag of 0 or an empty string still wins.
    """
    if flag is not None:
        return flag
    if config_value is not None:
        return config_value
    return default


def storage_url(args, config=None) -> str:
    """``--storage``, else ``$METAFIT_STORAGE``, else the config's ``tune.storage``, else the
    default SQLite file in the working directory."""
    env = os.environ.get(ENV_STORAGE) or None
    flag = resolve(getattr(args, "storage", None), env)
    return resolve(flag, config.tune.get("storage") if config is not None else None,
                   DEFAULT_STORAGE)


class Command:
    """A subcommand: subclasses set ``name`` and ``help`` and implement the two hooks."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    #: parent parsers whose flags the command takes (see :func:`storage_flags`)
    parents: ClassVar[tuple[str, ...]] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the command's own arguments."""

    def take_action(self, args: argparse.Namespace) -> int:
        """Run the command; return the exit status."""
        raise NotImplementedError


def int_at_least(low: int):
    """An argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    parse.__name__ = f"int_at_least_{low}"  # argparse names the type in some errors
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def storage_flags() -> argparse.ArgumentParser:
    """``--storage`` and ``--study-name``, for the commands that open a study."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--storage",
        help=f"Optuna storage: sqlite:///file.db, postgresql://user:pass@host/db or "
        f"journal:./file.log (default: ${ENV_STORAGE}, then the config's tune.storage, "
        f"then {DEFAULT_STORAGE})",
    )
    parent.add_argument(
        "--study-name", help="the study (optional when the storage holds exactly one)"
    )
    return parent


def global_flags(suppress: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the subcommand's name.

    ``suppress`` leaves them out of the namespace when not given (the subcommand's copy),
    so that a value given before the subcommand is not reset by its default.
    """
    default = argparse.SUPPRESS if suppress else None
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--threads", type=positive_int, default=default,
        help="torch CPU threads (default: $METAFIT_THREADS, else each estimator's choice: "
        "1 for MLPs, every core for conv nets; see benchmarks/threads.py)",
    )
    parent.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS if suppress else 0,
        help="more messages: -v shows metafit's and Optuna's INFO log, -vv DEBUG",
    )
    parent.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
        help="errors only: no per-trial log lines",
    )
    parent.add_argument(
        "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
        default=default, help="log level of the metafit and optuna loggers (overrides -v/-q)",
    )
    return parent


def log_level(args) -> int:
    """The logging level of ``--log-level``, else ``-q`` (ERROR), ``-v`` (INFO), ``-vv``
    (DEBUG), else WARNING."""
    import logging

    if getattr(args, "log_level", None):
        return getattr(logging, args.log_level)
    if getattr(args, "quiet", False):
        return logging.ERROR
    verbose = getattr(args, "verbose", 0) or 0
    return logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING


def explicit_threads(threads: int | None) -> int | None:
    """The thread count the user asked for: ``--threads``, else ``$METAFIT_THREADS``, else
    None (let each estimator choose)."""
    if threads is not None or not os.environ.get("METAFIT_THREADS"):
        return threads
    return check_threads(None)


def check_threads(threads: int | None) -> int:
    """The thread count of ``--threads``, else ``$METAFIT_THREADS``, else 1."""
    if threads is not None:
        return threads
    env = os.environ.get("METAFIT_THREADS", "1")
    try:
        value = int(env)
    except ValueError:
        raise UsageError(f"METAFIT_THREADS must be an integer, got {env!r}") from None
    if value < 1:
        raise UsageError(f"METAFIT_THREADS must be >= 1, got {value}")
    return value


class NoInterruptTraceback:
    """A logging filter: Optuna logs a trial ended by Ctrl-C or SIGTERM with a traceback;
    keep the line, drop the traceback (metafit's own one-line message follows)."""

    def filter(self, record) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_interrupt_tracebacks() -> None:
    """Add :class:`NoInterruptTraceback` to the handlers of Optuna's logger (made by
    Optuna on first use)."""
    import logging

    import optuna

    optuna.logging.get_verbosity()  # makes sure Optuna's handler exists
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, NoInterruptTraceback) for f in handler.filters):
            handler.addFilter(NoInterruptTraceback())
