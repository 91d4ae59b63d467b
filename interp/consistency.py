"""Stage 7 of the loop: paraphrase consistency (flip rate, margin difference, accuracy).

The margin of a phrasing is logit(yes) - logit(no) at the first answer token; only that position's yes/no
logits are computed. `evaluate()` scores pairs fast (each phrasing and image once, shared prompt prefixes
through the KV cache) and equals the naive one-forward-per-phrasing path (`fast=False`) to float tolerance.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
import weakref
from collections.abc import Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp._errors import InterpError
from interp._results import Result
from interp.data import ParaphraseGroup, ParaphrasePair, check_image_files
from interp.models import Batch, Model, Prompt, _as_prompt, _open_image


def body_and_head(model: Model):
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
    body, _ = body_and_head(model)
    out = body(**batch.inputs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch.last_index.to(hidden.device)]


def project(model: Model, hidden: Tensor, token_ids: Sequence[int] | None = None) -> Tensor:
    """Unembed ``[..., d_model]`` hidden states (optionally only some vocabulary rows), with softcapping."""
    _, head = body_and_head(model)
    weight = head.weight if token_ids is None else head.weight[list(token_ids)]
    logits = hidden.to(weight.dtype) @ weight.T
    if getattr(head, "bias", None) is not None:
        logits = logits + (head.bias if token_ids is None else head.bias[list(token_ids)])
    cap = getattr(model.text_config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def answer_logits(model: Model, prompts: Sequence[Prompt | str], *, batch_size: int | None = None,
                  full_vocab: bool = False, progress: bool = False, fast: bool = False) -> Tensor:
    """First-answer-token logits: ``[n, 2]`` (yes, no), or ``[n, vocab]`` with ``full_vocab=True``.

    ``fast=True`` scores each distinct prompt once, encodes each image once and shares prompt prefixes
    through the KV cache (same numbers to float tolerance); ``fast=False`` is one plain forward per prompt.
    """
    items = [_as_prompt(p) for p in prompts]
    if not items:
        raise InterpError("prompts is empty: pass at least one prompt")
    ids = None if full_vocab else list(model.answer_ids)
    if fast:
        try:
            return _FastScorer(model, batch_size).logits(items, ids, progress=progress)
        except _FastUnsupported as e:
            warnings.warn(f"fast scoring is not available for '{model.name}' ({e}); using one forward per "
                          "prompt", stacklevel=2)
    if batch_size is None:
        batch_size = 16 if model.device.type == "cuda" else 8
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


# ---- fast scoring -----------------------------------------------------------------------------------
# Exactness rests on three facts about causal decoders (checked against transformers 5.23's Gemma 3,
# LLaMA and LLaVA code): (1) a token's keys/values depend only on tokens at or before it, so the keys and
# values of a shared prefix are the same for every phrasing; Gemma 3's bidirectional image block lies wholly
# inside the prefix, and its tokens never see later text. (2) Masks (causal, sliding window, padding) are
# built on cache indices, so each row's real tokens are kept contiguous there: prefixes are left-padded and
# suffixes right-padded, and explicit position_ids carry each row's true positions for RoPE. (3) The
# decoder only sees image features, which are computed once per image and scattered into the embeddings.

class _FastUnsupported(Exception):
    """This model or processor cannot take the fast path (the caller falls back to naive scoring)."""


@dataclass
class _Seq:
    """One distinct prompt, tokenised exactly as ``Model.encode`` tokenises it."""

    ids: list[int]
    token_types: list[int] | None  # Gemma 3: 1 on image soft tokens (a bidirectional attention block)
    image: Hashable | None  # key of its image


@dataclass
class _Block:
    """A slice of the work, tokenised (in a background thread) and ready for the device."""

    seqs: dict[int, _Seq]  # prompt index -> tokens
    pixels: dict[Hashable, Tensor]  # image key -> processor pixel_values (one or more crops)
    groups: list[list[int]]  # prompt indices that share image and context (candidates for a shared prefix)


def _image_key(image: Any) -> Hashable | None:
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        return os.path.abspath(os.fspath(image))
    return ("object", id(image))


# processor -> (split reproduces its call, images kwargs, returns token types); see _FastScorer._check_split
_SPLIT_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _FastScorer:
    """Scores prompts with image reuse, shared-prefix KV caching and yes/no-only logits."""

    def __init__(self, model: Model, batch_size: int | None):
        self.model = model
        self.body, _ = body_and_head(model)
        if not hasattr(self.body, "get_input_embeddings"):
            raise _FastUnsupported("the decoder body has no get_input_embeddings()")
        params = inspect.signature(self.body.forward).parameters
        if not {"inputs_embeds", "past_key_values", "position_ids"} <= set(params):
            raise _FastUnsupported("the decoder forward takes no inputs_embeds/past_key_values/position_ids")
        cfg = model.hf.config
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(cfg, "image_token_index", None)
        self.share_prefix, self.why_not = self._can_share_prefix()
        self.device = model.device
        self.max_rows, self.max_tokens, self.max_images = self._limits(batch_size)
        self._split: bool | None = None  # processor call split into image + text parts (checked on first use)
        self._has_types = False
        self._images_kwargs: dict[str, Any] = {}

    # ---- policy -------------------------------------------------------------------------------------
    def _can_share_prefix(self) -> tuple[bool, str]:
        tc = self.model.text_config
        impl = getattr(tc, "_attn_implementation", None) or getattr(self.model.hf.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager"):
            return False, f"attention implementation {impl!r} (prefix sharing is verified for sdpa and eager)"
        if getattr(tc, "use_bidirectional_attention", False) or not getattr(tc, "is_causal", True):
            return False, "the text decoder attends bidirectionally"
        return True, ""

    @property
    def method(self) -> str:
        if self.share_prefix:
            return "fast: each phrasing and image once, shared prompt prefix via KV cache, yes/no logits only"
        return f"fast: each phrasing and image once, yes/no logits only (no prefix sharing: {self.why_not})"

    def _limits(self, batch_size: int | None) -> tuple[int, int, int]:
        """(rows per forward, tokens per forward, images per vision batch), sized to the device."""
        if batch_size is not None:
            if batch_size < 1:
                raise InterpError(f"batch_size={batch_size}; use a positive number of sequences per forward")
            return batch_size, 1 << 30, batch_size
        if self.device.type != "cuda":
            return 32, 8192, 8
        tc = self.model.text_config
        elt = torch.finfo(self.model.dtype).bits // 8
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        kv = 2 * self.model.n_layers * kv_heads * head_dim * elt  # cache bytes per token
        act = elt * (8 * tc.hidden_size + 3 * getattr(tc, "intermediate_size", 4 * tc.hidden_size))
        free, _ = torch.cuda.mem_get_info(self.device)
        tokens = int(min(max(0.3 * free / (2 * kv + act), 1024), 131072))
        return 128, tokens, 32

    # ---- tokenisation (CPU, background thread) ---------------------------------------------------------
    # The processor's own call (resize and normalise the image, expand its placeholder, tokenise) is split
    # in two so that each image is processed once, on several threads, and each phrasing only tokenised.
    # The split is checked once per run against a full processor call; if it differs, every prompt goes
    # through the full call instead (slower on the CPU, same numbers).
    def _process_image(self, image: Any) -> tuple[Tensor, str]:
        """pixel_values and the placeholder expansion of one image (thread-safe: no tokenizer)."""
        proc = self.model.processor
        processed, replacements = proc._process_images([[_open_image(image)]], **self._images_kwargs)
        extra = set(processed) - {"pixel_values", "num_crops"}
        if extra:
            raise _FastUnsupported(f"the image processor returns {sorted(extra)}, which the fast path does not "
                                   "pass on")
        return processed["pixel_values"], replacements[0]

    def _expand(self, text: str, replacement: str) -> tuple[list[int], list[int] | None]:
        """Token ids (and token types) of a prompt whose image placeholder expands to ``replacement``."""
        proc = self.model.processor
        expanded = proc.get_text_with_replacements([text], [replacement])[0][0]
        ids = self.model.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        return ids, (list(proc.create_mm_token_type_ids([ids])[0]) if self._has_types else None)

    def _full_encode(self, text: str, image: Any) -> dict[str, Any]:
        """The processor's own call, as ``Model.encode`` makes it."""
        enc = dict(self.model.processor(text=[text], images=[[_open_image(image)]], return_tensors="pt",
                                        add_special_tokens=False))
        extra = set(enc) - {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
        if extra:
            raise _FastUnsupported(f"the processor returns {sorted(extra)}, which the fast path does not pass on")
        return enc

    def _check_split(self, text: str, image: Any) -> tuple[Tensor, str] | None:
        """Set ``self._split``: does the split reproduce the processor's call? Returns the image's outputs."""
        proc = self.model.processor
        if proc in _SPLIT_CHECKED:  # checked before for this processor: same answer
            self._split, self._images_kwargs, self._has_types = _SPLIT_CHECKED[proc]
            return None
        full = self._full_encode(text, image)
        self._has_types = "token_type_ids" in full
        try:
            merged = proc._merge_kwargs(tokenizer_init_kwargs=proc.tokenizer.init_kwargs, return_tensors="pt",
                                        add_special_tokens=False)
            self._images_kwargs = dict(merged["images_kwargs"])
            pixels, replacement = self._process_image(image)
            ids, types = self._expand(text, replacement)
            self._split = (ids == full["input_ids"][0].tolist() and torch.equal(pixels, full["pixel_values"])
                           and (types is None or types == full["token_type_ids"][0].tolist()))
        except _FastUnsupported:
            raise
        except Exception:  # noqa: BLE001 - a processor without these hooks takes the full call
            self._split = False
        try:
            _SPLIT_CHECKED[proc] = (self._split, self._images_kwargs, self._has_types)
        except TypeError:  # not weak-referenceable: check again next time
            pass
        return (pixels, replacement) if self._split else None

    def _tokenise(self, items: Sequence[Prompt], groups: list[list[int]]) -> _Block:
        model, tok = self.model, self.model.tokenizer
        block = _Block(seqs={}, pixels={}, groups=groups)
        texts = {i: model.format(items[i].question, context=items[i].context, image=items[i].image is not None)
                 for g in groups for i in g}
        first: dict[Hashable, int] = {}  # image key -> its first prompt
        for g in groups:
            for i in g:
                if items[i].image is not None:
                    first.setdefault(_image_key(items[i].image), i)
        replacement: dict[Hashable, str] = {}
        if first and self._split is None:
            key, i = next(iter(first.items()))
            checked = self._check_split(texts[i], items[i].image)
            if checked is not None:
                block.pixels[key], replacement[key] = checked
        if first and self._split:
            keys = [k for k in first if k not in block.pixels]
            for key, (pixels, rep) in zip(keys, self._pool.map(self._process_image,
                                                               [items[first[k]].image for k in keys]), strict=True):
                block.pixels[key], replacement[key] = pixels, rep
        for g in groups:
            for i in g:
                p = items[i]
                if p.image is None:
                    block.seqs[i] = _Seq(tok(texts[i], add_special_tokens=False)["input_ids"], None, None)
                    continue
                key = _image_key(p.image)
                if self._split:
                    ids, types = self._expand(texts[i], replacement[key])
                else:
                    enc = self._full_encode(texts[i], p.image)
                    block.pixels.setdefault(key, enc["pixel_values"])
                    ids = enc["input_ids"][0].tolist()
                    types = enc["token_type_ids"][0].tolist() if "token_type_ids" in enc else None
                block.seqs[i] = _Seq(ids, types, key)
        return block

    # ---- device passes -----------------------------------------------------------------------------
    def _image_features(self, pixels: dict[Hashable, Tensor]) -> dict[Hashable, Tensor]:
        """Run the vision tower + projector once per image: key -> ``[n_image_tokens, d_model]``."""
        if not pixels:
            return {}
        if not hasattr(self.body, "get_image_features"):
            raise _FastUnsupported("the model has no get_image_features()")
        keys = list(pixels)
        feats: dict[Hashable, Tensor] = {}
        for b in range(0, len(keys), self.max_images):
            chunk = keys[b:b + self.max_images]
            pv = torch.cat([pixels[k] for k in chunk]).to(self.device, self.model.dtype)
            out = self.body.get_image_features(pixel_values=pv)
            per_row = out.pooler_output if hasattr(out, "pooler_output") else out
            if isinstance(per_row, Tensor):
                per_row = list(per_row)
            r = 0
            for k in chunk:
                n = pixels[k].shape[0]
                feats[k] = torch.cat([f.reshape(-1, f.shape[-1]) for f in per_row[r:r + n]])
                r += n
        return feats

    def _embed(self, ids: Tensor, slots: list[tuple[int, list[int], Hashable]], feats: dict) -> Tensor:
        """Token embeddings ``[rows, pos, d_model]`` with image features in the image-token slots."""
        safe = ids.clone()
        if self.image_token_id is not None:
            safe[safe == self.image_token_id] = 0  # overwritten below; 0 keeps out-of-vocab ids out
        emb = self.body.get_input_embeddings()(safe.to(self.device))
        if slots:
            rows = [r for r, pos, _ in slots for _ in pos]
            cols = [c for _, pos, _ in slots for c in pos]
            values = []
            for _, pos, key in slots:
                f = feats[key]
                if f.shape[0] != len(pos):
                    raise InterpError(f"{len(pos)} image tokens in the prompt but the vision tower gives "
                                      f"{f.shape[0]} feature rows; check that the processor matches the model")
                values.append(f)
            emb[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)] = \
                torch.cat(values).to(emb.dtype)
        return emb

    def _image_slots(self, seq: _Seq, start: int, stop: int, offset: int) -> list[int]:
        if seq.image is None or self.image_token_id is None:
            return []
        return [j - start + offset for j in range(start, stop) if seq.ids[j] == self.image_token_id]

    def _run(self, emb: Tensor, attn: Tensor, *, position_ids: Tensor | None = None, cache: Any = None,
             token_types: Tensor | None = None) -> Tensor:
        kw: dict[str, Any] = dict(inputs_embeds=emb, attention_mask=attn.to(self.device),
                                  use_cache=cache is not None)
        if position_ids is not None:
            kw["position_ids"] = position_ids.to(self.device)
        if cache is not None:
            kw["past_key_values"] = cache
        if token_types is not None:
            kw["token_type_ids"] = token_types.to(self.device)
        out = self.body(**kw)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _full_pass(self, rows: list[int], block: _Block, feats: dict) -> Tensor:
        """Whole prompts, right-padded (no shared prefix); returns last-token hidden states."""
        seqs = [block.seqs[i] for i in rows]
        lengths = [len(s.ids) for s in seqs]
        width = max(lengths)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long) if any(s.token_types for s in seqs) else None
        slots = []
        for r, s in enumerate(seqs):
            ids[r, :len(s.ids)] = torch.tensor(s.ids)
            attn[r, :len(s.ids)] = 1
            if types is not None and s.token_types:
                types[r, :len(s.ids)] = torch.tensor(s.token_types)
            pos = self._image_slots(s, 0, len(s.ids), 0)
            if pos:
                slots.append((r, pos, s.image))
        hidden = self._run(self._embed(ids, slots, feats), attn, token_types=types)
        return hidden[torch.arange(len(rows), device=hidden.device), torch.tensor(lengths, device=hidden.device) - 1]

    def _prefix_pass(self, groups: list[tuple[list[int], int]], block: _Block, feats: dict):
        """Left-padded shared prefixes of several groups; returns (per-layer K/V, prefix mask, width)."""
        from transformers import DynamicCache

        width = max(p for _, p in groups)
        n = len(groups)
        ids = torch.full((n, width), self._pad_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        ref = [block.seqs[g[0]] for g, _ in groups]
        types = torch.zeros((n, width), dtype=torch.long) if any(s.token_types for s in ref) else None
        slots = []
        for r, ((_, p), s) in enumerate(zip(groups, ref, strict=True)):
            start = width - p
            ids[r, start:] = torch.tensor(s.ids[:p])
            attn[r, start:] = 1
            pos[r, start:] = torch.arange(p)
            if types is not None and s.token_types:
                types[r, start:] = torch.tensor(s.token_types[:p])
            img = self._image_slots(s, 0, p, start)
            if img:
                slots.append((r, img, s.image))
        cache = DynamicCache()  # no config: every layer keeps all keys (sliding windows are masked, not cut)
        self._run(self._embed(ids, slots, feats), attn, position_ids=pos, cache=cache, token_types=types)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return kv, attn, width

    def _suffix_pass(self, rows: list[tuple[int, int, int]], block: _Block, kv, prefix_attn: Tensor) -> Tensor:
        """Suffixes (right-padded) against copies of their group's prefix K/V; rows: (prompt, group row, P)."""
        from transformers import DynamicCache

        width = max(len(block.seqs[i].ids) - p for i, _, p in rows)
        n = len(rows)
        ids = torch.full((n, width), self._pad_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        lengths = []
        for r, (i, _, p) in enumerate(rows):
            suffix = block.seqs[i].ids[p:]
            ids[r, :len(suffix)] = torch.tensor(suffix)
            attn[r, :len(suffix)] = 1
            pos[r] = torch.arange(p, p + width)
            lengths.append(len(suffix))
        g = torch.tensor([gr for _, gr, _ in rows], device=kv[0][0].device)
        cache = DynamicCache()
        for layer, (k, v) in enumerate(kv):
            cache.update(k.index_select(0, g), v.index_select(0, g), layer)
        full_attn = torch.cat([prefix_attn.index_select(0, g.cpu()), attn], dim=1)
        hidden = self._run(self._embed(ids, [], {}), full_attn, position_ids=pos, cache=cache)
        return hidden[torch.arange(n, device=hidden.device), torch.tensor(lengths, device=hidden.device) - 1]

    # ---- planning --------------------------------------------------------------------------------------
    def _plan(self, block: _Block) -> tuple[list[tuple[list[int], int]], list[int]]:
        """Split a block into prefix groups ``(members, P)`` and prompts run whole."""
        shared, whole = [], []
        for g in block.groups:
            if not self.share_prefix or len(g) < 2:
                whole.extend(g)
                continue
            seqs = [block.seqs[i] for i in g]
            p = min(len(s.ids) for s in seqs) - 1  # every suffix keeps at least its last token
            ref = seqs[0].ids
            for s in seqs[1:]:
                k = 0
                while k < p and s.ids[k] == ref[k]:
                    k += 1
                p = k
            # The image block must lie wholly in the prefix: image tokens attend to each other both ways.
            if self.image_token_id is not None and any(self.image_token_id in s.ids[p:] for s in seqs):
                p = 0
            if p < 1:
                whole.extend(g)
            else:
                shared.append((g, p))
        return shared, whole

    def _batches(self, lengths: list[int], extra: int = 0) -> list[list[int]]:
        """Runs of consecutive indices with at most max_rows rows and max_tokens (padded) tokens each."""
        out, cur, longest = [], [], 0
        for j, n in enumerate(lengths):
            need = max(longest, n + extra)
            if cur and (len(cur) >= self.max_rows or (len(cur) + 1) * need > self.max_tokens):
                out.append(cur)
                cur, need = [], n + extra
            cur.append(j)
            longest = need
        if cur:
            out.append(cur)
        return out

    def _score_block(self, block: _Block, ids: list[int] | None, out: Tensor, bar) -> None:
        feats = self._image_features(block.pixels)
        shared, whole = self._plan(block)

        shared.sort(key=lambda gp: gp[1])
        for chunk in self._batches([p for _, p in shared]):
            groups = [shared[j] for j in chunk]
            kv, prefix_attn, width = self._prefix_pass(groups, block, feats)
            rows = [(i, r, p) for r, (g, p) in enumerate(groups) for i in g]
            rows.sort(key=lambda row: len(block.seqs[row[0]].ids) - row[2])
            for sub in self._batches([len(block.seqs[i].ids) - p for i, _, p in rows], extra=width):
                part = [rows[j] for j in sub]
                logits = project(self.model, self._suffix_pass(part, block, kv, prefix_attn), ids)
                out[torch.tensor([i for i, _, _ in part], device=out.device)] = logits.to(out.dtype)
                bar.update(len(part))
            del kv

        whole.sort(key=lambda i: len(block.seqs[i].ids))
        for sub in self._batches([len(block.seqs[i].ids) for i in whole]):
            part = [whole[j] for j in sub]
            logits = project(self.model, self._full_pass(part, block, feats), ids)
            out[torch.tensor(part, device=out.device)] = logits.to(out.dtype)
            bar.update(len(part))

    def logits(self, items: Sequence[Prompt], ids: list[int] | None, *, progress: bool = False) -> Tensor:
        """``[n, len(ids)]`` (or full-vocabulary) first-answer-token logits for ``items``."""
        model = self.model
        if any(p.image is not None for p in items) and not model.is_multimodal:
            raise InterpError(f"some prompts have an image, but '{model.name}' is a text-only model. Drop the "
                              "images or load a vision-language model such as 'tiny-medgemma'.")
        tok = model.tokenizer
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # Distinct prompts, grouped by what they share before the question: image and context.
        distinct: dict[tuple, int] = {}
        index = []
        for p in items:
            key = (p.question.strip(), _image_key(p.image), p.context or "")
            index.append(distinct.setdefault(key, len(distinct)))
        firsts: dict[int, Prompt] = {}
        for p, j in zip(items, index, strict=True):
            firsts.setdefault(j, p)
        uniq = [firsts[j] for j in range(len(distinct))]
        by_prefix: dict[tuple, list[int]] = {}
        for j, p in enumerate(uniq):
            by_prefix.setdefault((str(_image_key(p.image) or ""), p.context or ""), []).append(j)
        groups = [by_prefix[k] for k in sorted(by_prefix)]
        # Blocks bound host memory (pixel values); each is tokenised while the previous one runs. A boundary
        # never splits the groups of one image (each image is encoded once); the first block is small so
        # that the device starts early.
        blocks, cur, images, n_prompts = [], [], set(), 0
        for g in groups:
            key = _image_key(uniq[g[0]].image)
            cap = 32 if blocks else 8
            if cur and key not in images and (n_prompts + len(g) > 512 or len(images) + (key is not None) > cap):
                blocks.append(cur)
                cur, images, n_prompts = [], set(), 0
            cur.append(g)
            if key is not None:
                images.add(key)
            n_prompts += len(g)
        blocks.append(cur)

        n_out = model.hf.get_output_embeddings().weight.shape[0] if ids is None else len(ids)
        out = torch.zeros((len(uniq), n_out), device=self.device, dtype=torch.float32)
        workers = max(1, min(8, os.cpu_count() or 1))
        with torch.inference_mode(), ThreadPoolExecutor(max_workers=1) as pool, \
                ThreadPoolExecutor(max_workers=workers) as self._pool, \
                tqdm(total=len(uniq), desc="evaluate", disable=not progress, leave=False) as bar:
            future = pool.submit(self._tokenise, uniq, blocks[0])
            for b in range(len(blocks)):
                block = future.result()
                if b + 1 < len(blocks):
                    future = pool.submit(self._tokenise, uniq, blocks[b + 1])
                self._score_block(block, ids, out, bar)
        return out.cpu()[torch.tensor(index)]


# ---- evaluation and its report ----------------------------------------------------------------------------
def _as_pairs(pairs: Iterable[ParaphrasePair | ParaphraseGroup]) -> list[ParaphrasePair]:
    out: list[ParaphrasePair] = []
    for p in pairs:
        if isinstance(p, ParaphraseGroup):
            out.extend(p.pairs())
        elif isinstance(p, ParaphrasePair):
            out.append(p)
        else:
            raise InterpError(f"pairs must hold ParaphrasePair or ParaphraseGroup objects, got {type(p).__name__}; "
                              "load them with interp.data.load_pairs() or interp.data.builtin()")
    if not out:
        raise InterpError("pairs is empty: pass at least one ParaphrasePair")
    seen: set[str] = set()
    for p in out:
        if p.id in seen:
            raise InterpError(f"pair id {p.id!r} occurs twice; pair ids must be unique (compare() matches on them)")
        seen.add(p.id)
    return out


def _ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float] | None:
    """Percentile bootstrap 95% CI of the mean (resampling pairs), or None when it is undefined."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if n_boot < 1 or len(values) < 2:
        return None
    if np.all(values == values[0]):
        return (float(values[0]), float(values[0]))
    res = bootstrap((values,), np.mean, n_resamples=n_boot, confidence_level=0.95, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def _summary(t: pd.DataFrame) -> dict[str, Any]:
    gold = t["correct_a"].notna()
    n_gold = int(gold.sum())
    correct = (t.loc[gold, "correct_a"].astype(bool).sum() + t.loc[gold, "correct_b"].astype(bool).sum())
    return dict(n=len(t), n_flips=int(t["flip"].sum()), flip_rate=float(t["flip"].mean()),
                mean_margin_diff=float(t["margin_diff"].mean()),
                accuracy=float(correct / (2 * n_gold)) if n_gold else None, n_gold=n_gold)


def _fmt_ci(ci: tuple[float, float] | None, pct: bool) -> str:
    if ci is None:
        return ""
    return f" [{ci[0]:.1%}, {ci[1]:.1%}]" if pct else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


@dataclass(frozen=True, eq=False)
class ConsistencyReport(Result):
    """Paraphrase consistency of one model on a set of pairs (flip rate, margin difference, accuracy)."""

    model: str
    n: int  # pairs
    flip_rate: float  # share of pairs whose yes/no decision differs after polarity correction
    n_flips: int
    mean_margin_diff: float  # mean |margin_a - corrected margin_b| (logits)
    accuracy: float | None  # share of phrasings with a gold answer decided correctly; None without gold
    n_gold: int  # pairs with a gold answer (each contributes two phrasings to accuracy)
    ci: dict[str, tuple[float, float] | None]  # bootstrap 95% CIs (percentile, pairs resampled)
    by_kind: dict[str, dict[str, Any]]  # kind -> n, n_flips, flip_rate, mean_margin_diff, accuracy, n_gold
    table: pd.DataFrame = field(repr=False)  # one row per pair
    n_boot: int = 1000
    seed: int = 0
    method: str = ""  # how margins were computed
    seconds: float = 0.0  # wall time of the scoring

    @classmethod
    def from_margins(cls, pairs: Sequence[ParaphrasePair], margin_a: Sequence[float], margin_b: Sequence[float],
                     *, model: str = "", n_boot: int = 1000, seed: int = 0, method: str = "given margins",
                     seconds: float = 0.0) -> ConsistencyReport:
        """A report from per-pair margins already computed (``margin_b`` raw, before polarity correction)."""
        pairs = _as_pairs(pairs)
        m_a = np.asarray(margin_a, dtype=float).reshape(-1)
        m_b = np.asarray(margin_b, dtype=float).reshape(-1)
        if len(m_a) != len(pairs) or len(m_b) != len(pairs):
            raise InterpError(f"{len(pairs)} pairs but {len(m_a)} margin_a and {len(m_b)} margin_b values")
        same = np.array([p.same_polarity for p in pairs])
        corrected = np.where(same, m_b, -m_b)

        def correct(margin: np.ndarray, answers: list[str | None]) -> list[bool | None]:
            return [None if a is None else bool((m > 0) == (a == "yes")) for m, a in zip(margin, answers, strict=True)]

        table = pd.DataFrame({
            "id": [p.id for p in pairs], "group": [p.group for p in pairs], "kind": [p.kind for p in pairs],
            "question_a": [p.question_a for p in pairs], "question_b": [p.question_b for p in pairs],
            "answer": [p.answer for p in pairs], "same_polarity": same,
            "margin_a": m_a, "margin_b": m_b, "margin_b_corrected": corrected,
            "margin_diff": np.abs(m_a - corrected), "flip": (m_a > 0) != (corrected > 0),
            "correct_a": pd.Series(correct(m_a, [p.answer for p in pairs]), dtype=object),
            "correct_b": pd.Series(correct(m_b, [p.answer_b for p in pairs]), dtype=object),
        })
        s = _summary(table)
        gold = table["correct_a"].notna().to_numpy()
        per_pair_acc = (table.loc[gold, "correct_a"].astype(float) + table.loc[gold, "correct_b"].astype(float)) / 2
        ci = {"flip_rate": _ci(table["flip"].to_numpy(float), n_boot, seed),
              "mean_margin_diff": _ci(table["margin_diff"].to_numpy(), n_boot, seed),
              "accuracy": _ci(per_pair_acc.to_numpy(), n_boot, seed) if s["n_gold"] else None}
        by_kind = {str(k): _summary(t) for k, t in table.groupby("kind", sort=True)}
        return cls(model=model, ci=ci, by_kind=by_kind, table=table, n_boot=n_boot, seed=seed, method=method,
                   seconds=seconds, **s)

    def __repr__(self) -> str:
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.1%}{_fmt_ci(self.ci.get('accuracy'), True)}"
        return (f"ConsistencyReport({self.model!r}, n={self.n}: flip rate {self.flip_rate:.1%}"
                f"{_fmt_ci(self.ci.get('flip_rate'), True)} ({self.n_flips} flips), mean |margin diff| "
                f"{self.mean_margin_diff:.2f}{_fmt_ci(self.ci.get('mean_margin_diff'), False)}, accuracy {acc})")

    def figure(self):
        """Plotly scatter: margin of phrasing A against polarity-corrected margin of B, flips highlighted."""
        import plotly.graph_objects as go

        t = self.table
        fig = go.Figure()
        for flipped, name, color in ((False, "consistent", "#4C78A8"), (True, "flip", "#E45756")):
            part = t[t["flip"] == flipped]
            fig.add_trace(go.Scatter(
                x=part["margin_a"], y=part["margin_b_corrected"], mode="markers", name=f"{name} ({len(part)})",
                marker=dict(color=color, size=8, opacity=0.8),
                customdata=np.stack([part["id"], part["question_a"], part["question_b"], part["kind"]], axis=-1),
                hovertemplate="%{customdata[0]} (%{customdata[3]})<br>A: %{customdata[1]}<br>B: %{customdata[2]}"
                              "<br>margin A %{x:.2f}, B %{y:.2f}<extra></extra>"))
        lim = float(np.nanmax(np.abs(t[["margin_a", "margin_b_corrected"]].to_numpy()))) * 1.05 or 1.0
        fig.add_trace(go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", name="A = B",
                                 line=dict(color="grey", dash="dash"), hoverinfo="skip"))
        fig.add_hline(y=0, line=dict(color="lightgrey", width=1))
        fig.add_vline(x=0, line=dict(color="lightgrey", width=1))
        fig.update_layout(title=f"{self.model}: flip rate {self.flip_rate:.1%}, mean |margin diff| "
                                f"{self.mean_margin_diff:.2f} (n={self.n})",
                          xaxis_title="margin A = logit(yes) - logit(no)",
                          yaxis_title="margin B (polarity-corrected)", template="plotly_white")
        return fig

    def compare(self, other: ConsistencyReport) -> ConsistencyComparison:
        """Compare with another report on the same pairs (``self`` = baseline): the study's tests."""
        return ConsistencyComparison.of(self, other)


@dataclass(frozen=True, eq=False)
class ConsistencyComparison(Result):
    """Baseline vs another model on the same pairs: flip-rate z-test (as in the study) and paired tests."""

    baseline: str
    other: str
    n: int
    flip_rate: tuple[float, float]  # (baseline, other)
    flip_rate_delta: float  # other - baseline
    z: float  # two-proportion z-test on flip counts (statsmodels proportions_ztest), the study's test
    p_z: float
    p_mcnemar: float  # paired: McNemar on per-pair flips (exact binomial when < 25 discordant pairs)
    discordant: tuple[int, int]  # (pairs that flip only in baseline, only in other)
    mean_margin_diff: tuple[float, float]
    margin_diff_delta: float
    margin_diff_relative: float  # (other - baseline) / baseline; the study reports -0.795
    wilcoxon: float  # paired: Wilcoxon signed-rank statistic on per-pair |margin diff|
    p_wilcoxon: float
    accuracy: tuple[float, float] | None
    accuracy_delta: float | None
    z_accuracy: float | None  # two-proportion z-test on correct phrasings
    p_accuracy: float | None
    table: pd.DataFrame = field(repr=False)  # per pair: both models' margins, diffs and flips

    @classmethod
    def of(cls, base: ConsistencyReport, other: ConsistencyReport) -> ConsistencyComparison:
        """Run the tests; both reports must cover the same pair ids (and the same questions)."""
        from scipy.stats import wilcoxon
        from statsmodels.stats.contingency_tables import mcnemar

        if not isinstance(other, ConsistencyReport):
            raise InterpError(f"compare() takes a ConsistencyReport, got {type(other).__name__}")
        a, b = base.table.set_index("id"), other.table.set_index("id")
        only_a, only_b = sorted(set(a.index) - set(b.index)), sorted(set(b.index) - set(a.index))
        if only_a or only_b:
            raise InterpError(f"the reports cover different pairs: {len(only_a)} id(s) only in {base.model!r} "
                              f"(e.g. {only_a[:3]}), {len(only_b)} only in {other.model!r} (e.g. {only_b[:3]}); "
                              "evaluate both models on the same pairs")
        b = b.loc[a.index]
        differ = [i for i in a.index if (a.at[i, "question_a"], a.at[i, "question_b"], a.at[i, "same_polarity"])
                  != (b.at[i, "question_a"], b.at[i, "question_b"], b.at[i, "same_polarity"])]
        if differ:
            raise InterpError(f"pair {differ[0]!r} has different questions or polarity in the two reports; "
                              "evaluate both models on the same pair file")
        n = len(a)
        fa, fb = a["flip"].to_numpy(bool), b["flip"].to_numpy(bool)
        z, p_z = _ztest(int(fa.sum()), int(fb.sum()), n, n)
        only_base, only_other = int((fa & ~fb).sum()), int((~fa & fb).sum())
        table2 = [[int((fa & fb).sum()), only_base], [only_other, int((~fa & ~fb).sum())]]
        p_mc = float(mcnemar(table2, exact=(only_base + only_other) < 25, correction=True).pvalue)
        da, db = a["margin_diff"].to_numpy(), b["margin_diff"].to_numpy()
        if np.allclose(da, db, rtol=0, atol=0):
            w, p_w = float("nan"), 1.0
        else:
            res = wilcoxon(da, db)
            w, p_w = float(res.statistic), float(res.pvalue)
        sa, sb = _summary(a.reset_index()), _summary(b.reset_index())
        acc = za = pa = acc_delta = None
        if sa["accuracy"] is not None and sb["accuracy"] is not None:
            acc = (sa["accuracy"], sb["accuracy"])
            acc_delta = acc[1] - acc[0]
            m = 2 * sa["n_gold"]
            za, pa = _ztest(round(acc[0] * m), round(acc[1] * m), m, m)
        rel = (sb["mean_margin_diff"] - sa["mean_margin_diff"]) / sa["mean_margin_diff"] \
            if sa["mean_margin_diff"] > 0 else float("nan")
        cols = ["margin_a", "margin_b_corrected", "margin_diff", "flip"]
        table = a[["kind", *cols]].join(b[cols], lsuffix="_base", rsuffix="_other").reset_index()
        return cls(baseline=base.model, other=other.model, n=n, flip_rate=(sa["flip_rate"], sb["flip_rate"]),
                   flip_rate_delta=sb["flip_rate"] - sa["flip_rate"], z=z, p_z=p_z, p_mcnemar=p_mc,
                   discordant=(only_base, only_other),
                   mean_margin_diff=(sa["mean_margin_diff"], sb["mean_margin_diff"]),
                   margin_diff_delta=sb["mean_margin_diff"] - sa["mean_margin_diff"], margin_diff_relative=rel,
                   wilcoxon=w, p_wilcoxon=p_w, accuracy=acc, accuracy_delta=acc_delta, z_accuracy=za,
                   p_accuracy=pa, table=table)

    def __repr__(self) -> str:
        acc = "" if self.accuracy is None else (f", accuracy {self.accuracy[0]:.1%} -> {self.accuracy[1]:.1%} "
                                                 f"(p={self.p_accuracy:.3g})")
        return (f"ConsistencyComparison({self.baseline!r} -> {self.other!r}, n={self.n}: flip rate "
                f"{self.flip_rate[0]:.1%} -> {self.flip_rate[1]:.1%} (z={self.z:.2f}, p={self.p_z:.3g}; McNemar "
                f"p={self.p_mcnemar:.3g}), mean |margin diff| {self.mean_margin_diff[0]:.2f} -> "
                f"{self.mean_margin_diff[1]:.2f} ({self.margin_diff_relative:+.1%}, Wilcoxon p={self.p_wilcoxon:.3g})"
                f"{acc})")

    def figure(self):
        """Plotly bars: flip rate and mean |margin difference| of both models."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=(f"flip rate (p={self.p_z:.3g})",
                                                            f"mean |margin diff| ({self.margin_diff_relative:+.1%})"))
        names = [self.baseline, self.other]
        fig.add_trace(go.Bar(x=names, y=list(self.flip_rate), marker_color=["#4C78A8", "#F58518"],
                             showlegend=False), 1, 1)
        fig.add_trace(go.Bar(x=names, y=list(self.mean_margin_diff), marker_color=["#4C78A8", "#F58518"],
                             showlegend=False), 1, 2)
        fig.update_yaxes(tickformat=".0%", row=1, col=1)
        fig.update_layout(template="plotly_white", title=f"{self.baseline} vs {self.other} (n={self.n} pairs)")
        return fig


def _ztest(count_a: int, count_b: int, n_a: int, n_b: int) -> tuple[float, float]:
    """Two-proportion z-test (pooled variance), statsmodels; equal proportions at 0 or 1 give z=0, p=1."""
    from statsmodels.stats.proportion import proportions_ztest

    pooled = (count_a + count_b) / (n_a + n_b)
    if pooled in (0.0, 1.0):
        return 0.0, 1.0
    z, p = proportions_ztest(np.array([count_a, count_b]), np.array([n_a, n_b]))
    return float(z), float(p)


def evaluate(model: Model, pairs: Iterable[ParaphrasePair | ParaphraseGroup], *, batch_size: int | None = None,
             n_boot: int = 1000, seed: int = 0, progress: bool = True, fast: bool = True) -> ConsistencyReport:
    """Paraphrase consistency of ``model`` on ``pairs``: flip rate, mean |margin diff|, accuracy, CIs.

    ``fast=True`` scores each distinct phrasing once, encodes each image once, runs the shared prompt prefix
    (BOS, turn header, image, context) once through the KV cache and computes only the yes/no logits at the
    answer position; ``fast=False`` runs one plain forward per phrasing (the reference; same numbers).
    ``batch_size`` caps the sequences per forward (default: sized to the device).
    """
    pairs = _as_pairs(pairs)
    with_image = [p for p in pairs if p.image is not None]
    if with_image and not model.is_multimodal:
        raise InterpError(f"{len(with_image)} pair(s) have images (e.g. {with_image[0].id!r}), but '{model.name}' "
                          "is a text-only model; load a vision-language model or drop the images")
    check_image_files(pairs)  # before any model work
    prompts = [p.prompt_a() for p in pairs] + [p.prompt_b() for p in pairs]
    t0 = time.perf_counter()
    method = "naive: one forward per phrasing"
    if fast:
        try:
            scorer = _FastScorer(model, batch_size)
            logits = scorer.logits(prompts, list(model.answer_ids), progress=progress)
            method = scorer.method
        except _FastUnsupported as e:
            warnings.warn(f"fast evaluation is not available for '{model.name}' ({e}); using one forward per "
                          "phrasing", stacklevel=2)
            fast = False
    if not fast:
        logits = answer_logits(model, prompts, batch_size=batch_size, progress=progress)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - t0
    m = (logits[:, 0] - logits[:, 1]).double().numpy()
    n = len(pairs)
    if not np.all(np.isfinite(m)):
        bad = [pairs[i % n].id for i in np.flatnonzero(~np.isfinite(m))[:3]]
        raise InterpError(f"non-finite margins for pairs {bad}; the model produced NaN/inf logits (check its "
                          "dtype: float16 overflows in Gemma 3, use bfloat16 or float32)")
    return ConsistencyReport.from_margins(pairs, m[:n], m[n:], model=model.name, n_boot=n_boot, seed=seed,
                                          method=method, seconds=seconds)


__all__ = ["ConsistencyComparison", "ConsistencyReport", "answer_logits", "evaluate", "last_hidden", "margins",
           "project"]
