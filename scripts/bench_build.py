"""Patch build time: `transmute` with N probes on the default model, per mode, with its stages.

python scripts/bench_build.py [--model M] [--probes 64] [--modes best,bakeable,compact] [--device cpu|cuda] [--json]

A mode may change its preset's integer or float settings, to time a variant side by side with the preset:
``--modes compact,compact:kv_refine=0``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from dataclasses import fields, replace

import torch

from thoughtpatch import default_probes, load_model, load_prompt
from thoughtpatch.condense import CondenseConfig
from thoughtpatch.constants import PRESETS, SIMILAR_QUERIES
from thoughtpatch.pipeline import run_transmute


def machine(device: str) -> str:
    """The hardware a figure was measured on: the GPU's name on CUDA."""
    cpu = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    return f"{torch.cuda.get_device_name()}, {cpu}" if device.startswith("cuda") else cpu


KINDS = {f.name: str(f.type) for f in fields(CondenseConfig)}


def setting(key: str, value: str):
    """A preset setting's ``value`` as its type: ``none``, ``true``, numbers, lists split by "," or "/"."""
    kind = KINDS[key]
    if value == "none" and "None" in kind:
        return None
    number = int if "int" in kind else float
    if kind.startswith("tuple"):
        return tuple(number(x) for x in re.split("[,/]", value))
    return value == "true" if kind == "bool" else value if kind == "str" else number(value)


def preset(spec: str):
    """``mode`` or ``mode:key=value:...``: the mode's preset with those settings changed."""
    mode, *changes = spec.split(":")
    pairs = (change.split("=") for change in changes)
    return mode, replace(PRESETS[mode], **{key: setting(key, value) for key, value in pairs})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", default="examples/french.txt")
    ap.add_argument("--probes", type=int, default=64)
    ap.add_argument("--modes", default="best,bakeable,compact")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t = time.perf_counter()
    lm = load_model(args.model, device=args.device)
    load_s = time.perf_counter() - t
    probes = (default_probes() * 16)[: args.probes]
    rows = {}
    for spec in args.modes.split(","):
        mode, cfg = preset(spec)
        t = time.perf_counter()
        similar = SIMILAR_QUERIES.get(mode, 0)  # as transmute does by default
        patch, seconds = run_transmute(lm, load_prompt(args.prompt), probes, cfg, similar=similar)
        rows[spec] = {"seconds": round(time.perf_counter() - t, 2), "stages": {k: round(v, 2) for k, v in seconds.items()},
                      "parameters": patch.numel()}  # fmt: skip
    doc = {
        "model": lm.model_id,
        "probes": len(probes),
        "load_seconds": round(load_s, 2),
        "modes": rows,
        "machine": machine(args.device),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"transmute with {len(probes)} probes on {lm.model_id} ({doc['machine']}); model load {load_s:.1f} s\n")
    print("| mode | seconds | written queries | answers | condense | numbers |\n|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['seconds']} | {r['stages'].get('similar', 0)} | {r['stages']['answers']} | "
            f"{r['stages']['condense']} | {r['parameters']:,} |"
        )


if __name__ == "__main__":
    main()
