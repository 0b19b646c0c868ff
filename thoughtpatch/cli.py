"""The ``thoughtpatch`` command: parse, call the core, print. No math here.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad input (one line on stderr; ``--debug`` shows the
traceback). Progress and logs go to stderr; stdout carries only data, or one JSON document with ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import UsageError

app = typer.Typer(
    help="Turn prompts into weight patches for Hugging Face causal language models.\n\n"
    "Example: thoughtpatch extract examples/french.txt -o updates.safetensors --check",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err = Console(stderr=True, highlight=False)
_quiet = False

# Options defined once, reused by every command that runs a model.
Model = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)."
    ),
]
Dtype = Annotated[str, typer.Option(help="Compute dtype: float32, float64, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
DeviceMap = Annotated[
    str | None,
    typer.Option(help="Spread the weights over GPUs, CPU and disk (accelerate): auto, balanced or sequential."),
]
MaxMemory = Annotated[
    str | None, typer.Option(help="Memory per device for the device map, e.g. cpu=2GiB,0=20GiB (implies auto).")
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Probes = Annotated[
    str | None, typer.Option(help="Probe queries: one per line, or JSONL (default: the built-in probe set).")
]
Chat = Annotated[
    bool | None,
    typer.Option("--chat/--no-chat", help="Use the chat template (default: when the tokenizer has one)."),
]
BatchSize = Annotated[int, typer.Option(help="Queries per forward pass.")]
AnswerTokens = Annotated[int, typer.Option(help="Tokens of the prompted model's own greedy answer, teacher-forced.")]
StorePrompt = Annotated[
    bool, typer.Option("--store-prompt/--no-store-prompt", help="Keep the prompt text in the output's metadata.")
]
Output = Annotated[str, typer.Option("--output", "-o", help="File to write (- for stdout).")]
# Condensation options, shared by condense and transmute (None: the mode's default).
Mode = Annotated[str, typer.Option(help="Preset: best (default), bakeable or compact; options below override it.")]
Attn = Annotated[str | None, typer.Option(help="Per-head map of the attention output: full, scalar or none.")]
AttnQuery = Annotated[
    bool | None, typer.Option("--attn-query/--no-attn-query", help="Query-dependent attention term (in memory only).")
]
Vector = Annotated[bool | None, typer.Option("--vector/--no-vector", help="Fit the thought vector.")]
Matrix = Annotated[bool | None, typer.Option("--matrix/--no-matrix", help="Fit the thought matrix.")]
Placement = Annotated[str | None, typer.Option(help="Where the vector acts: skip (after the MLP) or attn_out.")]
Rank = Annotated[int | None, typer.Option(help="Rank of the thought matrices (default: full; implies --matrix).")]
Ridge = Annotated[float | None, typer.Option(help="Matrix ridge, relative to the mean MLP-input energy.")]
AttnRidge = Annotated[float | None, typer.Option(help="Attention-map ridge, relative.")]
Strength = Annotated[float | None, typer.Option(help="Global strength alpha of every part.")]
Layers = Annotated[str | None, typer.Option(help="Blocks to patch, e.g. 0-11,15 (default: all).")]
Construction = Annotated[str | None, typer.Option(help="sequential (re-runs the model) or parallel.")]
Skip = Annotated[int | None, typer.Option(help="Leading tokens left unpatched (default: those both runs share).")]


@app.callback()
def _root() -> None:
    """Turn prompts into weight patches for Hugging Face causal language models."""


def log(msg: str) -> None:
    if not _quiet:
        err.print(f"[thoughtpatch] {msg}", markup=False)


@contextmanager
def progress(label: str, total: int):
    """A progress bar on stderr when it is a terminal; a no-op callback otherwise."""
    if _quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _setup(quiet: bool) -> None:
    global _quiet
    _quiet = quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun only rank 0 speaks
    if quiet or not sys.stderr.isatty():
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _load(
    model: str | None,
    dtype: str,
    device: str,
    meta: dict | None = None,
    what: str = "",
    cfg=None,
    device_map: str | None = None,
    max_memory: str | None = None,
):
    """Load the model; a file's fingerprint and the config's layer choice are checked before the weights."""
    import torch

    from .distributed import init
    from .formats import check_fingerprint
    from .models import load_model, parse_max_memory, resolve_device

    def check(config):
        if meta is not None:
            check_fingerprint(meta, config, what)
        if cfg is not None:
            cfg.validate(config.num_hidden_layers)

    torch.set_grad_enabled(False)
    init(cuda=resolve_device(device).type == "cuda")
    return load_model(
        model, dtype=dtype, device=device, log=log, check=check, device_map=device_map,
        max_memory=parse_max_memory(max_memory),
    )  # fmt: skip


def _emit_json(doc: object) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


@app.command(
    epilog="Examples:\n\n"
    "  thoughtpatch extract examples/french.txt -o updates.safetensors --check\n\n"
    "  thoughtpatch extract prompt.txt --model ./my-model --probes probes.txt --dtype float64 --check --json -o out.st"
)
def extract(
    prompt_file: Annotated[
        str, typer.Argument(help="Prompt file: plain text, or JSON {system, examples}; - for stdin.")
    ],
    output: Annotated[str | None, typer.Option("--output", "-o", help="Updates file to write (- for stdout).")] = None,
    model: Model = None,
    probes: Probes = None,
    answer_tokens: Annotated[int, typer.Option(help="Teacher-forced tokens of the prompted model's own answer.")] = 8,
    check: Annotated[
        bool, typer.Option("--check", help="Re-run prompt-free with the updates; report the max logit error.")
    ] = False,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    chat: Chat = None,
    batch_size: BatchSize = 16,
    store_prompt: Annotated[
        bool, typer.Option("--store-prompt/--no-store-prompt", help="Keep the prompt text in the file.")
    ] = True,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Record the exact token-dependent implicit updates of a prompt, per query token and block."""
    from .distributed import is_main, world
    from .formats import updates_to_bytes
    from .pipeline import run_extract
    from .prompts import load_probes, load_prompt

    _setup(quiet)
    if answer_tokens < 0 or batch_size < 1:
        raise UsageError("--answer-tokens must be >= 0 and --batch-size >= 1")
    if json_out and output == "-":
        raise UsageError("--json and -o - both want stdout; write the updates to a file")
    prompt = load_prompt(prompt_file)
    queries = load_probes(probes)
    lm = _load(model, dtype, device, device_map=device_map, max_memory=max_memory)
    with progress("extract", len(queries)) as step:
        result = run_extract(
            lm, prompt, queries, answer_tokens=answer_tokens, chat=chat, do_check=check,
            batch_size=batch_size, store_prompt=store_prompt, log=log, progress=step,
        )  # fmt: skip
    summary = result.summary()
    if not is_main():  # under torchrun rank 0 writes the one output
        return
    summary["processes"] = world()[1]
    if output:
        from .files import write_bytes

        write_bytes(output, updates_to_bytes(result.updates, result.meta))
        summary["output"] = output
    if json_out:
        _emit_json(summary)
    else:
        _print_extract(summary, to_stderr=output == "-")


def _print_extract(s: dict, to_stderr: bool) -> None:
    table = Table(title="implicit updates", show_header=False)
    for key in (
        "base_model",
        "layers",
        "queries",
        "tokens",
        "answer_tokens",
        "prompt_tokens",
        "sink_positions",
    ):
        table.add_row(key, str(s[key]))
    if s["max_logit_error"] is not None:
        table.add_row("max_logit_error", f"{s['max_logit_error']:.3g}")
    norms = s["mean_delta_norm"]
    table.add_row(
        "mean |delta| (first, middle, last block)",
        f"{norms[0]:.3g}, {norms[len(norms) // 2]:.3g}, {norms[-1]:.3g}",
    )
    table.add_row("seconds", ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    if s.get("output"):
        table.add_row("output", s["output"])
    (err if to_stderr else Console(highlight=False)).print(table)


def _layers(spec: str | None) -> tuple[int, ...] | None:
    if spec is None:
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise UsageError(f"--layers {spec!r}: expected block numbers like 0-11,15") from None
    return tuple(sorted(set(out)))


def _config(mode: str, **options):
    """A condensation config: the mode's preset, with every option the user gave overriding it."""
    from dataclasses import replace

    from .constants import PRESETS

    if mode not in PRESETS:
        raise UsageError(f"--mode must be one of {', '.join(PRESETS)}, not {mode!r}")
    given = {k: v for k, v in options.items() if v is not None}
    if "rank" in given or "ridge" in given:  # asking for a matrix's rank or ridge asks for the matrix
        given.setdefault("matrix", True)
    if "layers" in given:
        given["layers"] = _layers(given["layers"])
    cfg = replace(PRESETS[mode], **given)
    cfg.validate()
    return cfg


def _write_patch(patch, output: str) -> None:
    from .files import write_bytes
    from .patch import patch_to_bytes

    write_bytes(output, patch_to_bytes(patch))


def _patch_summary(patch, seconds: dict, output: str) -> dict:
    from .distributed import world

    return {
        "output": output,
        "parameters": patch.numel(),
        "share_of_model": patch.numel() / max(1, int(patch.meta.get("model_parameters", "0") or 1)),
        "layers": sorted(patch.layers),
        "bakeable": patch.bakeable,
        "method": {k.removeprefix("method."): v for k, v in patch.meta.items() if k.startswith("method.")},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "processes": world()[1],
    }


def _report(doc: dict, json_out: bool, output: str | None, title: str) -> None:
    if json_out:
        _emit_json(doc)
        return
    table = Table(title=title, show_header=False)
    for k, v in doc.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict | list) else str(v))
    (err if output == "-" else Console(highlight=False)).print(table)


@app.command(
    epilog="Examples:\n\n"
    "  thoughtpatch condense updates.safetensors -o patch.safetensors\n\n"
    "  thoughtpatch extract p.txt -o - | thoughtpatch condense - -o patch.safetensors --rank 8"
)
def condense(
    updates_file: Annotated[str, typer.Argument(help="Updates file from extract (- for stdin).")],
    output: Output = "-",
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model folder (default: the one named in the updates file).")
    ] = None,
    mode: Mode = "best",
    attn: Attn = None,
    attn_query: AttnQuery = None,
    vector: Vector = None,
    matrix: Matrix = None,
    placement: Placement = None,
    rank: Rank = None,
    ridge: Ridge = None,
    attn_ridge: AttnRidge = None,
    strength: Strength = None,
    layers: Layers = None,
    construction: Construction = None,
    skip: Skip = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Condense implicit updates into a token-independent patch (thought vectors, matrices, attention maps)."""
    from .distributed import is_main
    from .files import read_bytes
    from .formats import updates_from_bytes
    from .pipeline import run_condense

    _setup(quiet)
    cfg = _config(
        mode, attn=attn, attn_query=attn_query, vector=vector, matrix=matrix, placement=placement, rank=rank,
        ridge=ridge, attn_ridge=attn_ridge, strength=strength, layers=layers, construction=construction, skip=skip,
    )  # fmt: skip
    updates, umeta = updates_from_bytes(read_bytes(updates_file, "updates file"), f"updates file {updates_file}")
    lm = _load(
        model or umeta.get("base_model"), dtype, device, umeta, f"updates file {updates_file}", cfg, device_map,
        max_memory,
    )  # fmt: skip
    with progress("condense", lm.model.config.num_hidden_layers) as step:
        patch, seconds = run_condense(lm, updates, umeta, cfg, progress=step)
    if not is_main():
        return
    _write_patch(patch, output)
    _report(_patch_summary(patch, seconds, output), json_out, output, "patch")


@app.command(
    epilog="Examples:\n\n"
    "  thoughtpatch transmute examples/french.txt -o french.safetensors\n\n"
    "  thoughtpatch transmute prompt.json --model ./my-model --probes probes.txt --bakeable -o patch.safetensors"
)
def transmute(
    prompt_file: Annotated[
        str, typer.Argument(help="Prompt file: plain text, or JSON {system, examples}; - for stdin.")
    ],
    output: Output = "-",
    model: Model = None,
    probes: Probes = None,
    answer_tokens: AnswerTokens = 16,
    mode: Mode = "best",
    bakeable: Annotated[bool, typer.Option("--bakeable", help="Same as --mode bakeable.")] = False,
    compact: Annotated[bool, typer.Option("--compact", help="Same as --mode compact.")] = False,
    attn: Attn = None,
    attn_query: AttnQuery = None,
    vector: Vector = None,
    matrix: Matrix = None,
    placement: Placement = None,
    rank: Rank = None,
    ridge: Ridge = None,
    attn_ridge: AttnRidge = None,
    strength: Strength = None,
    layers: Layers = None,
    skip: Skip = None,
    chat: Chat = None,
    batch_size: BatchSize = 16,
    store_prompt: StorePrompt = True,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Turn a prompt into a patch in one step (extract + condense): the path most users take."""
    from .distributed import is_main
    from .pipeline import run_transmute
    from .prompts import load_probes, load_prompt

    _setup(quiet)
    if bakeable and compact:
        raise UsageError("--bakeable and --compact are different modes; pick one")
    mode = "bakeable" if bakeable else "compact" if compact else mode
    cfg = _config(
        mode, attn=attn, attn_query=attn_query, vector=vector, matrix=matrix, placement=placement, rank=rank,
        ridge=ridge, attn_ridge=attn_ridge, strength=strength, layers=layers, skip=skip, batch_size=batch_size,
    )  # fmt: skip
    if answer_tokens < 0:
        raise UsageError("--answer-tokens must be >= 0")
    prompt = load_prompt(prompt_file)
    queries = load_probes(probes)
    lm = _load(model, dtype, device, cfg=cfg, device_map=device_map, max_memory=max_memory)
    with progress("transmute", lm.model.config.num_hidden_layers) as step:
        patch, seconds = run_transmute(
            lm,
            prompt,
            queries,
            cfg,
            answer_tokens=answer_tokens,
            chat=chat,
            store_prompt=store_prompt,
            log=log,
            progress=step,
        )
    if not is_main():
        return
    patch.meta["method.mode"] = mode
    _write_patch(patch, output)
    _report(_patch_summary(patch, seconds, output), json_out, output, "patch")


def _read_patch(path: str):
    return _read_patch_bytes(path)[0]


@app.command(epilog="Example:\n\n  thoughtpatch inspect french.safetensors --json")
def inspect(
    patch_file: Annotated[str, typer.Argument(help="Patch file (- for stdin).")],
    json_out: Json = False,
    debug: Debug = False,
) -> None:
    """Show a patch's metadata and, per block, the norms and ranks of its parts."""
    from .patch import describe_patch

    doc = describe_patch(_read_patch(patch_file))
    if json_out:
        _emit_json(doc)
        return
    out = Console(highlight=False)
    meta = Table(title="metadata", show_header=False)
    for k, v in doc["metadata"].items():
        meta.add_row(k, v if len(v) < 200 else v[:197] + "...")
    out.print(meta)
    if doc["layers"]:
        cols = sorted({k for row in doc["layers"] for k in row})
        table = Table(title="per block")
        for c in cols:
            table.add_column(c)
        for row in doc["layers"]:
            table.add_row(*(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols))
        out.print(table)


@app.command(
    epilog="Examples:\n\n"
    '  thoughtpatch apply french.safetensors --prompt "Where is the station?"\n\n'
    "  thoughtpatch apply french.safetensors polite.safetensors --save ./smollm2-french\n\n"
    '  thoughtpatch merge a.safetensors b.safetensors -o - | thoughtpatch apply - --prompt "Hi"'
)
def apply(
    patch_files: Annotated[
        list[str], typer.Argument(help="Patch files, installed together in this order (- for stdin).")
    ],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A user message; repeat for a batch.")] = None,
    save: Annotated[
        str | None,
        typer.Option(
            help="Write a checkpoint with the patches baked in to this new folder (loads without thoughtpatch)."
        ),
    ] = None,
    model: Model = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    scale: Annotated[float, typer.Option(help="Multiply the patches by this.")] = 1.0,
    chat: Chat = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Generate with patches installed (greedy, the chat template applied as for any user turn), or bake them
    into a new checkpoint with --save."""
    _setup(quiet)
    if bool(prompt) == bool(save):
        raise UsageError("give --prompt (generate with the patches in memory) or --save DIR (bake them), one of them")
    if patch_files.count("-") > 1:
        raise UsageError("only one patch can come from stdin (-)")
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    read = [_read_patch_bytes(f) for f in patch_files]
    patches = [p for p, _ in read]
    base = model or patches[0].meta.get("base_model")
    if save:
        _bake(patch_files, read, base, save, scale, device, json_out)
        return
    from .formats import check_fingerprint
    from .pipeline import run_generate

    lm = _load(base, dtype, device, patches[0].meta, f"patch {patch_files[0]}")
    for f, p in zip(patch_files[1:], patches[1:], strict=True):
        check_fingerprint(p.meta, lm.model.config, f"patch {f}")
    answers = run_generate(lm, patches, prompt, max_new_tokens=max_new_tokens, scale=scale, chat=chat)
    if json_out:
        _emit_json({"answers": [{"prompt": p, "answer": a} for p, a in zip(prompt, answers, strict=True)]})
    else:
        sys.stdout.write("\n".join(answers) + "\n")


def _read_patch_bytes(path: str):
    """A patch and the sha256 of its file's bytes."""
    import hashlib

    from .files import read_bytes
    from .patch import patch_from_bytes

    data = read_bytes(path, "patch")
    return patch_from_bytes(data, f"patch {path}"), hashlib.sha256(data).hexdigest()


def _bake(files: list[str], read: list, base: str | None, save: str, scale: float, device: str, json_out: bool):
    """Bake the patches into a copy of the base model's folder (streamed; the model is never loaded whole)."""
    from pathlib import Path

    from .bake import bake_checkpoint, config_view, patch_record
    from .formats import check_fingerprint
    from .models import DEFAULT_MODEL, default_model_dir, resolve_device

    folder = default_model_dir(log) if base in (None, "", "default", DEFAULT_MODEL) else Path(base)
    config = config_view(folder)
    records, patches = [], []
    for f, (p, sha) in zip(files, read, strict=True):
        check_fingerprint(p.meta, config, f"patch {f}")
        patches.append(p.scaled(scale) if scale != 1.0 else p)
        records.append(patch_record(p, "stdin" if f == "-" else Path(f).name, sha, scale))
    log(f"baking {len(patches)} patch(es) into a copy of {folder.name}: {save}")
    summary = bake_checkpoint(folder, save, patches, records, device=str(resolve_device(device)), log=log)
    _report(summary, json_out, None, "baked checkpoint")


@app.command(
    "eval",
    epilog="Example:\n\n"
    "  thoughtpatch eval french.safetensors --prompt-file examples/french.txt --queries held_out.txt --json",
)
def eval_(
    patch_file: Annotated[str, typer.Argument(help="Patch file (- for stdin).")],
    prompt_file: Annotated[str, typer.Option("--prompt-file", help="The prompt the patch stands in for.")],
    queries: Annotated[str, typer.Option(help="Held-out queries (never used for fitting), one per line or JSONL.")],
    model: Model = None,
    probes: Annotated[
        str | None, typer.Option(help="Fit queries for tuning the CAA baseline (default: built-in probes).")
    ] = None,
    answer_tokens: AnswerTokens = 8,
    caa: Annotated[bool, typer.Option("--caa/--no-caa", help="Tune and score the CAA baseline.")] = True,
    chat: Chat = None,
    batch_size: BatchSize = 16,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Measure how closely the patched model without the prompt matches the model with it."""
    from .pipeline import run_eval
    from .prompts import load_probes, load_prompt

    _setup(quiet)
    if answer_tokens < 1:
        raise UsageError("--answer-tokens must be >= 1")
    patch = _read_patch(patch_file)
    prompt = load_prompt(prompt_file)
    held = load_probes(queries)
    fit = load_probes(probes) if probes else None
    lm = _load(
        model or patch.meta.get("base_model"), dtype, device, patch.meta, f"patch {patch_file}", None, device_map,
        max_memory,
    )  # fmt: skip
    report = run_eval(
        lm, prompt, held, {"patch": patch}, fit_queries=fit, answer_tokens=answer_tokens, chat=chat, caa=caa,
        batch_size=batch_size, log=log,
    )  # fmt: skip
    if json_out:
        _emit_json(report)
        return
    table = Table(title=f"fidelity on {report['queries']} held-out queries ({report['answer_tokens']} answer tokens)")
    for c in ("method", "KL (nats)", "top-1", "exact", "parameters"):
        table.add_column(c)
    for name, r in report["methods"].items():
        table.add_row(name, f"{r['kl']:.4f}", f"{r['top1']:.3f}", f"{r['exact']:.3f}", str(r["parameters"]))
    Console(highlight=False).print(table)


def main() -> None:
    """Console entry point: run the app and map errors to exit codes."""
    debug = "--debug" in sys.argv or bool(os.environ.get("THOUGHTPATCH_DEBUG"))
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C (and SIGTERM where a command maps it) into this code
            err.print("thoughtpatch: interrupted", markup=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("thoughtpatch: interrupted", markup=False)
        sys.exit(130)
    except UsageError as exc:
        if debug:
            raise
        err.print(f"thoughtpatch: error: {exc}", markup=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # runtime failure
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # the CLI parser's own usage errors
            exc.show()
            sys.exit(2)
        if debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err.print(f"thoughtpatch: failed: {type(exc).__name__}: {msg}", markup=False, soft_wrap=True)
        sys.exit(1)
