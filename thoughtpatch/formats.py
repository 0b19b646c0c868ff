"""The implicit-updates file: tensors and metadata schema, and the model fingerprint both formats carry.

An updates file (``extract -o``) holds, per block ``l``: ``delta.l``, ``a.l``, ``u.l`` (one row per
query token), ``sink`` (blocks x tokens), ``probe`` and ``position`` (which query and token each row
is), the token ids of both runs, and metadata naming the model, the prompt and probe hashes and the
token counts, so that ``condense`` can re-run the model where a construction needs it.
"""

from __future__ import annotations

import hashlib
import json

import torch

from . import __version__
from .errors import UsageError
from .extract import Updates
from .files import load_tensors, save_tensors
from .prompts import TokenPairs
from .schema import TEXT, Schema, check_fingerprint, check_meta, fingerprint, fingerprint_field, natural, one_of

__all__ = [
    "UPDATES_FORMAT",
    "fingerprint",
    "updates_to_bytes",
    "updates_from_bytes",
    "check_fingerprint",
    "check_tokenizer",
    "tokenizer_sha256",
]

UPDATES_FORMAT = "thoughtpatch.updates"
UPDATES_VERSION = "1"


def tokenizer_sha256(tokenizer) -> str:
    """What token ids mean: a hash of the vocabulary, the special tokens and the chat template."""
    doc = [
        sorted(tokenizer.get_vocab().items()),
        tokenizer.all_special_tokens,
        getattr(tokenizer, "chat_template", None),
    ]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def check_tokenizer(meta: dict[str, str], tokenizer, what: str) -> None:
    """Refuse token ids recorded with another tokenizer (they would mean other words here)."""
    theirs = meta.get("tokenizer_sha256")
    if theirs and theirs != tokenizer_sha256(tokenizer):
        raise UsageError(f"{what} was extracted with another tokenizer (its token ids mean other text here)")


def _ids(x: list[int]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)


def updates_to_bytes(up: Updates, provenance: dict[str, str]) -> bytes:
    t: dict[str, torch.Tensor] = {}
    for name, per_layer in (("delta", up.delta), ("a", up.a), ("u", up.u)):
        for i, x in enumerate(per_layer):
            t[f"{name}.{i}"] = x
    t["sink"] = up.sink.to(torch.uint8)
    t["probe"], t["position"] = up.probe.long(), up.position.long()
    if up.embed_delta is not None:
        t["embed_delta"] = up.embed_delta
    p = up.pairs
    t["ids.prefix_prompted"], t["ids.prefix_free"] = _ids(p.prefix_prompted), _ids(p.prefix_free)
    t["ids.queries"] = _ids([tok for q in p.queries for tok in q])
    t["ids.query_lengths"] = _ids([len(q) for q in p.queries])
    t["ids.answer_start"] = _ids(p.answer_start or [len(q) for q in p.queries])
    meta = {
        "format": UPDATES_FORMAT,
        "format_version": UPDATES_VERSION,
        "tool_version": __version__,
        "layers": str(up.n_layers),
        "tokens": str(up.n_tokens),
        "queries": str(len(p.queries)),
        "n_lead": str(p.n_lead),
        "chat": "true" if p.chat else "false",
        "layer_convention": "0-based block index",
        "dtype": str(up.delta[0].dtype).removeprefix("torch."),
        **provenance,
    }
    return save_tensors(t, meta)


UPDATES_SCHEMA: Schema = {
    "format_version": (True, *one_of(UPDATES_VERSION)),
    "layers": (True, *natural(1)),
    "tokens": (True, *natural(1)),
    "queries": (True, *natural(1)),
    "n_lead": (True, *natural(0)),
    "chat": (True, *one_of("true", "false")),
    "fingerprint": (False, *fingerprint_field),
    "answer_tokens": (False, *natural(0)),
    "tokenizer_sha256": (False, *TEXT),
}
_IDS = ("ids.prefix_prompted", "ids.prefix_free", "ids.queries", "ids.query_lengths", "ids.answer_start")


def _expect(ok: bool, what: str, msg: str) -> None:
    if not ok:
        raise UsageError(f"{what}: {msg}")


def updates_from_bytes(data: bytes, what: str = "updates file") -> tuple[Updates, dict[str, str]]:
    """Parse and validate an updates file: metadata schema, every tensor's dtype and shape, ids in range."""
    tensors, meta = load_tensors(data, what)
    if meta.get("format") != UPDATES_FORMAT:
        hint = " (it is a patch; condense reads an updates file)" if "patch" in meta.get("format", "") else ""
        raise UsageError(f"{what}: not a thoughtpatch updates file{hint}")
    m = check_meta(meta, UPDATES_SCHEMA, what)
    n_layers, n, n_q = m["layers"], m["tokens"], m["queries"]
    rows = [f"{k}.{i}" for i in range(n_layers) for k in ("delta", "a", "u")]
    known = {*rows, *_IDS, "sink", "probe", "position", "embed_delta"}
    for name in sorted(known - {"embed_delta"} - set(tensors)):
        raise UsageError(f"{what}: tensor {name!r} is missing")
    for name, t in tensors.items():
        _expect(name in known, what, f"unexpected tensor {name!r}")
        floating = name in rows or name == "embed_delta"
        _expect(t.is_floating_point() == floating, what, f"tensor {name!r} has the wrong dtype {t.dtype}")
        _expect(not floating or bool(torch.isfinite(t).all()), what, f"tensor {name!r} has NaN or Inf values")
    d = tensors["delta.0"].shape[-1]
    for name in rows + ["embed_delta"] * ("embed_delta" in tensors):
        shape = tuple(tensors[name].shape)
        _expect(
            len(shape) == 2 and shape[0] == n,
            what,
            f"tensor {name!r} has shape {shape}; metadata 'tokens' says {n} rows",
        )
    for i in range(n_layers):
        _expect(tensors[f"delta.{i}"].shape[1] == d, what, f"tensor 'delta.{i}' has another width than 'delta.0'")
        _expect(tensors[f"a.{i}"].shape == tensors[f"u.{i}"].shape, what, f"'a.{i}' and 'u.{i}' differ in shape")
    for name, shape in (("sink", (n_layers, n)), ("probe", (n,)), ("position", (n,))):
        _expect(tuple(tensors[name].shape) == shape, what, f"tensor {name!r} must have shape {shape}")
    ids = {k: tensors[k].tolist() for k in _IDS}
    lengths, starts = ids["ids.query_lengths"], ids["ids.answer_start"]
    _expect(all(tensors[k].dim() == 1 for k in _IDS), what, "token-id tensors must be 1-dimensional")
    _expect(len(lengths) == n_q == len(starts), what, f"metadata 'queries' is {n_q}, unlike its id tensors")
    _expect(all(x >= 1 for x in lengths) and sum(lengths) == len(ids["ids.queries"]), what, "bad query lengths")
    _expect(all(0 <= a <= q for a, q in zip(starts, lengths, strict=True)), what, "bad 'ids.answer_start'")
    vocab = (m.get("fingerprint") or {}).get("vocab_size")
    flat = ids["ids.prefix_prompted"] + ids["ids.prefix_free"] + ids["ids.queries"]
    _expect(all(0 <= t < (vocab or 2**63) for t in flat), what, "a token id is out of the vocabulary's range")
    probe, position = tensors["probe"], tensors["position"]
    _expect(bool(((probe >= 0) & (probe < n_q)).all()), what, "tensor 'probe' names a query that does not exist")
    limit = torch.tensor(lengths)[probe.clamp(0, n_q - 1)]
    _expect(bool(((position >= 0) & (position < limit)).all()), what, "tensor 'position' is beyond its query")
    queries, start = [], 0
    for k in lengths:
        queries.append(ids["ids.queries"][start : start + k])
        start += k
    pairs = TokenPairs(
        ids["ids.prefix_prompted"], ids["ids.prefix_free"], queries, m["n_lead"], m["chat"] == "true", starts
    )
    up = Updates(
        *([tensors[f"{k}.{i}"] for i in range(n_layers)] for k in ("delta", "a", "u")),
        tensors["sink"].bool(),
        probe,
        position,
        tensors.get("embed_delta"),
        pairs,
    )
    return up, meta
