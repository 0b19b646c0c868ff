"""Errors the command line reports as one line with exit code 2 (bad usage or bad input), and numerical guards."""

from __future__ import annotations

__all__ = ["UsageError", "IllConditionedWarning", "require_finite"]


class UsageError(ValueError):
    """Bad usage or bad input: the CLI prints the message on one line and exits with code 2."""


class IllConditionedWarning(UserWarning):
    """A least-squares fit is nearly singular; the message says which option to change."""


def require_finite(x, where: str) -> None:
    """Stop with a message naming ``where`` (the block) when ``x`` holds NaN or Inf: one check per call."""
    if not bool(x.isfinite().all()):
        raise UsageError(
            f"{where}: NaN or Inf values (the model overflows in this dtype or its weights are broken; "
            "try --dtype float32 or float64)"
        )
