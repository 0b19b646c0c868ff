"""The Patch type and its self-describing safetensors file (DESIGN.md section 3).

Tensors, per block ``l`` (0-based), each optional:

* ``layers.l.attn.weight``: map of the attention output minus identity, per head ``(H, hd, hd)`` (full) or
  ``(H,)`` (a scalar per head), or across the heads ``(1, H*hd, H*hd)`` (cross); ``layers.l.attn.bias``: its
  constant part ``(H*hd,)``. Site: the input of the attention output projection (``o_proj``);
  ``o <- o + weight o + bias`` (per head, or over all heads' outputs at once).
* ``layers.l.attn.query``: ``(H*hd, d)``, a correction of the head outputs read from the attention block's
  normalised input ``x`` (query-dependent; runs in memory, does not fold into the weights).
* ``layers.l.attn.gate``: ``(H, d + 1)``, a query-dependent scale of each head's output,
  ``o_h <- o_h + (gate[h, 0] + gate[h, 1:] . x) o_h`` (the prompt's share of the attention mass varies with
  the query; in memory only).
* ``layers.l.vector``: ``(d,)`` thought vector; added after the MLP (``skip``) or to the mid-residual before
  the MLP norm (``attn_out``), per the ``placement`` metadata.
* ``layers.l.matrix.B`` / ``layers.l.matrix.A``: ``(d, k)`` factors of the thought matrix ``M = B A^T``
  acting on the MLP input: every MLP input matrix ``W <- W (I + M)``.
* ``layers.l.down.B`` / ``layers.l.down.A``: ``(d, k)`` / ``(I, k)`` factors of the down map ``G = B A^T`` from
  the MLP's hidden activations ``h`` (the input of its output projection, width ``I``) to its output:
  ``y <- y + G h``, i.e. the output projection ``W_out <- W_out + B A^T``.
* ``layers.l.value.weight``: ``(KVH*hd, d)``, a change of the value projection, ``v <- v + weight x`` at every
  patched position (``x``: what the attention reads); it moves each head's output by ``weight_g xbar_h``,
  ``xbar_h`` the head's attention-weighted mean of the inputs it reads (bakes into ``v_proj``).
* ``layers.l.kv.key`` / ``layers.l.kv.value``: ``(KVH, m, hd)`` virtual key/value slots and
  ``layers.l.kv.bias`` / ``layers.l.kv.position``: ``(KVH, m)`` their log-multiplicities and positions (for
  sliding-window layers) (thoughtpatch.virtual): at the patched positions
  the attention reads the slots instead of the first ``skip_leading_tokens`` tokens (in memory only).

The metadata (strings) names the format and version, the base model and its fingerprint, the method and
its settings, the prompt (hash, and text unless opted out), the probes, dtypes and the tool version. The
same inputs give the same bytes: no timestamps, sorted keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import __version__
from .errors import UsageError
from .files import load_tensors, save_tensors
from .schema import TEXT, Schema, block_list, check_meta, fingerprint_field, natural, one_of

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "LayerPatch",
    "Patch",
    "PATCH_FORMAT",
    "patch_to_bytes",
    "patch_from_bytes",
    "describe_patch",
    "validate_for",
    "attn_form",
    "attn_matrix",
]

PATCH_FORMAT = "thoughtpatch.patch"
PATCH_VERSION = "1"
PLACEMENTS = ("skip", "attn_out")
# LayerPatch field -> tensor name suffix in the file
_PARTS = {
    "attn_weight": "attn.weight",
    "attn_bias": "attn.bias",
    "attn_query": "attn.query",
    "attn_gate": "attn.gate",
    "vector": "vector",
    "matrix_a": "matrix.A",
    "matrix_b": "matrix.B",
    "kv_key": "kv.key",
    "kv_value": "kv.value",
    "kv_bias": "kv.bias",
    "kv_position": "kv.position",
    "down_a": "down.A",
    "down_b": "down.B",
    "value_weight": "value.weight",
}


def attn_form(w: Tensor) -> str:
    """The form of an attention map: ``scalar`` (one per head), ``full`` (per head) or ``cross`` (across heads;
    with one head the two are the same map)."""
    return "scalar" if w.ndim == 1 else "cross" if w.shape[0] == 1 else "full"


def attn_matrix(w: Tensor, head_dim: int) -> Tensor:
    """Any form of attention map as one ``(H*hd, H*hd)`` matrix on the concatenated head outputs (block-diagonal
    unless it is a cross map); ``head_dim`` is needed for the scalar form only."""
    import torch

    return torch.diag(w.repeat_interleave(head_dim)) if w.ndim == 1 else torch.block_diag(*w)


@dataclass
class LayerPatch:
    """The parts of a patch at one block; any of them may be absent (torch tensors, or numpy arrays where a
    patch was read for baking on the CPU)."""

    attn_weight: Tensor | None = None
    attn_bias: Tensor | None = None
    attn_query: Tensor | None = None
    attn_gate: Tensor | None = None
    vector: Tensor | None = None
    matrix_a: Tensor | None = None
    matrix_b: Tensor | None = None
    kv_key: Tensor | None = None
    kv_value: Tensor | None = None
    kv_bias: Tensor | None = None
    kv_position: Tensor | None = None
    down_a: Tensor | None = None
    down_b: Tensor | None = None
    value_weight: Tensor | None = None  # (KVH x hd, d): a change of the value projection (bakes into v_proj)

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, f) for f, name in _PARTS.items() if getattr(self, f) is not None}

    @property
    def in_memory_only(self) -> bool:
        """True when a part reads the query (it runs as a hook and does not fold into weights)."""
        return self.attn_query is not None or self.attn_gate is not None or self.kv_key is not None

    @property
    def rank(self) -> int:
        return 0 if self.matrix_a is None else int(self.matrix_a.shape[1])

    def matrix(self) -> Tensor | None:
        return None if self.matrix_a is None else self.matrix_b @ self.matrix_a.T

    def numel(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors().values())

    def scaled(self, alpha: float) -> LayerPatch:
        """Every additive part times ``alpha`` (the matrix through its left factor); the slots are a copy of the
        prompt's keys and values, not a difference, and stay as they are."""
        s = {k: (None if v is None else v * alpha) for k, v in vars(self).items()}
        s.update({k: getattr(self, k) for k in ("matrix_a", "down_a", "kv_key", "kv_value", "kv_bias", "kv_position")})
        return LayerPatch(**s)

    def to(self, device: torch.device | str) -> LayerPatch:
        return LayerPatch(**{k: (None if v is None else v.to(device)) for k, v in vars(self).items()})


@dataclass
class Patch:
    """A token-independent patch: per-block parts plus the metadata that describes them."""

    layers: dict[int, LayerPatch]
    placement: str = "skip"
    skip: int = 1  # leading tokens of every sequence left unpatched (the attention sink among them)
    meta: dict[str, str] = field(default_factory=dict)

    def numel(self) -> int:
        return sum(lp.numel() for lp in self.layers.values())

    @property
    def has_slots(self) -> bool:
        """True when some block carries virtual key/value slots (thoughtpatch.virtual)."""
        return any(lp.kv_key is not None for lp in self.layers.values())

    @property
    def bakeable(self) -> bool:
        """True when every part folds exactly into standard weights (no query term, no skipped tokens)."""
        return self.skip == 0 and not any(lp.in_memory_only for lp in self.layers.values())

    def scaled(self, alpha: float) -> Patch:
        return Patch({i: lp.scaled(alpha) for i, lp in self.layers.items()}, self.placement, self.skip, dict(self.meta))

    def to(self, device: torch.device | str) -> Patch:
        """The same patch with its tensors on ``device`` (no copy of those already there)."""
        return Patch({i: lp.to(device) for i, lp in self.layers.items()}, self.placement, self.skip, dict(self.meta))


def patch_to_bytes(patch: Patch) -> bytes:
    tensors = {f"layers.{i}.{k}": v for i, lp in sorted(patch.layers.items()) for k, v in lp.tensors().items()}
    meta = dict(patch.meta)
    meta.update(
        format=PATCH_FORMAT,
        format_version=PATCH_VERSION,
        tool_version=__version__,
        placement=patch.placement,
        skip_leading_tokens=str(patch.skip),
        layer_convention="0-based block index",
        layers=",".join(str(i) for i in sorted(patch.layers)),
        sites=json.dumps(
            {
                "attn": "input of the attention output projection, per head: o + W o + b (+ Q x)",
                "vector": "residual after the MLP" if patch.placement == "skip" else "mid-residual before the MLP norm",
                "matrix": "MLP input: every matrix W that reads it becomes W (I + B A^T)",
            }
            | ({"down": "MLP output projection: W_out becomes W_out + B A^T"} if _has(patch, "down_a") else {})
            | ({"value": "value projection: W_v becomes W_v + weight"} if _has(patch, "value_weight") else {})
            | (
                {"kv": "attention keys/values: the slots replace the skipped leading tokens at the patched positions"}
                if _has(patch, "kv_key")
                else {}
            ),
            sort_keys=True,
        ),
        parameters=str(patch.numel()),
        storage_dtype=_dtype_name(tensors),
    )
    return save_tensors(tensors, meta)


def _has(patch: Patch, part: str) -> bool:
    return any(getattr(lp, part) is not None for lp in patch.layers.values())


def _dtype_name(tensors: dict[str, Tensor]) -> str:
    names = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return ",".join(names) or "none"


# Metadata every patch file carries (thoughtpatch.schema), and the dimensions of each part.
PATCH_SCHEMA: Schema = {
    "format_version": (True, *one_of(PATCH_VERSION)),
    "placement": (True, *one_of(*PLACEMENTS)),
    "skip_leading_tokens": (True, *natural(0)),
    "layers": (True, *block_list),
    "parameters": (True, *natural(0)),
    "fingerprint": (False, *fingerprint_field),
    "tool_version": (False, *TEXT),
}
_DIMS = {
    "attn.weight": (1, 3),
    "attn.bias": (1,),
    "attn.query": (2,),
    "attn.gate": (2,),
    "vector": (1,),
    "kv.key": (3,),
    "kv.value": (3,),
}


def patch_from_bytes(data: bytes, what: str = "patch", numpy: bool = False) -> Patch:
    """Parse and validate a patch file's bytes; a clear error naming what is wrong (``numpy``: parts are
    read-only numpy arrays over ``data``, and torch is not imported)."""
    tensors, meta = load_tensors(data, what, numpy)
    fmt = meta.get("format", "")
    if fmt != PATCH_FORMAT:
        hint = " (it is an updates file: run condense on it first)" if fmt == "thoughtpatch.updates" else ""
        raise UsageError(f"{what}: not a thoughtpatch patch{hint}")
    m = check_meta(meta, PATCH_SCHEMA, what)
    layers: dict[int, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in _PARTS.values():
            raise UsageError(f"{what}: unexpected tensor {name!r}")
        if int(parts[1]) not in m["layers"]:
            raise UsageError(f"{what}: tensor {name!r} is in a block that metadata 'layers' does not list")
        if "float" not in str(t.dtype):
            raise UsageError(f"{what}: tensor {name!r} is {t.dtype}, expected floating point")
        if t.ndim not in _DIMS.get(parts[2], (2,)):
            raise UsageError(f"{what}: tensor {name!r} has {t.ndim} dimensions, expected {_DIMS.get(parts[2], 2)}")
        if not _finite(t):
            raise UsageError(f"{what}: tensor {name!r} has NaN or Inf values")
        layers.setdefault(int(parts[1]), {})[parts[2]] = t
    if sum(math.prod(t.shape) for t in tensors.values()) != m["parameters"]:
        raise UsageError(f"{what}: metadata 'parameters' is {m['parameters']}, unlike the numbers its tensors hold")
    out = {}
    for i, parts in layers.items():
        lp = LayerPatch(**{f: parts.get(name) for f, name in _PARTS.items()})
        if (lp.matrix_a is None) != (lp.matrix_b is None) or (
            lp.matrix_a is not None and lp.matrix_a.shape != lp.matrix_b.shape
        ):
            raise UsageError(f"{what}: layer {i} needs matrix.A and matrix.B of the same shape")
        if (lp.down_a is None) != (lp.down_b is None) or (
            lp.down_a is not None and lp.down_a.shape[1] != lp.down_b.shape[1]
        ):
            raise UsageError(f"{what}: layer {i} needs down.A and down.B with the same number of columns")
        if (lp.kv_key is None) != (lp.kv_value is None) or (
            lp.kv_key is not None
            and (
                lp.kv_key.shape != lp.kv_value.shape
                or any(t is not None and t.shape != lp.kv_key.shape[:2] for t in (lp.kv_bias, lp.kv_position))
            )
        ):
            raise UsageError(
                f"{what}: layer {i} needs kv.key and kv.value of one shape (kv.bias, kv.position: its first two)"
            )
        w = lp.attn_weight
        if w is not None and w.ndim == 3 and w.shape[1] != w.shape[2]:
            raise UsageError(f"{what}: layer {i} attn.weight has shape {tuple(w.shape)}, expected (heads, d, d)")
        out[i] = lp
    fp = m.get("fingerprint")
    if fp:  # the sizes the file declares must match its own tensors
        _check_sizes(out, fp["hidden_size"], fp["num_layers"], what)
    return Patch(out, m["placement"], m["skip_leading_tokens"], meta)


def _finite(t) -> bool:
    import numpy as np

    if isinstance(t, np.ndarray):
        return bool(np.isfinite(t).all())
    import torch

    return bool(torch.isfinite(t).all())


def _check_sizes(layers: dict[int, LayerPatch], hidden: int, n_layers: int, what: str) -> None:
    for i, lp in layers.items():
        if i >= n_layers:
            raise UsageError(f"{what}: layer {i} is out of range for a model with {n_layers} blocks")
        got = {
            "vector": None if lp.vector is None else lp.vector.shape[0],
            "matrix.A": None if lp.matrix_a is None else lp.matrix_a.shape[0],
            "down.B": None if lp.down_b is None else lp.down_b.shape[0],
            "attn.query": None if lp.attn_query is None else lp.attn_query.shape[1],
            "attn.gate": None if lp.attn_gate is None else lp.attn_gate.shape[1] - 1,
            "value.weight": None if lp.value_weight is None else lp.value_weight.shape[1],
        }
        for name, n in got.items():
            if n is not None and n != hidden:
                raise UsageError(f"{what}: layer {i} {name} does not fit the hidden size {hidden} of its fingerprint")


def validate_for(
    patch: Patch,
    hidden: int,
    n_layers: int,
    heads: int,
    head_dim: int,
    what: str = "patch",
    kv_heads: int | None = None,
    inner: int | None = None,
) -> None:
    """Check every tensor's shape against the model's sizes before anything runs (``inner``: the width of the
    MLP's hidden activations, where known)."""
    for i, lp in patch.layers.items():
        if not 0 <= i < n_layers:
            raise UsageError(f"{what}: layer {i} is out of range for a model with {n_layers} blocks")
        want = {
            "vector": (hidden,),
            "attn_bias": (heads * head_dim,),
            "attn_query": (heads * head_dim, hidden),
            "attn_gate": (heads, hidden + 1),
        }
        for name, shape in want.items():
            t = getattr(lp, name)
            if t is not None and tuple(t.shape) != shape:
                raise UsageError(f"{what}: layer {i} {name} has shape {tuple(t.shape)}, the model needs {shape}")
        width = heads * head_dim
        if lp.attn_weight is not None and tuple(lp.attn_weight.shape) not in (
            (heads,),
            (heads, head_dim, head_dim),
            (1, width, width),
        ):
            raise UsageError(f"{what}: layer {i} attn.weight has shape {tuple(lp.attn_weight.shape)}")
        kv = lp.kv_key
        if kv is not None and (kv.shape[2] != head_dim or kv.shape[0] != (kv_heads or kv.shape[0])):
            raise UsageError(
                f"{what}: layer {i} kv.key has shape {tuple(kv.shape)}, the model needs ({kv_heads}, slots, {head_dim})"
            )
        if lp.matrix_a is not None and lp.matrix_a.shape[0] != hidden:
            raise UsageError(
                f"{what}: layer {i} matrix factors have {lp.matrix_a.shape[0]} rows, the model needs {hidden}"
            )
        v = lp.value_weight
        if v is not None and (
            v.shape[1] != hidden or v.shape[0] % head_dim or (kv_heads and v.shape[0] != kv_heads * head_dim)
        ):
            raise UsageError(
                f"{what}: layer {i} value.weight has shape {tuple(v.shape)}, the model needs "
                f"({kv_heads or 'key/value heads'} x {head_dim}, {hidden})"
            )
        if lp.down_a is not None and (
            lp.down_b.shape[0] != hidden or lp.down_a.shape[0] != (inner or lp.down_a.shape[0])
        ):
            raise UsageError(
                f"{what}: layer {i} down factors B, A have {lp.down_b.shape[0]}, {lp.down_a.shape[0]} rows, the model "
                f"needs {hidden}, {inner}"
            )


def describe_patch(patch: Patch) -> dict:
    """Metadata and per-block norms and ranks, as plain data (what ``inspect`` prints)."""
    rows = []
    for i, lp in sorted(patch.layers.items()):
        row: dict[str, object] = {"block": i}
        if lp.vector is not None:
            row["vector_norm"] = float(lp.vector.norm())
        if lp.matrix_a is not None:
            m = lp.matrix()
            row["matrix_rank"] = lp.rank
            row["matrix_norm"] = float(m.norm())
        if lp.down_a is not None:
            row["down_rank"] = int(lp.down_a.shape[1])
            row["down_norm"] = float((lp.down_b @ lp.down_a.T).norm())
        if lp.value_weight is not None:
            row["value_norm"] = float(lp.value_weight.norm())
        if lp.attn_weight is not None:
            row["attn_weight_norm"] = float(lp.attn_weight.norm())
            row["attn_form"] = attn_form(lp.attn_weight)
        if lp.attn_bias is not None:
            row["attn_bias_norm"] = float(lp.attn_bias.norm())
        if lp.attn_query is not None:
            row["attn_query_norm"] = float(lp.attn_query.norm())
        if lp.attn_gate is not None:
            row["attn_gate_norm"] = float(lp.attn_gate.norm())
        if lp.kv_key is not None:
            row["kv_slots"] = int(lp.kv_key.shape[1])
        rows.append(row)
    return {
        "metadata": dict(sorted(patch.meta.items())),
        "parameters": patch.numel(),
        "bakeable": patch.bakeable,
        "placement": patch.placement,
        "skip_leading_tokens": patch.skip,
        "layers": rows,
    }
