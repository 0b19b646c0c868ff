"""The jobs behind the subcommands, as plain functions: inputs in, results and provenance out.

The CLI parses arguments, calls one of these and prints; the Python API can call them the same way.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .distributed import is_main
from .errors import UsageError
from .extract import Tally, Updates, check_rows, extract_rows, teacher_answers, updates_from_rows
from .formats import UpdatesWriter, check_tokenizer, fingerprint, tokenizer_sha256
from .models import LoadedModel
from .prompts import Prompt, TokenPairs, align, default_probes, sha256_text

__all__ = [
    "ExtractResult",
    "run_extract",
    "run_transmute",
    "run_condense",
    "run_eval",
    "run_generate",
    "run_model_diff",
    "provenance",
    "fit_pairs",
    "similar_queries",
    "check_context",
]


def check_context(lm: LoadedModel, pairs: TokenPairs, answer_tokens: int) -> None:
    """Refuse, before any work, sequences longer than the model's context window."""
    window = getattr(lm.model.config, "max_position_embeddings", None)
    longest = max(len(q) for q in pairs.queries)
    need = len(pairs.prefix_prompted) + longest + answer_tokens
    if window and need > window:
        raise UsageError(
            f"the prompt ({len(pairs.prefix_prompted)} tokens), the longest query ({longest}) and the answer tokens "
            f"({answer_tokens}) need {need} positions, but the model's context window is {window}; shorten them"
        )


def provenance(lm: LoadedModel, prompt: Prompt, queries: list[str], store_prompt: bool = True) -> dict[str, str]:
    """Metadata that says which model, prompt and probes a file came from."""
    meta = {
        "base_model": lm.model_id,
        "base_model_revision": lm.revision or "",
        "fingerprint": json.dumps(fingerprint(lm.model.config), sort_keys=True),
        "tokenizer_sha256": tokenizer_sha256(lm.tokenizer),
        "prompt_sha256": prompt.sha256,
        "probes_sha256": sha256_text("\n".join(queries)),
        "compute_dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
    }
    if store_prompt:
        meta["prompt"] = prompt.canonical()
    return meta


@dataclass
class ExtractResult:
    updates: Updates | None  # None when written to a file as they came
    meta: dict[str, str]
    pairs: TokenPairs
    tally: Tally
    sink: torch.Tensor
    max_logit_error: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    routing: dict[str, int] = field(default_factory=dict)  # mixture of experts: expert choices checked, differing

    def summary(self) -> dict[str, object]:
        return {
            "layers": int(self.sink.shape[0]),
            "tokens": int(self.sink.shape[1]),
            "queries": len(self.pairs.queries),
            "answer_tokens": int(self.meta.get("answer_tokens", 0)),
            "sink_positions": int(self.sink.any(0).sum()),
            "prompt_tokens": len(self.pairs.prefix_prompted),
            "prompt_free_prefix_tokens": len(self.pairs.prefix_free),
            "max_logit_error": self.max_logit_error,
            **({"expert_choices": self.routing} if self.routing else {}),
            "mean_delta_norm": [round(x, 4) for x in self.tally.mean(2, self.sink)],
            "mean_u_norm": [round(x, 4) for x in self.tally.mean(3, self.sink)],
            "prompt_sha256": self.meta["prompt_sha256"],
            "probes_sha256": self.meta["probes_sha256"],
            **({"probes_similar": int(self.meta["probes_similar"])} if "probes_similar" in self.meta else {}),
            "base_model": self.meta["base_model"],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def run_extract(
    lm: LoadedModel,
    prompt: Prompt,
    queries: list[str],
    *,
    answer_tokens: int = 8,
    chat: bool | None = None,
    do_check: bool = False,
    batch_size: int = 16,
    store_prompt: bool = True,
    output: str | None = None,
    similar: int = 0,
    log: Callable[[str], None] = lambda s: None,
    progress: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Align the runs, teacher-force the prompted answers, extract the exact updates (and check them).

    ``similar`` adds that many model-written queries like ``queries`` (:func:`similar_queries`), as
    :func:`run_transmute` does; the metadata records how many.

    With ``output`` (a path, ``-`` for stdout; under ``torchrun`` rank 0 writes it) the updates go to that file
    batch by batch and are not kept: memory holds one batch of them whatever the number of probes; without,
    they come back in the result.
    """
    more, seconds = _write_similar(lm, queries, similar, prompt, log)
    t = time.perf_counter()
    pairs = align(lm.tokenizer, prompt, queries + more, chat)
    check_context(lm, pairs, answer_tokens)
    log(
        f"{len(queries)} queries; prompt {len(pairs.prefix_prompted)} tokens, prompt-free prefix {len(pairs.prefix_free)}"
    )
    pairs = teacher_answers(lm.model, lm.tokenizer, pairs, answer_tokens, batch_size=max(batch_size, 32))
    seconds["answers"] = time.perf_counter() - t
    t, checking = time.perf_counter(), 0.0
    meta = provenance(lm, prompt, queries, store_prompt) | {"answer_tokens": str(answer_tokens)} | _similar_meta(more)
    tally, kept, worst, routing = Tally(pairs), [], 0.0, {}
    with UpdatesWriter(output, pairs, meta) if output and is_main() else contextlib.nullcontext() as writer:
        for rows in extract_rows(lm.model, pairs, batch_size=batch_size, progress=progress):
            tally.add(rows)
            if do_check:
                c = time.perf_counter()
                worst = max(worst, check_rows(lm.model, pairs, rows, routing))
                checking += time.perf_counter() - c
            if writer:
                writer.add(rows)
            elif not output:
                kept.append(rows)
        sink = tally.sink()
        if writer:
            writer.finish(sink)
    seconds["extract"] = time.perf_counter() - t - checking
    if do_check:
        seconds["check"] = checking
    updates = updates_from_rows(kept, pairs, sink) if kept else None
    return ExtractResult(updates, meta, pairs, tally, sink, worst if do_check else None, seconds, routing)


# ------------------------------------------------------------------------------------------ condensation
def _patch_meta(patch, lm: LoadedModel, provenance_meta: dict[str, str], n_tokens: int, seconds: float) -> None:
    patch.meta.update(provenance_meta)
    patch.meta.update(
        {
            "probe_tokens": str(n_tokens),
            "base_model": lm.model_id,
            "base_model_revision": lm.revision or "",
            "fingerprint": json.dumps(fingerprint(lm.model.config), sort_keys=True),
            "model_parameters": str(sum(p.numel() for p in lm.model.parameters())),
        }
    )
    del seconds  # build time is reported, never stored: same inputs give the same bytes


def fit_pairs(
    lm: LoadedModel,
    prompt: Prompt,
    queries: list[str],
    answer_tokens: int,
    chat: bool | None,
    batch_size: int,
    samples: int = 0,
    temperature: float = 1.0,
) -> TokenPairs:
    """Aligned fit queries carrying the prompted model's own answers (teacher-forced).

    ``samples`` adds that many sampled answers per query (more answer positions along the trajectories the
    prompted model would take), each as an extra row of probes.
    """
    from .engine import eos_ids, greedy

    pairs = align(lm.tokenizer, prompt, queries, chat)
    check_context(lm, pairs, answer_tokens)
    out = teacher_answers(lm.model, lm.tokenizer, pairs, answer_tokens, batch_size=max(batch_size, 32))
    eos = eos_ids(lm.model, lm.tokenizer)
    for s in range(samples):
        answers = greedy(
            lm.model, pairs.prefix_prompted, pairs.queries, answer_tokens, eos, 32, temperature, seed=s + 1
        )
        more = pairs.with_answers(answers)
        out = TokenPairs(
            out.prefix_prompted, out.prefix_free, out.queries + more.queries, out.n_lead, out.chat,
            out.answer_start + more.answer_start,
        )  # fmt: skip
    return out


def similar_queries(
    lm: LoadedModel, queries: list[str], n: int, context: str = "", shots: int = 8, per: int = 8, seed: int = 0
) -> list[str]:
    """Up to ``n`` new queries like ``queries``, written by the model itself: after ``context`` (e.g. the
    prompt's text, so that it may ask about what the prompt holds) it continues a list of ``shots`` of them,
    drawn at random, by a sampled line (``per`` lines for each list). Copies and repeats are dropped.

    More task-like fit queries are what a patch that cannot read the prompt needs to generalise.
    """
    import random

    from .engine import eos_ids, greedy

    tok = lm.tokenizer
    stop = {i for i, t in enumerate(tok.batch_decode([[i] for i in range(len(tok))])) if "\n" in t}
    stop |= eos_ids(lm.model, tok)
    head = "Example messages that users send, one per line:\n"
    window = getattr(lm.model.config, "max_position_embeddings", None) or 1 << 30
    if context.strip() and len(tok(context, add_special_tokens=False)["input_ids"]) + 512 <= window:
        head = context.strip() + "\n\n" + head  # the context only where it leaves room for the list
    rng, seen, out = random.Random(seed), set(queries), []
    for c in range(3 * -(-n // per)):  # each list continued ``per`` times; stop once ``n`` are found
        picked = rng.sample(queries, min(shots, len(queries)))
        ids = tok(head + "\n".join(picked) + "\n", add_special_tokens=False)["input_ids"]
        for new in greedy(lm.model, ids[:-1], [ids[-1:]] * per, 48, stop, per, 0.9, seed=seed + c):
            line = tok.decode(new, skip_special_tokens=True).split("\n")[0].strip()
            if line and line not in seen and len(out) < n:
                seen.add(line)
                out.append(line)
        if len(out) >= n:
            break
    return out


def _write_similar(lm: LoadedModel, queries: list[str], n: int, prompt: Prompt, log) -> tuple[list[str], dict]:
    """``n`` written queries (:func:`similar_queries`, the prompt as context), logged, with the seconds it took
    (``{}`` when none are asked for)."""
    if not n:
        return [], {}
    t = time.perf_counter()
    more = similar_queries(lm, queries, n, prompt.as_text())
    if more:
        log(f"{len(more)} similar queries written, e.g. {more[0]!r}")
    return more, {"similar": time.perf_counter() - t}


def _similar_meta(more: list[str]) -> dict[str, str]:
    """What the metadata records of the written queries (their text only by hash, like the probes)."""
    return {"probes_similar": str(len(more)), "probes_similar_sha256": sha256_text("\n".join(more))} if more else {}


def run_transmute(
    lm: LoadedModel,
    prompt: Prompt,
    queries: list[str],
    cfg,
    *,
    answer_tokens: int = 16,  # constants.FIT_ANSWER_TOKENS
    chat: bool | None = None,
    store_prompt: bool = True,
    similar: int = 0,
    log: Callable[[str], None] = lambda s: None,
    progress: Callable[[int], None] | None = None,
):
    """Extract and condense in one step: prompt in, patch out (with the seconds each stage took).

    ``similar`` adds that many model-written queries like ``queries`` (:func:`similar_queries`, the prompt as
    context) to the fit set; the metadata records how many."""
    from .condense import condense

    t0 = time.perf_counter()
    more, seconds = _write_similar(lm, queries, similar, prompt, log)
    t_similar = seconds.get("similar", 0.0)
    pairs = fit_pairs(lm, prompt, queries + more, answer_tokens, chat, cfg.batch_size)
    t1 = time.perf_counter()
    log(
        f"{len(pairs.queries)} probes, {sum(len(q) for q in pairs.queries)} query tokens; condensing {cfg.construction}"
    )
    patch = condense(lm.model, pairs, cfg, progress=progress)
    t2 = time.perf_counter()
    meta = provenance(lm, prompt, queries, store_prompt) | {"answer_tokens": str(answer_tokens)} | _similar_meta(more)
    _patch_meta(patch, lm, meta, sum(len(q) for q in pairs.queries), t2 - t0)
    return patch, seconds | {"answers": t1 - t0 - t_similar, "condense": t2 - t1, "total": t2 - t0}


# What a patch condensed from an updates file carries over from that file's metadata.
_CARRIED = (
    *("prompt_sha256", "prompt", "probes_sha256", "probes_similar", "probes_similar_sha256"),
    *("answer_tokens", "compute_dtype", "tokenizer_sha256"),
)


def run_condense(lm: LoadedModel, updates: Updates | TokenPairs, umeta: dict[str, str], cfg, progress=None):
    """Condense an updates file: parallel from its statistics, sequential by re-running the model (which
    needs only its token pairs: ``updates`` may be just those)."""
    from .condense import condense, condense_updates

    pairs = updates.pairs if isinstance(updates, Updates) else updates
    check_tokenizer(umeta, lm.tokenizer, "the updates file")
    check_context(lm, pairs, 0)
    t0 = time.perf_counter()
    if cfg.construction == "parallel":
        if not isinstance(updates, Updates):
            raise TypeError("the parallel construction condenses the updates themselves, not only their token pairs")
        patch = condense_updates(updates, cfg)
    else:
        patch = condense(lm.model, pairs, cfg, progress=progress)
    keep = {k: v for k, v in umeta.items() if k in _CARRIED}
    _patch_meta(patch, lm, keep, sum(len(q) for q in pairs.queries), time.perf_counter() - t0)
    return patch, {"condense": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ evaluation
def run_eval(
    lm: LoadedModel,
    prompt: Prompt,
    queries: list[str],
    patches: dict[str, object],
    *,
    fit_queries: list[str] | None = None,
    answer_tokens: int = 8,
    chat: bool | None = None,
    caa: bool = True,
    batch_size: int = 16,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Fidelity of each patch on held-out queries, beside the ``none`` and tuned ``caa`` baselines."""
    from .evaluate import evaluate, targets_for, tune_caa

    t = time.perf_counter()
    held_pairs = align(lm.tokenizer, prompt, queries, chat)
    check_context(lm, held_pairs, answer_tokens)
    held = targets_for(lm.model, lm.tokenizer, held_pairs, answer_tokens, max(batch_size, 32))
    methods: dict[str, object] = dict(patches) | {"none": None}
    report: dict = {"queries": len(queries), "answer_tokens": answer_tokens, "prompt_sha256": prompt.sha256}
    if caa:
        fit_q = fit_queries if fit_queries is not None else default_probes()
        fit = fit_pairs(lm, prompt, fit_q, answer_tokens, chat, batch_size)
        log(f"tuning the CAA baseline on {len(fit_q)} fit queries")
        methods["caa"], report["caa"] = tune_caa(lm.model, fit, batch_size=batch_size)
    log(f"scoring {len(methods)} methods on {len(queries)} held-out queries")
    report["methods"] = evaluate(lm.model, held, methods, batch_size)
    report["seconds"] = time.perf_counter() - t
    return report


def run_generate(
    lm: LoadedModel,
    patch,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    scale: float = 1.0,
    chat: bool | None = None,
) -> list[str]:
    """Greedy answers to user messages with the patch installed (no prompt: the template's default)."""
    from .apply import installed
    from .engine import eos_ids, greedy
    from .prompts import free_ids

    ids = [free_ids(lm.tokenizer, p, chat) for p in prompts]
    with installed(lm.model, patch, scale=scale):
        out = greedy(lm.model, [], ids, max_new_tokens, eos_ids(lm.model, lm.tokenizer))
    return [lm.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


def run_model_diff(base: LoadedModel, changed: LoadedModel, rank: int | None = None):
    """Diff two model folders; the low-rank patch of the MLP-input changes carries the base's provenance."""
    from .compare import diff_models

    report, patch = diff_models(base.model, changed.model, rank)
    _patch_meta(patch, base, {"changed_model": changed.model_id}, 0, 0.0)
    del patch.meta["probe_tokens"]
    return {"base": base.model_id, "changed": changed.model_id, **report}, patch
