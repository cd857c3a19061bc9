"""The command line's two error types, each reported on one line (exit status 2)."""

from __future__ import annotations

__all__ = ["ConfigError", "UsageError"]


class ConfigError(ValueError):
    """A configuration file is invalid; the message names the file and the key."""


class UsageError(ValueError):
    """Bad arguments or config: reported on one line, exit status 2."""
