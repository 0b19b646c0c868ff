"""Fuzzing the file readers the CLI uses: every malformed patch or updates file is a clean ``UsageError``.

Mutations of real files (truncations, bit flips, huge declared sizes, wrong dtypes, out-of-range offsets,
missing or retyped metadata, NaN/Inf tensors) go through ``patch_from_bytes`` / ``updates_from_bytes``;
anything but success or ``UsageError`` (another exception, a hang past the deadline, a large allocation)
fails. A few cases also run through the real command line.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thoughtpatch import Prompt, UsageError, align, extract, load_model
from thoughtpatch.files import join_header, split_header
from thoughtpatch.formats import fingerprint, updates_from_bytes, updates_to_bytes
from thoughtpatch.patch import LayerPatch, Patch, describe_patch, patch_from_bytes, patch_to_bytes

FUZZ = settings(
    max_examples=120,
    deadline=2000,  # a hang or a slow path fails the example
    derandomize=True,  # the same cases on every CI run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _patch_bytes() -> bytes:
    torch.manual_seed(0)
    d, heads = 8, 2
    layers = {
        0: LayerPatch(attn_weight=torch.randn(heads, 4, 4), attn_bias=torch.randn(d), vector=torch.randn(d)),
        1: LayerPatch(matrix_a=torch.randn(d, 2), matrix_b=torch.randn(d, 2), attn_gate=torch.randn(heads, d + 1)),
    }
    fp = {"architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": d, "num_layers": 2}
    fp |= {"vocab_size": 400, "intermediate_size": 16}
    return patch_to_bytes(Patch(layers, "skip", 1, {"fingerprint": json.dumps(fp), "base_model": "tiny"}))


PATCH = _patch_bytes()


@pytest.fixture(scope="module")
def updates_data(tiny_dir):
    lm = load_model(str(tiny_dir("llama")))
    up = extract(lm.model, align(lm.tokenizer, Prompt("Be a pirate."), ["hi", "a cat"]))
    fp = json.dumps(fingerprint(lm.model.config), sort_keys=True)
    return updates_to_bytes(up, {"base_model": "tiny", "fingerprint": fp})


def _read_patch(data: bytes) -> None:
    try:
        describe_patch(patch_from_bytes(data))  # what `inspect` does with a file that passed
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc)


def _read_updates(data: bytes) -> None:
    try:
        updates_from_bytes(data)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc)


WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=12),
    st.lists(st.integers(-5, 2**64), max_size=4),
    st.sampled_from(["F32", "F64", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F8_E4M3", "I8", "f32", ""]),
)


def _edit_header(data: bytes, draw) -> bytes:
    header, body = split_header(data, "test")
    names = sorted(header)
    name = draw(st.sampled_from(names))
    entry = header[name]
    if name == "__metadata__":
        key = draw(st.sampled_from(sorted(entry)))
        action = draw(st.sampled_from(["drop", "text", "json", "number"]))
        if action == "drop":
            del entry[key]
        elif action == "text":
            entry[key] = draw(st.text(max_size=20))
        elif action == "json":
            entry[key] = json.dumps(draw(WEIRD))
        else:
            entry[key] = str(draw(st.integers(-(2**64), 2**64)))
    else:
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "replace"]))
        if field == "drop":
            del header[name]
        elif field == "replace":
            header[name] = draw(WEIRD)
        else:
            entry[field] = draw(WEIRD)
    return join_header(header, body)


@FUZZ
@given(st.data())
def test_patch_truncated_or_bit_flipped(data):
    blob = bytearray(PATCH)
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    _read_patch(bytes(blob))


@FUZZ
@given(st.integers(0, 2**64 - 1), st.booleans())
def test_patch_huge_declared_header_size(n, keep_body):
    _read_patch(struct.pack("<Q", n) + (PATCH[8:] if keep_body else b"{}"))


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_patch_header_and_metadata_edits(data):
    _read_patch(_edit_header(PATCH, data.draw))


@FUZZ
@given(st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.integers(0, 10**6))
def test_patch_nan_inf_tensor_is_refused(bad, which):
    header, body = split_header(PATCH, "test")
    names = sorted(k for k in header if k != "__metadata__")
    e = header[names[which % len(names)]]
    start = e["data_offsets"][0]
    body = body[:start] + struct.pack("<f", bad) + body[start + 4 :]
    with pytest.raises(UsageError, match="NaN or Inf"):
        patch_from_bytes(join_header(header, body))


@settings(FUZZ, max_examples=150)
@given(st.data())
def test_updates_mutations(updates_data, data):
    if data.draw(st.booleans()):
        blob = _edit_header(updates_data, data.draw)
    else:
        blob = bytearray(updates_data)
        for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
        blob = bytes(blob)
    _read_updates(blob)


def test_unmutated_files_load(updates_data):
    back = patch_from_bytes(PATCH)
    assert patch_to_bytes(back) == PATCH  # the fuzz starts from files that are valid
    assert updates_from_bytes(updates_data)[0].n_layers == 3


@pytest.mark.parametrize(
    "case",
    ["huge_header", "missing_key", "bad_shape"],
)
def test_cli_bad_patch_files_exit_2(tmp_path, case):
    header, body = split_header(PATCH, "test")
    if case == "huge_header":
        blob = struct.pack("<Q", 2**63) + PATCH[8:]
    elif case == "missing_key":
        del header["__metadata__"]["placement"]
        blob = join_header(header, body)
    else:
        header["layers.0.vector"]["shape"] = [2**40, 2**40]
        blob = join_header(header, body)
    (tmp_path / "p.safetensors").write_bytes(blob)
    r = run_cli("inspect", str(tmp_path / "p.safetensors"))
    err = r.stderr.decode()
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("thoughtpatch: error: patch ")
    if case == "missing_key":
        assert "'placement' is missing" in err
