"""Virtual key/value slots: a compressed copy of the prompt's keys and values (DESIGN.md section 2).

At the patched positions, each attention block reads ``m`` virtual slots per key/value head *instead of* the
prompt-free prefix (the template's default leading tokens), then the query part as usual. A slot is a key,
a value and a log-multiplicity ``b`` (its score is ``q . k + b``: one slot can stand for several prompt
tokens). With every token of the prompted prefix as a slot (keys moved to the prompt-free run's positions)
the patched model IS the prompted model at the query positions; fewer slots compress it.

The slots run inside the model's own attention function: :func:`dispatch` routes a model's attention through
:func:`attention`, which adds the slots of a module that carries them (set by a hook for one call) and
otherwise calls the model's own implementation unchanged.

>>> with dispatch(model), hooks(slot_hooks(attn_module, slots, positions)):   # doctest: +SKIP
...     model(**inputs)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "NAME",
    "Slots",
    "attention",
    "attended_inputs",
    "dispatch",
    "slot_hooks",
    "fit_slots",
    "prefix_share",
    "allowed_keys",
]

NAME = "thoughtpatch"
_INNER: dict[int, str] = {}  # id(config) -> the attention implementation the model had


@dataclass
class Slots:
    """``key``, ``value``: (KVH, m, hd); ``bias``: (KVH, m) log-multiplicities or None; ``position``: (KVH, m)
    each slot's position (where its key was computed), for sliding-window layers."""

    key: Tensor
    value: Tensor
    bias: Tensor | None = None
    position: Tensor | None = None


def _inner(module: nn.Module, eager: bool = False) -> Callable:
    """The attention function the model runs without slots (its configured one, or its own eager code: with
    ``eager``, always that, which takes values of any width)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = "eager" if eager else _INNER.get(id(module.config), "eager")
    own_eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, own_eager)


def attended_inputs(module: nn.Module, query: Tensor, key: Tensor, x: Tensor, attention_mask, **kwargs) -> Tensor:
    """(B, T, H, d): each head's attention-weighted mean of the inputs ``x`` (B, S, d) at the keys it reads,
    by the model's own eager attention given ``x`` as values (any width; soft-capping, windows and grouped
    heads as the model has them). What a change ``D`` of the value projection moves each head by, times ``D``."""
    if attention_mask is None or attention_mask.dtype == torch.bool:  # eager code adds it: make it additive
        reads = allowed_keys(attention_mask, query.shape[0], query.shape[2], key.shape[2], query.device)
        attention_mask = torch.zeros(reads.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~reads, -torch.inf
        )
    values = x[:, None].expand(-1, key.shape[1], -1, -1)  # one copy per key/value head
    return _inner(module, eager=True)(module, query, key, values, attention_mask, **kwargs)[0]


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """The attention function :func:`dispatch` installs: the model's own, plus slots where a hook set them."""
    inner = _inner(module)
    record = getattr(module, "_thoughtpatch_record", None)
    if record is not None:
        record(module, query, key, value, attention_mask, **kwargs)
    state = getattr(module, "_thoughtpatch_slots", None)
    if state is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    slots, active, prefix, where = state  # active: (B, T) rows patched; prefix: (B, S) keys they no longer read
    b, t, s, m = query.shape[0], query.shape[2], key.shape[2], slots.key.shape[1]
    dev = query.device
    active = torch.ones(b, t, dtype=torch.bool, device=dev) if active is None else active.to(dev).expand(b, t)
    prefix = prefix.to(dev)[..., -s:].expand(b, s)
    allowed = allowed_keys(attention_mask, b, t, s, dev) & ~(active[:, None, :, None] & prefix[:, None, None, :])
    reads = active[:, None, :, None].expand(b, 1, t, m)
    window = getattr(module, "sliding_window", None)
    if window and slots.position is not None and where is not None:  # slot j is read within the window only
        g = query.shape[1] // slots.position.shape[0]
        near = where.to(dev)[:, None, :, None] - slots.position.to(dev).repeat_interleave(g, 0)[None, :, None, :]
        reads = reads & (near < window)
    allowed = torch.cat([reads, allowed.expand(b, reads.shape[1], t, s) if reads.shape[1] > 1 else allowed], -1)
    keys = torch.cat([slots.key.to(key)[None].expand(b, -1, -1, -1), key], 2)
    values = torch.cat([slots.value.to(value)[None].expand(b, -1, -1, -1), value], 2)
    if slots.bias is None and (attention_mask is None or attention_mask.dtype == torch.bool):
        return inner(module, query, keys, values, allowed, **kwargs)
    heads = query.shape[1]
    bias = torch.zeros(heads, 1, m + s, dtype=query.dtype, device=dev)
    if slots.bias is not None:
        bias[:, 0, :m] = slots.bias.to(query).repeat_interleave(heads // slots.bias.shape[0], 0)
    neg = torch.tensor(torch.finfo(query.dtype).min, dtype=query.dtype, device=dev)
    return inner(module, query, keys, values, torch.where(allowed, bias[None], neg), **kwargs)


def allowed_keys(attention_mask: Tensor | None, b: int, t: int, s: int, device) -> Tensor:
    """(B, 1 or H, T, S) bool: the keys each query row reads, from any attention mask format."""
    if attention_mask is None:  # implied causal mask (no padding, no window in effect)
        return torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)[None, None].expand(b, 1, t, s)
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _mask(*args, config=None, **kwargs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[_INNER.get(id(config), "eager")](*args, config=config, **kwargs)


@contextmanager
def dispatch(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through :func:`attention` for the duration (a no-op without slots)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = model.config
    own = cfg._attn_implementation
    if own == NAME:
        yield
        return
    ALL_ATTENTION_FUNCTIONS.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask)
    _INNER[id(cfg)] = own or "eager"
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = own
        _INNER.pop(id(cfg), None)
        for module in model.modules():  # slots left by a call that an error or interrupt ended
            module.__dict__.pop("_thoughtpatch_slots", None)


def slot_hooks(module: nn.Module, slots: Slots, positions) -> list[tuple[nn.Module, str, Callable]]:
    """Hook specs that give ``module`` (an attention block) its slots for each call, gated by ``positions``."""

    def attach(m, args):
        m._thoughtpatch_slots = (slots, positions.rows(), positions.prefix_keys(), positions.where)

    def detach(m, args, out):
        m.__dict__.pop("_thoughtpatch_slots", None)

    return [(module, "pre", attach), (module, "fwd", detach)]


# --------------------------------------------------------------------------------------------- fitting
ROWS = 1024  # query rows per block of the fitting sweeps (bounded memory)


def prefix_share(query: Tensor, keys: Tensor, own_scores: Tensor, scaling: float) -> Tensor:
    """(B, H, T): the prompted prefix's share of each row's attention mass, were ``keys`` (KVH, L, hd) read
    beside the row's own allowed keys (``own_scores``: (B, H, T, S) with disallowed entries at -inf)."""
    g = query.shape[1] // keys.shape[0]
    pre = (query @ keys.repeat_interleave(g, 0).transpose(-1, -2)[None].to(query)) * scaling
    return torch.sigmoid(pre.logsumexp(-1) - own_scores.logsumexp(-1))


Rows = Callable[[], Iterable[tuple[Tensor, ...]]]  # a fresh pass over (query rows (R, H, hd), share (R, H)[, own])


def _probs(rows: Rows, keys: Tensor, scaling: float, slots: Tensor | None = None) -> Iterator[tuple[Tensor, ...]]:
    """Blocks of rows: each row's attention over the prefix keys (KVH, rows x group, L), its weight (the
    prefix's share of its mass, (KVH, rows x group)) and, given ``slots`` keys (KVH, m, hd), its attention to
    them over the prefix's partition function (KVH, rows x group, m); float64."""
    kvh = keys.shape[0]
    for q, share, *_ in rows():
        for start in range(0, q.shape[0], ROWS):
            qb = _by_kv_head(q[start : start + ROWS].double(), kvh)  # (KVH, r g, hd)
            sb = _by_kv_head(share[start : start + ROWS].double(), kvh)
            s = (qb @ keys.double().transpose(-1, -2)) * scaling
            lse = s.logsumexp(-1, keepdim=True)
            f = None if slots is None else ((qb @ slots.transpose(-1, -2)) * scaling - lse).exp()
            yield (s - lse).exp(), sb, f


def _by_kv_head(t: Tensor, kvh: int) -> Tensor:
    """Rows of query heads (R, H, ...) as rows of each key/value head's group: (KVH, R x H / KVH, ...)."""
    return t.unflatten(1, (kvh, -1)).movedim(0, 1).flatten(1, 2)


SELECT = ("mass", "merge")
MERGE_STEPS = 5  # Lloyd iterations of the merge


def fit_slots(
    rows: Rows,
    keys: Tensor,
    values: Tensor,
    scaling: float,
    m: int,
    ridge: float,
    first: int = 0,
    select: str = "mass",
    refine: int = 0,
) -> Slots:
    """Pick and fit ``m`` slots per key/value head from the prefix's ``keys`` and ``values`` (KVH, L, hd).

    ``rows()``: the query rows the slots will serve, (R, H, hd), with the prefix's share of each row's mass,
    (R, H), in pieces (three passes; only additive statistics are kept). ``select="mass"``: the slots are the
    tokens with the most mass (weighted by share). ``"merge"``: every token joins a group by mass-weighted
    k-means of the keys started from those tokens, and a slot is a group: its mass-weighted mean key and
    value, its size as multiplicity, the position of its heaviest member. Then the slots' log-multiplicities
    ``b`` make them carry the prefix's mass (sum_j e^b_j f_rj ~ 1 over the rows, f_rj row r's attention to
    slot j over the prefix's partition function) and their values its mean value, both by weighted ridge
    least squares shrunk toward that start, ``ridge`` relative to the Gram matrix's mean diagonal. ``first``:
    the position of the first key. ``refine``: then refit them to the head outputs for that many L-BFGS
    iterations (:func:`_refine`); ``rows()`` must then also give each row's attention output over its own
    tokens, (R, H, hd).
    """
    mass = sum((p * w[..., None]).sum(1) for p, w, _ in _probs(rows, keys, scaling))
    idx = mass.topk(min(m, keys.shape[1]), -1).indices.sort(-1).values
    at = (idx + first).to(keys.dtype)
    if idx.shape[1] == keys.shape[1]:  # every token kept: the prefix itself, nothing to fit
        return Slots(keys, values, None, at)
    k, v0, c0 = gather(keys.double(), idx), gather(values.double(), idx), torch.ones_like(idx[..., None]).double()
    if select == "merge":
        weight, k = _groups(keys.double(), mass, idx)  # (KVH, L, m): each token's mass in its group; centres
        v0 = weight.transpose(-1, -2) @ values.double() / weight.sum(1)[..., None]
        c0, at = (weight > 0).double().sum(1)[..., None], (weight.argmax(1) + first).to(keys.dtype)
    eye = torch.eye(idx.shape[1], dtype=torch.float64, device=keys.device)

    def solve(features: Callable[[Tensor], Tensor], target: Callable[[Tensor], Tensor], prior: Tensor) -> Tensor:
        g = h = 0
        for p, w, f in _probs(rows, keys, scaling, k):
            w = w.sqrt()[..., None]
            x = features(f) * w
            g, h = g + x.transpose(-1, -2) @ x, h + x.transpose(-1, -2) @ (target(p) * w)
        lam = ridge * torch.diagonal(g, dim1=-2, dim2=-1).mean(-1)[:, None, None]
        return torch.linalg.solve(g + lam * eye, h + lam * prior)

    c = solve(lambda f: f, lambda p: torch.ones_like(p[..., :1]), c0)[..., 0].clamp_min(1e-3)

    def normalised(f: Tensor) -> Tensor:
        w = f * c[:, None, :]
        return w / w.sum(-1, keepdim=True).clamp_min(1e-30)

    b = c.log()
    if refine:  # the refit solves for the values itself
        k, b, v = _refine(rows, keys.double(), values.double(), scaling, k, b, refine)
    else:
        v = solve(normalised, lambda p: p @ values.double(), v0)
    return Slots(k.to(keys.dtype), v.to(values.dtype), b.to(values.dtype), at)


REFINE_STEP = 10  # L-BFGS iterations per optimiser step of the refit (the line search's budget counts per step)


def _output_error(rows: Rows, keys: Tensor, values: Tensor, scaling: float) -> Callable[..., tuple[Tensor, Tensor]]:
    """The slots' refit objective over the query rows: a function of the slots' keys and log-multiplicities
    (the values solved for)."""
    # (q, share, own): (KVH, N, hd), (KVH, N), (KVH, N, hd)
    parts = zip(*rows(), strict=True)
    q, w, own = (torch.cat([_by_kv_head(t.double(), keys.shape[0]) for t in part], 1) for part in parts)
    s = (q @ keys.transpose(-1, -2)) * scaling
    lse = s.logsumexp(-1)
    want = w[..., None] * (s.softmax(-1) @ values - own)  # the prefix's part of the output, relative to own
    lse_own = lse - torch.logit(w.clamp(1e-12, 1 - 1e-12))
    ww, wo, oo = want.pow(2).sum(-1), (want * own).sum(-1), own.pow(2).sum(-1)
    scale = float(ww.sum()) or 1.0

    def error(kk: Tensor, bb: Tensor) -> tuple[Tensor, Tensor]:
        """The relative squared error of the rows' outputs at the best values for keys ``kk`` and
        log-multiplicities ``bb``, and those values. A row's output error is x_r v - y_r with x_r = g_r p_r (its
        share g_r of the slots' mass, spread by their softmax p_r) and y_r = want_r + g_r own_r."""
        z = (q @ kk.transpose(-1, -2)) * scaling + bb[:, None, :]
        g = torch.sigmoid(z.logsumexp(-1) - lse_own)[..., None]
        x = g * z.softmax(-1)
        gram = x.transpose(-1, -2) @ x
        rhs = x.transpose(-1, -2) @ want + (x * g).transpose(-1, -2) @ own
        yy = (ww + g[..., 0] * (2 * wo + g[..., 0] * oo)).sum()
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        vv = torch.linalg.solve(gram + 1e-9 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye, rhs)
        return (yy - (rhs * vv).sum()) / scale, vv

    return error


def _refine(rows: Rows, keys, values, scaling, k, b, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keys, log-multiplicities and values refitted jointly to the head outputs: the squared error of each row's
    output, the slots' part mixed with the row's own attention output by the softmax exactly as the prompt's is.
    The values enter linearly, so they are solved by least squares for any keys and multiplicities, which
    ``steps`` L-BFGS iterations (a multiple of :data:`REFINE_STEP`) fit on the error left at those values
    (variable projection: far fewer iterations than fitting all three), computed from Gram products so that no
    pass touches a row's full output; ``k``, ``b``: the start. Returns the keys, log-multiplicities and values."""
    error = _output_error(rows, keys, values, scaling)
    params = [t.detach().clone().contiguous().requires_grad_(True) for t in (k, b)]
    opt = torch.optim.LBFGS(params, max_iter=REFINE_STEP, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        out = error(*params)[0]
        out.backward()
        return out

    with torch.enable_grad():
        for _ in range(steps // REFINE_STEP):
            opt.step(closure)
    with torch.no_grad():
        return *(t.detach() for t in params), error(*params)[1]


def _groups(keys: Tensor, mass: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """(KVH, L, m) each token's mass in its group (zero elsewhere) and (KVH, m, hd) the groups' mass-weighted
    mean keys, by :data:`MERGE_STEPS` Lloyd iterations of mass-weighted k-means on ``keys`` started from the
    kept tokens ``idx`` (each stays in its own group)."""
    own, centre = torch.arange(idx.shape[1], device=idx.device).expand_as(idx), gather(keys, idx)
    for _ in range(MERGE_STEPS + 1):
        group = torch.cdist(keys, centre).argmin(-1).scatter(1, idx, own)
        weight = torch.nn.functional.one_hot(group, idx.shape[1]).double() * mass[..., None]
        centre = weight.transpose(-1, -2) @ keys / weight.sum(1)[..., None]
    return weight, centre


def gather(t: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` (KVH, m) of ``t`` (KVH, L, hd)."""
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
