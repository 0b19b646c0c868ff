"""Patch algebra: per-site exactness of merges, negation, concatenation, SVD re-compression, and the merge command."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import tiny
import torch
from conftest import run_cli

from thoughtpatch import load_model
from thoughtpatch.algebra import merge, recompress
from thoughtpatch.apply import Positions, head_shape, installed, layer_hook_specs, mlp_width
from thoughtpatch.architectures import architecture_for
from thoughtpatch.engine import blocks
from thoughtpatch.errors import UsageError
from thoughtpatch.files import save_tensors
from thoughtpatch.formats import fingerprint
from thoughtpatch.patch import LayerPatch, Patch, patch_from_bytes, patch_to_bytes
from thoughtpatch.prompts import free_ids


def fp(lm, **change) -> str:
    """The model's real fingerprint (optionally with some sizes changed)."""
    return json.dumps(fingerprint(lm.model.config) | change, sort_keys=True)


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_model(str(tiny_dir("llama")), dtype="float64")


def random_patch(lm, seed: int, attn: str = "full", rank: int = 3, placement: str = "skip", skip: int = 1) -> Patch:
    """Every part, float64, in this model's sizes and with its fingerprint."""
    parts = {{"full": "attn"}.get(attn, attn), "attn_bias", "vector", "matrix", "query", "gate", "down"}
    cfg = lm.model.config
    shape = (cfg.num_hidden_layers, cfg.hidden_size, *head_shape(lm.model))
    return tiny.random_patch(
        parts, placement, seed=seed, skip=skip, rank=rank, scale=0.1, shape=shape, dtype=torch.float64,
        meta={"fingerprint": fp(lm)}, inner=mlp_width(lm.model),
    )  # fmt: skip


def corrections(lm, patch: Patch, i: int, inputs: dict) -> dict:
    """The correction each of the real hooks makes at block ``i``'s sites, given the same site inputs."""
    blk = blocks(lm.model, architecture_for(lm.model))[i]
    out = {}
    for module, _kind, fn in layer_hook_specs(lm.model, patch, Positions(0), only={i}):
        if module is blk.input_norm:
            fn(module, (), inputs["x"])
        elif module is blk.attn_out:
            out["attn"] = fn(module, (inputs["o"],))[0] - inputs["o"]
        elif module is blk.mlp:
            out["matrix"] = fn(module, (inputs["z"],))[0] - inputs["z"]
        elif module is blk.mlp_out:
            out["down"] = fn(module, (inputs["m"],), inputs["h"]) - inputs["h"]
        else:
            out["vector"] = fn(module, (), inputs["h"]) - inputs["h"]
    return out


@pytest.mark.parametrize(
    "forms", [("full", "full"), ("scalar", "full"), ("scalar", "scalar"), ("cross", "full"), ("scalar", "cross")]
)
def test_merge_corrections_are_the_weighted_sum_per_site(lm, forms):
    a, b = random_patch(lm, 1, forms[0], rank=3), random_patch(lm, 2, forms[1], rank=2)
    wa, wb = 0.7, -1.3
    m = merge([a, b], [wa, wb])
    g = torch.Generator().manual_seed(0)
    d, (h, hd) = lm.model.config.hidden_size, head_shape(lm.model)
    inner = mlp_width(lm.model)
    inputs = {k: torch.randn(2, 5, n, generator=g, dtype=torch.float64) for k, n in (("x", d), ("o", h * hd), ("z", d), ("h", d), ("m", inner))}  # fmt: skip
    for i in a.layers:
        ca, cb, cm = (corrections(lm, p, i, inputs) for p in (a, b, m))
        assert set(cm) == {"attn", "vector", "matrix", "down"}
        for site in cm:
            assert (cm[site] - (wa * ca[site] + wb * cb[site])).abs().max() < 1e-9, site
        assert m.layers[i].rank == 5 and m.layers[i].down_a.shape == (inner, 5)  # concatenated factors: ranks add up
        assert torch.allclose(m.layers[i].matrix(), wa * a.layers[i].matrix() + wb * b.layers[i].matrix(), atol=1e-14)
        assert m.layers[i].attn_weight.dim() == (1 if forms == ("scalar", "scalar") else 3)


@pytest.mark.parametrize("parts", [("vector",), ("down_a", "down_b")])
def test_vector_and_down_sums_applied_to_the_whole_model(lm, parts):
    """Vectors alone, or down maps alone, add up exactly through the whole model (they do not change any site's
    input map)."""
    only = [
        Patch({i: LayerPatch(**{k: getattr(lp, k) for k in parts}) for i, lp in random_patch(lm, s).layers.items()})
        for s in (3, 4)
    ]
    ids = torch.tensor([free_ids(lm.tokenizer, "the lazy dog")])
    base = lm.model(input_ids=ids).logits
    with installed(lm.model, only):
        both = lm.model(input_ids=ids).logits
    with installed(lm.model, merge(only)):
        merged = lm.model(input_ids=ids).logits
    assert (both - merged).abs().max() < 1e-9 and (both - base).abs().max() > 1e-3


def test_merge_with_negation_is_the_base_model_bit_for_bit(lm):
    a = random_patch(lm, 5)
    minus = merge([a], [-1.0])
    assert torch.equal(minus.layers[0].vector, -a.layers[0].vector)
    m = patch_from_bytes(patch_to_bytes(merge([a, minus])))  # through the file format as well
    assert m.layers == {}
    ids = torch.tensor([free_ids(lm.tokenizer, "Tell me a story about a cat")])
    base = lm.model(input_ids=ids).logits
    with installed(lm.model, a):
        assert not torch.equal(lm.model(input_ids=ids).logits, base)
    with installed(lm.model, m):
        assert torch.equal(lm.model(input_ids=ids).logits, base)
    with installed(lm.model, merge([a, a], [1.0, -1.0])):
        assert torch.equal(lm.model(input_ids=ids).logits, base)


def test_recompress_reports_its_error(lm):
    m = merge([random_patch(lm, 6, rank=3), random_patch(lm, 7, rank=2)])
    same, rep = recompress(m, 5)
    assert rep["relative_error"] < 1e-12
    for i, lp in m.layers.items():
        assert (same.layers[i].matrix() - lp.matrix()).abs().max() < 1e-12
    low, rep = recompress(m, 2)
    num = den = 0.0
    for i, lp in m.layers.items():
        full, approx = lp.matrix(), low.layers[i].matrix()
        err = float((full - approx).norm() / full.norm())
        assert low.layers[i].rank == 2 and math.isclose(rep["per_block"][str(i)], err, rel_tol=1e-9)
        # the best rank-2 approximation: the error is exactly the energy beyond the 2nd singular value
        s = torch.linalg.svdvals(full)
        assert math.isclose(err, float(s[2:].norm() / s.norm()), rel_tol=1e-9)
        num, den = num + float((full - approx).norm() ** 2), den + float(full.norm() ** 2)
    assert math.isclose(rep["relative_error"], math.sqrt(num / den), rel_tol=1e-9) and rep["relative_error"] > 0.01
    for i, lp in m.layers.items():  # the down maps the same way, reported apart
        full, approx = (p.down_b @ p.down_a.T for p in (lp, low.layers[i]))
        s = torch.linalg.svdvals(full)
        assert low.layers[i].down_a.shape[1] == 2 and math.isclose(rep["down"]["per_block"][str(i)], float((full - approx).norm() / full.norm()), rel_tol=1e-9)  # fmt: skip
        assert math.isclose(rep["down"]["per_block"][str(i)], float(s[2:].norm() / s.norm()), rel_tol=1e-9)
    assert rep["down"]["relative_error"] > 0.01 and low.meta["method.down_rank"] == "2"


def test_merge_refuses_what_it_cannot_sum_exactly(lm):
    a = random_patch(lm, 8)
    with pytest.raises(UsageError, match="leading tokens"):
        merge([a, random_patch(lm, 9, skip=0)])
    m = merge([a, random_patch(lm, 9, skip=0)], skip=1)
    assert m.skip == 1 and json.loads(m.meta["merge.parent_skips"]) == [1, 0]
    with pytest.raises(UsageError, match="different sites"):
        merge([a, random_patch(lm, 9, placement="attn_out")])
    other = random_patch(lm, 9)
    other.meta["fingerprint"] = fp(lm, hidden_size=64)
    with pytest.raises(UsageError, match="different base models"):
        merge([a, other])
    assert merge([a, other], force=True).layers
    short = random_patch(lm, 9)
    short.layers[1].vector = short.layers[1].vector[:7]
    with pytest.raises(UsageError, match="layer 1 vector: shapes differ"):
        merge([a, short])
    with pytest.raises(UsageError, match="2 weights for 1 patches"):
        merge([a], [1.0, 2.0])


# ------------------------------------------------------------------------------------------ the merge command
@pytest.fixture(scope="module")
def files(lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    for name, seed in (("a", 11), ("b", 12)):
        (d / f"{name}.safetensors").write_bytes(patch_to_bytes(random_patch(lm, seed)))
    return d


def test_merge_command_is_deterministic_and_records_parents(files, lm):
    d = files
    args = ("merge", str(d / "a.safetensors"), str(d / "b.safetensors"), "--weights", "1,-0.5", "-q")
    r1, r2 = run_cli(*args, "-o", str(d / "m1.safetensors")), run_cli(*args, "-o", str(d / "m2.safetensors"))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr.decode()
    assert (d / "m1.safetensors").read_bytes() == (d / "m2.safetensors").read_bytes()
    m = patch_from_bytes((d / "m1.safetensors").read_bytes())
    parents = json.loads(m.meta["merge.parents"])
    assert [p["weight"] for p in parents] == [1.0, -0.5]
    assert parents[0]["sha256"] == hashlib.sha256((d / "a.safetensors").read_bytes()).hexdigest()
    assert m.meta["fingerprint"] == fp(lm) and m.meta["method.construction"] == "merge"
    r = run_cli("merge", str(d / "m1.safetensors"), "--method", "svd", "--rank", "2", "-o", str(d / "s.safetensors"), "--json")  # fmt: skip
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and 0 < doc["recompression"]["relative_error"] < 1
    assert set(doc["recompression"]["per_block"]) == {"0", "1", "2"} and set(doc["ranks"].values()) == {2}


@pytest.mark.parametrize("case", ["truncated", "shapes", "two_stdin"])
def test_merge_bad_input_leaves_files_untouched(files, lm, case):
    d = files
    good = (d / "a.safetensors").read_bytes()
    bad = d / f"bad-{case}.safetensors"
    args = [str(d / "a.safetensors"), str(bad)]
    p = random_patch(lm, 13)
    if case == "shapes":
        p.layers[0].matrix_a, p.layers[0].matrix_b = torch.zeros(5, 2), torch.zeros(5, 2)
    elif case == "two_stdin":
        args = ["-", "-"]
    bad.write_bytes(good[: len(good) // 2] if case == "truncated" else patch_to_bytes(p))
    out = d / "keep.safetensors"
    out.write_bytes(b"the user's file")
    r = run_cli("merge", *args, "-o", str(out), stdin=good)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr.decode(), r.stderr.decode()
    assert out.read_bytes() == b"the user's file"
    expect = {"truncated": "beyond or unlike the", "shapes": "does not fit the hidden size",
              "two_stdin": "only one input"}[case]  # fmt: skip
    assert expect in lines[0], lines[0]


def test_bad_files_are_named_clearly(lm):
    with pytest.raises(UsageError, match="not a thoughtpatch patch"):
        patch_from_bytes(save_tensors({"w": torch.zeros(3)}, {"format": "something.else"}), "patch x")
    with pytest.raises(UsageError, match="not a safetensors file"):
        patch_from_bytes(b"\xff" * 64, "patch x")
    for part, value in (("matrix_b", float("inf")), ("vector", float("nan"))):
        bad = random_patch(lm, 14)
        getattr(bad.layers[1], part).view(-1)[0] = value
        with pytest.raises(UsageError, match=f"layers.1.{'matrix.B' if part == 'matrix_b' else part}.*NaN or Inf"):
            patch_from_bytes(patch_to_bytes(bad), "patch x")
