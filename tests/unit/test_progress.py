"""Progress bars: drawn on a terminal, silent with --quiet or when stderr is not a terminal."""

from __future__ import annotations

import io

import pytest

from thoughtpatch import progress as pg


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("tty", "quiet", "shown"), [(True, False, True), (True, True, False), (False, False, False)])
def test_bars_only_on_a_terminal_without_quiet(monkeypatch, tty, quiet, shown):
    err = Tty() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    pg.set_quiet(quiet)
    try:
        with pg.progress("baking shards", 3) as step:
            for _ in range(3):
                step(1)
        with pg.spinner("loading the model"):
            pass
    finally:
        pg.set_quiet(False)
    assert ("baking shards" in err.getvalue()) is shown
    assert err.getvalue() == "" or shown
