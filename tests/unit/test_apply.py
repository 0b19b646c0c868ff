"""In-memory patches: exact removal, zero strength, KV cache, batching and padding."""

from __future__ import annotations

import pytest
import torch

from thoughtpatch import Prompt, align, load_model
from thoughtpatch.apply import installed
from thoughtpatch.condense import CondenseConfig, condense
from thoughtpatch.engine import eos_ids, greedy
from thoughtpatch.evaluate import targets_for
from thoughtpatch.prompts import free_ids

FIT = ["the dog jumps", "a cat is lazy", "tell me a story", "1 2 3 4", "the fox please", "my dog and cat"]
ASK = ["What is the capital of France?", "dog", "Tell me a story about a cat and a dog please"]


@pytest.fixture(scope="module")
def setup(tiny_dir):
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    pairs = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, Prompt("You are a pirate."), FIT), 3)
    cfg = CondenseConfig(attn="full", attn_query=True)
    return lm, condense(lm.model, pairs, cfg)


def _logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits


def test_install_and_remove_is_bit_exact(setup):
    lm, patch = setup
    ids = free_ids(lm.tokenizer, ASK[0])
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    base = _logits(lm.model, ids)
    with installed(lm.model, patch):
        patched = _logits(lm.model, ids)
    after = _logits(lm.model, ids)
    assert not torch.equal(patched, base)
    assert torch.equal(after, base)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())


def test_zero_strength_is_bit_identical(setup):
    lm, patch = setup
    ids = free_ids(lm.tokenizer, ASK[2])
    base = _logits(lm.model, ids)
    with installed(lm.model, patch, scale=0.0):
        assert torch.equal(_logits(lm.model, ids), base)
    zero = condense(
        lm.model,
        targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, Prompt("Be a pirate."), FIT), 2),
        CondenseConfig(strength=0.0),
    )
    with installed(lm.model, zero):
        assert torch.equal(_logits(lm.model, ids), base)


def test_cached_generation_equals_uncached(setup):
    lm, patch = setup
    ids = free_ids(lm.tokenizer, ASK[0])
    with installed(lm.model, patch):
        cached = greedy(lm.model, [], [ids], 6, set())[0]
        seq = list(ids)
        for _ in range(6):  # no cache: the whole sequence every step
            seq.append(int(_logits(lm.model, seq)[0, -1].argmax()))
        hf = lm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert cached == seq[len(ids) :]
    assert hf[0, len(ids) :].tolist() == cached


def test_batched_and_padded_equals_one_by_one(setup):
    lm, patch = setup
    batch = [free_ids(lm.tokenizer, q) for q in ASK]
    assert len({len(b) for b in batch}) > 1
    with installed(lm.model, patch):
        together = greedy(lm.model, [], batch, 5, eos_ids(lm.model, lm.tokenizer))
        alone = [greedy(lm.model, [], [b], 5, eos_ids(lm.model, lm.tokenizer))[0] for b in batch]
        # HF generate with left padding and its own attention mask agrees too
        tok = lm.tokenizer
        tok.padding_side = "left"
        enc = tok.pad({"input_ids": batch}, return_tensors="pt")
        hf = lm.model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert together == alone
    for row, ref in zip(hf[:, enc["input_ids"].shape[1] :].tolist(), alone, strict=True):
        assert row[: len(ref)] == ref
