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
* ``post_norm``: ``r = h + P1(Attn(h))``; ``h' = r + P2(MLP(r))`` (OLMo-2): no N1, N2 (``None``), ``z = r``.
* ``parallel``: ``h' = h + Attn(N1 h) + MLP(N2 h)`` (GPT-NeoX, GPT-J, Phi-1/2, Falcon, Cohere), often
  with ``N2 = N1``. The mid-residual is ``r = h + Attn(N1 h)``; the MLP input ``z = N2(h)`` does not
  depend on the context once ``h`` does not, so the context acts through the vector alone (``u = 0``).

In the sequential forms the mid-residual ``r`` is the input of ``mlp_norm`` and the MLP input
``z = N2(r)`` its output. Mixture-of-experts blocks are ``pre_norm`` blocks whose ``mlp_inputs`` are the
router and the experts (every module that reads ``z``); ``router`` names the module whose top-k choice
the exact updates must reproduce. ``when`` picks a declaration by config flags, for families whose
block form is a config option (GPT-NeoX ``use_parallel_residual``, Falcon ``parallel_attn``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

from .errors import UsageError

__all__ = ["Architecture", "ARCHITECTURES", "architecture_for", "submodule"]


@dataclass(frozen=True)
class Architecture:
    """Where the parts of one decoder block live, for one family of models."""

    name: str
    model_types: tuple[str, ...]
    block: str = "pre_norm"
    when: tuple[tuple[str, object], ...] = ()  # (config attribute, value) pairs that must all hold
    decoder: str = "model"  # the decoder stack inside the *ForCausalLM model
    layers: str = "model.layers"
    input_norm: str | None = "input_layernorm"  # None: the attention reads h itself
    attention: str = "self_attn"
    attn_out: str = "self_attn.o_proj"  # reads the concatenated head outputs
    value_proj: str | None = "self_attn.v_proj"  # the value projection (reads what the attention reads); None: fused
    post_attn_norm: str | None = None  # sandwich norm applied to the attention branch
    mlp_norm: str | None = "post_attention_layernorm"  # N2: reads r, writes z (None: z = r)
    mlp: str = "mlp"  # the MLP (or mixture of experts) as a whole: reads z
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # every module that reads z
    mlp_out: str | None = "mlp.down_proj"
    router: str | None = None  # mixture of experts: the module that picks each token's experts
    post_mlp_norm: str | None = None
    transposed: bool = False  # GPT-2 style Conv1D: weight stored as (in, out)
    # Biases a baked patch may need (``o_proj`` for the attention map's constant part and ``attn_out`` vectors,
    # the down projection for ``skip`` vectors): a config flag that gives every module of ``*_bias_modules`` a
    # bias, "always" where the modules always have one, or None where the family has no bias there (the default,
    # so a new family bakes biases only once its declaration says how).
    attn_bias_flag: str | None = None
    attn_bias_modules: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    )
    mlp_bias_flag: str | None = None
    mlp_bias_modules: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    # checkpoint tensors (globs relative to the block) that read z, where they are not the weights of mlp_inputs:
    # mixtures of experts store each expert's matrices apart, under names of their own
    mlp_input_tensors: tuple[str, ...] = ()
    residual_scale: str | None = None  # config key of a factor on both branches before they join the residual
    config_names: tuple[tuple[str, str], ...] = ()  # (standard name, this family's config.json key) where they differ
    tuple_output: bool = False  # blocks return (hidden, ...) and the decoder takes [0]
    note: str = ""  # what else sets the family apart (shown in docs/coverage.md)

    def matches(self, config) -> bool:
        return config.model_type in self.model_types and all(getattr(config, k, v) == v for k, v in self.when)

    def branch_scale(self, config) -> float:
        """The factor on each branch before it joins the residual (a config object or config.json's dict)."""
        if self.residual_scale is None:
            return 1.0
        return float(
            config.get(self.residual_scale, 1.0) if isinstance(config, dict) else getattr(config, self.residual_scale)
        )

    @property
    def branch(self) -> str:
        """The module whose output is the attention branch added to the residual."""
        return self.post_attn_norm or self.attention

    @property
    def vector_bakes(self) -> bool:
        """True where a vector on the residual after the MLP equals a down-projection bias."""
        return self.post_mlp_norm is None and self.mlp_out is not None


_SANDWICH = dict(
    block="sandwich",
    post_attn_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
    attn_bias_flag="attention_bias",
)

_PARALLEL = dict(block="parallel")
_EXPERT_INPUTS = ("mlp.gate.weight", "mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight")
_DENSE_INPUTS = ("mlp.gate_proj.weight", "mlp.up_proj.weight")  # dense blocks mixed in (mlp_only_layers)
_MOE = dict(mlp_inputs=("mlp.gate", "mlp.experts"), mlp_out=None, router="mlp.gate", mlp_input_tensors=_EXPERT_INPUTS)
_ATTN_BIAS = dict(attn_bias_flag="attention_bias")
_NEOX = dict(
    decoder="gpt_neox",
    layers="gpt_neox.layers",
    attention="attention",
    attn_out="attention.dense",
    value_proj=None,  # fused with the query and key projections
    mlp_inputs=("mlp.dense_h_to_4h",),
    mlp_out="mlp.dense_4h_to_h",
    attn_bias_modules=("attention.query_key_value", "attention.dense"),
    mlp_bias_flag="always",
    **_ATTN_BIAS,
)
_GPT2_NAMES = (("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head"))
_FALCON_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), attn_bias_flag="attention_bias", mlp_bias_flag="mlp_bias"),
    Architecture("mistral", ("mistral",)),
    Architecture("qwen2", ("qwen2",)),  # q, k, v always have biases, o_proj never
    Architecture("qwen3", ("qwen3",), attn_bias_flag="attention_bias"),
    Architecture("gemma", ("gemma",), attn_bias_flag="attention_bias"),
    Architecture("gemma2", ("gemma2",), **_SANDWICH),
    Architecture("gemma3", ("gemma3_text",), **_SANDWICH),
    Architecture("phi3", ("phi3",), mlp_inputs=("mlp.gate_up_proj",), value_proj=None),
    Architecture(
        "gpt2",
        ("gpt2",),
        decoder="transformer",
        layers="transformer.h",
        input_norm="ln_1",
        attention="attn",
        attn_out="attn.c_proj",
        value_proj=None,
        mlp_norm="ln_2",
        mlp_inputs=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        transposed=True,
        attn_bias_flag="always",
        mlp_bias_flag="always",
        config_names=_GPT2_NAMES,
    ),
    # dense pre-norm families
    Architecture("olmo", ("olmo",), note="LayerNorm without weights", **_ATTN_BIAS),
    Architecture(
        "olmo2",
        ("olmo2",),
        block="post_norm",
        input_norm=None,
        post_attn_norm="post_attention_layernorm",
        mlp_norm=None,
        post_mlp_norm="post_feedforward_layernorm",
        note="q/k norms",
        **_ATTN_BIAS,
    ),
    Architecture(
        "granite",
        ("granite",),
        residual_scale="residual_multiplier",
        attn_bias_flag="attention_bias",
        mlp_bias_flag="mlp_bias",
        note="residual, attention, embedding and logit multipliers",
    ),
    Architecture(
        "smollm3", ("smollm3",), mlp_bias_flag="mlp_bias", note="no rotary embedding on some layers", **_ATTN_BIAS
    ),
    Architecture(
        "stablelm",
        ("stablelm",),
        when=(("use_parallel_residual", False),),
        note="LayerNorm, partial rotary",  # o_proj and the MLP never have biases
    ),
    Architecture("gpt_neox_sequential", ("gpt_neox",), when=(("use_parallel_residual", False),), **_NEOX),
    # parallel blocks: attention and MLP read the same block input
    Architecture(
        "gpt_neox",
        ("gpt_neox",),
        when=(("use_parallel_residual", True),),
        note="two norms: N2 reads h",
        **_NEOX,
        **_PARALLEL,
    ),
    Architecture(
        "gptj",
        ("gptj",),
        decoder="transformer",
        layers="transformer.h",
        input_norm="ln_1",
        attention="attn",
        attn_out="attn.out_proj",
        value_proj="attn.v_proj",
        mlp_norm="ln_1",
        mlp_inputs=("mlp.fc_in",),
        mlp_out="mlp.fc_out",
        mlp_bias_flag="always",  # out_proj never has a bias
        config_names=_GPT2_NAMES,
        note="one shared norm",
        **_PARALLEL,
    ),
    Architecture(
        "phi",
        ("phi",),
        attn_out="self_attn.dense",
        mlp_norm="input_layernorm",
        mlp_inputs=("mlp.fc1",),
        mlp_out="mlp.fc2",
        attn_bias_flag="always",
        mlp_bias_flag="always",
        note="one shared norm, partial rotary",
        **_PARALLEL,
    ),
    Architecture(
        "falcon",
        ("falcon",),
        when=(("parallel_attn", True), ("new_decoder_architecture", False)),
        decoder="transformer",
        layers="transformer.h",
        attention="self_attention",
        attn_out="self_attention.dense",
        value_proj=None,
        mlp_norm="input_layernorm",
        mlp_inputs=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        tuple_output=True,
        attn_bias_flag="bias",  # one flag for all four linear maps
        attn_bias_modules=_FALCON_LINEARS,
        mlp_bias_flag="bias",
        mlp_bias_modules=_FALCON_LINEARS,
        note="one shared norm",
        **_PARALLEL,
    ),
    Architecture(
        "cohere",
        ("cohere",),
        mlp_norm="input_layernorm",
        note="one shared norm, logit scale",
        **_ATTN_BIAS,
        **_PARALLEL,
    ),
    Architecture(
        "stablelm_parallel",
        ("stablelm",),
        when=(("use_parallel_residual", True),),
        mlp_norm="input_layernorm",
        note="one shared norm",
        **_PARALLEL,
    ),
    # mixtures of experts: the router and every expert read z
    Architecture(
        "mixtral",
        ("mixtral",),
        **(
            _MOE
            | dict(
                mlp_input_tensors=(
                    "block_sparse_moe.gate.weight",
                    "block_sparse_moe.experts.*.w1.weight",
                    "block_sparse_moe.experts.*.w3.weight",
                )
            )
        ),
    ),
    Architecture("olmoe", ("olmoe",), note="q/k norms", **_MOE, **_ATTN_BIAS),
    Architecture(
        "qwen3_moe",
        ("qwen3_moe",),
        note="q/k norms",
        **(_MOE | dict(mlp_input_tensors=_EXPERT_INPUTS + _DENSE_INPUTS)),
        **_ATTN_BIAS,
    ),
    Architecture(
        "qwen2_moe",
        ("qwen2_moe",),
        note="routed experts plus a gated shared expert",
        **(
            _MOE
            | dict(
                mlp_inputs=("mlp.gate", "mlp.experts", "mlp.shared_expert", "mlp.shared_expert_gate"),
                mlp_input_tensors=_EXPERT_INPUTS
                + _DENSE_INPUTS
                + (
                    "mlp.shared_expert.gate_proj.weight",
                    "mlp.shared_expert.up_proj.weight",
                    "mlp.shared_expert_gate.weight",
                ),
            )
        ),
    ),
)


def architecture_for(model_or_config) -> Architecture:
    """The declaration for a model (or its config); a clear error that says how to add one if there is none."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", "?")
    for arch in ARCHITECTURES:
        if arch.matches(config):
            return arch
    known = [a for a in ARCHITECTURES if model_type in a.model_types]
    what = f"this {model_type!r} variant ({', '.join(f'{k}={getattr(config, k, None)}' for a in known for k, _ in a.when)})"
    supported = ", ".join(dict.fromkeys(t for a in ARCHITECTURES for t in a.model_types))
    raise UsageError(
        f"unsupported architecture: {what if known else repr(model_type)}; supported: {supported}. "
        "To add it, declare where its block's parts live (one Architecture in thoughtpatch/architectures.py, "
        "see docs/architectures.md)"
    )


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` with an error that names the missing path."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UsageError(f"model has no module {path!r}: {exc}") from None
