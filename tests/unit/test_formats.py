from __future__ import annotations

import pytest
import torch

from thoughtpatch import Prompt, UsageError, align, extract, load_model
from thoughtpatch.files import save_tensors
from thoughtpatch.formats import updates_from_bytes, updates_to_bytes


def test_updates_round_trip(tiny_dir):
    lm = load_model(str(tiny_dir("gpt2")), dtype="float32")
    up = extract(lm.model, align(lm.tokenizer, Prompt("Be a pirate."), ["hello there", "a cat"]))
    data = updates_to_bytes(up, {"base_model": "tiny"})
    assert data == updates_to_bytes(up, {"base_model": "tiny"})  # same inputs, same bytes
    back, meta = updates_from_bytes(data)
    assert meta["base_model"] == "tiny" and meta["layers"] == str(up.n_layers)
    for a, b in zip(up.delta + up.a + up.u, back.delta + back.a + back.u, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(up.embed_delta, back.embed_delta)  # GPT-2: absolute positions differ between runs
    assert back.pairs.queries == up.pairs.queries and back.pairs.prefix_prompted == up.pairs.prefix_prompted


@pytest.mark.parametrize(
    "data",
    [b"", b"abc", b"\xff" * 8 + b"{}", save_tensors({"x": torch.zeros(2)}, {"format": "other"})],
)
def test_bad_updates_files(data):
    with pytest.raises(UsageError):
        updates_from_bytes(data)
