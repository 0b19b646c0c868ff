from __future__ import annotations

import json

import pytest

from thoughtpatch import Prompt, UsageError, align, default_probes
from thoughtpatch.prompts import free_ids, parse_probes, parse_prompt


def test_plain_and_structured_prompts():
    assert parse_prompt("Be terse.\n") == Prompt("Be terse.")
    doc = json.dumps({"system": "Add.", "examples": [{"user": "1+1", "assistant": "2"}]})
    assert parse_prompt(doc) == Prompt("Add.", (("1+1", "2"),))
    for bad in ("", "   \n", '{"system": ""}', '{"sys": "x"}', '{"examples": [{"user": "x"}]}', "{not json"):
        with pytest.raises(UsageError):
            parse_prompt(bad)


def test_probe_files():
    assert parse_probes("a\n\nb\n") == ["a", "b"]
    assert parse_probes('{"query": "a"}\n"b"\n') == ["a", "b"]
    with pytest.raises(UsageError):
        parse_probes("\n \n")
    with pytest.raises(UsageError):
        parse_probes('{"other": 1}\n')
    assert len(default_probes()) >= 32


@pytest.mark.parametrize("chat", [True, False])
def test_query_tokens_identical_in_both_runs(tok, chat):
    prompt = Prompt("You are a pirate.", (("Hello", "Arr"),))
    pairs = align(tok, prompt, ["What is the capital of France?", "dog"], chat=chat)
    for i, q in enumerate(pairs.queries):
        assert pairs.prompted(i)[-len(q) :] == pairs.free(i)[-len(q) :] == q
        assert pairs.free(i) == free_ids(tok, ["What is the capital of France?", "dog"][i], chat)
    # both runs start with the same token (the attention sink stays shared)
    assert pairs.n_lead >= 1 and pairs.prefix_prompted[0] == pairs.prefix_free[0]
    if chat:  # the template's own default system message is the prompt-free prefix
        assert "You are a helpful assistant." in tok.decode(pairs.prefix_free)
        assert "pirate" in tok.decode(pairs.prefix_prompted)
    else:
        assert pairs.prefix_free == [tok.bos_token_id]
