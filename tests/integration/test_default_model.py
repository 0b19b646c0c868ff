"""The real default model, SmolLM2-135M-Instruct, built from its PyPI wheel."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from thoughtpatch import align, check, default_probes, extract, load_model, load_prompt, teacher_answers

pytestmark = pytest.mark.realmodel


def test_truncated_default_model_check_float32(default_model_dir):
    lm = load_model(str(default_model_dir), dtype="float32", num_hidden_layers=2)
    pairs = align(lm.tokenizer, load_prompt("examples/french.txt"), default_probes()[:8])
    pairs = teacher_answers(lm.model, lm.tokenizer, pairs, 4)
    updates = extract(lm.model, pairs, batch_size=4)
    assert updates.n_layers == 2
    assert check(lm.model, updates) <= 1e-3


def test_extract_cli_on_full_default_model(default_model_dir, tmp_path):
    probes = tmp_path / "probes.txt"
    probes.write_text("\n".join(default_probes()[:4]))
    r = run_cli("extract", "examples/french.txt", "--probes", str(probes), "--check", "--json", "--answer-tokens", "4")
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["layers"] == 30 and doc["max_logit_error"] <= 1e-3
    assert doc["base_model"] == "smollm2-135m-instruct"
