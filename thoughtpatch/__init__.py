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

from .architectures import ARCHITECTURES, Architecture, architecture_for  # noqa: E402
from .errors import UsageError  # noqa: E402
from .extract import Updates, check, extract, teacher_answers  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402
from .prompts import Prompt, TokenPairs, align, default_probes, load_probes, load_prompt  # noqa: E402

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
