"""Figures people would rather look at than read, as PNG (needs the ``plot`` extra: matplotlib)."""

from __future__ import annotations

import io

from .errors import UsageError

__all__ = ["eval_png"]


def eval_png(report: dict) -> bytes:
    """``eval``'s report as a PNG: KL and top-1 agreement per method, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'thoughtpatch[plot]'") from None
    names = list(report["methods"])
    rows = [report["methods"][n] for n in names]
    fig, (kl, top1) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    kl.bar(names, [r["kl"] for r in rows], color="tab:red")
    kl.set_ylabel("KL to the prompted model (nats, lower is better)")
    top1.bar(names, [r["top1"] for r in rows], color="tab:blue")
    top1.set_ylim(0, 1)
    top1.set_ylabel("top-1 agreement (higher is better)")
    fig.suptitle(f"fidelity on {report['queries']} held-out queries, {report['answer_tokens']} answer tokens")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": "thoughtpatch"})
    plt.close(fig)
    return buf.getvalue()
