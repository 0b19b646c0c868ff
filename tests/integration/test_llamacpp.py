"""llama.cpp itself runs an exported patch: the default model's own GGUF with the exported LoRA adapter and
control vector (llama-cpp-python) gives the next-token distributions `thoughtpatch apply` gives, within the
two runtimes' own difference without a patch. Opt-in: llama-cpp-python builds from source (several minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.slow, pytest.mark.realmodel]

ROOT = Path(__file__).resolve().parents[2]


def test_llama_cpp_runs_the_export_as_thoughtpatch_does(default_model_dir, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join((ROOT / "examples" / "french-heldout.txt").read_text().splitlines()[:12]) + "\n")
    out = tmp_path / "agreement.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_llamacpp.py"), "--queries", str(queries), "--json", str(out)],
        capture_output=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    doc = json.loads(out.read_text())
    base, patched = doc["next-token KL, transformers || llama.cpp: base / patched"]
    assert doc["next-token KL, patched || base (transformers): what the export changes"] > 0.3
    assert patched <= 2 * base + 0.01  # the adapter adds no error beyond the runtimes' own
    assert doc["llama.cpp patched vs thoughtpatch apply (same exported content)"]["first_token"] >= 0.75
