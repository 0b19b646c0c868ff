"""The implicit-updates file: tensors and metadata schema, and the model fingerprint both formats carry.

An updates file (``extract -o``) holds, per block ``l``: ``delta.l``, ``a.l``, ``u.l`` (one row per
query token), ``sink`` (blocks x tokens), ``probe`` and ``position`` (which query and token each row
is), the token ids of both runs, and metadata naming the model, the prompt and probe hashes and the
token counts, so that ``condense`` can re-run the model where a construction needs it.
"""

from __future__ import annotations

import json

import torch

from . import __version__
from .errors import UsageError
from .extract import Updates
from .files import load_tensors, save_tensors
from .prompts import TokenPairs

__all__ = ["UPDATES_FORMAT", "fingerprint", "updates_to_bytes", "updates_from_bytes", "check_fingerprint"]

UPDATES_FORMAT = "thoughtpatch.updates"
UPDATES_VERSION = "1"


def fingerprint(config) -> dict[str, object]:
    """What a patch must match in a model: architecture and sizes."""
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return {
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "model_type": config.model_type,
        "hidden_size": int(config.hidden_size),
        "num_layers": int(config.num_hidden_layers),
        "vocab_size": int(config.vocab_size),
        "intermediate_size": int(inter) if inter else None,
    }


def check_fingerprint(meta: dict[str, str], config, what: str) -> None:
    """Refuse a file made for another model (architecture or sizes differ)."""
    theirs = json.loads(meta.get("fingerprint", "{}"))
    ours = fingerprint(config)
    diff = [k for k in ours if k in theirs and theirs[k] != ours[k]]
    if diff:
        k = diff[0]
        raise UsageError(f"{what} was made for another model: {k} is {theirs[k]} there but {ours[k]} here")


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


def updates_from_bytes(data: bytes, what: str = "updates file") -> tuple[Updates, dict[str, str]]:
    tensors, meta = load_tensors(data, what)
    if meta.get("format") != UPDATES_FORMAT:
        hint = " (it is a patch; condense reads an updates file)" if "patch" in meta.get("format", "") else ""
        raise UsageError(f"{what}: not a thoughtpatch updates file{hint}")
    try:
        n_layers = int(meta["layers"])
        lengths = tensors["ids.query_lengths"].tolist()
        flat = tensors["ids.queries"].tolist()
        queries, start = [], 0
        for n in lengths:
            queries.append(flat[start : start + n])
            start += n
        pairs = TokenPairs(
            tensors["ids.prefix_prompted"].tolist(),
            tensors["ids.prefix_free"].tolist(),
            queries,
            int(meta["n_lead"]),
            meta["chat"] == "true",
            tensors["ids.answer_start"].tolist(),
        )
        up = Updates(
            [tensors[f"delta.{i}"] for i in range(n_layers)],
            [tensors[f"a.{i}"] for i in range(n_layers)],
            [tensors[f"u.{i}"] for i in range(n_layers)],
            tensors["sink"].bool(),
            tensors["probe"],
            tensors["position"],
            tensors.get("embed_delta"),
            pairs,
        )
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{what}: missing or malformed entry {exc}") from None
    n = up.n_tokens
    if any(x.shape[0] != n for x in (*up.delta, *up.a, *up.u)) or up.sink.shape != (n_layers, n):
        raise UsageError(f"{what}: tensor shapes do not match its token count {n}")
    return up, meta
