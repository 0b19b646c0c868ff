"""Architecture knowledge as data: one declaration per model family.

Each :class:`Architecture` says where the pieces that the math of the implicit updates needs live
inside one decoder block, as dotted module paths relative to the block, and which block form the
family uses. Adding a family is adding one declaration to :data:`ARCHITECTURES`::

    Architecture(
        name="llama",
        model_types=("llama",),
        mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
    )

Block forms:

* ``pre_norm``: ``r = h + Attn(N1 h)``; ``h' = r + MLP(N2 r)`` (Llama, Mistral, Qwen, Phi-3, GPT-2).
* ``sandwich``: ``r = h + P1(Attn(N1 h))``; ``h' = r + P2(MLP(N2 r))`` (Gemma-2, Gemma-3).

The mid-residual ``r`` is the input of ``mlp_norm``; the MLP input ``z = N2(r)`` is its output.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UsageError

__all__ = ["Architecture", "ARCHITECTURES", "architecture_for", "submodule"]


@dataclass(frozen=True)
class Architecture:
    """Where the parts of one decoder block live, for one family of models."""

    name: str
    model_types: tuple[str, ...]
    block: str = "pre_norm"
    decoder: str = "model"  # the decoder stack inside the *ForCausalLM model
    layers: str = "model.layers"
    input_norm: str = "input_layernorm"
    attention: str = "self_attn"
    attn_out: str = "self_attn.o_proj"  # reads the concatenated head outputs
    post_attn_norm: str | None = None  # sandwich norm applied to the attention branch
    mlp_norm: str = "post_attention_layernorm"  # N2: reads r, writes z
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # every matrix that reads z
    mlp_out: str = "mlp.down_proj"
    post_mlp_norm: str | None = None
    transposed: bool = False  # GPT-2 style Conv1D: weight stored as (in, out)
    # Biases a baked patch may need (``o_proj`` for the attention map's constant part and ``attn_out`` vectors,
    # the down projection for ``skip`` vectors): a config flag that gives every module of its group a bias,
    # "always" where the modules always have one, or None where the family has no bias there (the default, so a
    # new family bakes biases only once its declaration says how).
    attn_bias_flag: str | None = None
    attn_bias_modules: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    )
    mlp_bias_flag: str | None = None
    mlp_bias_modules: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    config_names: tuple[tuple[str, str], ...] = ()  # (standard name, this family's config.json key) where they differ

    @property
    def branch(self) -> str:
        """The module whose output is the attention branch added to the residual."""
        return self.post_attn_norm or self.attention

    @property
    def vector_bakes(self) -> bool:
        """True where a vector on the residual after the MLP equals a down-projection bias."""
        return self.post_mlp_norm is None and self.block != "parallel"


_SANDWICH = dict(
    block="sandwich",
    post_attn_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
    attn_bias_flag="attention_bias",
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), attn_bias_flag="attention_bias", mlp_bias_flag="mlp_bias"),
    Architecture("mistral", ("mistral",)),
    Architecture("qwen2", ("qwen2",)),  # q, k, v always have biases, o_proj never
    Architecture("qwen3", ("qwen3",), attn_bias_flag="attention_bias"),
    Architecture("gemma", ("gemma",), attn_bias_flag="attention_bias"),
    Architecture("gemma2", ("gemma2",), **_SANDWICH),
    Architecture("gemma3", ("gemma3_text",), **_SANDWICH),
    Architecture("phi3", ("phi3",), mlp_inputs=("mlp.gate_up_proj",)),
    Architecture(
        "gpt2",
        ("gpt2",),
        decoder="transformer",
        layers="transformer.h",
        input_norm="ln_1",
        attention="attn",
        attn_out="attn.c_proj",
        mlp_norm="ln_2",
        mlp_inputs=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        transposed=True,
        attn_bias_flag="always",
        mlp_bias_flag="always",
        config_names=(("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head")),
    ),
)


def architecture_for(model_or_type: nn.Module | str) -> Architecture:
    """The declaration for a model (or a ``config.model_type``); a clear error if there is none."""
    model_type = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", "?")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise UsageError(
        f"unsupported architecture {model_type!r}; supported: {supported} "
        "(add an Architecture declaration in thoughtpatch/architectures.py)"
    )


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` with an error that names the missing path."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UsageError(f"model has no module {path!r}: {exc}") from None
