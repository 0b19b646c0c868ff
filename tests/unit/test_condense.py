"""Condensation: the least-squares parts, their additive statistics, truncation and sinks."""

from __future__ import annotations

import tempfile
from dataclasses import replace

import pytest
import torch

from thoughtpatch import Prompt, align, extract, load_model, teacher_answers
from thoughtpatch.condense import (
    Affine,
    CondenseConfig,
    MatrixStats,
    _predict_attention,
    condense,
    condense_updates,
    fit_attention,
    truncate,
)
from thoughtpatch.errors import UsageError

QUERIES = ["What is the capital of France?", "Tell me a story about a cat", "1 2 3", "dog and fox"]


def _updates(lm, queries=QUERIES):
    pairs = teacher_answers(lm.model, lm.tokenizer, align(lm.tokenizer, Prompt("You are a pirate."), queries), 2)
    return extract(lm.model, pairs)


def test_one_token_reproduces_the_exact_update(tiny_dir):
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    up = _updates(lm)
    for layer in (0, 2):
        t = 5  # a single probe token
        stats = MatrixStats().add(up.delta[layer][t : t + 1], up.a[layer][t : t + 1], up.u[layer][t : t + 1])
        assert torch.allclose(stats.vector(), up.delta[layer][t], atol=1e-12)
        m, lam = stats.matrix(0.0)  # no ridge: the minimum-norm fit is the rank-1 update u a^T / |a|^2
        a, u = up.a[layer][t], up.u[layer][t]
        assert lam == 0.0
        assert torch.allclose(m, torch.outer(u, a) / a.dot(a), atol=1e-10)
        assert torch.allclose(m @ a, u, atol=1e-10)


def test_statistics_of_shards_add_up(tiny_dir):
    lm = load_model(str(tiny_dir("qwen2")), dtype="float64")
    up = _updates(lm)
    n = up.n_tokens
    parts = [slice(0, n // 3), slice(n // 3, n)]
    layer = 1
    whole = MatrixStats().add(up.delta[layer], up.a[layer], up.u[layer])
    shards = [MatrixStats().add(up.delta[layer][s], up.a[layer][s], up.u[layer][s]) for s in parts]
    summed = shards[0] + shards[1]
    assert summed.n == whole.n
    for k in ("s_delta", "s_aa", "s_ua"):
        assert torch.allclose(getattr(summed, k), getattr(whole, k), atol=1e-10)
    assert torch.allclose(summed.matrix(1.0)[0], whole.matrix(1.0)[0], atol=1e-10)
    # the per-head affine statistics are additive too
    x, y = torch.randn(40, 3, 8, dtype=torch.float64), torch.randn(40, 3, 8, dtype=torch.float64)
    a, b = Affine().add(x[:15], y[:15]) + Affine().add(x[15:], y[15:]), Affine().add(x, y)
    for w1, w2 in zip(a.fit(0.1), b.fit(0.1), strict=True):
        assert torch.allclose(w1, w2, atol=1e-10)


def test_row_weights_count_as_repeated_rows():
    """A row of weight k adds to every statistic what k copies of it add: the weighted fits of the attention
    map (query term and gate included) and of the thought vector and matrix equal the fits on repeated rows."""
    g = torch.Generator().manual_seed(3)
    n, heads, head_dim, d = 60, 2, 3, 5
    o0, oc = (torch.randn(n, heads, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randint(1, 4, (n,), generator=g)
    rep = torch.arange(n).repeat_interleave(w)
    cfg = CondenseConfig(attn_query=True, attn_gate=True)
    weighted = fit_attention(lambda: [(o0, oc, x, w.float())], cfg, 0.1)
    repeated = fit_attention(lambda: [(o0[rep], oc[rep], x[rep], None)], cfg, 0.1)
    for k in weighted:
        assert torch.allclose(weighted[k], repeated[k], rtol=1e-5, atol=1e-7), k
    delta, a, u = (torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(3))
    one, many = MatrixStats().add(delta, a, u, w), MatrixStats().add(delta[rep], a[rep], u[rep])
    assert one.n == many.n == int(w.sum())
    assert torch.allclose(one.vector(), many.vector(), atol=1e-12)
    assert torch.allclose(one.matrix(1.0)[0], many.matrix(1.0)[0], atol=1e-10)


def test_answer_weight_weighs_the_rows_that_predict_answers(tiny_dir):
    """``answer_weight`` changes the patch only through the rows that predict answer tokens: weight 1 is the
    default patch to the bit, another weight a different patch that records it."""
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    pairs = teacher_answers(lm.model, lm.tokenizer, align(lm.tokenizer, Prompt("You are a pirate."), QUERIES), 3)
    cfg = CondenseConfig(attn="cross", down=True, down_rank=4, matrix=False)
    base, same, heavy = (
        condense(lm.model, pairs, cfg if a is None else replace(cfg, answer_weight=a)) for a in (None, 1.0, 4.0)
    )
    assert "method.answer_weight" not in base.meta and heavy.meta["method.answer_weight"] == "4.0"
    for i, lp in base.layers.items():
        for k, t in lp.tensors().items():
            assert torch.equal(t, same.layers[i].tensors()[k]), (i, k)
    assert not torch.allclose(base.layers[0].down_a, heavy.layers[0].down_a)
    with pytest.raises(UsageError, match="answer-weight"):
        replace(cfg, answer_weight=0.0).validate()


def test_affine_fit_recovers_a_known_map():
    torch.manual_seed(0)
    x = torch.randn(500, 2, 4, dtype=torch.float64)
    w = torch.randn(2, 4, 4, dtype=torch.float64) * 0.3
    b = torch.randn(2, 4, dtype=torch.float64)
    y = x + torch.einsum("nhi,hji->nhj", x, w) + b
    w_fit, b_fit = Affine().add(x, y).fit(0.0)
    assert torch.allclose(w_fit, w, atol=1e-8) and torch.allclose(b_fit, b, atol=1e-8)
    s, c = Affine().add(x, 1.5 * x + b).fit(0.0, scalar=True)
    assert torch.allclose(s, torch.full((2,), 0.5, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(c, b, atol=1e-8)


def test_truncation_error_equals_dropped_singular_values():
    torch.manual_seed(1)
    m = torch.randn(12, 12, dtype=torch.float64)
    s = torch.linalg.svdvals(m)
    for k in (1, 4, 11):
        b, a, kept = truncate(m, k)
        err = torch.linalg.matrix_norm(m - b @ a.T)
        assert torch.isclose(err, s[k:].pow(2).sum().sqrt(), atol=1e-10)
        assert abs(kept - float(s[:k].pow(2).sum() / s.pow(2).sum())) < 1e-12
        assert b.shape == a.shape == (12, k)


def test_sinks_are_kept_out_of_the_statistics(tiny_dir):
    """A planted massive-activation token is flagged at every block and does not drag the vectors."""
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    tok = lm.tokenizer
    planted = tok(" dog", add_special_tokens=False)["input_ids"]
    assert len(planted) == 1
    planted = planted[0]
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[planted] *= 3000.0
    up = _updates(lm, ["the dog", "a cat", "1 2 3 dog", "fox"])
    rows = torch.tensor(
        [q[p] == planted for q, p in zip([up.pairs.queries[i] for i in up.probe], up.position, strict=True)]
    )
    assert rows.sum() == 2
    assert up.sink[:, rows].all() and up.sink[:, ~rows].sum() <= up.sink[:, rows].numel() // 4
    patch = condense_updates(up, CondenseConfig(attn="none"))
    for i, lp in patch.layers.items():
        keep = ~up.sink[i]
        assert torch.allclose(lp.vector.double(), up.delta[i][keep].mean(0), atol=1e-5)


def test_sequential_patch_moves_towards_the_prompt(tiny_dir):
    """On a pico model the default construction brings the prompt-free logits closer to prompting."""
    from thoughtpatch.constants import PRESETS
    from thoughtpatch.evaluate import evaluate, targets_for

    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    prompt = Prompt("You are a pirate. Speak like a pirate in every answer.")
    fit_q = [
        f"{a} {b}" for a in ("the dog", "a cat", "the fox", "my story") for b in ("jumps", "is lazy", "please", "1 2 3")
    ]
    fit = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, prompt, fit_q), 3)
    held = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, prompt, ["the quick dog", "a lazy cat 5"]), 3)
    methods = {name: condense(lm.model, fit, cfg) for name, cfg in PRESETS.items()}
    res = evaluate(lm.model, held, {"none": None, **methods})
    for name in PRESETS:
        assert res[name]["kl"] < res["none"]["kl"], (name, res[name]["kl"], res["none"]["kl"])


def test_attention_fit_streamed_in_blocks_equals_one_pass():
    """The gate's alternating fit reads its rows in blocks and keeps only sums: the same map as one block."""
    torch.manual_seed(1)
    n, heads, head_dim, d = 300, 3, 4, 6
    x = torch.randn(n, d, dtype=torch.float64)
    o0 = torch.randn(n, heads, head_dim, dtype=torch.float64)
    gamma = 1 + 0.3 * torch.tanh(x @ torch.randn(d, heads, dtype=torch.float64))  # query-dependent scale
    oc = gamma[..., None] * (o0 + 0.2 * o0.flip(-1)) + 0.1
    cfg = CondenseConfig(attn_query=True, attn_gate=True)
    one = fit_attention(lambda: [(o0, oc, x, None)], cfg, 0.1)
    cuts = [0, 7, 100, 101, 300]
    blocks = fit_attention(
        lambda: [(o0[a:b], oc[a:b], x[a:b], None) for a, b in zip(cuts[:-1], cuts[1:], strict=True)], cfg, 0.1
    )
    assert set(one) == {"attn_weight", "attn_bias", "attn_query", "attn_gate"}
    for k in one:
        assert torch.allclose(one[k], blocks[k], rtol=1e-5, atol=1e-6), k
    err = float(((_predict_attention(one, o0, x) - oc) ** 2).mean() / (oc**2).mean())
    assert err < 0.05  # the gate captures most of the query-dependent scale


def test_chunk_size_changes_only_float_noise_and_leaves_no_files(tiny_dir, tmp_path, monkeypatch):
    """Probes in 1 chunk or 3: the same patch up to float noise; the temporary folder is removed each time,
    also when the run is interrupted."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    pairs = teacher_answers(lm.model, lm.tokenizer, align(lm.tokenizer, Prompt("You are a pirate."), QUERIES), 2)
    cfg = CondenseConfig(attn_query=True, attn_gate=True, placement="attn_out", attn_ridge_grid=(0.03, 0.3))
    one, three = (condense(lm.model, pairs, replace(cfg, batch_size=b)) for b in (4, 2))
    assert list(tmp_path.glob("thoughtpatch-*")) == []
    assert one.meta == three.meta
    for i, lp in one.layers.items():
        for k, t in lp.tensors().items():
            assert torch.allclose(t, three.layers[i].tensors()[k], rtol=1e-6, atol=1e-9), (i, k)

    def stop(_):
        assert len(list(tmp_path.glob("thoughtpatch-*/*"))) > 0  # states and rows are on disk mid-run
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        condense(lm.model, pairs, replace(cfg, batch_size=2), progress=stop)
    assert list(tmp_path.glob("thoughtpatch-*")) == []


def test_cross_head_map_recovers_what_mixes_heads():
    """``attn="cross"``: one map over all heads' outputs (rows as one group as wide as them all) recovers a map
    that mixes heads exactly; the per-head map cannot."""
    g = torch.Generator().manual_seed(0)
    o0 = torch.randn(400, 2, 4, generator=g, dtype=torch.float64)
    mix, bias = torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.3, torch.randn(8, generator=g)
    oc = o0 + (o0.flatten(1) @ mix.T + bias).view(-1, 2, 4)
    wide = fit_attention(
        lambda: [(o0.view(-1, 1, 8), oc.view(-1, 1, 8), None, None)], CondenseConfig(attn="cross"), 0.0
    )
    assert wide["attn_weight"].shape == (1, 8, 8)
    assert torch.allclose(wide["attn_weight"][0].double(), mix, atol=1e-5)
    assert torch.allclose(wide["attn_bias"].double(), bias.double(), atol=1e-5)
    per_head = fit_attention(lambda: [(o0, oc, None, None)], CondenseConfig(attn="full"), 0.0)
    assert (_predict_attention(per_head, o0, None) - oc).abs().max() > 0.1


def test_cross_head_patch_from_the_cli_bakes_exactly(tiny_dir, tmp_path):
    """``transmute --bakeable --attn cross`` stores ``(1, H*hd, H*hd)`` maps, ``inspect`` names the form, and the
    baked checkpoint gives the in-memory logits; the per-head gate of ``best`` refuses it (exit 2)."""
    import json

    from conftest import run_cli
    from transformers import AutoModelForCausalLM

    from thoughtpatch.apply import head_shape, installed
    from thoughtpatch.patch import patch_from_bytes

    model = tiny_dir("llama")
    (tmp_path / "p.txt").write_text("You are a pirate. Speak like a pirate.\n")
    args = ("transmute", str(tmp_path / "p.txt"), "--model", str(model), "--answer-tokens", "2", "-q")
    r = run_cli(
        *args, "--bakeable", "--attn", "cross", "--similar", "0", "--down-rank", "2", "-o", str(tmp_path / "c.st")
    )
    assert r.returncode == 0, r.stderr.decode()
    patch = patch_from_bytes((tmp_path / "c.st").read_bytes())
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    width = head_shape(base)[0] * head_shape(base)[1]
    assert all(lp.attn_weight.shape == (1, width, width) for lp in patch.layers.values())
    layers = json.loads(run_cli("inspect", str(tmp_path / "c.st"), "--json").stdout)["layers"]
    assert {row["attn_form"] for row in layers} == {"cross"}
    r = run_cli("apply", str(tmp_path / "c.st"), "--model", str(model), "--save", str(tmp_path / "baked"), "-q")
    assert r.returncode == 0, r.stderr.decode()
    ids = torch.tensor([[5, 17, 33, 101, 7, 250, 64, 3]])
    with torch.no_grad(), installed(base, patch):
        want = base(input_ids=ids).logits
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "baked").eval()(input_ids=ids).logits.detach()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    r = run_cli(*args, "--attn", "cross", "-o", str(tmp_path / "bad.st"))
    assert r.returncode == 2 and b"gate" in r.stderr and r.stderr.decode().count("\n") == 1
    assert not (tmp_path / "bad.st").exists()
