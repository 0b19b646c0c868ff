"""Export a bakeable patch to where models already run: a PEFT LoRA adapter, and llama.cpp GGUF files.

Both targets hold the parts exactly, as LoRA deltas ``delta W = b a`` (``a``: (r, in), ``b``: (out, r)) on
standard modules, with ``W`` in the ``(out, in)`` layout (the same rules as baking, :mod:`thoughtpatch.bake`):

* attention map ``D`` (per head) at the input of ``o_proj``: ``delta W_o = W_o D``, so ``a = D`` (block
  diagonal, rank = heads x head size) and ``b = W_o`` (the base weight is needed);
* thought matrix ``M = B A^T`` on the MLP input: every MLP input ``W`` gets ``delta W = W B A^T``, so
  ``a = A^T`` and ``b = W B`` (rank = the matrix's rank; full rank gives rank = hidden size);
* down map ``G = B A^T`` on the MLP's hidden activations: the output projection gets ``delta W_out = B A^T``,
  so ``a = A^T`` and ``b = B`` (with a ``skip`` vector's bias on the same module in PEFT);
* PEFT only (``lora_bias=True``): the attention constant ``c`` and an ``attn_out`` vector as the bias of
  ``o_proj``'s LoRA (``W_o c + v``), a ``skip`` vector as the bias of the down projection's LoRA (where no
  norm follows the MLP);
* llama.cpp only: a ``skip`` vector at 0-based block ``i`` is added to the output of block ``i``, which is
  ``direction.i`` of a control-vector GGUF (llama.cpp adds ``direction.N`` after block ``N``, counting from
  0, and has no ``direction.0``), so block 0's vector has no place there.

Parts a target cannot express are refused, or dropped with a warning under ``drop_vectors``. ``rank``
SVD-compresses each delta and reports its relative (Frobenius) error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from .architectures import Architecture
from .errors import UsageError
from .patch import Patch, attn_matrix

__all__ = [
    "TARGETS",
    "LoraTerm",
    "exportable",
    "lora_terms",
    "peft_adapter",
    "gguf_lora",
    "write_export",
    "export_patch",
]

TARGETS = ("peft", "gguf")
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
GGUF_LORA, GGUF_CVEC = "lora.gguf", "control_vector.gguf"
# Hugging Face model_type -> llama.cpp architecture name (the GGUF tensor names follow from it)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma"}
GGUF_ARCH |= {"gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2"}


@dataclass
class LoraTerm:
    """One adapted module: ``delta W = b @ a`` and an optional bias on its output."""

    module: str
    a: Tensor  # (r, in)
    b: Tensor  # (out, r)
    bias: Tensor | None = None
    error: float = 0.0  # relative Frobenius error of the --rank compression

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def exportable(patch: Patch, arch: Architecture, target: str, drop_vectors: bool, what: str) -> tuple[Patch, list[str]]:
    """The patch without the parts ``target`` cannot express (dropped only under ``drop_vectors``; else a
    refusal), and a warning per dropped part."""
    if patch.has_slots:
        raise UsageError(
            f"{what} carries virtual key/value slots (--kv), which no weight format can express; rebuild it "
            "with thoughtpatch transmute --mode bakeable, or keep it in memory (thoughtpatch apply)"
        )
    if any(lp.in_memory_only for lp in patch.layers.values()):
        raise UsageError(
            f"{what} has query-dependent parts, which no weight format can express; rebuild it with "
            "thoughtpatch transmute --mode bakeable"
        )
    if patch.skip:
        raise UsageError(
            f"{what} leaves its first {patch.skip} tokens unpatched, which weights cannot express; rebuild it "
            "with --mode bakeable or --skip 0"
        )
    layers, dropped = {}, {}
    for i, lp in sorted(patch.layers.items()):
        if lp.down_a is not None and arch.mlp_out is None:
            raise UsageError(f"{what}: block {i}'s down map needs an MLP output projection, which {arch.name} lacks")
        if lp.value_weight is not None and arch.value_proj is None:
            raise UsageError(
                f"{what}: block {i}'s value map needs a value projection of its own, which {arch.name} lacks"
            )
        why = {}
        if lp.vector is not None:
            if target == "gguf" and patch.placement == "attn_out":
                why["vector"] = "llama.cpp adds vectors only after a whole block, not before the MLP"
            elif target == "gguf" and i == 0:
                why["vector"] = "llama.cpp cannot add a vector after block 0 (it has no direction.0)"
            elif target == "peft" and (arch.post_attn_norm if patch.placement == "attn_out" else arch.post_mlp_norm):
                why["vector"] = f"a norm follows its site in {arch.name} models, so no LoRA bias equals it"
        if lp.attn_bias is not None and target == "gguf":
            why["attn_bias"] = "llama.cpp LoRA adapters carry no biases"
        for part, reason in why.items():
            name = "thought vector" if part == "vector" else "attention constant"
            if not drop_vectors:
                raise UsageError(
                    f"{what}: block {i}'s {name} has no exact place in a {target} export ({reason}); pass "
                    f"--drop-vectors to export without it, or keep the patch in memory (thoughtpatch apply)"
                )
            dropped.setdefault((name, reason), []).append(str(i))
        layers[i] = replace(lp, **dict.fromkeys(why))
    warnings = [
        f"dropped the {name} of block{'s' * (len(b) > 1)} {','.join(b)} ({reason}): the export is no longer "
        "equal to the patch"
        for (name, reason), b in dropped.items()
    ]
    return Patch(layers, patch.placement, patch.skip, dict(patch.meta)), warnings


def _compress(t: LoraTerm, k: int) -> LoraTerm:
    """The best rank-``k`` approximation of the term's delta, with its relative error."""
    if t.rank <= k:
        return t
    u, s, vh = torch.linalg.svd(t.b.double() @ t.a.double(), full_matrices=False)
    err = float(s[k:].norm() / s.norm()) if s.norm() > 0 else 0.0
    return LoraTerm(t.module, vh[:k].float(), (u[:, :k] * s[:k]).float(), t.bias, err)


def lora_terms(
    patch: Patch,
    arch: Architecture,
    weight: Callable[[str], Tensor],
    head_dim: int,
    target: str,
    rank: int | None,
    branch_scale: float = 1.0,
) -> list[LoraTerm]:
    """The LoRA terms of an exportable patch; ``weight(module)`` gives a base weight as (out, in) float32.

    Vectors become biases of a branch's last projection, divided by ``branch_scale`` (the factor on the branch
    before it joins the residual)."""
    terms = []
    for i, lp in sorted(patch.layers.items()):
        pre = f"{arch.layers}.{i}."
        const = target == "peft" and (
            lp.attn_bias is not None or (lp.vector is not None and patch.placement == "attn_out")
        )
        if lp.attn_weight is not None or const:
            w_o = weight(pre + arch.attn_out)
            full = lp.attn_weight is not None
            a = attn_matrix(lp.attn_weight.float(), head_dim) if full else torch.zeros(1, w_o.shape[1])
            b = w_o if full else torch.zeros(w_o.shape[0], 1)
            bias = None
            if const:  # o_proj(o + c) + v = W_o o + (W_o c + v)
                c = lp.attn_bias.float() if lp.attn_bias is not None else torch.zeros(w_o.shape[1])
                v = lp.vector.float() / branch_scale if patch.placement == "attn_out" and lp.vector is not None else 0
                bias = w_o @ c + v
            terms.append(LoraTerm(pre + arch.attn_out, a, b, bias))
        if lp.value_weight is not None:  # W_v + D: D = I D, of rank at most the projection's output width
            d = lp.value_weight.float()
            terms.append(LoraTerm(pre + arch.value_proj, d, torch.eye(d.shape[0])))
        if lp.matrix_a is not None:
            for m in arch.mlp_inputs:
                terms.append(LoraTerm(pre + m, lp.matrix_a.float().T, weight(pre + m) @ lp.matrix_b.float()))
        vector = target == "peft" and lp.vector is not None and patch.placement == "skip"
        if lp.down_a is not None:
            a, b = lp.down_a.float().T, lp.down_b.float()
        elif vector:  # a bias alone: zero LoRA weights of rank 1
            out, inner = weight(pre + arch.mlp_out).shape
            a, b = torch.zeros(1, inner), torch.zeros(out, 1)
        if lp.down_a is not None or vector:
            terms.append(LoraTerm(pre + arch.mlp_out, a, b, lp.vector.float() / branch_scale if vector else None))
    return [_compress(t, rank) for t in terms] if rank else terms


def peft_adapter(
    terms: list[LoraTerm], base: str | None, revision: str | None, transposed: bool
) -> tuple[dict[str, Tensor], dict]:
    """PEFT's ``adapter_model.safetensors`` tensors and ``adapter_config.json``: ``r`` is the largest rank,
    ``lora_alpha = r``, other ranks in ``rank_pattern``, each ``b`` (and bias) divided by its ``alpha / r``."""
    r = max(t.rank for t in terms)
    with_bias = any(t.bias is not None for t in terms)
    tensors = {}
    for t in terms:
        key, s = f"base_model.model.{t.module}", r / t.rank  # PEFT multiplies by alpha / r_module
        tensors[f"{key}.lora_A.weight"] = t.a.contiguous()
        tensors[f"{key}.lora_B.weight"] = (t.b / s).contiguous()
        if with_bias:
            tensors[f"{key}.lora_B.bias"] = (torch.zeros(t.b.shape[0]) if t.bias is None else t.bias / s).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": revision,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {t.module: t.rank for t in terms if t.rank != r},
        "alpha_pattern": {},
        "target_modules": sorted(t.module for t in terms),
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": with_bias,
        "fan_in_fan_out": transposed,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return tensors, config


def gguf_lora(terms: list[LoraTerm], n_layers: int, model_type: str) -> tuple[str, float, dict[str, Tensor]]:
    """llama.cpp's LoRA tensors (``blk.N.<name>.weight.lora_a`` (r, in), ``lora_b`` (out, r), each ``b``
    divided by ``alpha / r``), its architecture and ``adapter.lora.alpha``."""
    import gguf

    if model_type not in GGUF_ARCH:
        raise UsageError(f"no llama.cpp architecture is known for {model_type!r} models")
    arch = GGUF_ARCH[model_type]
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    alpha = float(max(t.rank for t in terms))
    out = {}
    for t in terms:
        name = names.get_name(t.module)
        if name is None:
            raise UsageError(f"llama.cpp has no tensor for {t.module}")
        out[f"{name}.weight.lora_a"] = t.a.contiguous()
        out[f"{name}.weight.lora_b"] = (t.b * t.rank / alpha).contiguous()
    return arch, alpha, out


def write_export(
    folder: Path, target: str, terms: list[LoraTerm], vectors: dict[int, Tensor], config: dict, meta: dict
) -> list[str]:
    """Write the export's files into ``folder`` (an empty temporary folder); returns their names."""
    if target == "peft":
        from safetensors.torch import save_file

        tensors, adapter = peft_adapter(
            terms, meta.get("base_model"), meta.get("base_model_revision") or None, config["transposed"]
        )
        save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
        (folder / PEFT_CONFIG).write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n")
        return [PEFT_WEIGHTS, PEFT_CONFIG]
    import gguf

    files = []
    if terms:
        arch, alpha, tensors = gguf_lora(terms, config["n_layers"], config["model_type"])
        w = gguf.GGUFWriter(str(folder / GGUF_LORA), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        _finish_gguf(w, tensors, meta)
        files.append(GGUF_LORA)
    if vectors:
        w = gguf.GGUFWriter(str(folder / GGUF_CVEC), "controlvector")
        w.add_string("controlvector.model_hint", config["model_type"])
        w.add_int32("controlvector.layer_count", len(vectors))
        _finish_gguf(w, {f"direction.{i}": v.float() for i, v in sorted(vectors.items())}, meta)
        files.append(GGUF_CVEC)
    return files


def _finish_gguf(w, tensors: dict[str, Tensor], meta: dict) -> None:
    w.add_string("general.name", f"thoughtpatch patch of {meta.get('base_model', 'a model')}")
    for k in ("prompt_sha256", "tool_version"):
        if meta.get(k):
            w.add_string(f"thoughtpatch.{k}", str(meta[k]))
    for name, t in tensors.items():
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- I/O: reading base weights, writing the folder ------------------------------------------------------------


def export_patch(
    patch: Patch,
    model_dir: str | Path,
    dst: str | Path,
    target: str,
    *,
    rank: int | None = None,
    drop_vectors: bool = False,
    what: str = "patch",
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Export ``patch`` for the model in ``model_dir`` into the new folder ``dst``; returns a summary
    (``progress(1)`` after each module's base weight is read)."""
    from .architectures import architecture_for
    from .bake import _header, _json, _mlp_width, _reader, _shard_map, config_sizes
    from .files import new_folder
    from .patch import validate_for

    if target not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, not {target!r}")
    if rank is not None and rank < 1:
        raise UsageError("--rank must be >= 1")
    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise UsageError(f"--model {src}: no config.json there, so it is not a Hugging Face model folder")
    config = _json(src / "config.json")
    arch = architecture_for(SimpleNamespace(**config))
    hidden, n_layers, heads, head_dim = config_sizes(config, arch)
    shard_of = _shard_map(src)
    parsed = {f: _header(src / f) for f in sorted(set(shard_of.values()))}
    headers = {k: v for h, _ in parsed.values() for k, v in h.items() if k != "__metadata__"}
    validate_for(patch, hidden, n_layers, heads, head_dim, what, inner=_mlp_width(arch, config, headers))
    patch, warnings = exportable(patch, arch, target, drop_vectors, what)
    for w in warnings:
        if log:
            log(f"warning: {w}")
    read = _reader(src, shard_of, parsed)

    def weight(module: str) -> Tensor:
        name = module + ".weight"
        if name not in shard_of:
            raise UsageError(f"{src}: checkpoint has no tensor {name!r}")
        w = torch.from_numpy(read(name)).float()
        if progress:
            progress(1)
        return w.T if arch.transposed else w

    terms = lora_terms(patch, arch, weight, head_dim, target, rank, arch.branch_scale(config))
    vectors = {}
    if target == "gguf":
        vectors = {i: lp.vector for i, lp in patch.layers.items() if lp.vector is not None}
    if not terms and not vectors:
        raise UsageError(f"{what}: nothing left to export")
    info = {"transposed": arch.transposed, "n_layers": n_layers, "model_type": config.get("model_type")}
    with new_folder(dst) as tmp:
        files = write_export(tmp, target, terms, vectors, info, patch.meta)
    with_bias = any(t.bias is not None for t in terms)  # PEFT's lora_bias is one flag for every module
    no_bias = sorted({t.module for t in terms if with_bias and f"{t.module}.bias" not in shard_of})
    if target == "peft" and no_bias and log:
        log(
            f"note: {len(no_bias)} adapted module(s) get a LoRA bias but have no base bias (e.g. {no_bias[0]}): "
            "PeftModel runs it exactly, merge_and_unload() cannot; bake it with thoughtpatch apply --save instead"
        )
    ranks = sorted({t.rank for t in terms})
    return {
        "output": str(dst),
        "to": target,
        "files": files,
        "modules": len(terms),
        "ranks": ranks,
        "control_vectors": sorted(vectors),
        "max_relative_error": max((t.error for t in terms), default=0.0),
        "dropped": warnings,
        "merge_and_unload": not no_bias if target == "peft" else None,
    }
