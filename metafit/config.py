"""Kept import path: see :mod:`metafit.cli.config`."""

from __future__ import annotations

from metafit.cli.config import Config, ConfigError, EpochTasks, TaskSplits, load_config

__all__ = ["Config", "ConfigError", "EpochTasks", "TaskSplits", "load_config"]
