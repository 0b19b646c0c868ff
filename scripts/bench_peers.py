"""Condensation vs peers: build time and fidelity (DESIGN.md section 5) of our patches next to the contrastive
vectors of the ``steering-vectors`` and ``repeng`` packages, all built from the same prompt vs no-prompt pairs.

Per task, in one process: the fit probes get the prompted model's own answers once (shared by every
method, timed apart); each peer reads its contrastive vectors from the same pairs, rendered as text (the
prompted conversation vs the prompt-free one, same answer), then its block(s) and multiplier are picked on
the fit probes exactly as the built-in CAA baseline is (thoughtpatch.evaluate.tune_caa); every method is
scored on the task's held-out queries with thoughtpatch.evaluate. Needs ``pip install -e .[bench]``.

python scripts/bench_peers.py [--tasks persona_pirate,translate_french] [--fit 32] [--held 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from thoughtpatch import load_model, load_probes, load_prompt
from thoughtpatch.apply import installed
from thoughtpatch.condense import condense
from thoughtpatch.constants import PRESETS
from thoughtpatch.evaluate import answer_logprobs, evaluate, score, targets_for, tune_caa
from thoughtpatch.patch import LayerPatch, Patch
from thoughtpatch.pipeline import fit_pairs
from thoughtpatch.prompts import TokenPairs, align

ROOT = Path(__file__).resolve().parents[1]
if not hasattr(np, "float_"):  # repeng 0.4 names np.float_ in a signature; NumPy 2 removed the alias
    np.float_ = np.float64


def pick(model, fit: TokenPairs, candidates: dict[str, Patch], tune_queries: int = 16) -> tuple[str, Patch]:
    """The candidate with the lowest mean KL on the first fit probes (as tune_caa picks CAA's)."""
    sub = TokenPairs(fit.prefix_prompted, fit.prefix_free, fit.queries[:tune_queries], fit.n_lead, fit.chat,
                     fit.answer_start[:tune_queries])  # fmt: skip
    reference = answer_logprobs(model, sub.prefix_prompted, sub)
    best = None
    for name, patch in candidates.items():
        with installed(model, patch):
            kl = score(reference, answer_logprobs(model, sub.prefix_free, sub), sub).kl
        if best is None or kl < best[0]:
            best = (kl, name, patch)
    return best[1], best[2]


def vectors_patch(vectors: dict[int, torch.Tensor], mult: float, skip: int) -> Patch:
    return Patch({i: LayerPatch(vector=v.float() * mult) for i, v in vectors.items()}, "skip", skip)


def text_pairs(tok, fit: TokenPairs) -> list[tuple[str, str]]:
    """(prompted, prompt-free) conversations with the prompted model's answer, as text the peers tokenize."""
    return [(tok.decode(fit.prompted(i)), tok.decode(fit.free(i))) for i in range(len(fit.queries))]


def steering_vectors_patch(model, tok, fit: TokenPairs) -> tuple[Patch, str]:
    from steering_vectors import train_steering_vector

    sv = train_steering_vector(model, tok, text_pairs(tok, fit), read_token_index=-1, show_progress=False)
    layers = sorted(sv.layer_activations)
    n = len(layers)
    grid = {
        f"block {i} x{m}": vectors_patch({i: sv.layer_activations[i]}, m, fit.n_lead)
        for i in sorted({layers[round(x * (n - 1) / 5)] for x in range(6)})
        for m in (0.5, 1.0, 2.0, 4.0)
    }
    return pick(model, fit, grid)[::-1]


def repeng_patch(model, tok, fit: TokenPairs) -> tuple[Patch, str]:
    from repeng import ControlVector, DatasetEntry

    cv = ControlVector.train(model, tok, [DatasetEntry(p, n) for p, n in text_pairs(tok, fit)], method="pca_diff")
    dirs = {i: torch.from_numpy(np.asarray(v)) for i, v in cv.directions.items()}
    grid = {f"all blocks x{c}": vectors_patch(dirs, c, fit.n_lead) for c in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)}
    return pick(model, fit, grid)[::-1]


def run(args) -> dict:
    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    m, tok = lm.model, lm.tokenizer
    doc: dict = {"model": lm.model_id, "fit": args.fit, "held": args.held, "tasks": {}}
    for name in args.tasks.split(","):
        task = ROOT / "benchmarks" / "tasks" / name
        prompt = load_prompt(str(next(task.glob("prompt.*"))))
        fit_q = load_probes(str(task / "fit.txt"))[: args.fit]
        held_q = load_probes(str(task / "heldout.txt"))[: args.held]
        held = targets_for(m, tok, align(tok, prompt, held_q), args.answer_tokens)
        t = time.perf_counter()
        fit = fit_pairs(lm, prompt, fit_q, 16, None, 16)
        build: dict[str, float] = {"shared: prompted answers of the fit probes": time.perf_counter() - t}
        patches, chosen = {}, {}
        for method, fn in (
            ("thoughtpatch best", lambda fit=fit: condense(m, fit, PRESETS["best"])),
            ("thoughtpatch compact", lambda fit=fit: condense(m, fit, PRESETS["compact"])),
            ("caa (built in)", lambda fit=fit: tune_caa(m, fit)[0]),
            ("steering-vectors", lambda fit=fit: steering_vectors_patch(m, tok, fit)),
            ("repeng", lambda fit=fit: repeng_patch(m, tok, fit)),
        ):
            t = time.perf_counter()
            out = fn()
            build[method] = time.perf_counter() - t
            patches[method], chosen[method] = out if isinstance(out, tuple) else (out, "")
            print(f"[{name}] {method}: {build[method]:.1f} s {chosen[method]}", file=sys.stderr, flush=True)
        scores = evaluate(m, held, {"none": None, **patches})
        doc["tasks"][name] = {
            k: {"kl": s["kl"], "top1": s["top1"], "exact": s["exact"], "parameters": s["parameters"],
                "build_seconds": build.get(k, 0.0), "chosen": chosen.get(k, "")}
            for k, s in scores.items()
        }  # fmt: skip
        doc["tasks"][name]["shared"] = {"build_seconds": build["shared: prompted answers of the fit probes"]}
    doc["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", default="persona_pirate,translate_french")
    ap.add_argument("--fit", type=int, default=32)
    ap.add_argument("--held", type=int, default=16)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    doc = run(args)
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{doc['model']}, {args.fit} fit / {args.held} held-out queries per task ({doc['machine']})\n")
    print("| task | method | build s | KL | top-1 | exact | numbers |\n|---|---|---|---|---|---|---|")
    for task, rows in doc["tasks"].items():
        for k, r in rows.items():
            if k != "shared":
                print(f"| {task} | {k} | {r['build_seconds']:.1f} | {r['kl']:.4f} | {r['top1']:.3f} | "
                      f"{r['exact']:.3f} | {r['parameters']:,} |")  # fmt: skip
        print(f"| {task} | (shared prompted answers) | {rows['shared']['build_seconds']:.1f} | | | | |")


if __name__ == "__main__":
    main()
