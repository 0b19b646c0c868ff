"""The down map (``layers.l.down.A``/``down.B``): file checks, description, fitting switches, refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import tiny
import torch
from tiny import random_patch

from thoughtpatch import Prompt, align, load_model
from thoughtpatch.apply import installed, mlp_width
from thoughtpatch.condense import CondenseConfig, MatrixStats, condense, cv_ridge
from thoughtpatch.constants import PRESETS
from thoughtpatch.errors import UsageError
from thoughtpatch.evaluate import targets_for
from thoughtpatch.patch import describe_patch, patch_from_bytes, patch_to_bytes, validate_for
from thoughtpatch.schema import fingerprint

IDS = torch.tensor([[5, 17, 33, 101, 7, 250, 64, 3]])


def test_down_parts_round_trip_and_are_described():
    patch = random_patch({"vector", "down"}, seed=1, rank=3)
    back = patch_from_bytes(patch_to_bytes(patch))
    for i, lp in patch.layers.items():
        assert torch.equal(back.layers[i].down_a, lp.down_a) and torch.equal(back.layers[i].down_b, lp.down_b)
    assert "down" in json.loads(back.meta["sites"]) and back.bakeable
    row = describe_patch(back)["layers"][-1]
    assert row["down_rank"] == 3
    assert row["down_norm"] == pytest.approx(float((lp.down_b @ lp.down_a.T).norm()), rel=1e-6)
    plain = random_patch({"vector"}, seed=1)
    assert "down" not in json.loads(patch_from_bytes(patch_to_bytes(plain)).meta["sites"])
    assert "down_rank" not in describe_patch(plain)["layers"][0]


def _tampered(**change):
    patch = random_patch({"down"}, seed=2)
    lp = patch.layers[0]
    for k, v in change.items():
        setattr(lp, k, v(lp))
    return patch


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"down_b": lambda lp: None}, "needs down.A and down.B"),
        ({"down_a": lambda lp: lp.down_a[:, :1]}, "same number of columns"),
    ],
)
def test_unpaired_down_factors_are_refused(change, message):
    with pytest.raises(UsageError, match=message):
        patch_from_bytes(patch_to_bytes(_tampered(**change)))


def test_down_factors_must_fit_the_model():
    patch = _tampered(down_b=lambda lp: torch.zeros(31, lp.down_b.shape[1]))
    patch.meta["fingerprint"] = json.dumps(fingerprint(tiny.config("llama")))
    with pytest.raises(UsageError, match="down.B does not fit the hidden size 32"):
        patch_from_bytes(patch_to_bytes(patch))
    with pytest.raises(UsageError, match="down factors B, A have 31, 64 rows, the model needs 32, 64"):
        validate_for(patch, 32, 3, 4, 8, inner=64)
    good = random_patch({"down"}, seed=2)
    validate_for(good, 32, 3, 4, 8)  # the width unknown: only the hidden size is checked
    with pytest.raises(UsageError, match="needs 32, 128"):
        validate_for(good, 32, 3, 4, 8, inner=128)


def test_a_mixture_of_experts_refuses_a_down_patch(tiny_dir):
    model = load_model(str(tiny_dir("mixtral"))).model
    assert mlp_width(model) is None
    bad = random_patch({"down"}, seed=3)
    with (
        pytest.raises(UsageError, match="block 0: the patch has a down map.*mixture of experts"),
        installed(model, bad),
    ):
        pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing left installed


def _fit(lm, cfg):
    prompt = Prompt("You are a pirate. Speak like a pirate in every answer.")
    queries = [f"{a} {b}" for a in ("the dog", "a cat", "my story") for b in ("jumps", "is lazy", "1 2 3")]
    return condense(lm.model, targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, prompt, queries), 2), cfg)


def test_condense_fits_and_records_the_down_map_where_the_family_has_one(tiny_dir):
    cfg = CondenseConfig(attn="none", matrix=False, skip=0, bakeable=True, down=True, down_rank=4)
    lm = load_model(str(tiny_dir("gpt2")))
    patch = _fit(lm, cfg)
    inner = mlp_width(lm.model)
    assert inner == 128 and patch.bakeable
    assert all(lp.down_a.shape == (inner, 4) and lp.down_b.shape == (32, 4) for lp in patch.layers.values())
    assert {k: patch.meta[f"method.{k}"] for k in ("down", "down_ridge", "down_rank")} == {
        "down": "true",
        "down_ridge": "1.0",
        "down_rank": "4",
    }
    moe = _fit(load_model(str(tiny_dir("mixtral"))), cfg)  # no output projection: the switch is turned off
    assert all(lp.down_a is None for lp in moe.layers.values())
    assert not any(k.startswith("method.down") for k in moe.meta)


def test_bad_down_options_are_refused():
    for cfg, message in (
        (CondenseConfig(down=True, construction="parallel"), "needs the sequential construction"),
        (CondenseConfig(down=True, down_rank=0), "--down-rank a positive integer"),
        (CondenseConfig(down=True, down_ridge=-1.0), "--down-ridge must be >= 0"),
    ):
        with pytest.raises(UsageError, match=message):
            cfg.validate()
    CondenseConfig(attn="none", vector=False, matrix=False, down=True).validate()  # the down map alone is a patch


def test_baking_refuses_down_factors_of_another_width(tiny_dir, tmp_path):
    from thoughtpatch.bake import bake_checkpoint

    patch = random_patch({"down"}, seed=4, inner=50)
    with pytest.raises(UsageError, match="p: layer 0 down factors B, A have 32, 50 rows, the model needs 32, 128"):
        bake_checkpoint(tiny_dir("gpt2"), tmp_path / "out", [patch], [{"file": "p"}])
    assert list(tmp_path.iterdir()) == []


def test_model_diff_recovers_a_baked_down_map(tiny_dir, tmp_path):
    """``diff BASE BAKED``: the output projections' change comes back as down factors (and the matrix's as a
    matrix); patch vs its base reports the same weight change."""
    from conftest import run_cli

    from thoughtpatch.bake import bake_checkpoint, patch_record
    from thoughtpatch.compare import diff_patch_model, diff_patches

    src = tiny_dir("gpt2")  # Conv1D: the output projection stored transposed
    patch = random_patch({"down", "matrix"}, seed=6, rank=2, inner=128)
    bake_checkpoint(src, tmp_path / "baked", [patch], [patch_record(patch, "p", "0" * 64, 1.0)])
    out = tmp_path / "recovered.safetensors"
    r = run_cli("diff", str(src), str(tmp_path / "baked"), "-o", str(out), "--json", "-q")
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert all(t["in_patch"] for t in doc["changed_tensors"])
    assert [row["rank"] for row in doc["down_patch"]] == [2] * 3 and doc["max_relative_error"] < 1e-4
    back = patch_from_bytes(out.read_bytes())
    for i, lp in patch.layers.items():
        want, got = lp.down_b @ lp.down_a.T, back.layers[i].down_b @ back.layers[i].down_a.T
        assert float((got - want).norm() / want.norm()) <= 1e-4
    rows = diff_patch_model(back, load_model(str(src)).model)["layers"]
    for row, ref in zip(rows, doc["down_patch"], strict=True):
        assert row["mlp_out_rel_change"] == pytest.approx(ref["rel_change"], rel=1e-5)
    d = diff_patches(patch, back)["layers"][0]
    assert d["down_rel_diff"] <= 1e-4 and d["down_norm_a"] == pytest.approx(d["down_norm_b"], rel=1e-4)


def test_cli_fits_inspects_merges_and_refuses_down_options(tiny_dir, tmp_path):
    from conftest import run_cli

    (tmp_path / "prompt.txt").write_text("You are a pirate. Speak like a pirate.\n")
    (tmp_path / "fit.txt").write_text("the dog jumps\na cat is lazy\ntell me a story\n1 2 3 4\nthe fox please\n")
    args = ("transmute", str(tmp_path / "prompt.txt"), "--model", str(tiny_dir("llama")), "--probes")
    args += (str(tmp_path / "fit.txt"), "--answer-tokens", "2", "--bakeable", "-q", "-o")
    out = tmp_path / "p.safetensors"
    r = run_cli(*args, str(out), "--down-rank", "3", "--json")  # a rank asks for the down map
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["method"]["down_rank"] == "3" and json.loads(r.stdout)["bakeable"]
    patch = patch_from_bytes(out.read_bytes())
    assert all(lp.down_a.shape == (64, 3) for lp in patch.layers.values())
    r = run_cli("inspect", str(out), "--json")
    assert r.returncode == 0 and {"down_rank", "down_norm"} <= set(json.loads(r.stdout)["layers"][0])
    r = run_cli("merge", str(out), str(out), "--method", "svd", "--rank", "2", "-o", str(tmp_path / "m.st"))
    assert r.returncode == 0 and b"SVD of the down maps to rank 2: relative error" in r.stderr, r.stderr.decode()
    assert all(lp.down_a.shape == (64, 2) for lp in patch_from_bytes((tmp_path / "m.st").read_bytes()).layers.values())
    r = run_cli(*args, str(tmp_path / "bad.st"), "--down-ridge", "-1")
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1 and b"--down-ridge must be >= 0" in r.stderr
    assert not (tmp_path / "bad.st").exists()


@pytest.mark.parametrize(("rows", "width"), [(240, 40), (60, 90)])  # more rows than features, and fewer
def test_cv_ridge_picks_the_ridge_with_the_least_held_out_error(rows, width):
    gen = torch.Generator().manual_seed(rows)
    m = torch.randn(3, width, generator=gen)
    parts = []
    for _ in range(4):
        x = torch.randn(rows // 4, width, generator=gen) * torch.linspace(0.1, 3, width)
        parts.append((x, x @ m.T + 2 * torch.randn(rows // 4, 3, generator=gen)))
    grid = (1e-3, 1e-2, 0.1, 1.0, 10.0)

    def held_out_error(r):  # fit on even blocks, score the odd ones, and the other way round
        total = 0.0
        for side in (0, 1):
            x, y = (torch.cat(t).double() for t in zip(*parts[side::2], strict=True))
            xt, yt = (torch.cat(t).double() for t in zip(*parts[1 - side :: 2], strict=True))
            s = x.T @ x
            fit = torch.linalg.solve(s + r * torch.trace(s) / width * torch.eye(width, dtype=s.dtype), x.T @ y)
            total += float(((yt - xt @ fit) ** 2).sum())
        return total

    def folds(blocks):  # even and odd blocks' statistics
        out = (MatrixStats(), MatrixStats())
        for n, (x, y) in enumerate(blocks):
            out[n % 2].add(None, x, y)
        return out

    errors = [held_out_error(r) for r in grid]
    assert cv_ridge(folds(parts), grid) == grid[errors.index(min(errors))]
    assert len(set(errors)) == len(grid) and errors.index(min(errors)) not in (0, len(grid) - 1)
    assert cv_ridge(folds(parts[:1]), grid) is None  # one block: no second fold


def test_the_down_ridge_chosen_per_block_is_recorded_and_a_ridge_given_fixes_it(tiny_dir):
    from thoughtpatch.cli import _config

    lm = load_model(str(tiny_dir("llama")))
    base = CondenseConfig(attn="none", matrix=False, skip=0, bakeable=True, down=True, down_rank=4, batch_size=4)
    grid = (0.01, 1.0, 100.0)
    patch = _fit(lm, replace(base, down_ridge_grid=grid))
    chosen = [float(r) for r in patch.meta["method.down_ridge_chosen"].split(",")]
    assert len(chosen) == len(patch.layers) and set(chosen) <= set(grid)
    assert patch.meta["method.down_ridge_grid"] == "0.01,1.0,100.0"
    one = _fit(lm, replace(base, down_ridge=100.0, down_ridge_grid=(100.0,)))
    fixed = _fit(lm, replace(base, down_ridge=100.0))
    for i, lp in fixed.layers.items():
        assert torch.equal(one.layers[i].down_a, lp.down_a) and torch.equal(one.layers[i].down_b, lp.down_b)
    assert _config("bakeable", down_ridge=2.0).down_ridge_grid is None
    with pytest.raises(UsageError, match="--down-ridge must be >= 0"):
        replace(base, down_ridge_grid=(-1.0,)).validate()


@pytest.mark.parametrize("family", ["llama", "gemma3", "granite", "olmo2", "gpt2", "gpt_neox"])
def test_passes_kept_for_the_down_map_and_the_advance_give_the_same_patch(tiny_dir, monkeypatch, family):
    """The down map reads the pass the vector's fit ran (the vector joins after the block), and the states
    advance from it (mid-residual, the MLP's hidden activations and output, rejoined through a norm after the
    MLP where the family has one): the same patch as running the block for each, with fewer block runs.
    Parallel blocks (the MLP reads the block input) run the block each time."""
    import thoughtpatch.condense as condense_module

    lm = load_model(str(tiny_dir(family)), dtype="float64")
    pairs = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, Prompt("You are a pirate."), tiny.QUERIES), 3)
    cfg = replace(PRESETS["bakeable"], down_rank=4, batch_size=2)
    runs = {"fast": 0, "slow": 0}
    run_free = condense_module._run_free

    def counted(name):
        def run(*a):
            runs[name] += 1
            return run_free(*a)

        return run

    monkeypatch.setattr(condense_module, "_run_free", counted("fast"))
    fast = condense(lm.model, pairs, cfg)
    monkeypatch.setattr(condense_module, "_run_free", counted("slow"))
    monkeypatch.setattr(condense_module, "_keep", lambda *a: False)
    slow = condense(lm.model, pairs, cfg)
    layers, chunks = lm.model.config.num_hidden_layers, 3
    assert runs["slow"] - runs["fast"] == (
        0 if family == "gpt_neox" else chunks * layers * (1 + bool(fast.layers[0].vector is not None))
    )
    for i, lp in slow.layers.items():
        for k, t in lp.tensors().items():
            assert torch.allclose(fast.layers[i].tensors()[k], t, rtol=1e-7, atol=1e-9), (family, i, k)
