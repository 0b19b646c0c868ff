"""Baking a patch into a sharded checkpoint: peak memory and time against load + save_pretrained and cp.

python scripts/bench_bake.py [--model M | --src SHARDED] [--patch P] [--shard-size 200MB] [--repeat 1] [--no-loaders]
    [--json]

Saves the default model (or --model) in several shards into a temporary folder, then runs, each in its own
process and side by side: ``thoughtpatch apply --save`` (streaming), ``from_pretrained`` + the same patch
folded into the state dict + ``save_pretrained``, PEFT's ``merge_and_unload`` + ``save_pretrained`` of a LoRA
adapter (rank --lora-rank on o_proj, gate_proj, up_proj; needs peft), and ``cp -r`` (with and without ``sync`` of the copied
files; baking fsyncs what it writes), plus the interpreter's start-up alone (the fixed part of the first
two). Peak RSS is the child's ``ru_maxrss``. Without --patch, a bakeable
patch is built first with ``thoughtpatch transmute examples/french.txt --mode bakeable``. ``--src`` bakes an
already sharded folder as it is (no resaving); ``--no-loaders`` leaves out the two rows that load the whole
model (for checkpoints larger than memory allows twice).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HF = """
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from thoughtpatch.architectures import architecture_for
from thoughtpatch.bake import bake_tensor, plan_bake
from thoughtpatch.patch import patch_from_bytes
src, patch, out = sys.argv[1:]
torch.set_grad_enabled(False)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
config = json.loads((Path(src) / "config.json").read_text())
plan = plan_bake([patch_from_bytes(Path(patch).read_bytes())], architecture_for(model.config), config)
sd = model.state_dict()
read = lambda k: sd[k].float()
baked = {k: bake_tensor(k, v.float(), plan, read).to(v.dtype) for k, v in sd.items()}
for name, w in plan.new.items():
    baked[name] = bake_tensor(name, torch.zeros(sd[w].shape[0]), plan, read).to(sd[w].dtype)
for flag in plan.flags:
    setattr(model.config, flag, True)
model.save_pretrained(out, state_dict=baked)
"""

PEFT = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
src, out, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_grad_enabled(False)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
lora = LoraConfig(r=rank, target_modules=["o_proj", "gate_proj", "up_proj"], init_lora_weights=False)
get_peft_model(model, lora).merge_and_unload().save_pretrained(out)
"""


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` in a child process (via this script) and return its wall time and peak RSS."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def one(cmd: list[str]) -> dict:
    """Measure in a fresh process so that ``RUSAGE_CHILDREN`` covers this command alone."""
    out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(cmd)], check=True, capture_output=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--src", default=None, help="An already sharded model folder to bake as it is.")
    ap.add_argument("--no-loaders", action="store_true", help="Leave out from_pretrained and PEFT.")
    ap.add_argument("--patch", default=None, help="A bakeable patch for the model (default: build one).")
    ap.add_argument("--shard-size", default="200MB")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="Where the copies go (default: a temporary folder).")
    ap.add_argument("--devices", default="cpu", help="Bake on each of these (comma-separated: cpu,cuda).")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    from thoughtpatch.models import default_model_dir

    devices = args.devices.split(",")

    py = sys.executable
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="bench-bake-"))
    load = [os.getloadavg()[0]]
    try:
        src = Path(args.src) if args.src else work / "src"
        model = args.src or args.model or str(default_model_dir())
        save = (
            "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
            "m.save_pretrained(sys.argv[2], max_shard_size=sys.argv[3]); AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])"
        )
        if not args.src:
            subprocess.run([py, "-c", save, model, str(src), args.shard_size], check=True)
        patch = args.patch
        if patch is None:
            patch = str(work / "patch.safetensors")
            subprocess.run([py, "-m", "thoughtpatch", "transmute", "examples/french.txt", "--model", str(src),
                            "--mode", "bakeable", "-o", patch, "-q", "--device", devices[-1]], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        shards = sorted(src.glob("*.safetensors"))
        subprocess.run(["cat", *map(str, shards)], check=True, stdout=subprocess.DEVNULL)  # warm the page cache
        bake = [py, "-m", "thoughtpatch", "apply", patch, "--model", str(src), "-q", "--save"]
        runs = {
            **{f"thoughtpatch apply --save --device {d}": lambda o, d=d: [*bake, o, "--device", d] for d in devices},
            "from_pretrained + patch + save_pretrained": lambda o: [py, "-c", HF, str(src), patch, o],
            f"peft LoRA r={args.lora_rank}: merge_and_unload + save_pretrained": lambda o: [
                py,
                "-c",
                PEFT,
                str(src),
                o,
                str(args.lora_rank),
            ],  # fmt: skip
            "cp -r": lambda o: ["cp", "-r", str(src), o],
            "start-up alone (python, thoughtpatch.cli, numpy, safetensors)": lambda o: [
                py,
                "-c",
                "import thoughtpatch.cli, numpy, safetensors; import os; os.mkdir(os.sys.argv[1])",
                o,
            ],
            "cp -r + sync": lambda o: ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(src), o],
        }
        if args.no_loaders:
            runs = {k: v for k, v in runs.items() if not k.startswith(("from_pretrained", "peft"))}
        results: dict[str, list[dict]] = {k: [] for k in runs}
        for r in range(args.repeat):
            for name, cmd in runs.items():  # interleaved, so that machine load affects all alike
                out = work / f"out-{r}-{len(results[name])}-{abs(hash(name)) % 1000}"
                results[name].append(one(cmd(str(out))))
                shutil.rmtree(out)
                load.append(os.getloadavg()[0])
        rows = {
            k: {
                "seconds": round(statistics.median(x["seconds"] for x in v), 2),
                "peak_rss_mb": round(max(x["peak_rss_mb"] for x in v), 1),
            }
            for k, v in results.items()
        }
        largest = max(p.stat().st_size for p in shards) / 2**20
        ours, cp, cps = rows[f"thoughtpatch apply --save --device {devices[0]}"], rows["cp -r"], rows["cp -r + sync"]
        doc = {
            "model": model,
            "checkpoint_mb": round(sum(p.stat().st_size for p in shards) / 2**20, 1),
            "shards": len(shards),
            "largest_shard_mb": round(largest, 1),
            "repeat": args.repeat,
            "rows": rows,
            "rss_over_largest_shard": round(ours["peak_rss_mb"] / largest, 2),
            "time_over_cp": round(ours["seconds"] / cp["seconds"], 2),
            "time_over_cp_sync": round(ours["seconds"] / cps["seconds"], 2),
            "machine": f"{platform.machine()}, {platform.python_version()}, {os.cpu_count()} CPUs",
            "load_average": [round(min(load), 1), round(max(load), 1)],
            "date": time.strftime("%Y-%m-%d"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{doc['checkpoint_mb']} MB checkpoint in {doc['shards']} shards (largest {doc['largest_shard_mb']} MB), "
          f"median of {args.repeat}; {doc['date']}, {doc['machine']}, load average {doc['load_average']}\n")  # fmt: skip
    print("| run | seconds | peak RSS (MB) | RSS / largest shard | time / cp | time / (cp + sync) |")
    print("|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['seconds']} | {r['peak_rss_mb']} | {r['peak_rss_mb'] / largest:.2f} | "
              f"{r['seconds'] / cp['seconds']:.2f} | {r['seconds'] / cps['seconds']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
