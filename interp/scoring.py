"""The scoring engine: first-answer-token logits of prompts, plain or fast.

`answer_logits` runs one plain forward per prompt (the reference) or, with ``fast=True``, the
`_FastScorer`: each distinct phrasing and image once, shared prompt prefixes through the KV cache, and
only the yes/no logits at the answer position. Everything it needs from transformers beyond public
forwards goes through `interp.hf`.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp import dist, hf
from interp._errors import InterpError
from interp.models import (
    Batch,
    CheckedSplit,
    Model,
    Prompt,
    _as_prompt,
    _open_image,
    exclusive,
    image_key,
    split_processor,
)


def body_and_head(model: Model):
    base = hf.base_model(model.hf)
    head = base.get_output_embeddings()
    body = getattr(base, "model", None)
    if body is None or head is None:
        raise InterpError(f"{type(base).__name__} has no '.model' body and output embeddings; wrap a standard "
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


@exclusive
def answer_logits(model: Model, prompts: Sequence[Prompt | str], *, batch_size: int | None = None,
                  full_vocab: bool = False, progress: bool = False, fast: bool = False) -> Tensor:
    """First-answer-token logits: ``[n, 2]`` (yes, no), or ``[n, vocab]`` with ``full_vocab=True``.

    ``fast=True`` scores each distinct prompt once, encodes each image once and shares prompt prefixes
    through the KV cache (same numbers to float tolerance); ``fast=False`` is one plain forward per prompt.
    """
    return score(model, prompts, batch_size=batch_size, full_vocab=full_vocab, progress=progress, fast=fast)[0]


NAIVE = "naive: one forward per phrasing"


@exclusive
def score(model: Model, prompts: Sequence[Prompt | str], *, batch_size: int | None = None,
          full_vocab: bool = False, progress: bool = False, fast: bool = True) -> tuple[Tensor, str]:
    """`answer_logits` and the name of the path that computed them (reports say which path ran).

    For the architectures in `interp.hf.VERIFIED` a fast path that cannot run is an error; for others it
    warns and falls back to the plain forward."""
    items = [_as_prompt(p) for p in prompts]
    if not items:
        raise InterpError("prompts is empty: pass at least one prompt")
    ids = None if full_vocab else list(model.answer_ids)
    if fast:
        try:
            scorer = _FastScorer(model, batch_size)
            return scorer.logits(items, ids, progress=progress), scorer.method
        except _FastUnsupported as e:
            if hf.is_verified(model.hf):
                raise InterpError(
                    f"the fast scoring path cannot run on '{model.name}' ({hf.architecture(model.hf)}, an "
                    f"architecture it is verified for): {e}. This is a bug in interp or an untested transformers "
                    "release; pass fast=False to score with one plain forward per prompt") from e
            warnings.warn(f"fast scoring is not verified for {hf.architecture(model.hf)} and cannot run on "
                          f"'{model.name}' ({e}); using one plain forward per prompt", stacklevel=3)
    if batch_size is None:
        batch_size = 16 if model.device.type == "cuda" else 8
    if batch_size < 1:
        raise InterpError(f"batch_size={batch_size}; use a positive number of sequences per forward")
    order = sorted(range(len(items)), key=lambda i: len(items[i].question) + len(items[i].context or ""))
    starts = list(range(0, len(order), batch_size))
    rank, world = dist.rank_and_world()
    out = torch.zeros(len(items), _n_logits(model, ids))
    with torch.inference_mode():
        # under several processes each takes every world-th batch; the sum below puts the rows together
        for b in tqdm(starts[rank::world], desc="score", disable=not progress or rank > 0, leave=False):
            idx = order[b:b + batch_size]
            batch = model.encode([items[i] for i in idx])
            out[torch.tensor(idx)] = project(model, last_hidden(model, batch), ids).float().cpu()
        if world > 1:
            dist.all_reduce_sum([out])  # each row is non-zero in one process only: the sum is exact
    return out, NAIVE


def _n_logits(model: Model, ids: Sequence[int] | None) -> int:
    """Columns of `project`'s output: the answer ids given, or the whole vocabulary."""
    return model.hf.get_output_embeddings().weight.shape[0] if ids is None else len(ids)


@exclusive
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

_FastUnsupported = hf.Unsupported  # this model or processor cannot take the fast path
BLOCK_IMAGES = 64  # distinct images per block of the fast scorer (see `_FastScorer.logits`)
VISION_RUN = 8  # images per vision-tower pass of the fast scorer, at most (see `_FastScorer._image_features`)


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
    pixels: dict[Hashable, Tensor]  # image key -> pixel_values (one or more crops), when the processor is not split
    groups: list[list[int]]  # prompt indices that share image and context (candidates for a shared prefix)


def _image_keys(items: Sequence[Prompt]) -> list[Hashable | None]:
    """Each prompt's `image_key`, taken once per call: every later step looks its image up under this key, so
    a file rewritten during the call (a new modification time) cannot name two different images. The same
    path, or the same object, is looked up once (``os.stat`` once per file, not once per phrasing)."""
    seen: dict[tuple, Hashable | None] = {}
    keys = []
    for p in items:
        image = p.image
        if image is None:
            keys.append(None)
            continue
        ref = ("path", os.fspath(image)) if isinstance(image, (str, os.PathLike)) else ("object", id(image))
        if ref not in seen:
            seen[ref] = image_key(image)
        keys.append(seen[ref])
    return keys


def _name(key: Hashable) -> str:
    return f"'{key[1]}'" if key[0] == "path" else "<in-memory image>"


def _changed(key: Hashable, why: Any) -> InterpError:
    """The error for an image that cannot be read (or found under its key) any more during the call."""
    return InterpError(f"image {_name(key)} could not be read ({why}): the file changed or vanished during this "
                       "call; rerun once it is stable")


def _unchanged(key: Hashable) -> bool:
    """Is the image named by ``key`` still the version the call started with (a file: same mtime and size)?"""
    return key[0] != "path" or image_key(key[1]) == key


def _found(table: dict, key: Hashable) -> Any:
    """``table[key]``, or `_changed`'s error naming the image rather than a bare KeyError."""
    try:
        return table[key]
    except KeyError:
        raise _changed(key, "it is no longer under the name it had when the call started") from None


def _read(key: Hashable, fn, *args) -> Any:
    """``fn(*args)``, a step that opens the image named by ``key``. A file that changed or vanished since the
    call started gets `_changed`'s error; one that is as it was but cannot be decoded, an error saying so."""
    try:
        return fn(*args)
    except InterpError as e:  # `_open_image`: "image file not found", for a file that was there at the start
        if key[0] == "path" and key[2] is not None and not os.path.isfile(key[1]):
            raise _changed(key, "it is gone") from e
        raise
    except (OSError, SyntaxError) as e:  # PIL: unreadable, truncated or not an image
        if not _unchanged(key):
            raise _changed(key, f"{type(e).__name__}: {e}") from e
        raise InterpError(f"image {_name(key)} cannot be read as an image ({type(e).__name__}: {e}); pass a "
                          "PNG, JPEG or other file PIL opens, or a PIL image") from e


class _FastScorer:
    """Scores prompts with image reuse, shared-prefix KV caching and yes/no-only logits."""

    def __init__(self, model: Model, batch_size: int | None):
        self.model = model
        self.body, _ = body_and_head(model)
        if not hasattr(self.body, "get_input_embeddings"):
            raise _FastUnsupported("the decoder body has no get_input_embeddings()")
        hf.check_forward(self.body, "inputs_embeds", "position_ids", "cache")
        cfg = model.hf.config
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(cfg, "image_token_index", None)
        self.share_prefix, self.why_not = self._can_share_prefix()
        self.device = model.device
        self.max_rows, self.max_tokens, self.max_images = self._limits(batch_size)
        self._split: CheckedSplit | None = None  # processor call split in two (`split_processor`, on first use)
        self._split_ok: bool | None = None

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
    # The split is checked once per processor against its full call (`models.split_processor`); if it differs,
    # every prompt goes through the full call instead (slower on the CPU, same numbers).
    def _process_image(self, image: Any) -> tuple[Tensor, str]:
        """pixel_values and the placeholder expansion of one image (thread-safe: no tokenizer)."""
        return self._split.process_image(image)

    def _on_device(self, pixels: Tensor) -> Tensor:
        """Pixel values on the device in the model's dtype. Done on the preprocessing threads: gathering a
        block's float32 pixels on the host and copying them in one piece held up the vision pass."""
        return pixels.to(self.device, self.model.dtype if self.model.dtype.is_floating_point else pixels.dtype)

    def _image_to_device(self, key: Hashable, image: Any) -> tuple[Tensor, str]:
        pixels, replacement = _read(key, self._process_image, image)
        return self._on_device(pixels), replacement

    def _expand(self, text: str, replacement: str) -> tuple[list[int], list[int] | None]:
        """Token ids (and token types) of a prompt whose image placeholder expands to ``replacement``."""
        return self._split.expand(text, replacement)

    def _full_encode(self, text: str, image: Any) -> dict[str, Any]:
        """The processor's own call, as ``Model.encode`` makes it."""
        enc = dict(self.model.processor(text=[text], images=[[_open_image(image)]], return_tensors="pt",
                                        add_special_tokens=False))
        extra = set(enc) - {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
        if extra:
            raise _FastUnsupported(f"the processor returns {sorted(extra)}, which the fast path does not pass on")
        return enc

    def _start(self, items: Sequence[Prompt], keys: Sequence[Hashable | None],
               groups: list[list[int]]) -> tuple[dict[Hashable, Future], Future]:
        """Queue a block's work on the host: each distinct image on the preprocessing pool (in order, so the
        vision tower can start on the first ones while later ones are still being resized), then its
        phrasings on the tokeniser thread. ``keys``: each prompt's image key (`_image_keys`). Returns (image
        key -> Future of (pixels on the device, placeholder expansion), Future of the `_Block`)."""
        model = self.model
        first: dict[Hashable, int] = {}  # image key -> its first prompt
        for g in groups:
            for i in g:
                if keys[i] is not None:
                    first.setdefault(keys[i], i)
        images: dict[Hashable, Future] = {}
        if first and self._split_ok is None:
            self._split = split_processor(model)
            self._split_ok = self._split is not None
        if first and self._split_ok:
            for key, i in first.items():
                images[key] = self._pool.submit(self._image_to_device, key, items[i].image)
        return images, self._tok.submit(self._tokenise, items, keys, groups, images)

    def _tokenise(self, items: Sequence[Prompt], keys: Sequence[Hashable | None], groups: list[list[int]],
                  images: dict[Hashable, Future]) -> _Block:
        model, tok = self.model, self.model.tokenizer
        block = _Block(seqs={}, pixels={}, groups=groups)
        opened: dict[Hashable, Any] = {}  # image key -> the image read once, for the processor's own call
        uses = Counter(keys[i] for g in groups for i in g if keys[i] is not None)  # to free each after its last
        texts = {i: model.format(items[i].question, context=items[i].context, image=items[i].image is not None)
                 for g in groups for i in g}
        for g in groups:
            for i in g:
                p = items[i]
                if p.image is None:
                    block.seqs[i] = _Seq(tok(texts[i], add_special_tokens=False)["input_ids"], None, None)
                    continue
                key = keys[i]
                if self._split_ok:
                    ids, types = self._expand(texts[i], _found(images, key).result()[1])
                else:
                    if key not in opened:  # one read per image: each phrasing sees the same version of the file
                        opened[key] = _read(key, _open_image, p.image)
                    enc = self._full_encode(texts[i], opened[key])
                    uses[key] -= 1
                    if not uses[key]:  # decoded full-size images (~23 MB a CXR JPEG): not kept for the block
                        del opened[key]
                    block.pixels.setdefault(key, enc["pixel_values"])
                    ids = enc["input_ids"][0].tolist()
                    types = enc["token_type_ids"][0].tolist() if "token_type_ids" in enc else None
                block.seqs[i] = _Seq(ids, types, key)
        for i, seq in block.seqs.items():  # the plain path checks this in Model.encode
            model.check_length([len(seq.ids)], first_index=i)
        return block

    # ---- device passes -----------------------------------------------------------------------------
    def _image_features(self, pixels: dict[Hashable, Tensor | Future]) -> dict[Hashable, Tensor]:
        """Run the vision tower + projector once per image: key -> ``[n_image_tokens, d_model]``.

        ``pixels`` may hold Futures of `_image_to_device` (in the order they were queued): the tower runs on
        fixed runs of ``VISION_RUN`` images, each as soon as its images are ready, so the device works while
        the host is still preprocessing the rest. The runs do not depend on timing: the same images share a
        pass, and so get the same bits, in every run."""
        if not pixels:
            return {}
        keys = list(pixels)

        def tensor(k: Hashable) -> Tensor:
            v = pixels[k]
            return v.result()[0] if isinstance(v, Future) else v

        feats: dict[Hashable, Tensor] = {}
        step = min(self.max_images, VISION_RUN)
        for b in range(0, len(keys), step):
            chunk = keys[b:b + step]
            pv = torch.cat([tensor(k) for k in chunk]).to(self.device, self.model.dtype)
            per_row = hf.image_features(self.body, pv)
            if isinstance(per_row, Tensor):
                per_row = list(per_row)
            r = 0
            for k in chunk:
                n = tensor(k).shape[0]
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
                f = _found(feats, key)
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
            kw |= hf.cache_kwargs(self.body, cache)
        if token_types is not None:
            kw["token_type_ids"] = token_types.to(self.device)
        padded = bool((attn == 0).any()) if attn.device.type == "cpu" else None  # known on the host: no read-back
        with hf.prepared_masks(self.body, kw, padded=padded) as run:
            out = self.body(**run)
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
        cache = hf.new_cache()
        self._run(self._embed(ids, slots, feats), attn, position_ids=pos, cache=cache, token_types=types)
        return hf.cache_kv(cache), attn, width

    def _suffix_pass(self, rows: list[tuple[int, int, int]], block: _Block, kv, prefix_attn: Tensor) -> Tensor:
        """Suffixes (right-padded) against copies of their group's prefix K/V; rows: (prompt, group row, P)."""
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
        cache = hf.cache_from_kv(kv, g)
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

    def _score_block(self, images: dict[Hashable, Future], block: Future, ids: list[int] | None, out: Tensor,
                     bar) -> None:
        feats = self._image_features(images)  # while the phrasings are tokenised
        block = block.result()
        if block.pixels:  # the processor's own call made them (its split did not reproduce it)
            feats |= self._image_features(block.pixels)
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
        # Each image's key is taken once, here; every later step looks the image up under it.
        item_keys = _image_keys(items)
        distinct: dict[tuple, int] = {}
        index = []
        for p, image in zip(items, item_keys, strict=True):
            index.append(distinct.setdefault((p.question.strip(), image, p.context or ""), len(distinct)))
        firsts: dict[int, int] = {}  # distinct prompt -> its first position in items
        for i, j in enumerate(index):
            firsts.setdefault(j, i)
        uniq = [items[firsts[j]] for j in range(len(distinct))]
        keys = [item_keys[firsts[j]] for j in range(len(distinct))]  # image key of each distinct prompt
        by_prefix: dict[tuple, list[int]] = {}
        for j, p in enumerate(uniq):
            by_prefix.setdefault((keys[j], p.context or ""), []).append(j)
        # In order of first appearance, not sorted by key: an in-memory image's key is its id(), which differs
        # between processes, and every process must plan the same blocks to take its share of them.
        groups = list(by_prefix.values())
        # Blocks bound the memory of pixel values (they wait on the device in the model's dtype, ~5 MB an
        # image at 896 px in bf16); the next block is queued on the host as soon as one starts. A boundary
        # never splits the groups of one image (each image is encoded once). Blocks are large: each is a
        # vision, a prefix and a suffix pass whose kernel launches cost the same however few rows they carry
        # (on an H200 a suffix pass of short phrasings is ~0.1 s of launches), and the device need not wait
        # for a whole block: the vision tower starts on its first images (`_image_features`).
        blocks, cur, images, n_prompts = [], [], set(), 0
        for g in groups:
            key = keys[g[0]]
            cap = BLOCK_IMAGES
            if cur and key not in images and (n_prompts + len(g) > 512 or len(images) + (key is not None) > cap):
                blocks.append(cur)
                cur, images, n_prompts = [], set(), 0
            cur.append(g)
            if key is not None:
                images.add(key)
            n_prompts += len(g)
        blocks.append(cur)

        out = torch.zeros((len(uniq), _n_logits(model, ids)), device=self.device, dtype=torch.float32)
        workers = max(1, min(8, os.cpu_count() or 1))
        # Under several processes (accelerate launch / torchrun) every process plans the same blocks and
        # scores every world-th one, so each forward is the one a single process runs; rows are summed after.
        rank, world = dist.rank_and_world()
        mine = blocks[rank::world]
        with torch.inference_mode(), ThreadPoolExecutor(max_workers=1) as self._tok, \
                ThreadPoolExecutor(max_workers=workers) as self._pool, \
                tqdm(total=sum(len(i) for b in mine for i in b), desc="evaluate", disable=not progress or rank > 0,
                     leave=False) as bar:
            queued = [self._start(uniq, keys, mine[0])] if mine else []
            for b in range(len(mine)):
                images, block = queued.pop()
                if b + 1 < len(mine):
                    queued.append(self._start(uniq, keys, mine[b + 1]))  # behind this block's images on the pool
                self._score_block(images, block, ids, out, bar)
            if world > 1:
                dist.all_reduce_sum([out])  # each row is non-zero in one process only: the sum is exact
        return out.cpu()[torch.tensor(index)]
