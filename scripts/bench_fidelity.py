"""Fidelity benchmark: every task family x method, on held-out queries never used for fitting.

For each task in benchmarks/tasks/ (prompt + disjoint fit / held-out queries) it builds each method's patch
from the fit queries, then scores it (DESIGN.md section 5: KL, top-1, exact 8-token answers) beside `none`
and the tuned `caa` baseline. Writes a JSON file of all results, a markdown table and a PNG plot.

    python scripts/bench_fidelity.py                       # all tasks, the standard methods
    python scripts/bench_fidelity.py --tasks translate_french --methods best,bakeable
    python scripts/bench_fidelity.py --from-json docs/fidelity.json   # redraw table and plot only
    python scripts/bench_fidelity.py --tasks-dir benchmarks/unseen  # families never used to tune
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from thoughtpatch import default_probes, load_model, load_probes, load_prompt
from thoughtpatch.condense import CondenseConfig, condense
from thoughtpatch.constants import PRESETS, SIMILAR_QUERIES
from thoughtpatch.evaluate import answer_logprobs, evaluate, score, targets_for, tune_caa
from thoughtpatch.pipeline import fit_pairs, similar_queries
from thoughtpatch.prompts import align

sys.path.insert(0, str(Path(__file__).parent))
from bench_build import setting  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIT_ANSWERS: dict[str, int] = {}  # per variant: answer tokens teacher-forced in the fit queries
SAMPLES: dict[str, int] = {}  # per variant: extra sampled answers per fit query
SIMILAR: dict[str, int] = {}  # per variant: model-written queries like the fit queries (default: the mode's)

# name -> (config, extra generic probes added to the task's fit queries); variants may also set fit_answers
METHODS: dict[str, tuple[CondenseConfig, int]] = {
    "best": (PRESETS["best"], 0),
    "bakeable": (PRESETS["bakeable"], 0),
    "compact": (PRESETS["compact"], 0),
    "vector": (CondenseConfig(attn="none", matrix=False), 0),
    "vector+matrix": (CondenseConfig(attn="none"), 0),
    "attn": (CondenseConfig(vector=False, matrix=False), 0),
    "attn+query": (CondenseConfig(vector=False, matrix=False, attn_query=True), 0),
}


def parse_variant(spec: str) -> tuple[str, tuple[CondenseConfig, int]]:
    """``name=preset:key=value:key=value`` (e.g. ``r1=best:ridge=1.0:generic=32``) or a known name."""
    if "=" not in spec.split(":")[0]:
        SIMILAR[spec] = SIMILAR_QUERIES.get(spec, 0)
        return spec, METHODS[spec]
    name, rest = spec.split("=", 1)
    base, *pairs = rest.split(":")
    SIMILAR[name] = SIMILAR_QUERIES.get(base, 0)
    cfg, generic = METHODS[base] if base in METHODS else (PRESETS[base], 0)
    changes = {}
    for kv in pairs:
        k, v = kv.split("=")
        if k == "generic":
            generic = int(v)
        elif k == "fit_answers":
            FIT_ANSWERS[name] = int(v)
        elif k == "samples":
            SAMPLES[name] = int(v)
        elif k == "similar":
            SIMILAR[name] = int(v)
        else:
            changes[k] = setting(k, v)
    return name, (replace(cfg, **changes), generic)


def run(args) -> dict:
    torch.set_grad_enabled(False)
    lm = load_model(args.model, dtype="float32")
    m, tok = lm.model, lm.tokenizer
    n_params = sum(p.numel() for p in m.parameters())
    methods = dict(parse_variant(s) for s in args.methods.split(","))
    tasks = sorted(p for p in Path(args.tasks_dir).iterdir() if p.is_dir())
    if args.tasks:
        tasks = [t for t in tasks if t.name in args.tasks.split(",")]
    generic_pool = default_probes()
    results: dict = {
        "model": lm.model_id,
        "model_parameters": n_params,
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "answer_tokens": args.answer_tokens,
        "fit_answer_tokens": args.fit_answer_tokens,
        "tasks": {},
    }
    for task in tasks:
        prompt = load_prompt(next(task.glob("prompt.*")))
        fit_q, held_q = load_probes(task / "fit.txt"), load_probes(task / "heldout.txt")
        t = time.perf_counter()
        held = targets_for(m, tok, align(tok, prompt, held_q), args.answer_tokens)
        fit = fit_pairs(lm, prompt, fit_q, args.fit_answer_tokens, None, 16)
        t_fit = time.perf_counter() - t
        patches, build = {}, {}
        if not args.no_caa:
            t = time.perf_counter()
            patches["caa"], _ = tune_caa(m, fit)
            build["caa"] = time.perf_counter() - t
        for name, (cfg, generic) in methods.items():
            t = time.perf_counter()
            k = FIT_ANSWERS.get(name, args.fit_answer_tokens)
            more = similar_queries(lm, fit_q, SIMILAR[name], prompt.as_text()) if SIMILAR.get(name) else []
            if more:
                print(f"[{task.name}] {name}: {len(more)} similar queries, e.g. {more[:3]}", file=sys.stderr)
            if generic or k != args.fit_answer_tokens or SAMPLES.get(name) or more:
                q = fit_q + more + generic_pool[:generic]
                pairs = fit_pairs(lm, prompt, q, k, None, 16, SAMPLES.get(name, 0))
            else:
                pairs = fit
            patches[name] = condense(m, pairs, cfg)
            build[name] = time.perf_counter() - t + t_fit * (len(fit_q) + generic) / (len(fit_q) + len(held_q))
            chosen = {k: v for k, v in patches[name].meta.items() if k.endswith("_chosen")}
            print(
                f"[{task.name}] built {name} in {build[name]:.1f}s ({patches[name].numel()} numbers) {chosen or ''}",
                file=sys.stderr,
            )
        scores = evaluate(m, held, {"none": None, **patches})
        if args.baked:  # bakeable patches scored again on their baked checkpoint, loaded by plain transformers
            for name in [n for n, p in patches.items() if getattr(p, "bakeable", False)]:
                scores[f"{name} (baked)"] = _score_baked(lm, patches[name], held)
        for name, s in scores.items():
            s["build_seconds"] = build.get(name, 0.0)
            s["share_of_model"] = s["parameters"] / n_params
            print(
                f"[{task.name}] {name:16s} KL {s['kl']:.4f} top1 {s['top1']:.3f} exact {s['exact']:.3f}",
                file=sys.stderr,
            )
        results["tasks"][task.name] = scores
        if args.out:  # partial results survive an interrupted run
            Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return results


def _score_baked(lm, patch, held) -> dict:
    import tempfile

    from transformers import AutoModelForCausalLM

    from thoughtpatch.bake import bake_checkpoint, patch_record
    from thoughtpatch.models import model_folder

    folder = model_folder(lm.model_id)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "baked"
        bake_checkpoint(folder, dst, [patch], [patch_record(patch, "patch", "", 1.0)])
        baked = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
        got = answer_logprobs(baked, held.prefix_free, held)
    reference = answer_logprobs(lm.model, held.prefix_prompted, held)  # the base model with the prompt
    s = score(reference, got, held)
    return s.brief() | {"kl_per_query": s.kl_per_query, "positions": s.positions, "parameters": patch.numel()}


def method_names(results: dict) -> list[str]:
    """Every method in any task, in order of first appearance."""
    return list(dict.fromkeys(n for t in results["tasks"].values() for n in t))


def summarise(results: dict) -> dict[str, dict[str, float]]:
    """Per method: means over the tasks that have it (``tasks`` says how many)."""
    names = method_names(results)
    out = {}
    for n in names:
        rows = [t[n] for t in results["tasks"].values() if n in t]
        out[n] = {
            k: statistics.mean(r[k] for r in rows) for k in ("kl", "top1", "exact", "build_seconds", "share_of_model")
        }
        out[n]["parameters"] = rows[0]["parameters"]
        out[n]["tasks"] = len(rows)
    return out


def markdown(results: dict) -> str:
    mean = summarise(results)
    lines = [
        f"Model {results['model']} ({results['model_parameters']:,} parameters), {results['answer_tokens']} answer tokens, "
        f"{results['date']}, {results['machine']}.",
        "",
        "Mean over tasks (KL nats / top-1 / exact 8-token answers), patch size and build time:",
        "",
        "| method | tasks | KL | top-1 | exact | numbers | share of model | build s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, s in mean.items():
        lines.append(
            f"| {n} | {s['tasks']} | {s['kl']:.4f} | {s['top1']:.3f} | {s['exact']:.3f} | {s['parameters']:,} | {100 * s['share_of_model']:.3f}% | {s['build_seconds']:.1f} |"
        )
    lines += ["", "Per task, KL / top-1 / exact:", ""]
    names = list(mean)
    lines.append("| task | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for task, scores in results["tasks"].items():
        cells = [
            f"{scores[n]['kl']:.3f} / {scores[n]['top1']:.2f} / {scores[n]['exact']:.2f}" if n in scores else ""
            for n in names
        ]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    names = method_names(results)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        xs = [i + j * width for i in range(len(tasks))]
        for ax, key in zip(axes, ("kl", "top1"), strict=True):
            ax.bar(xs, [results["tasks"][t].get(n, {}).get(key, float("nan")) for t in tasks], width, label=n)
    for ax, title in zip(axes, ("KL(prompted || method), nats (log scale)", "top-1 agreement"), strict=True):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Held-out fidelity, {results['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def combine(paths: list[str]) -> dict:
    """Several result files of the same model as one: each method's scores per task, later files win."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(runs[0], tasks={})
    for task in runs[0]["tasks"]:
        out["tasks"][task] = {}
        for r in runs:
            out["tasks"][task].update(r["tasks"].get(task, {}))
    return out


def front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The Pareto front of (size, top-1) points: no other point is smaller and at least as good."""
    best, out = -1.0, []
    for size, top1, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if top1 > best:
            out.append((size, top1, name))
            best = top1
    return out


def pareto(results: dict, path: Path) -> None:
    """Mean held-out top-1 and KL against patch size (share of the model's parameters), the front marked; only
    methods run on every task (means over fewer tasks would not compare)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = {n: s for n, s in summarise(results).items() if s["parameters"] > 0 and s["tasks"] == len(results["tasks"])}
    pts = [(100 * s["share_of_model"], s["top1"], n) for n, s in mean.items()]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("top1", "kl"), strict=True):
        for n, s in mean.items():
            ax.scatter(100 * s["share_of_model"], s[key], s=18)
            ax.annotate(n, (100 * s["share_of_model"], s[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        f = front(pts)
        ax.plot([p[0] for p in f], [mean[p[2]][key] for p in f], "k--", lw=0.8, label="Pareto front (top-1)")
        ax.set_xscale("log")
        ax.set_xlabel("patch size, % of the model's parameters")
    axes[0].set_ylabel("mean top-1 agreement")
    axes[1].set_ylabel("mean KL, nats")
    axes[1].set_yscale("log")
    axes[0].axvline(0.1, color="grey", lw=0.6, ls=":")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Fidelity against size, {results['model']} ({len(results['tasks'])} tasks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tasks", default="")
    ap.add_argument("--tasks-dir", default=str(ROOT / "benchmarks" / "tasks"), help="Folder of task families")
    ap.add_argument("--methods", default="best,bakeable,compact,vector,vector+matrix,attn,attn+query")
    ap.add_argument("--answer-tokens", type=int, default=8, help="Answer tokens scored (targets)")
    ap.add_argument("--fit-answer-tokens", type=int, default=16, help="Answer tokens teacher-forced in the fit probes")
    ap.add_argument("--no-caa", action="store_true")
    ap.add_argument("--baked", action="store_true", help="Also score bakeable patches on their baked checkpoint")
    ap.add_argument("--section", default="results", help="Marker name of the results section in --doc")
    ap.add_argument(
        "--out", default=str(ROOT / "docs" / "fidelity-results"), help="Output stem: .json, .md and .png are written"
    )
    ap.add_argument("--from-json", default=None, help="Redraw from result files (comma-separated: combined)")
    ap.add_argument("--pareto", default=None, help="Also plot fidelity against patch size (PNG) with its front")
    ap.add_argument("--doc", default=None, help="Markdown file whose results section is rewritten (docs/fidelity.md)")
    args = ap.parse_args()
    if args.doc and Path(args.doc).resolve() == Path(args.out).with_suffix(".md").resolve():
        sys.exit("--doc and --out would write the same file; give --out another stem")
    results = combine(args.from_json.split(",")) if args.from_json else run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.from_json:
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    plot(results, out.with_suffix(".png"))
    if args.pareto:
        pareto(results, Path(args.pareto))
    if args.doc:  # refresh the results section of a narrative document in place
        doc = Path(args.doc)
        text = doc.read_text()
        start, end = f"<!-- {args.section}:start -->", f"<!-- {args.section}:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            table = f"![held-out fidelity]({out.with_suffix('.png').name})\n\n" + markdown(results)
            doc.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])
    print(markdown(results))


if __name__ == "__main__":
    main()
