"""Fidelity: does the patched model without the prompt answer as the base model with it? (DESIGN.md section 5)

For held-out queries the target is the base model WITH the prompt, greedy, K tokens. ``[query ; target]`` is
teacher-forced through each method's model WITHOUT the prompt, and at the K answer positions we report the
mean KL(p_prompted || p_method), top-1 agreement with the target token, and the share of queries whose
greedy K-token answer equals the target exactly (all K teacher-forced argmaxes agree; greedy decoding then
follows the same path).

Baselines: ``none`` (the unpatched model) and ``caa``: a contrastive activation addition vector, the mean
difference of the residual stream with and without the prompt at one block, added at every position after
the shared leading tokens, its block and multiplier picked on the fit queries.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .apply import installed
from .architectures import architecture_for
from .engine import (
    blocks,
    cache_kwarg,
    device_of,
    eos_ids,
    greedy,
    hooks,
    pad_after_prefix,
    pad_right,
    prefix_cache,
    prefix_mask,
    prefix_view,
)
from .patch import LayerPatch, Patch
from .prompts import TokenPairs

__all__ = ["Scores", "answer_logprobs", "score", "caa_patch", "tune_caa", "targets_for"]


@dataclass
class Scores:
    kl: float
    top1: float
    exact: float
    queries: int
    positions: int
    kl_per_query: list[float]

    def brief(self) -> dict[str, float]:
        return {"kl": self.kl, "top1": self.top1, "exact": self.exact}

    def as_dict(self) -> dict:
        return asdict(self)


def targets_for(model: nn.Module, tokenizer, pairs: TokenPairs, k: int, batch_size: int = 32) -> TokenPairs:
    """The prompted model's greedy K-token answers appended to each query (``answer_start`` marks them)."""
    answers = greedy(model, pairs.prefix_prompted, pairs.queries, k, eos_ids(model, tokenizer), batch_size)
    return pairs.with_answers(answers)


@torch.no_grad()
def answer_logprobs(model: nn.Module, prefix: list[int], pairs: TokenPairs, batch_size: int = 16) -> list[Tensor]:
    """Per query, log-probabilities (A, V) at the positions that predict its answer tokens.

    The prefix is computed once (under whatever patch is installed) and shared through a KV cache.
    """
    device = device_of(model)
    cache = prefix_cache(model, prefix)
    kw = cache_kwarg(model)
    out: list[Tensor] = []
    for start in range(0, len(pairs.queries), batch_size):
        idx = range(start, min(len(pairs.queries), start + batch_size))
        ids, mask, pos = pad_after_prefix([pairs.queries[i] for i in idx], len(prefix), device)
        n_answer = [len(pairs.queries[i]) - pairs.answer_start[i] for i in idx]
        keep = max(n_answer) + 1  # all rows end together: only the last columns hold answer positions
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=keep,
            **{kw: prefix_view(cache)},
        ).logits
        for j, n in enumerate(n_answer):
            out.append(F.log_softmax(logits[j, keep - n - 1 : keep - 1].float(), -1))
    return out


def score(reference: list[Tensor], method: list[Tensor], pairs: TokenPairs) -> Scores:
    """KL(reference || method), top-1 agreement with the target tokens and exact answers."""
    kls, agree, exact, total = [], 0, 0, 0
    for i, (p, q) in enumerate(zip(reference, method, strict=True)):
        target = torch.tensor(pairs.queries[i][pairs.answer_start[i] :], device=q.device)
        kl = (p.exp() * (p - q)).sum(-1)
        hits = q.argmax(-1) == target
        kls.append(float(kl.mean()))
        agree += int(hits.sum())
        exact += int(bool(hits.all()))
        total += len(target)
    n = len(reference)
    return Scores(sum(kls) / n, agree / total, exact / n, n, total, kls)


def caa_patch(vector: Tensor, layer: int, multiplier: float, skip: int) -> Patch:
    """A CAA steering vector as a patch: added to the residual stream after block ``layer``."""
    return Patch({layer: LayerPatch(vector=vector * multiplier)}, "skip", skip, {"method.construction": "caa"})


@torch.no_grad()
def residual_differences(model: nn.Module, pairs: TokenPairs, batch_size: int = 16) -> Tensor:
    """(L, d): mean over query tokens of the residual stream after each block, with minus without prompt."""
    blks = blocks(model, architecture_for(model))
    sums = None
    n = 0
    for prefix, sign in ((pairs.prefix_prompted, 1.0), (pairs.prefix_free, -1.0)):
        cache = prefix_cache(model, prefix)
        device = device_of(model)
        for start in range(0, len(pairs.queries), batch_size):
            idx = range(start, min(len(pairs.queries), start + batch_size))
            ids, valid = pad_right([pairs.queries[i] for i in idx], 0, device)
            mask = prefix_mask(valid, len(prefix))
            outs: list[Tensor] = []

            def grab(m, a, o, rows=valid.bool(), outs=outs):
                outs.append((o[0] if isinstance(o, tuple) else o)[rows].double().sum(0))

            with hooks([(b.layer, "fwd", grab) for b in blks]):
                model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): prefix_view(cache)})
            s = torch.stack(outs) * sign
            sums = s if sums is None else sums + s
            if sign > 0:
                n += int(valid.sum())
    return (sums / n).float()


def _subset(pairs: TokenPairs, n: int) -> TokenPairs:
    return TokenPairs(
        pairs.prefix_prompted, pairs.prefix_free, pairs.queries[:n], pairs.n_lead, pairs.chat, pairs.answer_start[:n]
    )


@torch.no_grad()
def tune_caa(
    model: nn.Module,
    fit: TokenPairs,
    layers: list[int] | None = None,
    multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0),
    batch_size: int = 16,
    tune_queries: int = 16,
) -> tuple[Patch, dict]:
    """Pick the CAA block and multiplier by mean KL on the fit queries (with their prompted answers)."""
    n_layers = model.config.num_hidden_layers
    layers = layers or sorted({round(x * (n_layers - 1) / 5) for x in range(6)})
    diffs = residual_differences(model, fit, batch_size)
    fit = _subset(fit, tune_queries)  # the grid is scored on a few fit queries: 2 numbers to pick
    reference = answer_logprobs(model, fit.prefix_prompted, fit, batch_size)
    best = None
    for layer in layers:
        for mult in multipliers:
            patch = caa_patch(diffs[layer], layer, mult, fit.n_lead)
            with installed(model, patch):
                kl = score(reference, answer_logprobs(model, fit.prefix_free, fit, batch_size), fit).kl
            if best is None or kl < best[0]:
                best = (kl, layer, mult, patch)
    kl, layer, mult, patch = best
    return patch, {"layer": layer, "multiplier": mult, "fit_kl": kl}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    held_out: TokenPairs,
    methods: dict[str, Patch | None],
    batch_size: int = 16,
) -> dict[str, dict]:
    """Scores of each method (``None``: no patch) on held-out queries that already carry their targets."""
    reference = answer_logprobs(model, held_out.prefix_prompted, held_out, batch_size)
    results = {}
    for name, patch in methods.items():
        t = time.perf_counter()
        if patch is None:
            got = answer_logprobs(model, held_out.prefix_free, held_out, batch_size)
        else:
            with installed(model, patch):
                got = answer_logprobs(model, held_out.prefix_free, held_out, batch_size)
        s = score(reference, got, held_out)
        results[name] = s.brief() | {
            "kl_per_query": s.kl_per_query,
            "positions": s.positions,
            "parameters": 0 if patch is None else patch.numel(),
            "eval_seconds": time.perf_counter() - t,
        }
    return results
