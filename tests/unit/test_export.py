"""export: PEFT adapters checked by PEFT itself, llama.cpp GGUF files read back with gguf, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import tiny
import torch
from conftest import run_cli
from peft import PeftModel
from safetensors import safe_open
from tiny import random_patch
from transformers import AutoModelForCausalLM

from thoughtpatch.apply import installed, mlp_width
from thoughtpatch.errors import UsageError
from thoughtpatch.export import export_patch
from thoughtpatch.files import write_bytes
from thoughtpatch.patch import Patch, patch_to_bytes

L, D, H, HD = tiny.SHAPE
IDS = torch.tensor([[5, 17, 33, 101, 7, 250, 64, 3, 99, 12, 45, 300]])


@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory, tok):
    """A pico Llama with biases on every projection (so PEFT can merge LoRA biases into it)."""
    cfg = tiny.config("llama")
    cfg.attention_bias = cfg.mlp_bias = True
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() >= 2 else 1.0)
    folder = tmp_path_factory.mktemp("tiny-llama-bias")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def base(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def check_peft(folder: Path, patch: Patch, out: Path, merges: bool) -> None:
    """PEFT's own loader gives the hooks' logits, before and (where it can) after merge_and_unload()."""
    model = base(folder)
    with installed(model, patch):
        want = model(input_ids=IDS).logits
    plain = model(input_ids=IDS).logits
    assert (want - plain).abs().max() > 0.05 * want.abs().max()  # the patch changes the model
    peft_model = PeftModel.from_pretrained(model, out).eval()
    assert (peft_model(input_ids=IDS).logits - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    if merges:
        merged = peft_model.merge_and_unload()
        assert (merged(input_ids=IDS).logits - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    else:
        with pytest.raises(RuntimeError, match="no bias"):
            peft_model.merge_and_unload()


CASES = {  # family or folder, parts, placement, whether merge_and_unload() can fold the LoRA biases
    "llama-bias-full": ("bias", {"attn", "attn_bias", "vector", "matrix", "down"}, "skip", True),
    "llama-bias-attn_out": ("bias", {"scalar", "attn_bias", "vector", "matrix"}, "attn_out", True),
    "gpt2": ("gpt2", {"attn", "attn_bias", "vector", "matrix", "down"}, "skip", True),  # down on a Conv1D
    # a map across the heads and a value map: the bakeable preset's parts
    "llama-bias-cross": ("bias", {"cross", "attn_bias", "vector", "down", "value"}, "skip", True),
    "gemma2": ("gemma2", {"attn", "attn_bias", "matrix", "value"}, "skip", False),  # no o_proj bias to merge into
    "phi3": ("phi3", {"attn", "matrix"}, "skip", True),  # no biases needed
    # vectors on branches that residual_multiplier scales
    "granite-attn_out": ("granite", {"attn", "attn_bias", "vector", "matrix"}, "attn_out", False),
    "granite-skip": ("granite", {"vector", "down"}, "skip", False),  # the down map and the vector's bias share
}


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_equals_the_patch(case, tiny_dir, biased_llama, tmp_path):
    where, parts, placement, merges = CASES[case]
    folder = biased_llama if where == "bias" else tiny_dir(where)
    patch = random_patch(parts, placement, rank=D, inner=mlp_width(base(folder)))
    summary = export_patch(patch, folder, tmp_path / "lora", "peft")
    assert summary["files"] == ["adapter_model.safetensors", "adapter_config.json"]
    assert summary["merge_and_unload"] is merges
    check_peft(folder, patch, tmp_path / "lora", merges)


def test_peft_lora_bias_without_base_bias_runs_but_cannot_merge(tiny_dir, tmp_path):
    folder = tiny_dir("llama")  # no o_proj or down_proj bias
    patch = random_patch({"attn", "attn_bias", "vector", "matrix"}, "skip", seed=1, rank=4)
    summary = export_patch(patch, folder, tmp_path / "lora", "peft")
    assert summary["merge_and_unload"] is False
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] and cfg["r"] == H * HD and cfg["lora_alpha"] == cfg["r"]
    # per-module ranks: the matrices' rank 4, the bias-only down projections 1
    assert set(cfg["rank_pattern"].values()) == {4, 1}
    assert cfg["rank_pattern"]["model.layers.0.mlp.down_proj"] == 1
    check_peft(folder, patch, tmp_path / "lora", merges=False)


def test_rank_compression_reports_its_error(biased_llama, tmp_path):
    patch = random_patch({"attn", "matrix"}, rank=4)
    exact = export_patch(patch, biased_llama, tmp_path / "exact", "peft", rank=D)
    small = export_patch(patch, biased_llama, tmp_path / "r4", "peft", rank=4)
    assert exact["max_relative_error"] == 0.0 and small["ranks"] == [4]
    model = base(biased_llama)
    errors = []
    with safe_open(tmp_path / "r4" / "adapter_model.safetensors", "pt") as f:
        for i in range(L):
            key = f"base_model.model.model.layers.{i}."
            up_a = f.get_tensor(key + "mlp.up_proj.lora_A.weight")
            assert up_a.shape == (4, D)  # the rank-4 matrix needs no compression: exact
            w_u, lp = model.model.layers[i].mlp.up_proj.weight, patch.layers[i]
            up = f.get_tensor(key + "mlp.up_proj.lora_B.weight") @ up_a
            torch.testing.assert_close(up, w_u @ lp.matrix_b @ lp.matrix_a.T, atol=1e-5, rtol=1e-4)
            o = f.get_tensor(key + "self_attn.o_proj.lora_B.weight") @ f.get_tensor(
                key + "self_attn.o_proj.lora_A.weight"
            )
            want = model.model.layers[i].self_attn.o_proj.weight @ torch.block_diag(*lp.attn_weight)
            errors.append(float((o - want).norm() / want.norm()))
    assert small["max_relative_error"] == pytest.approx(max(errors), rel=1e-3) and 0.01 < max(errors) < 1
    with torch.no_grad(), installed(model, patch):
        want = model(input_ids=IDS).logits
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
        got = PeftModel.from_pretrained(model, tmp_path / "r4")(input_ids=IDS).logits
    assert (got - want).abs().max() > 1e-4 and (got - want).norm() < (plain - want).norm()  # closer, not exact


def gguf_tensors(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}


def test_gguf_files_carry_llama_cpp_names_shapes_and_values(tiny_dir, tmp_path):
    folder = tiny_dir("llama")
    patch = random_patch({"attn", "vector", "matrix", "down"}, "skip", rank=4)
    with pytest.raises(UsageError, match="direction.0"):
        export_patch(patch, folder, tmp_path / "refused", "gguf")
    assert not (tmp_path / "refused").exists()
    summary = export_patch(patch, folder, tmp_path / "out", "gguf", drop_vectors=True)
    assert summary["files"] == ["lora.gguf", "control_vector.gguf"] and summary["control_vectors"] == [1, 2]
    assert summary["dropped"] == [
        "dropped the thought vector of block 0 (llama.cpp cannot add a vector after block 0 (it has no direction.0)): "
        "the export is no longer equal to the patch"
    ]

    fields, tensors = gguf_tensors(tmp_path / "out" / "control_vector.gguf")
    assert fields["general.architecture"] == "controlvector"
    assert sorted(tensors) == ["direction.1", "direction.2"]  # after 0-based blocks 1 and 2, as llama.cpp counts
    for i in (1, 2):
        assert tensors[f"direction.{i}"].dtype == torch.float32
        torch.testing.assert_close(tensors[f"direction.{i}"], patch.layers[i].vector)

    fields, tensors = gguf_tensors(tmp_path / "out" / "lora.gguf")
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    want = {
        f"blk.{i}.{n}.weight.lora_{ab}"
        for i in range(L)
        for n in ("attn_output", "ffn_gate", "ffn_up", "ffn_down")
        for ab in "ab"
    }
    assert set(tensors) == want
    model = base(folder)
    for i in range(L):
        w_o = model.model.layers[i].self_attn.o_proj.weight
        a, b = tensors[f"blk.{i}.attn_output.weight.lora_a"], tensors[f"blk.{i}.attn_output.weight.lora_b"]
        assert a.shape == (H * HD, H * HD) and b.shape == (D, H * HD)  # numpy order: (r, in), (out, r)
        delta = alpha / a.shape[0] * b @ a
        torch.testing.assert_close(delta, w_o @ torch.block_diag(*patch.layers[i].attn_weight), atol=1e-5, rtol=1e-4)
        lp, w_g = patch.layers[i], model.model.layers[i].mlp.gate_proj.weight
        a, b = tensors[f"blk.{i}.ffn_gate.weight.lora_a"], tensors[f"blk.{i}.ffn_gate.weight.lora_b"]
        assert a.shape == (4, D) and b.shape == (64, 4)
        torch.testing.assert_close(alpha / 4 * b @ a, w_g @ lp.matrix_b @ lp.matrix_a.T, atol=1e-5, rtol=1e-4)
        a, b = tensors[f"blk.{i}.ffn_down.weight.lora_a"], tensors[f"blk.{i}.ffn_down.weight.lora_b"]
        assert a.shape == (4, 64) and b.shape == (D, 4)
        torch.testing.assert_close(alpha / 4 * b @ a, lp.down_b @ lp.down_a.T, atol=1e-6, rtol=1e-5)


def test_gguf_refuses_constants_and_attn_out_vectors(tiny_dir, tmp_path):
    folder = tiny_dir("llama")
    with pytest.raises(UsageError, match="carry no biases"):
        export_patch(random_patch({"attn", "attn_bias"}), folder, tmp_path / "a", "gguf")
    with pytest.raises(UsageError, match="before the MLP"):
        export_patch(random_patch({"vector"}, "attn_out"), folder, tmp_path / "b", "gguf")


def test_refusals_leave_nothing_behind(tiny_dir, tmp_path):
    folder, out = tiny_dir("llama"), tmp_path / "x"
    with pytest.raises(UsageError, match="needs an MLP output projection, which mixtral lacks"):
        export_patch(random_patch({"down"}), tiny_dir("mixtral"), out, "peft")
    with pytest.raises(UsageError, match="down factors B, A have 32, 50 rows, the model needs 32, 64"):
        export_patch(random_patch({"down"}, inner=50), folder, out, "peft")
    with pytest.raises(UsageError, match="unpatched"):
        export_patch(random_patch({"attn"}, skip=1), folder, out, "peft")
    with pytest.raises(UsageError, match="--to must be one of"):
        export_patch(random_patch({"attn"}), folder, out, "onnx")
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    export_patch(random_patch({"attn"}), folder, out, "peft")
    with pytest.raises(UsageError, match="already exists"):
        export_patch(random_patch({"attn"}), folder, out, "peft")


def test_cli_export_and_its_refusals(tiny_dir, tmp_path):
    folder = tiny_dir("gemma2")
    good, best = tmp_path / "good.st", tmp_path / "best.st"
    write_bytes(good, patch_to_bytes(random_patch({"attn", "vector", "matrix"}, "skip", rank=2)))
    write_bytes(best, patch_to_bytes(random_patch({"attn", "query"})))
    args = ("--to", "peft", "--model", str(folder), "-o", str(tmp_path / "x"))
    r = run_cli("export", str(best), *args)
    assert r.returncode == 2 and b"--mode bakeable" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run_cli("export", str(good), *args)  # gemma2: a norm follows the MLP
    assert r.returncode == 2 and b"--drop-vectors" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    r = run_cli("export", str(good), *args, "--drop-vectors", "--json")
    assert r.returncode == 0, r.stderr
    assert b"warning: dropped the thought vector of blocks 0,1,2 (a norm follows its site" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["ranks"] == [2, 32] and doc["merge_and_unload"] is True and len(doc["dropped"]) == 1
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
