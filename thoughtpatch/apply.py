"""Install patches in memory with forward hooks, and remove them again, leaving the model bit-for-bit as it was.

>>> with installed(model, patch):          # doctest: +SKIP
...     model.generate(**inputs)

Hooks act at every position except the first ``patch.skip`` tokens of each sequence (left padding and the
KV cache are accounted for through the attention mask, position ids or the cache length).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from .architectures import architecture_for
from .engine import Block, active_positions, blocks, device_of, hooks
from .errors import UsageError
from .patch import LayerPatch, Patch, validate_for
from .virtual import Slots, dispatch, slot_hooks


def per_head(o: Tensor, w: Tensor) -> Tensor:
    """``W_h o_h`` for every head: ``o`` (..., H, hd), ``w`` (H, out, hd)."""
    flat = o.reshape(-1, *o.shape[-2:]).transpose(0, 1)  # (H, M, hd)
    return (flat @ w.transpose(-1, -2)).transpose(0, 1).reshape(*o.shape[:-1], w.shape[-2])


__all__ = ["installed", "Positions", "head_shape", "kv_heads", "mlp_width"]


def kv_heads(model: nn.Module) -> int:
    """The number of key/value heads (grouped-query attention shares each among several heads)."""
    attention = blocks(model, architecture_for(model))[0].attention
    return model.config.num_attention_heads // getattr(attention, "num_key_value_groups", 1)


def mlp_width(model: nn.Module) -> int | None:
    """The width of the MLP's hidden activations (its output projection's input); None without that projection."""
    out = blocks(model, architecture_for(model))[0].mlp_out
    return None if out is None else getattr(out, "in_features", None) or getattr(out, "nx", None)


def head_shape(model: nn.Module) -> tuple[int, int]:
    """(number of attention heads, head size) of a model."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


class Positions:
    """Which positions the patch acts on in the current forward call: a (B, T, 1) 0/1 mask or None (all)."""

    def __init__(self, skip: int):
        self.skip = skip
        self.mask: Tensor | None = None
        self.keys: Tensor | None = None  # (B or 1, S) bool: keys of the first ``skip`` tokens (past included)
        self.where: Tensor | None = None  # (B or 1, T) positions of the current tokens in their sequences

    def from_call(self, module, args, kwargs):
        if self.skip <= 0:
            self.mask = self.keys = self.where = None
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        b, t = ids.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        pos = kwargs.get("position_ids")
        if (mask is None or mask.dim() != 2) and pos is not None:
            active = pos.expand(b, t) >= self.skip
        else:
            active = active_positions(mask, (b, t), past, self.skip)
        self.mask = active.to(ids.device)[..., None]
        if mask is not None and mask.dim() == 2:
            index = mask.long().cumsum(-1) - 1
            self.keys, self.where = (index < self.skip) & mask.bool(), index[:, -t:]
        else:
            self.keys = (torch.arange(past + t, device=ids.device) < self.skip)[None]
            self.where = pos.expand(b, t) if pos is not None else torch.arange(past, past + t, device=ids.device)[None]

    def set(self, active: Tensor | None) -> None:
        """Set the mask by hand (for code that steps through blocks without calling the model)."""
        self.mask = None if active is None else active[..., None]
        at = None if active is None else torch.arange(active.shape[1], device=active.device)[None]
        self.keys, self.where = (None, None) if at is None else (at < self.skip, at)

    def rows(self) -> Tensor | None:
        """(B, T) bool: the query rows the patch acts on (None: all)."""
        return None if self.mask is None else self.mask[..., 0]

    def prefix_keys(self) -> Tensor:
        """(B or 1, S) bool: the keys that patched rows no longer read (their slots stand for them)."""
        return self.keys if self.keys is not None else torch.zeros(1, 0, dtype=torch.bool)

    def gate(self, update: Tensor) -> Tensor:
        return update if self.mask is None else update * self.mask.to(update.dtype)


def _layer_hooks(blk: Block, lp: LayerPatch, placement: str, pos: Positions, heads: int, head_dim: int):
    specs = []
    seen: dict[str, Tensor] = {}
    if any(t is not None for t in (lp.attn_weight, lp.attn_bias, lp.attn_query, lp.attn_gate)):
        if lp.in_memory_only:
            specs.append(blk.attn_input(lambda x: seen.__setitem__("x", x)))

        def attn(module, args):
            o = args[0]
            delta = torch.zeros_like(o)
            if lp.attn_weight is not None:
                w = lp.attn_weight.to(o)
                oh = o.unflatten(-1, (heads, head_dim) if w.dim() == 1 else (w.shape[0], -1))  # cross: 1 group
                d = oh * w[:, None] if w.dim() == 1 else per_head(oh, w)
                delta = delta + d.flatten(-2)
            if lp.attn_bias is not None:
                delta = delta + lp.attn_bias.to(o)
            x = seen.pop("x", None)
            if lp.attn_query is not None:
                delta = delta + x @ lp.attn_query.to(o).T
            if lp.attn_gate is not None:
                g = lp.attn_gate.to(o)
                scale = g[:, 0] + x @ g[:, 1:].T  # (..., H)
                delta = delta + (o.unflatten(-1, (heads, head_dim)) * scale[..., None]).flatten(-2)
            return (o + pos.gate(delta), *args[1:])

        specs.append((blk.attn_out, "pre", attn))
    if lp.vector is not None:
        site = blk.layer if placement == "skip" else blk.branch
        vector = lp.vector if placement == "skip" else lp.vector / blk.branch_scale  # the branch is scaled after

        def add_vector(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h + pos.gate(vector.to(h).expand_as(h))
            return (h, *output[1:]) if isinstance(output, tuple) else h

        specs.append((site, "fwd", add_vector))
    if lp.matrix_a is not None:

        def matrix(module, args):  # z -> (I + M) z before every module that reads z (experts and router too)
            z = args[0]
            return (z + pos.gate((z @ lp.matrix_a.to(z)) @ lp.matrix_b.to(z).T), *args[1:])

        specs.append((blk.mlp, "pre", matrix))
    if lp.down_a is not None:
        if blk.mlp_out is None:
            raise UsageError(
                f"block {blk.index}: the patch has a down map but this model's MLP has no single output projection "
                "(a mixture of experts); use a patch made for this model"
            )

        def down(module, args, output):  # y -> y + B A^T h on the MLP's output projection
            h = args[0]
            return output + pos.gate((h @ lp.down_a.to(h)) @ lp.down_b.to(h).T)

        specs.append((blk.mlp_out, "fwd", down))
    if lp.value_weight is not None:
        if blk.value_proj is None:
            raise UsageError(
                f"block {blk.index}: the patch changes the value projection but this model fuses it with the query "
                "and key projections; use a patch made for this model"
            )

        def value(module, args, output):  # v -> v + D x on the value projection
            return output + pos.gate(args[0] @ lp.value_weight.to(output).T)

        specs.append((blk.value_proj, "fwd", value))
    if lp.kv_key is not None:
        specs += slot_hooks(blk.attention, Slots(lp.kv_key, lp.kv_value, lp.kv_bias, lp.kv_position), pos)
    return specs


def layer_hook_specs(model: nn.Module, patch: Patch, pos: Positions, only: set[int] | None = None):
    """The hooks that realise ``patch`` (optionally only at some blocks), gated by ``pos``."""
    heads, head_dim = head_shape(model)
    blks = blocks(model, architecture_for(model))
    specs = []
    for i, lp in sorted(patch.layers.items()):
        if only is None or i in only:
            specs += _layer_hooks(blks[i], lp, patch.placement, pos, heads, head_dim)
    return specs


@contextmanager
def installed(model: nn.Module, patches: Patch | list[Patch], scale: float = 1.0) -> Iterator[list[Positions]]:
    """Install one or more patches (times ``scale``) for the duration of the ``with`` block."""
    patches = [patches] if isinstance(patches, Patch) else list(patches)
    cfg = model.config
    heads, head_dim = head_shape(model)
    if sum(p.has_slots for p in patches) > 1:
        raise UsageError(
            "only one of the patches may carry virtual key/value slots (each replaces the same tokens); merge them "
            "into one first: thoughtpatch merge A B -o AB"
        )
    with ExitStack() as stack:
        if any(p.has_slots for p in patches):
            stack.enter_context(dispatch(model))
        states, kvh, inner = [], kv_heads(model), mlp_width(model)
        for patch in patches:
            validate_for(patch, cfg.hidden_size, cfg.num_hidden_layers, heads, head_dim, kv_heads=kvh, inner=inner)
            p = (patch.scaled(scale) if scale != 1.0 else patch).to(device_of(model))
            pos = Positions(p.skip)
            handle = model.register_forward_pre_hook(pos.from_call, with_kwargs=True)
            stack.callback(handle.remove)
            stack.enter_context(hooks(layer_hook_specs(model, p, pos)))
            states.append(pos)
        yield states
