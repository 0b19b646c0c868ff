"""The benchmark's task families keep their contract: a prompt, 48 fit and 24 held-out queries, none shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from thoughtpatch import load_probes, load_prompt

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = sorted(p for d in ("tasks", "unseen") for p in (ROOT / "benchmarks" / d).iterdir() if p.is_dir())


@pytest.mark.parametrize("task", FAMILIES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_task_family_contract(task):
    (prompt_file,) = task.glob("prompt.*")
    assert load_prompt(prompt_file).system
    fit, held = load_probes(task / "fit.txt"), load_probes(task / "heldout.txt")
    assert (len(fit), len(held)) == (48, 24)
    fit_set, held_set = {q.strip().lower() for q in fit}, {q.strip().lower() for q in held}
    assert (len(fit_set), len(held_set)) == (48, 24), "a query is repeated"
    assert not fit_set & held_set, "a held-out query is also a fit query"


def test_unseen_families_are_new():
    names = [p.name for p in FAMILIES]
    assert len(set(names)) == len(names), "a family name is in both benchmarks/tasks and benchmarks/unseen"
