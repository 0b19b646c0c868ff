"""Multi-process extraction: ``torchrun`` with 2 gloo processes writes the same bytes as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# Byte-identity holds for the same number of threads per process (float sums are ordered by the thread count).
ENV = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run([*cmd, "-m", "thoughtpatch", *args], capture_output=True, cwd=cwd, env=ENV, timeout=600)


def single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thoughtpatch", *args], capture_output=True, env=ENV, timeout=600)


@pytest.mark.parametrize(
    "command",
    [["transmute"], ["extract"], ["transmute", "--mode", "bakeable", "--down-rank", "4", "--value-map"]],
    ids=str,
)
def test_two_gloo_processes_write_the_single_process_bytes(tiny_dir, tmp_path, command):
    model = tiny_dir("llama")
    probes = tmp_path / "probes.txt"
    lines = (ROOT / "examples" / "french-probes.txt").read_text().splitlines()
    probes.write_text("\n".join(lines[:20]) + "\n")  # 3 chunks of 8: rank 0 runs one, rank 1 two
    args = [command[0], str(ROOT / "examples" / "french.txt"), *command[1:], "--model", str(model)]
    args += ["--probes", str(probes), "--batch-size", "8", "--answer-tokens", "3", "--json", "-q"]
    one = single(*args, "-o", str(tmp_path / "one.st"))
    assert one.returncode == 0, one.stderr.decode()
    two = torchrun(*args, "-o", str(tmp_path / "two.st"), cwd=tmp_path)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    assert json.loads(one.stdout)["processes"] == 1
    assert json.loads(two.stdout)["processes"] == 2  # one document: only rank 0 prints
    assert (tmp_path / "two.st").read_bytes() == (tmp_path / "one.st").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.st", "probes.txt", "two.st"]  # nothing else written
