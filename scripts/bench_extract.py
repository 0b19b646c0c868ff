"""Extraction cost: wall time of `extract` divided by one plain prompted forward pass over the same tokens.

Both sides run in the same process, interleaved, several times; the medians are compared, so machine noise
hits both. Usage: python scripts/bench_extract.py [--model DIR] [--queries 64] [--repeats 3] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from thoughtpatch import align, default_probes, extract, load_model, load_prompt, teacher_answers
from thoughtpatch.engine import pad_right

sys.path.insert(0, str(Path(__file__).parent))
from bench_build import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", default="examples/french.txt")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(args.model, dtype="float32", device=args.device)
    dev = lm.model.device
    probes = (default_probes() * 8)[: args.queries]
    pairs = teacher_answers(
        lm.model, lm.tokenizer, align(lm.tokenizer, load_prompt(args.prompt), probes), args.answer_tokens
    )
    seqs = [pairs.prompted(i) for i in range(len(probes))]

    def plain_forward():
        for s in range(0, len(seqs), args.batch_size):
            ids, mask = pad_right(seqs[s : s + args.batch_size], 0)
            lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev))

    def run_extract():
        extract(lm.model, pairs, batch_size=args.batch_size)

    times: dict[str, list[float]] = {"plain_prompted_forward": [], "extract": []}
    plain_forward()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("plain_prompted_forward", plain_forward), ("extract", run_extract)):
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": lm.model_id,
        "queries": len(probes),
        "tokens": sum(len(s) for s in seqs),
        "query_tokens": sum(len(q) for q in pairs.queries),
        "prompt_tokens": len(pairs.prefix_prompted),
        "seconds": med,
        "ratio_extract_over_plain_forward": med["extract"] / med["plain_prompted_forward"],
        "machine": machine(args.device),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("| what | seconds (median) |\n|---|---|")
        for k, v in med.items():
            print(f"| {k} | {v:.3f} |")
        print(
            f"\nextract / plain prompted forward = **{result['ratio_extract_over_plain_forward']:.2f}** "
            f"({result['queries']} queries, {result['tokens']} tokens, {result['machine']})"
        )


if __name__ == "__main__":
    main()
