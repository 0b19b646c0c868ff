"""Reliability and safety: no unpickling, interrupts leave nothing partial, numerical guards, bad-input table."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from thoughtpatch import Prompt, UsageError, align, extract, load_model
from thoughtpatch.condense import CondenseConfig, condense
from thoughtpatch.errors import IllConditionedWarning
from thoughtpatch.formats import updates_from_bytes, updates_to_bytes
from thoughtpatch.patch import patch_from_bytes
from thoughtpatch.pipeline import provenance, run_extract

ROOT = Path(__file__).resolve().parents[2]


def test_package_never_unpickles_or_runs_remote_code():
    """No code path can load a user file with pickle or run a model folder's code by default."""
    banned = re.compile(
        r"torch\.load\(|\bimport pickle\b|\bfrom pickle\b|pickle\.loads?\(|\bimport (dill|joblib|cloudpickle)\b"
        r"|weights_only\s*=\s*False|trust_remote_code\s*=\s*True|allow_pickle\s*=\s*True"
    )
    found = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in sorted((ROOT / "thoughtpatch").rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if banned.search(line)
    ]
    assert not found, "\n".join(found)


def test_bad_inputs_doc_is_generated_and_current():
    spec = importlib.util.spec_from_file_location("bad_inputs", ROOT / "scripts" / "bad_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = mod.generate()
    rows = [r for r in doc.splitlines() if re.match(r"\| \d+ \|", r)]
    refused = [r for r in rows if r.split(" | ")[3] == "2"]
    assert len(refused) >= 20
    assert all(r.count("`thoughtpatch: error: ") == 1 and "<br>" not in r for r in refused)
    assert "Traceback" not in doc
    assert (ROOT / "docs" / "bad-inputs.md").read_text() == doc, (
        "docs/bad-inputs.md is stale: run scripts/bad_inputs.py"
    )


# --------------------------------------------------------------------------------------------- interrupts
@pytest.fixture(scope="module")
def slow_setup(tmp_path_factory, tok):
    """A pico model big enough that extraction and condensation take a couple of seconds, and its inputs."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    d = tmp_path_factory.mktemp("interrupt")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=400, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "tell",
        "me",
        "a",
        "story",
        "about",
        "France",
        "and",
        "numbers",
    ]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=g)) for _ in range(48)]
    (d / "probes.txt").write_text("\n".join(lines) + "\n")
    (d / "prompt.txt").write_text("You are a pirate. Speak like a pirate.\n")
    lm = load_model(str(d / "model"))
    res = run_extract(lm, Prompt("You are a pirate. Speak like a pirate."), lines, answer_tokens=8)
    (d / "updates.safetensors").write_bytes(updates_to_bytes(res.updates, res.meta))
    return d


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "command,sig,marker",
    [
        ("extract", signal.SIGINT, "queries; prompt"),  # during the answers and the extraction
        ("transmute", signal.SIGTERM, "condensing sequential"),  # during the condensation
        ("condense", signal.SIGTERM, "condensing"),
    ],
)
def test_interrupt_leaves_nothing_partial_and_rerun_succeeds(slow_setup, tmp_path, command, sig, marker):
    d = slow_setup
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "result.safetensors"
    out.write_bytes(b"the previous result")  # an earlier output must survive an interrupted run
    model = ["--model", str(d / "model")]
    if command == "condense":
        argv = ["condense", str(d / "updates.safetensors"), *model, "-o", str(out)]
    else:
        argv = [command, str(d / "prompt.txt"), *model, "--probes", str(d / "probes.txt"), "-o", str(out)]
        argv += ["--answer-tokens", "16"]
    before = _digest(d)
    tmp = tmp_path / "tmp"  # the condensation's temporary folder goes here and must be removed
    tmp.mkdir()
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore", TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "thoughtpatch", *argv]
    # a runner started in the background (CI) may ignore SIGINT, which its children inherit: restore it
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint)
    seen = []
    for line in proc.stderr:  # wait until the long part has begun
        seen.append(line.decode())
        if marker in seen[-1]:
            break
    time.sleep(0.05)
    assert proc.poll() is None, f"finished before the signal: {seen}"
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    lines = rest.decode().strip().splitlines()
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert proc.returncode == 128 + sig, rest.decode()
    assert lines[-1] == f"thoughtpatch: interrupted by {name}; no output was written"
    assert "Traceback" not in rest.decode()
    assert out.read_bytes() == b"the previous result" and [p.name for p in out_dir.iterdir()] == [out.name]
    assert _digest(d) == before  # inputs untouched
    assert list(tmp.glob("thoughtpatch-*")) == []

    again = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr.decode()
    assert [p.name for p in out_dir.iterdir()] == [out.name]
    data = out.read_bytes()
    _ = updates_from_bytes(data) if command == "extract" else patch_from_bytes(data)


# ------------------------------------------------------------------------------------------ numerical guards
@pytest.fixture
def broken_llama(tiny_dir):
    """The pico llama with block 1's attention norm scaled to infinity (as an overflowing dtype would)."""
    lm = load_model(str(tiny_dir("llama")))
    with torch.no_grad():
        lm.model.model.layers[1].input_layernorm.weight.fill_(float("inf"))
    return lm


def test_nan_in_extraction_names_the_block(broken_llama):
    pairs = align(broken_llama.tokenizer, Prompt("Be a pirate."), ["hello there", "a cat"])
    with pytest.raises(UsageError, match=r"^block 1 \(extraction\): NaN or Inf"):
        extract(broken_llama.model, pairs)


def test_nan_in_condensation_names_the_block(broken_llama):
    pairs = align(broken_llama.tokenizer, Prompt("Be a pirate."), ["hello there", "a cat"])
    with pytest.raises(UsageError, match=r"^block 1 .*NaN or Inf"):
        condense(broken_llama.model, pairs, CondenseConfig(attn="none"))


@pytest.mark.filterwarnings("ignore::thoughtpatch.errors.IllConditionedWarning")  # the other blocks' repeats
def test_ill_conditioned_fit_warns_with_the_option_to_raise(tiny_dir):
    lm = load_model(str(tiny_dir("llama")))
    pairs = align(lm.tokenizer, Prompt("Be a pirate."), ["hi"])  # far fewer tokens than dimensions
    with pytest.warns(IllConditionedWarning, match=r"block 0 thought matrix: .*raise --ridge \(now 0\)"):
        condense(lm.model, pairs, CondenseConfig(attn="none", ridge=0.0))
    with pytest.warns(IllConditionedWarning, match=r"block 0 attention map: .*raise --attn-ridge"):
        cfg = CondenseConfig(attn="full", attn_query=True, vector=False, matrix=False, attn_ridge=0.0)
        condense(lm.model, pairs, cfg)
    import warnings

    with warnings.catch_warnings():  # the default ridges are well-conditioned: no warning
        warnings.simplefilter("error", IllConditionedWarning)
        condense(lm.model, align(lm.tokenizer, Prompt("Be a pirate."), ["hello there", "a cat"]), CondenseConfig())


def test_updates_record_the_tokenizer(tiny_dir):
    lm = load_model(str(tiny_dir("gpt2")))
    meta = provenance(lm, Prompt("x"), ["q"])
    assert len(meta["tokenizer_sha256"]) == 16 and json.loads(meta["fingerprint"])["vocab_size"] == 400


def test_check_never_reads_nan_as_a_match(tiny_dir):
    from thoughtpatch import check

    lm = load_model(str(tiny_dir("llama")), dtype="float64")
    updates = extract(lm.model, align(lm.tokenizer, Prompt("Be a pirate."), ["hello there", "a cat"]))
    assert check(lm.model, updates) <= 1e-9
    with torch.no_grad():
        lm.model.model.layers[1].input_layernorm.weight.fill_(float("inf"))
    assert check(lm.model, updates) == float("inf")


def test_padding_beyond_a_sliding_window_stays_finite(tiny_dir):
    """Gemma-2 with a window shorter than the length gap in a batch: fully masked padded rows must not leak."""
    from thoughtpatch import check

    lm = load_model(str(tiny_dir("gemma2")), dtype="float64")
    queries = ["dog", "How do I boil an egg? Answer briefly and politely, like a pirate."]
    pairs = align(lm.tokenizer, Prompt("Be a pirate."), queries, chat=False)
    assert len(pairs.queries[1]) - len(pairs.queries[0]) > lm.model.config.sliding_window
    updates = extract(lm.model, pairs, batch_size=2)
    assert check(lm.model, updates, batch_size=2) < 1e-5
    patch = condense(lm.model, pairs, CondenseConfig(batch_size=2))
    assert all(bool(t.isfinite().all()) for lp in patch.layers.values() for t in lp.tensors().values())


def test_spill_folders_of_killed_processes_are_swept(tmp_path, monkeypatch):
    """A process killed outright leaves its spill folder; the next spill on the host removes it, and only it."""
    import platform
    import tempfile

    from thoughtpatch.files import Spill

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = platform.node()
    left = [tmp_path / f"thoughtpatch-{host}-{dead.pid}-abc", tmp_path / f"thoughtpatch-{host}-{os.getpid()}-live"]
    left.append(tmp_path / f"thoughtpatch-elsewhere-{dead.pid}-other")  # another host's: not ours to judge
    for folder in left:
        folder.mkdir()
        (folder / "rows-0").write_bytes(b"x")
    with Spill(torch.device("cpu")) as spill:
        spill.put("rows", 0, {"a": torch.ones(2)})
        assert torch.equal(spill.get("rows", 0)["a"], torch.ones(2))
        assert spill.folder.name.startswith(f"thoughtpatch-{host}-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in left[1:])
