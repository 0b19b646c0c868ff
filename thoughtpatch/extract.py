"""Exact token-dependent implicit updates (Dherin et al. 2025; DESIGN.md section 2).

For every query token ``t`` and block ``l``, with the prompted run's states fed to the prompt-free
attention::

    delta_t = r_c(t) - r_0(t)     the context effect on the mid-residual
    a_t     = z_0(t)              what the MLP reads without the prompt
    u_t     = z_c(t) - a_t        what it should read
    dW_t    = W u_t a_t^T / |a_t|^2   for every matrix W that reads z

Adding ``delta_t`` after the MLP and using ``W + dW_t`` reproduces the prompted block exactly.
The prompted and the prompt-free runs advance in lockstep, one block at a time: one prompted forward pass
plus one prompt-free pass whose query positions are overwritten with the prompted states.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .architectures import Architecture, architecture_for
from .distributed import gather_each, shard, world
from .engine import (
    Block,
    StopBlock,
    blocks,
    device_of,
    eos_ids,
    greedy,
    hooks,
    layer_calls,
    mid_taps,
    pad_right,
    prefix_cache,
    prefix_mask,
    prefix_view,
    run_block,
)
from .errors import require_finite
from .prompts import TokenPairs

__all__ = [
    "Updates",
    "Rows",
    "Tally",
    "extract",
    "extract_rows",
    "updates_from_rows",
    "check",
    "check_rows",
    "teacher_answers",
    "detect_sinks",
]


@dataclass
class Updates:
    """Exact implicit updates, one row per (query, token) over all queries, per block."""

    delta: list[Tensor]  # per block (N, d)
    a: list[Tensor]
    u: list[Tensor]
    sink: Tensor  # (L, N) bool: massive-activation positions, kept out of the statistics
    probe: Tensor  # (N,) which query each row belongs to
    position: Tensor  # (N,) index of the token within its query
    embed_delta: Tensor | None  # (N, d) prompted minus prompt-free first-block input, if they differ
    pairs: TokenPairs

    @property
    def n_layers(self) -> int:
        return len(self.delta)

    @property
    def n_tokens(self) -> int:
        return int(self.probe.numel())


def teacher_answers(model: nn.Module, tokenizer, pairs: TokenPairs, k: int, batch_size: int = 32) -> TokenPairs:
    """Append the prompted model's own greedy ``k``-token answers to every query (teacher forcing)."""
    if k <= 0:
        return pairs
    answers = greedy(model, pairs.prefix_prompted, pairs.queries, k, eos_ids(model, tokenizer), batch_size)
    return pairs.with_answers(answers)


def detect_sinks(norms: Tensor, factor: float) -> Tensor:
    """Positions whose residual norm exceeds ``factor`` times the median over all positions."""
    return norms > factor * norms.median()


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield list(range(start, min(n, start + size)))


def _query_view(x: Tensor, offset: int, width: int) -> Tensor:
    return x[:, offset : offset + width]


@dataclass
class Rows:
    """The exact updates of one batch of queries: rows ``start ..`` of the whole run's rows (queries in order)."""

    idx: list[int]  # the queries
    start: int
    delta: list[Tensor]  # per block (n, d)
    a: list[Tensor]
    u: list[Tensor]
    embed: Tensor | None  # (n, d); None when no query's first-block input differs between the runs
    norms: Tensor | None  # (4, L, n) float32: |r_c|, |r_0|, |delta|, |u| per block and token
    probe: Tensor
    position: Tensor

    def cpu(self) -> Rows:
        def move(x):
            return x.cpu() if isinstance(x, Tensor) else [t.cpu() for t in x] if isinstance(x, list) else x

        return Rows(**{k: move(v) if k != "idx" else v for k, v in vars(self).items()})


@torch.no_grad()
def extract_rows(
    model: nn.Module, pairs: TokenPairs, *, batch_size: int = 16, progress: Callable[[int], None] | None = None
) -> Iterator[Rows]:
    """The exact implicit updates of every query token of every block, one batch of queries at a time.

    Each prefix (with and without the prompt) is computed once and shared by all queries through a KV
    cache; per block, the prompted run advances the query states and the prompt-free attention reads the
    same states against the prompt-free prefix (its MLP is never run). Under ``torchrun`` each process runs
    its share of the batches and every process receives every batch (not in query order: see ``start``).
    """
    arch = architecture_for(model)
    blks = blocks(model, arch)
    device = device_of(model)
    cache_c, cache_0 = prefix_cache(model, pairs.prefix_prompted), prefix_cache(model, pairs.prefix_free)
    lc, l0 = len(pairs.prefix_prompted), len(pairs.prefix_free)
    starts = torch.tensor([0] + [len(q) for q in pairs.queries]).cumsum(0).tolist()
    batches = list(_batches(len(pairs.queries), batch_size))

    def calls(idx: list[int]):
        ids, valid = pad_right([pairs.queries[i] for i in idx], 0, device)
        valid = valid.bool()
        calls_c = layer_calls(model, arch, ids, prefix_mask(valid, lc), prefix_view(cache_c))
        return valid, calls_c, layer_calls(model, arch, ids, prefix_mask(valid, l0), prefix_view(cache_0))

    def embed_differs(idx: list[int]) -> bool:
        valid, calls_c, calls_0 = calls(idx)
        return bool((calls_c.hidden - calls_0.hidden)[valid].abs().max() > 0)

    embed = any(embed_differs(idx) for idx in batches)  # the file's layout depends on it: known before any rows

    def run(idx: list[int]) -> Rows:
        valid, calls_c, calls_0 = calls(idx)
        h = calls_c.hidden
        out: dict[str, list[Tensor]] = {k: [] for k in ("delta", "a", "u", "norms")}
        for blk in blks:
            tap_c, tap_0 = _Tap(blk), _Tap(blk, stop=True)
            with hooks(tap_0.specs), contextlib.suppress(StopBlock):  # prompt-free attention, prompted states
                run_block(blk, h, calls_0.calls[blk.index])
            with hooks(tap_c.specs):
                # padding never reaches real tokens, except as NaN (a fully masked row, e.g. beyond a
                # sliding window) times a zero attention weight: keep padded states at zero
                h = run_block(blk, h, calls_c.calls[blk.index]).masked_fill(~valid[..., None], 0)
            r_c, z_c, r_0, z_0 = (tap.seen[k][valid] for tap in (tap_c, tap_0) for k in ("r", "z"))
            require_finite(r_c - r_0 + z_c - z_0, f"block {blk.index} (extraction)")
            for key, val in (("delta", r_c - r_0), ("a", z_0), ("u", z_c - z_0)):
                out[key].append(val)
            out["norms"].append(torch.stack([x.norm(dim=-1).float() for x in (r_c, r_0, r_c - r_0, z_c - z_0)]))
        rows = Rows(
            idx, starts[idx[0]], out["delta"], out["a"], out["u"],
            (calls_c.hidden - calls_0.hidden)[valid] if embed else None,
            torch.stack(out["norms"], 1).cpu(),
            torch.cat([torch.full((len(pairs.queries[i]),), i) for i in idx]),
            torch.cat([torch.arange(len(pairs.queries[i])) for i in idx]),
        )  # fmt: skip
        if progress:
            progress(len(idx))
        return rows if world()[1] == 1 else rows.cpu()

    yield from gather_each((run(batches[k]) for k in shard(len(batches))), len(batches))


class Tally:
    """Per-token norms of every block, gathered from :class:`Rows` in any order (small: no rows kept)."""

    def __init__(self, pairs: TokenPairs):
        self.n = sum(len(q) for q in pairs.queries)
        self.norms: Tensor | None = None

    def add(self, rows: Rows) -> None:
        if self.norms is None:
            self.norms = torch.zeros((4, rows.norms.shape[1], self.n))
        self.norms[:, :, rows.start : rows.start + rows.norms.shape[-1]] = rows.norms

    def sink(self, factor: float = 10.0) -> Tensor:
        """(L, N) bool: massive-activation positions, in either run, kept out of the statistics."""
        return torch.stack([detect_sinks(rc, factor) | detect_sinks(r0, factor) for rc, r0 in self.norms[:2].unbind(1)])

    def mean(self, which: int, sink: Tensor) -> list[float]:
        """Mean |delta| (``which`` 2) or |u| (3) per block over the positions that are not sinks."""
        return [float(x[~s].mean()) for x, s in zip(self.norms[which], sink, strict=True)]


def updates_from_rows(parts: list[Rows], pairs: TokenPairs, sink: Tensor) -> Updates:
    """Every batch's rows joined, in query order, as :class:`Updates`."""
    parts = sorted(parts, key=lambda r: r.start)

    def cat(key: str, i: int | None = None) -> Tensor:
        return torch.cat([getattr(p, key) if i is None else getattr(p, key)[i] for p in parts])

    per_block = ([cat(k, i) for i in range(len(parts[0].delta))] for k in ("delta", "a", "u"))
    embed = cat("embed") if parts[0].embed is not None else None
    return Updates(*per_block, sink, cat("probe"), cat("position"), embed, pairs)


def extract(
    model: nn.Module,
    pairs: TokenPairs,
    *,
    batch_size: int = 16,
    sink_factor: float = 10.0,
    progress: Callable[[int], None] | None = None,
) -> Updates:
    """Exact implicit updates for every query token of every block, all in memory (see :func:`extract_rows`)."""
    parts, tally = [], Tally(pairs)
    for rows in extract_rows(model, pairs, batch_size=batch_size, progress=progress):
        tally.add(rows)
        parts.append(rows)
    return updates_from_rows(parts, pairs, tally.sink(sink_factor))


class _Tap:
    """Records the mid-residual ``r`` and the MLP input ``z`` of one block."""

    def __init__(self, blk: Block, stop: bool = False):
        self.seen: dict[str, Tensor] = {}
        self.specs = mid_taps(blk, self.seen, stop)


@torch.no_grad()
def check(model: nn.Module, updates: Updates, *, batch_size: int = 16, routing: dict | None = None) -> float:
    """Run the prompt-free model with the exact token-dependent updates installed.

    Returns the max absolute logit difference to the prompted model over all query tokens. For a mixture
    of experts, ``routing`` (a dict) receives how many (token, block) expert choices there were and how many
    of them differ from the prompted model's.
    """
    worst = 0.0
    for idx in _batches(len(updates.pairs.queries), batch_size):
        sel = torch.isin(updates.probe, torch.tensor(idx))
        embed = None if updates.embed_delta is None else updates.embed_delta[sel]
        rows = Rows(
            idx, 0, *([t[sel] for t in ts] for ts in (updates.delta, updates.a, updates.u)), embed, None,
            updates.probe[sel], updates.position[sel],
        )  # fmt: skip
        worst = max(worst, check_rows(model, updates.pairs, rows, routing))
    return worst


@torch.no_grad()
def check_rows(model: nn.Module, pairs: TokenPairs, rows: Rows, routing: dict | None = None) -> float:
    """:func:`check` for one batch of queries' rows (``inf`` for NaN: never a match)."""
    arch: Architecture = architecture_for(model)
    blks = blocks(model, arch)
    device = device_of(model)
    lc, l0 = len(pairs.prefix_prompted), len(pairs.prefix_free)
    idx = rows.idx
    ids_c, mask_c = pad_right([pairs.prompted(i) for i in idx], 0, device)
    ids_0, mask_0 = pad_right([pairs.free(i) for i in idx], 0, device)
    width = max(len(pairs.queries[i]) for i in idx)
    grid = _Grid(rows.probe, rows.position, idx, width, device)
    specs = []
    if rows.embed is not None:
        specs.append((blks[0].layer, "pre", _pre_add(grid.scatter(rows.embed), l0, width)))
    for blk in blks:
        delta, a, u = (grid.scatter(t[blk.index]) for t in (rows.delta, rows.a, rows.u))
        for w in blk.mlp_inputs:
            specs.append((w, "pre", _rank_one(a, u, l0, width)))
        specs.append((blk.layer, "fwd", _add(delta, l0, width)))
    routes_0, routes_c = _Routes(blks, model.config), _Routes(blks, model.config)
    with hooks(specs + routes_0.specs + [(blk.layer, "fwd", _zero_padding(mask_0)) for blk in blks]):
        logits_0 = model(input_ids=ids_0, attention_mask=mask_0).logits
    with hooks(routes_c.specs + [(blk.layer, "fwd", _zero_padding(mask_c)) for blk in blks]):
        logits_c = model(input_ids=ids_c, attention_mask=mask_c).logits
    diff = (_query_view(logits_0, l0, width) - _query_view(logits_c, lc, width))[grid.valid]
    err = float(diff.abs().max())
    if routing is not None and routes_0.seen:
        b = len(idx)
        for r0, rc in zip(routes_0.seen, routes_c.seen, strict=True):
            r0, rc = (_query_view(r.view(b, -1, r.shape[-1]), n, width)[grid.valid] for r, n in ((r0, l0), (rc, lc)))
            routing["choices"] = routing.get("choices", 0) + r0.shape[0]
            routing["differ"] = routing.get("differ", 0) + int((r0 != rc).any(-1).sum())
    return math.inf if math.isnan(err) else err


class _Routes:
    """Records each router's top-k expert choice (sorted expert ids per token), block by block."""

    def __init__(self, blks: list[Block], config):
        self.seen: list[Tensor] = []
        k = getattr(config, "num_experts_per_tok", 1)

        def grab(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            self.seen.append(logits.topk(k, -1).indices.sort(-1).values)

        self.specs = [(blk.router, "fwd", grab) for blk in blks if blk.router is not None]


class _Grid:
    """Scatter flat (N, d) rows back to (B, width, d) at their (query, position)."""

    def __init__(self, probe: Tensor, position: Tensor, idx: list[int], width: int, device):
        row_of = {q: j for j, q in enumerate(idx)}
        self.rows = torch.tensor([row_of[int(p)] for p in probe], dtype=torch.long)
        self.cols = position.long()
        self.shape = (len(idx), width)
        self.valid = torch.zeros(self.shape, dtype=torch.bool)
        self.valid[self.rows, self.cols] = True
        self.valid = self.valid.to(device)
        self.device = device

    def scatter(self, flat: Tensor) -> Tensor:
        out = torch.zeros((*self.shape, flat.shape[-1]), dtype=flat.dtype)
        out[self.rows, self.cols] = flat.cpu()
        return out.to(self.device)


def _zero_padding(mask: Tensor):
    """Keep padded positions at zero after a block (a fully masked row would be NaN and leak through V)."""
    pad = ~mask.bool()[..., None]

    def fn(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.masked_fill(pad, 0)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return fn


def _pre_add(extra: Tensor, offset: int, width: int):
    def fn(module, args):
        h = args[0].clone()
        h[:, offset : offset + width] += extra.to(h.dtype)
        return (h, *args[1:])

    return fn


def _add(extra: Tensor, offset: int, width: int):
    def fn(module, args, output):
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[:, offset : offset + width] += extra.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return fn


def _rank_one(a: Tensor, u: Tensor, offset: int, width: int):
    """``W + dW_t`` with ``dW_t = W u_t a_t^T / |a_t|^2`` for every matrix ``W`` inside a module that reads z.

    The module's input ``x`` at token ``t`` becomes ``x + u_t (a_t . x) / |a_t|^2``: then each of its linear
    maps (a projection, a router, every expert) computes ``(W + dW_t) x``. Inputs flattened to
    (tokens, d), as mixtures of experts do, are viewed as (B, T, d).
    """
    norm2 = (a * a).sum(-1, keepdim=True)
    inv = torch.where(norm2 > 0, 1.0 / norm2.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(norm2))

    def fn(module, args):
        flat = args[0]
        x = (flat.view(a.shape[0], -1, flat.shape[-1]) if flat.dim() == 2 else flat).clone()
        q = x[:, offset : offset + width]
        q += ((q * a).sum(-1, keepdim=True) * inv) * u
        return (x.view(flat.shape), *args[1:])

    return fn
