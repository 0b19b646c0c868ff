"""Patch algebra: weighted sums (negation and scaling included) and low-rank re-compression. No I/O.

Every part of a patch is an additive correction at its site, linear in the part's tensors given the site's
input: ``o <- o + W o + b + Q x + (g0 + G x) o`` at the attention output, ``h <- h + v`` for the vector and
``z <- z + z A B^T`` at the MLP input, ``y <- y + B A^T h`` for the down map on the MLP's hidden activations. So a weighted sum is exact *per site*: given the same site inputs,
the merged patch's correction equals the weighted sum of the parents' corrections (matrices by
concatenating their factors, which lets the rank grow). Applied to a whole model, block ``i``'s correction
changes block ``i+1``'s input, so ``merge(a, b)`` applied is the sum of ``a`` and ``b`` applied only to
first order, except where a single site is patched; ``merge(a, negate(a))`` cancels exactly (every part
sums to zero and is dropped), which leaves the base model bit for bit.

Patches leave their first ``skip`` tokens unpatched; parents with different ``skip`` sum exactly only at
positions past all of them, so the merged patch's ``skip`` must then be chosen (``--skip``; the command
defaults to the largest, which never patches a token a parent left alone).
"""

from __future__ import annotations

import json
import math

import torch
from torch import Tensor

from .errors import UsageError
from .patch import LayerPatch, Patch, attn_matrix

__all__ = ["merge", "recompress", "factor_svd"]

_SUMMED = ("attn_bias", "attn_query", "attn_gate", "vector", "value_weight")
_FACTORS = {"matrix": ("matrix_a", "matrix_b"), "down": ("down_a", "down_b")}  # low-rank parts: (A, B)
# metadata that describes the patch as a whole and carries over to a merge (the first parent's)
_KEPT = ("base_model", "base_model_revision", "fingerprint", "model_parameters", "compute_dtype")


def _sum(terms: list[tuple[float, Tensor]]) -> Tensor | None:
    if not terms:
        return None
    dtype = torch.promote_types(*(t.dtype for _, t in terms)) if len(terms) > 1 else terms[0][1].dtype
    out = sum(t.to(torch.float64) * w for w, t in terms)
    return None if not out.any() else out.to(dtype)


def _full(w: Tensor, head_dim: int) -> Tensor:
    return w if w.dim() == 3 else w[:, None, None] * torch.eye(head_dim, dtype=w.dtype)


def _attn_weight(terms: list[tuple[float, Tensor]]) -> Tensor | None:
    """Scalars stay scalar; a scalar merged with a per-head map becomes its diagonal; either merged with a map
    across the heads becomes its block diagonal."""
    full = [t for _, t in terms if t.dim() == 3]
    cross = next((t for t in full if t.shape[0] == 1), None)
    if cross is not None and any(t.shape != cross.shape for _, t in terms):  # everything as one matrix
        terms = [(w, attn_matrix(t, cross.shape[-1] // len(t))[None]) for w, t in terms]
    elif full:
        terms = [(w, _full(t, full[0].shape[-1])) for w, t in terms]
    return _sum(terms)


def _factors(terms: list[tuple[float, Tensor, Tensor]]) -> tuple[Tensor | None, Tensor | None]:
    """Concatenated factors ``(A, B)`` of ``sum w B A^T``; parents with the same ``A`` share columns (exact, and
    it keeps rank down)."""
    groups: list[tuple[Tensor, list[tuple[float, Tensor]]]] = []
    for w, a_new, b_new in terms:
        for a, bs in groups:
            if a.shape == a_new.shape and a.dtype == a_new.dtype and torch.equal(a, a_new):
                bs.append((w, b_new))
                break
        else:
            groups.append((a_new, [(w, b_new)]))
    a_parts, b_parts = [], []
    for a, bs in groups:
        b = _sum(bs)
        if b is not None:
            keep = b.any(0)  # columns whose B is zero contribute nothing
            a_parts.append(a[:, keep])
            b_parts.append(b[:, keep])
    if not a_parts:
        return None, None
    dtype = torch.promote_types(a_parts[0].dtype, b_parts[0].dtype)
    for t in a_parts + b_parts:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.cat([t.to(dtype) for t in a_parts], 1), torch.cat([t.to(dtype) for t in b_parts], 1)


def _slots(terms: list[tuple[float, LayerPatch]]) -> dict[str, Tensor | None]:
    """Slots of several patches side by side: keys, values and positions concatenated, each weight added to its
    slots' log-multiplicities (a weight w scales their attention mass by w)."""
    if not terms:
        return {}
    cat = {k: torch.cat([getattr(lp, k) for _, lp in terms], 1) for k in ("kv_key", "kv_value")}
    cat["kv_bias"] = torch.cat(
        [(torch.zeros(lp.kv_key.shape[:2]) if lp.kv_bias is None else lp.kv_bias) + math.log(w) for w, lp in terms], 1
    )
    positions = [lp.kv_position for _, lp in terms]
    cat["kv_position"] = None if any(p is None for p in positions) else torch.cat(positions, 1)
    return cat


def _common(patches: list[Patch], force: bool, skip: int | None) -> tuple[str, int]:
    """The placement and skip of the sum (a clear refusal where it cannot be exact)."""
    skips = {p.skip for p in patches}
    if len(skips) > 1 and skip is None:
        raise UsageError(
            f"patches leave different leading tokens unpatched (skip {sorted(skips)}); their sum is exact only "
            "past the largest: pass --skip N to choose the merged patch's skip"
        )
    with_vector = {p.placement for p in patches if any(lp.vector is not None for lp in p.layers.values())}
    if len(with_vector) > 1:
        raise UsageError("patches place their vectors at different sites (skip and attn_out); their sum is not exact")
    fps = {p.meta.get("fingerprint", "") for p in patches}
    if len(fps) > 1 and not force:
        names = sorted({p.meta.get("base_model", "?") for p in patches})
        raise UsageError(
            f"patches were made for different base models ({', '.join(names)}): fingerprints differ; "
            "--force merges them anyway"
        )
    return (with_vector.pop() if with_vector else patches[0].placement), skips.pop() if skip is None else skip


def _check_shapes(patches: list[Patch]) -> None:
    """Parts that meet in a sum must agree in shape (matrix factors in rows, attention maps in heads)."""
    for i in sorted({i for p in patches for i in p.layers}):
        for name in (*_SUMMED, "attn_weight", "matrix_a", "down_a", "down_b"):
            ts = [t for p in patches if i in p.layers and (t := getattr(p.layers[i], name)) is not None]
            keys = {tuple(t.shape[:1]) if name in ("matrix_a", "down_a", "down_b") else tuple(t.shape) for t in ts}
            if name == "attn_weight":  # maps merge when they are of as many heads, or as wide (across the heads)
                widths = {t.shape[0] * t.shape[-1] for t in ts if t.dim() == 3}
                heads = {t.shape[0] for t in ts if t.dim() == 1 or t.shape[0] > 1}
                keys = widths if len(widths) > 1 else heads
            if len(keys) > 1:
                raise UsageError(f"layer {i} {name.replace('_', '.')}: shapes differ between patches {sorted(keys)}")


def merge(
    patches: list[Patch],
    weights: list[float] | None = None,
    *,
    parents: list[str] | None = None,
    force: bool = False,
    skip: int | None = None,
) -> Patch:
    """``sum_i weights[i] * patches[i]``, part by part (exact per site; see the module docstring).

    ``parents`` (e.g. the files' sha256) are recorded with the weights in the metadata. Refuses patches made
    for different base models unless ``force``, and parents whose sum would not be exact (vectors at
    different sites, mismatched shapes, different ``skip`` unless ``skip`` sets the merged patch's: the sum
    is then exact at every position at or past each parent's own skip and ``skip``).
    """
    if not patches:
        raise UsageError("merge needs at least one patch")
    weights = [1.0] * len(patches) if weights is None else [float(w) for w in weights]
    if len(weights) != len(patches):
        raise UsageError(f"{len(weights)} weights for {len(patches)} patches")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError("weights must be finite numbers")
    if any(p.has_slots and w <= 0 for w, p in zip(weights, patches, strict=True)):
        raise UsageError(
            "a patch with virtual key/value slots (--kv: a compressed copy of its prompt's keys and values) takes "
            "a positive weight only: the slots of merged patches are read side by side, each weight scaling its "
            "slots' attention mass"
        )
    placement, skip_out = _common(patches, force, skip)
    _check_shapes(patches)
    layers = {}
    for i in sorted({i for p in patches for i in p.layers}):
        here = [(w, p.layers[i]) for w, p in zip(weights, patches, strict=True) if i in p.layers]
        parts = {n: _sum([(w, getattr(lp, n)) for w, lp in here if getattr(lp, n) is not None]) for n in _SUMMED}
        parts["attn_weight"] = _attn_weight([(w, lp.attn_weight) for w, lp in here if lp.attn_weight is not None])
        for fa, fb in _FACTORS.values():
            parts[fa], parts[fb] = _factors(
                [(w, getattr(lp, fa), getattr(lp, fb)) for w, lp in here if getattr(lp, fa) is not None]
            )
        parts.update(_slots([(w, lp) for w, lp in here if lp.kv_key is not None]))
        lp = LayerPatch(**parts)
        if lp.tensors():
            layers[i] = lp
    meta = {k: patches[0].meta[k] for k in _KEPT if k in patches[0].meta}
    meta["method.construction"] = "merge"
    meta["merge.parents"] = json.dumps(
        [
            {"sha256": h, "weight": w, "prompt_sha256": p.meta.get("prompt_sha256", "")}
            for h, w, p in zip(parents or [""] * len(patches), weights, patches, strict=True)
        ],
        sort_keys=True,
    )
    if skip is not None:
        meta["merge.parent_skips"] = json.dumps([p.skip for p in patches])
    return Patch(layers, placement, skip_out, meta)


def factor_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``U diag(s) V^T`` of ``B A^T`` from its ``(d, k)`` factors (float64, never forms the matrix)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double())
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, qa @ vh.T


def recompress(patch: Patch, rank: int) -> tuple[Patch, dict]:
    """Truncate every block's thought matrix ``B A^T`` (and down map) to its best rank-``rank`` approximation (SVD).

    Returns the new patch and the relative Frobenius error it introduced, per block and overall
    (``|M - M_k| / |M|``, summed over blocks for the overall figure); the down map's under ``down``.
    """
    if rank < 1:
        raise UsageError("--rank must be >= 1")
    layers = {i: dict(vars(lp)) for i, lp in patch.layers.items()}
    report: dict = {"rank": rank}
    meta = dict(patch.meta)
    for part, (fa, fb) in _FACTORS.items():
        per_block, dropped, total = {}, 0.0, 0.0
        for i, parts in sorted(layers.items()):
            if parts[fa] is None:
                continue
            dtype = parts[fa].dtype
            u, s, v = factor_svd(parts[fa], parts[fb])
            k = min(rank, int((s > 0).sum()))
            energy, lost = float((s**2).sum()), float((s[k:] ** 2).sum())
            per_block[str(i)] = math.sqrt(lost / energy) if energy else 0.0
            dropped, total = dropped + lost, total + energy
            parts[fa], parts[fb] = (v[:, :k].to(dtype), (u[:, :k] * s[:k]).to(dtype)) if k else (None, None)
        error = {"relative_error": math.sqrt(dropped / total) if total else 0.0, "per_block": per_block}
        if part == "matrix":
            report |= error
            meta["method.rank"] = str(rank)
        elif per_block:
            report["down"] = error
            meta["method.down_rank"] = str(rank)
    meta["method.recompress"] = "svd"
    out = {i: LayerPatch(**parts) for i, parts in layers.items()}
    return Patch({i: lp for i, lp in sorted(out.items()) if lp.tensors()}, patch.placement, patch.skip, meta), report
