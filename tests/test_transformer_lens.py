"""`Model.to_transformer_lens()`: a TransformerLens bridge whose hooks equal `capture`, on a copy of the model."""

from __future__ import annotations

import pytest
import torch

import interp

QUESTIONS = ["Is there a pleural effusion?", "Does the heart look enlarged on this radiograph?"]


def _fingerprint(model: interp.Model) -> tuple:
    mods = tuple(type(m).__name__ for m in model.hf.modules())
    attn = getattr(model.hf.config, "_attn_implementation", None)
    weights = float(sum(p.detach().double().sum() for p in model.hf.parameters()))
    return mods, attn, weights


def _tiny_gemma3_text() -> interp.Model:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from interp.models import GEMMA_CHAT_TEMPLATE, tiny_tokenizer

    tok = tiny_tokenizer(GEMMA_CHAT_TEMPLATE)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    return interp.Model.wrap(Gemma3ForCausalLM(cfg).eval(), tok, name="gemma3-text")


@pytest.mark.parametrize("name", ["gemma3-text", "tiny-medgemma"])
def test_the_bridge_equals_capture_and_leaves_the_model_alone(name):
    model = _tiny_gemma3_text() if name == "gemma3-text" else interp.load("tiny-medgemma")
    before = _fingerprint(model)
    bridge = model.to_transformer_lens()
    assert _fingerprint(model) == before  # boot_transformers rewrote the copy, not ours
    acts = interp.capture(model, QUESTIONS, layers=[0, 3], positions="all", progress=False)
    batch = model.encode(QUESTIONS)
    for k in range(len(QUESTIONS)):
        _, cache = bridge.run_with_cache(batch.input_ids[k:k + 1, : int(batch.lengths[k])])
        for i in (0, 3):  # text tokens: the bridge's eager attention equals SDPA up to float32 rounding
            ref = cache[f"blocks.{i}.hook_resid_post"][0]
            torch.testing.assert_close(acts[i][acts.prompt_index == k], ref, rtol=1e-4, atol=1e-4)
    # the workbench's model still takes adapters afterwards
    from interp import lora as L
    from interp.layers import DEFAULT_TARGET_MODULES

    pm = L._peft_wrap(model, [1, 2], r=2, alpha=4, dropout=0.0, target_modules=DEFAULT_TARGET_MODULES, seed=0)
    assert sum(hasattr(m, "lora_A") for m in pm.hf.modules()) == 14
    pm.hf.unload()


def test_a_model_with_adapters_is_refused(tmp_path):
    from interp import lora as L
    from interp.layers import DEFAULT_TARGET_MODULES

    pm = L._peft_wrap(_tiny_gemma3_text(), [1], r=2, alpha=4, dropout=0.0, target_modules=DEFAULT_TARGET_MODULES,
                      seed=0)
    with pytest.raises(interp.InterpError, match="merge them first"):
        pm.to_transformer_lens()
