"""The value map (``layers.l.value.weight``): the identity its fit stands on, the fit, baking and refusals."""

from __future__ import annotations

import pytest
import tiny
import torch

from thoughtpatch import Prompt, align, load_model
from thoughtpatch.apply import head_shape, installed, kv_heads
from thoughtpatch.architectures import architecture_for
from thoughtpatch.compare import diff_patches
from thoughtpatch.condense import CondenseConfig, condense
from thoughtpatch.engine import blocks, hooks
from thoughtpatch.errors import UsageError
from thoughtpatch.evaluate import targets_for
from thoughtpatch.patch import LayerPatch, Patch, describe_patch, patch_from_bytes, patch_to_bytes
from thoughtpatch.virtual import attended_inputs, dispatch

IDS = torch.tensor([[5, 17, 33, 101, 7, 250, 64, 3, 99, 12]])


def _head_outputs(model, block: int, patch: Patch | None = None) -> torch.Tensor:
    seen = {}
    blk = blocks(model, architecture_for(model))[block]
    with installed(model, [patch] if patch else []), hooks([(blk.attn_out, "pre", lambda m, a: seen.update(o=a[0]))]):
        model(input_ids=IDS)
    return seen["o"][0]  # (T, H*hd)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])  # grouped heads; gemma2: logit softcap, windows
def test_a_value_change_moves_each_head_by_it_times_the_attended_inputs(family, tiny_dir):
    """``v <- v + D x`` at every position moves head ``h`` by ``D_g xbar_h`` exactly, ``xbar_h`` what the model's
    own attention returns given the inputs ``x`` as values (:func:`attended_inputs`, what the fit reads)."""
    model = load_model(str(tiny_dir(family)), dtype="float64").model
    heads, hd = head_shape(model)
    kvh, block = kv_heads(model), 1
    blk = blocks(model, architecture_for(model))[block]
    d = torch.randn(kvh * hd, model.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moved = _head_outputs(model, block, Patch({block: LayerPatch(value_weight=d)}, skip=0))
    before = _head_outputs(model, block)
    now = {}

    def record(module, query, key, value, mask, **kwargs):
        now["xbar"] = attended_inputs(module, query, key, now["x"], mask, **kwargs)[0]  # (T, H, d)

    blk.attention._thoughtpatch_record = record
    try:
        with dispatch(model), hooks([blk.attn_input(lambda x: now.update(x=x))]):
            model(input_ids=IDS)
    finally:
        del blk.attention._thoughtpatch_record
    group = heads // kvh
    want = torch.stack([now["xbar"][:, h] @ d[h // group * hd : (h // group + 1) * hd].T for h in range(heads)], 1)
    assert (moved - before).abs().max() > 1e-2
    # some families' eager code takes the softmax in float32: exact to its rounding, not to float64's
    assert torch.allclose(
        (moved - before).unflatten(-1, (heads, hd)), want, rtol=0, atol=1e-6 * float(want.abs().max())
    )


def _fit(lm, cfg):
    prompt = Prompt("You are a pirate. Speak like a pirate in every answer.")
    queries = [f"{a} {b}" for a in ("the dog", "a cat", "my story", "one") for b in ("jumps", "is lazy", "1 2 3")]
    pairs = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, prompt, queries), 2)
    return condense(lm.model, pairs, cfg), pairs


def test_the_fitted_value_map_lowers_the_head_outputs_error(tiny_dir):
    """Block 0 alone, ridge near zero: installed, the fitted change brings the prompt-free head outputs at the
    query tokens closer to the prompted ones than no change (a mismatch between what the fit reads and what the
    change does would not)."""
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    cfg = CondenseConfig(attn="none", vector=False, matrix=False, value_map=True, value_ridge=1e-6, layers=(0,), skip=0)
    patch, pairs = _fit(lm, cfg)
    d = patch.layers[0].value_weight
    assert d.shape == (kv_heads(lm.model) * head_shape(lm.model)[1], lm.model.config.hidden_size)
    assert patch.meta["method.value_map"] == "true" and patch.meta["method.value_ridge"] == "1e-06"

    @torch.no_grad()
    def error(p: Patch | None) -> float:
        total = 0.0
        for q in pairs.queries:
            n = len(q)
            ids = {k: torch.tensor([pre + q]) for k, pre in (("c", pairs.prefix_prompted), ("0", pairs.prefix_free))}
            outs = {}
            for k, x in ids.items():
                seen = {}
                blk = blocks(lm.model, architecture_for(lm.model))[0]
                with (
                    installed(lm.model, [p] if p and k == "0" else []),
                    hooks([(blk.attn_out, "pre", lambda m, a, s=seen: s.update(o=a[0]))]),
                ):
                    lm.model(input_ids=x)
                outs[k] = seen["o"][0, -n:]
            total += float(((outs["c"] - outs["0"]) ** 2).sum())
        return total

    assert error(patch) < 0.9 * error(None)


def test_value_map_round_trips_bakes_and_is_refused_where_the_family_fuses_it(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from thoughtpatch.bake import bake_checkpoint, patch_record

    patch = tiny.random_patch({"value"}, seed=4)
    back = patch_from_bytes(patch_to_bytes(patch))
    assert torch.equal(back.layers[0].value_weight, patch.layers[0].value_weight) and back.bakeable
    assert describe_patch(back)["layers"][0]["value_norm"] == pytest.approx(float(patch.layers[0].value_weight.norm()))
    row = diff_patches(patch, Patch({0: LayerPatch(vector=torch.ones(32))}, skip=0))["layers"][0]
    assert (row["value_norm_a"], row["value_norm_b"], row["value_rel_diff"]) == (
        pytest.approx(float(patch.layers[0].value_weight.norm())),
        0.0,
        1.0,
    )
    with pytest.raises(UsageError, match="value map"):
        bake_checkpoint(tiny_dir("gpt2"), tmp_path / "o", [patch], [{"file": "v"}])
    model = load_model(str(tiny_dir("gpt2"))).model  # four key/value heads
    wide = Patch({0: LayerPatch(value_weight=torch.ones(32, 32))}, skip=0)
    with pytest.raises(UsageError, match="fuses it with the query and key"), installed(model, wide):
        pass
    CondenseConfig(attn="none", vector=False, matrix=False, value_map=True).validate()  # a patch on its own
    with pytest.raises(UsageError, match="no slots"):
        CondenseConfig(value_map=True, kv=0.5).validate()
    src = tiny_dir("llama")
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad(), installed(base, patch):
        want = base(input_ids=IDS).logits
    bake_checkpoint(src, tmp_path / "b", [patch], [patch_record(patch, "v.safetensors", "0" * 64, 1.0)])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32)(input_ids=IDS).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
