"""Stage 7 of the loop: paraphrase consistency (flip rate, margin difference, accuracy).

The margin of a phrasing is logit(yes) - logit(no) at the first answer token. Only that one position's
logits are ever computed: the decoder body runs, the last real token of each row is gathered, and the
unembedding is applied to those rows alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp._errors import InterpError
from interp.models import Batch, Model, Prompt, _as_prompt


def _body_and_head(model: Model):
    hf = model.hf
    if hasattr(hf, "get_base_model"):  # PEFT: LoRA layers are injected in place, the base holds them
        hf = hf.get_base_model()
    head = hf.get_output_embeddings()
    body = getattr(hf, "model", None)
    if body is None or head is None:
        raise InterpError(f"{type(hf).__name__} has no '.model' body and output embeddings; wrap a standard "
                          "Hugging Face *ForCausalLM or *ForConditionalGeneration model")
    return body, head


def last_hidden(model: Model, batch: Batch) -> Tensor:
    """Final-norm hidden state at each row's last real token: ``[batch, d_model]`` (differentiable)."""
    body, _ = _body_and_head(model)
    out = body(**batch.inputs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch.last_index.to(hidden.device)]


def project(model: Model, hidden: Tensor, token_ids: Sequence[int] | None = None) -> Tensor:
    """Unembed ``[..., d_model]`` hidden states (optionally only some vocabulary rows), with softcapping."""
    _, head = _body_and_head(model)
    weight = head.weight if token_ids is None else head.weight[list(token_ids)]
    logits = hidden.to(weight.dtype) @ weight.T
    if getattr(head, "bias", None) is not None:
        logits = logits + (head.bias if token_ids is None else head.bias[list(token_ids)])
    cap = getattr(model.text_config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def answer_logits(model: Model, prompts: Sequence[Prompt | str], *, batch_size: int | None = None,
                  full_vocab: bool = False, progress: bool = False) -> Tensor:
    """First-answer-token logits: ``[n, 2]`` (yes, no), or ``[n, vocab]`` with ``full_vocab=True``."""
    items = [_as_prompt(p) for p in prompts]
    if not items:
        raise InterpError("prompts is empty: pass at least one prompt")
    if batch_size is None:
        batch_size = 16 if model.device.type == "cuda" else 8
    ids = None if full_vocab else list(model.answer_ids)
    order = sorted(range(len(items)), key=lambda i: len(items[i].question) + len(items[i].context or ""))
    out: list[Tensor] = [None] * len(items)  # type: ignore[list-item]
    with torch.inference_mode():
        for b in tqdm(range(0, len(order), batch_size), desc="score", disable=not progress, leave=False):
            idx = order[b:b + batch_size]
            batch = model.encode([items[i] for i in idx])
            logits = project(model, last_hidden(model, batch), ids).float().cpu()
            for j, i in enumerate(idx):
                out[i] = logits[j]
    return torch.stack(out)


def margins(model: Model, prompts: Sequence[Prompt | str], **kw) -> Tensor:
    """``logit(yes) - logit(no)`` at the first answer token, one per prompt: ``[n]``."""
    logits = answer_logits(model, prompts, **kw)
    return logits[:, 0] - logits[:, 1]
