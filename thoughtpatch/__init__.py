"""thoughtpatch: turn prompts into weight patches.

A prompt changes how a model answers; that change is written exactly as token-dependent weight updates
(:func:`extract`) and condensed into token-independent thought vectors and matrices.

>>> from thoughtpatch import load_model, load_prompt, default_probes, align, extract, check
>>> lm = load_model(None)  # doctest: +SKIP
>>> pairs = align(lm.tokenizer, load_prompt("examples/french.txt"), default_probes())  # doctest: +SKIP
>>> updates = extract(lm.model, pairs)  # doctest: +SKIP
>>> check(lm.model, updates) < 1e-3  # doctest: +SKIP
True
"""

__version__ = "0.1.0"

import sys  # noqa: E402
import types  # noqa: E402

from .errors import UsageError  # noqa: E402

# The rest loads on first use (PEP 562), so that commands that need no model (baking on the CPU) start
# without importing torch.
_LAZY = {
    "ARCHITECTURES": "architectures",
    "Architecture": "architectures",
    "architecture_for": "architectures",
    "Updates": "extract",
    "check": "extract",
    "extract": "extract",
    "teacher_answers": "extract",
    "LoadedModel": "models",
    "load_model": "models",
    "Prompt": "prompts",
    "TokenPairs": "prompts",
    "align": "prompts",
    "default_probes": "prompts",
    "load_probes": "prompts",
    "load_prompt": "prompts",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'thoughtpatch' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        if not (name in _LAZY and isinstance(value, types.ModuleType)):  # the function extract, not its module
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "__version__",
    "ARCHITECTURES",
    "Architecture",
    "architecture_for",
    "UsageError",
    "Updates",
    "check",
    "extract",
    "teacher_answers",
    "LoadedModel",
    "load_model",
    "Prompt",
    "TokenPairs",
    "align",
    "default_probes",
    "load_probes",
    "load_prompt",
]
