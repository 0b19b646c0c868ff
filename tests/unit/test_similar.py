"""Model-written fit queries (``transmute --similar``): new, distinct, reproducible, recorded."""

from __future__ import annotations

import json

import torch
from conftest import run_cli

from thoughtpatch import Prompt, load_model
from thoughtpatch.patch import patch_from_bytes
from thoughtpatch.pipeline import similar_queries

QUERIES = ["the dog jumps", "a cat is lazy", "tell me a story", "1 2 3 4", "the fox please", "what is tea?"]


def test_similar_queries_are_new_distinct_and_reproducible(tiny_dir):
    lm = load_model(str(tiny_dir("llama")))
    context = Prompt("You are a pirate.").as_text()
    out = similar_queries(lm, QUERIES, 5, context, shots=3, per=4)
    assert 1 <= len(out) <= 5 and len(set(out)) == len(out)
    assert all(q.strip() == q and q and "\n" not in q and q not in QUERIES for q in out)
    assert similar_queries(lm, QUERIES, 5, context, shots=3, per=4) == out
    assert similar_queries(lm, QUERIES, 5, context, shots=3, per=4, seed=1) != out


def test_transmute_records_the_similar_queries_and_refuses_a_negative_count(tiny_dir, tmp_path):
    (tmp_path / "prompt.txt").write_text("You are a pirate. Speak like a pirate.\n")
    (tmp_path / "fit.txt").write_text("\n".join(QUERIES) + "\n")
    args = ("transmute", str(tmp_path / "prompt.txt"), "--model", str(tiny_dir("llama")), "--probes")
    args += (str(tmp_path / "fit.txt"), "--answer-tokens", "2", "--bakeable", "-q", "-o")
    r = run_cli(*args, str(tmp_path / "p.st"), "--similar", "3", "--down-rank", "2")
    assert r.returncode == 0, r.stderr.decode()
    meta = patch_from_bytes((tmp_path / "p.st").read_bytes()).meta
    assert 1 <= int(meta["probes_similar"]) <= 3 and len(meta["probes_similar_sha256"]) == 64
    r = run_cli(*args, str(tmp_path / "plain.st"), "--similar", "0", "--down-rank", "2")
    assert r.returncode == 0 and "probes_similar" not in patch_from_bytes((tmp_path / "plain.st").read_bytes()).meta
    r = run_cli(*args, str(tmp_path / "bad.st"), "--similar", "-1")
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1 and b"--similar must be >= 0" in r.stderr
    assert not (tmp_path / "bad.st").exists()
    assert json.loads(run_cli("inspect", str(tmp_path / "p.st"), "--json").stdout)["metadata"]["probes_similar"]


def test_extract_writes_the_queries_that_transmute_writes(tiny_dir, tmp_path):
    """``extract --similar N`` then ``condense --mode bakeable`` builds the patch ``transmute --bakeable`` does."""
    (tmp_path / "prompt.txt").write_text("You are a pirate. Speak like a pirate.\n")
    (tmp_path / "fit.txt").write_text("\n".join(QUERIES) + "\n")
    common = (str(tmp_path / "prompt.txt"), "--model", str(tiny_dir("llama")), "--probes", str(tmp_path / "fit.txt"))
    common += ("--answer-tokens", "2", "--similar", "3", "-q")
    r = run_cli("transmute", *common, "--bakeable", "--down-rank", "2", "-o", str(tmp_path / "t.st"))
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("extract", *common, "--json", "-o", str(tmp_path / "u.st"))
    assert r.returncode == 0, r.stderr.decode()
    summary = json.loads(r.stdout)
    assert summary["queries"] == len(QUERIES) + summary["probes_similar"] and summary["probes_similar"] >= 1
    r = run_cli(
        "condense", str(tmp_path / "u.st"), "--mode", "bakeable", "--down-rank", "2", "-q", "-o", str(tmp_path / "c.st")
    )
    assert r.returncode == 0, r.stderr.decode()
    t, c = (patch_from_bytes((tmp_path / f).read_bytes()) for f in ("t.st", "c.st"))
    assert t.meta["probes_similar_sha256"] == c.meta["probes_similar_sha256"]
    assert t.layers.keys() == c.layers.keys()
    for i, lp in t.layers.items():
        for name, x in lp.tensors().items():
            assert torch.equal(x, c.layers[i].tensors()[name]), (i, name)
    r = run_cli("extract", *common[:-3], "--similar", "-1", "-o", str(tmp_path / "bad.st"))
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1 and b"--similar must be >= 0" in r.stderr
    assert not (tmp_path / "bad.st").exists()
