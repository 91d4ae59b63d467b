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


@pytest.mark.parametrize("layers, message", [
    (True, "layers=True: a bool is not a layer index"),
    ([1, False], "a bool is not a layer index"),
    ([1.7], "1.7 is not a whole layer number"),
    ("abc", "'abc' is not a layer number"),
    (["1", "x"], "'x' is not a layer number"),
    ([-1], "negative layer indices are not accepted \\(is -1 meant as layer 5\\?\\)"),
    ([[1, 2]], "list \\[1, 2\\] is not a layer index"),
    (None, "layers=None: pass an int, a list of ints, or 'all'"),
    ([], "layers is empty"),
    ([6], "layer 6 is out of range"),
])
def test_check_layers_refuses_what_is_not_a_layer(tiny_medgemma, layers, message):
    with pytest.raises(interp.InterpError, match=message):
        tiny_medgemma.check_layers(layers)


def test_check_layers_accepts_integral_values_of_any_type(tiny_medgemma):
    import numpy as np

    m = tiny_medgemma
    assert m.check_layers([np.int64(3), 1, 3.0, "2", torch.tensor(0)]) == [0, 1, 2, 3]
    assert m.check_layers(np.arange(2)) == [0, 1] and m.check_layers(torch.tensor([5, 4])) == [4, 5]
    assert m.check_layers(range(1, 3)) == [1, 2] and m.check_layers("all") == list(range(6))


def test_context_length_is_the_smaller_limit(tiny_medgemma):
    assert tiny_medgemma.context_length == 1024
    tok = tiny_medgemma.tokenizer
    old = tok.model_max_length
    try:
        tok.model_max_length = 512
        assert tiny_medgemma.context_length == 512
    finally:
        tok.model_max_length = old


@pytest.mark.parametrize("device, message", [
    ("tpu", "device='tpu' is not a torch device; use 'cpu', 'cuda'"),
    ("banana:0", "device='banana:0' is not a torch device"),
    ("meta", "device='meta': the workbench runs on 'cpu', 'cuda' or 'mps'"),
    pytest.param("cuda", "device='cuda', but this machine has no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    pytest.param("cuda:7", "device='cuda:7', but this machine has",
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has 8 GPUs")),
    pytest.param("mps", "device='mps' is not available",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
])
def test_device_that_does_not_exist_is_named_before_loading(device, message, monkeypatch):
    from interp import models

    monkeypatch.setattr(models, "_tiny_llava", lambda dt: pytest.fail("loaded before checking the device"))
    with pytest.raises(interp.InterpError, match=message):
        interp.load("tiny-llava", device=device)


def test_integer_model_dtype_is_refused():
    with pytest.raises(interp.InterpError, match="dtype='int8': models run in a floating-point dtype"):
        interp.load("tiny-llava", dtype="int8")


@pytest.fixture(scope="module")
def saved_llava(tiny_llava, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved-llava")
    tiny_llava.hf.save_pretrained(folder)
    tiny_llava.processor.save_pretrained(folder)
    return folder


def _broken_copy(saved, tmp_path, how):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    weights = folder / "model.safetensors"
    if how == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    elif how == "no config":
        (folder / "config.json").unlink()
    elif how == "no weights":
        weights.unlink()
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage weights":
        weights.write_bytes(b"\0" * 64)
    elif how == "config not json":
        (folder / "config.json").write_text("{not json")
    elif how == "config without model_type":
        (folder / "config.json").write_text("{}")
    elif how == "no processor":
        for f in folder.iterdir():
            if f.name not in ("config.json", "generation_config.json", "model.safetensors"):
                f.unlink()
    return folder


@pytest.mark.parametrize("how, message", [
    ("empty", "model folder '.*' is empty; point it at a folder written by save_pretrained"),
    ("no config", "model folder '.*' has no config.json"),
    ("no weights", "has a config.json but no weights"),
    ("truncated weights", "could not read the weights of '.*' \\(SafetensorError.*download or copy the weights again"),
    ("garbage weights", "could not read the weights of .*corrupt or truncated"),
    ("config not json", "could not read the config of model folder .*not a valid JSON"),
    ("config without model_type", "could not read the config of model folder .*model_type"),
    ("no processor", "could not load the processor .* of '.*'.*interp.Model.wrap"),
])
def test_broken_model_folder_is_named(saved_llava, tmp_path, how, message):
    folder = _broken_copy(saved_llava, tmp_path, how)
    with pytest.raises(interp.InterpError, match=message):
        interp.load(str(folder))


def test_corrupt_gguf_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_HOME", str(tmp_path / "home"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(interp.InterpError, match="could not read GGUF file '.*model.gguf'.*download it again"):
        interp.load(str(bad))


@pytest.mark.parametrize("prompt, message", [
    ({"text": "a?"}, "prompt 0 is a dict without a 'question' key \\(keys: \\['text'\\]\\)"),
    (("a?", None, None, "extra"), "prompt 0 is a tuple of 4 items"),
    (Prompt(["Is there", "A?"]), "the question must be a str, got list \\['Is there', 'A\\?'\\]"),
    (Prompt("a?", None, ["ctx"]), "the context must be a str or None"),
    (3.5, "prompt 0 must be a str, a Prompt, a dict or a tuple, got float"),
])
def test_malformed_prompt_is_named(tiny_medgemma, prompt, message):
    with pytest.raises(interp.InterpError, match=message):
        tiny_medgemma.encode([prompt])


def test_nf4_loading_names_what_is_wrong_before_touching_the_weights(tmp_path):
    """quantization='nf4' needs a hub id or folder, a CUDA GPU and the one scheme it knows."""
    with pytest.raises(interp.InterpError, match="one supported scheme is 'nf4'"):
        interp.load("tiny-medgemma", quantization="int3")
    with pytest.raises(interp.InterpError, match="built-in model"):
        interp.load("tiny-medgemma", quantization="nf4")
    with pytest.raises(interp.InterpError, match="needs a CUDA GPU"):
        interp.load(str(tmp_path), device="cpu", quantization="nf4")
