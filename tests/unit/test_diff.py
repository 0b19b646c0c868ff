"""Diffs: model vs model recovers a known low-rank change, patch vs patch, patch vs its base model."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest
import torch
from conftest import run_cli
from matplotlib import pyplot as plt

from thoughtpatch import load_model
from thoughtpatch.algebra import merge
from thoughtpatch.apply import installed
from thoughtpatch.bake import bake_checkpoint, patch_record
from thoughtpatch.compare import diff_patch_model, diff_patches, effective_rank, functional_diff
from thoughtpatch.patch import LayerPatch, Patch, patch_from_bytes
from thoughtpatch.plots import diff_figure
from thoughtpatch.prompts import free_ids


@pytest.fixture(scope="module")
def changed(tiny_dir, tmp_path_factory):
    """A pico model baked (``apply --save``'s code) from a patch of rank-2 thought matrices M_l: its MLP input
    matrices became W (I + M_l)."""
    base_dir = tiny_dir("llama")
    lm = load_model(str(base_dir))
    g = torch.Generator().manual_seed(0)
    d = lm.model.config.hidden_size
    patch = Patch(
        {
            i: LayerPatch(
                matrix_b=0.45 * torch.randn(d, 2, generator=g), matrix_a=0.45 * torch.randn(d, 2, generator=g)
            )
            for i in range(lm.model.config.num_hidden_layers)
        },
        skip=0,
    )
    folder = tmp_path_factory.mktemp("changed") / "baked"
    bake_checkpoint(base_dir, folder, [patch], [patch_record(patch, "matrices.safetensors", "0" * 64, 1.0)])
    return base_dir, folder, {i: lp.matrix().double() for i, lp in patch.layers.items()}


@pytest.fixture(scope="module")
def recovered(changed):
    """``diff BASE CHANGED -o FILE``: the report and the low-rank patch file."""
    base_dir, folder, _ = changed
    out = folder.parent / "recovered.safetensors"
    r = run_cli("diff", str(base_dir), str(folder), "-o", str(out), "--json", "-q")
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout), out


def test_model_diff_recovers_the_change(changed, recovered):
    base_dir, folder, ms = changed
    doc, out = recovered
    names = {t["name"] for t in doc["changed_tensors"]}
    assert names == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in ms for p in ("gate", "up")}
    assert all(t["in_patch"] for t in doc["changed_tensors"])
    assert doc["max_relative_error"] < 1e-4 and all(row["rank"] == 2 for row in doc["mlp_input_patch"])
    patch = patch_from_bytes(out.read_bytes())
    assert patch.skip == 0 and patch.bakeable and "fingerprint" in patch.meta
    for i, m in ms.items():
        rec = patch.layers[i].matrix().double()
        assert float((rec - m).norm() / m.norm()) <= 1e-4
    # the recovered patch, installed on the base, behaves like the changed model; its weight change matches
    base, tuned = load_model(str(base_dir)), load_model(str(folder))
    ids = torch.tensor([free_ids(base.tokenizer, "Tell me a story about a dog")])
    with torch.no_grad(), installed(base.model, patch):
        assert (base.model(input_ids=ids).logits - tuned.model(input_ids=ids).logits).abs().max() < 1e-3
    rows = diff_patch_model(patch, base.model)["layers"]
    for row, ref in zip(rows, doc["mlp_input_patch"], strict=True):
        assert abs(row["mlp_in_rel_change"] - ref["rel_change"]) < 1e-5 * ref["rel_change"]


def test_patch_vs_patch():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    a = Patch({0: LayerPatch(vector=r(16), matrix_a=r(16, 3), matrix_b=r(16, 3), attn_weight=r(2))})
    mix = r(3, 3)  # same subspaces, other matrix
    b = Patch({0: LayerPatch(vector=r(16), matrix_a=a.layers[0].matrix_a @ mix, matrix_b=a.layers[0].matrix_b),
               1: LayerPatch(vector=r(16))})  # fmt: skip
    same = diff_patches(a, a)["layers"][0]
    assert abs(same["vector_cosine"] - 1) < 1e-12 and same["matrix_rel_diff"] == 0 and same["attn_rel_diff"] == 0
    assert max(same["principal_angles_deg"]) < 1e-4 and abs(same["write_overlap"] - 1) < 1e-9
    neg = diff_patches(a, merge([a], [-1.0]))["layers"][0]
    assert abs(neg["vector_cosine"] + 1) < 1e-12
    rows = diff_patches(a, b)["layers"]
    assert abs(rows[0]["write_overlap"] - 1) < 1e-9 and abs(rows[0]["read_overlap"] - 1) < 1e-9
    assert rows[0]["matrix_rel_diff"] > 0.1 and rows[1]["vector_norm_a"] == 0  # block 1 only in b
    assert abs(rows[0]["effective_rank_a"] - effective_rank(a.layers[0].matrix())) < 1e-12
    assert 1 < rows[0]["effective_rank_a"] <= 3
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)
    # the figure: a panel per quantity the report has per block, then the principal angles
    fig = diff_figure(diff_patches(a, b))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "thought vector", "thought matrix", "attention map", "agreement (1: the same)", "difference",
        "effective rank of the thought matrix", "principal angles, matrix write spaces",
    ]  # fmt: skip
    assert [len(ax.lines) for ax in fig.axes[:6]] == [2, 2, 2, 3, 2, 2] and len(
        fig.axes[6].collections[0].get_offsets()
    ) == 3
    plt.close(fig)
    only_vectors = Patch({0: LayerPatch(vector=r(16))})
    fig = diff_figure(diff_patches(only_vectors, only_vectors))
    assert [ax.get_title() for ax in fig.axes] == ["thought vector", "agreement (1: the same)"]
    plt.close(fig)


def _png_size(path) -> tuple[int, int]:
    """Width and height of a PNG file, read back with matplotlib (which refuses anything but a whole PNG)."""
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    h, w, _ = mpimg.imread(path).shape
    return w, h


def test_patch_vs_model_functional(changed, recovered, tmp_path, tiny_dir):
    base_dir, out = changed[0], recovered[1]
    (tmp_path / "asks.txt").write_text("the lazy dog\nWhat is the capital of France?\n")
    png = tmp_path / "pm.png"
    r = run_cli("diff", str(out), "--prompts", str(tmp_path / "asks.txt"), "--json", "-q", "--plot", str(png))
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["kind"] == "patch_vs_model" and len(doc["layers"]) == 3 and doc["plot"] == str(png)
    assert _png_size(png) == (2 * 484, 363)  # two panels (weight change, KL per prompt), 4.4 x 3.3 in at 110 dpi
    f = doc["functional"]
    assert f["prompts"] == 2 and f["kl"] > 0 and 0 <= f["top1"] <= 1
    lm = load_model(str(base_dir))
    patch = patch_from_bytes(out.read_bytes())
    asks = [free_ids(lm.tokenizer, q) for q in ("the lazy dog",)]
    assert functional_diff(lm.model, merge([patch, patch], [1.0, -1.0]), asks)["kl"] == 0.0
    r = run_cli("diff", str(base_dir), str(tiny_dir("gpt2")), "-o", str(out))
    assert r.returncode == 2 and "differ in architecture" in r.stderr.decode() and patch_from_bytes(out.read_bytes())
    r = run_cli("diff", str(out), str(out), "--plot", str(tmp_path / "pp.png"))  # the human-readable table
    assert r.returncode == 0 and "patch vs patch" in r.stdout.decode() and "write_overlap" in r.stdout.decode()
    assert _png_size(tmp_path / "pp.png") == (3 * 484, 2 * 363)  # matrix norm, agreement, difference, rank, angles
    for bad in (str(tmp_path / "no" / "x.png"), "-"):
        r = run_cli("diff", str(out), str(out), "--plot", bad)
        err = r.stderr.decode()
        assert r.returncode == 2 and err.startswith("thoughtpatch: error: ") and len(err.splitlines()) == 1
        assert err.startswith("thoughtpatch: error: --plot") and r.stdout == b""
    assert not (tmp_path / "no").exists()
