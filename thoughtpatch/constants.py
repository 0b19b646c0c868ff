"""Defaults in one place: the condensation presets behind ``--mode``, chosen by the fidelity benchmark
(docs/fidelity.md has the tables behind each choice)."""

from __future__ import annotations

from .condense import CondenseConfig

__all__ = ["PRESETS", "FIT_ANSWER_TOKENS"]

# Teacher-forced tokens of the prompted model's own answer per fit probe: 16 beat 8 (mean KL 0.050 vs 0.054).
FIT_ANSWER_TOKENS = 16

PRESETS: dict[str, CondenseConfig] = {
    # Any form `apply` runs: per-head attention map with its query-dependent term and gate. Vectors and MLP
    # matrices on top changed nothing measurable (0.0519 vs 0.0521 mean KL) for 20M more numbers.
    "best": CondenseConfig(attn="full", attn_query=True, attn_gate=True, vector=False, matrix=False),
    # Folds into standard weights: no query-dependent part, every position patched (skip=0).
    # Narrowed per family to what folds exactly (condense.for_family): no vector where a norm follows it or no
    # bias exists, no constant where the attention output has no bias.
    "bakeable": CondenseConfig(attn="full", vector=True, matrix=True, skip=0, bakeable=True),
    # <= 0.1% of the model's parameters: a scalar per head, the vectors and rank-2 matrices.
    "compact": CondenseConfig(attn="scalar", vector=True, matrix=True, rank=2),
}
