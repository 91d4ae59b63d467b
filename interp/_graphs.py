"""The vision tower and projector of one image as a CUDA graph: one launch in place of ~600.

A vision pass of MedGemma's SigLIP tower (27 layers, one 896 px image) is ~13 ms of kernels and ~600 launches,
issued from the thread that also launches the decoder's forwards. In a capture with images that thread is the
bottleneck (the device idles inside the decoder's forwards), so every launch it saves is time. A graph
replays the same kernels on the same memory: its output is checked bit for bit against the eager pass on the
first image it is built for, and it is used only where that holds.

A graph bakes in the addresses of the weights and buffers it read. It is kept per vision body and input shape,
with a fingerprint of those addresses, and built again when they change (a model moved, or weights replaced);
a body with hooks on its vision modules (the user's, or another library's) is never graphed, since a graph
would skip them. `GRAPHS = False` turns it off."""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from interp import hf

GRAPHS = True  # build CUDA graphs of the vision pass where they reproduce the eager pass (`vision_pass`)
MAX_SHAPES = 4  # graphs per vision body (one per input shape: pan-and-scan crops vary); other shapes run eagerly

_lock = threading.Lock()
_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # body -> {(shape, dtype): _Graph | None}


def _modules(body: nn.Module) -> list[nn.Module]:
    return [m for name in ("vision_tower", "multi_modal_projector") if (top := getattr(body, name, None)) is not None
            for m in top.modules()]


def _fingerprint(body: nn.Module) -> tuple:
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for m in _modules(body)
                 for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])


def prepare(body: nn.Module, device: torch.device) -> tuple | None:
    """Once per call: None where ``body``'s vision pass may not be graphed (off a GPU, in training mode, or a
    hook on its vision modules, or a global module hook, that a graph would skip), else the fingerprint of its
    weights' addresses that `vision_pass` checks a graph against."""
    from torch.nn.modules import module as _m

    mods = _modules(body)
    if not GRAPHS or device.type != "cuda" or not mods or any(m.training for m in mods):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in mods):
        return None
    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return None
    return _fingerprint(body)


class _Graph:
    def __init__(self, body: nn.Module, pixels: Tensor, fingerprint: tuple):
        self.fingerprint = fingerprint
        with torch.inference_mode():
            self.input = pixels.clone()
            side = torch.cuda.Stream(pixels.device)
            side.wait_stream(torch.cuda.current_stream(pixels.device))
            with torch.cuda.stream(side):  # warm up (cuBLAS handles, cuDNN plans) off the capture
                for _ in range(2):
                    hf.image_features(body, self.input)
            torch.cuda.current_stream(pixels.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread-local: capture's preprocessing threads pin pixels (cudaHostAlloc) meanwhile, which the
            # default (global) mode forbids process-wide: it invalidated the capture on an H200
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output = hf.image_features(body, self.input)
        self.done: torch.cuda.Event | None = None
        self.lock = threading.Lock()

    def __call__(self, pixels: Tensor) -> Any:
        with self.lock, torch.inference_mode():
            stream = torch.cuda.current_stream(self.input.device)
            if self.done is not None:  # the last caller's clone, on whichever stream, has read the output
                stream.wait_event(self.done)
            self.input.copy_(pixels, non_blocking=True)
            self.graph.replay()
            out = _clone(self.output)
            self.done = torch.cuda.Event()
            self.done.record(stream)
        return out


def _clone(out: Any) -> Any:
    return out.clone() if isinstance(out, Tensor) else type(out)(t.clone() for t in out)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    a, b = list(a), list(b)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))


def _difference(a: Any, b: Any) -> float:
    a = a if isinstance(a, Tensor) else torch.cat([t.flatten() for t in a])
    b = b if isinstance(b, Tensor) else torch.cat([t.flatten() for t in b])
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def vision_pass(body: nn.Module, pixels: Tensor, fingerprint: tuple | None) -> Any:
    """``hf.image_features(body, pixels)`` for one image's pixels on the device: by a CUDA graph where one was
    built for this body, shape and ``fingerprint`` (`prepare`'s, taken once per call; None: eagerly) and
    reproduced the eager pass, else eagerly. The first pass of a shape builds the graph, checks it against its
    own eager result, and returns that."""
    if fingerprint is None:
        return hf.image_features(body, pixels)
    key = (tuple(pixels.shape), pixels.dtype)
    with _lock:
        per = _graphs.setdefault(body, {})
        g = per.get(key, False if len(per) < MAX_SHAPES else None)
    if g is None:  # tried: it did not reproduce the eager pass, or could not be captured
        return hf.image_features(body, pixels)
    if g is not False and g.fingerprint == fingerprint:
        return g(pixels)
    eager = hf.image_features(body, pixels)
    try:
        g = _Graph(body, pixels, fingerprint)
        replayed = g(pixels)
        if not _equal(replayed, eager):
            warnings.warn(f"interp: a CUDA graph of the vision pass differs from the eager pass (max relative "
                          f"{_difference(replayed, eager):.2e}); vision passes run eagerly", RuntimeWarning,
                          stacklevel=2)
            g = None
    except Exception as e:  # noqa: BLE001 - no graph means the eager pass, never a failed call
        warnings.warn(f"interp: could not capture the vision pass as a CUDA graph ({type(e).__name__}: {e}); "
                      "vision passes run eagerly", RuntimeWarning, stacklevel=2)
        g = None
    with _lock:
        _graphs.setdefault(body, {})[key] = g
    return eager


def built(body: nn.Module, pixels: Tensor, fingerprint: tuple | None) -> bool:
    """Whether `vision_pass` would replay a graph for these pixels now (one is built and checked for their shape
    and ``fingerprint``): a replay is one launch, so it can be queued ahead on a side stream."""
    if fingerprint is None:
        return False
    with _lock:
        g = _graphs.get(body, {}).get((tuple(pixels.shape), pixels.dtype))
    return g is not None and g is not False and g.fingerprint == fingerprint


def clear() -> None:
    """Drop every graph (their memory goes with them)."""
    with _lock:
        _graphs.clear()
