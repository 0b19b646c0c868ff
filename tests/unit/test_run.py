"""Batch jobs: ``thoughtpatch run JOB.yaml`` on a pico model, its JSON summary, and checks of the job file."""

from __future__ import annotations

import json

import pytest
import typer
from conftest import run_cli

from thoughtpatch.cli import app
from thoughtpatch.errors import UsageError
from thoughtpatch.jobs import load_job
from thoughtpatch.patch import patch_from_bytes

FIT = "the dog jumps\na cat is lazy\ntell me a story\n1 2 3 4\n"
JOB = """
defaults: {{model: {model}, answer_tokens: 2}}
steps:
  - transmute: {{prompt_file: prompt.txt, probes: fit.txt, mode: compact, kv: 0, vector: true, matrix: true, rank: 2, output: out/a.safetensors}}
  - transmute: {{prompt_file: polite.txt, probes: fit.txt, mode: compact, kv: 0, vector: true, matrix: true, rank: 2, output: out/b.safetensors}}
  - merge:
      patch_files: [out/a.safetensors, out/b.safetensors]
      weights: [1, -0.5]
      output: out/m.safetensors
  - merge: {{patch_files: [out/m.safetensors], method: svd, rank: 1, output: out/m1.safetensors}}
  - diff: {{first: out/a.safetensors, second: out/m.safetensors}}
  - eval: {{patch_file: out/m1.safetensors, prompt_file: prompt.txt, queries: fit.txt, caa: false}}
"""


@pytest.fixture
def jobdir(tmp_path, tiny_dir):
    d = tmp_path / "jobs"
    d.mkdir()
    (d / "prompt.txt").write_text("You are a pirate. Speak like a pirate.\n")
    (d / "polite.txt").write_text("Answer briefly and politely.\n")
    (d / "fit.txt").write_text(FIT)
    (d / "job.yaml").write_text(JOB.format(model=tiny_dir("llama")))
    return d


def test_job_runs_every_step_and_summarises(jobdir, tmp_path):
    r = run_cli("run", "jobs/job.yaml", "--json-out", "summary.json", "-q", cwd=tmp_path)  # paths: the job's folder
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["ok"] and [s["status"] for s in doc["steps"]] == ["ok"] * 6
    assert (tmp_path / "summary.json").read_text() == r.stdout.decode()
    steps = doc["steps"]
    assert [s["command"] for s in steps] == ["transmute", "transmute", "merge", "merge", "diff", "eval"]
    assert steps[2]["result"]["weights"] == [1.0, -0.5] and steps[3]["result"]["recompression"]["relative_error"] > 0
    assert steps[4]["result"]["kind"] == "patch_vs_patch" and set(steps[5]["result"]["methods"]) == {"patch", "none"}
    merged = patch_from_bytes((jobdir / "out/m.safetensors").read_bytes())
    assert [p["weight"] for p in json.loads(merged.meta["merge.parents"])] == [1.0, -0.5]


def test_failed_step_stops_the_job(jobdir):
    (jobdir / "bad.yaml").write_text(
        "steps:\n  - inspect: {patch_file: missing.safetensors}\n  - inspect: {patch_file: x}\n"
    )
    r = run_cli("run", str(jobdir / "bad.yaml"), "-q")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and not doc["ok"]
    assert [s["status"] for s in doc["steps"]] == ["failed", "skipped"] and "no such file" in doc["steps"][0]["error"]
    (jobdir / "typo.yaml").write_text("steps:\n  - merge: {patch_files: [a], wieghts: [1]}\n")
    r = run_cli("run", str(jobdir / "typo.yaml"))
    assert r.returncode == 2 and "steps[0].merge: unknown key 'wieghts'" in r.stderr.decode() and not r.stdout


@pytest.mark.parametrize(
    "text,message",
    [
        ("steps: [", "invalid YAML"),
        ("- transmute: {}", "non-empty list under 'steps'"),
        ("steps: []\n", "non-empty list under 'steps'"),
        ("stepz: [1]\nsteps: [{inspect: {patch_file: a}}]", "unknown key 'stepz'"),
        ("steps: [{bake: {}}]", "steps[0]: unknown command 'bake'"),
        ("steps: [{inspect: {}, eval: {}}]", "steps[0]: expected one command"),
        ("steps: [{eval: {patch_file: a, queries: q}}]", "steps[0].eval: missing key 'prompt_file'"),
        (
            "steps: [{transmute: {prompt_file: p, answer_tokens: many}}]",
            "steps[0].transmute.answer_tokens: expected int, not 'many'",
        ),
        ("steps: [{transmute: {prompt_file: p, check: 1}}]", "unknown key 'check'"),
        ("steps: [{extract: {prompt_file: p, check: 1}}]", "steps[0].extract.check: expected true or false"),
        ("steps: [{inspect: {patch_file: '-'}}]", "'-' (stdin/stdout) cannot be used"),
        ("defaults: {modle: x}\nsteps: [{inspect: {patch_file: a}}]", "defaults: unknown key 'modle'"),
    ],
)
def test_job_file_checks_name_the_bad_key(tmp_path, text, message):
    (tmp_path / "job.yaml").write_text(text)
    with pytest.raises(UsageError) as exc:
        load_job(str(tmp_path / "job.yaml"), typer.main.get_command(app).commands)
    assert message in str(exc.value)


def test_job_argv(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "defaults: {model: default, dtype: float64}\n"
        "steps:\n  - merge: {patch_files: [a, /abs/b], weights: [1, -1], force: true}\n"
        "  - transmute: {prompt_file: p.txt, chat: false, layers: 0-1, output: o/x.safetensors}\n"
    )
    merge, transmute = load_job(str(tmp_path / "job.yaml"), typer.main.get_command(app).commands)
    assert merge.argv == [str(tmp_path / "a"), "/abs/b", "--weights", "1,-1", "--force", "--json", "-q"]
    assert transmute.argv == [str(tmp_path / "p.txt"), "--model", "default", "--dtype", "float64", "--no-chat",
                              "--layers", "0-1", "--output", str(tmp_path / "o/x.safetensors"), "--json", "-q"]  # fmt: skip
