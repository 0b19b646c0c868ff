"""Scaling: time and peak RSS of extract+condense (`transmute`) vs the number of probes and the model size.

Every point runs in its own process (peak RSS from ``ru_maxrss``), next to the model's own inference
footprint measured the same way: load the model, one plain prompted forward pass over one batch of probes.
``--stage files`` measures the two-step path instead, as users run it: ``thoughtpatch extract --probes P
-o updates.safetensors``, then ``thoughtpatch condense updates.safetensors -o patch.safetensors``, each in its
own process; its probes are the benchmark tasks' fit lines, cycled (and numbered past the first round).

python scripts/bench_scaling.py [--probes 64,256,1024] [--models tiny,default] [--mode best] [--stage files] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model_dir(name: str, tmp: Path) -> str | None:
    """``tiny``: a pico llama (tests/tiny.py); ``default``: the embedded model; ``qwen0.5b``; or a folder."""
    if name == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny

        return str(tiny.build("llama", tmp / "tiny-llama"))
    if name == "default":
        return None
    if name == "qwen0.5b":
        from thoughtpatch.models import cache_dir

        return str(cache_dir() / "models" / "qwen2.5-coder-0.5b-instruct")
    return name


def _one(args) -> dict:
    """One point, in this process: load, then inference footprint or transmute."""
    import torch

    from thoughtpatch import default_probes, load_model, load_prompt
    from thoughtpatch.constants import PRESETS
    from thoughtpatch.engine import pad_right
    from thoughtpatch.pipeline import run_transmute
    from thoughtpatch.prompts import align

    if args.what in ("extract", "condense"):
        return _command(args)
    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    probes = (default_probes() * 64)[: args.n]
    prompt = load_prompt(args.prompt)
    t = time.perf_counter()
    extra = {}
    if args.what == "inference":  # one batch of prompted probes: as generation's prefill, then with all logits
        pairs = align(lm.tokenizer, prompt, probes[: args.batch_size])
        ids, mask = pad_right([pairs.prompted(i) for i in range(len(pairs.queries))], 0)
        lm.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        extra["prefill_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        lm.model(input_ids=ids, attention_mask=mask)
    else:
        cfg = PRESETS[args.mode]
        trim = ctypes.CDLL("libc.so.6").malloc_trim if args.heap == "trim" else None
        run_transmute(lm, prompt, probes, cfg, progress=(lambda n: trim(0)) if trim else None)
    return {
        "seconds": time.perf_counter() - t,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in lm.model.parameters()),
    } | extra


def _probes(n: int) -> list[str]:
    """``n`` probe lines: the benchmark tasks' fit lines, cycled, numbered past the first round."""
    lines = [x for f in sorted(ROOT.glob("benchmarks/tasks/*/fit.txt")) for x in f.read_text().splitlines() if x]
    return [lines[i % len(lines)] + (f" (variant {i // len(lines)})" if i >= len(lines) else "") for i in range(n)]


def _command(args) -> dict:
    """``thoughtpatch extract`` or ``condense`` as users run it, in this process (files in ``args.work``)."""
    from thoughtpatch.cli import app

    work = Path(args.work)
    updates = str(work / f"updates-{args.n}.safetensors")
    if args.what == "extract":
        (work / "probes.txt").write_text("\n".join(_probes(args.n)) + "\n")
        cmd = ["extract", args.prompt, "--probes", str(work / "probes.txt"), "-o", updates]
        cmd += ["--batch-size", str(args.batch_size)]
    else:
        cmd = ["condense", updates, "-o", str(work / "patch.safetensors"), "--mode", args.mode]
    t = time.perf_counter()
    app([*cmd, "-q"] + (["--model", args.model] if args.model else []), standalone_mode=False)
    return {
        "seconds": time.perf_counter() - t,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file_mb": Path(updates).stat().st_size / 2**20,
    }


def _files(args) -> None:
    """``--stage files``: extract then condense through an updates file, per model and probe count."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = _model_dir(name, Path(tmp))
            for n in (int(x) for x in args.probes.split(",") if x):
                r = {"model": name, "probes": n}
                for what in ("extract", "condense"):
                    out = _spawn(model, what, n, args, ["--work", tmp])
                    r |= {f"{what}_{k}": v for k, v in out.items() if k != "file_mb"} | {"file_mb": out["file_mb"]}
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
                Path(tmp, f"updates-{n}.safetensors").unlink()
    if args.json:
        print(json.dumps({"mode": args.mode, "batch_size": args.batch_size, "points": rows}, indent=2))
        return
    print(f"extract (batch {args.batch_size}) -> updates file -> condense --mode {args.mode}\n")
    print(
        "| model | probes | updates file (MB) | extract s | extract peak RSS (MB) | condense s | condense peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['probes']} | {r['file_mb']:.0f} | {r['extract_seconds']:.1f} | "
            f"{r['extract_peak_rss_mb']:.0f} | {r['condense_seconds']:.1f} | {r['condense_peak_rss_mb']:.0f} |"
        )


def _spawn(model: str | None, what: str, n: int, args, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--one", what, "--n", str(n), "--mode", args.mode, "--prompt", args.prompt]
    cmd += list(extra)
    cmd += ["--batch-size", str(args.batch_size), "--heap", args.heap] + (["--model", model] if model else [])
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error") | (
        {"MALLOC_MMAP_THRESHOLD_": "131072"} if args.heap == "mmap" else {}
    )
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{what} {n} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--probes", default="64,256,1024")
    ap.add_argument("--models", default="tiny,default")
    ap.add_argument("--mode", default="best")
    ap.add_argument("--prompt", default=str(ROOT / "examples" / "french.txt"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--heap",
        choices=["glibc", "mmap", "trim"],
        default="glibc",
        help="mmap: MALLOC_MMAP_THRESHOLD_=131072; trim: malloc_trim after each block",
    )
    ap.add_argument("--stage", choices=["transmute", "files"], default="transmute")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", choices=["inference", "transmute", "extract", "condense"], help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.what = args.one
        print(json.dumps(_one(args)))
        return
    if args.stage == "files":
        return _files(args)
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = _model_dir(name, Path(tmp))
            base = _spawn(model, "inference", args.batch_size, args)
            print(json.dumps(base), file=sys.stderr, flush=True)
            for n in (int(x) for x in args.probes.split(",") if x):
                r = _spawn(model, "transmute", n, args)
                r |= {"model": name, "probes": n, "inference_peak_rss_mb": base["peak_rss_mb"]}
                r["prefill_peak_rss_mb"] = base["prefill_peak_rss_mb"]
                r["rss_over_inference"] = r["peak_rss_mb"] / base["peak_rss_mb"]
                r["rss_over_prefill"] = r["peak_rss_mb"] / base["prefill_peak_rss_mb"]
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    doc = {
        "mode": args.mode,
        "heap": args.heap,
        "batch_size": args.batch_size,
        "points": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"torch {torch.__version__}",
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"transmute --mode {args.mode}, batch {args.batch_size} ({doc['machine']})\n")
    print("| model | parameters | probes | seconds | peak RSS (MB) | / prefill footprint | / full-logits forward |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['probes']} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_over_prefill']:.2f} ({r['prefill_peak_rss_mb']:.0f} MB) | "
            f"{r['rss_over_inference']:.2f} ({r['inference_peak_rss_mb']:.0f} MB) |"
        )


if __name__ == "__main__":
    main()
