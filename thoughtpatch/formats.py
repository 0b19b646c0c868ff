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
from .extract import Rows, Updates
from .files import StreamedTensors, load_tensors, read_tensors, save_tensors
from .prompts import TokenPairs
from .schema import TEXT, Schema, check_fingerprint, check_meta, fingerprint, fingerprint_field, natural, one_of

__all__ = [
    "UPDATES_FORMAT",
    "fingerprint",
    "updates_to_bytes",
    "updates_from_bytes",
    "UpdatesWriter",
    "read_pairs",
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


def _pair_tensors(p: TokenPairs) -> dict[str, torch.Tensor]:
    t = {"ids.prefix_prompted": _ids(p.prefix_prompted), "ids.prefix_free": _ids(p.prefix_free)}
    t["ids.queries"] = _ids([tok for q in p.queries for tok in q])
    t["ids.query_lengths"] = _ids([len(q) for q in p.queries])
    t["ids.answer_start"] = _ids(p.answer_start or [len(q) for q in p.queries])
    return t


def _updates_meta(p: TokenPairs, n_layers: int, n_tokens: int, dtype: torch.dtype, provenance: dict[str, str]):
    return {
        "format": UPDATES_FORMAT,
        "format_version": UPDATES_VERSION,
        "tool_version": __version__,
        "layers": str(n_layers),
        "tokens": str(n_tokens),
        "queries": str(len(p.queries)),
        "n_lead": str(p.n_lead),
        "chat": "true" if p.chat else "false",
        "layer_convention": "0-based block index",
        "dtype": str(dtype).removeprefix("torch."),
        **provenance,
    }


def updates_to_bytes(up: Updates, provenance: dict[str, str]) -> bytes:
    t: dict[str, torch.Tensor] = {}
    for name, per_layer in (("delta", up.delta), ("a", up.a), ("u", up.u)):
        for i, x in enumerate(per_layer):
            t[f"{name}.{i}"] = x
    t["sink"] = up.sink.to(torch.uint8)
    t["probe"], t["position"] = up.probe.long(), up.position.long()
    if up.embed_delta is not None:
        t["embed_delta"] = up.embed_delta
    t |= _pair_tensors(up.pairs)
    return save_tensors(t, _updates_meta(up.pairs, up.n_layers, up.n_tokens, up.delta[0].dtype, provenance))


class UpdatesWriter:
    """An updates file written batch by batch as :func:`~thoughtpatch.extract.extract_rows` yields them, in
    any order: the bytes :func:`updates_to_bytes` writes for the same updates, with only one batch in memory.

    The layout is fixed by the first batch (blocks, width, dtype); :meth:`finish` adds the sink flags.
    Atomic like every output (see :class:`~thoughtpatch.files.StreamedTensors`).
    """

    def __init__(self, path: str, pairs: TokenPairs, provenance: dict[str, str]):
        self.path, self.pairs, self.provenance = path, pairs, provenance
        self.file: StreamedTensors | None = None

    def __enter__(self) -> UpdatesWriter:
        return self

    def add(self, rows: Rows) -> None:
        if self.file is None:
            self._open(rows)
        for name, per_layer in (("delta", rows.delta), ("a", rows.a), ("u", rows.u)):
            for i, x in enumerate(per_layer):
                self.file.write(f"{name}.{i}", x, rows.start)
        if rows.embed is not None:
            self.file.write("embed_delta", rows.embed, rows.start)

    def _open(self, rows: Rows) -> None:
        p, (n_layers, d, dtype) = self.pairs, (len(rows.delta), rows.delta[0].shape[-1], rows.delta[0].dtype)
        n = sum(len(q) for q in p.queries)
        static = _pair_tensors(p) | {
            "probe": torch.cat([torch.full((len(q),), i) for i, q in enumerate(p.queries)]),
            "position": torch.cat([torch.arange(len(q)) for q in p.queries]),
        }
        name = str(dtype).removeprefix("torch.")
        specs = {f"{k}.{i}": (name, [n, d]) for k in ("delta", "a", "u") for i in range(n_layers)}
        specs |= {k: ("int64", list(t.shape)) for k, t in static.items()} | {"sink": ("uint8", [n_layers, n])}
        specs |= {"embed_delta": (name, [n, d])} if rows.embed is not None else {}
        self.file = StreamedTensors(self.path, specs, _updates_meta(p, n_layers, n, dtype, self.provenance))
        self.file.__enter__()
        for k, t in static.items():
            self.file.write(k, t)

    def finish(self, sink: torch.Tensor) -> None:
        """Write the sink flags (known once every batch is in) and publish the file."""
        self.file.write("sink", sink.to(torch.uint8))
        self.file.__exit__(None, None, None)
        self.file = None

    def __exit__(self, *exc) -> None:
        if self.file is not None:  # not finished (an error, an interrupt): nothing is left behind
            self.file.__exit__(exc[0] or RuntimeError, None, None)


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
_FLOAT = {"F64", "F32", "F16", "BF16"}
_IDS = ("ids.prefix_prompted", "ids.prefix_free", "ids.queries", "ids.query_lengths", "ids.answer_start")


def _expect(ok: bool, what: str, msg: str) -> None:
    if not ok:
        raise UsageError(f"{what}: {msg}")


def updates_from_bytes(data: bytes, what: str = "updates file") -> tuple[Updates, dict[str, str]]:
    """Parse and validate an updates file: metadata schema, every tensor's dtype and shape, ids in range."""
    tensors, meta = load_tensors(data, what)
    m = _check_layout({k: (t.is_floating_point(), tuple(t.shape)) for k, t in tensors.items()}, meta, what)
    for name, t in tensors.items():
        floating = t.is_floating_point()
        _expect(not floating or bool(torch.isfinite(t).all()), what, f"tensor {name!r} has NaN or Inf values")
    pairs = _pairs(tensors, m, what)
    n_q, lengths = len(pairs.queries), [len(q) for q in pairs.queries]
    probe, position = tensors["probe"], tensors["position"]
    _expect(bool(((probe >= 0) & (probe < n_q)).all()), what, "tensor 'probe' names a query that does not exist")
    limit = torch.tensor(lengths)[probe.clamp(0, n_q - 1)]
    _expect(bool(((position >= 0) & (position < limit)).all()), what, "tensor 'position' is beyond its query")
    up = Updates(
        *([tensors[f"{k}.{i}"] for i in range(m["layers"])] for k in ("delta", "a", "u")),
        tensors["sink"].bool(),
        probe,
        position,
        tensors.get("embed_delta"),
        pairs,
    )
    return up, meta


def read_pairs(path: str, what: str = "updates file") -> tuple[TokenPairs, dict[str, str]]:
    """The token ids and metadata of an updates file (``-``: stdin), checked as :func:`updates_from_bytes`
    checks them, without reading its updates into memory: all that re-running the model needs."""
    tensors, meta, entries = read_tensors(path, set(_IDS), what)
    m = _check_layout({k: (e["dtype"] in _FLOAT, tuple(e["shape"])) for k, e in entries.items()}, meta, what)
    return _pairs(tensors, m, what), meta


def _check_layout(layout: dict[str, tuple[bool, tuple]], meta: dict[str, str], what: str) -> dict:
    """Format, metadata schema, and every tensor's presence, kind (``floating``) and shape; the checked metadata."""
    if meta.get("format") != UPDATES_FORMAT:
        hint = " (it is a patch; condense reads an updates file)" if "patch" in meta.get("format", "") else ""
        raise UsageError(f"{what}: not a thoughtpatch updates file{hint}")
    m = check_meta(meta, UPDATES_SCHEMA, what)
    n_layers, n = m["layers"], m["tokens"]
    rows = [f"{k}.{i}" for i in range(n_layers) for k in ("delta", "a", "u")]
    known = {*rows, *_IDS, "sink", "probe", "position", "embed_delta"}
    for name in sorted(known - {"embed_delta"} - set(layout)):
        raise UsageError(f"{what}: tensor {name!r} is missing")
    for name, (floating, _) in layout.items():
        _expect(name in known, what, f"unexpected tensor {name!r}")
        kind = name in rows or name == "embed_delta"
        _expect(floating == kind, what, f"tensor {name!r} has the wrong dtype")
    shape = {k: s for k, (_, s) in layout.items()}
    d = shape["delta.0"][-1]
    for name in rows + ["embed_delta"] * ("embed_delta" in shape):
        _expect(
            len(shape[name]) == 2 and shape[name][0] == n,
            what,
            f"tensor {name!r} has shape {shape[name]}; metadata 'tokens' says {n} rows",
        )
    for i in range(n_layers):
        _expect(shape[f"delta.{i}"][1] == d, what, f"tensor 'delta.{i}' has another width than 'delta.0'")
        _expect(shape[f"a.{i}"] == shape[f"u.{i}"], what, f"'a.{i}' and 'u.{i}' differ in shape")
    for name, want in (("sink", (n_layers, n)), ("probe", (n,)), ("position", (n,))):
        _expect(shape[name] == want, what, f"tensor {name!r} must have shape {want}")
    _expect(all(len(shape[k]) == 1 for k in _IDS), what, "token-id tensors must be 1-dimensional")
    return m


def _pairs(tensors: dict[str, torch.Tensor], m: dict, what: str) -> TokenPairs:
    """The token pairs of the id tensors, checked: lengths, answer starts, ids in the vocabulary's range."""
    ids = {k: tensors[k].tolist() for k in _IDS}
    lengths, starts = ids["ids.query_lengths"], ids["ids.answer_start"]
    _expect(
        len(lengths) == m["queries"] == len(starts),
        what,
        f"metadata 'queries' is {m['queries']}, unlike its id tensors",
    )
    _expect(all(x >= 1 for x in lengths) and sum(lengths) == len(ids["ids.queries"]), what, "bad query lengths")
    _expect(all(0 <= a <= q for a, q in zip(starts, lengths, strict=True)), what, "bad 'ids.answer_start'")
    vocab = (m.get("fingerprint") or {}).get("vocab_size")
    flat = ids["ids.prefix_prompted"] + ids["ids.prefix_free"] + ids["ids.queries"]
    _expect(all(0 <= t < (vocab or 2**63) for t in flat), what, "a token id is out of the vocabulary's range")
    queries, start = [], 0
    for k in lengths:
        queries.append(ids["ids.queries"][start : start + k])
        start += k
    return TokenPairs(
        ids["ids.prefix_prompted"], ids["ids.prefix_free"], queries, m["n_lead"], m["chat"] == "true", starts
    )
