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


def config(family: str, vocab: int = 400):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

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
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=2
        )
    cls = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma": GemmaConfig,
        "gemma2": Gemma2Config,
        "gemma3": Gemma3TextConfig,
        "phi3": Phi3Config,
    }[family]
    extra = {}
    if family in ("gemma", "gemma2", "gemma3", "qwen3"):
        extra["head_dim"] = 8
    if family in ("gemma2", "gemma3"):
        extra["sliding_window"] = 8  # shorter than the sequences, so local layers really are local
    if family == "phi3":
        common.pop("num_key_value_heads")
        pass
    return cls(**common, **extra)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2", "phi3"]


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
