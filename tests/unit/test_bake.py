"""Baked checkpoints (apply --save): equal to the in-memory hooks, streamed, refused where inexact, atomic."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiny
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file
from tiny import random_patch
from transformers import AutoModelForCausalLM

from thoughtpatch.apply import installed, kv_heads, mlp_width
from thoughtpatch.architectures import architecture_for
from thoughtpatch.bake import bake_checkpoint, bake_tensor, patch_record, plan_bake
from thoughtpatch.condense import CondenseConfig, for_family
from thoughtpatch.engine import eos_ids, greedy
from thoughtpatch.errors import UsageError
from thoughtpatch.files import array_from_bytes, array_to_bytes, write_bytes
from thoughtpatch.patch import LayerPatch, Patch, patch_to_bytes
from thoughtpatch.prompts import free_ids

# What each family can bake, from its transformers modules (not from thoughtpatch's declarations):
# a bias on o_proj (attn.bias, attn_out vectors) and on the down projection (skip vectors), and whether a
# norm follows the attention / the MLP (then a vector there cannot bake at all).
CAN = {
    "llama": {"attn_bias", "skip", "attn_out"},
    "mistral": set(),
    "qwen2": set(),
    "qwen3": {"attn_bias", "attn_out"},
    "gemma": {"attn_bias", "attn_out"},
    "gemma2": {"attn_bias"},
    "gemma3": {"attn_bias"},
    "gpt2": {"attn_bias", "skip", "attn_out"},
    "phi3": set(),
    "olmo": {"attn_bias", "attn_out"},
    "olmo2": {"attn_bias"},
    "granite": {"attn_bias", "skip", "attn_out"},  # vectors divided by residual_multiplier
    "smollm3": {"attn_bias", "skip", "attn_out"},
    "stablelm": set(),
    "gpt_neox_sequential": {"attn_bias", "skip", "attn_out"},
    "gpt_neox": {"attn_bias", "skip", "attn_out"},
    "gptj": {"skip"},
    "phi": {"attn_bias", "skip", "attn_out"},
    "falcon": {"attn_bias", "skip", "attn_out"},  # one flag turns on all four biases
    "cohere": {"attn_bias", "attn_out"},
    "stablelm_parallel": set(),
    # mixtures of experts: the matrix bakes into the router and every expert's (and shared expert's) inputs
    "mixtral": set(),
    "olmoe": {"attn_bias", "attn_out"},
    "qwen3_moe": {"attn_bias", "attn_out"},
    "qwen2_moe": set(),
}
MOE = {"mixtral", "olmoe", "qwen3_moe", "qwen2_moe"}  # no single MLP output projection: no down map
L, D, H, HD = tiny.SHAPE
META = {"method.mode": "test", "fidelity.kl": "0.05"}
IDS = [[5, 17, 33, 101, 7, 250, 64, 3, 99, 12, 45, 300]]


def patches_for(family: str) -> list[Patch]:
    """Three patches with every part the family bakes (the second with scalar head maps, the third with a map
    across the heads, the first with a down map where the family has an MLP output projection and a value map
    where it has a value projection of its own)."""
    can = CAN[family]
    first = {"attn", "matrix"} | ({"attn_bias"} & can) | ({"down"} if family not in MOE else set())
    placement = "attn_out" if "attn_out" in can else "skip"
    if placement in can:
        first.add("vector")
    second = {"scalar", "matrix"} | ({"vector"} if "skip" in can else set())
    model = AutoModelForCausalLM.from_config(tiny.config(family))
    inner, kvh = mlp_width(model) or 0, kv_heads(model)
    if architecture_for(model).value_proj is not None:
        first.add("value")
    return [
        random_patch(first, placement, seed=1, meta=META, inner=inner, kv_heads=kvh),
        random_patch(second, seed=2, meta=META),
        random_patch({"cross"}, seed=3, meta=META),
    ]


def records(patches):
    return [patch_record(p, f"p{k}.safetensors", "0" * 64, 1.0) for k, p in enumerate(patches)]


def logits(folder_or_model, patches=()):
    model = folder_or_model
    if isinstance(model, Path):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad(), installed(model, list(patches)):
        return model(input_ids=torch.tensor(IDS)).logits


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("family", list(CAN))  # families declared with their bias options
def test_baked_checkpoint_equals_in_memory(family, tiny_dir, tmp_path):
    src = tiny_dir(family)
    patches = patches_for(family)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want, plain = logits(base, patches), logits(base)
    out = tmp_path / "baked"
    bake_checkpoint(src, out, patches, records(patches))
    got = logits(out)  # plain transformers: no thoughtpatch code involved in loading or running
    scale = want.abs().max()
    assert (plain - want).abs().max() > 0.05 * scale  # the patches change the model
    assert (got - want).abs().max() <= 1e-4 * scale
    cfg = json.loads((out / "config.json").read_text())
    assert [p["file"] for p in cfg["thoughtpatch"]["patches"]] == ["p0.safetensors", "p1.safetensors", "p2.safetensors"]
    assert base.state_dict().keys() <= AutoModelForCausalLM.from_pretrained(out).state_dict().keys()


@pytest.mark.parametrize("family", list(CAN))
def test_bakeable_preset_keeps_what_the_family_bakes(family):
    arch = architecture_for(tiny.config(family))
    for placement in ("skip", "attn_out"):
        cfg = for_family(CondenseConfig(bakeable=True, placement=placement), arch)
        assert cfg.vector == (placement in CAN[family]) and cfg.attn_bias == ("attn_bias" in CAN[family])


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma2", "phi3", "olmo2", "gptj", "stablelm", "mixtral"])
def test_parts_a_family_cannot_bake_are_refused(family, tiny_dir, tmp_path):
    src = tiny_dir(family)
    refused = (
        [random_patch({"attn", "vector"}, p, seed=3) for p in ("skip", "attn_out") if p not in CAN[family]]
        + [random_patch({"attn", "attn_bias"}, seed=3)] * ("attn_bias" not in CAN[family])
        + [random_patch({"down"}, seed=3)] * (family in MOE)
    )
    assert refused
    for p in refused:
        with pytest.raises(UsageError, match="cannot be baked exactly.*in memory.*export"):
            bake_checkpoint(src, tmp_path / "out", [p], records([p]))
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder


def test_matrix_bakes_into_every_expert_and_refuses_fused_experts(tiny_dir, tmp_path):
    """Mixtral stores its experts one by one: the router and both input projections of every expert change."""
    patch = random_patch({"matrix"}, seed=5)
    summary = bake_checkpoint(tiny_dir("mixtral"), tmp_path / "out", [patch], records([patch]))
    assert summary["tensors_changed"] == L * (1 + 2 * tiny.SPECS["mixtral"][1]["num_local_experts"])
    config = tiny.config("olmoe").to_dict()  # experts fused in one (experts, 2 * inner, hidden) tensor
    block = "model.layers.0.mlp."
    headers = {block + "gate.weight": {"shape": [4, D]}, block + "experts.gate_up_proj": {"shape": [4, 2 * D, D]}}
    with pytest.raises(UsageError, match="holds several experts.*in memory"):
        plan_bake([patch], architecture_for(tiny.config("olmoe")), config, headers=headers)


def test_in_memory_only_parts_and_skipped_tokens_are_refused(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    with pytest.raises(UsageError, match="query-dependent.*in memory"):
        bake_checkpoint(src, tmp_path / "o", [random_patch({"attn", "query"}, seed=4)], [{"file": "q"}])
    with pytest.raises(UsageError, match="first 1 tokens unpatched.*--mode bakeable or --skip 0"):
        bake_checkpoint(src, tmp_path / "o", [random_patch({"attn"}, skip=1, seed=4)], [{"file": "s"}])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_baking_on_cuda_equals_cpu(tiny_dir, tmp_path):
    src, patches = tiny_dir("gpt2"), patches_for("gpt2")
    for device in ("cpu", "cuda"):
        bake_checkpoint(src, tmp_path / device, patches, records(patches), device=device)
    for f in (tmp_path / "cpu").glob("*.safetensors"):
        with safe_open(str(f), "pt") as a, safe_open(str(tmp_path / "cuda" / f.name), "pt") as b:
            for k in a.keys():  # noqa: SIM118 (safe_open has no __contains__)
                torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k), rtol=1e-6, atol=1e-6)


def test_several_patches_install_and_remove_bit_exact(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model)
    assert not torch.equal(logits(model, patches_for("llama")), base)
    assert torch.equal(logits(model), base)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tok):
    """A tiny llama saved in many shards, and two patch files for it."""
    d = tmp_path_factory.mktemp("sharded")
    src = tiny.build("llama", d / "model", tok=tok)
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(src, max_shard_size="40KB")
    (src / "model.safetensors").unlink(missing_ok=True)
    for k, p in enumerate(patches_for("llama")):
        write_bytes(d / f"p{k}.safetensors", patch_to_bytes(p))
    return d, src


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI's entry point in this process (the same code a subprocess runs, minus interpreter start-up)."""
    from thoughtpatch.cli import main

    old = sys.argv
    sys.argv = ["thoughtpatch", *args]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_sharded_checkpoint_streams_and_is_deterministic(sharded, tmp_path, capsys):
    d, src = sharded
    before = tree(src)
    assert sum(name.endswith(".safetensors") for name in before) >= 4
    args = ("apply", *(str(d / f"p{k}.safetensors") for k in range(3)), "--model", str(src), "--scale", "0.7")
    r1 = run_cli(*args, "--save", str(tmp_path / "a"), "--json", "-q")
    code, _, err = _main([*args, "--save", str(tmp_path / "b"), "-q"], capsys)  # the same command again
    assert r1.returncode == 0 and code == 0, r1.stderr.decode() + err
    summary = json.loads(r1.stdout)
    assert summary["flags_turned_on"] == ["attention_bias", "mlp_bias"] and summary["shards"] >= 4
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert a == b  # same command, same bytes
    assert tree(src) == before  # the user's model folder is untouched
    # shards holding nothing the patches change are copied as they are
    shards = [n for n in a if n.endswith(".safetensors")]
    assert {a[n] == before[n] for n in shards} == {True, False}
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / "a" / shard), "pt") as f:
            assert name in set(f.keys())
    with safe_open(str(src / index["weight_map"]["model.embed_tokens.weight"]), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert torch.equal(baked.model.embed_tokens.weight, embed)
    patches = [p.scaled(0.7) for p in patches_for("llama")]
    want = logits(AutoModelForCausalLM.from_pretrained(src).eval(), patches)
    assert (logits(baked) - want).abs().max() <= 1e-4 * want.abs().max()
    card = (tmp_path / "a" / "README.md").read_text()
    for text in ("p0.safetensors", "p1.safetensors", "0" * 63 + "1", "method.mode | test", "fidelity.kl | 0.05"):
        assert text in card
    # in memory, the same patches generate what the baked checkpoint generates
    code, out, err = _main([*args, "--prompt", "the dog", "--max-new-tokens", "6", "--no-chat", "--json", "-q"], capsys)
    assert code == 0, err
    tok = tiny.tokenizer()
    with torch.no_grad():
        ids = greedy(baked, [], [free_ids(tok, "the dog", False)], 6, eos_ids(baked, tok))[0]
    assert json.loads(out)["answers"][0]["answer"] == tok.decode(ids, skip_special_tokens=True).strip()


def _corrupt(d: Path, src: Path) -> dict[str, tuple[list[str], str]]:
    good = (d / "p0.safetensors").read_bytes()
    (d / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    (d / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    nan = random_patch({"attn"}, seed=1)
    nan.layers[0].attn_weight[0, 0, 0] = float("nan")
    write_bytes(d / "nan.safetensors", patch_to_bytes(nan))
    wide = random_patch({"vector"}, seed=1)
    wide.layers[1].vector = torch.zeros(D + 1)
    write_bytes(d / "wide.safetensors", patch_to_bytes(wide))
    write_bytes(d / "query.safetensors", patch_to_bytes(random_patch({"attn", "query"}, seed=1)))
    shard = sorted(src.glob("*.safetensors"))[1]
    broken = d / "broken-model"
    broken.mkdir(exist_ok=True)
    for p in src.iterdir():
        (broken / p.name).write_bytes(p.read_bytes()[:-100] if p == shard else p.read_bytes())
    m = ["--model", str(src)]
    return {
        "truncated patch": ([str(d / "trunc.safetensors"), *m], "patch"),
        "corrupt patch": ([str(d / "junk.safetensors"), *m], "not a safetensors file"),
        "JSON file": ([str(src / "model.safetensors.index.json"), *m], "not a safetensors file"),
        "non-patch safetensors": ([str(shard), *m], "not a thoughtpatch patch"),
        "NaN in a patch": ([str(d / "nan.safetensors"), *m], "NaN or Inf"),
        "mismatched shapes": ([str(d / "wide.safetensors"), *m], "shape"),
        "truncated model shard": ([str(d / "p0.safetensors"), "--model", str(broken)], "corrupt safetensors"),
        "query-dependent patch": ([str(d / "query.safetensors"), *m], "cannot be baked exactly"),
        "output inside the model": ([str(d / "p0.safetensors"), *m, "--save", str(src / "out")], "inside the model"),
    }


def test_bad_input_exits_2_and_touches_nothing(sharded, tmp_path, capsys):
    d, src = sharded
    cases = _corrupt(d, src)
    before = tree(src)
    for name, (args, words) in cases.items():
        save = [] if "--save" in args else ["--save", str(tmp_path / "out")]
        code, _, err = _main(["apply", *args, *save, "-q"], capsys)
        assert code == 2, (name, err)
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
    r = run_cli("apply", *cases["NaN in a patch"][0], "--save", str(tmp_path / "out"))  # and as a real process
    assert r.returncode == 2 and b"NaN or Inf" in r.stderr and b"Traceback" not in r.stderr
    assert tree(src) == before
    assert list(tmp_path.iterdir()) == []
    assert not any(p.name.startswith(".out") for p in src.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_killed_mid_way_leaves_nothing_and_rerun_succeeds(sig, tmp_path_factory, tok, tmp_path):
    big = tmp_path_factory.getbasetemp() / "bigger-llama"
    if not (big / "config.json").exists():
        cfg = tiny.config("llama")
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.head_dim = 256, 1024, 8, 64
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(big, max_shard_size="2MB")
        tok.save_pretrained(big)
    g = torch.Generator().manual_seed(0)
    patch = Patch({i: LayerPatch(vector=torch.randn(256, generator=g), matrix_a=torch.randn(256, 4, generator=g),
                                 matrix_b=torch.randn(256, 4, generator=g)) for i in range(8)}, "skip", 0)  # fmt: skip
    write_bytes(tmp_path / "p.safetensors", patch_to_bytes(patch))
    out = tmp_path / "baked"
    cmd = [sys.executable, "-m", "thoughtpatch", "apply", str(tmp_path / "p.safetensors"), "--model", str(big)]
    proc = subprocess.Popen(  # SIGINT restored: a runner started in the background may ignore it
        [*cmd, "--save", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not any(p.name.startswith(".baked.") for p in tmp_path.iterdir()) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    assert proc.poll() is None, "baking finished before the signal could be sent"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err and b"Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]  # no output, no temporary folder
    r = run_cli(*cmd[3:], "--save", str(out), "-q")
    assert r.returncode == 0, r.stderr.decode()
    assert (out / "model.safetensors.index.json").is_file()


def test_bfloat16_rounding_matches_torch():
    """Baking on the CPU casts to bfloat16 in numpy: the same bits torch writes (round to nearest even)."""
    g = np.random.default_rng(0)
    x = (g.standard_normal(200_000) * 10.0 ** g.integers(-40, 38, 200_000)).astype(np.float32)
    ties = (np.arange(1 << 12, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly half-way
    x = np.concatenate([x, ties, np.float32([np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-45, -1e-40])])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(array_to_bytes(x, "BF16"), want)
    back = array_from_bytes(want.tobytes(), "BF16", [x.size])
    assert np.array_equal(back, torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float().numpy())


def test_bfloat16_checkpoint_bakes_as_torch_does(tiny_dir, tmp_path):
    """A bfloat16 checkpoint baked on the CPU (numpy) against the same math on torch tensors (the GPU's code):
    at most one bfloat16 step apart on a few entries, untouched tensors byte-identical."""
    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), dtype=torch.bfloat16).save_pretrained(src)
    patches = patches_for("llama")
    bake_checkpoint(src, tmp_path / "out", patches, records(patches))
    config = json.loads((src / "config.json").read_text())
    plan = plan_bake(patches, architecture_for(SimpleNamespace(**config)), config)
    sd = load_file(src / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(sd) | set(plan.new) and plan.roles
    for name, t in got.items():
        base = sd.get(name, torch.zeros(t.shape, dtype=torch.bfloat16))
        want = bake_tensor(name, base.float(), plan, lambda n: sd[n].float()).to(torch.bfloat16)
        if name not in plan.roles:
            assert torch.equal(t, want)
            continue
        assert t.dtype == torch.bfloat16 and not torch.equal(t, base)
        close = (t.float() - want.float()).abs() <= 2**-7 * want.float().abs() + 1e-30
        assert close.all() and (t != want).float().mean() < 0.02, name


def test_baking_on_the_cpu_does_not_import_torch(sharded, tmp_path):
    """The CLI bakes with numpy alone: neither torch nor transformers is imported (their start-up dominated)."""
    d, src = sharded
    r = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "thoughtpatch",
            "apply",
            str(d / "p0.safetensors"),
            "--model",
            str(src),
            "--save",
            str(tmp_path / "o2"),
            "-q",
        ],  # fmt: skip
        capture_output=True,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.decode().splitlines() if "|" in line}
    assert r.returncode == 0 and (tmp_path / "o2" / "config.json").is_file(), r.stderr.decode()[-500:]
    assert "numpy" in imported and not {"torch", "transformers"} & imported


def test_a_packaged_model_name_means_its_converted_folder(tmp_path, monkeypatch):
    """``--model NAME`` of a packaged model is its converted folder wherever a command reads the base model
    (``load_model``, ``apply --save``, ``export``: all through ``models.model_folder``), unless a folder of that
    name exists; a patch records the name as its base model, so baking it needs no ``--model``."""
    import thoughtpatch.models as models

    monkeypatch.setattr(models, "wheel_model_dir", lambda name, log=None: tmp_path / "cache" / name)
    assert models.model_folder("gemma-3-270m") == tmp_path / "cache" / "gemma-3-270m"
    assert models.model_folder(None) == models.model_folder("default") == tmp_path / "cache" / models.DEFAULT_MODEL
    assert models.model_folder(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma-3-270m").mkdir()
    assert models.model_folder("gemma-3-270m") == Path("gemma-3-270m")
