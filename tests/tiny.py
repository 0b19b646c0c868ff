"""Pico models built from configs, with a small real tokenizer, for fast unit tests."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Translate the sentence into French. Answer briefly and politely.",
    "What is the capital of France? Paris is the capital.",
    "You are a pirate. Speak like a pirate in every answer.",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 plus minus times equals",
    "How do I boil an egg? Tell me a story about a cat and a dog.",
]


QUERIES = [
    "What is the capital of France?",
    "Tell me a story about a cat",
    "1 2 3",
    "How do I boil an egg? Answer briefly and politely, like a pirate.",
    "dog",
]


def prompts():
    """A system prompt and a few-shot prompt (the identity test's and the coverage table's)."""
    from thoughtpatch import Prompt

    return [
        Prompt("You are a pirate. Speak like a pirate in every answer."),
        Prompt("Translate the sentence into French.", (("Hello", "Bonjour"), ("the cat", "le chat"))),
    ]


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


# Per family: the model type and what its pico config sets beyond the common sizes. Several families declare
# their block form through a config flag; each form is its own entry. MoE configs use few, small experts with
# top-2 routing, so routing decisions are real choices.
_MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
SPECS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 8}),
    "gemma": ("gemma", {"head_dim": 8}),
    "gemma2": ("gemma2", {"head_dim": 8, "sliding_window": 8}),  # local layers really are local
    "gemma3": ("gemma3_text", {"head_dim": 8, "sliding_window": 8}),
    "phi3": ("phi3", {"num_key_value_heads": None}),
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 256}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "granite": (
        "granite",
        {"residual_multiplier": 0.5, "embedding_multiplier": 2.0, "attention_multiplier": 0.3, "logits_scaling": 2.0},
    ),
    "smollm3": ("smollm3", {"no_rope_layer_interval": 2}),
    "stablelm": ("stablelm", {"use_parallel_residual": False, "partial_rotary_factor": 0.5}),
    "gpt_neox_sequential": ("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 0.5}),
    "gpt_neox": ("gpt_neox", {"use_parallel_residual": True, "rotary_pct": 0.5}),
    "gptj": ("gptj", {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 256, "rotary_dim": 4}),
    "phi": ("phi", {"partial_rotary_factor": 0.5}),
    "falcon": ("falcon", {"parallel_attn": True, "new_decoder_architecture": False, "multi_query": True}),
    "cohere": ("cohere", {"logit_scale": 0.5}),
    "stablelm_parallel": ("stablelm", {"use_parallel_residual": True}),
    "mixtral": ("mixtral", _MOE),
    "olmoe": ("olmoe", _MOE),
    "qwen3_moe": ("qwen3_moe", _MOE | {"head_dim": 8}),
    "qwen2_moe": ("qwen2_moe", _MOE | {"shared_expert_intermediate_size": 24}),
}
FAMILIES = list(SPECS)


def config(family: str, vocab: int = 400):
    from transformers import AutoConfig

    model_type, extra = SPECS[family]
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs = {k: v for k, v in (common | extra).items() if v is not None}
    return AutoConfig.for_model(model_type, **kwargs)


def build(family: str, folder: Path, seed: int = 0, tok=None) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family))
    with torch.no_grad():  # random init is small; make the residual stream do real work
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    model.save_pretrained(folder)
    (tok or tokenizer()).save_pretrained(folder)
    return folder


SHAPE = (3, 32, 4, 8)  # every pico model's blocks, hidden size, heads, head size
PART_SCALES = {
    "attn": 0.15,
    "scalar": 0.3,
    "attn_bias": 0.5,
    "vector": 0.5,
    "matrix": 0.3,
    "query": 0.1,
    "gate": 0.1,
    "down": 0.1,
    "value": 0.1,
}


def random_patch(
    parts: set[str],
    placement: str = "skip",
    *,
    seed: int = 0,
    skip: int = 0,
    rank: int = 2,
    scale: float | None = None,
    shape: tuple[int, int, int, int] = SHAPE,
    dtype: torch.dtype = torch.float32,
    meta: dict[str, str] | None = None,
    inner: int = 64,
    kv_heads: int = 2,
):
    """A patch with random values in the named parts at every block: ``attn`` (per-head maps), ``scalar``
    (per-head scales) or ``cross`` (one map across the heads), ``attn_bias``, ``vector``, ``matrix`` (rank ``rank``), ``query``, ``gate``, ``down``
    (rank ``rank``, from MLP activations of width ``inner``), ``value`` (a change of the value projection, for
    ``kv_heads`` key/value heads).

    Each part has its own size (``scale``: one for all); ``meta`` adds to a base model and a prompt hash.
    """
    from thoughtpatch.patch import LayerPatch, Patch

    n_layers, d, heads, head_dim = shape
    g = torch.Generator().manual_seed(seed)

    def r(part, *size):
        return torch.randn(*size, generator=g, dtype=dtype) * (scale or PART_SCALES[part])

    def one() -> LayerPatch:
        lp = LayerPatch()
        if "attn" in parts or "scalar" in parts:
            lp.attn_weight = r("scalar", heads) if "scalar" in parts else r("attn", heads, head_dim, head_dim)
        if "cross" in parts:  # one map across the heads, of about the per-head map's size on each head
            lp.attn_weight = r("attn", 1, heads * head_dim, heads * head_dim) / (1 if scale else heads**0.5)
        if "attn_bias" in parts:
            lp.attn_bias = r("attn_bias", heads * head_dim)
        if "vector" in parts:
            lp.vector = r("vector", d)
        if "matrix" in parts:  # M = B A^T of about the same size whatever the rank
            lp.matrix_a, lp.matrix_b = r("matrix", d, rank) / (1 if scale else rank**0.5), r("matrix", d, rank)
        if "query" in parts:
            lp.attn_query = r("query", heads * head_dim, d)
        if "gate" in parts:
            lp.attn_gate = r("gate", heads, d + 1)
        if "down" in parts:
            lp.down_a, lp.down_b = r("down", inner, rank) / (1 if scale else rank**0.5), r("down", d, rank)
        if "value" in parts:
            lp.value_weight = r("value", kv_heads * head_dim, d)
        return lp

    meta = {"base_model": "tiny", "prompt_sha256": f"{seed:064d}"} | (meta or {})
    return Patch({i: one() for i in range(n_layers)}, placement, skip, meta)
