"""The jobs behind the subcommands, as plain functions: inputs in, results and provenance out.

The CLI parses arguments, calls one of these and prints; the Python API can call them the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .extract import Updates, check, extract, teacher_answers
from .formats import fingerprint
from .models import LoadedModel
from .prompts import Prompt, align, sha256_text

__all__ = ["ExtractResult", "run_extract", "provenance"]


def provenance(lm: LoadedModel, prompt: Prompt, queries: list[str], store_prompt: bool = True) -> dict[str, str]:
    """Metadata that says which model, prompt and probes a file came from."""
    meta = {
        "base_model": lm.model_id,
        "base_model_revision": lm.revision or "",
        "fingerprint": json.dumps(fingerprint(lm.model.config), sort_keys=True),
        "prompt_sha256": prompt.sha256,
        "probes_sha256": sha256_text("\n".join(queries)),
        "compute_dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
    }
    if store_prompt:
        meta["prompt"] = prompt.canonical()
    return meta


@dataclass
class ExtractResult:
    updates: Updates
    meta: dict[str, str]
    max_logit_error: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        up = self.updates
        keep = ~up.sink
        return {
            "layers": up.n_layers,
            "tokens": up.n_tokens,
            "queries": len(up.pairs.queries),
            "answer_tokens": int(self.meta.get("answer_tokens", 0)),
            "sink_positions": int(up.sink.any(0).sum()),
            "prompt_tokens": len(up.pairs.prefix_prompted),
            "prompt_free_prefix_tokens": len(up.pairs.prefix_free),
            "max_logit_error": self.max_logit_error,
            "mean_delta_norm": [round(float(d[k].norm(dim=-1).mean()), 4) for d, k in zip(up.delta, keep, strict=True)],
            "mean_u_norm": [round(float(u[k].norm(dim=-1).mean()), 4) for u, k in zip(up.u, keep, strict=True)],
            "prompt_sha256": self.meta["prompt_sha256"],
            "probes_sha256": self.meta["probes_sha256"],
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
    log: Callable[[str], None] = lambda s: None,
    progress: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Align the runs, teacher-force the prompted answers, extract the exact updates (and check them)."""
    seconds = {}
    t = time.perf_counter()
    pairs = align(lm.tokenizer, prompt, queries, chat)
    log(
        f"{len(queries)} queries; prompt {len(pairs.prefix_prompted)} tokens, prompt-free prefix {len(pairs.prefix_free)}"
    )
    pairs = teacher_answers(lm.model, lm.tokenizer, pairs, answer_tokens, batch_size=max(batch_size, 32))
    seconds["answers"] = time.perf_counter() - t
    t = time.perf_counter()
    updates = extract(lm.model, pairs, batch_size=batch_size, progress=progress)
    seconds["extract"] = time.perf_counter() - t
    meta = provenance(lm, prompt, queries, store_prompt) | {"answer_tokens": str(answer_tokens)}
    result = ExtractResult(updates, meta, seconds=seconds)
    if do_check:
        t = time.perf_counter()
        with torch.no_grad():
            result.max_logit_error = check(lm.model, updates, batch_size=batch_size)
        seconds["check"] = time.perf_counter() - t
    return result
