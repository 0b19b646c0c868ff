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
    _quiet = quiet
    if quiet or not sys.stderr.isatty():
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _load(model: str | None, dtype: str, device: str):
    import torch

    from .models import load_model

    torch.set_grad_enabled(False)
    return load_model(model, dtype=dtype, device=device, log=log)


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
    lm = _load(model, dtype, device)
    with progress("extract", len(queries)) as step:
        result = run_extract(
            lm, prompt, queries, answer_tokens=answer_tokens, chat=chat, do_check=check,
            batch_size=batch_size, store_prompt=store_prompt, log=log, progress=step,
        )  # fmt: skip
    summary = result.summary()
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


def main() -> None:
    """Console entry point: run the app and map errors to exit codes."""
    debug = "--debug" in sys.argv or bool(os.environ.get("THOUGHTPATCH_DEBUG"))
    try:
        code = app(standalone_mode=False)
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
