"""The fast paths run (never a silent fallback) on every verified layout, and only `interp/hf.py` touches
transformers' internals. Their values against the plain references are checked in the stage tests (CPU)
and in tests/gpu (H200, bf16)."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch

import interp
from interp import hf
from interp import lora as L
from interp.data import ParaphrasePair, builtin
from interp.layers import DEFAULT_TARGET_MODULES

PACKAGE = Path(interp.__file__).parent


def _tiny_text(kind: str) -> interp.Model:
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    from interp.models import tiny_tokenizer

    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    hf_model = {"gemma3-text": lambda: Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, sliding_window=8, **common)),
                "llama-text": lambda: LlamaForCausalLM(LlamaConfig(**common)),
                "mistral-text": lambda: MistralForCausalLM(MistralConfig(sliding_window=None, **common))}[kind]()
    return interp.Model.wrap(hf_model.eval(), tok, name=kind)


def _model(request, name: str) -> interp.Model:
    return request.getfixturevalue(name) if name.startswith("tiny_") else _tiny_text(name)


VERIFIED_MODELS = ["tiny_medgemma", "tiny_llava", "gemma3-text", "llama-text"]


@pytest.mark.parametrize("name", VERIFIED_MODELS)
def test_evaluate_takes_the_fast_path_without_a_warning(request, name, xray_images):
    model = _model(request, name)
    pairs = builtin("register")[:6]
    if model.is_multimodal:
        pairs = [ParaphrasePair(p.id, p.question_a, p.question_b, answer=p.answer, image=xray_images[i % 3],
                                same_polarity=p.same_polarity) for i, p in enumerate(pairs)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns: here that fails the test
        report = interp.evaluate(model, pairs, n_boot=0, progress=False)
    assert hf.is_verified(model.hf) and "KV cache" in report.method


@pytest.mark.parametrize("name", VERIFIED_MODELS)
def test_lora_and_patching_take_the_fast_path(request, name):
    model = _model(request, name)
    pm = L._peft_wrap(model, [1, 2], r=2, alpha=4, dropout=0.0, target_modules=DEFAULT_TARGET_MODULES, seed=0)
    try:
        trainer = L._Trainer(pm, 1, dict(ce_weight=1.0, kl_weight=1.0, kl_space="yes_no"), fast=True, cache=True)
        assert trainer.runner.kind in ("gemma3", "llama")
        pairs = builtin("register")[:2]
        assert trainer.runner.check([pairs[0].prompt_a(), pairs[1].prompt_b()]) < 1e-4
    finally:
        pm.hf.unload()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prof = interp.layer_profile(model, builtin("register")[:4], method="patching", progress=False)
    assert prof.meta["strategy"] == "cache"


def test_a_verified_architecture_never_falls_back_silently(tiny_medgemma, monkeypatch):
    def unsupported(*_a, **_k):
        raise hf.Unsupported("simulated: this transformers release renamed something")

    monkeypatch.setattr(hf, "check_forward", unsupported)
    with pytest.raises(interp.InterpError, match="verified.*fast=False"):
        interp.evaluate(tiny_medgemma, builtin("register")[:4], n_boot=0, progress=False)
    report = interp.evaluate(tiny_medgemma, builtin("register")[:4], n_boot=0, progress=False, fast=False)
    assert report.method.startswith("naive")


def test_an_unverified_architecture_warns_and_falls_back(monkeypatch):
    model = _tiny_text("mistral-text")
    assert not hf.is_verified(model.hf)
    pairs = builtin("register")[:4]
    fast = interp.evaluate(model, pairs, n_boot=0, progress=False)  # its forward takes the cache: fast path runs
    assert "KV cache" in fast.method

    def unsupported(*_a, **_k):
        raise hf.Unsupported("simulated")

    monkeypatch.setattr(hf, "check_forward", unsupported)
    with pytest.warns(UserWarning, match="not verified for MistralForCausalLM"):
        slow = interp.evaluate(model, pairs, n_boot=0, progress=False)
    assert slow.method.startswith("naive")
    torch.testing.assert_close(torch.tensor(slow.table["margin_a"].to_numpy()),
                               torch.tensor(fast.table["margin_a"].to_numpy()), atol=1e-5, rtol=1e-4)


def test_cache_argument_name_follows_the_installed_transformers(tiny_medgemma):
    import transformers
    from packaging.version import Version

    body = tiny_medgemma.hf.model
    expected = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"
    assert hf.cache_name(body) == expected and hf.cache_name(body.language_model) == expected


# transformers' private or version-specific API: masks, rotary, caches, per-model modules, output internals
INTERNALS = ("masking_utils", "modeling_gemma3", "modeling_llama", "modeling_llava", "cache_utils",
             "DynamicCache", "modeling_outputs", "create_causal_mask", "rotary_emb", "past_key_values",
             "_merge_kwargs", "_process_images", "get_text_with_replacements", "create_mm_token_type_ids")


def test_only_the_one_door_touches_transformers_internals():
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "hf.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transformers"):
                names = [node.module] + [a.name for a in node.names]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.keyword) and node.arg:
                names = [node.arg]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value]
            hits = [n for n in names if any(i == n or n.endswith("." + i) or n.startswith(i + ".") for i in INTERNALS)]
            if hits:
                offenders.append(f"{path.name}:{node.lineno}: {hits[0]}")
    assert not offenders, "transformers internals outside interp/hf.py:\n" + "\n".join(offenders)


def test_vision_tower_runs_contiguous_with_the_same_features(tiny_medgemma):
    """`hf.contiguous_vision` changes the memory layout of SigLIP's residual stream, not its values."""
    body = tiny_medgemma.hf.model
    size = tiny_medgemma.hf.config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    layouts: dict[str, list[bool]] = {"plain": [], "contiguous": []}
    encoder_layers = [m for n, m in body.vision_tower.named_modules() if n.endswith("layers")][0]

    def run(label: str) -> torch.Tensor:
        def record(_m, _a, out):
            layouts[label].append((out[0] if isinstance(out, tuple) else out).is_contiguous())
        handles = [layer.register_forward_hook(record) for layer in encoder_layers]
        try:
            with torch.no_grad():
                if label == "plain":
                    out = body.get_image_features(pixel_values=pixels)
                    return out.pooler_output if hasattr(out, "pooler_output") else out
                return hf.image_features(body, pixels)
        finally:
            for h in handles:
                h.remove()

    plain, fast = run("plain"), run("contiguous")
    assert layouts["plain"] and not any(layouts["plain"])  # the transposed patch embeddings, layer after layer
    assert all(layouts["contiguous"])
    torch.testing.assert_close(torch.stack(list(fast)), torch.stack(list(plain)), rtol=1e-5, atol=1e-6)
    assert not any(m._forward_hooks for m in body.vision_tower.modules())  # the hook lasts for the call only
