"""Bake patches into a checkpoint that loads with plain ``transformers`` (``apply --save``).

Every bakeable part folds exactly into standard weights. Per block, with ``W`` in the ``(out, in)`` layout
(GPT-2's Conv1D stores the transpose) and ``c`` a bias:

* attention map ``D`` (per head) and its constant ``b`` at the input of ``o_proj``: ``W_o <- W_o (I + D)``,
  ``c_o <- c_o + W_o b``;
* thought vector ``v``: ``attn_out`` adds to ``c_o`` (where no norm follows the attention), ``skip`` to the
  down projection's bias (where no norm follows the MLP), divided by the family's branch scale (Granite's
  ``residual_multiplier``) where the branch is scaled before it joins the residual;
* thought matrix ``M = B A^T``: every MLP input ``W <- W (I + M)`` (in a mixture of experts: the router, every
  expert's input projections and any shared expert with its gate, as the checkpoint stores them);
* down map ``G = B A^T`` on the MLP's hidden activations: the output projection ``W_out <- W_out + B A^T``
  (mixtures of experts have no single output projection and refuse it).

Patches installed together run in order (the first patch's hook first), so they fold last to first:
the linear map ``L`` becomes ``L o T_n o ... o T_1``. The math runs in float32 (float64 for float64
tensors) and is cast back to each tensor's dtype: in numpy on the CPU (torch is not imported), on torch tensors
with ``device="cuda"``, one code for both. Biases a family only has behind a config flag are created (zeros where the patch puts
nothing) and the flag is turned on; a family without such a flag refuses, as do query-dependent parts
and patches that leave leading tokens unpatched: weights cannot express them.

Streaming (:func:`bake_checkpoint`): every shard is checked (``safetensors.safe_open``) before anything
is written, then rewritten one at a time: bytes of the tensors no patch touches are copied unchanged (in the
kernel), each touched tensor is read, baked and written on its own, shards with nothing to change are copied
whole, new biases go into their weight's shard. Everything is written into a temporary folder next to the target and
renamed at the end, so an error or a signal leaves no partial output.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import __version__
from .architectures import Architecture, architecture_for
from .errors import UsageError
from .files import array_from_bytes, array_to_bytes, partial_folder
from .patch import LayerPatch, Patch, validate_for

__all__ = [
    "BakePlan",
    "plan_bake",
    "bake_tensor",
    "bake_checkpoint",
    "model_card",
    "config_sizes",
    "config_view",
    "patch_record",
]

ALTERNATIVES = "keep it in memory (thoughtpatch apply --prompt) or export it (thoughtpatch export)"
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".safetensors")
_DTYPES = ("F64", "F32", "F16", "BF16")
_CHUNK = 16 << 20


def config_sizes(config: dict, arch: Architecture) -> tuple[int, int, int, int]:
    """(hidden size, blocks, heads, head size) from a config.json's contents."""
    names = dict(arch.config_names)
    try:
        hidden, layers, heads = (
            int(config[names.get(k, k)]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"config.json lacks a usable {exc} entry") from None
    return hidden, layers, heads, int(config.get("head_dim") or hidden // heads)


def config_view(folder: Path) -> SimpleNamespace:
    """A model folder's config.json as attributes under their standard names (no ``transformers`` import)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UsageError(f"--model {folder}: no config.json there, so it is not a Hugging Face model folder")
    config = _json(path)
    arch = architecture_for(SimpleNamespace(**config))
    return SimpleNamespace(**config, **{k: config.get(v) for k, v in arch.config_names})


@dataclass
class BakePlan:
    """What baking changes: each touched tensor's role, the new zero biases and the config flags to turn on."""

    layers: dict[int, list[tuple[LayerPatch, str]]]  # per block: (part, placement), last patch first
    roles: dict[str, tuple[str, int]]  # tensor name -> (role, block)
    new: dict[str, str] = field(default_factory=dict)  # new bias -> the weight it belongs to
    flags: list[str] = field(default_factory=list)
    heads: int = 1
    head_dim: int = 1
    transposed: bool = False
    branch_scale: float = 1.0  # vectors baked into a branch's bias are divided by it
    device: str = "cpu"
    cache: dict = field(default_factory=dict, repr=False)


def _refuse(what: str, i: int, part: str, why: str) -> UsageError:
    return UsageError(f"{what}: block {i}'s {part} cannot be baked exactly ({why}); {ALTERNATIVES}")


def plan_bake(
    patches: list[Patch],
    arch: Architecture,
    config: dict,
    device: str = "cpu",
    names: list[str] | None = None,
    headers: dict[str, dict] | None = None,
) -> BakePlan:
    """Check that every patch bakes exactly into this family's weights and say which tensors change.

    ``headers`` (the checkpoint's tensor headers) name the tensors that read ``z`` where the family declares
    them by pattern (mixtures of experts store each expert's matrices apart)."""
    hidden, n_layers, heads, head_dim = config_sizes(config, arch)
    names = names or [f"patch {k + 1}" for k in range(len(patches))]
    need: dict[str, dict[int, str]] = {"attn": {}, "mlp": {}}  # biases needed: block -> the patch needing it
    inner = _mlp_width(arch, config, headers or {})
    for patch, what in zip(patches, names, strict=True):
        validate_for(patch, hidden, n_layers, heads, head_dim, what, inner=inner)
        if patch.has_slots:
            raise UsageError(
                f"{what} carries virtual key/value slots (--kv), which weights cannot express; rebuild it with "
                f"--mode bakeable, or {ALTERNATIVES}"
            )
        if patch.skip:
            raise UsageError(
                f"{what} leaves its first {patch.skip} tokens unpatched, which weights cannot express; rebuild it "
                f"with --mode bakeable or --skip 0, or {ALTERNATIVES}"
            )
        for i, lp in sorted(patch.layers.items()):
            if lp.in_memory_only:
                raise _refuse(what, i, "query-dependent attention term", "it reads the query")
            if lp.down_a is not None and arch.mlp_out is None:
                raise _refuse(what, i, "down map", f"{arch.name} models have no single MLP output projection")
            if lp.value_weight is not None and arch.value_proj is None:
                raise _refuse(what, i, "value map", f"{arch.name} models fuse it with the query and key projections")
            if lp.vector is not None:
                after = arch.post_attn_norm if patch.placement == "attn_out" else arch.post_mlp_norm
                if after:
                    raise _refuse(what, i, f"thought vector ({patch.placement})", f"the norm {after} follows it")
                need["attn" if patch.placement == "attn_out" else "mlp"].setdefault(i, what)
            if lp.attn_bias is not None:
                need["attn"].setdefault(i, what)
    plan = BakePlan(
        {i: [(p.layers[i], p.placement) for p in reversed(patches) if i in p.layers] for i in range(n_layers)},
        {},
        heads=heads,
        head_dim=head_dim,
        transposed=arch.transposed,
        branch_scale=arch.branch_scale(config),
        device=device,
    )
    plan.layers = {i: v for i, v in plan.layers.items() if v}
    for i, parts in plan.layers.items():
        pre = f"{arch.layers}.{i}."
        if any(lp.attn_weight is not None for lp, _ in parts):
            plan.roles[pre + arch.attn_out + ".weight"] = ("o.weight", i)
        if any(lp.matrix_a is not None for lp, _ in parts):
            plan.roles.update(dict.fromkeys(_mlp_input_tensors(arch, pre, headers or {}), ("mlp_in.weight", i)))
        if any(lp.down_a is not None for lp, _ in parts):
            plan.roles[pre + arch.mlp_out + ".weight"] = ("down.weight", i)
        if any(lp.value_weight is not None for lp, _ in parts):
            plan.roles[pre + arch.value_proj + ".weight"] = ("v.weight", i)
    for group, flag, modules, out in (
        ("attn", arch.attn_bias_flag, arch.attn_bias_modules, arch.attn_out),
        ("mlp", arch.mlp_bias_flag, arch.mlp_bias_modules, arch.mlp_out),
    ):
        if not need[group]:
            continue
        if flag is None:
            part = "attention output bias or attn_out vector" if group == "attn" else "thought vector (skip)"
            i = min(need[group])
            raise _refuse(
                need[group][i], i, part, f"{arch.name} models have no bias on {out or 'the output of their experts'}"
            )
        plan.roles.update(
            {f"{arch.layers}.{i}.{out}.bias": ("o.bias" if group == "attn" else "down.bias", i) for i in need[group]}
        )
        if flag != "always" and not config.get(flag):
            plan.flags += [flag] * (flag not in plan.flags)
            plan.new.update(
                {
                    f"{arch.layers}.{i}.{m}.bias": f"{arch.layers}.{i}.{m}.weight"
                    for i in range(n_layers)
                    for m in modules
                }
            )
    return plan


def _mlp_width(arch: Architecture, config: dict, headers: dict[str, dict]) -> int | None:
    """The width of the MLP's hidden activations: the output projection's input size in the checkpoint (or the
    config's, where no headers are given); None where unknown."""
    h = headers.get(f"{arch.layers}.0.{arch.mlp_out}.weight") if arch.mlp_out else None
    if h is not None:
        return int(h["shape"][0 if arch.transposed else -1])
    return config.get("intermediate_size") or config.get("n_inner")


def _mlp_input_tensors(arch: Architecture, pre: str, headers: dict[str, dict]) -> list[str]:
    """The checkpoint tensors of the block ``pre`` whose matrices read ``z``."""
    if not arch.mlp_input_tensors:
        return [pre + m + ".weight" for m in arch.mlp_inputs]
    mine = {k[len(pre) :]: h for k, h in headers.items() if k.startswith(pre)}
    fused = sorted(k for k, h in mine.items() if len(h["shape"]) > 2)
    found = [pre + k for k in mine if any(fnmatch.fnmatchcase(k, g) for g in arch.mlp_input_tensors)]
    if fused or not found:
        why = f"its tensor {pre + fused[0]!r} holds several experts" if fused else "no tensor there reads z"
        raise UsageError(
            f"{arch.name} checkpoint: cannot bake the thought matrix of block {pre.rstrip('.')} ({why}; known "
            f"layouts: {', '.join(arch.mlp_input_tensors)}); {ALTERNATIVES}"
        )
    return found


def _calc(a: np.ndarray, device: str = "cpu"):
    """A stored tensor as the math runs on it: float32 (float64 kept), numpy on the CPU, else torch on ``device``."""
    a = a.astype(np.float64 if a.dtype == np.float64 else np.float32, copy=False)
    if device == "cpu":
        return a
    import torch

    return torch.from_numpy(np.array(a)).to(device)


def _cast(a, like):
    """A patch part (numpy or torch) as an array of ``like``'s kind, dtype and device."""
    if isinstance(like, np.ndarray):
        return (a if isinstance(a, np.ndarray) else a.detach().cpu().double().numpy()).astype(like.dtype, copy=False)
    import torch

    return (torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a).to(like)


def _times_map(w, a, plan: BakePlan):
    """``W D`` for the attention map ``D``: block-diagonal per head (``a``: (H, hd, hd) or a scalar per head) or
    across the heads (``a``: (1, H*hd, H*hd))."""
    a = _cast(a, w)
    if a.ndim == 1:
        return (w.reshape(w.shape[0], plan.heads, plan.head_dim) * a[:, None]).reshape(w.shape)
    h = w.reshape(w.shape[0], a.shape[0], a.shape[-1])
    if isinstance(w, np.ndarray):  # one pass over W (a batched matmul over heads copies W twice)
        return np.einsum("ohi,hij->ohj", h, a).reshape(w.shape)
    import torch

    return torch.einsum("ohi,hij->ohj", h, a).reshape(w.shape)


def _times_matrix(w, lp: LayerPatch, plan: BakePlan):
    """``W B A^T``: through the factors when the rank is low, else through ``M = B A^T`` (kept for the block's
    next MLP input matrix)."""
    a, b = _cast(lp.matrix_a, w), _cast(lp.matrix_b, w)
    if 2 * a.shape[1] < a.shape[0]:
        return (w @ b) @ a.T
    key = (id(lp), str(w.dtype), str(getattr(w, "device", "cpu")))
    if key not in plan.cache:
        plan.cache = {key: b @ a.T}  # one matrix at a time
    return w @ plan.cache[key]


def bake_tensor(name: str, x, plan: BakePlan, read: Callable[[str], object]):
    """The baked value of one checkpoint tensor ``x`` (float32 or float64, numpy or torch: the result is the
    same kind); ``read(name)`` gives another original tensor (a bias's weight)."""
    role = plan.roles.get(name)
    if role is None:
        return x
    kind, i = role
    flip = plan.transposed and kind.endswith("weight")
    x = x.T if flip else x
    w_o = None
    if kind == "o.bias":
        w_o = _cast(read(name.removesuffix("bias") + "weight"), x)
        w_o = w_o.T if plan.transposed else w_o
    for lp, placement in plan.layers[i]:
        if kind == "o.weight" and lp.attn_weight is not None:
            x = x + _times_map(x, lp.attn_weight, plan)
        elif kind == "mlp_in.weight" and lp.matrix_a is not None:
            x = x + _times_matrix(x, lp, plan)
        elif kind == "down.weight" and lp.down_a is not None:
            x = x + _cast(lp.down_b, x) @ _cast(lp.down_a, x).T
        elif kind == "v.weight" and lp.value_weight is not None:
            x = x + _cast(lp.value_weight, x)
        elif kind == "o.bias":
            if lp.attn_bias is not None:
                x = x + w_o @ _cast(lp.attn_bias, x)
            if lp.vector is not None and placement == "attn_out":
                x = x + _cast(lp.vector, x) / plan.branch_scale
            if lp.attn_weight is not None:
                w_o = w_o + _times_map(w_o, lp.attn_weight, plan)
        elif kind == "down.bias" and lp.vector is not None and placement == "skip":
            x = x + _cast(lp.vector, x) / plan.branch_scale
    return x.T if flip else x


def _bake_stored(name: str, a: np.ndarray, dtype: str, plan: BakePlan, read: Callable[[str], np.ndarray]):
    """Bake one tensor as stored (``a``, ``read``: numpy as read from the shards); the array to write."""
    x = bake_tensor(name, _calc(a, plan.device), plan, lambda n: _calc(read(n), plan.device))
    return array_to_bytes(x if isinstance(x, np.ndarray) else x.cpu().numpy(), dtype)


def model_card(records: list[dict], base: str, flags: list[str]) -> str:
    """README.md of a baked checkpoint: which patches went in, their prompt hashes, methods and fidelity."""
    lines = [
        "---",
        "tags:",
        "- thoughtpatch",
        "---",
        "",
        f"# {base} with {len(records)} thoughtpatch patch{'es' if len(records) > 1 else ''} baked in",
        "",
        f"Baked by thoughtpatch {__version__}: the patches below are folded exactly into the weights, so this "
        "folder loads with `transformers.AutoModelForCausalLM.from_pretrained` and no thoughtpatch code. "
        "`config.json` records the same under the `thoughtpatch` key.",
        "",
    ]
    if flags:
        lines += [f"Biases turned on in the config (zeros where no patch needs them): {', '.join(flags)}.", ""]
    for n, r in enumerate(records, 1):
        lines += [f"## Patch {n}: {r['file']}", "", "| | |", "|---|---|"]
        for key in ("sha256", "prompt_sha256", "base_model", "scale", "placement", "parameters", "layers"):
            lines.append(f"| {key} | {r.get(key)} |")
        lines += [f"| method.{k} | {v} |" for k, v in sorted(r["method"].items())]
        lines += [f"| {k} | {v} |" for k, v in sorted(r["fidelity"].items())] or ["| fidelity | not measured |"]
        lines.append("")
    return "\n".join(lines)


def patch_record(patch: Patch, file: str, sha256: str, scale: float) -> dict:
    """What a baked checkpoint records about one patch."""
    m = patch.meta
    return {
        "file": file,
        "sha256": sha256,
        "scale": scale,
        "prompt_sha256": m.get("prompt_sha256"),
        "base_model": m.get("base_model"),
        "placement": patch.placement,
        "parameters": patch.numel(),
        "layers": ",".join(map(str, sorted(patch.layers))),
        "method": {k.removeprefix("method."): v for k, v in m.items() if k.startswith("method.")},
        "fidelity": {k: v for k, v in m.items() if k.startswith("fidelity")},
        "tool_version": m.get("tool_version"),
    }


# ---- I/O: streaming a checkpoint ----------------------------------------------------------------------------


def _json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read it ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: not a JSON object")
    return doc


def _header(path: Path) -> tuple[dict, int]:
    """A shard's header and where its data starts, after ``safe_open`` has checked the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "numpy"):
            pass
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            return json.loads(fh.read(n)), 8 + n
    except Exception as exc:  # safetensors raises its own error types
        raise UsageError(f"{path}: corrupt safetensors file ({str(exc).splitlines()[0]})") from None


def _shard_map(src: Path) -> dict[str, str]:
    """Tensor name -> shard file name, for a single ``model.safetensors`` or an index."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        wm = _json(index).get("weight_map")
        if not isinstance(wm, dict):
            raise UsageError(f"{index}: no weight_map")
        return wm
    if (src / "model.safetensors").is_file():
        return dict.fromkeys(_header(src / "model.safetensors")[0].keys() - {"__metadata__"}, "model.safetensors")
    raise UsageError(f"{src}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints bake)")


def _check_target(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise UsageError(f"--save {dst}: inside the model folder {src}; choose a folder outside it")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"--save {dst}: already exists; choose a new folder or remove it")
    if not d.parent.is_dir():
        raise UsageError(f"--save {dst}: folder {d.parent} does not exist")


def _check_shapes(plan: BakePlan, headers: dict[str, dict], hidden: int) -> None:
    """Every tensor baking reads exists, with the sizes the config promises."""
    for name in sorted({*plan.roles, *plan.new.values()}):
        src = plan.new.get(name, name)
        if src not in headers:
            raise UsageError(f"checkpoint has no tensor {src!r}")
        h = headers[src]
        kind = plan.roles.get(name, ("", 0))[0]
        want = {"o.weight": plan.heads * plan.head_dim, "mlp_in.weight": hidden}.get(kind, hidden)
        read_dim = 0 if plan.transposed else -1  # weights read these sizes; the output projection writes hidden
        dim = (-1 - read_dim) if kind == "down.weight" else read_dim if kind.endswith("weight") else 0
        got = h["shape"][dim]
        if h["dtype"] not in _DTYPES or (kind and got != want):
            raise UsageError(
                f"checkpoint tensor {src!r} is {h['dtype']} {h['shape']}; baking needs a float with {want} there"
            )


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, so cleanup runs as it does for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _copy_range(fin: int, fout: int, start: int, length: int) -> None:
    """Copy ``length`` bytes at ``start`` of ``fin`` to where ``fout`` stands (in the kernel where it can)."""
    while length > 0:
        try:
            n = os.copy_file_range(fin, fout, min(length, 1 << 30), start)
        except (AttributeError, OSError):  # no copy_file_range here, or not between these file systems
            n = _write(fout, os.pread(fin, min(length, _CHUNK), start))
        if n == 0:
            raise UsageError("a checkpoint shard ends early")
        start, length = start + n, length - n


def _write(fd: int, data) -> int:
    """Write all of ``data`` (a bytes-like object) to ``fd``."""
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.write(fd, view[done : done + (1 << 30)])
    return done


def _put(fin: int, fout: int, start: int, length: int, data) -> None:
    """Copy ``length`` untouched bytes, then write ``data``."""
    _copy_range(fin, fout, start, length)
    _write(fout, data)


def _write_shard(src: Path, out: Path, header: dict, start: int, plan: BakePlan, adds: list[str], headers, read) -> int:
    """Rewrite one shard: untouched bytes copied, touched tensors baked, ``adds`` (new biases) appended."""
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    end = max((header[k]["data_offsets"][1] for k in names), default=0)
    new_header, pos = dict(header), end
    new_tensors = {}
    for name in adds:
        w = headers[plan.new[name]]
        zeros = np.zeros(w["shape"][0], np.float64 if w["dtype"] == "F64" else np.float32)
        t = new_tensors[name] = _bake_stored(name, zeros, w["dtype"], plan, read)
        n = t.nbytes
        new_header[name] = {"dtype": w["dtype"], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    head = json.dumps(new_header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    fin, fout = os.open(src, os.O_RDONLY), os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        # One thread writes (in file order) while this one bakes the next tensor: at most two in memory.
        with ThreadPoolExecutor(1, thread_name_prefix="thoughtpatch-write") as io:
            job = io.submit(_write, fout, struct.pack("<Q", len(head)) + head)
            done = 0  # data bytes copied or handed to the writer so far
            for name in names:
                a, b = header[name]["data_offsets"]
                if name not in plan.roles:
                    continue
                baked = _bake_stored(name, read(name), header[name]["dtype"], plan, read)
                job.result()
                job = io.submit(_put, fin, fout, start + done, a - done, baked)
                done = b
            job.result()
        _copy_range(fin, fout, start + done, end - done)
        for t in new_tensors.values():
            _write(fout, t)
    finally:
        os.close(fin)
        os.close(fout)
    return pos - end


def bake_checkpoint(
    src: str | Path,
    dst: str | Path,
    patches: list[Patch],
    records: list[dict],
    *,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write ``src`` with ``patches`` baked in to the new folder ``dst``; returns a summary (``progress(1)``
    after each shard)."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise UsageError(f"--model {src}: no config.json there, so it is not a Hugging Face model folder")
    _check_target(src, dst)
    config = _json(src / "config.json")
    arch = architecture_for(SimpleNamespace(**config))
    shard_of = _shard_map(src)
    files = sorted(set(shard_of.values()))
    for f in files:
        if "/" in f or not (src / f).is_file():
            raise UsageError(f"{src}: shard {f!r} named in the index is missing")
    parsed = {f: _header(src / f) for f in files}
    headers = {k: v for f in files for k, v in parsed[f][0].items() if k != "__metadata__"}
    plan = plan_bake(patches, arch, config, device, [r["file"] for r in records], headers)
    _check_shapes(plan, headers, config_sizes(config, arch)[0])
    with _signals_raise(), partial_folder(dst) as tmp:
        _write_all(src, tmp, config, plan, records, shard_of, parsed, headers, log, progress)
        os.rename(tmp, dst)
    summary = {"output": str(dst), "shards": len(parsed), "tensors_changed": len(plan.roles)}
    return summary | {"biases_added": len(plan.new), "flags_turned_on": plan.flags}


def _reader(src: Path, shard_of: dict[str, str], parsed: dict[str, tuple[dict, int]]) -> Callable[[str], np.ndarray]:
    """``read(name)``: one original tensor as a numpy array in its own memory (freed once baked; no mapped shard
    grows; bfloat16 comes as float32)."""

    def read(name: str) -> np.ndarray:
        f = shard_of[name]
        header, start = parsed[f]
        h = header[name]
        a, b = h["data_offsets"]
        buf = np.empty(b - a, np.uint8)  # not zeroed: every byte is read into
        with open(src / f, "rb") as fh:
            fh.seek(start + a)
            if fh.readinto(buf) != len(buf):
                raise UsageError(f"{src / f}: ends early")
        return array_from_bytes(buf, h["dtype"], h["shape"])

    return read


def _write_all(
    src: Path, tmp: Path, config: dict, plan: BakePlan, records, shard_of, parsed, headers, log, progress=None
) -> None:
    """Every shard (one at a time, each flushed to disk in the background while the next is written), then the
    config, index, model card and the folder's other files."""
    added = 0
    with ThreadPoolExecutor(1, thread_name_prefix="thoughtpatch-sync") as sync:
        synced = []
        for f, (header, start) in parsed.items():
            if progress:
                progress(1)
            adds = sorted(n for n, w in plan.new.items() if shard_of[w] == f)
            if not adds and not any(shard_of[n] == f for n in plan.roles if n not in plan.new):
                shutil.copyfile(src / f, tmp / f)
            else:
                if log:
                    log(f"baking {f}")
                read = _reader(src, shard_of, parsed)
                added += _write_shard(src / f, tmp / f, header, start, plan, adds, headers, read)
            synced.append(sync.submit(_fsync, tmp / f))
        record = {"tool_version": __version__, "patches": records, "biases_turned_on": plan.flags}
        _finish(src, tmp, config, plan, record, shard_of, added, list(parsed))
        for job in synced:
            job.result()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _finish(
    src: Path, tmp: Path, config: dict, plan: BakePlan, record: dict, shard_of: dict, added: int, files
) -> None:
    """Config, index, model card and the folder's other files (weights in other formats are left out)."""
    config = dict(config, **dict.fromkeys(plan.flags, True), thoughtpatch=record)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        doc = _json(index)
        doc["weight_map"] = dict(sorted({**shard_of, **{n: shard_of[w] for n, w in plan.new.items()}}.items()))
        meta = doc.setdefault("metadata", {})
        if "total_size" in meta:
            meta["total_size"] = int(meta["total_size"]) + added
        (tmp / index.name).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    base = str(record["patches"][0].get("base_model") or src.name)
    (tmp / "README.md").write_text(model_card(record["patches"], base, plan.flags))
    done = {"config.json", "README.md", index.name, *files}
    for p in sorted(src.iterdir()):
        if p.name in done or p.name.startswith(".") or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        if p.is_dir():
            shutil.copytree(p, tmp / p.name)
        else:
            shutil.copyfile(p, tmp / p.name)
    for p in tmp.rglob("*"):
        if p.is_file() and not (p.parent == tmp and p.name in files):  # shards are flushed as they are written
            _fsync(p)
