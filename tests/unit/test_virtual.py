"""Virtual key/value slots: with every prompted-prefix token kept they reproduce the prompted model exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from thoughtpatch import Prompt, align, load_model
from thoughtpatch.algebra import merge
from thoughtpatch.apply import installed
from thoughtpatch.condense import CondenseConfig, condense
from thoughtpatch.engine import eos_ids, greedy
from thoughtpatch.errors import UsageError
from thoughtpatch.evaluate import targets_for
from thoughtpatch.patch import patch_from_bytes, patch_to_bytes
from thoughtpatch.virtual import _output_error, fit_slots

FIT = ["the dog jumps", "a cat is lazy", "tell me a story", "1 2 3 4", "the fox please", "my dog and cat"]
ASK = ["What is the capital of France?", "dog", "Tell me a story about a cat and a dog please"]
PROMPT = Prompt("Translate the sentence into French.", (("Hello", "Bonjour"), ("the cat", "le chat")))
ALL_SLOTS = CondenseConfig(kv=1.0, attn="none", vector=False, matrix=False)


def _query_logits(model, pairs, prefix, i, shift=0):
    ids = torch.tensor([prefix + pairs.queries[i]])
    return model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None] - shift).logits[0, len(prefix) :]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3", "gpt_neox", "olmo2"])
def test_all_slots_reproduce_the_prompted_model(tiny_dir, family):
    """Float64: the patched model without the prompt gives the prompted logits at every query position.

    Exact (1e-9) against the prompted run placed so that its queries sit where the prompt-free run's do (the
    slots' keys are computed there); against the plain prompted run within 1e-6, the float32 rounding of the
    rotary angles that transformers computes at the two positions (the same as moving the prompted run itself).
    """
    lm = load_model(str(tiny_dir(family)), dtype="float64")
    pairs = align(lm.tokenizer, PROMPT, ASK)
    shift = len(pairs.prefix_prompted) - len(pairs.prefix_free)
    patch = condense(lm.model, targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, PROMPT, FIT), 3), ALL_SLOTS)
    assert patch.skip == len(pairs.prefix_free) and patch.has_slots and not patch.bakeable
    exact, plain, moved = 0.0, 0.0, 0.0
    with torch.no_grad():
        for i in range(len(ASK)):
            want = _query_logits(lm.model, pairs, pairs.prefix_prompted, i, shift)
            same = _query_logits(lm.model, pairs, pairs.prefix_prompted, i)
            moved = max(moved, float((_query_logits(lm.model, pairs, pairs.prefix_free, i) - want).abs().max()))
            with installed(lm.model, patch):
                got = _query_logits(lm.model, pairs, pairs.prefix_free, i)
            exact, plain = max(exact, float((got - want).abs().max())), max(plain, float((got - same).abs().max()))
    assert moved > 1e-3  # the prompt matters
    assert exact <= 1e-9
    assert plain <= 1e-6


def test_slots_in_batched_cached_generation(tiny_dir):
    """Left-padded batches decoded with a KV cache give the prompted model's greedy answers."""
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    pairs = align(lm.tokenizer, PROMPT, ASK)
    patch = condense(lm.model, targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, PROMPT, FIT), 3), ALL_SLOTS)
    eos = eos_ids(lm.model, lm.tokenizer)
    want = greedy(lm.model, pairs.prefix_prompted, pairs.queries, 6, eos)
    with installed(lm.model, patch):
        got = greedy(lm.model, pairs.prefix_free, pairs.queries, 6, eos)
        assert lm.model.config._attn_implementation == "thoughtpatch"
    assert got == want
    assert greedy(lm.model, pairs.prefix_free, pairs.queries, 6, eos) != want
    assert lm.model.config._attn_implementation != "thoughtpatch"


@torch.no_grad()
def test_compressed_slots_round_trip_and_help(tiny_dir):
    """A quarter of the tokens as slots: the file round-trips and the patch moves the model toward the prompt."""
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    fit = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, PROMPT, FIT), 3)
    merged = CondenseConfig(kv=1.0, kv_max=3, kv_select="merge", attn="none", vector=False, matrix=False)
    capped = condense(lm.model, fit, merged)
    assert capped.layers[0].kv_key.shape == (2, 3, 8) and capped.meta["method.kv_max"] == "3"
    assert capped.meta["method.kv_select"] == "merge"
    per_slot = 2 * (2 * 8 + 2)  # key, value, bias, position per key/value head
    n_params = sum(p.numel() for p in lm.model.parameters())
    budget = CondenseConfig(kv=1.0, kv_budget=7.5 * per_slot / n_params, attn="none", vector=False, matrix=False)
    spread = condense(lm.model, fit, budget)  # 7 slots' worth over 3 blocks: 2, 2 and the remainder's one more
    assert [spread.layers[i].kv_key.shape[1] for i in sorted(spread.layers)] == [2, 2, 3]
    assert spread.meta["method.kv_budget"]
    assert spread.numel() <= budget.kv_budget * n_params
    patch = condense(lm.model, fit, CondenseConfig(kv=0.25, attn="none", vector=False, matrix=False))
    slots = max(1, round(0.25 * len(fit.prefix_prompted)))
    assert patch.layers[0].kv_key.shape == (2, slots, 8) and patch.meta["method.kv"] == "0.25"
    again = patch_from_bytes(patch_to_bytes(patch))
    pairs = align(lm.tokenizer, PROMPT, ASK)
    err = {}
    for name, p in (("none", None), ("slots", again)):
        total = 0.0
        for i in range(len(ASK)):
            want = _query_logits(lm.model, pairs, pairs.prefix_prompted, i)
            if p is None:
                total += float((_query_logits(lm.model, pairs, pairs.prefix_free, i) - want).norm())
            else:
                with installed(lm.model, p):
                    total += float((_query_logits(lm.model, pairs, pairs.prefix_free, i) - want).norm())
        err[name] = total
    assert err["slots"] < 0.5 * err["none"]


def test_bad_slot_files_and_configs(tiny_dir):
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    fit = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, PROMPT, FIT[:2]), 2)
    patch = condense(lm.model, fit, CondenseConfig(kv=0.5, attn="none", vector=False, matrix=False))
    patch.layers[0].kv_value = None
    patch.meta = {k: v for k, v in patch.meta.items() if k != "parameters"}
    with pytest.raises(UsageError, match="kv.key and kv.value"):
        patch_from_bytes(patch_to_bytes(patch))
    for bad in (
        CondenseConfig(kv=1.5),
        CondenseConfig(kv=0.5, bakeable=True, skip=0),
        CondenseConfig(kv_max=0),
        CondenseConfig(kv=1.0, kv_budget=1.5),
        CondenseConfig(kv=1.0, kv_select="nearest"),
        CondenseConfig(kv=1.0, kv_refine=15),
        CondenseConfig(kv=1.0, kv_refine=-10),
    ):
        with pytest.raises(UsageError, match="kv"):
            bad.validate()
    two = condense(lm.model, fit, CondenseConfig(kv=0.5, attn="none", vector=False, matrix=False))
    with pytest.raises(UsageError, match="only one"), installed(lm.model, [two, two]):
        pass
    with pytest.raises(UsageError, match="positive weight"):
        merge([two, two], [1.0, -1.0])
    both = merge([two, two], [1.0, 0.5])  # side by side, the second's mass halved
    lp, one = both.layers[0], two.layers[0]
    assert lp.kv_key.shape[1] == 2 * one.kv_key.shape[1] and torch.equal(
        lp.kv_key[:, : one.kv_key.shape[1]], one.kv_key
    )
    torch.testing.assert_close(lp.kv_bias[:, one.kv_key.shape[1] :], one.kv_bias + math.log(0.5))


def test_slot_patches_on_the_command_line(tiny_dir, tmp_path):
    """transmute --kv builds slots; apply and eval run them; baking and export refuse them (exit 2)."""
    from conftest import run_cli

    model = str(tiny_dir("llama"))
    (tmp_path / "prompt.txt").write_text("You are a pirate. Speak like a pirate in every answer.")
    (tmp_path / "fit.txt").write_text("\n".join(FIT))
    (tmp_path / "held.txt").write_text("\n".join(ASK))
    patch = str(tmp_path / "p.safetensors")
    r = run_cli("transmute", str(tmp_path / "prompt.txt"), "--model", model, "--probes", str(tmp_path / "fit.txt"),
                "--kv", "0.5", "--kv-max", "4", "--kv-refine", "20", "--answer-tokens", "2", "-o", patch, "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", patch, "--json")
    rows = json.loads(r.stdout)["layers"]
    assert {row["kv_slots"] for row in rows} == {4}
    assert json.loads(r.stdout)["metadata"]["method.kv_refine"] == "20"
    r = run_cli("transmute", str(tmp_path / "prompt.txt"), "--model", model, "--kv", "0.5", "--kv-refine", "15",
                "-o", str(tmp_path / "bad.safetensors"), "-q")  # fmt: skip
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1 and "--kv-refine" in r.stderr.decode()
    assert not (tmp_path / "bad.safetensors").exists()
    r = run_cli("apply", patch, "--model", model, "-p", "the dog", "-p", "a cat", "--max-new-tokens", "3", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["answers"]) == 2, r.stderr
    r = run_cli("eval", patch, "--model", model, "--prompt-file", str(tmp_path / "prompt.txt"),
                "--queries", str(tmp_path / "held.txt"), "--answer-tokens", "2", "--json", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)["methods"]
    assert scores["patch"]["kl"] < scores["none"]["kl"]
    for args in (("apply", patch, "--model", model, "--save", str(tmp_path / "baked")),
                 ("export", patch, "--model", model, "--to", "peft", "-o", str(tmp_path / "peft"))):  # fmt: skip
        r = run_cli(*args, "-q")
        assert r.returncode == 2 and r.stderr.decode().count("\n") == 1, r.stderr
        assert "virtual key/value slots" in r.stderr.decode()
        assert not (tmp_path / "baked").exists() and not (tmp_path / "peft").exists()


def _slot_attention(slots, q, scaling):
    """Each row's attention output over the slots alone, (KVH, R, hd)."""
    s = q @ slots.key.transpose(-1, -2) * scaling + slots.bias[:, None, :]
    return s.softmax(-1) @ slots.value


def test_merged_slots_carry_what_they_stand_for():
    """Two tokens with one key merge into one slot of multiplicity 2 and their mean value: exact with the ridge
    on (the start is the answer), where keeping the heavier twin only approaches it; with every token a slot
    the slots are the prefix itself."""
    torch.manual_seed(0)
    kvh, n, hd, rows = 2, 6, 4, 40
    q = torch.randn(rows, 2 * kvh, hd, dtype=torch.float64)
    q[..., 0] = 3.0  # every row leans to keys with a large first coordinate
    keys, values = torch.randn(kvh, n, hd, dtype=torch.float64), torch.randn(kvh, n, hd, dtype=torch.float64)
    keys[..., 0] = 1.0
    keys[:, 1] = keys[:, 4] = torch.tensor([-3.0, 0.5, 0.5, 0.5], dtype=torch.float64)  # the two lightest
    share = torch.ones(rows, 2 * kvh, dtype=torch.float64)
    scaling = hd**-0.5
    qh = q.unflatten(1, (kvh, -1)).movedim(0, 1).flatten(1, 2)  # (KVH, rows x group, hd)
    want = (qh @ keys.transpose(-1, -2) * scaling).softmax(-1) @ values
    err = {}
    for select in ("mass", "merge"):
        slots = fit_slots(lambda: [(q, share)], keys, values, scaling, n - 1, 0.01, 7, select)
        assert slots.key.shape == (kvh, n - 1, hd) and slots.position.min() >= 7
        err[select] = float((_slot_attention(slots, qh, scaling) - want).abs().max())
        whole = fit_slots(lambda: [(q, share)], keys, values, scaling, n, 0.01, 7, select)
        assert whole.bias is None and torch.equal(whole.key, keys) and torch.equal(whole.value, values)
    assert err["merge"] < 1e-10 < 1e-4 < err["mass"]


def test_refitted_slots_give_the_head_outputs_more_closely():
    """The joint refit of keys, multiplicities and values lowers each row's head-output error against the prompt,
    on rows it was fitted on and on new rows of the same kind; zero iterations leave the slots as they were."""
    torch.manual_seed(1)
    kvh, n, hd, scaling = 1, 24, 8, 8**-0.5
    keys, values = torch.randn(kvh, n, hd, dtype=torch.float64) * 2, torch.randn(kvh, n, hd, dtype=torch.float64)

    def chunk(rows):
        q = torch.randn(rows, 2 * kvh, hd, dtype=torch.float64)
        return q, torch.rand(rows, 2 * kvh, dtype=torch.float64) * 0.8 + 0.1, torch.randn(rows, 2 * kvh, hd)

    def error(slots, q, share, own):
        flat = lambda t: t.double().unflatten(1, (kvh, -1)).movedim(0, 1).flatten(1, 2)  # noqa: E731
        q, share, own = flat(q), flat(share), flat(own)
        s = q @ keys.transpose(-1, -2) * scaling
        want = share[..., None] * (s.softmax(-1) @ values) + (1 - share[..., None]) * own
        z = q @ slots.key.transpose(-1, -2) * scaling + slots.bias[:, None, :]
        mix = torch.sigmoid(z.logsumexp(-1) - s.logsumexp(-1) + torch.logit(share))[..., None]
        return float((mix * (z.softmax(-1) @ slots.value) + (1 - mix) * own - want).pow(2).sum())

    fit, new = [chunk(60) for _ in range(4)], chunk(200)
    plain = fit_slots(lambda: fit, keys, values, scaling, 3, 0.01, 0, "merge")
    same = fit_slots(lambda: fit, keys, values, scaling, 3, 0.01, 0, "merge", refine=0)
    assert torch.equal(plain.key, same.key) and torch.equal(plain.value, same.value)
    refit = fit_slots(lambda: fit, keys, values, scaling, 3, 0.01, 0, "merge", refine=50)
    assert sum(error(refit, *c) for c in fit) < 0.8 * sum(error(plain, *c) for c in fit)  # 0.72
    assert error(refit, *new) < 0.95 * error(plain, *new)  # 0.87


def test_refit_error_from_gram_products_is_the_rows_output_error():
    """The refit's objective, computed from Gram products, is the rows' summed squared output error against the
    prompted output (relative to the prompt's own part) at the values it solves for, the least-squares best."""
    torch.manual_seed(2)
    kvh, n, m, hd, scaling = 2, 16, 3, 8, 8**-0.5
    rand = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    keys, values, k, b, v = rand(kvh, n, hd), rand(kvh, n, hd), rand(kvh, m, hd), rand(kvh, m), rand(kvh, m, hd)
    rows = [(rand(50, kvh, hd), torch.rand(50, kvh, dtype=torch.float64) * 0.8 + 0.1, rand(50, kvh, hd)) for _ in "ab"]
    q, share, own = (torch.cat(t).movedim(0, 1) for t in zip(*rows, strict=True))  # one query head per key head
    s = q @ keys.transpose(-1, -2) * scaling
    prompt = share[..., None] * (s.softmax(-1) @ values - own)
    z = q @ k.transpose(-1, -2) * scaling + b[:, None, :]
    mix = torch.sigmoid(z.logsumexp(-1) - s.logsumexp(-1) + torch.logit(share))[..., None]

    def direct(vals):
        return float((mix * (z.softmax(-1) @ vals - own) - prompt).pow(2).sum() / prompt.pow(2).sum())

    best, solved = _output_error(lambda: rows, keys, values, scaling)(k, b)
    assert float(best) == pytest.approx(direct(solved), rel=1e-7)  # the solve's 1e-9 ridge
    assert direct(solved) < direct(v) and direct(solved + 1e-3 * rand(kvh, m, hd)) > direct(solved)
