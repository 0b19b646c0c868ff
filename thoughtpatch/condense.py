"""Condense the context effect into token-independent parts (DESIGN.md section 2).

Per block, fitted by ridge least squares over the query tokens of many probes (sink positions left out):

* per-head affine map of the attention output ``o_c,h ~ o_0,h + W_h o_0,h + b_h (+ Q_h x)``, fitted first;
* thought vector ``v = mean_t delta_t``;
* thought matrix ``M = (sum u a^T)(sum a a^T + lam I)^-1`` on the MLP input, truncated to rank k by SVD.

The statistics are additive (:class:`Affine`, :class:`MatrixStats`): shards of probes can be reduced apart.
The sequential construction fits block ``l`` with blocks ``0..l-1`` already patched, so later blocks
correct the errors of earlier ones; the parallel one fits every block from the exact chain (the updates).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .apply import Positions, head_shape, layer_hook_specs, per_head
from .architectures import Architecture, architecture_for
from .distributed import gather_rows, shard
from .engine import (
    Block,
    StopBlock,
    blocks,
    device_of,
    hooks,
    layer_calls,
    mid_taps,
    pad_right,
    prefix_cache,
    prefix_mask,
    prefix_view,
    run_block,
)
from .errors import IllConditionedWarning, UsageError, require_finite
from .extract import Updates, detect_sinks
from .patch import LayerPatch, Patch
from .prompts import TokenPairs
from .virtual import allowed_keys, dispatch, fit_slots, prefix_share

__all__ = ["CondenseConfig", "Affine", "MatrixStats", "condense", "condense_updates", "ridge_solve", "truncate"]

ATTN_MODES = ("none", "scalar", "full")


@dataclass(frozen=True)
class CondenseConfig:
    """How to condense; every choice is recorded in the patch metadata."""

    attn: str = "full"  # per-head map of the attention output: none | scalar | full
    attn_query: bool = False  # add the query-dependent term (runs in memory only)
    attn_gate: bool = False  # add a query-dependent scale of each head's output (runs in memory only)
    attn_bias: bool = True  # the head map's constant part
    bakeable: bool = False  # keep to parts that fold exactly into this model family's weights
    attn_ridge_grid: tuple[float, ...] | None = None  # pick attn_ridge per block by 2-fold CV over queries
    vector: bool = True
    matrix: bool = True
    placement: str = "skip"  # skip | attn_out
    rank: int | None = None  # None: full rank
    ridge: float = 3.0  # matrix ridge, relative: lam = ridge * trace(sum a a^T) / d
    attn_ridge: float = 0.1  # head-map ridge, relative to the mean feature energy per dimension
    strength: float = 1.0
    layers: tuple[int, ...] | None = None  # None: all blocks
    construction: str = "sequential"  # sequential | parallel
    skip: int | None = (
        None  # leading tokens left unpatched; None: those both runs share; -1: the whole prompt-free prefix
    )
    sink_factor: float = 10.0
    batch_size: int = 16
    kv: float = 0.0  # virtual key/value slots per block: this share of the prompted prefix's tokens (0: none)
    kv_max: int | None = None  # at most this many slots per block (None: no cap)
    kv_ridge: float = 0.01  # slot refit ridge, relative to the Gram matrix's mean diagonal

    def validate(self, n_layers: int | None = None) -> None:
        if self.attn not in ATTN_MODES:
            raise UsageError(f"--attn must be one of {ATTN_MODES}, not {self.attn!r}")
        if self.placement not in ("skip", "attn_out"):
            raise UsageError(f"--placement must be skip or attn_out, not {self.placement!r}")
        if self.construction not in ("sequential", "parallel"):
            raise UsageError(f"--construction must be sequential or parallel, not {self.construction!r}")
        if self.rank is not None and self.rank <= 0:
            raise UsageError(f"--rank must be a positive integer, not {self.rank}")
        if self.ridge < 0 or self.attn_ridge < 0:
            raise UsageError("--ridge and --attn-ridge must be >= 0")
        if not (self.vector or self.matrix or self.attn != "none" or self.kv):
            raise UsageError("nothing to condense: enable at least one of the vector, the matrix, the attention map")
        if self.bakeable and (self.attn_query or self.attn_gate or self.skip not in (None, 0)):
            raise UsageError("a bakeable patch cannot have query-dependent terms or skipped tokens (--skip 0)")
        if not 0 <= self.kv <= 1:
            raise UsageError(f"--kv must be a share of the prompt's tokens in [0, 1], not {self.kv}")
        if self.kv_max is not None and self.kv_max < 1:
            raise UsageError(f"--kv-max must be a positive number of slots, not {self.kv_max}")
        if self.bakeable and self.kv:
            raise UsageError("a bakeable patch cannot have virtual key/value slots (--kv 0)")
        if self.kv and self.construction == "parallel":
            raise UsageError("virtual key/value slots need the sequential construction")
        if (self.attn_query or self.attn_gate) and self.attn == "none":
            raise UsageError("the query-dependent attention terms need --attn scalar or full")
        if n_layers is not None and self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < n_layers]
            if bad:
                raise UsageError(f"--layers {bad[0]} is out of range: the model has blocks 0..{n_layers - 1}")

    def describe(self) -> dict[str, str]:
        return {
            "construction": self.construction,
            "attn": self.attn,
            "attn_query": str(self.attn_query).lower(),
            "attn_gate": str(self.attn_gate).lower(),
            "attn_bias": str(self.attn_bias).lower(),
            "bakeable": str(self.bakeable).lower(),
            "attn_ridge_grid": "none" if self.attn_ridge_grid is None else ",".join(map(repr, self.attn_ridge_grid)),
            "vector": str(self.vector).lower(),
            "matrix": str(self.matrix).lower(),
            "rank": "full" if self.rank is None else str(self.rank),
            "ridge": repr(self.ridge),
            "attn_ridge": repr(self.attn_ridge),
            "strength": repr(self.strength),
            "sink_factor": repr(self.sink_factor),
        } | ({"kv": repr(self.kv), "kv_max": str(self.kv_max), "kv_ridge": repr(self.kv_ridge)} if self.kv else {})


# ----------------------------------------------------------------------------------------------- statistics
MAX_CONDITION = 1e10  # beyond this a float64 solve loses most of its digits


def warn_conditioning(s: Tensor, lam: Tensor | float, where: str, option: str, relative: float) -> None:
    """Warn when ``S + lam I`` is ill-conditioned (eigenvalues computed only when the ridge cannot rule it out)."""
    lam = torch.as_tensor(lam, dtype=s.dtype).min().clamp_min(0)
    top = torch.diagonal(s, dim1=-2, dim2=-1).sum(-1).max()  # trace >= largest eigenvalue
    if lam > 0 and (top + lam) / lam <= MAX_CONDITION:
        return
    ev = torch.linalg.eigvalsh(s).clamp_min(0)
    cond = float(((ev[..., -1] + lam) / (ev[..., 0] + lam).clamp_min(1e-300)).max())
    if cond > MAX_CONDITION:
        state = "singular" if cond > 1e15 else f"ill-conditioned (condition number {cond:.1e})"
        warnings.warn(
            f"{where}: the least squares is {state}; raise {option} (now {relative:g}) or give more probes",
            IllConditionedWarning,
            stacklevel=2,
        )


def ridge_solve(s: Tensor, c: Tensor, lam: Tensor | float) -> Tensor:
    """``C (S + lam I)^-1`` for symmetric PSD ``S`` (batched); the pseudo-inverse where ``lam == 0``."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    lam = torch.as_tensor(lam, dtype=s.dtype, device=s.device)
    if bool((lam == 0).all()):
        return c @ torch.linalg.pinv(s, hermitian=True)
    reg = s + lam[..., None, None] * eye if lam.dim() else s + lam * eye
    return torch.linalg.solve(reg, c.transpose(-1, -2)).transpose(-1, -2)


@dataclass
class Affine:
    """Additive statistics for ``y ~ x + W x + b`` (ridge on ``W``), batched over leading dims (heads)."""

    n: float = 0.0
    sx: Tensor | None = None
    sr: Tensor | None = None
    sxx: Tensor | None = None
    srx: Tensor | None = None

    def add(self, x: Tensor, y: Tensor, shared: Tensor | None = None) -> Affine:
        """Rows ``x`` (N, ..., p) and targets ``y`` (N, ..., q); the residual ``y - x[:q]`` is fitted.

        ``shared`` (N, s): extra features common to every leading index (heads), appended to ``x``; their
        Gram block is computed once instead of once per head.
        """
        x, y = x.double(), y.double()
        r = y - x[..., : y.shape[-1]]
        xt, rt = x.movedim(0, -2), r.movedim(0, -2)  # (..., N, p): one batched matmul per leading index
        parts = (x.sum(0), r.sum(0), xt.transpose(-1, -2) @ xt, rt.transpose(-1, -2) @ xt)
        if shared is not None:
            sh = shared.double()
            lead = x.shape[1:-1]
            xs = xt.transpose(-1, -2) @ sh  # (..., p, s)
            ss = (sh.T @ sh).expand(*lead, sh.shape[1], sh.shape[1])
            sxx = torch.cat([torch.cat([parts[2], xs], -1), torch.cat([xs.transpose(-1, -2), ss], -1)], -2)
            sx = torch.cat([parts[0], sh.sum(0).expand(*lead, sh.shape[1])], -1)
            parts = (sx, parts[1], sxx, torch.cat([parts[3], rt.transpose(-1, -2) @ sh], -1))
        if self.sx is None:
            self.sx, self.sr, self.sxx, self.srx = parts
        else:
            self.sx, self.sr, self.sxx, self.srx = (
                a + b for a, b in zip((self.sx, self.sr, self.sxx, self.srx), parts, strict=True)
            )
        self.n += x.shape[0]
        return self

    def __add__(self, other: Affine) -> Affine:
        if self.sx is None:
            return other
        return Affine(
            self.n + other.n, self.sx + other.sx, self.sr + other.sr, self.sxx + other.sxx, self.srx + other.srx
        )

    def fit(self, ridge: float, scalar: bool = False, intercept: bool = True, where: str = "") -> tuple[Tensor, Tensor]:
        """``(W, b)``; ``scalar``: ``W = s I`` per leading index (returns ``s``); no ``intercept``: ``b = 0``;
        ``where`` names it in warnings."""
        mx, mr = self.sx / self.n, self.sr / self.n
        if not intercept:
            mx, mr = torch.zeros_like(mx), torch.zeros_like(mr)
        cxx = self.sxx - self.n * mx[..., :, None] * mx[..., None, :]
        crx = self.srx - self.n * mr[..., :, None] * mx[..., None, :]
        p = cxx.shape[-1]
        energy = torch.diagonal(cxx, dim1=-2, dim2=-1).sum(-1)
        if scalar:
            s = torch.diagonal(crx, dim1=-2, dim2=-1).sum(-1) / (energy * (1 + ridge)).clamp_min(1e-30)
            return s, mr - s[..., None] * mx
        if where:
            warn_conditioning(cxx, ridge * energy / p, where, "--attn-ridge", ridge)
        w = ridge_solve(cxx, crx, ridge * energy / p)
        return w, mr - (w @ mx[..., None])[..., 0]


@dataclass
class MatrixStats:
    """Additive statistics of the thought vector and matrix at one block."""

    n: float = 0.0
    s_delta: Tensor | None = None
    s_aa: Tensor | None = None
    s_ua: Tensor | None = None

    def add(self, delta: Tensor | None, a: Tensor | None, u: Tensor | None) -> MatrixStats:
        parts = [
            None if delta is None else delta.double().sum(0),
            None if a is None else a.double().T @ a.double(),
            None if a is None else u.double().T @ a.double(),
        ]
        olds = (self.s_delta, self.s_aa, self.s_ua)
        self.s_delta, self.s_aa, self.s_ua = (p if o is None else o + p for o, p in zip(olds, parts, strict=True))
        self.n += (delta if delta is not None else a).shape[0]
        return self

    def __add__(self, other: MatrixStats) -> MatrixStats:
        out = MatrixStats(self.n + other.n)
        for k in ("s_delta", "s_aa", "s_ua"):
            a, b = getattr(self, k), getattr(other, k)
            setattr(out, k, b if a is None else a if b is None else a + b)
        return out

    def vector(self) -> Tensor:
        return self.s_delta / self.n

    def matrix(self, ridge: float, where: str = "") -> tuple[Tensor, float]:
        """``M`` and the absolute ridge ``lam`` used; ``where`` names the fit in warnings."""
        lam = ridge * float(torch.trace(self.s_aa)) / self.s_aa.shape[0]
        if where:
            warn_conditioning(self.s_aa, lam, where, "--ridge", ridge)
        return ridge_solve(self.s_aa, self.s_ua, lam), lam


def truncate(m: Tensor, rank: int | None) -> tuple[Tensor, Tensor, float]:
    """Factors ``B, A`` (d, k) with ``B A^T`` the best rank-k approximation of ``m``, and the energy kept."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    k = len(s) if rank is None else min(rank, len(s))
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    return u[:, :k] * s[:k], vh[:k].T.contiguous(), kept


def fit_gate(r: Tensor, o: Tensor, x: Tensor, ridge: float) -> Tensor:
    """``g`` (H, d+1) minimising ``sum |r_h - (g_h0 + g_h . x) o_h|^2`` (+ ridge on ``g_h[1:]``).

    The prompt's share of each head's attention mass varies with the query, which scales the head's
    own output (o_c = gamma_t o_0 + beta_t exactly, gamma_t a scalar); this models gamma_t - 1 as linear in x.
    """
    f = torch.cat([torch.ones_like(x[:, :1]), x], -1).float()  # (N, d+1)
    w = (o.float() ** 2).sum(-1).T  # (H, N)
    s = sum(  # (H, d+1, d+1): float32 products over row blocks (bounded memory), summed in float64
        ((f[k : k + 4096].T[None] * w[:, None, k : k + 4096]) @ f[k : k + 4096]).double()
        for k in range(0, len(f), 4096)
    )
    f = f.double()
    c = ((r.double() * o.double()).sum(-1).T) @ f  # (H, d+1)
    p = s.shape[-1]
    reg = (ridge * torch.diagonal(s, dim1=-2, dim2=-1)[:, 1:].sum(-1) / (p - 1))[:, None, None] * torch.eye(
        p, dtype=s.dtype
    )
    reg[:, 0, 0] = 0
    return torch.linalg.solve(s + reg, c[..., None])[..., 0]


def _gate_scale(g: Tensor, o: Tensor, x: Tensor) -> Tensor:
    return (g[:, 0] + x.double() @ g[:, 1:].T)[..., None] * o.double()


def fit_attention(
    o0: Tensor, oc: Tensor, x: Tensor | None, cfg: CondenseConfig, ridge: float, rounds: int = 2, where: str = ""
) -> dict:
    """Per-head map of the attention output (rows ``o0``, ``oc``: (N, H, hd); ``x``: (N, d) or None).

    Linear part ``o0 -> W o0 + b (+ Q x)`` by ridge least squares; with ``cfg.attn_gate`` alternated with the
    query-dependent scale of :func:`fit_gate`.
    """
    heads, head_dim = o0.shape[1:]
    shared = x if cfg.attn_query else None
    scalar = cfg.attn == "scalar" and not cfg.attn_query
    gate = None
    target = oc
    for _ in range(rounds if cfg.attn_gate else 1):
        w, b = Affine().add(o0, target, shared).fit(ridge, scalar=scalar, intercept=cfg.attn_bias, where=where)
        if not cfg.attn_gate:
            break
        linear = o0.double() * w[..., None] if scalar else per_head(o0.double(), w[..., :head_dim])
        if shared is not None:
            linear = linear + (shared.double() @ w[..., head_dim:].reshape(heads * head_dim, -1).T).view(
                -1, heads, head_dim
            )
        gate = fit_gate(oc.double() - o0.double() - linear - b, o0, x, ridge)
        target = oc.double() - _gate_scale(gate, o0, x)
    out: dict[str, Tensor] = {}
    if cfg.attn_query:
        out["attn_query"] = w[..., head_dim:].reshape(heads * head_dim, -1).float()
        w = w[..., :head_dim]
        if cfg.attn == "scalar":
            w = torch.diagonal(w, dim1=-2, dim2=-1).mean(-1)
    out["attn_weight"] = w.float()
    if cfg.attn_bias:
        out["attn_bias"] = b.reshape(-1).float()
    if gate is not None:
        out["attn_gate"] = gate.float()
    return out


def _predict_attention(parts: dict, o0: Tensor, x: Tensor | None) -> Tensor:
    heads, head_dim = o0.shape[1:]
    o = o0.double()
    w = parts["attn_weight"].double()
    delta = o * w[:, None] if w.dim() == 1 else per_head(o, w)
    if "attn_bias" in parts:
        delta = delta + parts["attn_bias"].double().view(heads, head_dim)
    if "attn_query" in parts:
        delta = delta + (x.double() @ parts["attn_query"].double().T).view(-1, heads, head_dim)
    if "attn_gate" in parts:
        delta = delta + _gate_scale(parts["attn_gate"].double(), o0, x)
    return o + delta


def _cv_error(o0: Tensor, oc: Tensor, x: Tensor | None, cfg: CondenseConfig, ridge: float, groups: Tensor) -> float:
    """2-fold cross-validated error of the attention fit, folds split by query chunk (never by token)."""
    fold = groups % 2 == 0
    if fold.all() or (~fold).all():
        fold = torch.arange(len(groups)) % 2 == 0
    total = 0.0
    for train in (fold, ~fold):
        parts = fit_attention(o0[train], oc[train], None if x is None else x[train], cfg, ridge)
        test = ~train
        pred = _predict_attention(parts, o0[test], None if x is None else x[test])
        total += float(((oc[test].double() - pred) ** 2).sum())
    return total


# ----------------------------------------------------------------------------------------- constructions
def condense_updates(updates: Updates, cfg: CondenseConfig) -> Patch:
    """The parallel construction: each block's vector and matrix from the exact updates alone."""
    if cfg.attn != "none":
        raise UsageError("the attention map needs the sequential construction (it re-runs the model)")
    patch = Patch({}, cfg.placement, _skip(cfg, updates.pairs))
    energies = []
    for i in cfg.layers or range(updates.n_layers):
        keep = ~updates.sink[i]
        stats = MatrixStats().add(updates.delta[i][keep], updates.a[i][keep], updates.u[i][keep])
        lp, kept = _vector_matrix(stats, cfg, f"block {i}")
        energies.append(kept)
        patch.layers[i] = lp.scaled(cfg.strength)
    patch.meta = _method_meta(cfg, energies)
    return patch


def for_family(cfg: CondenseConfig, arch: Architecture) -> CondenseConfig:
    """A bakeable config narrowed to what folds exactly into this family's weights: a thought vector needs a
    bias with no norm after it, the head map's constant part a bias on the attention output."""
    if not cfg.bakeable:
        return cfg
    if cfg.placement == "skip":
        vector = arch.mlp_bias_flag is not None and arch.vector_bakes
    else:
        vector = arch.attn_bias_flag is not None and arch.post_attn_norm is None
    return replace(
        cfg, vector=cfg.vector and vector, attn_bias=cfg.attn_bias and arch.attn_bias_flag is not None, skip=0
    )


def _skip(cfg: CondenseConfig, pairs: TokenPairs) -> int:
    if cfg.kv:  # the slots stand for the whole prompt-free prefix
        return len(pairs.prefix_free)
    if cfg.skip is None:
        return pairs.n_lead
    return len(pairs.prefix_free) if cfg.skip == -1 else cfg.skip


def _vector_matrix(stats: MatrixStats, cfg: CondenseConfig, where: str) -> tuple[LayerPatch, float]:
    lp, kept = LayerPatch(), 1.0
    if cfg.vector:
        lp.vector = stats.vector().float()
    if cfg.matrix:
        m, _ = stats.matrix(cfg.ridge, f"{where} thought matrix")
        b, a, kept = truncate(m, cfg.rank)
        lp.matrix_b, lp.matrix_a = b.float(), a.float()
    for name, t in lp.tensors().items():
        require_finite(t, f"{where} {name} (condensation statistics)")
    return lp, kept


def _method_meta(cfg: CondenseConfig, energies: list[float]) -> dict[str, str]:
    meta = {f"method.{k}": v for k, v in cfg.describe().items()}
    if energies:
        meta["method.energy_kept_min"] = f"{min(energies):.6f}"
    return meta


@dataclass
class _Chunk:
    """Prompt-free sequences of some queries, stepped block by block with the patch so far."""

    idx: list[int]
    calls: list
    hidden: Tensor
    query: Tensor  # (B, T) bool: query positions
    active: Tensor  # (B, T) bool: positions the patch acts on
    sink: Tensor | None = None
    padding: Tensor | None = None  # (B, T, 1) bool: padded positions, kept at zero between blocks
    n: int = 0  # the chunk's number among all chunks (all ranks)


class _Prompted:
    """The prompted run at the query positions, advanced one block at a time (one block's states in memory).

    Every chunk reads the prompt's KV cache through a read-only view, so the recorded block calls can be
    replayed block by block without storing anything per block.
    """

    def __init__(self, model: nn.Module, pairs: TokenPairs, batch_size: int):
        arch = architecture_for(model)
        device = device_of(model)
        self.cache = prefix_cache(model, pairs.prefix_prompted)
        lc = len(pairs.prefix_prompted)
        self.chunks: list[tuple[list, Tensor, Tensor]] = []  # (block calls, hidden, valid)
        for start in _starts(len(pairs.queries), batch_size):
            idx = range(start, min(len(pairs.queries), start + batch_size))
            ids, valid = pad_right([pairs.queries[i] for i in idx], 0, device)
            calls = layer_calls(model, arch, ids, prefix_mask(valid, lc), prefix_view(self.cache))
            self.chunks.append((calls.calls, calls.hidden, valid.bool()))

    def step(self, blk: Block) -> tuple[Tensor, Tensor, Tensor]:
        """Run block ``blk`` on every chunk: its head outputs, mid-residuals and MLP inputs at the query rows."""
        os, rs, zs = [], [], []
        for n, (calls, h, valid) in enumerate(self.chunks):
            seen: dict[str, Tensor] = {}
            specs = [(blk.attn_out, "pre", lambda m, a, s=seen: s.__setitem__("o", a[0])), *mid_taps(blk, seen)]
            with hooks(specs):
                h = run_block(blk, h, calls[blk.index]).masked_fill(~valid[..., None], 0)
            self.chunks[n] = (calls, h, valid)
            os.append(seen["o"][valid])
            rs.append(seen["r"][valid])
            zs.append(seen["z"][valid])
        return gather_rows(os), gather_rows(rs), gather_rows(zs)


def _starts(n: int, batch_size: int) -> list[int]:
    """First probe of each chunk this process runs (all of them, or this rank's share under torchrun)."""
    starts = range(0, n, batch_size)
    return [starts[k] for k in shard(len(starts))]


def _free_chunks(model: nn.Module, pairs: TokenPairs, skip: int, batch_size: int) -> list[_Chunk]:
    arch = architecture_for(model)
    device = device_of(model)
    l0 = len(pairs.prefix_free)
    chunks = []
    for start in _starts(len(pairs.queries), batch_size):
        idx = list(range(start, min(len(pairs.queries), start + batch_size)))
        ids, mask = pad_right([pairs.free(i) for i in idx], 0, device)
        query = torch.zeros_like(mask, dtype=torch.bool)
        for j, i in enumerate(idx):
            query[j, l0 : l0 + len(pairs.queries[i])] = True
        calls = layer_calls(model, arch, ids, mask)
        active = torch.arange(ids.shape[1], device=device).expand_as(ids) >= skip
        chunks.append(
            _Chunk(
                idx, calls.calls, calls.hidden, query, active, padding=~mask.bool()[..., None], n=start // batch_size
            )
        )
    return chunks


def _run_free(blk: Block, chunks: list[_Chunk], pos: Positions, specs_for: Callable, advance: bool = False):
    """Run block ``blk`` over every chunk with extra hooks; ``advance`` stores the outputs as new states."""
    for ch in chunks:
        pos.set(ch.active)
        with hooks(specs_for(ch)), contextlib.suppress(StopBlock):
            out = run_block(blk, ch.hidden, ch.calls[blk.index])
            if advance:  # a fully masked padded row (sliding window) is NaN; it must not leak through V
                ch.hidden = out.masked_fill(ch.padding, 0)


@torch.no_grad()
def condense(
    model: nn.Module,
    pairs: TokenPairs,
    cfg: CondenseConfig = CondenseConfig(),
    *,
    progress: Callable[[int], None] | None = None,
) -> Patch:
    """The sequential construction: fit block by block with the blocks below already patched."""
    cfg.validate(model.config.num_hidden_layers)
    if cfg.construction == "parallel":
        raise UsageError("condense() runs the sequential construction; use condense_updates() for parallel")
    with dispatch(model) if cfg.kv else contextlib.nullcontext():
        return _sequential(model, pairs, cfg, progress)


def _n_slots(cfg: CondenseConfig, prompt_tokens: int) -> int:
    """Slots per block: the configured share of the prompted prefix, at least one, at most ``kv_max``."""
    return min(max(1, round(cfg.kv * prompt_tokens)), cfg.kv_max or prompt_tokens)


def _prompt_kv(model: nn.Module, pairs: TokenPairs) -> list[tuple[Tensor, Tensor, int]]:
    """The prompted prefix's keys and values per block, (KVH, L, hd) each, the keys at the positions the
    prompt-free run's queries see them from (rotary families; others keep their own positions), and the
    position of the first (sliding-window layers keep only the last tokens)."""
    rotary = any("rotary" in name for name, _ in model.named_modules())
    n = len(pairs.prefix_prompted)
    shift = n - len(pairs.prefix_free) if rotary else 0
    cache = prefix_cache(model, pairs.prefix_prompted, shift)
    return [(layer.keys[0], layer.values[0], n - layer.keys.shape[2] - shift) for layer in cache.layers]


def _sequential(model: nn.Module, pairs: TokenPairs, cfg: CondenseConfig, progress) -> Patch:
    arch = architecture_for(model)
    cfg = for_family(cfg, arch)
    blks = blocks(model, arch)
    prompt_kv = _prompt_kv(model, pairs) if cfg.kv else None
    heads, head_dim = head_shape(model)
    skip = _skip(cfg, pairs)
    fit_layers = set(range(len(blks)) if cfg.layers is None else cfg.layers)
    prompted = _Prompted(model, pairs, cfg.batch_size)
    chunks = _free_chunks(model, pairs, skip, cfg.batch_size)
    patch = Patch({}, cfg.placement, skip)
    pos = Positions(skip)
    energies: list[float] = []
    ridges: list[float] = []
    for blk in blks:
        i = blk.index
        targets = prompted.step(blk)
        require_finite(targets[1], f"block {i} (prompted run)")
        if i in fit_layers:
            slots = None
            if prompt_kv is not None:
                slots = _slots(blk, chunks, pos, *prompt_kv[i], _n_slots(cfg, len(pairs.prefix_prompted)), cfg)
            lp = _fit_block(model, blk, chunks, targets, cfg, pos, heads, head_dim, energies, ridges, slots)
            patch.layers[i] = lp.scaled(cfg.strength)
        specs = layer_hook_specs(model, patch, pos, {i})
        _run_free(blk, chunks, pos, lambda ch, specs=specs: specs, advance=True)
        if progress:
            progress(1)
    patch.meta = _method_meta(cfg, energies)
    if ridges:
        patch.meta["method.attn_ridge_chosen"] = ",".join(repr(r) for r in ridges)
    return patch


def _gather(chunks: list[_Chunk], key: str, seen: dict[int, dict[str, Tensor]]) -> Tensor:
    return gather_rows([seen[id(ch)][key][ch.query] for ch in chunks])


def _slots(blk: Block, chunks: list[_Chunk], pos: Positions, keys, values, first: int, m: int, cfg) -> LayerPatch:
    """Fit block ``blk``'s virtual key/value slots to the queries of the prompt-free run (blocks below patched)."""
    qs, shares, now = [], [], {}

    def record(module, query, key, value, mask):
        b, _, t, s = query.shape[0], None, query.shape[2], key.shape[2]
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        own = (query @ key.repeat_interleave(query.shape[1] // key.shape[1], 1).transpose(-1, -2)) * scaling
        reads = allowed_keys(mask, b, t, s, query.device) & ~pos.prefix_keys().to(query.device)[:, None, None, -s:]
        share = prefix_share(query, keys, own.masked_fill(~reads, float("-inf")), scaling)
        rows = now["chunk"].query
        qs.append(query.transpose(1, 2)[rows].float())
        shares.append(share.transpose(1, 2)[rows].float())
        raise StopBlock

    def specs_for(ch):
        now["chunk"] = ch
        return []

    blk.attention._thoughtpatch_record = record
    try:
        _run_free(blk, chunks, pos, specs_for)
    finally:
        del blk.attention._thoughtpatch_record
    scaling = getattr(blk.attention, "scaling", keys.shape[-1] ** -0.5)
    q, share = gather_rows(qs), gather_rows(shares)
    _, slots = fit_slots(lambda: [(q, share)], keys, values, scaling, m, cfg.kv_ridge, first)
    return LayerPatch(kv_key=slots.key, kv_value=slots.value, kv_bias=slots.bias, kv_position=slots.position)


def _fit_block(model, blk, chunks, targets, cfg, pos, heads, head_dim, energies, lp_ridge, slots=None) -> LayerPatch:
    i = blk.index
    seen: dict[int, dict[str, Tensor]] = {}

    def tap(ch):  # record the head outputs, the mid-residual and the MLP input; stop before the MLP
        rec = seen.setdefault(id(ch), {})

        def grab_x(x):
            rec["x"] = x

        def grab_o(m, a):
            rec["o"] = a[0]

        return [blk.attn_input(grab_x), (blk.attn_out, "pre", grab_o), *mid_taps(blk, rec, stop=True)]

    lp = slots or LayerPatch()
    with_slots = Patch({i: lp}, cfg.placement, pos.skip)
    _run_free(blk, chunks, pos, lambda ch: layer_hook_specs(model, with_slots, pos) + tap(ch))
    o_c, r_c, z_c = targets
    h_in = gather_rows([ch.hidden[ch.query] for ch in chunks])
    keep = ~(
        detect_sinks(r_c.norm(dim=-1).float(), cfg.sink_factor)
        | detect_sinks(h_in.norm(dim=-1).float(), cfg.sink_factor)
    )
    if cfg.attn != "none":
        o0 = _gather(chunks, "o", seen)[keep].unflatten(-1, (heads, head_dim))
        oc = o_c[keep].unflatten(-1, (heads, head_dim))
        x = _gather(chunks, "x", seen)[keep] if (cfg.attn_query or cfg.attn_gate) else None
        groups = gather_rows([torch.full((int(ch.query.sum()),), ch.n) for ch in chunks])[keep.cpu()]
        ridge = cfg.attn_ridge
        if cfg.attn_ridge_grid:
            ridge = min(cfg.attn_ridge_grid, key=lambda r: _cv_error(o0, oc, x, cfg, r, groups))
            lp_ridge.append(ridge)
        for k, v in fit_attention(o0, oc, x, cfg, ridge, where=f"block {i} attention map").items():
            require_finite(v, f"block {i} {k} (condensation statistics)")
            setattr(lp, k, v)
        if cfg.vector or cfg.matrix:  # the rest is fitted with the attention map installed
            seen.clear()
            only = Patch({i: lp.scaled(cfg.strength)}, cfg.placement, pos.skip)
            _run_free(blk, chunks, pos, lambda ch: layer_hook_specs(model, only, pos) + tap(ch))
    if cfg.vector or cfg.matrix:
        r_0 = _gather(chunks, "r", seen)[keep]
        delta = r_c[keep] - r_0
        v = delta.double().mean(0).to(r_0.dtype) if cfg.vector else None
        if blk.parallel:  # the MLP reads the block input: the vector never reaches it
            a = _gather(chunks, "z", seen)[keep]
            u = z_c[keep] - a
        else:
            attn_out = cfg.placement == "attn_out" and v is not None
            a = blk.norm2(r_0 + v) if attn_out else _gather(chunks, "z", seen)[keep]
            u = blk.norm2(r_c[keep]) - a
        vm, kept = _vector_matrix(MatrixStats().add(delta, a, u), cfg, f"block {i}")
        lp.vector, lp.matrix_a, lp.matrix_b = vm.vector, vm.matrix_a, vm.matrix_b
        energies.append(kept)
    return lp
