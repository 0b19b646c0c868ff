"""The command line as users run it: real subprocesses, real exit codes."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

PROBES = "What is the capital of France?\nTell me a story\n1 2 3\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "prompt.txt").write_text("You are a pirate. Speak like a pirate.\n")
    (tmp_path / "probes.txt").write_text(PROBES)
    return tmp_path


def test_extract_json_contract(tiny_dir, files):
    out = files / "updates.safetensors"
    r = run_cli(
        "extract", str(files / "prompt.txt"), "--model", str(tiny_dir("llama")), "--probes", str(files / "probes.txt"),
        "--dtype", "float64", "--check", "--json", "-o", str(out), "--answer-tokens", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)  # stdout is exactly one JSON document
    assert doc["max_logit_error"] <= 1e-9
    assert doc["layers"] == 3 and doc["tokens"] > 0 and doc["queries"] == 3
    assert out.is_file() and not list(files.glob(".*tmp"))


def test_extract_to_stdout_and_from_stdin(tiny_dir, files):
    r = run_cli(
        "extract", "-", "--model", str(tiny_dir("gpt2")), "--probes", str(files / "probes.txt"), "-o", "-", "-q",
        stdin=b"Be brief.",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    from thoughtpatch.formats import updates_from_bytes

    up, meta = updates_from_bytes(r.stdout)
    assert up.n_layers == 3 and meta["prompt"] == "Be brief."


def _unsupported(tmp_path, tok):
    from transformers import AutoModelForCausalLM, BloomConfig

    cfg = BloomConfig(vocab_size=400, hidden_size=32, n_layer=1, n_head=4)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "bloom")
    tok.save_pretrained(tmp_path / "bloom")
    return tmp_path / "bloom"


@pytest.mark.parametrize("case", ["missing_prompt", "empty_prompt", "empty_probes", "not_a_model", "unsupported"])
def test_bad_input_exits_2_with_one_line(tiny_dir, files, tok, case):
    prompt, probes, model = files / "prompt.txt", files / "probes.txt", tiny_dir("llama")
    if case == "missing_prompt":
        prompt = files / "nope.txt"
    elif case == "empty_prompt":
        prompt.write_text("  \n")
    elif case == "empty_probes":
        probes.write_text("\n\n")
    elif case == "not_a_model":
        model = files
    else:
        model = _unsupported(files, tok)
    out = files / "out.safetensors"
    r = run_cli("extract", str(prompt), "--model", str(model), "--probes", str(probes), "-o", str(out))
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2, r.stderr.decode()
    assert len(lines) == 1 and "Traceback" not in r.stderr.decode()
    assert not out.exists() and not list(files.glob(".*tmp"))
    if case == "unsupported":
        assert "bloom" in lines[0] and "llama" in lines[0] and "docs/architectures.md" in lines[0]
