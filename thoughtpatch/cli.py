"""The ``thoughtpatch`` command: parse, call the core, print. No math here.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad input (one line on stderr; ``--debug`` shows the
traceback). Progress and logs go to stderr; stdout carries only data, or one JSON document with ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import UsageError
from .progress import progress, set_quiet, spinner

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
_trust_remote_code = False
_signal = 0  # the signal that interrupted the run, if any

# Options defined once, reused by every command that runs a model.
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Local Hugging Face model folder, or a packaged model's name: smollm2-135m-instruct (the default), "
        "gemma-3-270m, qwen2.5-coder-0.5b-instruct.",
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
Plot = Annotated[str | None, typer.Option(help="Also draw the report into this PNG file (needs matplotlib).")]
# Condensation options, shared by condense and transmute (None: the mode's default).
Mode = Annotated[str, typer.Option(help="Preset: best (default), bakeable or compact; options below override it.")]
Attn = Annotated[
    str | None,
    typer.Option(help="Map of the attention output: full (per head), scalar (per head), cross (across heads) or none."),
]
AttnQuery = Annotated[
    bool | None, typer.Option("--attn-query/--no-attn-query", help="Query-dependent attention term (in memory only).")
]
Vector = Annotated[bool | None, typer.Option("--vector/--no-vector", help="Fit the thought vector.")]
Matrix = Annotated[bool | None, typer.Option("--matrix/--no-matrix", help="Fit the thought matrix.")]
Placement = Annotated[str | None, typer.Option(help="Where the vector acts: skip (after the MLP) or attn_out.")]
Rank = Annotated[int | None, typer.Option(help="Rank of the thought matrices (default: full; implies --matrix).")]
Ridge = Annotated[float | None, typer.Option(help="Matrix ridge, relative to the mean MLP-input energy.")]
AttnRidge = Annotated[float | None, typer.Option(help="Attention-map ridge, relative.")]
Down = Annotated[
    bool | None,
    typer.Option(
        "--down/--no-down",
        help="Fit the down map: a low-rank map from the MLP's hidden activations to the block output's remaining "
        "error (bakes into the MLP output projection; not on mixtures of experts).",
    ),
]
DownRidge = Annotated[
    float | None,
    typer.Option(
        help="Down-map ridge, relative to the mean MLP-activation energy, in every block (default: the mode's; "
        "bakeable picks it per block by cross-validation over the probes; implies --down)."
    ),
]
DownRank = Annotated[
    int | None, typer.Option(help="Rank of the down maps (default: the mode's, 128 in bakeable; implies --down).")
]
ValueMap = Annotated[
    bool | None,
    typer.Option(
        "--value-map/--no-value-map",
        help="Fit the value map: a change of the value projection, so that each head's output moves with what it "
        "attends to (bakes into v_proj; off in every mode: docs/fidelity.md; not with --kv).",
    ),
]
Strength = Annotated[float | None, typer.Option(help="Global strength alpha of every part.")]
Layers = Annotated[str | None, typer.Option(help="Blocks to patch, e.g. 0-11,15 (default: all).")]
Construction = Annotated[str | None, typer.Option(help="sequential (re-runs the model) or parallel.")]
Skip = Annotated[int | None, typer.Option(help="Leading tokens left unpatched (default: those both runs share).")]
Kv = Annotated[
    float | None,
    typer.Option(
        help="Virtual key/value slots per block: this share of the prompt's tokens, compressed (0: none; 1: the "
        "prompt's own keys and values, exact). In memory only."
    ),
]
KvMax = Annotated[int | None, typer.Option(help="At most this many virtual key/value slots per block.")]
KvBudget = Annotated[
    float | None,
    typer.Option(
        help="All slots together take at most this share of the model's parameters (e.g. 0.000865), shared "
        "out evenly over the blocks (the remainder one more in some)."
    ),
]
KvRefine = Annotated[
    int | None,
    typer.Option(
        help="Refit the slots' keys, multiplicities and values jointly to the head outputs for this many L-BFGS "
        "iterations (a multiple of 10; 0: no refit; the compact mode's default: 100)."
    ),
]
Similar = Annotated[
    int | None,
    typer.Option(
        help="Add this many queries like the probes, written by the model itself with the prompt as context "
        "(default: the mode's; 0: none)."
    ),
]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a model folder to run its own Python code (off by default).")
]


@app.callback()
def _root(trust_remote_code: TrustRemoteCode = False) -> None:
    """Turn prompts into weight patches for Hugging Face causal language models."""
    global _trust_remote_code
    _trust_remote_code = trust_remote_code


def log(msg: str) -> None:
    if not _quiet:
        err.print(f"[thoughtpatch] {msg}", markup=False, soft_wrap=True)


def _warn(message, category, *args, **kwargs) -> None:
    err.print(f"thoughtpatch: warning: {message}", markup=False, soft_wrap=True)


def _setup(quiet: bool, output: str | None = None, models: bool = True) -> None:
    """Logging and warnings for a command; its output path is checked before any work (``models=False``: the
    command loads no model, so transformers is not imported)."""
    import warnings

    from .errors import IllConditionedWarning
    from .files import check_output

    check_output(output)
    global _quiet
    _quiet = quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun only rank 0 speaks
    warnings.showwarning = _warn
    warnings.simplefilter("default", IllConditionedWarning)
    set_quiet(_quiet)
    if models and (quiet or not sys.stderr.isatty()):
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
    with spinner("loading the model (converting it on first use)"):
        lm = load_model(
            model, dtype=dtype, device=device, log=log, check=check, trust_remote_code=_trust_remote_code,
            device_map=device_map, max_memory=parse_max_memory(max_memory),
        )  # fmt: skip
    made = (meta or {}).get("base_model_revision")
    if made and lm.revision and made != lm.revision:
        err.print(
            f"thoughtpatch: warning: {what} was made from another revision of this model", markup=False, soft_wrap=True
        )
    return lm


def _emit_json(doc: object) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _one_stdin(*paths: str | None) -> None:
    """At most one input may be read from stdin."""
    if sum(p == "-" for p in paths) > 1:
        raise UsageError("only one input can be - (stdin) per command")


def _check_plot(plot: str | None) -> None:
    """A --plot file that can be written, and matplotlib, checked before any work."""
    import importlib.util

    from .files import check_output

    if plot == "-":
        raise UsageError("--plot needs a file name (a PNG does not go to stdout)")
    try:
        check_output(plot)
    except UsageError as exc:
        raise UsageError(f"--plot {str(exc).removeprefix('output ')}") from None
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'thoughtpatch[plot]'")


def _stdout_once(json_out: bool, output: str | None) -> None:
    if json_out and output == "-":
        raise UsageError("--json and -o - both want stdout; write the output to a file")


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
    similar: Annotated[
        int,
        typer.Option(
            help="Add this many queries like the probes, written by the model itself with the prompt as context "
            "(transmute --bakeable adds 384)."
        ),
    ] = 0,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Record the exact token-dependent implicit updates of a prompt, per query token and block."""
    from .distributed import is_main, world
    from .pipeline import run_extract
    from .prompts import load_probes, load_prompt

    _setup(quiet, output)
    if answer_tokens < 0 or batch_size < 1 or similar < 0:
        raise UsageError("--answer-tokens and --similar must be >= 0 and --batch-size >= 1")
    _one_stdin(prompt_file, probes)
    _stdout_once(json_out, output)
    prompt = load_prompt(prompt_file)
    queries = load_probes(probes)
    lm = _load(model, dtype, device, device_map=device_map, max_memory=max_memory)
    with progress("extract", len(queries) + similar) as step:
        result = run_extract(
            lm, prompt, queries, answer_tokens=answer_tokens, chat=chat, do_check=check, batch_size=batch_size,
            store_prompt=store_prompt, output=output, similar=similar, log=log, progress=step,
        )  # fmt: skip
    if not is_main():  # under torchrun rank 0 writes the one output
        return
    summary = result.summary()
    summary["processes"] = world()[1]
    if output:
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
    if "expert_choices" in s:
        table.add_row(
            "expert choices differing", f"{s['expert_choices']['differ']} of {s['expert_choices']['choices']}"
        )
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
    if "down_rank" in given or "down_ridge" in given:
        given.setdefault("down", True)
    if "down_ridge" in given:  # a ridge given is used in every block, not chosen by cross-validation
        given["down_ridge_grid"] = None
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
    down: Down = None,
    down_ridge: DownRidge = None,
    down_rank: DownRank = None,
    value_map: ValueMap = None,
    strength: Strength = None,
    layers: Layers = None,
    construction: Construction = None,
    skip: Skip = None,
    kv: Kv = None,
    kv_max: KvMax = None,
    kv_budget: KvBudget = None,
    kv_refine: KvRefine = None,
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
    from .formats import read_pairs, updates_from_bytes
    from .pipeline import run_condense

    _setup(quiet, output)
    _stdout_once(json_out, output)
    cfg = _config(
        mode, attn=attn, attn_query=attn_query, vector=vector, matrix=matrix, placement=placement, rank=rank,
        ridge=ridge, attn_ridge=attn_ridge, strength=strength, layers=layers, construction=construction, skip=skip,
        kv=kv, kv_max=kv_max, kv_budget=kv_budget, kv_refine=kv_refine, down=down, down_ridge=down_ridge,
        down_rank=down_rank, value_map=value_map,
    )  # fmt: skip
    what = f"updates file {updates_file}"
    if cfg.construction == "parallel":  # condenses the updates themselves
        updates, umeta = updates_from_bytes(read_bytes(updates_file, "updates file"), what)
    else:  # re-runs the model: needs only the token ids
        updates, umeta = read_pairs(updates_file, what)
    lm = _load(
        model or umeta.get("base_model"), dtype, device, umeta, what, cfg, device_map, max_memory,
    )  # fmt: skip
    log(f"condensing {umeta['tokens']} query tokens ({cfg.construction})")
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
    down: Down = None,
    down_ridge: DownRidge = None,
    down_rank: DownRank = None,
    value_map: ValueMap = None,
    strength: Strength = None,
    layers: Layers = None,
    skip: Skip = None,
    kv: Kv = None,
    kv_max: KvMax = None,
    kv_budget: KvBudget = None,
    kv_refine: KvRefine = None,
    similar: Similar = None,
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

    _setup(quiet, output)
    _one_stdin(prompt_file, probes)
    _stdout_once(json_out, output)
    if bakeable and compact:
        raise UsageError("--bakeable and --compact are different modes; pick one")
    mode = "bakeable" if bakeable else "compact" if compact else mode
    cfg = _config(
        mode, attn=attn, attn_query=attn_query, vector=vector, matrix=matrix, placement=placement, rank=rank,
        ridge=ridge, attn_ridge=attn_ridge, strength=strength, layers=layers, skip=skip, batch_size=batch_size,
        kv=kv, kv_max=kv_max, kv_budget=kv_budget, kv_refine=kv_refine, down=down, down_ridge=down_ridge,
        down_rank=down_rank, value_map=value_map,
    )  # fmt: skip
    if answer_tokens < 0:
        raise UsageError("--answer-tokens must be >= 0")
    from .constants import SIMILAR_QUERIES

    similar = SIMILAR_QUERIES.get(mode, 0) if similar is None else similar
    if similar < 0:
        raise UsageError("--similar must be >= 0")
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
            similar=similar,
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
    _setup(quiet, models=not save)
    if bool(prompt) == bool(save):
        raise UsageError("give --prompt (generate with the patches in memory) or --save DIR (bake them), one of them")
    if patch_files.count("-") > 1:
        raise UsageError("only one patch can come from stdin (-)")
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    read = [_read_patch_bytes(f, numpy=bool(save) and device == "cpu") for f in patch_files]
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


def _read_patch_bytes(path: str, numpy: bool = False):
    """A patch and the sha256 of its file's bytes (``numpy``: parts as numpy arrays, for baking on the CPU)."""
    import hashlib

    from .files import read_bytes
    from .patch import patch_from_bytes

    data = read_bytes(path, "patch")
    return patch_from_bytes(data, f"patch {path}", numpy), hashlib.sha256(data).hexdigest()


def _bake(files: list[str], read: list, base: str | None, save: str, scale: float, device: str, json_out: bool):
    """Bake the patches into a copy of the base model's folder (streamed; the model is never loaded whole)."""
    from pathlib import Path

    from .bake import bake_checkpoint, config_view, patch_record
    from .models import model_folder, resolve_device
    from .schema import check_fingerprint

    with spinner("preparing the model"):
        folder = model_folder(base, log)
    config = config_view(folder)
    records, patches = [], []
    for f, (p, sha) in zip(files, read, strict=True):
        check_fingerprint(p.meta, config, f"patch {f}")
        patches.append(p.scaled(scale) if scale != 1.0 else p)
        records.append(patch_record(p, "stdin" if f == "-" else Path(f).name, sha, scale))
    log(f"baking {len(patches)} patch(es) into a copy of {folder.name}: {save}")
    with progress("bake (shards)", None) as step:
        summary = bake_checkpoint(
            folder,
            save,
            patches,
            records,
            device=device if device == "cpu" else str(resolve_device(device)),
            log=log,
            progress=step,
        )
    _report(summary, json_out, None, "baked checkpoint")


@app.command(
    epilog="Examples:\n\n"
    "  thoughtpatch export french.safetensors --to peft -o french-lora\n\n"
    "  thoughtpatch export french.safetensors --to gguf -o french-gguf --drop-vectors\n\n"
    "  thoughtpatch export french.safetensors --to peft --rank 16 -o french-lora-r16 --json"
)
def export(
    patch_file: Annotated[str, typer.Argument(help="Patch file from transmute --mode bakeable (- for stdin).")],
    to: Annotated[
        str,
        typer.Option(
            "--to", help="peft (LoRA adapter for PEFT, vLLM, TGI) or gguf (llama.cpp LoRA and control vector)."
        ),
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="New folder to write the files into.")],
    model: Model = None,
    rank: Annotated[
        int | None, typer.Option(help="SVD-compress each LoRA delta to this rank (reports the relative error).")
    ] = None,
    drop_vectors: Annotated[
        bool,
        typer.Option(
            "--drop-vectors", help="Leave out (with a warning) thought vectors or constants the target cannot hold."
        ),
    ] = False,
    scale: Annotated[float, typer.Option(help="Multiply the patch by this.")] = 1.0,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Export a bakeable patch as a PEFT LoRA adapter or as llama.cpp GGUF files (needs the base weights)."""
    from .bake import config_view
    from .export import export_patch
    from .formats import check_fingerprint
    from .models import model_folder

    _setup(quiet)
    patch = _read_patch(patch_file)
    base = model or patch.meta.get("base_model")
    with spinner("preparing the model"):
        folder = model_folder(base, log)
    check_fingerprint(patch.meta, config_view(folder), f"patch {patch_file}")
    if scale != 1.0:
        patch = patch.scaled(scale)
    with progress(f"export to {to} (modules)", None) as step:
        summary = export_patch(
            patch, folder, output, to, rank=rank, drop_vectors=drop_vectors, what=f"patch {patch_file}", log=log,
            progress=step,
        )  # fmt: skip
    _report(summary, json_out, None, f"{to} export")


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
    plot: Plot = None,
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

    _check_plot(plot)
    _setup(quiet)
    if answer_tokens < 1:
        raise UsageError("--answer-tokens must be >= 1")
    _one_stdin(patch_file, prompt_file, queries, probes)
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
    if plot:
        from .files import write_bytes
        from .plots import eval_png

        write_bytes(plot, eval_png(report))
        report["plot"] = plot
    if json_out:
        _emit_json(report)
        return
    table = Table(title=f"fidelity on {report['queries']} held-out queries ({report['answer_tokens']} answer tokens)")
    for c in ("method", "KL (nats)", "top-1", "exact", "parameters"):
        table.add_column(c)
    for name, r in report["methods"].items():
        table.add_row(name, f"{r['kl']:.4f}", f"{r['top1']:.3f}", f"{r['exact']:.3f}", str(r["parameters"]))
    Console(highlight=False).print(table)


# ------------------------------------------------------------------------------------------ patch algebra, diffs, jobs


def _floats(spec: str | None, what: str) -> list[float] | None:
    if spec is None:
        return None
    try:
        return [float(x) for x in spec.split(",")]
    except ValueError:
        raise UsageError(f"{what} {spec!r}: expected comma-separated numbers like 1,-0.5") from None


def _tables(doc: dict, title: str, to_stderr: bool) -> None:
    """A key/value table of the scalars, and one table per list of rows."""
    stream = sys.stderr if to_stderr else sys.stdout
    out = Console(file=stream, highlight=False, width=None if stream.isatty() else 240)  # pipes: no folding
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, list | dict) else str(v)  # noqa: E731
    table = Table(title=title, show_header=False)
    for k, v in doc.items():
        if not (isinstance(v, list) and v and isinstance(v[0], dict)):
            table.add_row(k, fmt(v))
    out.print(table)
    for k, v in doc.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            cols = list(dict.fromkeys(c for row in v for c in row))
            rows = Table(title=k)
            for c in cols:
                rows.add_column(c)
            for row in v:
                rows.add_row(*(fmt(row[c]) if c in row else "" for c in cols))
            out.print(rows)


@app.command(
    epilog="Examples:\n\n"
    "  thoughtpatch merge french.safetensors polite.safetensors -o both.safetensors --weights 1,0.5\n\n"
    "  thoughtpatch merge a.safetensors --weights=-1 -o minus_a.safetensors       (negation)\n\n"
    "  thoughtpatch merge a.safetensors b.safetensors --method svd --rank 8 -o ab8.safetensors"
)
def merge(
    patch_files: Annotated[list[str], typer.Argument(help="Patch files (one of them may be - for stdin).")],
    output: Output = "-",
    weights: Annotated[
        str | None, typer.Option(help="A weight per patch, comma-separated (default: all 1); -1 negates.")
    ] = None,
    method: Annotated[
        str, typer.Option(help="concat: exact, ranks add up; svd: re-compress every matrix and down map to --rank.")
    ] = "concat",
    rank: Annotated[int | None, typer.Option(help="Rank for --method svd.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Merge patches made for different base models.")] = False,
    skip: Annotated[
        int | None,
        typer.Option(
            help="Leading tokens the merge leaves unpatched where the parents differ (default: their largest)."
        ),
    ] = None,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Weighted sum of patches (negation and scaling with one patch), exact per site; optional SVD re-compression."""
    from .algebra import merge as merge_patches
    from .algebra import recompress

    _setup(quiet)
    _one_stdin(*patch_files)
    _stdout_once(json_out, output)
    if method not in ("concat", "svd"):
        raise UsageError(f"--method must be concat or svd, not {method!r}")
    if skip is not None and skip < 0:
        raise UsageError("--skip must be >= 0")
    if (method == "svd") != (rank is not None):
        raise UsageError("--method svd needs --rank K (and --rank goes with --method svd)")
    read = [_read_patch_bytes(p) for p in patch_files]
    skips = sorted({p.skip for p, _ in read})
    if skip is None and len(skips) > 1:
        skip = skips[-1]
        log(f"the patches leave {skips} leading tokens unpatched; the merge leaves {skip} (exact past them)")
    patch = merge_patches(
        [p for p, _ in read], _floats(weights, "--weights"), parents=[h for _, h in read], force=force, skip=skip
    )
    doc: dict = {
        "output": output,
        "parents": patch_files,
        "weights": _floats(weights, "--weights") or [1.0] * len(read),
    }
    if method == "svd":
        patch, doc["recompression"] = recompress(patch, rank)
        log(f"SVD to rank {rank}: relative error {doc['recompression']['relative_error']:.3g}")
        if "down" in doc["recompression"]:
            log(
                f"SVD of the down maps to rank {rank}: relative error {doc['recompression']['down']['relative_error']:.3g}"
            )
    _write_patch(patch, output)
    doc |= {"parameters": patch.numel(), "layers": sorted(patch.layers), "ranks": {str(i): lp.rank for i, lp in sorted(patch.layers.items())}}  # fmt: skip
    _report(doc, json_out, output, "merged patch")


@app.command(
    epilog="Examples:\n\n"
    "  thoughtpatch diff a.safetensors b.safetensors              (patch vs patch)\n\n"
    "  thoughtpatch diff a.safetensors --prompts asks.txt --json  (patch vs its base model, with KL)\n\n"
    "  thoughtpatch diff a.safetensors b.safetensors --plot ab.png  (per-block figure)\n\n"
    "  thoughtpatch diff ./base-model ./tuned-model -o tuned.safetensors --rank 16   (model vs model)"
)
def diff(
    first: Annotated[str, typer.Argument(help="Patch file (- for stdin) or model folder.")],
    second: Annotated[
        str | None, typer.Argument(help="Patch file or model folder (default for a patch: its base model).")
    ] = None,
    model: Model = None,
    prompts: Annotated[
        str | None, typer.Option(help="Patch vs model: user messages (one per line or JSONL) for a KL diff.")
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Model vs model: write a low-rank patch of the MLP-input changes."),
    ] = None,
    rank: Annotated[int | None, typer.Option(help="Model vs model: rank of that patch (default: numerical).")] = None,
    plot: Plot = None,
    chat: Chat = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Compare patches and models: patch vs patch, patch vs base model, model folder vs model folder."""
    from pathlib import Path

    _check_plot(plot)  # before torch is imported: a bad path fails at once
    from . import compare

    _setup(quiet)
    _one_stdin(first, second, prompts)
    _stdout_once(json_out, output)
    folders = [p is not None and p != "-" and Path(p).is_dir() for p in (first, second)]
    if rank is not None and rank < 1:
        raise UsageError("--rank must be >= 1")
    if all(folders):
        if prompts:
            raise UsageError("--prompts goes with a patch vs its model")
        from .formats import fingerprint
        from .models import load_model
        from .pipeline import run_model_diff

        base = _load(first, dtype, device)

        def same_shape(config) -> None:
            ours, theirs = fingerprint(base.model.config), fingerprint(config)
            for k in (k for k in ours if ours[k] != theirs[k]):
                raise UsageError(f"{first} and {second} differ in {k} ({ours[k]} vs {theirs[k]}); diff needs one shape")

        changed = load_model(second, dtype=dtype, device=device, log=log, check=same_shape)
        doc, patch = run_model_diff(base, changed, rank)
        if output:
            _write_patch(patch, output)
            doc["output"] = output
    elif output or rank is not None:
        raise UsageError("-o and --rank go with a diff of two model folders")
    elif second is not None and not any(folders):
        doc = compare.diff_patches(_read_patch(first), _read_patch(second))
    else:
        path, folder = (second, first) if folders[0] else (first, second)
        patch = _read_patch(path)
        lm = _load(folder or model or patch.meta.get("base_model"), dtype, device, patch.meta, f"patch {path}")
        doc = compare.diff_patch_model(patch, lm.model)
        if prompts:
            from .prompts import free_ids, load_probes

            asks = [free_ids(lm.tokenizer, q, chat) for q in load_probes(prompts)]
            doc["functional"] = compare.functional_diff(lm.model, patch, asks)
    if plot:
        from .files import write_bytes
        from .plots import diff_png

        write_bytes(plot, diff_png(doc, f"{first} vs {second or 'its base model'}"))
        doc["plot"] = plot
    if json_out:
        _emit_json(doc)
    else:
        _tables(doc, doc["kind"].replace("_", " "), output == "-")


@app.command(
    "run",
    epilog="Example:\n\n  thoughtpatch run configs/example.yaml --json-out summary.json\n\n"
    "A job file lists steps (transmute, extract, condense, merge, diff, eval, inspect, apply), each with the "
    "command's options as keys; paths are relative to the job file's folder. See configs/example.yaml.",
)
def run_job(
    job_file: Annotated[str, typer.Argument(help="YAML job file (- for stdin: paths relative to the current folder).")],
    json_out_file: Annotated[
        str | None, typer.Option("--json-out", help="Also write the JSON summary to this file.")
    ] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Run a batch job (YAML): steps in order, a JSON summary on stdout; exit 1 when a step fails."""
    import io
    import time
    from contextlib import redirect_stdout
    from pathlib import Path

    from .files import write_bytes
    from .jobs import load_job

    _setup(quiet)
    steps = load_job(job_file, typer.main.get_command(app).commands)
    summary: dict = {"job": job_file, "ok": True, "steps": []}
    for n, step in enumerate(steps):
        rec = {"step": n, "command": step.command, "argv": step.argv}
        summary["steps"].append(rec)
        if not summary["ok"]:
            rec["status"] = "skipped"
            continue
        log(f"step {n}: {step.command}")
        buf, t = io.StringIO(), time.perf_counter()
        try:
            for opt, value in zip(step.argv, step.argv[1:], strict=False):
                if opt == "--output":  # a job's output folders are made for it
                    Path(value).parent.mkdir(parents=True, exist_ok=True)
            with redirect_stdout(buf):
                app([step.command, *step.argv], standalone_mode=False)
            rec |= {"status": "ok", "result": json.loads(buf.getvalue())}
        except Exception as exc:  # a step's failure is reported, the rest are skipped
            summary["ok"] = False
            msg = (
                exc.format_message() if hasattr(exc, "format_message") else str(exc).splitlines()[0] if str(exc) else ""
            )
            rec |= {"status": "failed", "error": f"{type(exc).__name__}: {msg}"}
            log(f"step {n} failed: {msg}")
        rec["seconds"] = round(time.perf_counter() - t, 3)
        _setup(quiet)  # a step's --quiet must not silence the job's own log
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    if json_out_file:
        write_bytes(json_out_file, text.encode())
    sys.stdout.write(text)
    if not summary["ok"]:
        raise typer.Exit(1)


def _interrupt(signum: int, frame) -> None:
    """SIGTERM behaves like Ctrl-C: the run unwinds, temp files are removed, nothing partial is left."""
    global _signal
    _signal = signum
    raise KeyboardInterrupt


def _interrupted() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not cut the cleanup short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    name = "SIGTERM" if _signal == signal.SIGTERM else "SIGINT"
    err.print(f"thoughtpatch: interrupted by {name}; no output was written", markup=False)
    sys.exit(128 + (_signal or signal.SIGINT))


def main() -> None:
    """Console entry point: run the app and map errors to exit codes."""
    import signal

    debug = "--debug" in sys.argv or bool(os.environ.get("THOUGHTPATCH_DEBUG"))
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        code = app(standalone_mode=False)
        if _signal:  # the CLI library turns an interrupt into a return code of 130
            _interrupted()
        if code == 130:  # an interrupt a command's own handler turned into KeyboardInterrupt (baking)
            err.print("thoughtpatch: interrupted; no output was written", markup=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()
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
