"""Optuna storages for :func:`metafit.tuning.tune` and the ``metafit`` command.

:func:`make_storage` opens a study storage from what a user writes: ``None`` (in memory),
a database URL (SQLite, PostgreSQL through psycopg 3, MySQL) or a JournalStorage file.
Database URLs are checked and normalized before Optuna sees them, and several workers
that create a fresh PostgreSQL schema at the same moment retry instead of failing.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import optuna

from metafit._checks import check_int

__all__ = ["is_database_url", "journal_path", "make_storage"]


def make_storage(
    storage,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = 3,
    read_only: bool = False,
):
    """Open an Optuna storage from a URL or path.

    Parameters
    ----------
    storage : None, str, path or optuna storage
        None: in memory. ``sqlite:///file.db``, ``postgresql://user:pass@host/db`` (run
        through psycopg 3) or ``mysql+pymysql://...``: Optuna's RDB storage.
        ``journal:path`` or a path ending in ``.log`` / ``.journal``: a JournalStorage file,
        shared by the processes of one machine. A storage object is returned unchanged.
    heartbeat_interval, grace_period : int, optional
        RDB storages only: each running trial writes a heartbeat every
        ``heartbeat_interval`` seconds; a trial silent for ``grace_period`` seconds (default
        ``2 * heartbeat_interval``) is marked failed by the next worker and re-queued with
        the same parameters, at most ``max_retry`` times.
    max_retry : int or None, default=3
    read_only : bool, default=False
        For commands that only read (``metafit best``, ``report``, ``studies``): never
        create or migrate a schema; a database without Optuna's tables is an error.

    Returns
    -------
    optuna storage or None

    Raises
    ------
    ValueError
        For an unsupported or malformed URL, a missing directory, or a database that
        cannot be opened (the message hides the password).
    """
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        if heartbeat_interval is not None and storage is None:
            raise ValueError("heartbeat_interval needs a database storage (sqlite:///...).")
        return storage
    if isinstance(storage, os.PathLike):
        storage = os.fspath(storage)
    if not isinstance(storage, str) or not storage.strip():
        raise TypeError(
            f"storage must be None, a URL string or an optuna storage; got {storage!r}."
        )
    storage = storage.strip()
    if heartbeat_interval is not None:
        check_int("heartbeat_interval", heartbeat_interval)
        check_int("grace_period", grace_period, allow=(None,))
    elif grace_period is not None:
        raise ValueError("grace_period needs heartbeat_interval as well.")

    journal = journal_path(storage)
    if read_only and journal:
        _check_exists(storage, journal)
    if journal is not None:
        if heartbeat_interval is not None:
            raise ValueError(
                f"storage {storage!r}: heartbeats need a database storage (sqlite:/// or "
                "postgresql://), not a journal file."
            )
        if not journal:
            raise ValueError("storage 'journal:' needs a file path, e.g. journal:./study.log.")
        parent = Path(journal).expanduser().resolve().parent
        if not parent.is_dir():
            raise ValueError(f"storage {storage!r}: directory {parent} does not exist.")
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(Path(journal).expanduser())))
    return _rdb_storage(storage, heartbeat_interval, grace_period, max_retry, read_only)


def is_database_url(storage) -> bool:
    """Whether ``storage`` is a URL of Optuna's RDB storage (SQLite, PostgreSQL, MySQL)."""
    return (
        isinstance(storage, str) and "://" in storage and journal_path(storage.strip()) is None
    )


def journal_path(storage: str) -> str | None:
    """The file of a JournalStorage spelling, or None for anything else.

    ``journal:path``, ``journal://path`` and a bare path ending in ``.log`` or ``.journal``
    name a journal file; the path is returned as written (it may be empty).
    """
    if storage.startswith("journal:"):
        path = storage[len("journal:") :]
        return path[2:] if path.startswith("//") else path
    if "://" not in storage and storage.endswith((".log", ".journal")):
        return storage
    return None


def _normalize_url(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if "://" not in url:
        raise ValueError(
            f"storage {url!r} is neither a database URL (sqlite:///metafit.db, "
            "postgresql://user:pass@host/db) nor a journal file (journal:./study.log)."
        )
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"storage {url!r} is not a valid database URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "postgres":  # Heroku-style spelling SQLAlchemy does not accept
        parsed = parsed.set(drivername="postgresql")
        backend = "postgresql"
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise ValueError(
            f"storage {url!r}: unsupported database {backend!r}; use sqlite:///file.db, "
            "postgresql://user:pass@host/db or journal:./file.log."
        )
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # SQLAlchemy 2.0 maps the bare scheme to psycopg2, 2.1 to psycopg 3; pin psycopg 3,
        # the driver of metafit[postgres].
        parsed = parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and parsed.query:
        raise ValueError(
            f"storage {url!r}: options after '?' ({', '.join(sorted(parsed.query))}) are "
            "not used by metafit's SQLite storage and would be silently ignored; remove them."
        )
    if backend == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise ValueError(
                f"storage {url!r}: an in-memory SQLite database cannot be shared; give a "
                "file (sqlite:///metafit.db) or pass storage=None."
            )
        parent = Path(db).expanduser().resolve().parent
        if not parent.is_dir():
            raise ValueError(f"storage {url!r}: directory {parent} does not exist.")
    return parsed


def _rdb_storage(url, heartbeat_interval, grace_period, max_retry, read_only=False):
    from sqlalchemy.exc import SQLAlchemyError

    parsed = _normalize_url(url)
    shown = parsed.render_as_string(hide_password=True)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() != "sqlite":
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    else:
        # Many workers on one file: wait for a lock instead of failing at once, and let
        # readers go on while one worker writes (WAL, a property of the file).
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        if read_only:
            _check_exists(url, parsed.database)
        else:
            _sqlite_wal(parsed.database)
    if read_only:
        kwargs["skip_table_creation"] = True
        kwargs["skip_compatibility_check"] = True
    if heartbeat_interval is not None:
        kwargs["heartbeat_interval"] = heartbeat_interval
        kwargs["grace_period"] = grace_period or 2 * heartbeat_interval
    try:
        with warnings.catch_warnings():
            # Heartbeats are "experimental" in Optuna since 2.8; metafit relies on them.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if "heartbeat_interval" in kwargs:
                retry = getattr(
                    optuna.storages, "RetryHeartbeatStaleTrialCallback", None
                ) or optuna.storages.RetryFailedTrialCallback
                key = (
                    "heartbeat_stale_trial_callback"
                    if retry is not optuna.storages.RetryFailedTrialCallback
                    else "failed_trial_callback"
                )
                kwargs[key] = retry(max_retry=max_retry)
            full = parsed.render_as_string(hide_password=False)
            if read_only:  # before Optuna's storage, which writes its version table
                _check_optuna_schema(full, kwargs.get("engine_kwargs", {}), shown)
            return _create_rdb_storage(full, kwargs)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"storage {shown}: the database driver is not installed ({exc.name}); for "
            "PostgreSQL: pip install 'metafit[postgres]'."
        ) from None
    except (SQLAlchemyError, OSError) as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise ValueError(
            f"cannot open storage {shown}: {first[0] if first else type(exc).__name__}"
        ) from None


def _check_exists(storage: str, path: str) -> None:
    """A reader's local storage file must exist: opening it would create an empty one."""
    if not Path(path).expanduser().is_file():
        raise ValueError(
            f"storage {storage}: file {path} does not exist (no study was run there)"
        )


def _sqlite_wal(database: str) -> None:
    """Put a SQLite file in write-ahead-log mode (once; the mode stays with the file)."""
    import sqlite3

    try:
        with sqlite3.connect(str(Path(database).expanduser()), timeout=60) as con:
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error:
        pass  # a file that refuses WAL (a network share) still works, with more waiting


def _check_optuna_schema(url: str, engine_kwargs: dict, shown: str) -> None:
    """A read-only storage must already hold Optuna's tables (looked at, not touched)."""
    from sqlalchemy import create_engine
    from sqlalchemy import inspect as sql_inspect

    engine = create_engine(url, **engine_kwargs)
    try:
        tables = set(sql_inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if not {"studies", "version_info"} <= tables:
        raise ValueError(
            f"storage {shown} holds no Optuna study (no 'studies' table); metafit did not "
            "change it. Check the URL, or run 'metafit tune' there first."
        )


def _create_rdb_storage(url: str, kwargs: dict, attempts: int = 8):
    """``RDBStorage(url)``, retried when workers race to create the schema.

    Several workers started together on a fresh PostgreSQL database all issue
    ``CREATE TABLE``; all but one can fail with a duplicate-key or already-exists error
    from the catalog. The tables exist by then, so a short jittered retry succeeds.
    """
    import random
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            # PostgreSQL reports the race as IntegrityError/ProgrammingError, SQLite as
            # OperationalError ("table ... already exists", "database is locked") or as
            # IntegrityError ("UNIQUE constraint failed: alembic_version...").
            text = str(getattr(exc, "orig", None) or exc)
            racing = any(
                words in text
                for words in ("duplicate key", "UNIQUE constraint", "already exists", "locked")
            )
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) * (1 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover
