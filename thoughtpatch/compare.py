"""Diffs as plain data: patch vs patch, patch vs its base model, model vs model (no I/O).

* :func:`diff_patches`: per block, vector norms and cosine, matrix norms, effective ranks and the
  principal angles between the subspaces the two thought matrices write to and read from.
* :func:`diff_patch_model`: the relative weight change ``|dW| / |W|`` a patch amounts to per block, and
  :func:`functional_diff` the KL between the base model's and the patched model's next-token outputs.
* :func:`diff_models`: which tensors changed between two models of the same shape, and a low-rank patch
  ``M = B A^T`` that explains the change of the MLP input matrices ``W' = W (I + M)``, and a down map
  ``G = B A^T`` for the change of the MLP output projection ``W'_out = W_out + G``, with their errors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .algebra import factor_svd
from .apply import head_shape, installed
from .architectures import architecture_for
from .engine import blocks
from .patch import LayerPatch, Patch, attn_matrix

__all__ = ["effective_rank", "diff_patches", "diff_patch_model", "functional_diff", "diff_models"]

RANK_TOL = 1e-5  # singular values below this share of the largest count as zero


def effective_rank(m: Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values (Roy and Vetterli, 2007)."""
    return _entropy_rank(torch.linalg.svdvals(m.double()))


def _entropy_rank(s: Tensor) -> float:
    if not s.any():
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _spaces(lp: LayerPatch | None) -> tuple[Tensor, Tensor, Tensor]:
    """Orthonormal bases of the spaces a thought matrix writes to and reads from, and its singular values."""
    if lp is None or lp.matrix_a is None:
        empty = torch.zeros(0, 0, dtype=torch.float64)
        return empty, torch.zeros(0, dtype=torch.float64), empty
    u, s, v = factor_svd(lp.matrix_a, lp.matrix_b)
    keep = s > RANK_TOL * s[0] if s[0] > 0 else s < 0
    return u[:, keep], s, v[:, keep]


def _angles(qa: Tensor, qb: Tensor) -> tuple[list[float], float]:
    """Principal angles (degrees) between the spans of two orthonormal bases, and their mean ``cos^2``."""
    if not qa.numel() or not qb.numel():
        return [], 0.0
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return [round(math.degrees(math.acos(float(c))), 4) for c in cos], float((cos**2).mean())


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _rel(a: Tensor, b: Tensor) -> float:
    scale = max(float(a.norm()), float(b.norm()))
    return float((a - b).norm()) / scale if scale else 0.0


def _norms_and_diff(name: str, a: Tensor | None, b: Tensor | None) -> dict[str, float]:
    """A part's norm in each patch and their relative difference (a part one patch lacks counts as zero); none
    where neither has it."""
    if a is None and b is None:
        return {}
    a, b = (t if t is not None else torch.zeros_like(a if a is not None else b) for t in (a, b))
    return {f"{name}_norm_a": float(a.norm()), f"{name}_norm_b": float(b.norm()), f"{name}_rel_diff": _rel(a, b)}


def diff_patches(a: Patch, b: Patch) -> dict:
    """Patch ``a`` against patch ``b``, block by block (parts either lacks count as zero)."""
    rows = []
    for i in sorted(set(a.layers) | set(b.layers)):
        la, lb = a.layers.get(i), b.layers.get(i)
        row: dict[str, object] = {"block": i}
        va, vb = (None if lp is None else lp.vector for lp in (la, lb))
        if va is not None or vb is not None:
            va, vb = (v if v is not None else torch.zeros_like(va if va is not None else vb) for v in (va, vb))
            row |= {"vector_norm_a": float(va.norm()), "vector_norm_b": float(vb.norm()), "vector_cosine": _cos(va, vb)}
        if any(lp is not None and lp.matrix_a is not None for lp in (la, lb)):
            (ua, sa, va), (ub, sb, vb) = _spaces(la), _spaces(lb)
            ms = [lp.matrix().double() if lp is not None and lp.matrix_a is not None else None for lp in (la, lb)]
            ma, mb = (m if m is not None else torch.zeros_like(next(x for x in ms if x is not None)) for m in ms)
            write, write_overlap = _angles(ua, ub)
            row |= {
                "matrix_norm_a": float(sa.norm()), "matrix_norm_b": float(sb.norm()),
                "matrix_rel_diff": _rel(ma, mb),
                "effective_rank_a": _entropy_rank(sa), "effective_rank_b": _entropy_rank(sb),
                "write_overlap": write_overlap, "read_overlap": _angles(va, vb)[1], "principal_angles_deg": write,
            }  # fmt: skip
        row |= _norms_and_diff(
            "down",
            *(
                None if lp is None or lp.down_a is None else lp.down_b.double() @ lp.down_a.double().T
                for lp in (la, lb)
            ),
        )
        row |= _norms_and_diff(
            "value", *(None if lp is None or lp.value_weight is None else lp.value_weight.double() for lp in (la, lb))
        )
        wa, wb = (None if lp is None else lp.attn_weight for lp in (la, lb))
        # each as one matrix on the concatenated head outputs
        row |= _norms_and_diff(
            "attn", *(None if w is None else attn_matrix(w.double(), _head_dim(wa, wb)) for w in (wa, wb))
        )
        rows.append(row)
    return {"kind": "patch_vs_patch", "parameters": [a.numel(), b.numel()], "layers": rows}


def _head_dim(*ws: Tensor | None) -> int:
    """A scalar map's head width when the other map is per head or across the heads (then one per head of its
    own width over the scalar's heads); 1 between two scalar maps."""
    full = next((w for w in ws if w is not None and w.dim() == 3), None)
    scalar = next((w for w in ws if w is not None and w.dim() == 1), None)
    if full is None or scalar is None:
        return 1 if full is None else full.shape[-1]
    return full.shape[0] * full.shape[-1] // len(scalar)


def _weight(module: nn.Module, transposed: bool) -> Tensor:
    """The weight as ``(out, in)``."""
    w = module.weight.detach().double()
    return w.T if transposed else w


def diff_patch_model(patch: Patch, model: nn.Module) -> dict:
    """The relative weight change ``|dW| / |W|`` each block's patch amounts to.

    The thought matrix changes every MLP input matrix to ``W (I + M)``; the attention map changes the
    output projection to ``W_o (I + D)`` (``D`` block-diagonal per head); the down map the MLP output
    projection to ``W_out + B A^T``; the value map the value projection to ``W_v + D_v``. Vectors, biases and
    the query-dependent parts change no weight matrix;
    their norms are listed.
    """
    head_dim = head_shape(model)[1]
    blks = blocks(model, architecture_for(model))
    rows = []
    for i, lp in sorted(patch.layers.items()):
        blk, row = blks[i], {"block": i}
        if lp.matrix_a is not None:
            w = torch.cat([_weight(m, blk.transposed) for m in blk.mlp_inputs])
            row["mlp_in_rel_change"] = float((w @ lp.matrix().double()).norm() / w.norm())
        if lp.attn_weight is not None:
            wo = _weight(blk.attn_out, blk.transposed)  # (d, H*hd)
            row["attn_out_rel_change"] = float((wo @ attn_matrix(lp.attn_weight.double(), head_dim)).norm() / wo.norm())
        if lp.down_a is not None and blk.mlp_out is not None:
            w_out = _weight(blk.mlp_out, blk.transposed)
            row["mlp_out_rel_change"] = float((lp.down_b.double() @ lp.down_a.double().T).norm() / w_out.norm())
        if lp.value_weight is not None and blk.value_proj is not None:
            wv = _weight(blk.value_proj, blk.transposed)
            row["value_rel_change"] = float(lp.value_weight.double().norm() / wv.norm())
        for name, t in lp.tensors().items():
            if name in ("vector", "attn.bias", "attn.query", "attn.gate"):
                row[name.replace(".", "_") + "_norm"] = float(t.norm())
        rows.append(row)
    return {"kind": "patch_vs_model", "layers": rows}


def _log_probs(model: nn.Module, ids: list[int]) -> Tensor:
    x = torch.tensor([ids], device=model.device)
    return torch.log_softmax(model(input_ids=x).logits[0].double(), -1)


@torch.no_grad()
def functional_diff(model: nn.Module, patch: Patch, prompts: list[list[int]]) -> dict:
    """Mean ``KL(base || patched)`` of the next-token distributions over every position, and top-1 agreement."""
    kls, agree = [], []
    for ids in prompts:
        base = _log_probs(model, ids)
        with installed(model, patch):
            patched = _log_probs(model, ids)
        kls.append(float((base.exp() * (base - patched)).sum(-1).mean()))
        agree.append(float((base.argmax(-1) == patched.argmax(-1)).double().mean()))
    return {"prompts": len(prompts), "kl": sum(kls) / len(kls), "top1": sum(agree) / len(agree), "kl_per_prompt": kls}


@torch.no_grad()
def diff_models(base: nn.Module, changed: nn.Module, rank: int | None = None) -> tuple[dict, Patch]:
    """Which tensors differ (``in_patch``: an MLP input matrix or output projection, which the patch models),
    and the low-rank patch that best explains their changes.

    Per block, ``M`` solves ``W M = W' - W`` over the stacked MLP input matrices (least squares), and the down
    map is the output projection's change ``W'_out - W_out`` itself; each is truncated to ``rank`` (default: its
    numerical rank); the reported error is ``|W M_k - (W' - W)| / |W' - W|`` (``|G_k - dW_out| / |dW_out|``).
    """
    sa, sb = base.state_dict(), changed.state_dict()
    arch = architecture_for(base)
    n = len(blocks(base, arch))
    modules = [*arch.mlp_inputs, *([arch.mlp_out] if arch.mlp_out else [])]
    modelled = {f"{arch.layers}.{i}.{p}.weight" for i in range(n) for p in modules}
    tensors = []
    for name in sorted(set(sa) | set(sb)):
        row: dict[str, object] = {"name": name, "in_patch": name in modelled}
        if name not in sa or name not in sb or sa[name].shape != sb[name].shape:
            tensors.append(row | {"status": "shape" if name in sa and name in sb else "missing", "in_patch": False})
        elif not torch.equal(sa[name], sb[name]):
            d = (sb[name].double() - sa[name].double()).norm()
            tensors.append(row | {"status": "changed", "rel_change": float(d / max(sa[name].double().norm(), 1e-30))})
    layers: dict[int, LayerPatch] = {}
    rows, down_rows = [], []
    for ba, bb in zip(blocks(base, arch), blocks(changed, arch), strict=True):
        lp = LayerPatch()
        w = torch.cat([_weight(m, ba.transposed) for m in ba.mlp_inputs])
        dw = torch.cat([_weight(m, bb.transposed) for m in bb.mlp_inputs]) - w
        dtype = ba.mlp_inputs[0].weight.dtype
        if dw.any():
            (lp.matrix_a, lp.matrix_b), row = _low_rank(w, dw, torch.linalg.lstsq(w, dw).solution, rank, dtype)
            rows.append({"block": ba.index, **row})
        if ba.mlp_out is not None:
            w_out = _weight(ba.mlp_out, ba.transposed)
            dg = _weight(bb.mlp_out, bb.transposed) - w_out
            if dg.any():
                (lp.down_a, lp.down_b), row = _low_rank(w_out, dg, dg, rank, dtype, identity=True)
                down_rows.append({"block": ba.index, **row})
        if lp.tensors():
            layers[ba.index] = lp
    errs = [r["relative_error"] for r in rows + down_rows]
    report = {
        "kind": "model_vs_model",
        "changed_tensors": tensors,
        "mlp_input_patch": rows,
        "max_relative_error": max(errs, default=0.0),
    } | ({"down_patch": down_rows} if down_rows else {})
    return report, Patch(
        layers, "skip", 0, {"method.construction": "model_diff", "method.rank": str(rank or "numerical")}
    )


def _low_rank(
    w: Tensor, dw: Tensor, m: Tensor, rank: int | None, dtype: torch.dtype, identity: bool = False
) -> tuple[tuple[Tensor, Tensor], dict]:
    """Factors ``(A, B)`` of ``m`` truncated to ``rank`` (default: numerical), and how well ``W B A^T``
    (``B A^T`` where ``identity``) explains ``dw``."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = int((s > RANK_TOL * s[0]).sum()) if rank is None else min(rank, s.numel())
    b, a = u[:, :k] * s[:k], vh[:k].T
    fit = b @ a.T if identity else w @ (b @ a.T)
    row = {"rank": k, "relative_error": float((fit - dw).norm() / dw.norm()), "rel_change": float(dw.norm() / w.norm())}
    return (a.to(dtype), b.to(dtype)), row
