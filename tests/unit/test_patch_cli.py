"""transmute, condense, inspect, apply and eval as users run them (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_cli

from thoughtpatch.patch import patch_from_bytes

FIT = "the dog jumps\na cat is lazy\ntell me a story\n1 2 3 4\nthe fox please\nmy dog and cat\n"
HELD = "What is the capital of France?\nthe lazy fox\n"


@pytest.fixture
def work(tmp_path, tiny_dir):
    (tmp_path / "prompt.txt").write_text("You are a pirate. Speak like a pirate.\n")
    (tmp_path / "fit.txt").write_text(FIT)
    (tmp_path / "held.txt").write_text(HELD)
    (tmp_path / "empty.txt").write_text("\n")
    return tmp_path, str(tiny_dir("llama"))


def _transmute(work, out, *extra):
    d, model = work
    return run_cli("transmute", str(d / "prompt.txt"), "--model", model, "--probes", str(d / "fit.txt"), "-o", str(out),
                   "--answer-tokens", "2", "-q", *extra)  # fmt: skip


def test_transmute_is_deterministic_and_self_describing(work):
    d, model = work
    r1, r2 = _transmute(work, d / "a.safetensors"), _transmute(work, d / "b.safetensors")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr.decode()
    a, b = (d / "a.safetensors").read_bytes(), (d / "b.safetensors").read_bytes()
    assert a == b  # same inputs, same bytes
    from safetensors import safe_open

    with safe_open(str(d / "a.safetensors"), "pt") as f:  # loadable with safetensors alone
        meta = f.metadata()
        names = list(f.keys())
        assert any(k.endswith("attn.gate") for k in names) and any(k.endswith("attn.query") for k in names)
    for key in ("format", "format_version", "base_model", "fingerprint", "prompt_sha256", "prompt", "probes_sha256",
                "probe_tokens", "method.construction", "method.ridge", "method.rank", "method.strength", "placement",
                "compute_dtype", "storage_dtype", "tool_version", "layer_convention", "sites"):  # fmt: skip
        assert key in meta, key
    r = run_cli("inspect", str(d / "a.safetensors"), "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["parameters"] > 0 and len(doc["layers"]) == 3
    assert {"attn_weight_norm", "attn_query_norm", "attn_gate_norm"} <= set(doc["layers"][0])


def test_no_store_prompt(work):
    d, _ = work
    r = _transmute(work, d / "p.safetensors", "--no-store-prompt")
    assert r.returncode == 0
    meta = patch_from_bytes((d / "p.safetensors").read_bytes()).meta
    assert "prompt" not in meta and len(meta["prompt_sha256"]) == 64


def test_extract_condense_pipe_and_eval(work):
    d, model = work
    extract = subprocess.Popen(
        [sys.executable, "-m", "thoughtpatch", "extract", str(d / "prompt.txt"), "--model", model, "--probes",
         str(d / "fit.txt"), "-o", "-", "-q", "--answer-tokens", "2"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    data = extract.communicate()[0]
    assert extract.returncode == 0
    r = run_cli("condense", "-", "-o", str(d / "c.safetensors"), "--rank", "4", "--json", "-q", stdin=data)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["layers"] == [0, 1, 2]
    patch = patch_from_bytes((d / "c.safetensors").read_bytes())
    assert all(lp.rank == 4 for lp in patch.layers.values())
    r = run_cli("eval", str(d / "c.safetensors"), "--prompt-file", str(d / "prompt.txt"), "--queries", str(d / "held.txt"),
                "--probes", str(d / "fit.txt"), "--answer-tokens", "2", "--json", "-q", "--plot", str(d / "eval.png"))  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    png = (d / "eval.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and int.from_bytes(png[16:20], "big") == 990  # 9 in at 110 dpi
    doc = json.loads(r.stdout)
    assert set(doc["methods"]) == {"patch", "none", "caa"}
    for m in doc["methods"].values():
        assert {"kl", "top1", "exact"} <= set(m) and m["kl"] >= 0 and 0 <= m["top1"] <= 1
    r = run_cli("apply", str(d / "c.safetensors"), "-p", "hello", "-p", "the dog", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["answers"]) == 2


@pytest.mark.parametrize(
    "case",
    ["rank0", "neg_ridge", "layer_range", "other_model_updates", "patch_mismatch", "empty_queries", "not_a_patch"],
)
def test_bad_input(work, tiny_dir, case):
    d, model = work
    out = d / "out.safetensors"
    if case in ("rank0", "neg_ridge", "layer_range"):
        opt = {"rank0": ("--rank", "0"), "neg_ridge": ("--ridge", "-1"), "layer_range": ("--layers", "0-7")}[case]
        r = _transmute(work, out, *opt)
    elif case == "other_model_updates":
        up = d / "u.safetensors"
        assert (
            run_cli(
                "extract", str(d / "prompt.txt"), "--model", model, "--probes", str(d / "fit.txt"), "-o", str(up), "-q"
            ).returncode
            == 0
        )
        r = run_cli("condense", str(up), "--model", str(tiny_dir("gpt2")), "-o", str(out))
    elif case == "patch_mismatch":
        assert _transmute(work, d / "p.safetensors").returncode == 0
        r = run_cli("eval", str(d / "p.safetensors"), "--model", str(tiny_dir("gemma3")), "--prompt-file", str(d / "prompt.txt"),
                    "--queries", str(d / "held.txt"))  # fmt: skip
    elif case == "empty_queries":
        assert _transmute(work, d / "p.safetensors").returncode == 0
        r = run_cli(
            "eval", str(d / "p.safetensors"), "--prompt-file", str(d / "prompt.txt"), "--queries", str(d / "empty.txt")
        )
    else:
        (d / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
        r = run_cli("apply", str(d / "junk.safetensors"), "-p", "hi")
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2, r.stderr.decode()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert not out.exists() and not list(d.glob(".*.tmp"))
