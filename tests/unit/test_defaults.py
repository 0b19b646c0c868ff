"""Regression guard for the default construction of each `transmute` mode (PEFT-style output regression).

The recorded figures change only when the default construction changes: update them deliberately, together
with docs/fidelity.md, never to make a failing test pass.
"""

from __future__ import annotations

import pytest

from thoughtpatch import Prompt, align, load_model
from thoughtpatch.condense import condense
from thoughtpatch.constants import FIT_ANSWER_TOKENS, PRESETS
from thoughtpatch.evaluate import evaluate, targets_for

FIT = [
    f"{a} {b}"
    for a in ("the dog", "a cat", "the fox", "my story", "tell me")
    for b in ("jumps", "is lazy", "please", "1 2 3")
]
HELD = ["the quick dog", "a lazy cat 5", "tell me a story please", "1 2 3 4 5"]

# mode -> (numbers in the patch, held-out KL of the patch) on the pico Llama below, float64
RECORDED = {
    # half the prompt's tokens as slots (was (4980, 5.323051937011769e-06) with a quarter; 2.106101851495623e-05 with
    # the heaviest tokens rather than merged)
    "best": (5628, 1.5976382599092176e-06),
    # the attention map across the heads (was (10176, 6.623953959206119e-05) per head), the down map with its ridge
    # by cross-validation (7.165034276113147e-05 with a fixed 0.3; (7104, 0.00015525489652645774) before the down
    # map); the model-written queries belong to transmute, not condense
    "bakeable": (12480, 6.16867823737266e-05),
    # the slots refitted jointly (kv_refine=100, values by least squares; was 5.859871362190461e-05 without: on this
    # pico model, one slot per block, the refit chosen on 20 probes costs a little; 9.874524766928516e-05 with the
    # heaviest tokens rather than merged; 6.14306172792567e-05 before its error came from Gram products: the same
    # objective, rounded differently)
    "compact": (216, 6.140698769740993e-05),
}


@pytest.fixture(scope="module")
def scores(tiny_dir):
    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    prompt = Prompt("You are a pirate. Speak like a pirate in every answer.")
    fit = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, prompt, FIT), FIT_ANSWER_TOKENS)
    held = targets_for(lm.model, lm.tokenizer, align(lm.tokenizer, prompt, HELD), 8)
    patches = {mode: condense(lm.model, fit, cfg) for mode, cfg in PRESETS.items()}
    return patches, evaluate(lm.model, held, {"none": None, **patches})


@pytest.mark.parametrize("mode", list(PRESETS))
def test_default_construction_is_unchanged(scores, mode):
    patches, res = scores
    numbers, kl = RECORDED[mode]
    assert res[mode]["kl"] < 0.5 * res["none"]["kl"]
    assert patches[mode].numel() == numbers
    assert res[mode]["kl"] == pytest.approx(kl, rel=1e-4)


def test_modes_keep_their_promises(scores):
    patches, _ = scores
    assert patches["bakeable"].bakeable and not patches["best"].bakeable
    # the compact budget is relative to the model: on this pico model one slot per block (the floor)
    assert all(lp.attn_weight.dim() == 1 and lp.kv_key.shape[1] == 1 for lp in patches["compact"].layers.values())
    assert all(lp.kv_key is not None for lp in patches["best"].layers.values())
