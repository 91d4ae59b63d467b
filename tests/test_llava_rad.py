"""LLaVA-Rad's module layout end to end: `Model.wrap`, `to_depth`, `lora_config`, `train_lora`, `load_adapter`.

LLaVA-Rad is built by its own repository (the LLaVA-1.5 code base), not by transformers: the class is
`LlavaLlamaForCausalLM`, the Vicuna decoder sits at ``model.layers`` and the vision tower and projector at
``model.vision_tower`` / ``model.mm_projector``. A tiny random model with exactly that layout stands in for
it here (its vision tower has q/k/v projections too, so a name match alone would adapt it).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import interp
from interp.data import builtin
from interp.layers import LayerSelection


def _llava_rad_layout() -> interp.Model:
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaModel

    from interp.models import LLAVA_CHAT_TEMPLATE, tiny_tokenizer

    class CLIPVisionTower(nn.Module):  # llava/model/multimodal_encoder/clip_encoder.py
        def __init__(self):
            super().__init__()
            self.vision_tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=2,
                                                                 image_size=28, patch_size=14))

    class LlavaLlamaModel(LlamaModel):  # LlavaMetaModel + LlamaModel
        def __init__(self, config):
            super().__init__(config)
            self.vision_tower = CLIPVisionTower()
            self.mm_projector = nn.Sequential(nn.Linear(32, config.hidden_size), nn.GELU(),
                                              nn.Linear(config.hidden_size, config.hidden_size))

    class LlavaLlamaForCausalLM(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.model = LlavaLlamaModel(config)
            self.post_init()

    tok = tiny_tokenizer(LLAVA_CHAT_TEMPLATE)  # Vicuna v1, as LLaVA-Rad uses it
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, bos_token_id=2,
                      eos_token_id=1)
    torch.manual_seed(0)
    hf = LlavaLlamaForCausalLM(cfg).eval()
    hf.config._name_or_path = "microsoft/llava-rad"
    return interp.Model.wrap(hf, tok, name="tiny-llava-rad")


@pytest.fixture(scope="module")
def rad() -> interp.Model:
    return _llava_rad_layout()


def test_wrap_finds_the_decoder_at_model_layers(rad):
    assert rad.layers_path == "model.layers" and rad.n_layers == 8
    assert interp.hf.is_verified(rad.hf)  # the fast paths are checked for this layout


def test_the_study_window_maps_to_llava_rads_layout(rad):
    study = LayerSelection(tuple(range(15, 20)), 34, layers_pattern="language_model.layers")
    assert study.to_depth(32).layers == (14, 15, 16, 17, 18)  # the published LLaVA-Rad adapter's layers
    sel = study.to_depth(rad)
    assert sel.n_layers == 8 and sel.layers_pattern == "model.layers" and len(sel.layers) == 5
    from peft import get_peft_model

    peft_model = get_peft_model(_llava_rad_layout().hf, sel.lora_config(r=4, alpha=8))
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert len(adapted) == 5 * 7  # q/k/v/o + gate/up/down of each layer in the window
    assert all(".model.layers." in n and "vision_tower" not in n for n in adapted)
    assert sorted({int(n.split(".model.layers.")[1].split(".")[0]) for n in adapted}) == list(sel.layers)


def test_train_lora_and_load_adapter_on_llava_rads_layout(rad, tmp_path):
    from peft import PeftModel

    pairs = builtin("register")[:8]
    sel = LayerSelection(tuple(range(15, 20)), 34).to_depth(rad)
    res = interp.train_lora(rad, pairs, layers=sel, r=4, alpha=8, epochs=1, grad_accum=2, lr=5e-3,
                            eval_pairs=builtin("register")[8:12], output_dir=tmp_path / "run", progress=False)
    assert res.fast_path == "llama" and tuple(res.layers) == sel.layers
    cfg = json.loads((res.adapter_path / "adapter_config.json").read_text())
    assert cfg["layers_pattern"] == "model.layers" and cfg["layers_to_transform"] == list(sel.layers)
    # plain PEFT loads it onto a fresh base with that layout, and every LoRA B was trained
    loaded = PeftModel.from_pretrained(_llava_rad_layout().hf, str(res.adapter_path))
    b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert len(b) == 5 * 7 and all(float(p.abs().max()) > 0 for p in b)
    assert not any("vision_tower" in n for n, _ in loaded.named_parameters() if "lora_" in n)
    # the workbench's own loader gives the adapted model; margins move, the base stays the base
    before = interp.evaluate(rad, pairs[:4], n_boot=0, progress=False)
    tuned = interp.load_adapter(rad, res.adapter_path)
    after = interp.evaluate(tuned, pairs[:4], n_boot=0, progress=False)
    again = interp.evaluate(rad, pairs[:4], n_boot=0, progress=False)
    assert not (after.table["margin_a"].to_numpy() == before.table["margin_a"].to_numpy()).all()
    assert (again.table["margin_a"].to_numpy() == before.table["margin_a"].to_numpy()).all()
