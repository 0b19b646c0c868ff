"""Figures people would rather look at than read, as PNG (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

import io

from .errors import UsageError

__all__ = ["eval_png", "diff_figure", "diff_png"]

# Per diff kind, the panels drawn over the block index: (title, y label, [(row column, legend label)]); a
# panel shows the columns the report has and is left out when it has none of them.
DIFF_PANELS: dict[str, list[tuple[str, str, list[tuple[str, str]]]]] = {
    "patch_vs_patch": [
        ("thought vector", "norm", [("vector_norm_a", "a"), ("vector_norm_b", "b")]),
        ("thought matrix", "norm (Frobenius)", [("matrix_norm_a", "a"), ("matrix_norm_b", "b")]),
        ("attention map", "norm (Frobenius)", [("attn_norm_a", "a"), ("attn_norm_b", "b")]),
        ("down map", "norm (Frobenius)", [("down_norm_a", "a"), ("down_norm_b", "b")]),
        (
            "agreement (1: the same)",
            "cosine / mean cos² of principal angles",
            [("vector_cosine", "vector cosine"), ("write_overlap", "matrix write space"), ("read_overlap", "matrix read space")],
        ),
        ("difference", "|a - b| / max(|a|, |b|)", [("matrix_rel_diff", "thought matrix"), ("attn_rel_diff", "attention map"), ("down_rel_diff", "down map")]),
        ("effective rank of the thought matrix", "exp(entropy of singular values)", [("effective_rank_a", "a"), ("effective_rank_b", "b")]),
    ],
    "patch_vs_model": [
        ("relative weight change", "|dW| / |W|", [("mlp_in_rel_change", "MLP inputs"), ("attn_out_rel_change", "attention output"), ("mlp_out_rel_change", "MLP output (down map)")]),
        (
            "parts that change no weight matrix",
            "norm",
            [("vector_norm", "thought vector"), ("attn_bias_norm", "attention bias"), ("attn_query_norm", "query term"), ("attn_gate_norm", "head gate")],
        ),
    ],
    "model_vs_model": [
        ("relative weight change of the MLP inputs", "|W' - W| / |W|", [("rel_change", "changed model")]),
        ("low-rank patch of that change", "relative error", [("relative_error", "patch")]),
        ("rank of that patch", "rank", [("rank", "patch")]),
    ],
}  # fmt: skip


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'thoughtpatch[plot]'") from None
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": "thoughtpatch"})
    _pyplot().close(fig)
    return buf.getvalue()


def eval_png(report: dict) -> bytes:
    """``eval``'s report as a PNG: KL and top-1 agreement per method, side by side."""
    plt = _pyplot()
    names = list(report["methods"])
    rows = [report["methods"][n] for n in names]
    fig, (kl, top1) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    kl.bar(names, [r["kl"] for r in rows], color="tab:red")
    kl.set_ylabel("KL to the prompted model (nats, lower is better)")
    top1.bar(names, [r["top1"] for r in rows], color="tab:blue")
    top1.set_ylim(0, 1)
    top1.set_ylabel("top-1 agreement (higher is better)")
    fig.suptitle(f"fidelity on {report['queries']} held-out queries, {report['answer_tokens']} answer tokens")
    return _png(fig)


def diff_figure(doc: dict, title: str = ""):
    """``diff``'s report as a matplotlib figure: a panel per quantity it has per block (:data:`DIFF_PANELS`),
    then the principal angles between the write spaces and the KL per prompt where it has them."""
    plt = _pyplot()
    rows = doc.get("layers") or doc.get("mlp_input_patch") or []
    panels = [(t, y, [(c, n) for c, n in cs if any(c in r for r in rows)]) for t, y, cs in DIFF_PANELS[doc["kind"]]]
    panels = [p for p in panels if p[2]]
    angles = [(r["block"], a) for r in rows for a in r.get("principal_angles_deg", [])]
    kls = doc.get("functional", {}).get("kl_per_prompt", [])
    n = len(panels) + bool(angles) + bool(kls)
    if not n:
        raise UsageError("--plot: this diff has no per-block numbers to draw")
    cols, lines = min(n, 3), -(-n // 3)
    fig, grid = plt.subplots(lines, cols, figsize=(4.4 * cols, 3.3 * lines), squeeze=False, constrained_layout=True)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.remove()
    for ax, (name, ylabel, columns) in zip(axes, panels, strict=False):
        for c, label in columns:
            ax.plot(*zip(*[(r["block"], r[c]) for r in rows if c in r], strict=True), marker="o", label=label)
        ax.set(title=name, xlabel="block", ylabel=ylabel)
        ax.legend(fontsize="small")
    rest = axes[len(panels) : n]
    if angles:
        ax = rest.pop(0)
        ax.scatter(*zip(*angles, strict=True), s=14)
        ax.set(title="principal angles, matrix write spaces", xlabel="block", ylabel="degrees", ylim=(0, 90))
    if kls:
        ax = rest.pop(0)
        ax.bar(range(1, len(kls) + 1), kls, color="tab:red")
        ax.set(title=f"KL(base || patched), mean {doc['functional']['kl']:.3g}", xlabel="prompt", ylabel="nats")
    fig.suptitle(title or doc["kind"].replace("_", " "))
    return fig


def diff_png(doc: dict, title: str = "") -> bytes:
    """:func:`diff_figure` as PNG bytes."""
    return _png(diff_figure(doc, title))
