"""Defaults in one place: the condensation presets behind ``--mode``, chosen by the fidelity benchmark
(docs/fidelity.md has the tables behind each choice)."""

from __future__ import annotations

from .condense import CondenseConfig

__all__ = ["PRESETS", "FIT_ANSWER_TOKENS", "SIMILAR_QUERIES"]

# Teacher-forced tokens of the prompted model's own answer per fit probe: 16 beat 8 (mean KL 0.050 vs 0.054).
FIT_ANSWER_TOKENS = 16

# Model-written queries like the probes added to them, by mode (transmute --similar; others: none). What cannot
# read the prompt must learn from examples what it does: SmolLM2 bakeable fewshot_antonym KL 0.35 -> 0.16 with 96.
# 192 in session 10 (8 tasks, KL / top-1 / exact): SmolLM2 0.053 / 0.898 / 0.526 -> 0.047 / 0.906 / 0.542,
# Gemma-3-270M 0.054 / 0.891 / 0.448 -> 0.043 / 0.898 / 0.469 (KL lower on all 16 runs). 384 since session 11:
# SmolLM2 -> 0.044 / 0.913 / 0.568, Gemma-3-270M -> 0.036 / 0.905 / 0.479 (KL lower on 8 of 8;
# docs/fidelity.md, Ablations).
SIMILAR_QUERIES: dict[str, int] = {"bakeable": 384}

PRESETS: dict[str, CondenseConfig] = {
    # Any form `apply` runs: virtual key/value slots for half the prompt's tokens (a compressed copy of
    # its keys and values), then the per-head attention map with its query-dependent term and gate on what they
    # leave. SmolLM2, 8 tasks: mean KL 0.052 -> 0.007, top-1 0.896 -> 0.97 over the same maps without slots.
    # Slots merge the prompt's tokens (CondenseConfig.kv_select, the default) rather than keep the heaviest: 8
    # tasks, SmolLM2 0.0054 / 0.972 / 0.844 -> 0.0049 / 0.975 / 0.865 (KL / top-1 / exact), Gemma-3-270M
    # 0.0106 / 0.959 / 0.734 -> 0.0089 / 0.970 / 0.797. Session 9: half the tokens (kv=0.5) instead of a quarter:
    # SmolLM2 0.0049 / 0.975 / 0.865 -> 0.0014 / 0.989 / 0.938, Gemma-3-270M 0.0089 / 0.970 / 0.797 -> 0.0025 /
    # 0.978 / 0.844, Qwen2.5-0.5B 0.0257 / 0.973 / 0.870 -> 0.0152 / 0.988 / 0.927 (KL lower on all 24 runs); the
    # patch hardly grows (SmolLM2 11.5M -> 11.8M numbers: the maps dominate).
    "best": CondenseConfig(attn="full", attn_query=True, attn_gate=True, vector=False, matrix=False, kv=0.5),
    # Folds into standard weights: no query-dependent part, every position patched (skip=0): the attention map
    # (per head until session 8, across the heads since), the thought vector and a rank-128 down map (the block
    # output's remaining error read from the MLP's hidden activations; it bakes into the MLP output projection).
    # SmolLM2, 8 tasks (KL / top-1 / exact): 0.180 / 0.817 / 0.396 -> 0.112 / 0.858 / 0.458 over the map + vector
    # + full-rank thought matrix it replaces, at 9.3M numbers instead of 21M (the full-rank matrix kept as well:
    # 0.102 / 0.860 / 0.464 at 29M).
    # Session 7: the down map's ridge chosen per block by cross-validation over the probes (SmolLM2 picks 0.1 on
    # fewshot_arith, 1-3 on fewshot_antonym), and 96 model-written queries added to the probes (SIMILAR_QUERIES):
    # 8 tasks 0.112 / 0.858 / 0.458 -> 0.066 / 0.892 / 0.505. Session 8: the attention map across the heads
    # (attn="cross", one map of all heads' outputs; it still bakes into o_proj) instead of per head: 8 tasks
    # 0.066 / 0.892 / 0.505 -> 0.053 / 0.898 / 0.526 (KL lower on 7, persona_pirate worse), 9.3M -> 18.1M numbers.
    # Session 10: 192 written queries instead of 96: 0.053 / 0.898 / 0.526 -> 0.047 / 0.906 / 0.542; session 11:
    # 384, 0.044 / 0.913 / 0.568.
    # Narrowed per family to what folds exactly (condense.for_family): no vector where a norm follows it or no
    # bias exists, no constant where the attention output has no bias, no down map on mixtures of experts.
    "bakeable": CondenseConfig(
        attn="cross",
        vector=True,
        matrix=False,
        down=True,
        down_ridge=0.3,
        down_rank=128,
        skip=0,
        bakeable=True,
        down_ridge_grid=(0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
    ),
    # <= 0.1% of the model's parameters: slots taking 0.0865% of them, spread evenly over the blocks, and a scalar
    # per head; 0.0865% is what 0.1% leaves after the head maps on SmolLM2, where they weigh most (0.013%).
    # Merged slots rather than the heaviest tokens: 8 tasks, SmolLM2 KL 0.154 -> 0.130, top-1 0.830 -> 0.848;
    # Gemma-3-270M 0.068 -> 0.051, 0.909 -> 0.912. Session 9: the budget's slots shared out with the remainder
    # (some blocks one more) rather than the same whole count in every block, and 0.08% -> 0.0865%: SmolLM2 9
    # slots per block (0.091%) -> 298 slots, 9-10 per block (0.0994%), 8 tasks 0.130 / 0.848 / 0.531 -> 0.129 /
    # 0.852 / 0.526 (KL / top-1 / exact; a gain within what a slot more or less moves: 275 slots gave 0.844).
    # Session 14: the slots' keys and multiplicities refitted by L-BFGS to the head outputs, their values solved by
    # least squares for each (up to 100 iterations, chosen on held-out query chunks; kv_refine): SmolLM2, 8 tasks
    # 0.129 / 0.852 / 0.526 -> 0.049 / 0.911 / 0.693 (better on every task in all three), Gemma-3-270M 0.048 /
    # 0.925 / 0.620 -> 0.031 / 0.946 / 0.729 (docs/fidelity.md, Ablations). Session 15: 100 iterations on all query
    # chunks, no held-out choice (SmolLM2 0.056 / 0.911 / 0.708, Gemma-3 0.031 / 0.946 / 0.729; a third less work).
    "compact": CondenseConfig(attn="scalar", vector=False, matrix=False, kv=1.0, kv_budget=0.000865, kv_refine=100),
}
