"""Shell pipelines end to end: every stage reads ``-`` from stdin and writes ``-`` to stdout, binary-safe."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace

import pytest
from conftest import run_cli

from thoughtpatch import Prompt, load_model
from thoughtpatch.algebra import merge
from thoughtpatch.constants import PRESETS
from thoughtpatch.patch import patch_from_bytes, patch_to_bytes
from thoughtpatch.pipeline import run_generate, run_transmute

FIT = "the dog jumps\na cat is lazy\ntell me a story\n1 2 3 4\n"


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "thoughtpatch", *args]


def _pipe(*stages: list[str], cwd) -> list[subprocess.CompletedProcess]:
    """Run ``stage1 | stage2 | ...`` with real OS pipes; every stage's exit code and stderr come back."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    procs, errs, prev = [], [], None
    for args in stages:
        errs.append(tempfile.TemporaryFile())  # noqa: SIM115 (closed with the test process)
        p = subprocess.Popen(args, stdin=prev, stdout=subprocess.PIPE, stderr=errs[-1], cwd=cwd, env=env)
        if prev is not None:
            prev.close()  # the next stage owns the read end
        procs.append(p)
        prev = p.stdout
    out = procs[-1].communicate(timeout=600)[0]
    done = []
    for p, e in zip(procs, errs, strict=True):
        p.wait()
        e.seek(0)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out if p is procs[-1] else b"", e.read()))
    return done


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("pipes")
    (d / "prompt.txt").write_text("You are a pirate. Speak like a pirate.\n")
    (d / "polite.txt").write_text("Answer briefly and politely.\n")
    (d / "fit.txt").write_text(FIT)
    model = str(tiny_dir("llama"))
    lm = load_model(model)
    cfg = replace(PRESETS["compact"], kv=0.0, vector=True, matrix=True, rank=2)  # merges with negative weights too
    patch, _ = run_transmute(lm, Prompt("Answer briefly and politely."), FIT.split("\n")[:-1], cfg, answer_tokens=2)
    (d / "other.safetensors").write_bytes(patch_to_bytes(patch))
    return d, model


def test_extract_condense_merge_pipe(work):
    d, model = work
    rs = _pipe(
        _cmd("extract", "prompt.txt", "--model", model, "--probes", "fit.txt", "-o", "-", "-q", "--answer-tokens", "2"),
        _cmd("condense", "-", "-o", "-", "--mode", "compact", "--kv", "0", "--vector", "--matrix", "--rank", "2", "-q"),
        _cmd("merge", "-", "other.safetensors", "-o", "combined.safetensors", "--json", "-q"),
        cwd=d,
    )
    assert [r.returncode for r in rs] == [0, 0, 0], [r.stderr.decode() for r in rs]
    doc = json.loads(rs[-1].stdout)
    assert doc["output"] == "combined.safetensors" and doc["layers"] == [0, 1, 2]
    combined = patch_from_bytes((d / "combined.safetensors").read_bytes())
    parents = json.loads(combined.meta["merge.parents"])
    assert parents[1]["sha256"] == hashlib.sha256((d / "other.safetensors").read_bytes()).hexdigest()
    other = patch_from_bytes((d / "other.safetensors").read_bytes())
    assert parents[0]["prompt_sha256"] != other.meta["prompt_sha256"]  # the first parent came through the pipe
    assert all(combined.layers[i].rank == 2 * other.layers[i].rank for i in other.layers)


def test_merge_apply_pipe(work):
    d, model = work
    rs = _pipe(
        _cmd("merge", "other.safetensors", "other.safetensors", "--weights", "0.5,0.25", "-o", "-", "-q"),
        _cmd("apply", "-", "--prompt", "the lazy dog", "--max-new-tokens", "4", "--json", "-q"),
        cwd=d,
    )
    assert [r.returncode for r in rs] == [0, 0], [r.stderr.decode() for r in rs]
    assert b"merged patch" in rs[0].stderr  # the merge's report went to stderr, stdout carried the patch
    piped = json.loads(rs[-1].stdout)["answers"][0]["answer"]
    other = patch_from_bytes((d / "other.safetensors").read_bytes())
    lm = load_model(model)
    assert run_generate(lm, merge([other], [0.75]), ["the lazy dog"], max_new_tokens=4) == [piped]  # 0.5a + 0.25a


def test_inspect_reads_stdin_and_stdout_carries_one_thing(work):
    d, _ = work
    data = (d / "other.safetensors").read_bytes()
    r = run_cli("inspect", "-", "--json", stdin=data)
    assert r.returncode == 0 and json.loads(r.stdout)["metadata"]["prompt"].startswith("Answer briefly")
    r = run_cli("condense", "-", "--json", cwd=d, stdin=b"")
    assert r.returncode == 2 and "both want stdout" in r.stderr.decode()
