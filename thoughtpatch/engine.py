"""Running the model: padding, stepping through blocks one at a time, taps and hooks, greedy decoding.

Stepping: :func:`layer_calls` runs the decoder once with every block replaced by the identity and records
the arguments each block receives (masks, position embeddings: whatever the family computes). Calling
``block(hidden, *args, **kwargs)`` with them then advances any hidden state by one block, exactly as the
model's own forward does, so code here never needs to know how a family builds its masks or positions.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .architectures import Architecture, submodule
from .errors import UsageError

__all__ = [
    "Block",
    "LayerCalls",
    "blocks",
    "mid_taps",
    "layer_calls",
    "run_block",
    "hooks",
    "device_of",
    "matvec",
    "pad_right",
    "pad_after_prefix",
    "prefix_mask",
    "StopBlock",
    "greedy",
    "prefix_cache",
    "expand_cache",
    "prefix_view",
    "active_positions",
    "eager_attention",
    "exact_attention",
]

EXACT_ATTENTION = "thoughtpatch_eager"


@dataclass
class Block:
    """The modules of one decoder block that patches read or write."""

    index: int
    layer: nn.Module
    input_norm: nn.Module | None  # None: the attention reads the block input itself (post-norm blocks)
    attn_out: nn.Module
    attention: nn.Module  # calls the attention function (its keys and values)
    branch: nn.Module
    mlp_norm: nn.Module | None  # None: the MLP reads the mid-residual itself
    mlp: nn.Module
    mlp_inputs: list[nn.Module]
    router: nn.Module | None
    transposed: bool
    parallel: bool
    branch_scale: float = 1.0  # the factor on the attention and MLP outputs before they join the residual
    mlp_out: nn.Module | None = None  # the MLP's output projection (reads the MLP's hidden activations)
    post_mlp_norm: nn.Module | None = None  # a norm on the MLP's output before it joins the residual
    value_proj: nn.Module | None = None  # the value projection (None: fused with the query and key projections)

    def norm2(self, r: Tensor) -> Tensor:
        """The MLP input ``z`` for a mid-residual ``r`` (sequential blocks)."""
        return r if self.mlp_norm is None else self.mlp_norm(r)

    def attn_input(self, fn: Callable[[Tensor], None]) -> tuple[nn.Module, str, Callable]:
        """A hook spec that passes what the attention reads (``N1 h``, or ``h`` without N1) to ``fn``."""
        if self.input_norm is None:
            return (self.layer, "pre", lambda m, a: fn(a[0]))
        return (self.input_norm, "fwd", lambda m, a, out: fn(out))


def _inputs(layer: nn.Module, arch: Architecture) -> list[nn.Module]:
    """The declared modules that read z and that this block has (MoE families mix in dense blocks)."""
    found = [m for m in (_find(layer, p) for p in arch.mlp_inputs) if m is not None]
    if not found:
        raise UsageError(f"{arch.name}: a block has none of the MLP inputs {', '.join(arch.mlp_inputs)}")
    return found


def _find(layer: nn.Module, path: str | None) -> nn.Module | None:
    try:
        return layer.get_submodule(path) if path else None
    except AttributeError:
        return None


def blocks(model: nn.Module, arch: Architecture) -> list[Block]:
    layers = submodule(model, arch.layers)
    return [
        Block(
            i,
            layer,
            arch.input_norm and submodule(layer, arch.input_norm),
            submodule(layer, arch.attn_out),
            submodule(layer, arch.attention),
            submodule(layer, arch.branch),
            arch.mlp_norm and submodule(layer, arch.mlp_norm),
            submodule(layer, arch.mlp),
            _inputs(layer, arch),
            _find(layer, arch.router),
            arch.transposed,
            arch.block == "parallel",
            arch.branch_scale(model.config),
            _find(layer, arch.mlp_out),
            _find(layer, arch.post_mlp_norm),
            _find(layer, arch.value_proj),
        )
        for i, layer in enumerate(layers)
    ]


def mid_taps(blk: Block, seen: dict[str, Tensor], stop: bool = False) -> list[tuple[nn.Module, str, Callable]]:
    """Hooks that record the mid-residual ``r`` and the MLP input ``z`` of a block (then end it if ``stop``).

    Sequential blocks: ``r`` and ``z`` are the input and output of the MLP norm. Parallel blocks: ``r`` is
    the block input plus the attention branch, recorded when the MLP starts (after the attention).
    """

    def grab(module, args, output):
        seen["r"], seen["z"] = args[0], output
        if stop:
            raise StopBlock

    if blk.mlp_norm is None:
        return [(blk.mlp, "pre", lambda m, a: grab(m, a, a[0]))]
    if not blk.parallel:
        return [(blk.mlp_norm, "fwd", grab)]

    def mlp_starts(module, args):
        seen["r"] = seen.pop("h") + seen.pop("b")
        if stop:
            raise StopBlock

    return [
        (blk.input_norm, "pre", lambda m, a: seen.__setitem__("h", a[0])),
        (blk.branch, "fwd", lambda m, a, out: seen.__setitem__("b", out[0] if isinstance(out, tuple) else out)),
        (blk.mlp_norm, "fwd", lambda m, a, out: seen.__setitem__("z", out)),
        (blk.mlp, "pre", mlp_starts),
    ]


def device_of(model: nn.Module) -> torch.device:
    """Where the model takes its inputs: its first parameter not offloaded (``meta``) by a device map."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def matvec(module: nn.Module, x: Tensor, transposed: bool) -> Tensor:
    """``W x`` for the module's weight, without its bias (``transposed``: GPT-2 Conv1D layout)."""
    w = module.weight
    return x @ w if transposed else x @ w.T


@dataclass
class LayerCalls:
    """The input of the first block and the extra arguments every block receives."""

    hidden: Tensor
    calls: list[tuple[tuple, dict]]


@torch.no_grad()
def layer_calls(
    model: nn.Module, arch: Architecture, input_ids: Tensor, attention_mask: Tensor, cache=None
) -> LayerCalls:
    """Record what every block receives for these inputs (after the tokens already in ``cache``)."""
    layers = submodule(model, arch.layers)
    decoder = submodule(model, arch.decoder)
    seen: list[tuple[Tensor, tuple, dict]] = []

    def identity(hidden_states, *args, **kwargs):
        seen.append((hidden_states, args, kwargs))
        return (hidden_states,) if arch.tuple_output else hidden_states

    own = [layer.__dict__.get("forward") for layer in layers]  # a device map's hooks wrap forward
    for layer in layers:
        layer.forward = identity
    extra = {} if cache is None else {cache_kwarg(decoder): cache, "use_cache": True}
    try:
        decoder(input_ids=input_ids, attention_mask=attention_mask, **({"use_cache": False} | extra))
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return LayerCalls(seen[0][0], [(args, kwargs) for _, args, kwargs in seen])


@torch.no_grad()
def prefix_cache(model: nn.Module, prefix: list[int], shift: int = 0):
    """The KV cache of a token prefix shared by a batch (computed once, batch size 1); with ``shift`` its
    tokens sit ``shift`` positions earlier (rotary families: a query then sees them at the offsets it would
    see them ``shift`` positions later)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if prefix:
        device = device_of(model)
        ids = torch.tensor([prefix], device=device)
        at = {"position_ids": torch.arange(len(prefix), device=device)[None] - shift} if shift else {}
        model(input_ids=ids, use_cache=True, **at, **{cache_kwarg(model): cache})
    return cache


def prefix_view(cache):
    """A read-only view of a batch-1 prefix cache: blocks read the prefix (for any batch), store nothing.

    Layer calls recorded with it can be replayed any number of times, in any order.
    """
    from transformers import DynamicCache

    class _FrozenPrefix(DynamicCache):
        def __init__(self):  # share the prefix's layers; never mutate them
            self.__dict__.update(cache.__dict__)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx]
            if not getattr(layer, "is_initialized", False) or layer.keys.numel() == 0:
                return key_states, value_states
            b = key_states.shape[0]
            keys = torch.cat([layer.keys.expand(b, -1, -1, -1), key_states], -2)
            return keys, torch.cat([layer.values.expand(b, -1, -1, -1), value_states], -2)

    return _FrozenPrefix()


def expand_cache(cache, batch: int):
    """A fresh copy of a batch-1 cache repeated ``batch`` times (blocks append to it as they run)."""
    out = copy.deepcopy(cache)
    if cache.get_seq_length() > 0:
        out.batch_repeat_interleave(batch)
    return out


def run_block(block: Block, hidden: Tensor, call: tuple[tuple, dict]) -> Tensor:
    out = block.layer(hidden, *call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def hooks(specs: list[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """Install ``(module, "pre" | "fwd", fn)`` hooks for the duration of the block; always removed.

    ``pre`` hooks get ``(module, args)`` and may return new args; ``fwd`` hooks get ``(module, args,
    output)`` and may return a new output.
    """
    handles = []
    try:
        for module, kind, fn in specs:
            reg = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(reg(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def pad_right(seqs: list[list[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Right-padded ids and attention mask (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


class StopBlock(Exception):
    """Raised by a hook to end a block early once what it needed has been seen (callers suppress it)."""


def prefix_mask(valid: Tensor, n: int) -> Tensor:
    """The attention mask of ``n`` cached prefix tokens followed by right-padded rows (``valid``: (B, T))."""
    return torch.cat([torch.ones((valid.shape[0], n), dtype=torch.long, device=valid.device), valid.long()], 1)


def pad_after_prefix(seqs: list[list[int]], prefix_len: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Sequences that follow a cached prefix, padded on the left of each (so they all end together).

    Returns ids (B, T), the attention mask over prefix and sequences (B, prefix_len + T) and position ids.
    """
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    qmask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        qmask[i, width - len(s) :] = 1
    ids, qmask = ids.to(device), qmask.to(device)
    mask = torch.cat([torch.ones((len(seqs), prefix_len), dtype=torch.long, device=device), qmask], 1)
    return ids, mask, prefix_len + (qmask.cumsum(-1) - 1).clamp(min=0)


def active_positions(attention_mask: Tensor | None, shape: tuple[int, int], past: int, skip: int) -> Tensor:
    """(B, T) bool: positions at or beyond ``skip`` real tokens into their sequence.

    ``attention_mask`` covers past and current tokens (left padding allowed); without it positions count
    from ``past``.
    """
    b, t = shape
    if attention_mask is None or attention_mask.dim() != 2:
        index = torch.arange(past, past + t).expand(b, t)
    else:
        index = (attention_mask.long().cumsum(-1) - 1)[:, -t:]
    return index >= skip


def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """transformers' eager attention with the softmax in the model's precision (float32 at least).

    The library's eager path rounds the attention weights to float32 whatever the model's dtype, which
    leaves a float64 model float32-accurate in attention, with a rounding that depends on the batch's padding.
    """
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    w = query @ key.transpose(2, 3) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask
    w = w.softmax(-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    return (w @ value).transpose(1, 2).contiguous(), w


def exact_attention(model: nn.Module) -> None:
    """Run a float64 model that uses transformers' eager attention with :func:`eager_attention` instead."""
    if model.dtype != torch.float64 or getattr(model.config, "_attn_implementation", None) != "eager":
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(EXACT_ATTENTION, eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(EXACT_ATTENTION, eager_mask)
    model.set_attn_implementation(EXACT_ATTENTION)


def cache_kwarg(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy(
    model: nn.Module,
    prefix: list[int],
    queries: list[list[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    batch_size: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[int]]:
    """Greedy continuations of ``prefix + query`` for each query, batched, with the prefix computed once.

    Each continuation stops after an EOS token (kept) or ``max_new_tokens`` tokens. With ``temperature > 0``
    tokens are sampled instead, reproducibly from ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    device = device_of(model)
    kw = cache_kwarg(model)
    base = prefix_cache(model, prefix)
    results: list[list[int]] = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        b, lp = len(chunk), len(prefix)
        ids, mask, pos = pad_after_prefix(chunk, lp, device)
        cache = expand_cache(base, b)
        out_tokens = torch.zeros((b, 0), dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache}
            )
            last = logits.logits[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(last.cpu() / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
            else:
                nxt = last.argmax(-1)
            out_tokens = torch.cat([out_tokens, nxt[:, None]], 1)
            done |= torch.isin(nxt, torch.tensor(sorted(eos_ids), device=device))
            if bool(done.all()):
                break
            ids, pos = nxt[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long, device=device)], 1)
        for row in out_tokens.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            results.append(row[:cut])
    return results


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids
