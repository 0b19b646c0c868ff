"""Errors the command line reports as one line with exit code 2 (bad usage or bad input)."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad usage or bad input: the CLI prints the message on one line and exits with code 2."""
