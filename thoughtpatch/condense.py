"""Condense the context effect into token-independent parts (DESIGN.md section 2).

Per block, fitted by ridge least squares over the query tokens of many probes (sink positions left out):

* per-head affine map of the attention output ``o_c,h ~ o_0,h + W_h o_0,h + b_h (+ Q_h x)``, fitted first
  (or one map across the heads, ``o_c ~ o_0 + W o_0 + b``, ``attn="cross"``);
* thought vector ``v = mean_t delta_t``;
* thought matrix ``M = (sum u a^T)(sum a a^T + lam I)^-1`` on the MLP input, truncated to rank k by SVD.

The statistics are additive (:class:`Affine`, :class:`MatrixStats`): shards of probes can be reduced apart.
The sequential construction fits block ``l`` with blocks ``0..l-1`` already patched, so later blocks
correct the errors of earlier ones; the parallel one fits every block from the exact chain (the updates).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .apply import Positions, head_shape, kv_heads, layer_hook_specs, per_head
from .architectures import Architecture, architecture_for
from .distributed import shard, share
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
from .files import Spill
from .patch import LayerPatch, Patch
from .prompts import TokenPairs
from .virtual import REFINE_STEP, SELECT, allowed_keys, attended_inputs, dispatch, fit_slots, prefix_share

__all__ = ["CondenseConfig", "Affine", "MatrixStats", "condense", "condense_updates", "ridge_solve", "truncate"]

ATTN_MODES = ("none", "scalar", "full", "cross")


@dataclass(frozen=True)
class CondenseConfig:
    """How to condense; every choice is recorded in the patch metadata."""

    attn: str = "full"  # map of the attention output: none | scalar | full (per head) | cross (across the heads)
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
    kv_budget: float | None = None  # all slots together: at most this share of the model's parameters (None: no cap)
    down: bool = False  # a map from the MLP's hidden activations to its output (bakes into the down projection)
    down_ridge: float = 1.0  # its ridge, relative to the mean feature energy
    down_rank: int | None = None  # its rank (None: full)
    down_ridge_grid: tuple[float, ...] | None = None  # pick down_ridge per block by 2-fold CV over queries
    kv_refine: int = 0  # slots: L-BFGS iterations refitting keys, multiplicities and values jointly (0: none)
    kv_select: str = "merge"  # slots: groups of all the prompt's tokens (merge) or the tokens with the most mass
    answer_weight: float = 1.0  # weight of the rows that predict answer tokens (the others weigh 1)
    value_map: bool = False  # a change of the value projection fitted to the head outputs (bakes into v_proj)
    value_ridge: float = 1.0  # its ridge, relative to the mean feature energy

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
        if not (self.vector or self.matrix or self.attn != "none" or self.kv or self.down or self.value_map):
            raise UsageError("nothing to condense: enable at least one of the vector, the matrix, the attention map")
        if self.bakeable and (self.attn_query or self.attn_gate or self.skip not in (None, 0)):
            raise UsageError("a bakeable patch cannot have query-dependent terms or skipped tokens (--skip 0)")
        if not 0 <= self.kv <= 1:
            raise UsageError(f"--kv must be a share of the prompt's tokens in [0, 1], not {self.kv}")
        if self.kv_max is not None and self.kv_max < 1:
            raise UsageError(f"--kv-max must be a positive number of slots, not {self.kv_max}")
        if self.kv_budget is not None and not 0 < self.kv_budget < 1:
            raise UsageError(f"--kv-budget must be a share of the model's parameters in (0, 1), not {self.kv_budget}")
        if not self.answer_weight > 0:
            raise UsageError(f"--answer-weight must be > 0, not {self.answer_weight}")
        if self.kv_select not in SELECT:
            raise UsageError(f"kv_select must be one of {', '.join(SELECT)}, not {self.kv_select!r}")
        if self.kv_refine < 0 or self.kv_refine % REFINE_STEP:
            raise UsageError(f"--kv-refine must be a multiple of {REFINE_STEP} iterations >= 0, not {self.kv_refine}")
        if self.value_map and (self.kv or self.construction == "parallel"):
            raise UsageError("the value map (--value-map) needs the sequential construction and no slots (--kv 0)")
        if self.value_ridge < 0:
            raise UsageError("--value-ridge must be >= 0")
        if self.bakeable and self.kv:
            raise UsageError("a bakeable patch cannot have virtual key/value slots (--kv 0)")
        if self.kv and self.construction == "parallel":
            raise UsageError("virtual key/value slots need the sequential construction")
        if self.down and self.construction == "parallel":
            raise UsageError("the down map (--down) needs the sequential construction")
        if (
            self.down_ridge < 0
            or (self.down_rank is not None and self.down_rank <= 0)
            or any(r < 0 for r in self.down_ridge_grid or ())
        ):
            raise UsageError("--down-ridge must be >= 0 and --down-rank a positive integer")
        if (self.attn_query or self.attn_gate) and self.attn == "none":
            raise UsageError("the query-dependent attention terms need --attn scalar, full or cross")
        if self.attn_gate and self.attn == "cross":
            raise UsageError("the attention gate scales each head: it needs --attn scalar or full, not cross")
        if n_layers is not None and self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < n_layers]
            if bad:
                raise UsageError(f"--layers {bad[0]} is out of range: the model has blocks 0..{n_layers - 1}")

    def describe(self) -> dict[str, str]:
        out = {
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
        }
        if self.answer_weight != 1:
            out["answer_weight"] = repr(self.answer_weight)
        if self.value_map:
            out |= {"value_map": "true", "value_ridge": repr(self.value_ridge)}
        return out | self._kv() | self._down()

    def _down(self) -> dict[str, str]:
        if not self.down:
            return {}
        rank = "full" if self.down_rank is None else str(self.down_rank)
        grid = {"down_ridge_grid": ",".join(map(repr, self.down_ridge_grid))} if self.down_ridge_grid else {}
        return {"down": "true", "down_ridge": repr(self.down_ridge), "down_rank": rank} | grid

    def _kv(self) -> dict[str, str]:
        if not self.kv:
            return {}
        kv = {"kv": repr(self.kv), "kv_max": str(self.kv_max), "kv_ridge": repr(self.kv_ridge)}
        kv |= {"kv_budget": repr(self.kv_budget)} if self.kv_budget else {}
        return kv | {"kv_select": self.kv_select} | ({"kv_refine": str(self.kv_refine)} if self.kv_refine else {})


# ----------------------------------------------------------------------------------------------- statistics
MAX_CONDITION = 1e10  # beyond this a float64 solve loses most of its digits
NORM_DAMPING = 0.2  # down map through a norm: its gains are inverted with damping tau = this x median |gain|


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

    def add(self, x: Tensor, y: Tensor, shared: Tensor | None = None, w: Tensor | None = None) -> Affine:
        """Rows ``x`` (N, ..., p) and targets ``y`` (N, ..., q); the residual ``y - x[:q]`` is fitted.

        ``shared`` (N, s): extra features common to every leading index (heads), appended to ``x``; their
        Gram block is computed once instead of once per head. ``w`` (N,): row weights (None: all 1).
        """
        x, y = x.double(), y.double()
        r = y - x[..., : y.shape[-1]]
        if w is None:
            xw, rw, n = x, r, x.shape[0]
        else:
            w = w.double().to(x.device).view(-1, *[1] * (x.dim() - 1))
            xw, rw, n = x * w, r * w, float(w.sum())
        xt = x.movedim(0, -2)  # (..., N, p): one batched matmul per leading index
        xwt, rwt = xw.movedim(0, -2), rw.movedim(0, -2)
        parts = (xw.sum(0), rw.sum(0), xwt.transpose(-1, -2) @ xt, rwt.transpose(-1, -2) @ xt)
        if shared is not None:
            sh = shared.double()
            shw = sh if w is None else sh * w.view(-1, 1)
            lead = x.shape[1:-1]
            xs = xwt.transpose(-1, -2) @ sh  # (..., p, s)
            ss = (shw.T @ sh).expand(*lead, sh.shape[1], sh.shape[1])
            sxx = torch.cat([torch.cat([parts[2], xs], -1), torch.cat([xs.transpose(-1, -2), ss], -1)], -2)
            sx = torch.cat([parts[0], shw.sum(0).expand(*lead, sh.shape[1])], -1)
            parts = (sx, parts[1], sxx, torch.cat([parts[3], rwt.transpose(-1, -2) @ sh], -1))
        if self.sx is None:
            self.sx, self.sr, self.sxx, self.srx = parts
        else:
            self.sx, self.sr, self.sxx, self.srx = (
                a + b for a, b in zip((self.sx, self.sr, self.sxx, self.srx), parts, strict=True)
            )
        self.n += n
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

    def add(self, delta: Tensor | None, a: Tensor | None, u: Tensor | None, w: Tensor | None = None) -> MatrixStats:
        """Rows of the block output's change ``delta``, the MLP input ``a`` and its change ``u``; ``w`` (N,):
        row weights (None: all 1)."""
        first = delta if delta is not None else a
        weigh = (lambda t: t) if w is None else (lambda t: t * w.to(t)[:, None])
        # products in single precision (double for a float64 model's rows, as the exactness tests need), summed in double
        af = None if a is None else a if a.dtype == torch.float64 else a.float()
        parts = [
            None if delta is None else weigh(delta.double()).sum(0),
            None if a is None else (weigh(af).T @ af).double(),
            None if a is None else (weigh(u.to(af)).T @ af).double(),
        ]
        olds = (self.s_delta, self.s_aa, self.s_ua)
        self.s_delta, self.s_aa, self.s_ua = (p if o is None else o + p for o, p in zip(olds, parts, strict=True))
        self.n += first.shape[0] if w is None else float(w.sum())
        return self

    def __add__(self, other: MatrixStats) -> MatrixStats:
        out = MatrixStats(self.n + other.n)
        for k in ("s_delta", "s_aa", "s_ua"):
            a, b = getattr(self, k), getattr(other, k)
            setattr(out, k, b if a is None else a if b is None else a + b)
        return out

    def vector(self) -> Tensor:
        return self.s_delta / self.n

    def matrix(self, ridge: float, where: str = "", option: str = "--ridge") -> tuple[Tensor, float]:
        """``M`` and the absolute ridge ``lam`` used; ``where`` names the fit in warnings, ``option`` the setting."""
        lam = ridge * float(torch.trace(self.s_aa)) / self.s_aa.shape[0]
        if where:
            warn_conditioning(self.s_aa, lam, where, option, ridge)
        return ridge_solve(self.s_aa, self.s_ua, lam), lam


def cv_ridge(folds: tuple[MatrixStats, MatrixStats], grid: tuple[float, ...]) -> float | None:
    """The relative ridge of ``grid`` whose map ``u ~ M a`` fitted on one fold's statistics predicts the other's
    best (squared error, each way round); None when a fold is empty.

    From statistics alone, whatever the number of rows: with ``S = V diag(w) V^T`` the fold's Gram matrix (one
    eigendecomposition serves every ridge), ``M = C V D V^T``, ``D = diag(1 / (w + lam))``, and the held-out
    error is, up to a constant, ``d^T (K * A^T A) d - 2 d . sum_rows(A * B)`` with ``A = C V``, ``B = C' V``,
    ``K = V^T S' V`` (primes: the held-out fold). In single precision: half the time of double (an MLP as wide
    as 2048 makes these the slowest step of a bakeable build), and the same choices in every block of our checks
    (three SmolLM2 tasks, one Gemma-3 task); the map itself is then solved in double."""
    if not all(f.n for f in folds):
        return None
    err = [0.0] * len(grid)
    single = [(f.s_aa.float(), f.s_ua.float()) for f in folds]
    for (fit_aa, fit_ua), (held_aa, held_ua) in (single, single[::-1]):
        w, v = torch.linalg.eigh(fit_aa)
        w = w.clamp(min=0)  # rounding can leave tiny negative eigenvalues
        a, b = fit_ua @ v, held_ua @ v
        quad, lin = (v.T @ held_aa @ v) * (a.T @ a), (a * b).sum(0)
        scale = float(w.sum()) / len(w)  # relative ridge: the mean feature energy, as MatrixStats.matrix
        for j, r in enumerate(grid):
            d = 1 / (w + r * scale)
            err[j] += float(d @ quad @ d - 2 * d @ lin)
    return grid[min(range(len(grid)), key=err.__getitem__)]


def truncate(m: Tensor, rank: int | None) -> tuple[Tensor, Tensor, float]:
    """Factors ``B, A`` (d, k) with ``B A^T`` the best rank-k approximation of ``m``, and the energy kept.

    Each column of ``A`` has its largest entry positive, so that the factors do not depend on the signs the
    SVD of one device or library happens to choose."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    k = len(s) if rank is None else min(rank, len(s))
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    a = vh[:k].T
    sign = torch.where(a.gather(0, a.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0).to(a)
    return u[:, :k] * (s[:k] * sign), (a * sign).contiguous(), kept


Rows = Callable[[], Iterable[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]]  # fresh passes: (o0, oc, x, w)


def gate_stats(r: Tensor, o: Tensor, x: Tensor, rw: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Additive normal equations ``(S, c)`` of :func:`fit_gate` for one block of rows (``rw``: row weights)."""
    dtype = torch.promote_types(o.dtype, torch.float32)  # float32 products for float32 models (half the time)
    f = torch.cat([torch.ones_like(x[:, :1]), x], -1).to(dtype)  # (N, d+1)
    w = (o.to(dtype) ** 2).sum(-1).T  # (H, N)
    if rw is not None:
        w, r = w * rw.to(w), r * rw.to(r).view(-1, *[1] * (r.dim() - 1))
    s = sum(  # (H, d+1, d+1): products over row blocks (bounded memory), summed in float64
        ((f[k : k + 4096].T[None] * w[:, None, k : k + 4096]) @ f[k : k + 4096]).double()
        for k in range(0, len(f), 4096)
    )
    return s, ((r.double() * o.double()).sum(-1).T) @ f.double()


def fit_gate(s: Tensor, c: Tensor, ridge: float) -> Tensor:
    """``g`` (H, d+1) minimising ``sum |r_h - (g_h0 + g_h . x) o_h|^2`` (+ ridge on ``g_h[1:]``), from the
    summed :func:`gate_stats`.

    The prompt's share of each head's attention mass varies with the query, which scales the head's
    own output (o_c = gamma_t o_0 + beta_t exactly, gamma_t a scalar); this models gamma_t - 1 as linear in x.
    """
    p = s.shape[-1]
    reg = (ridge * torch.diagonal(s, dim1=-2, dim2=-1)[:, 1:].sum(-1) / (p - 1))[:, None, None] * torch.eye(
        p, dtype=s.dtype, device=s.device
    )
    reg[:, 0, 0] = 0
    return torch.linalg.solve(s + reg, c[..., None])[..., 0]


def _gate_scale(g: Tensor, o: Tensor, x: Tensor) -> Tensor:
    return (g[:, 0] + x.double() @ g[:, 1:].T)[..., None] * o.double()


def fit_attention(rows: Rows, cfg: CondenseConfig, ridge: float, rounds: int = 2, where: str = "") -> dict:
    """Per-head map of the attention output from row blocks ``o0``, ``oc`` (N, H, hd) and ``x`` (N, d) or None.

    Linear part ``o0 -> W o0 + b (+ Q x)`` by ridge least squares; with ``cfg.attn_gate`` alternated with the
    query-dependent scale of :func:`fit_gate`. Only additive statistics are kept: ``rows`` is read once per step.
    """
    scalar = cfg.attn == "scalar" and not cfg.attn_query
    gate = None
    for _ in range(rounds if cfg.attn_gate else 1):
        aff = Affine()
        for o0, oc, x, rw in rows():
            target = oc if gate is None else oc.double() - _gate_scale(gate, o0, x)
            aff.add(o0, target, x if cfg.attn_query else None, rw)
        w, b = aff.fit(ridge, scalar=scalar, intercept=cfg.attn_bias, where=where)
        heads, head_dim = aff.sr.shape
        if not cfg.attn_gate:
            break
        s = c = 0
        for o0, oc, x, rw in rows():
            linear = o0.double() * w[..., None] if scalar else per_head(o0.double(), w[..., :head_dim])
            if cfg.attn_query:
                linear = linear + (x.double() @ w[..., head_dim:].reshape(heads * head_dim, -1).T).view(
                    -1, heads, head_dim
                )
            si, ci = gate_stats(oc.double() - o0.double() - linear - b, o0, x, rw)
            s, c = s + si, c + ci
        gate = fit_gate(s, c, ridge)
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


def _cv_error(fold: Callable[[bool], Rows], cfg: CondenseConfig, ridge: float) -> float:
    """2-fold cross-validated error of the attention fit; ``fold(side)`` reads one side's rows."""
    total = 0.0
    for side in (True, False):
        parts = fit_attention(fold(side), cfg, ridge)
        for o0, oc, x, rw in fold(not side)():
            err = ((oc.double() - _predict_attention(parts, o0, x)) ** 2).flatten(1).sum(1)
            total += float(err.sum() if rw is None else err @ rw.double())
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
    """A config narrowed to what this family has: no down map without an MLP output projection (mixtures of
    experts), no value map where the value projection is fused with the query and key projections; when
    bakeable, to what folds exactly into its weights: a thought vector needs a bias with no norm after it, the
    head map's constant part a bias on the attention output."""
    cfg = replace(
        cfg, down=cfg.down and arch.mlp_out is not None, value_map=cfg.value_map and arch.value_proj is not None
    )
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
    """Some queries, run prompted and prompt-free block by block (the prompt-free run with the patch so far).

    Their states between blocks live in the spill (``p``: prompted, ``f``: prompt-free), only the block
    arguments in memory."""

    n: int  # the chunk's number among all chunks (all ranks)
    prompted_calls: list
    valid: Tensor  # (B, Tq) bool: the prompted run's query tokens
    free_calls: list
    query: Tensor  # (B, T) bool: query positions of the prompt-free run
    active: Tensor  # (B, T) bool: positions the patch acts on
    padding: Tensor  # (B, T, 1) bool: padded positions, kept at zero between blocks
    answer: Tensor  # (B, T) bool: positions that predict a teacher-forced answer token (the query's last on)

    def weights(self, cfg: CondenseConfig) -> Tensor | None:
        """Weights of the chunk's query rows: ``cfg.answer_weight`` where they predict answer tokens, else 1."""
        if cfg.answer_weight == 1:
            return None
        return torch.where(self.answer[self.query], cfg.answer_weight, 1.0).float()


def _starts(n: int, batch_size: int) -> list[int]:
    """First probe of each chunk this process runs (all of them, or this rank's share under torchrun)."""
    starts = range(0, n, batch_size)
    return [starts[k] for k in shard(len(starts))]


def _chunks(model: nn.Module, pairs: TokenPairs, skip: int, batch_size: int, spill: Spill) -> list[_Chunk]:
    arch = architecture_for(model)
    device = device_of(model)
    cache = prefix_cache(model, pairs.prefix_prompted)  # read by every chunk through a read-only view
    lc, l0 = len(pairs.prefix_prompted), len(pairs.prefix_free)
    chunks = []
    for start in _starts(len(pairs.queries), batch_size):
        idx = list(range(start, min(len(pairs.queries), start + batch_size)))
        ids, valid = pad_right([pairs.queries[i] for i in idx], 0, device)
        prompted = layer_calls(model, arch, ids, prefix_mask(valid, lc), prefix_view(cache))
        ids, mask = pad_right([pairs.free(i) for i in idx], 0, device)
        query = torch.zeros_like(mask, dtype=torch.bool)
        answer = torch.zeros_like(query)
        for j, i in enumerate(idx):
            query[j, l0 : l0 + len(pairs.queries[i])] = True
            if pairs.answer_start:
                answer[j, l0 + pairs.answer_start[i] - 1 : l0 + len(pairs.queries[i])] = True
        free = layer_calls(model, arch, ids, mask)
        active = torch.arange(ids.shape[1], device=device).expand_as(ids) >= skip
        n = start // batch_size
        spill.put("p", n, {"h": prompted.hidden})
        spill.put("f", n, {"h": free.hidden})
        padding = ~mask.bool()[..., None]
        chunks.append(_Chunk(n, prompted.calls, valid.bool(), free.calls, query, active, padding, answer))
    return chunks


def _step_prompted(blk: Block, ch: _Chunk, spill: Spill) -> dict[str, Tensor]:
    """Advance a chunk's prompted run by block ``blk``: its head outputs, mid-residuals, MLP inputs at the queries."""
    seen: dict[str, Tensor] = {}
    specs = [(blk.attn_out, "pre", lambda m, a: seen.__setitem__("o", a[0])), *mid_taps(blk, seen)]
    with hooks(specs):
        h = run_block(blk, spill.get("p", ch.n)["h"], ch.prompted_calls[blk.index])
    spill.put("p", ch.n, {"h": h.masked_fill(~ch.valid[..., None], 0)})
    return {k: seen[k][ch.valid] for k in ("o", "r", "z")}


def _run_free(blk: Block, ch: _Chunk, h: Tensor, pos: Positions, specs: list) -> Tensor | None:
    """Run block ``blk`` on a chunk's prompt-free states with extra hooks: its output, None if a hook ended it."""
    pos.set(ch.active)
    with hooks(specs), contextlib.suppress(StopBlock):  # a fully masked padded row (sliding window) is NaN;
        return run_block(blk, h, ch.free_calls[blk.index]).masked_fill(ch.padding, 0)  # it must not leak through V
    return None


def _taps(blk: Block, seen: dict[str, Tensor]) -> list:
    """Record the attention input, head outputs, mid-residual and MLP input; stop before the MLP."""
    return [
        blk.attn_input(lambda x: seen.__setitem__("x", x)),
        (blk.attn_out, "pre", lambda m, a: seen.__setitem__("o", a[0])),
        *mid_taps(blk, seen, stop=True),
    ]


@torch.no_grad()
def condense(
    model: nn.Module,
    pairs: TokenPairs,
    cfg: CondenseConfig = CondenseConfig(),
    *,
    progress: Callable[[int], None] | None = None,
) -> Patch:
    """The sequential construction: fit block by block with the blocks below already patched.

    Chunk states and per-block rows wait in a temporary folder (removed on return, error or interrupt) and
    the fits keep only additive statistics, so memory does not grow with the number of probes.
    """
    cfg.validate(model.config.num_hidden_layers)
    if cfg.construction == "parallel":
        raise UsageError("condense() runs the sequential construction; use condense_updates() for parallel")
    with dispatch(model) if cfg.kv else contextlib.nullcontext():
        return _sequential(model, pairs, cfg, progress).to("cpu")


def _n_slots(cfg: CondenseConfig, model: nn.Module, n: int, prompt_kv: list, blocks: list[int]) -> dict[int, int]:
    """Slots per patched block: the configured share of the prompted prefix, at least one, at most ``kv_max``,
    and at most what ``kv_budget`` (a share of the model's parameters) pays for, spread over the ``blocks``: the
    slots it buys are shared out evenly, the remainder one more to blocks spaced evenly among them."""
    kvh, _, hd = prompt_kv[0][0].shape
    m = min(max(1, round(cfg.kv * n)), cfg.kv_max or n)
    if not cfg.kv_budget:
        return dict.fromkeys(blocks, m)
    k = len(blocks)  # key, value, bias, position per key/value head and slot:
    bought = int(cfg.kv_budget * sum(p.numel() for p in model.parameters())) // (kvh * (2 * hd + 2))
    return {b: min(m, max(1, bought * (j + 1) // k - bought * j // k)) for j, b in enumerate(sorted(blocks))}


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
    skip = _skip(cfg, pairs)
    fit_layers = set(range(len(blks)) if cfg.layers is None else cfg.layers)
    n_slots = _n_slots(cfg, model, len(pairs.prefix_prompted), prompt_kv, fit_layers) if prompt_kv else {}
    patch = Patch({}, cfg.placement, skip)
    pos = Positions(skip)
    energies: list[float] = []
    ridges: dict[str, list[float]] = {"attn": [], "down": []}  # the ridges chosen per block by CV
    with Spill(device_of(model)) as spill:
        chunks = _chunks(model, pairs, skip, cfg.batch_size, spill)
        total = -(-len(pairs.queries) // cfg.batch_size)
        for blk in blks:
            i = blk.index
            fit = i in fit_layers
            slots = None
            if fit and prompt_kv is not None:
                slots = _slots(blk, chunks, total, spill, pos, *prompt_kv[i], n_slots[i], cfg)
            own = layer_hook_specs(model, Patch({i: slots}, cfg.placement, skip), pos) if slots else []
            for ch in chunks:
                rows = _step_prompted(blk, ch, spill)
                require_finite(rows["r"], f"block {i} (prompted run)")
                h = spill.get("f", ch.n)["h"]
                if fit:
                    seen: dict[str, Tensor] = {}
                    _run_free(blk, ch, h, pos, own + _taps(blk, seen))
                    rows = {k + "c": v for k, v in rows.items()} | {k + "0": v[ch.query] for k, v in seen.items()}
                    rows |= {"nh": h[ch.query].norm(dim=-1).float(), "nr": rows["rc"].norm(dim=-1).float()}
                    w = ch.weights(cfg)
                    spill.put("rows", ch.n, rows if w is None else rows | {"w": w})
                else:  # nothing to fit: advance at once
                    spill.put("f", ch.n, {"h": _run_free(blk, ch, h, pos, [])})
            if fit and cfg.value_map:
                slots = _value_map(model, blk, chunks, total, spill, pos, cfg)  # no slots with it (validate)
            if fit:
                share(spill, "rows", [ch.n for ch in chunks], total)
                lp, rejoin = _fit_block(model, blk, chunks, total, spill, cfg, pos, energies, ridges, slots)
                patch.layers[i] = lp.scaled(cfg.strength)
                specs = layer_hook_specs(model, patch, pos, {i})
                for ch in chunks:  # advance: from the down map's pass where it can, else run the block again
                    h = _advance(blk, ch, spill, patch.layers[i], cfg) if rejoin else None
                    h = _run_free(blk, ch, spill.get("f", ch.n)["h"], pos, specs) if h is None else h
                    spill.put("f", ch.n, {"h": h})
            if progress:
                progress(1)
    patch.meta = _method_meta(cfg, energies)
    for part, chosen in ridges.items():
        if chosen:
            patch.meta[f"method.{part}_ridge_chosen"] = ",".join(repr(r) for r in chosen)
    return patch


def _slots(blk: Block, chunks, total: int, spill, pos: Positions, keys, values, first: int, m: int, cfg) -> LayerPatch:
    """Fit block ``blk``'s virtual key/value slots to the queries of the prompt-free run (blocks below patched)."""
    now: dict[str, Tensor] = {}
    scaling = getattr(blk.attention, "scaling", keys.shape[-1] ** -0.5)

    def record(module, query, key, value, mask, **kwargs):
        b, t, s = query.shape[0], query.shape[2], key.shape[2]
        own = (query @ key.repeat_interleave(query.shape[1] // key.shape[1], 1).transpose(-1, -2)) * scaling
        reads = allowed_keys(mask, b, t, s, query.device) & ~pos.prefix_keys().to(query.device)[:, None, None, -s:]
        own = own.masked_fill(~reads, float("-inf"))
        share = prefix_share(query, keys, own, scaling)
        rows = now.pop("query")
        now["q"], now["share"] = query.transpose(1, 2)[rows].float(), share.transpose(1, 2)[rows].float()
        if cfg.kv_refine:  # the rows' own attention output, which the slots' output is mixed with
            out = own.softmax(-1) @ value.repeat_interleave(query.shape[1] // value.shape[1], 1)
            now["own"] = out.transpose(1, 2)[rows].float()
        raise StopBlock

    parts = ("q", "share", "own")  # "own" only where the slots are refitted
    blk.attention._thoughtpatch_record = record
    try:
        for ch in chunks:
            now["query"] = ch.query
            _run_free(blk, ch, spill.get("f", ch.n)["h"], pos, [])
            spill.put("q", ch.n, {k: now.pop(k) for k in parts if k in now})
    finally:
        del blk.attention._thoughtpatch_record
    share(spill, "q", [ch.n for ch in chunks], total)
    rows = lambda: (tuple(d[k] for k in parts if k in d) for d in (spill.get("q", n) for n in range(total)))  # noqa: E731
    slots = fit_slots(rows, keys, values, scaling, m, cfg.kv_ridge, first, cfg.kv_select, cfg.kv_refine)
    return LayerPatch(kv_key=slots.key, kv_value=slots.value, kv_bias=slots.bias, kv_position=slots.position)


def _value_map(model, blk: Block, chunks, total: int, spill, pos: Positions, cfg: CondenseConfig) -> LayerPatch:
    """Fit ``D_g`` (hd, d), a change of each key/value head's value projection, to the head outputs' error.

    With ``v_s <- v_s + D x_s`` at the patched positions, head ``h`` (of key/value head ``g``) outputs exactly
    ``o_h + D_g xbar_h``, ``xbar_h`` the head's attention-weighted mean of the inputs ``x_s`` it reads there
    (the model's own eager attention computes it, given the inputs as values): a ridge least-squares fit in
    ``xbar``, which reads what the head attends to, not only the token's own state. The rows' prompt-free
    head outputs are then recomputed with the change installed, for the fits after it."""
    heads, hd = head_shape(model)
    kvh = kv_heads(model)
    group = heads // kvh
    now: dict[str, Tensor] = {}

    def record(module, query, key, value, mask, **kwargs):
        x = now.pop("x")[:, -key.shape[2] :]
        x = x if pos.mask is None else x * pos.mask.to(x)[:, -key.shape[2] :]
        now["xbar"] = attended_inputs(module, query, key, x, mask, **kwargs)[now["query"]].float()  # (R, H, d)
        raise StopBlock

    blk.attention._thoughtpatch_record = record
    try:
        with dispatch(model):
            for ch in chunks:
                now["query"] = ch.query
                _run_free(blk, ch, spill.get("f", ch.n)["h"], pos, [blk.attn_input(lambda x: now.update(x=x))])
                xbar, d = now.pop("xbar"), spill.get("rows", ch.n)
                r = (d["oc"] - d["o0"]).float().unflatten(-1, (heads, hd))
                w = d["w"].repeat_interleave(group) if "w" in d else None
                mine = {}  # per key/value head: the Gram matrix of xbar, the error's products with it, the weight
                for g in range(kvh):
                    heads_g = slice(g * group, (g + 1) * group)
                    st = MatrixStats().add(None, xbar[:, heads_g].flatten(0, 1), r[:, heads_g].flatten(0, 1), w)
                    mine |= {f"aa{g}": st.s_aa, f"ua{g}": st.s_ua, f"n{g}": torch.tensor([st.n], dtype=torch.float64)}
                spill.put("value", ch.n, mine)
    finally:
        del blk.attention._thoughtpatch_record
    share(spill, "value", [ch.n for ch in chunks], total)  # summed in chunk order: the same bytes on any ranks
    stats = [MatrixStats() for _ in range(kvh)]
    for n in range(total):
        d = spill.get("value", n)
        stats = [st + MatrixStats(float(d[f"n{g}"]), None, d[f"aa{g}"], d[f"ua{g}"]) for g, st in enumerate(stats)]
    where = f"block {blk.index} value map"
    out = LayerPatch(
        value_weight=torch.cat([s.matrix(cfg.value_ridge, where, "--value-ridge")[0] for s in stats]).float()
    )
    specs = layer_hook_specs(model, Patch({blk.index: out}, cfg.placement, pos.skip), pos)
    for ch in chunks:  # the rows' prompt-free parts with the change installed
        seen: dict[str, Tensor] = {}
        _run_free(blk, ch, spill.get("f", ch.n)["h"], pos, specs + _taps(blk, seen))
        spill.put("rows", ch.n, spill.get("rows", ch.n) | {k + "0": v[ch.query] for k, v in seen.items()})
    return out


def _fit_block(model, blk, chunks, total, spill, cfg, pos, energies, ridges, slots=None) -> tuple[LayerPatch, bool]:
    """Fit block ``blk`` from the rows of all ``total`` chunks in the spill, read a chunk at a time (on top of
    its ``slots``, when it has them); and whether the down map's pass left what :func:`_advance` needs."""
    i = blk.index
    heads, head_dim = head_shape(model)
    if cfg.attn == "cross":  # one map over all heads' outputs: a single group as wide as them all
        heads, head_dim = 1, heads * head_dim
    norms = [(d["nr"], d["nh"]) for d in (spill.get("rows", n) for n in range(total))]
    counts = [len(nr) for nr, _ in norms]
    keep = ~(
        detect_sinks(torch.cat([nr for nr, _ in norms]), cfg.sink_factor)
        | detect_sinks(torch.cat([nh for _, nh in norms]), cfg.sink_factor)
    )
    keeps = keep.split(counts)
    lp = slots or LayerPatch()
    if cfg.attn != "none":

        def attention_rows(select: Callable[[int, Tensor], Tensor] | None = None) -> Rows:
            def rows():
                for n in range(total):
                    d, k = spill.get("rows", n), keeps[n]
                    if select is not None:
                        k = k & select(n, k)
                    x = d["x0"][k] if (cfg.attn_query or cfg.attn_gate) else None
                    w = d["w"][k] if "w" in d else None
                    yield d["o0"][k].unflatten(-1, (heads, head_dim)), d["oc"][k].unflatten(-1, (heads, head_dim)), x, w

            return rows

        ridge = cfg.attn_ridge
        if cfg.attn_ridge_grid:  # folds split by query chunk (never by token), by rows if one chunk has them all
            by_chunk = len({n % 2 for n in range(total) if keeps[n].any()}) == 2
            start = [0, *torch.tensor(counts).cumsum(0).tolist()]

            def fold(side: bool) -> Rows:
                if by_chunk:
                    return attention_rows(lambda n, k: torch.full_like(k, (n % 2 == 0) == side))
                return attention_rows(lambda n, k: ((keep[: start[n]].sum() + k.cumsum(0) - 1) % 2 == 0) == side)

            ridge = min(cfg.attn_ridge_grid, key=lambda r: _cv_error(fold, cfg, r))
            ridges["attn"].append(ridge)
        for k, v in fit_attention(attention_rows(), cfg, ridge, where=f"block {i} attention map").items():
            require_finite(v, f"block {i} {k} (condensation statistics)")
            setattr(lp, k, v)
    # The vector's pass can serve the down map when the vector joins after the block and no matrix moves the MLP
    # input; it stays so while every chunk's pass rejoins (:func:`_keep`).
    ahead = cfg.down and blk.mlp_out is not None and not blk.parallel and cfg.attn != "none"
    ahead = ahead and cfg.vector and not cfg.matrix and cfg.placement == "skip"
    if cfg.vector or cfg.matrix:
        key = "rows"
        if cfg.attn != "none":  # the rest is fitted with the attention map installed
            key, only = "mid", Patch({i: lp.scaled(cfg.strength)}, cfg.placement, pos.skip)
            for ch in chunks:
                seen: dict[str, Tensor] = {}
                taps = [*mid_taps(blk, seen), _mlp_tap(blk, seen)] if ahead else _taps(blk, seen)
                out = _run_free(blk, ch, spill.get("f", ch.n)["h"], pos, layer_hook_specs(model, only, pos) + taps)
                ahead = ahead and out is not None and _keep(blk, ch, spill, seen, out, None)
                spill.put("mid", ch.n, {"r0": seen["r"][ch.query], "z0": seen["z"][ch.query]})
            share(spill, "mid", [ch.n for ch in chunks], total)

        def mid_rows():
            for n in range(total):
                d = spill.get("rows", n)
                m, k = (d if key == "rows" else spill.get(key, n)), keeps[n]
                yield m["r0"][k], m["z0"][k], d["rc"][k], d["zc"][k], d["w"][k] if "w" in d else None

        attn_out = not blk.parallel and cfg.placement == "attn_out" and cfg.vector
        if attn_out:  # the MLP input moves with the vector: its mean first
            s_delta = MatrixStats()
            for r_0, _, r_c, _, w in mid_rows():
                s_delta.add(r_c - r_0, None, None, w)
            v = s_delta.vector().to(r_0.dtype)
        stats = MatrixStats()
        for r_0, z_0, r_c, z_c, w in mid_rows():
            if blk.parallel:  # the MLP reads the block input: the vector never reaches it
                a, u = z_0, z_c - z_0
            else:
                a = blk.norm2(r_0 + v) if attn_out else z_0
                u = blk.norm2(r_c) - a
            stats.add(r_c - r_0, a, u, w)
        vm, kept = _vector_matrix(stats, cfg, f"block {i}")
        lp.vector, lp.matrix_a, lp.matrix_b = vm.vector, vm.matrix_a, vm.matrix_b
        energies.append(kept)
    if cfg.down and blk.mlp_out is not None:
        down = _fit_down(model, blk, chunks, total, spill, cfg, pos, lp, keeps, ridges["down"], ahead)
        lp.down_b, lp.down_a, rejoin = down
        return lp, rejoin
    return lp, False


def _mlp_tap(blk: Block, seen: dict[str, Tensor]) -> tuple[nn.Module, str, Callable]:
    """Record the MLP's hidden activations ``h`` (the output projection's input) and its output ``u``."""
    return (blk.mlp_out, "fwd", lambda m, a, out: seen.update(h=a[0], u=out))


def _keep(blk: Block, ch: _Chunk, spill, seen: dict[str, Tensor], out: Tensor, vector: Tensor | None) -> bool:
    """Keep a pass's mid-residual and MLP activations for :func:`_advance` if the block output rejoins from
    them exactly as the block computed it; whether it does."""
    again = _rejoin(blk, seen["r"], seen["u"], vector, ch.active).masked_fill(ch.padding, 0)
    if not torch.allclose(again, out, rtol=1e-5, atol=1e-5 * float(out.abs().max())):
        return False
    spill.put("adv", ch.n, {"r": seen["r"], "u": seen["u"], "h": seen["h"]})
    return True


def _rejoin(blk: Block, r: Tensor, u: Tensor, vector: Tensor | None, active: Tensor) -> Tensor:
    """The block output from its mid-residual ``r`` and its MLP output ``u`` (and a thought vector added after
    the block at the ``active`` positions), as a sequential block without a norm after the residual joins them."""
    y = r + blk.branch_scale * (u if blk.post_mlp_norm is None else blk.post_mlp_norm(u))
    return y if vector is None else y + vector.to(y) * active[..., None].to(y)


def _advance(blk: Block, ch: _Chunk, spill, lp: LayerPatch, cfg: CondenseConfig) -> Tensor:
    """A chunk's prompt-free states after block ``blk`` with its patch ``lp`` (scaled) installed, without
    running the block: the down map's pass kept its mid-residual, its MLP's hidden activations and output,
    and the down map acts on the output projection alone."""
    d = spill.get("adv", ch.n)
    u = d["u"] + ((d["h"] @ lp.down_a.to(d["h"])) @ lp.down_b.to(d["h"]).T) * ch.active[..., None].to(d["u"])
    return _rejoin(blk, d["r"], u, lp.vector if cfg.placement == "skip" else None, ch.active).masked_fill(ch.padding, 0)


def _fit_down(
    model, blk, chunks, total, spill, cfg, pos, lp: LayerPatch, keeps, chosen, ready: bool = False
) -> tuple[Tensor, Tensor, bool]:
    """Factors of ``G`` (d, I): the block output's remaining error as a linear map of the MLP's hidden
    activations ``h`` (the rest of the block's patch installed); and whether each chunk's pass rejoins from
    its mid-residual and MLP output exactly as the block does (then they are kept for :func:`_advance`).
    ``ready``: the pass before the vector's fit kept them already; the block is not run again.

    The error ``e`` is taken back to the output projection's output ``u``: divided by the branch's scale, and
    through a norm on the branch (``g u / rms(u)``) by its first-order inverse ``e rms(u) / g``, damped
    (``g / (g^2 + tau^2)`` for ``1 / g``, ``tau = NORM_DAMPING * median |g|``): a direction of small gain would
    need a large change of ``u`` to move the output, and such changes, fitted on some queries, upset the
    norm's scale on others (Gemma-3's gains span 0.01 to 1,600)."""
    scaled = lp.scaled(cfg.strength)
    only = Patch({blk.index: scaled}, cfg.placement, pos.skip)
    vector = scaled.vector if cfg.placement == "skip" else None
    rejoin = not blk.parallel
    seen: dict[str, Tensor] = {}
    post = blk.post_mlp_norm
    inverse = None
    if post is not None:  # the gain g inverted with damping: 1 / g where g is large, towards 0 where it is small
        g = post(torch.ones_like(next(post.parameters())))
        tau = NORM_DAMPING * g.abs().median()
        inverse = g / (g * g + tau * tau)
    for ch in chunks:
        if ready:  # the vector joins after the block: added to the kept pass's output
            seen = spill.get("adv", ch.n)
            out = _rejoin(blk, seen["r"], seen["u"], vector, ch.active).masked_fill(ch.padding, 0)
        else:
            specs = [*layer_hook_specs(model, only, pos), _mlp_tap(blk, seen), *(mid_taps(blk, seen) if rejoin else [])]
            out = _run_free(blk, ch, spill.get("f", ch.n)["h"], pos, specs)
            rejoin = rejoin and _keep(blk, ch, spill, seen, out, vector)
        k = keeps[ch.n]
        e = (spill.get("p", ch.n)["h"][ch.valid][k] - out[ch.query][k]) / blk.branch_scale
        if inverse is not None:
            e = e * seen["u"][ch.query][k].pow(2).mean(-1, keepdim=True).sqrt() * inverse
        w = ch.weights(cfg)
        spill.put("down", ch.n, {"h": seen["h"][ch.query][k], "e": e} | ({} if w is None else {"w": w[k]}))
    share(spill, "down", [ch.n for ch in chunks], total)
    folds = (MatrixStats(), MatrixStats())  # query chunks alternate between two folds (never tokens)
    for n in range(total):
        d = spill.get("down", n)
        folds[n % 2].add(None, d["h"], d["e"], d.get("w"))
    ridge = cfg.down_ridge
    if cfg.down_ridge_grid:  # one chunk alone: no second fold, the configured ridge
        cv = cv_ridge(folds, cfg.down_ridge_grid)
        ridge = ridge if cv is None else cv
        chosen.append(ridge)
    g, _ = (folds[0] + folds[1]).matrix(ridge, f"block {blk.index} down map", "--down-ridge")
    b, a, _ = truncate(g, cfg.down_rank)
    return b.float(), a.float(), rejoin
