"""Write docs/cli.md, the CLI reference, from the typer app itself (tests/unit/test_docs.py keeps it in sync).

Usage: python scripts/cli_reference.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from thoughtpatch.cli import app

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _param(p) -> str:
    if p.param_type_name == "argument":
        name = f"`{p.name.upper()}`" + ("" if p.required else " (optional)")
        return f"| {name} | argument | {p.help or ''} |"
    flags = " / ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    flag = bool(getattr(p, "is_flag", False))
    default = "" if p.required or flag or p.default is None else f" Default: `{p.default}`."
    kind = "flag" if flag else "required" if p.required else "option"
    return f"| {flags} | {kind} | {(p.help or '').replace('|', '/')}{default} |"


def render() -> str:
    """The reference as Markdown: every command, its help, arguments, options and examples."""
    root = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        "Generated from the code by `python scripts/cli_reference.py`; a test fails when it is out of date.",
        "",
        (root.help or "").split("\n\n")[0],
        "",
        "Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad input (one line on stderr).",
        "",
    ]
    for name in sorted(root.commands):
        cmd = root.commands[name]
        lines += [f"## thoughtpatch {name}", "", (cmd.help or "").strip(), "", "| name | kind | description |"]
        lines += ["|---|---|---|", *(_param(p) for p in cmd.params if p.name != "help"), ""]
        if cmd.epilog:
            examples = [e.strip() for e in cmd.epilog.split("\n") if e.strip().startswith("thoughtpatch")]
            lines += ["```bash", *examples, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else "docs/cli.md is out of date: run python scripts/cli_reference.py")
    OUT.write_text(text)
    print(f"wrote {OUT}")
