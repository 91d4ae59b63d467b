"""A MedGemma-4B-shaped model with random weights, for GPU benchmarks (speed does not depend on values).

The text decoder and SigLIP tower use MedGemma-4B-it's published sizes (see FACTS.md); the tokenizer is
the workbench's tiny BPE one, whose ids all fall inside MedGemma's 262,208-token vocabulary.
"""

from __future__ import annotations

import torch

import interp
from interp.models import GEMMA_CHAT_TEMPLATE, tiny_tokenizer

TEXT = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
            num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
            max_position_embeddings=131072, query_pre_attn_scalar=256,
            pad_token_id=0, bos_token_id=2, eos_token_id=1)
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=896, patch_size=14)
SMOKE_TEXT = dict(TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=2048, sliding_window=64)
SMOKE_VISION = dict(VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=56)
# MedGemma's depth (34 decoder layers, 1,024-token window) at narrow widths: how rounding grows with depth
DEEP_TEXT = dict(SMOKE_TEXT, hidden_size=256, intermediate_size=1024, num_hidden_layers=34, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32, sliding_window=1024)
DEEP_VISION = dict(SMOKE_VISION, hidden_size=128, intermediate_size=256, num_hidden_layers=4, image_size=112)


def build(*, smoke: bool = False, deep: bool = False, device: str | None = None, dtype: torch.dtype | None = None,
          attn: str = "sdpa") -> interp.Model:
    """MedGemma-4B-shaped `Gemma3ForConditionalGeneration` (random weights) wrapped as an `interp.Model`;
    ``smoke``: toy widths and 6 layers; with ``deep``, 34 layers at narrow widths (`DEEP_TEXT`)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    tok = tiny_tokenizer(GEMMA_CHAT_TEMPLATE)
    tid = tok.convert_tokens_to_ids
    text, vision = ((DEEP_TEXT, DEEP_VISION) if deep else (SMOKE_TEXT, SMOKE_VISION)) if smoke else (TEXT, VISION)
    tokens_per_image = 4 if smoke else 256
    cfg = Gemma3Config(text_config=dict(text), vision_config=dict(vision), mm_tokens_per_image=tokens_per_image,
                       boi_token_index=tid("<start_of_image>"), eoi_token_index=tid("<end_of_image>"),
                       image_token_index=tid("<image_soft_token>"))
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            hf = Gemma3ForConditionalGeneration(cfg)
        finally:
            torch.set_default_dtype(default)
    # transformers initialises Gemma 3's image projector to zero: every image's features would then be zero,
    # and a value check on images would not see the pixels. Random, at the scale of the token embeddings.
    with torch.no_grad():
        w = hf.model.multi_modal_projector.mm_input_projection_weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)).to(w) * 0.03)
    hf.eval()
    size = vision["image_size"]
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
                           tokenizer=tok, image_seq_length=tokens_per_image, chat_template=GEMMA_CHAT_TEMPLATE)
    return interp.Model(hf=hf, tokenizer=tok, processor=proc, name="medgemma-4b-shaped", chat=True,
                        answer_words=("Yes", "No"), source="random")


def long_prompts(model: interp.Model, n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` prompts of about ``tokens`` tokens each, stitched from the bundled corpora."""
    return prompts_of_lengths(model, [tokens] * n, seed=seed)


def ragged_lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """``n`` prompt lengths drawn uniformly from ``lo..hi`` tokens, in the order drawn (not sorted)."""
    import numpy as np

    return np.random.default_rng(seed).integers(lo, hi + 1, n).tolist()


def prompts_of_lengths(model: interp.Model, lengths: list[int], seed: int = 0) -> list[str]:
    """One prompt per entry of ``lengths``, about that many tokens once chat-formatted, stitched from the
    bundled medical and general corpora (text nobody tuned the fast paths for)."""
    import random

    from interp.models import RESOURCES

    lines = (RESOURCES / "prompts_medical.txt").read_text().splitlines()
    lines += (RESOURCES / "prompts_general.txt").read_text().splitlines()
    rng = random.Random(seed)
    out = []
    for tokens in lengths:
        body = max(1, tokens - 12)  # the chat template adds ~10 tokens
        ids: list[int] = []
        while len(ids) < body:
            ids += model.tokenizer.encode(" " + rng.choice(lines), add_special_tokens=False)
        out.append(model.tokenizer.decode(ids[:body]).strip())
    return out
