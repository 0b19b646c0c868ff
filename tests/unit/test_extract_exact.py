"""The backbone identity: prompt-free model + exact token-dependent updates == prompted model (float64)."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, QUERIES, prompts

from thoughtpatch import align, check, extract, load_model, teacher_answers

PROMPTS = prompts()

# The first families: both prompts, with and without a chat template. The others (block forms, not prompt
# handling, are what they add): the few-shot prompt with the chat template, to keep the suite fast.
FIRST = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2", "phi3"}
CASES = [(f, True) for f in FAMILIES] + [(f, False) for f in FAMILIES if f in FIRST]


@pytest.mark.parametrize(("family", "chat"), CASES, ids=[f"{'chat' if c else 'plain'}-{f}" for f, c in CASES])
def test_exact_updates_reproduce_prompting(tiny_dir, family, chat):
    lm = load_model(str(tiny_dir(family)), dtype="float64")
    for prompt in PROMPTS if family in FIRST else PROMPTS[1:]:
        pairs = align(lm.tokenizer, prompt, QUERIES, chat=chat)
        pairs = teacher_answers(lm.model, lm.tokenizer, pairs, 3)
        assert len({len(q) for q in pairs.queries}) > 1  # a padded batch with different query lengths
        updates = extract(lm.model, pairs, batch_size=3)
        assert updates.n_layers == lm.model.config.num_hidden_layers
        assert updates.n_tokens == sum(len(q) for q in pairs.queries)
        assert check(lm.model, updates, batch_size=2) <= 1e-9


def test_float64_eager_attention_is_float64(tiny_dir):
    """transformers' eager attention rounds its softmax to float32; a float64 model loaded here does not.

    Gemma-2 (softcapping, so eager attention) with a sliding window shorter than the prompt: tokens read after
    a cached prefix give the logits of one pass over the whole sequence only without that rounding (the cache
    keeps the window, so the softmax runs over fewer keys).
    """
    from thoughtpatch.engine import prefix_cache

    lm = load_model(str(tiny_dir("gemma2")), dtype="float64")
    ids = lm.tokenizer(" ".join(QUERIES)).input_ids
    full = lm.model(input_ids=torch.tensor([ids])).logits[0]
    for n in (5, 12):
        rest = lm.model(input_ids=torch.tensor([ids[n:]]), cache=prefix_cache(lm.model, ids[:n]))
        assert (full[n:] - rest.logits[0]).abs().max() <= 1e-12


def test_check_detects_a_wrong_update(tiny_dir):
    """The identity is not vacuous: a slightly wrong update shows up in the logits."""
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    updates = extract(lm.model, align(lm.tokenizer, PROMPTS[0], QUERIES))
    assert check(lm.model, updates) <= 1e-9
    updates.u[1] = updates.u[1] * (1 + 1e-6)
    assert check(lm.model, updates) > 1e-9


def test_padding_does_not_leak(tiny_dir):
    """Each query's updates are the same alone as in a padded batch with longer queries."""
    lm = load_model(str(tiny_dir("qwen2")), dtype="float64")
    pairs = align(lm.tokenizer, PROMPTS[0], QUERIES)
    together = extract(lm.model, pairs, batch_size=len(QUERIES))
    for i in range(len(QUERIES)):
        alone = extract(lm.model, align(lm.tokenizer, PROMPTS[0], [QUERIES[i]]))
        rows = together.probe == i
        for layer in range(together.n_layers):
            assert torch.allclose(together.delta[layer][rows], alone.delta[layer], atol=1e-12)
            assert torch.allclose(together.u[layer][rows], alone.u[layer], atol=1e-12)


def test_sinks_are_flagged(tiny_dir):
    from thoughtpatch.extract import detect_sinks

    norms = torch.tensor([1.0, 1.2, 0.9, 300.0, 1.1])
    assert detect_sinks(norms, 10.0).tolist() == [False, False, False, True, False]
