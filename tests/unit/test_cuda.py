"""``--device cuda``: the same numbers as on the CPU, end to end (skipped where no CUDA device is present).

Float64 on both devices. Extraction stays exact on the GPU (the identity to 1e-9). Between the devices what
differs is the order of sums, and the parts transformers computes in float32 whatever the model's dtype
(rotary tables, Gemma's embedding scale): so GPT-2 (no rotary) must match to float64 precision, the
others to float32's.
"""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from conftest import run_cli

from thoughtpatch import Prompt, load_model
from thoughtpatch.condense import condense
from thoughtpatch.constants import PRESETS
from thoughtpatch.evaluate import evaluate, targets_for
from thoughtpatch.patch import patch_from_bytes
from thoughtpatch.pipeline import fit_pairs, run_extract
from thoughtpatch.prompts import align

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPT = Prompt("You are a pirate. Speak like a pirate in every answer.")
FAMILIES = ["llama", "gemma3", "gpt2"]  # grouped-query RoPE; sliding windows and norms after blocks; biases
TOLERANCE = {"gpt2": {"rtol": 1e-9, "atol": 1e-10}}  # (rtol, atol) of the extracted updates, CPU vs CUDA
FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}


def _flat(patch) -> dict[str, torch.Tensor]:
    """Every tensor of the patch by name, the thought matrix and the down map as the products of their factors
    (which an SVD defines only up to the signs, or the rotation, of its singular vectors)."""
    layers = patch.layers.items()
    out = {f"{i}.{k}": t for i, lp in layers for k, t in lp.tensors().items() if not k.startswith(("matrix", "down"))}
    out |= {f"{i}.down": lp.down_b @ lp.down_a.T for i, lp in layers if lp.down_a is not None}
    return out | {f"{i}.matrix": lp.matrix() for i, lp in layers if lp.matrix_a is not None}


def _models(folder):
    return {d: load_model(str(folder), dtype="float64", device=d) for d in ("cpu", "cuda")}


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_is_exact_on_cuda_and_matches_cpu(tiny_dir, family):
    runs = {d: run_extract(lm, PROMPT, tiny.QUERIES, answer_tokens=3, do_check=True) for d, lm in _models(tiny_dir(family)).items()}  # fmt: skip
    assert runs["cuda"].max_logit_error <= 1e-9  # the identity holds on the GPU
    cpu, gpu = runs["cpu"].updates, runs["cuda"].updates
    for a, b in zip(cpu.delta + cpu.u, gpu.delta + gpu.u, strict=True):
        torch.testing.assert_close(b.cpu(), a, **TOLERANCE.get(family, FLOAT32))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_condenses_and_scores_the_same_on_cuda(tiny_dir, family):
    lms = _models(tiny_dir(family))
    scores = {}
    for device, lm in lms.items():
        pairs = fit_pairs(lm, PROMPT, tiny.QUERIES, 3, None, 16)
        held = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, PROMPT, ["the lazy fox", "a cat"]), 3)
        patches = {mode: condense(lm.model, pairs, cfg) for mode, cfg in PRESETS.items()}
        scores[device] = (patches, evaluate(lm.model, held, patches | {"none": None}))
    (cpu_patches, cpu_scores), (gpu_patches, gpu_scores) = scores["cpu"], scores["cuda"]
    for mode in PRESETS:
        a, b = _flat(cpu_patches[mode]), _flat(gpu_patches[mode])
        assert a.keys() == b.keys() and a
        for k in a:
            assert b[k].device.type == "cpu", k  # patches leave the GPU as plain CPU tensors
            tol = {"rtol": 1e-6, "atol": 1e-8} if family == "gpt2" else {"rtol": 1e-3, "atol": 1e-5}
            torch.testing.assert_close(b[k], a[k], **tol, msg=f"{mode} {k}")
    for method, s in cpu_scores.items():
        assert gpu_scores[method]["kl"] == pytest.approx(s["kl"], rel=1e-6 if family == "gpt2" else 1e-2, abs=1e-6)
        if family == "gpt2":
            assert gpu_scores[method]["top1"] == s["top1"] and gpu_scores[method]["exact"] == s["exact"], method


def test_cli_on_cuda(tiny_dir, tmp_path):
    """transmute, apply, eval and apply --save with ``--device cuda`` (float32, the default) as users run them."""
    (tmp_path / "prompt.txt").write_text(PROMPT.system + "\n")
    (tmp_path / "fit.txt").write_text("\n".join(tiny.QUERIES) + "\n")
    (tmp_path / "held.txt").write_text("the lazy fox\na cat\n")
    model = str(tiny_dir("llama"))
    common = ["--model", model, "--answer-tokens", "2", "-q"]
    for device in ("cpu", "cuda"):
        for mode in ("best", "bakeable"):
            out = tmp_path / f"{mode}-{device}.safetensors"
            r = run_cli("transmute", str(tmp_path / "prompt.txt"), "--probes", str(tmp_path / "fit.txt"), "-o", str(out),
                        "--mode", mode, "--device", device, *common)  # fmt: skip
            assert r.returncode == 0, r.stderr.decode()
    for mode in ("best", "bakeable"):
        a, b = (_flat(patch_from_bytes((tmp_path / f"{mode}-{d}.safetensors").read_bytes())) for d in ("cpu", "cuda"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=f"{mode} {k}")
    patch = str(tmp_path / "best-cuda.safetensors")
    r = run_cli("apply", patch, "--model", model, "--device", "cuda", "-p", "hello", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["answers"]) == 1, r.stderr.decode()
    r = run_cli("eval", patch, "--prompt-file", str(tmp_path / "prompt.txt"), "--queries", str(tmp_path / "held.txt"),
                "--probes", str(tmp_path / "fit.txt"), "--device", "cuda", "--json", *common)  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)["methods"]
    assert doc["patch"]["kl"] < doc["none"]["kl"]
    r = run_cli("apply", str(tmp_path / "bakeable-cuda.safetensors"), "--model", model, "--device", "cuda",
                "--save", str(tmp_path / "baked"), "-q")  # fmt: skip
    assert r.returncode == 0 and (tmp_path / "baked" / "config.json").is_file(), r.stderr.decode()
