"""Defaults in one place: the condensation presets behind ``--mode`` (chosen by the fidelity benchmark)."""

from __future__ import annotations

from .condense import CondenseConfig

__all__ = ["PRESETS"]

PRESETS: dict[str, CondenseConfig] = {
    # Any form `apply` runs: per-head attention map with its query-dependent term, vector and matrix.
    "best": CondenseConfig(attn="full", attn_query=True, vector=True, matrix=True),
    # Folds into standard weights: no query term, every position patched (the sink handled by the fit).
    "bakeable": CondenseConfig(attn="full", attn_query=False, vector=True, matrix=True, skip=0),
    # <= 0.1% of the model's parameters: a scalar per head, the vectors and rank-2 matrices.
    "compact": CondenseConfig(attn="scalar", attn_query=False, vector=True, matrix=True, rank=2),
}
