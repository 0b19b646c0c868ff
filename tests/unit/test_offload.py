"""Models bigger than memory: ``--max-memory`` / ``--device-map`` offload blocks to disk and give the same results."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import run_cli

from thoughtpatch.models import load_model
from thoughtpatch.pipeline import run_eval, run_extract
from thoughtpatch.prompts import load_prompt

ROOT = Path(__file__).resolve().parents[2]
PROBES = (ROOT / "examples" / "french-probes.txt").read_text().splitlines()


def _budget(folder: Path) -> int:
    """A CPU budget that holds the embedding and a block or so; the rest goes to disk."""
    return int(0.7 * (folder / "model.safetensors").stat().st_size)


def test_transmute_with_blocks_on_disk_writes_the_same_patch(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    (tmp_path / "probes.txt").write_text("\n".join(PROBES[:12]) + "\n")
    args = ["transmute", str(ROOT / "examples" / "french.txt"), "--model", str(model)]
    args += ["--probes", str(tmp_path / "probes.txt"), "--answer-tokens", "3"]
    plain = run_cli(*args, "-q", "-o", str(tmp_path / "plain.st"))
    assert plain.returncode == 0, plain.stderr.decode()
    off = run_cli(*args, "--max-memory", f"cpu={_budget(model)}", "-o", str(tmp_path / "off.st"))
    assert off.returncode == 0, off.stderr.decode()
    assert "modules on disk" in off.stderr.decode()  # blocks really were offloaded
    assert (tmp_path / "off.st").read_bytes() == (tmp_path / "plain.st").read_bytes()


def test_extract_and_eval_with_blocks_on_disk_match(tiny_dir):
    model = tiny_dir("qwen2")
    prompt = load_prompt(str(ROOT / "examples" / "french.txt"))
    plain = load_model(str(model))
    off = load_model(str(model), device_map="auto", max_memory={"cpu": _budget(model)})
    assert "disk" in set(off.model.hf_device_map.values())
    a, b = (run_extract(lm, prompt, PROBES[:6], answer_tokens=2) for lm in (plain, off))
    for x, y in zip(a.updates.delta + a.updates.u, b.updates.delta + b.updates.u, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    reports = [run_eval(lm, prompt, PROBES[-4:], {}, fit_queries=PROBES[:6], answer_tokens=2) for lm in (plain, off)]
    scores = [
        {m: {k: v for k, v in r.items() if k != "eval_seconds"} for m, r in rep["methods"].items()} for rep in reports
    ]
    assert set(scores[0]) == {"none", "caa"} and scores[0] == scores[1]  # bit-identical scores


def test_bad_max_memory_is_a_usage_error(tiny_dir, tmp_path):
    r = run_cli("transmute", str(ROOT / "examples" / "french.txt"), "--model", str(tiny_dir("llama")),
                "--max-memory", "cpu=lots", "-o", str(tmp_path / "x.st"))  # fmt: skip
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1 and "--max-memory" in r.stderr.decode()
    assert not list(tmp_path.iterdir())
