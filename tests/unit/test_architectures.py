"""Every declared family: the parallel and mixture-of-experts block forms beyond the identity itself."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from test_extract_exact import PROMPTS
from tiny import FAMILIES, QUERIES, SPECS, config

from thoughtpatch import ARCHITECTURES, align, architecture_for, check, extract, load_model, teacher_answers
from thoughtpatch.apply import installed
from thoughtpatch.condense import condense
from thoughtpatch.engine import blocks, hooks, mid_taps
from thoughtpatch.errors import UsageError
from thoughtpatch.patch import LayerPatch, Patch

MOE = ["mixtral", "qwen2_moe"]  # plain routed experts; with a gated shared expert (all four: the identity test)


def test_every_declaration_has_a_pico_model():
    assert {a.name for a in ARCHITECTURES} == set(FAMILIES)
    for family in SPECS:
        assert architecture_for(config(family)).name == family


@pytest.mark.parametrize("family", MOE)
def test_patched_router_reproduces_the_prompted_routing(tiny_dir, family):
    lm = load_model(str(tiny_dir(family)), dtype="float64")
    pairs = teacher_answers(lm.model, lm.tokenizer, align(lm.tokenizer, PROMPTS[0], QUERIES), 3)
    updates = extract(lm.model, pairs, batch_size=3)
    routing: dict = {}
    assert check(lm.model, updates, routing=routing) <= 1e-9
    assert routing["choices"] == updates.n_tokens * updates.n_layers and routing["differ"] == 0
    for u in updates.u:  # without the MLP-input updates the context's routing is lost
        u.zero_()
    check(lm.model, updates, routing=routing)
    assert routing["differ"] > 0


@pytest.mark.parametrize("family", ["mixtral", "gptj"])
def test_thought_matrix_acts_on_what_the_mlp_reads(tiny_dir, family):
    """``(I + M) z`` reaches every module that reads z (router and experts included), and nothing else."""
    lm = load_model(str(tiny_dir(family)), dtype="float64")
    blk = blocks(lm.model, architecture_for(lm.model))[1]
    d = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(d, 2, generator=g, dtype=torch.float64) for _ in range(2))
    seen: dict[str, list] = {}

    def record(name):
        return lambda m, args, out: seen.setdefault(name, []).append((args[0].clone(), out))

    handles = [blk.mlp_norm.register_forward_hook(record("norm"))]
    handles += [w.register_forward_hook(record(f"in{i}")) for i, w in enumerate(blk.mlp_inputs)]
    handles.append(blk.attn_out.register_forward_hook(record("attn")))
    ids = torch.tensor([[5, 6, 7, 8]])
    with installed(lm.model, Patch({1: LayerPatch(matrix_a=a, matrix_b=b)}, "skip", 0)):
        lm.model(input_ids=ids)
    lm.model(input_ids=ids)
    for h in handles:
        h.remove()
    (_, z), _ = seen["norm"]
    z = z.reshape(-1, d)
    for i in range(len(blk.mlp_inputs)):
        (x_patched, _), (x_base, _) = seen[f"in{i}"]
        torch.testing.assert_close(x_patched.reshape(-1, d), z + z @ a @ b.T)
        torch.testing.assert_close(x_base.reshape(-1, d), z)
    (o_patched, _), (o_base, _) = seen["attn"]
    assert torch.equal(o_patched, o_base)  # the attention (which may share the norm) is untouched


@pytest.mark.parametrize("family", ["llama", "granite", "gptj"])
def test_attn_out_vector_moves_the_mid_residual_by_itself(tiny_dir, family):
    """An ``attn_out`` vector ``v`` adds exactly ``v`` to the mid-residual, also where the family scales the
    attention branch before it joins the residual (Granite's residual_multiplier)."""
    lm = load_model(str(tiny_dir(family)), dtype="float64")
    blk = blocks(lm.model, architecture_for(lm.model))[1]
    v = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def mid(patches):
        seen: dict = {}
        with installed(lm.model, patches), hooks(mid_taps(blk, seen)):
            lm.model(input_ids=torch.tensor([[5, 6, 7, 8]]))
        return seen["r"]

    moved = mid([Patch({1: LayerPatch(vector=v)}, "attn_out", 0)]) - mid([])
    torch.testing.assert_close(moved, v.expand_as(moved), rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["gptj", "mixtral"])
def test_transmute_apply_eval_end_to_end(tmp_path, tiny_dir, family):
    (tmp_path / "prompt.txt").write_text("You are a pirate. Speak like a pirate.\n")
    (tmp_path / "fit.txt").write_text("\n".join(QUERIES[:4]) + "\n")
    (tmp_path / "held.txt").write_text("the lazy fox\nplease tell me\n")
    model, patch = str(tiny_dir(family)), str(tmp_path / "p.safetensors")
    if family == "mixtral":  # extract --check reports the routing of a mixture of experts
        r = run_cli("extract", str(tmp_path / "prompt.txt"), "--model", model, "--probes", str(tmp_path / "fit.txt"),
                    "--dtype", "float64", "--check", "--json", "--answer-tokens", "2", "-o", str(tmp_path / "u.st"))  # fmt: skip
        doc = json.loads(r.stdout)
        assert doc["max_logit_error"] <= 1e-9 and doc["expert_choices"]["differ"] == 0, r.stderr.decode()
        assert doc["expert_choices"]["choices"] == doc["tokens"] * 3
    r = run_cli("transmute", str(tmp_path / "prompt.txt"), "--model", model, "--probes", str(tmp_path / "fit.txt"),
                "-o", patch, "--compact", "--vector", "--answer-tokens", "2", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("inspect", patch, "--json")
    layers = json.loads(r.stdout)["layers"]
    assert len(layers) == 3 and all(lp["vector_norm"] > 0 and lp["kv_slots"] >= 1 for lp in layers)
    r = run_cli("apply", patch, "--model", model, "-p", "hello", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["answers"]) == 1, r.stderr.decode()
    r = run_cli("eval", patch, "--model", model, "--prompt-file", str(tmp_path / "prompt.txt"), "--queries",
                str(tmp_path / "held.txt"), "--probes", str(tmp_path / "fit.txt"), "--answer-tokens", "2", "--json", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    kl = json.loads(r.stdout)["methods"]
    assert kl["patch"]["kl"] >= 0 and kl["none"]["kl"] > 0


def test_unknown_variant_says_which_flag_and_how_to_add_one():
    from transformers import FalconConfig

    with pytest.raises(UsageError, match=r"new_decoder_architecture=True.*docs/architectures.md"):
        architecture_for(FalconConfig(new_decoder_architecture=True))


def test_coverage_table_is_generated_from_the_declarations():
    """docs/coverage.md is what scripts/coverage.py renders from docs/coverage.json and today's declarations
    (its "bakes" column included), with one row per family."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).parents[2]
    spec = importlib.util.spec_from_file_location("coverage_script", root / "scripts" / "coverage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    doc = json.loads((root / "docs" / "coverage.json").read_text())
    assert set(doc["pico"]) == {a.name for a in ARCHITECTURES}
    assert all(row["pico_error"] <= 1e-9 for row in doc["pico"].values())
    assert (root / "docs" / "coverage.md").read_text() == script.table(doc)


@pytest.mark.parametrize("family", ["olmo2"])
def test_condensed_patch_moves_towards_the_prompt(tiny_dir, family):
    """Post-norm blocks (parallel and MoE: the CLI test above): a small patch (slots, head scales, vectors,
    rank-2 matrices) helps."""
    from dataclasses import replace

    from thoughtpatch.constants import PRESETS
    from thoughtpatch.evaluate import evaluate, targets_for

    lm = load_model(str(tiny_dir(family)), dtype="float64")
    prompt = PROMPTS[0]
    fit_q = [f"{a} {b}" for a in ("the dog", "a cat", "the fox") for b in ("jumps", "is lazy", "please", "1 2 3")]
    fit = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, prompt, fit_q), 3)
    held = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, prompt, ["the quick dog", "a lazy cat 5"]), 3)
    patch = condense(lm.model, fit, replace(PRESETS["compact"], vector=True, matrix=True, rank=2))
    assert all(lp.vector is not None and lp.matrix_a is not None for lp in patch.layers.values())
    res = evaluate(lm.model, held, {"none": None, "compact": patch})
    assert res["compact"]["kl"] < res["none"]["kl"], res
