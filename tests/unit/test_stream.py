"""Updates files written batch by batch and read for their token ids only: the same bytes, memory flat in
the number of probes, nothing half-written."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from conftest import run_cli

from thoughtpatch import Prompt, UsageError, load_model
from thoughtpatch.files import head_bytes, read_tensors, split_header, tensor_header
from thoughtpatch.formats import read_pairs, updates_from_bytes, updates_to_bytes
from thoughtpatch.pipeline import run_extract

PROMPT = Prompt("You are a pirate. Speak like a pirate.")
PROBES = ["hello there", "a cat", "What is the capital of France?", "1 2 3", "tell me a story"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: absolute positions, so an embed_delta tensor too
def test_streamed_file_has_the_in_memory_bytes(tiny_dir, tmp_path, family):
    lm = load_model(str(tiny_dir(family)))
    out = tmp_path / "updates.safetensors"
    kw = {"answer_tokens": 2, "batch_size": 2, "do_check": True}  # 3 batches
    streamed = run_extract(lm, PROMPT, PROBES, output=str(out), **kw)
    kept = run_extract(lm, PROMPT, PROBES, **kw)
    assert streamed.updates is None and kept.updates is not None
    assert (kept.updates.embed_delta is not None) == (family == "gpt2")
    assert out.read_bytes() == updates_to_bytes(kept.updates, kept.meta)
    assert streamed.summary() == kept.summary() | {"seconds": streamed.summary()["seconds"]}
    assert streamed.max_logit_error < 1e-3 and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_extract_to_stdout_has_the_file_bytes(tiny_dir, tmp_path):
    (tmp_path / "p.txt").write_text("Be brief.\n")
    (tmp_path / "q.txt").write_text("\n".join(PROBES) + "\n")
    args = ["extract", "p.txt", "--model", str(tiny_dir("llama")), "--probes", "q.txt", "--batch-size", "2", "-q"]
    to_file, to_stdout = run_cli(*args, "-o", "u.st", cwd=tmp_path), run_cli(*args, "-o", "-", cwd=tmp_path)
    assert to_file.returncode == to_stdout.returncode == 0, to_stdout.stderr.decode()
    assert to_stdout.stdout == (tmp_path / "u.st").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt", "q.txt", "u.st"]


def test_a_failure_mid_extraction_leaves_nothing_behind(tiny_dir, tmp_path):
    """Block 1 overflows after the first batch has been written: no output, no temp file, the old file kept."""
    lm = load_model(str(tiny_dir("llama")))
    out = tmp_path / "updates.safetensors"
    out.write_bytes(b"previous")

    def overflow(n: int) -> None:
        with torch.no_grad():
            lm.model.model.layers[1].input_layernorm.weight.fill_(float("inf"))

    with pytest.raises(UsageError, match="NaN or Inf"):
        run_extract(lm, PROMPT, PROBES, answer_tokens=0, batch_size=2, output=str(out), progress=overflow)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.fixture(scope="module")
def updates_file(tiny_dir, tmp_path_factory):
    lm = load_model(str(tiny_dir("llama")))
    path = tmp_path_factory.mktemp("ids") / "updates.safetensors"
    run_extract(lm, PROMPT, PROBES, answer_tokens=2, batch_size=2, output=str(path))
    return path


def _poisoned(data: bytes) -> bytes:
    """The same file with every update NaN (the token ids intact)."""
    header, body = split_header(data, "x")
    body = bytearray(body)
    for name, e in header.items():
        if name.split(".")[0] in ("delta", "a", "u"):
            start, end = e["data_offsets"]
            body[start:end] = torch.full(((end - start) // 4,), float("nan")).numpy().tobytes()
    return data[: len(data) - len(body)] + bytes(body)


def test_read_pairs_reads_the_ids_only(updates_file, tmp_path, monkeypatch):
    data = updates_file.read_bytes()
    full, meta = updates_from_bytes(data)
    bad = tmp_path / "nan.safetensors"
    bad.write_bytes(_poisoned(data))
    with pytest.raises(UsageError, match="NaN or Inf"):
        updates_from_bytes(bad.read_bytes())
    pairs, meta2 = read_pairs(str(bad))  # never reads the updates: their values cannot matter
    assert vars(pairs) == vars(full.pairs) and meta2 == meta
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data))))
    pairs, _ = read_pairs("-")
    assert vars(pairs) == vars(full.pairs) and sys.stdin.buffer.read() == b""  # the stream was read to its end


def test_read_tensors_checks_the_header_against_the_stream(tmp_path, monkeypatch):
    header = tensor_header({"ids.x": ("int64", [4]), "y": ("float32", [1 << 40])}, {"k": "v"})
    data = head_bytes(header) + torch.arange(4).numpy().tobytes() + b"\0" * 64  # y claims a terabyte
    (tmp_path / "f").write_bytes(data)
    with pytest.raises(UsageError, match="beyond or unlike"):
        read_tensors(tmp_path / "f", {"ids.x"}, "file f")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data))))
    with pytest.raises(UsageError, match="beyond or unlike"):
        read_tensors("-", {"ids.x"}, "stdin")


def test_sequential_condense_never_reads_the_updates(tiny_dir, updates_file, tmp_path):
    (tmp_path / "nan.st").write_bytes(_poisoned(updates_file.read_bytes()))
    args = ["--mode", "compact", "--kv", "0", "--rank", "2", "-q"]
    clean = run_cli("condense", str(updates_file), "-o", "clean.st", *args, cwd=tmp_path)
    poisoned = run_cli(
        "condense", "-", "-o", "nan-out.st", *args, cwd=tmp_path, stdin=(tmp_path / "nan.st").read_bytes()
    )
    assert clean.returncode == poisoned.returncode == 0, poisoned.stderr.decode()
    assert (tmp_path / "clean.st").read_bytes() == (tmp_path / "nan-out.st").read_bytes()
    parallel = run_cli("condense", "nan.st", "-o", "p.st", *args, "--construction", "parallel", cwd=tmp_path)
    assert parallel.returncode == 2 and b"NaN or Inf" in parallel.stderr and not (tmp_path / "p.st").exists()
