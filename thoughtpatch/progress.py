"""Progress bars on stderr (rich), shown only where a person watches: stderr is a terminal and ``--quiet``
is off. Long steps take a callback ``step(n)`` (advance by ``n``) so the modules doing the work stay I/O-free.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["set_quiet", "enabled", "progress", "spinner"]

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    """True when bars are shown: not quiet and stderr is a terminal."""
    return not _quiet and sys.stderr.isatty()


@contextmanager
def progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A bar of ``total`` steps (``None``: unknown); yields ``step(n)``, a no-op when bars are off."""
    if not enabled():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


@contextmanager
def spinner(label: str) -> Iterator[None]:
    """A spinner for a step without a count (loading or converting a model)."""
    if not enabled():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(label):
        yield
