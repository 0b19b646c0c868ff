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

import typing
from dataclasses import dataclass
from pathlib import Path

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


def _base(hint) -> type:
    """``int`` for ``int | None``, ``list`` for ``list[str]``: the type a YAML value must have."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_origin(hint) or hint if typing.get_origin(hint) is list or not args else _base(args[0])


def _check(value: object, kind: type, at: str) -> str:
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str, int, float), list: (str, int, float)}
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, ok.get(kind, (str,))):
        raise UsageError(f"{at}: expected {'true or false' if kind is bool else kind.__name__}, not {value!r}")
    return str(value)


def _argv(cmd, options: dict, folder: Path, where: str) -> list[str]:
    """The command line for ``cmd`` (a command of the ``thoughtpatch`` app) from a step's options."""
    params = {p.name: p for p in cmd.params if p.name not in _RUNNER}
    hints = typing.get_type_hints(cmd.callback)
    given = {str(k).replace("-", "_"): v for k, v in options.items()}
    for key in given:
        if key not in params:
            raise UsageError(f"{where}: unknown key {key!r} (keys: {', '.join(sorted(params))})")
    missing = [k for k, p in params.items() if p.required and given.get(k) is None]
    if missing:
        raise UsageError(f"{where}: missing key {missing[0]!r}")
    positional, argv = [], []
    for key, value in given.items():
        p, at, kind = params[key], f"{where}.{key}", _base(hints[key])
        if value is None:
            continue
        if getattr(p, "is_flag", False):
            _check(value, bool, at)
            flag = p.opts[0] if value else (p.secondary_opts or [None])[0]
            argv += [flag] if flag else []
            continue
        if kind is list or getattr(p, "multiple", False):
            values = [_check(v, str, at) for v in (value if isinstance(value, list) else [value])]
        elif isinstance(value, list):  # weights: [1, -0.5] -> "1,-0.5"
            values = [",".join(_check(v, str, at) for v in value)]
        else:
            values = [_check(value, kind, at)]
        if key in _PATHS and not (key == "model" and value == "default"):
            values = [_path(v, folder, at) for v in values]
        if p.param_type_name == "argument":
            positional += values
        else:
            argv += [x for v in values for x in (p.opts[0], v)]
    runner = {p.name for p in cmd.params} & {"json_out", "quiet"}
    return [*positional, *argv, *(["--json"] if "json_out" in runner else []), *(["-q"] if "quiet" in runner else [])]


def load_job(path: str, commands: dict) -> list[Step]:
    """Read and check a job file against ``commands`` (name -> the app's command); errors name the bad key."""
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
