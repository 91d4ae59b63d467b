"""Image preprocessing in worker processes, off this process's GIL.

An image processor's call (decode, convert, resize, rescale, normalise: PIL and numpy) holds the GIL for much of
its time, so threads that preprocess images slow down the thread that launches the model's kernels: on an H200
the first forward of a capture with images took 115 ms for ~40 ms of work. Workers here are processes forked
from a forkserver that imported torch, PIL and transformers once; they run the same image processor call that
the threads would, so the pixel values are the same bits (`tests/test_image_workers.py`).

The pool is shared by the whole session and started in the background the first time it is asked for:
`pool()` returns None until it is ready, and callers use their threads meanwhile. A pool that fails to start,
or breaks (a worker killed), is given up with one warning and callers use threads from then on."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.context
import os
import sys
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import spawn
from typing import Any

WORKERS = 8  # at most this many processes, fewer on small hosts (`workers`)

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_state = "idle"  # idle -> starting -> ready | failed
_ready = threading.Event()


def workers() -> int:
    """How many worker processes the pool has: ``WORKERS``, at most the host's cores less two."""
    return max(1, min(WORKERS, (os.cpu_count() or 2) - 2))


def available() -> bool:
    """Whether worker processes can be used here at all (Linux and macOS' forkserver; not under a frozen
    interpreter, and not inside a worker itself)."""
    return (popen_forkserver is not None and "forkserver" in multiprocessing.get_all_start_methods()
            and not getattr(sys, "frozen", False) and multiprocessing.parent_process() is None)


def pool(*, wait: bool = False, timeout: float = 120.0) -> ProcessPoolExecutor | None:
    """The shared pool, or None while it starts (the first call starts it in the background) and where it
    cannot be used. ``wait``: block until it is ready (or has failed), at most ``timeout`` seconds."""
    global _state
    if _state == "ready":
        return _pool
    if _state == "failed" or not available():
        return None
    with _lock:
        if _state == "idle":
            _state = "starting"
            threading.Thread(target=_start, name="interp-image-workers", daemon=True).start()
    if wait:
        _ready.wait(timeout)
    return _pool if _state == "ready" else None


# A worker must not run the user's script again. multiprocessing prepares each child of a forkserver by
# importing the parent's __main__ from its path (so that pickled functions defined there resolve), which runs an
# unguarded script's top level a second time in every worker. The jobs here are functions of this module, so the
# workers are launched without that: `get_preparation_data` drops the main module for launches made on a thread
# that set ``_launching.mainless`` (this module's, inside `_Popen._launch`); every other launch is unchanged.
_launching = threading.local()
_real_preparation_data = None


def _preparation_data(name: str) -> dict:
    data = _real_preparation_data(name)
    if getattr(_launching, "mainless", False):
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
    return data


try:
    from multiprocessing import popen_forkserver
except ImportError:  # no forkserver on this platform: `available` says no
    popen_forkserver = None

if popen_forkserver is not None:  # module level: the process object is pickled to the child by reference
    class _Popen(popen_forkserver.Popen):
        def _launch(self, process_obj: Any) -> None:
            _launching.mainless = True
            try:
                super()._launch(process_obj)
            finally:
                _launching.mainless = False

    class _Process(multiprocessing.context.ForkServerProcess):
        @staticmethod
        def _Popen(process_obj: Any) -> _Popen:
            return _Popen(process_obj)

    class _Context(multiprocessing.context.ForkServerContext):
        """The forkserver context whose processes are launched without the parent's main module."""

        Process = _Process


def _start() -> None:
    global _pool, _state, _real_preparation_data
    try:
        with _lock:
            if _real_preparation_data is None:
                _real_preparation_data = spawn.get_preparation_data
                spawn.get_preparation_data = _preparation_data
        ctx = _Context()
        # what the server imports once, for every worker forked from it (not the user's __main__, which
        # the default preload would run again)
        ctx.set_forkserver_preload(["interp._imageworkers", "PIL.Image", "transformers.image_processing_utils"])
        p = ProcessPoolExecutor(workers(), mp_context=ctx, initializer=_init_worker)
        # start every worker now, not at the first images: each answers once it has imported what it needs
        for f in [p.submit(_warm) for _ in range(workers())]:
            f.result(timeout=120)
    except Exception as e:  # noqa: BLE001 - any failure means threads, never a failed capture
        _give_up(f"could not start image worker processes ({type(e).__name__}: {e})")
        return
    with _lock:
        _pool, _state = p, "ready"
    _ready.set()


def _give_up(why: str) -> None:
    """Stop using worker processes for this session (one warning), and shut the pool down."""
    global _pool, _state
    with _lock:
        if _state == "failed":
            return
        old, _pool, _state = _pool, None, "failed"
    _ready.set()
    warnings.warn(f"interp: {why}; images are preprocessed on threads from now on (same values, slower on a "
                  "GPU: the threads compete with the one that launches kernels)", RuntimeWarning, stacklevel=3)
    if old is not None:
        old.shutdown(wait=False, cancel_futures=True)


def broken(e: BaseException) -> bool:
    """Whether ``e`` (raised by a job's result) means the pool is broken; if so it is given up."""
    if isinstance(e, BrokenProcessPool):
        _give_up(f"an image worker process died ({e})")
        return True
    return False


def shutdown() -> None:
    """Stop the workers (at exit, and for tests); a later `pool()` starts new ones. A pool still starting is let
    finish first (at most 30 s): shut down halfway, the forkserver would go on forking workers for semaphores
    the parent has already removed, each printing a traceback at exit."""
    global _pool, _state
    if _state == "starting":
        _ready.wait(30)
    with _lock:
        old, _pool, _state = _pool, None, "idle"
        _ready.clear()
    if old is not None:
        old.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown)


# ---- in the worker ------------------------------------------------------------------------------------------
def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core each: the pool is the parallelism


def _warm() -> int:
    return os.getpid()


def process(image_processor: Any, image: Any, kwargs: dict, dtype: str | None) -> tuple[dict, dict]:
    """In a worker: ``image_processor([[image]], **kwargs)`` (the call `interp.hf.ProcessorSplit` makes), its
    tensors sent back as numpy arrays: ``({name: array}, {name: other value})``. Pixel values are cast to
    ``dtype`` here (as `interp.models.ImageCache` casts them), bfloat16 sent as its int16 bits."""
    import torch

    from interp.models import _open_image

    out = image_processor([[_open_image(image)]], **kwargs)
    arrays, other = {}, {}
    for name, value in out.items():
        if isinstance(value, torch.Tensor):
            if name == "pixel_values" and dtype is not None and value.is_floating_point():
                value = value.to(getattr(torch, dtype))
            arrays[name] = (value.view(torch.int16) if value.dtype == torch.bfloat16 else value).numpy()
            if value.dtype == torch.bfloat16:
                other[f"{name}.bfloat16"] = True
        else:
            other[name] = value
    return arrays, other


def tensors(result: tuple[dict, dict]) -> dict:
    """In the parent: a worker's `process` result as the image processor's output (tensors again)."""
    import torch

    arrays, other = result
    out = {}
    for name, a in arrays.items():
        t = torch.from_numpy(a)
        out[name] = t.view(torch.bfloat16) if other.get(f"{name}.bfloat16") else t
    out.update({k: v for k, v in other.items() if not k.endswith(".bfloat16")})
    return out
