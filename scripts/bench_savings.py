"""What a patch saves: per-query latency and FLOPs of the patched model WITHOUT the prompt next to the base
model WITH a long prompt, with and without reusing a KV cache of the prompt.

All sides run in one process, interleaved, medians over repeats. Each query is answered greedily (batch 1,
a fixed number of new tokens, no early stop). FLOPs are analytic: 2 x (non-embedding parameters + the
patch's numbers) per token for the weights, plus 4 x layers x width x context per token for attention.

python scripts/bench_savings.py [--prompt-tokens 1000] [--queries 8] [--new-tokens 16] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from thoughtpatch import load_model
from thoughtpatch.apply import installed
from thoughtpatch.constants import PRESETS
from thoughtpatch.engine import greedy, prefix_cache
from thoughtpatch.pipeline import run_transmute
from thoughtpatch.prompts import Prompt, align

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "benchmarks" / "tasks" / "long_facts_company"


def long_prompt(tokenizer, tokens: int) -> Prompt:
    """The fact sheet, repeated until it is about ``tokens`` long."""
    sheet = (TASK / "prompt.txt").read_text().strip()
    body = sheet
    while len(tokenizer(body)["input_ids"]) < tokens:
        body += "\n\n(repeated for reference)\n" + sheet
    ids = tokenizer(body)["input_ids"][:tokens]
    return Prompt(system=tokenizer.decode(ids))


def flops_per_query(cfg, nonembed: int, patch_numbers: int, context: int, query: int, new: int) -> float:
    """Forward FLOPs of ``context`` prompt tokens (0 when cached), ``query`` tokens and ``new`` decoded tokens."""
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    tokens = context + query + new
    weights = 2 * (nonembed + patch_numbers) * tokens
    attention = sum(4 * layers * d * (t + 1) for t in range(tokens))  # token t attends to t+1 positions
    return float(weights + attention)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--fit-probes", type=int, default=32)
    ap.add_argument("--mode", default="best")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    prompt = long_prompt(tok, args.prompt_tokens)
    fit = (TASK / "fit.txt").read_text().splitlines()[: args.fit_probes]
    held = (TASK / "heldout.txt").read_text().splitlines()[: args.queries]
    t = time.perf_counter()
    patch, _ = run_transmute(lm, prompt, fit, PRESETS[args.mode])
    build_s = time.perf_counter() - t
    pairs = align(tok, prompt, held)
    with_prompt = [pairs.prompted(i) for i in range(len(held))]
    without = [pairs.free(i) for i in range(len(held))]
    n = args.new_tokens

    def each(prefix, seqs):
        for s in seqs:
            greedy(model, prefix, [s], n, set(), batch_size=1)

    def cached():  # the prompt's KV cache is built once and shared by every query (its build timed apart)
        greedy(model, pairs.prefix_prompted, pairs.queries, n, set(), batch_size=1)

    def patched():
        with installed(model, patch):
            each([], without)

    runs = {
        "base_with_prompt": lambda: each([], with_prompt),
        "base_with_prompt_kv_reuse": cached,
        "patched_without_prompt": patched,
        "base_without_prompt": lambda: each([], without),
        "prompt_kv_cache_build": lambda: prefix_cache(model, pairs.prefix_prompted),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    each([], without[:1])  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    q = len(held)
    per_query = {k: statistics.median(v) / (1 if k == "prompt_kv_cache_build" else q) for k, v in times.items()}
    nonembed = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    lp, lq = len(pairs.prefix_prompted), round(statistics.mean(len(s) for s in pairs.queries))
    l0 = len(pairs.prefix_free)
    flops = {
        "base_with_prompt": flops_per_query(model.config, nonembed, 0, lp, lq, n),
        "base_with_prompt_kv_reuse": flops_per_query(model.config, nonembed, 0, lp, lq, n)
        - flops_per_query(model.config, nonembed, 0, lp, 0, 0),
        "patched_without_prompt": flops_per_query(model.config, nonembed, patch.numel(), l0, lq, n),
        "base_without_prompt": flops_per_query(model.config, nonembed, 0, l0, lq, n),
    }
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    doc = {
        "model": lm.model_id,
        "mode": args.mode,
        "prompt_tokens": lp,
        "prompt_free_prefix_tokens": l0,
        "mean_query_tokens": lq,
        "new_tokens": n,
        "queries": q,
        "patch_numbers": patch.numel(),
        "patch_build_seconds": build_s,
        "fit_probes": len(fit),
        "seconds_per_query": per_query,
        "gflops_per_query": {k: v / 1e9 for k, v in flops.items()},
        "prompt_kv_cache_mb": 2 * cfg.num_hidden_layers * kv_heads * head_dim * lp * 4 / 2**20,
        "speedup_patched_vs_prompt": per_query["base_with_prompt"] / per_query["patched_without_prompt"],
        "speedup_patched_vs_prompt_kv_reuse": per_query["base_with_prompt_kv_reuse"]
        / per_query["patched_without_prompt"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{q} queries, {lp}-token prompt, {n} new tokens each, --mode {args.mode} patch ({doc['machine']})\n")
    print("| run | ms per query | GFLOPs per query |\n|---|---|---|")
    for k, v in per_query.items():
        g = flops.get(k)
        print(f"| {k} | {v * 1e3:.0f} | {'' if g is None else f'{g / 1e9:.1f}'} |")
    print(
        f"\npatched / with prompt: {doc['speedup_patched_vs_prompt']:.2f}x faster; "
        f"vs KV reuse: {doc['speedup_patched_vs_prompt_kv_reuse']:.2f}x"
    )


if __name__ == "__main__":
    main()
