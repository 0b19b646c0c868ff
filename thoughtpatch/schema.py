"""Metadata schemas of the patch and updates files: required keys, their types and allowed values.

A schema maps each key to ``(required, description, parse)``; :func:`check_meta` parses every key it
names and refuses a file with a message naming the first bad key. Keys a schema does not name are kept
as free text (method settings, the prompt).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from .errors import UsageError

__all__ = [
    "Schema",
    "check_meta",
    "natural",
    "one_of",
    "block_list",
    "fingerprint_field",
    "TEXT",
    "fingerprint",
    "check_fingerprint",
]

Parse = Callable[[str], object]
Schema = dict[str, tuple[bool, str, Parse]]


def _digits(s: str) -> int:
    if not (s.isascii() and s.isdigit() and len(s) <= 18):
        raise ValueError(s)
    return int(s)


def natural(lo: int = 0) -> tuple[str, Parse]:
    """An integer ``>= lo`` written in decimal digits."""

    def parse(s: str) -> int:
        if _digits(s) < lo:
            raise ValueError(s)
        return int(s)

    return f"an integer >= {lo}", parse


def one_of(*values: str) -> tuple[str, Parse]:
    def parse(s: str) -> str:
        if s not in values:
            raise ValueError(s)
        return s

    return "one of " + ", ".join(repr(v) for v in values), parse


def _blocks(s: str) -> list[int]:
    return [_digits(x) for x in s.split(",")] if s else []


block_list = ("comma-separated block numbers", _blocks)
TEXT = ("text", str)
_SIZES = ("hidden_size", "num_layers", "vocab_size")


def _fingerprint(s: str) -> dict:
    fp = json.loads(s)
    if not isinstance(fp, dict) or not all(isinstance(fp.get(k), str) for k in ("architecture", "model_type")):
        raise ValueError(s)
    for k in (*_SIZES, "intermediate_size"):
        v = fp.get(k)
        if not (type(v) is int and v > 0 or (v is None and k == "intermediate_size" and k in fp)):
            raise ValueError(s)
    return fp


fingerprint_field = ("a JSON object with architecture, model_type and positive sizes", _fingerprint)


def check_meta(meta: dict[str, str], schema: Schema, what: str) -> dict[str, object]:
    """The parsed value of every key ``schema`` names; a clear error naming the first missing or bad key."""
    out: dict[str, object] = {}
    for key, (required, desc, parse) in schema.items():
        if key not in meta:
            if required:
                raise UsageError(f"{what}: metadata {key!r} is missing")
            continue
        try:
            out[key] = parse(meta[key])
        except (ValueError, TypeError, RecursionError):
            value = meta[key] if len(meta[key]) <= 40 else meta[key][:37] + "..."
            raise UsageError(f"{what}: metadata {key!r} must be {desc}, not {value!r}") from None
    return out


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
