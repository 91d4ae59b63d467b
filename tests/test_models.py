"""Model loading, prompt formatting, answer tokens and structure discovery."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.models import Prompt


def test_tiny_medgemma_has_the_real_medgemma_layout(tiny_medgemma):
    from transformers import Gemma3ForConditionalGeneration

    assert isinstance(tiny_medgemma.hf, Gemma3ForConditionalGeneration)
    assert tiny_medgemma.layers_path == "model.language_model.layers"
    assert tiny_medgemma.layers is tiny_medgemma.hf.model.language_model.layers
    assert tiny_medgemma.is_multimodal and tiny_medgemma.n_layers == 6 and tiny_medgemma.d_model == 64
    types = tiny_medgemma.hf.config.text_config.layer_types
    assert types[:6] == ["sliding_attention"] * 5 + ["full_attention"]  # MedGemma's 5 local : 1 global


def test_tiny_llava_has_a_llama_decoder(tiny_llava):
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert isinstance(tiny_llava.hf, LlavaForConditionalGeneration)
    assert isinstance(tiny_llava.layer(0), LlamaDecoderLayer)
    assert "vision" not in tiny_llava.layers_path


def test_gemma_chat_format_and_image_tokens(tiny_medgemma, xray_images):
    text = tiny_medgemma.format("Is there an effusion?", image=True)
    assert text == ("<bos><start_of_turn>user\n<start_of_image>Is there an effusion?<end_of_turn>\n"
                    "<start_of_turn>model\n")
    batch = tiny_medgemma.encode([Prompt("Is there an effusion?", xray_images[0])])
    ids = batch.input_ids[0]
    image_token = tiny_medgemma.hf.config.image_token_index
    assert int((ids == image_token).sum()) == tiny_medgemma.hf.config.mm_tokens_per_image
    assert "pixel_values" in batch.inputs and "token_type_ids" in batch.inputs
    # the image soft tokens are exactly those with token_type 1
    assert torch.equal(batch.inputs["token_type_ids"][0].bool(), ids == image_token)


def test_question_mask_covers_exactly_the_question(tiny_medgemma, tiny_llava, xray_images):
    for model in (tiny_medgemma, tiny_llava):
        prompts = [Prompt("Is the heart enlarged?", xray_images[1], "Findings: cardiomegaly."),
                   Prompt("any fluid around the lungs?")]
        batch = model.encode(prompts)
        for i, p in enumerate(prompts):
            picked = batch.input_ids[i][batch.question_mask[i]]
            assert model.tokenizer.decode(picked).strip() == p.question
            assert not (batch.question_mask[i] & batch.special_mask[i]).any()


def test_answer_ids_follow_the_prompt_format(tiny_medgemma, tiny_llava):
    tok = tiny_medgemma.tokenizer
    yes, no = tiny_medgemma.answer_ids
    assert tok.decode([yes]).startswith("Y") and tok.decode([no]).startswith("N")
    yes, no = tiny_llava.answer_ids
    assert tiny_llava.tokenizer.decode([yes]).startswith(" ")  # Vicuna answers after "ASSISTANT:"


def test_wrap_keeps_a_model_loaded_elsewhere(tiny_medgemma):
    wrapped = interp.Model.wrap(tiny_medgemma.hf, tiny_medgemma.processor, name="mine")
    assert wrapped.layers is tiny_medgemma.layers and wrapped.chat and wrapped.is_multimodal
    assert wrapped.answer_ids == tiny_medgemma.answer_ids


def test_hook_names_follow_transformerlens(tiny_medgemma):
    assert tiny_medgemma.hook_name(3) == "blocks.3.hook_resid_post"
    with pytest.raises(interp.InterpError, match="out of range"):
        tiny_medgemma.hook_name(6)


@pytest.mark.parametrize("source, message", [
    ("tiny-gemma", "unknown model 'tiny-gemma'"),
    ("./no/such/folder", "model folder not found"),
    ("missing.gguf", "GGUF file not found"),
])
def test_bad_sources_get_clear_errors(source, message):
    with pytest.raises(interp.InterpError, match=message):
        interp.load(source)


def test_bad_dtype_is_named():
    with pytest.raises(interp.InterpError, match="dtype='float13'"):
        interp.load("tiny-llava", dtype="float13")


def test_local_folder_round_trip(tiny_llava, tmp_path):
    """A saved model folder loads back through the hub/folder path with the same logits."""
    tiny_llava.hf.save_pretrained(tmp_path)
    tiny_llava.processor.save_pretrained(tmp_path)
    again = interp.load(str(tmp_path))
    assert type(again.hf) is type(tiny_llava.hf) and again.is_multimodal
    inputs = tiny_llava.inputs("Is there an effusion?")
    with torch.no_grad():
        assert torch.allclose(again.hf(**inputs).logits, tiny_llava.hf(**inputs).logits, atol=1e-6)


def test_text_model_refuses_an_image(xray_images):
    model = interp.load("tiny-medgemma")
    text_only = interp.Model.wrap(model.hf.model.language_model, model.tokenizer, name="text-only")
    with pytest.raises(interp.InterpError, match="text-only model"):
        text_only.encode([Prompt("Is there an effusion?", xray_images[0])])


@pytest.mark.slow
def test_gemma3_270m_is_the_real_base_model(gemma270m):
    cfg = gemma270m.hf.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (18, 640, 2048, 262144)
    assert not gemma270m.chat
    assert gemma270m.format("Is there an effusion?") == "<bos>Question: Is there an effusion?\nAnswer (yes or no):"
    assert [gemma270m.tokenizer.decode([i]) for i in gemma270m.answer_ids] == [" yes", " no"]
    # a real language model: a familiar continuation is far likelier than chance
    with torch.no_grad():
        ids = gemma270m.tokenizer("The capital of France is", return_tensors="pt")
        logits = gemma270m.hf(**ids).logits[0, -1]
    paris = gemma270m.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    assert int((logits > logits[paris]).sum()) < 10  # " Paris" ranks in the top 10 of 262,144
