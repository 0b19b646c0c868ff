"""Batch job files (YAML) for ``thoughtpatch run``: parsed and checked against the commands' own options.

A job is a mapping with ``steps`` (a list, run in order) and optional ``defaults`` (options given to every
step whose command has them). Each step is ``{command: {option: value, ...}}`` where the options are the
command's parameter names (``prompt_file``, ``output``, ``answer_tokens``, ...; dashes or underscores).
Paths are relative to the job file's folder. Flags take ``true``/``false``, repeatable options and the
patch list of ``merge`` take lists, other lists are joined with commas (``weights: [1, -0.5]``)::

    defaults: {model: ../models/tiny, answer_tokens: 4}
    steps:
      - transmute: {prompt_file: french.txt, output: out/french.safetensors}
      - merge: {patch_files: [out/french.safetensors], weights: [0.5], output: out/half.safetensors}
      - eval: {patch_file: out/half.safetensors, prompt_file: french.txt, queries: held.txt, caa: false}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from .errors import UsageError
from .files import read_bytes

__all__ = ["Step", "STEP_COMMANDS", "load_job"]

STEP_COMMANDS = ("extract", "condense", "transmute", "merge", "diff", "eval", "inspect", "apply")
_RUNNER = {"json_out", "quiet", "debug"}  # set by the runner itself
_PATHS = {"prompt_file", "output", "model", "probes", "queries", "updates_file", "patch_file", "patch_files",
          "first", "second", "prompts"}  # fmt: skip


@dataclass
class Step:
    """One step: the command's name and its argument list (``--json -q`` included)."""

    command: str
    argv: list[str]


def _path(value: object, folder: Path, where: str) -> str:
    if str(value) == "-":
        raise UsageError(f"{where}: '-' (stdin/stdout) cannot be used in a job file")
    return str(value) if Path(str(value)).is_absolute() else str(folder / str(value))


def _argv(cmd: click.Command, options: dict, folder: Path, where: str) -> list[str]:
    params = {p.name: p for p in cmd.params if p.name not in _RUNNER}
    given = {str(k).replace("-", "_"): v for k, v in options.items()}
    for key in given:
        if key not in params:
            raise UsageError(f"{where}: unknown key {key!r} (keys: {', '.join(sorted(params))})")
    missing = [k for k, p in params.items() if p.required and given.get(k) is None]
    if missing:
        raise UsageError(f"{where}: missing key {missing[0]!r}")
    positional, argv = [], []
    for key, value in given.items():
        p, at = params[key], f"{where}.{key}"
        if value is None:
            continue
        many = isinstance(p, click.Argument) and p.nargs == -1 or getattr(p, "multiple", False)
        values = value if isinstance(value, list) and many else [value]
        if isinstance(value, list) and not many:
            values = [",".join(str(v) for v in value)]
        if key in _PATHS and not (key == "model" and value == "default"):
            values = [_path(v, folder, at) for v in values]
        if getattr(p, "is_flag", False):
            if not isinstance(value, bool):
                raise UsageError(f"{at}: expected true or false, not {value!r}")
            flag = p.opts[0] if value else (p.secondary_opts or [None])[0]
            argv += [flag] if flag else []
            continue
        for v in values:
            try:
                p.type.convert(str(v), p, None)
            except click.BadParameter as exc:
                raise UsageError(f"{at}: {exc.format_message()}") from None
        if isinstance(p, click.Argument):
            positional += [str(v) for v in values]
        else:
            argv += [x for v in values for x in (p.opts[0], str(v))]
    return [*positional, *argv, "--json", "-q"]


def load_job(path: str, commands: dict[str, click.Command]) -> list[Step]:
    """Read and check a job file; every problem is a :class:`UsageError` naming the bad key."""
    import yaml

    try:
        job = yaml.safe_load(read_bytes(path, "job file").decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"job file {path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    folder = Path.cwd() if path == "-" else Path(path).parent
    if not isinstance(job, dict) or not isinstance(job.get("steps"), list) or not job["steps"]:
        raise UsageError(f"job file {path}: expected a mapping with a non-empty list under 'steps'")
    extra = set(job) - {"steps", "defaults"}
    if extra:
        raise UsageError(f"job file {path}: unknown key {sorted(extra)[0]!r} (keys: steps, defaults)")
    defaults = job.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UsageError(f"job file {path}: 'defaults' must be a mapping of options")
    known = {p.name for c in STEP_COMMANDS for p in commands[c].params} - _RUNNER
    for key in defaults:
        if str(key).replace("-", "_") not in known:
            raise UsageError(f"job file {path}: defaults: unknown key {key!r}")
    steps = []
    for n, item in enumerate(job["steps"]):
        where = f"{path}: steps[{n}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise UsageError(f"{where}: expected one command mapped to its options, e.g. '- transmute: {{...}}'")
        name, options = next(iter(item.items()))
        if name not in STEP_COMMANDS:
            raise UsageError(f"{where}: unknown command {name!r} (commands: {', '.join(STEP_COMMANDS)})")
        options = options or {}
        if not isinstance(options, dict):
            raise UsageError(f"{where}.{name}: options must be a mapping")
        cmd = commands[name]
        names = {p.name for p in cmd.params}
        merged = {k: v for k, v in defaults.items() if str(k).replace("-", "_") in names} | options
        steps.append(Step(name, _argv(cmd, merged, folder, f"{where}.{name}")))
    return steps
