"""Where the time goes: torch.profiler over interp's fast paths at MedGemma-4B shape (diagnosis, not a benchmark).

    python bench/hotspots.py evaluate          # evaluate(fast=True) on 48 image pairs (bench/consistency.py's)
    python bench/hotspots.py lora --mode text  # one steady accumulation group of the LoRA fast path
    python bench/hotspots.py capture           # capture on bench/ragged.py's image corpus: host vs device time
    python bench/hotspots.py vision            # vision tower and an image-prefix pass under each SDPA backend
    python bench/hotspots.py ragged            # bench/ragged.py's image corpus: device timeline, batching sweep

Prints GPU-busy time against wall time (the share of the run the device is idle) and the top operators by
self device time and by self CPU time. ``--smoke`` runs on the CPU with toy shapes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _profile(fn, label: str, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    busy = sum(getattr(e, dev_attr, 0) for e in events) / 1e6
    print(f"\n=== {label}: wall {wall * 1000:.1f} ms, device busy {busy * 1000:.1f} ms "
          f"({100 * busy / wall:.0f}% of wall)")
    if cuda:
        print(events.table(sort_by=dev_attr.replace("_total", "_total"), row_limit=rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def evaluate_target(smoke: bool, n: int) -> None:
    import medgemma_shape
    from consistency import make_images, workloads

    from interp.consistency import evaluate

    model = medgemma_shape.build(smoke=smoke)
    vt = getattr(model.hf.model, "vision_tower", None)
    print("attention:", model.hf.config._attn_implementation,
          "vision:", getattr(getattr(vt, "config", None), "_attn_implementation", None))
    with tempfile.TemporaryDirectory() as tmp:
        pairs = workloads(make_images(Path(tmp), n, 768))["pairs"]
        _profile(lambda: evaluate(model, pairs, progress=False), f"evaluate fast, {n} image pairs")
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            evaluate(model, pairs, progress=False)
            t.append(time.perf_counter() - t0)
        print("evaluate fast seconds:", [round(x, 3) for x in t])
        phases(model, lambda: evaluate(model, pairs, progress=False))
        prefix_profile(model, lambda: evaluate(model, pairs, progress=False))


def prefix_profile(model, fn) -> None:
    """torch.profiler over the first shared-prefix pass of ``fn`` alone (its kernels, by device time)."""
    from interp import scoring

    orig = scoring._FastScorer._prefix_pass
    done = []

    def once(self, *a, **k):
        if done:
            return orig(self, *a, **k)
        done.append(1)
        holder = {}

        def call():
            holder["out"] = orig(self, *a, **k)
        call()  # warm
        _profile(call, f"one prefix pass ({len(a[0])} prefixes, width {max(p for _, p in a[0])})", rows=30)
        return holder["out"]

    scoring._FastScorer._prefix_pass = once
    try:
        fn()
    finally:
        scoring._FastScorer._prefix_pass = orig


def capture_target(smoke: bool) -> None:
    """Capture of bench/ragged.py's image corpus: host encoding, vision tower and forward time, and the gaps."""
    import threading
    from collections import defaultdict

    import medgemma_shape
    from ragged import images

    import interp
    from interp.models import Prompt

    cap = importlib.import_module("interp.capture")
    model = medgemma_shape.build(smoke=smoke)
    cuda = model.device.type == "cuda"
    short = medgemma_shape.prompts_of_lengths(model, medgemma_shape.ragged_lengths(24 if smoke else 128, 20 if smoke
                                                                                   else 40, 600, seed=1), seed=1)
    pictures = images(8, 56 if smoke else 768)
    prompts = [Prompt(q, pictures[k % len(pictures)] if k % 2 else None) for k, q in enumerate(short)]
    with_img = [p for p in prompts if p.image is not None]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for p in with_img:
        model.encode([p], device="cpu")
    print(f"host encode, {len(with_img)} image prompts one by one on one thread: {time.perf_counter() - t0:.3f} s")
    t0 = time.perf_counter()
    for p in prompts[::2]:
        model.encode([p], device="cpu")
    print(f"host encode, {len(prompts[::2])} text prompts one by one: {time.perf_counter() - t0:.3f} s")
    t0 = time.perf_counter()
    model.processor.image_processor(images=[pictures[0]] * 8, return_tensors="pt")
    print(f"image processor alone, 8 images: {time.perf_counter() - t0:.3f} s")
    enc = model.encode(with_img[:8])
    px = enc.inputs["pixel_values"].to(model.device, model.dtype)
    body = model.hf.model
    with torch.inference_mode():
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            body.get_image_features(pixel_values=px)
            sync()
        print(f"vision tower + projector, 8 images: {time.perf_counter() - t0:.3f} s; "
              f"attention {getattr(body.vision_tower.config, '_attn_implementation', None)}")

    spans: dict[str, list] = defaultdict(list)
    real_prep, real_run = cap._prepare_batch, cap._run_hooked

    def prep(*a, **k):
        t = time.perf_counter()
        out = real_prep(*a, **k)
        spans["encode (" + threading.current_thread().name.split("_")[0] + ")"].append((t, time.perf_counter()))
        return out

    def run(*a, **k):
        sync()
        t = time.perf_counter()
        out = real_run(*a, **k)
        sync()
        spans["forward (synchronised)"].append((t, time.perf_counter()))
        return out

    for kw in (dict(sort=False, batch_size=16, batch_tokens=10**9), {}):
        interp.capture(model, prompts, layers=[17 if not smoke else 3], positions="all", progress=False, **kw)
        cap._prepare_batch, cap._run_hooked = prep, run
        spans.clear()
        try:
            t0 = time.perf_counter()
            interp.capture(model, prompts, layers=[17 if not smoke else 3], positions="all", progress=False, **kw)
            wall = time.perf_counter() - t0
        finally:
            cap._prepare_batch, cap._run_hooked = real_prep, real_run
        print(f"\ncapture {kw or 'defaults'}: wall {wall:.3f} s")
        for name, s in spans.items():
            print(f"  {name}: {len(s)} calls, {sum(b - a for a, b in s):.3f} s summed, "
                  f"first starts {s[0][0] - t0:.3f} s, last ends {s[-1][1] - t0:.3f} s")
        fw = spans["forward (synchronised)"]
        gaps = [fw[0][0] - t0] + [b[0] - a[1] for a, b in zip(fw[:-1], fw[1:], strict=True)] + [t0 + wall - fw[-1][1]]
        print(f"  device idle between forwards: {sum(gaps):.3f} s (first {gaps[0]:.3f}, last {gaps[-1]:.3f}, "
              f"largest between {max(gaps[1:-1], default=0):.3f})")
        _profile(lambda kw=kw: interp.capture(model, prompts, layers=[17 if not smoke else 3], positions="all",
                                              progress=False, **kw), f"capture {kw or 'defaults'}", rows=20)


def _timeline(fn, label: str) -> None:
    """One run of ``fn`` under torch.profiler, read back from its trace: wall time, device-busy time (union of
    kernels and copies), device time inside the "vision" and "forward" ranges, the idle time before the first
    kernel and after the last, and the largest gaps with what the main thread was doing meanwhile."""
    import json
    import os

    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("call"):
            fn()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    events = json.load(open(path))["traceEvents"]
    call = next(e for e in events if e.get("name") == "call" and e.get("cat") == "user_annotation")
    t0, t1 = call["ts"], call["ts"] + call["dur"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("dur") is not None)
    busy, gaps, end = 0.0, [], None
    for a, b in kernels:
        if end is not None and a > end:
            gaps.append((a - end, end, a))
        busy += max(0.0, b - max(a, end if end is not None else a))
        end = b if end is None else max(end, b)
    main_tid = call["tid"]
    host = [e for e in events if e.get("cat") == "user_annotation" and e.get("tid") == main_tid and e is not call]

    ops = [e for e in events if e.get("tid") == main_tid and e.get("cat") in ("cpu_op", "cuda_runtime")
           and e.get("dur") is not None]

    def doing(a: float, b: float) -> str:
        names = sorted({e["name"] for e in host if e["ts"] < b and e["ts"] + e["dur"] > a})
        busy = sorted(((min(b, e["ts"] + e["dur"]) - max(a, e["ts"]), e["name"]) for e in ops
                       if e["ts"] < b and e["ts"] + e["dur"] > a), reverse=True)[:3]
        return (",".join(names) or "-") + "; longest host ops there: " + ", ".join(
            f"{n} {d / 1e3:.1f} ms" for d, n in busy)

    def inside(name: str) -> tuple[int, float]:
        ranges = [(e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "gpu_user_annotation" and e.get("name") == name]
        total = sum(min(b, y) - max(a, x) for x, y in ranges for a, b in kernels if a < y and b > x)
        return len(ranges), total

    print(f"\n=== timeline {label}: wall {(t1 - t0) / 1e3:.1f} ms, device busy {busy / 1e3:.1f} ms, "
          f"idle before the first kernel {(kernels[0][0] - t0) / 1e3:.1f} ms, after the last "
          f"{(t1 - kernels[-1][1]) / 1e3:.1f} ms, gaps > 0.2 ms: {sum(g for g, _, _ in gaps if g > 200) / 1e3:.1f} ms "
          f"in {sum(g > 200 for g, _, _ in gaps)}")
    for name in ("vision", "forward", "mask"):
        n, total = inside(name)
        print(f"  device time inside '{name}': {total / 1e3:.1f} ms over {n} ranges")
    for g, a, b in sorted(gaps, reverse=True)[:8]:
        print(f"  gap {g / 1e3:6.1f} ms at {(a - t0) / 1e3:7.1f} ms: main thread in {doing(a, b)}")
    names = {}
    for e in host:
        names.setdefault(e["name"], [0, 0.0])
        names[e["name"]][0] += 1
        names[e["name"]][1] += e["dur"]
    syncs = {}
    for e in ops:
        if e["name"] in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
                         "aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::pin_memory"):
            syncs.setdefault(e["name"], [0, 0.0])
            syncs[e["name"]][0] += 1
            syncs[e["name"]][1] += e["dur"]
    print("  main thread, blocking kinds: " + ", ".join(f"{k} {v[0]}x {v[1] / 1e3:.1f} ms"
                                                         for k, v in sorted(syncs.items())))
    print("  main thread: " + ", ".join(f"{k} {v[0]}x {v[1] / 1e3:.1f} ms" for k, v in sorted(names.items())))


def _event_timeline(fn, cap, label: str) -> None:
    """One run of ``fn`` without the profiler: CUDA events around each vision pass (``hf.image_features`` as
    capture calls it) and each forward (``capture._run_hooked``), with host clocks at the same points. Prints
    device time per phase kind (event to event: it includes any idle inside a phase), the device time between
    phases, before the first and after the last, and host time per phase kind."""
    marks: list[tuple[str, float, float, torch.cuda.Event, torch.cuda.Event]] = []
    real_vision, real_run = cap._graphs.vision_pass, cap._run_hooked

    def timed_call(kind, real):
        def call(*a, **k):
            ea, eb = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ta = time.perf_counter()
            ea.record()
            try:
                return real(*a, **k)
            finally:
                eb.record()
                marks.append((kind, ta, time.perf_counter(), ea, eb))
        return call

    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cap._graphs.vision_pass, cap._run_hooked = timed_call("vision", real_vision), timed_call("forward", real_run)
    try:
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        cap._graphs.vision_pass, cap._run_hooked = real_vision, real_run
    dev = {"vision": 0.0, "forward": 0.0}
    host = {"vision": 0.0, "forward": 0.0}
    between, prev = [], start
    for kind, ta, tb, ea, eb in marks:
        dev[kind] += ea.elapsed_time(eb)
        host[kind] += 1e3 * (tb - ta)
        between.append(prev.elapsed_time(ea))
        prev = eb
    tail = prev.elapsed_time(end)
    print(f"\n=== events {label}: wall {wall * 1e3:.1f} ms; device: vision {dev['vision']:.1f} ms "
          f"({sum(m[0] == 'vision' for m in marks)} passes), forwards {dev['forward']:.1f} ms "
          f"({sum(m[0] == 'forward' for m in marks)}), between phases {sum(between[1:]):.1f} ms, before the first "
          f"{between[0]:.1f} ms, after the last {tail:.1f} ms; host inside: vision {host['vision']:.1f} ms, "
          f"forwards {host['forward']:.1f} ms")
    print("  " + "  ".join(f"{k[0]}{ea.elapsed_time(eb):.0f}/{1e3 * (tb - ta):.0f}+{g:.0f}"
                           for (k, ta, tb, ea, eb), g in zip(marks, between, strict=True))
          + "   (kind device/host ms +device ms since the previous phase)")


def ragged_target(smoke: bool, sweep: bool = False, timeline: bool = True, only: str | None = None,
                  profile: bool = True) -> None:
    """bench/ragged.py's image corpus: a device timeline of caller-order and default capture, then median wall
    times over capture's batching constants (cost of a forward in the planner, first-batch share, token cap).
    ``only``: a comma-separated list of the timeline's variants to run (default: all); ``profile``: also take
    the profiler traces."""
    import concurrent.futures as cf
    import threading

    import medgemma_shape
    from ragged import image_corpora

    import interp

    cap = importlib.import_module("interp.capture")
    model = medgemma_shape.build(smoke=smoke)
    cuda = model.device.type == "cuda"
    corpora = image_corpora(model, 24 if smoke else 128, 4, 20 if smoke else 40, 600, 56 if smoke else 768)
    text = medgemma_shape.prompts_of_lengths(model, medgemma_shape.ragged_lengths(96 if smoke else 512, 40, 1000))
    layer = 3 if smoke else 17
    from torch.profiler import record_function

    real = {"_features": cap._ImageFeatures._features, "_run_hooked": cap._run_hooked,
            "result": cf.Future.result}

    def features(self, key):
        with record_function("vision"):
            return real["_features"](self, key)

    def run(*a, **k):
        with record_function("forward"):
            return real["_run_hooked"](*a, **k)

    def result(self, timeout=None):
        if threading.current_thread() is threading.main_thread():
            with record_function("wait"):
                return real["result"](self, timeout)
        return real["result"](self, timeout)

    caller = dict(sort=False, batch_size=16, batch_tokens=10**9)

    def go(prompts, positions="all", **kw):
        return interp.capture(model, prompts, layers=[layer], positions=positions, progress=False, **kw)

    if cuda and timeline:
        import sys

        from interp.models import ImageCache

        interval = sys.getswitchinterval()
        from interp import _imageworkers

        print(f"image worker processes: {_imageworkers.pool(wait=True) is not None} ({_imageworkers.workers()})")
        variants = {"as is": {}, "threads only": {"workers": False}, "no vision graph": {"graphs": False},
                    "vision not queued ahead": {"queue": False},
                    "pixels unpinned": {"pin": False}, "4 encoder threads": {"threads": 4},
                    "forward merges the images": {"merge": False},
                    # a bound, not a setting: every image processed before the timed call, so no preprocessing
                    # thread competes with the one that launches (what GIL-free preprocessing could give at best)
                    "preprocessed ahead": {"ahead": True}}
        if only:
            variants = {k: v for k, v in variants.items() if k in only.split(",")}
        real_process = ImageCache._process
        ahead: dict = {}

        def process_ahead(self, image):
            key = id(image)
            if key not in ahead:
                ahead[key] = real_process(self, image)
            return ahead[key]

        threads, merge = cap.ENCODER_THREADS, cap.hf.embeds_with_image_features
        for kw in (caller, {}):
            for positions in ("all", "last"):
                for vname, v in variants.items() if positions == "all" else [("as is", {})]:
                    ImageCache.pin = v.get("pin", True)
                    ImageCache.workers = v.get("workers")
                    cap._graphs.GRAPHS = v.get("graphs", True)
                    cap._ImageFeatures.ahead = v.get("queue", True)
                    sys.setswitchinterval(v.get("switch", interval))
                    cap.ENCODER_THREADS = v.get("threads", threads)
                    cap.hf.embeds_with_image_features = merge if v.get("merge", True) else (lambda *a, **k: None)
                    if v.get("ahead"):
                        ImageCache._process = process_ahead
                    try:
                        go(corpora["images"], positions, **kw)
                        _event_timeline(lambda kw=kw, positions=positions: go(corpora["images"], positions, **kw),
                                        cap, f"images {positions} {kw or 'defaults'} [{vname}]")
                        print("  vision graphs: " + (", ".join(f"{k[0]}: {'used' if g else 'not used'}"
                                                              for per in cap._graphs._graphs.values()
                                                              for k, g in per.items()) or "none"))
                    except Exception:  # diagnosis: keep going
                        import traceback

                        traceback.print_exc()
                    finally:
                        ImageCache.pin, ImageCache.workers, cap._graphs.GRAPHS = True, None, True
                        cap._ImageFeatures.ahead = True
                        sys.setswitchinterval(interval)
                        cap.ENCODER_THREADS, cap.hf.embeds_with_image_features = threads, merge
                        ImageCache._process = real_process
    if cuda and timeline and profile:
        cap._ImageFeatures._features, cap._run_hooked, cf.Future.result = features, run, result
        try:
            for kw in (caller, {}):
                go(corpora["images"], **kw)
                try:
                    _timeline(lambda kw=kw: go(corpora["images"], **kw), f"images {kw or 'defaults'}")
                except Exception:  # diagnosis: a trace this code cannot read must not cost the sweep
                    import traceback

                    traceback.print_exc()
        finally:
            cap._ImageFeatures._features, cap._run_hooked = real["_features"], real["_run_hooked"]
            cf.Future.result = real["result"]

    def median(prompts, positions, reps=3, **kw):
        go(prompts, positions, **kw)
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            go(prompts, positions, **kw)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    if not sweep:
        return
    dev = "cuda" if cuda else "cpu"
    saved = dict(cap.BATCH_OVERHEAD_TOKENS)
    # (batch_tokens, batch_size, planner's cost of a forward in tokens): the defaults first
    settings = [(None, None, saved[dev]), (16384, 64, 256), (16384, 64, 4096), (32768, 128, 1024),
                (32768, 128, 8192)]
    print("\n=== sweep: median wall times; ratio = caller order / setting (same prompts)")
    try:
        for cname, prompts, reps in (("images", corpora["images"], 3), ("text", text, 2)):
            for positions in ("all", "last") if cname == "images" else ("all",):
                base = median(prompts, positions, reps, **caller)
                print(f"{cname} {positions}: caller order {base:.3f} s")
                for tokens, size, overhead in settings:
                    cap.BATCH_OVERHEAD_TOKENS[dev] = overhead
                    kw = {} if tokens is None else {"batch_tokens": tokens, "batch_size": size}
                    t = median(prompts, positions, reps, **kw)
                    print(f"  batch_tokens {tokens or 'default'} batch_size {size or 'default'} overhead {overhead}: "
                          f"{t:.3f} s, ratio {base / t:.2f}", flush=True)
    finally:
        cap.BATCH_OVERHEAD_TOKENS.update(saved)


def syncs_target(smoke: bool) -> None:
    """Every device-to-host synchronisation in one capture of bench/ragged.py's image corpus (and of text), each
    caller order and default, by torch's sync debug mode: the op and the frames of interp and transformers
    that led to it, with counts. A sync in a forward drains the kernel queue, so the device then waits for the
    host to launch the rest of it."""
    import traceback
    import warnings
    from collections import Counter

    import medgemma_shape
    from ragged import image_corpora

    import interp

    model = medgemma_shape.build(smoke=smoke)
    corpora = image_corpora(model, 24 if smoke else 128, 4, 20 if smoke else 40, 600, 56 if smoke else 768)
    text = medgemma_shape.prompts_of_lengths(model, medgemma_shape.ragged_lengths(64, 40, 1000))
    layer = 3 if smoke else 17
    for cname, prompts in (("images", corpora["images"]), ("text", text)):
        for kw in (dict(sort=False, batch_size=16, batch_tokens=10**9), {}):
            go = lambda prompts=prompts, kw=kw: interp.capture(model, prompts, layers=[layer], progress=False, **kw)  # noqa: E731
            go()
            seen: Counter = Counter()
            real = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None, seen=seen):
                frames = [f for f in traceback.extract_stack()[:-1]
                          if ("interp" in f.filename or "transformers" in f.filename) and "warnings" not in f.filename]
                seen[(str(message).split("\n")[0][:70],
                      " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames[::-1][:5]))] += 1

            warnings.showwarning = show
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("always")
                    warnings.showwarning = show
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        go()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
            finally:
                warnings.showwarning = real
            print(f"\n=== syncs: {cname} {kw or 'defaults'}: {sum(seen.values())}")
            for (msg, where), n in seen.most_common(12):
                print(f"  {n:4d}x {msg} | {where}")


def vision_target(smoke: bool) -> None:
    """Vision tower (16 images) and a 32-row image-prefix pass under each SDPA backend: time and max difference."""
    import medgemma_shape
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = medgemma_shape.build(smoke=smoke)
    cuda = model.device.type == "cuda"
    body = model.hf.model
    n_img = 4 if smoke else 16
    size = model.hf.config.vision_config.image_size
    px = torch.randn(n_img, 3, size, size, device=model.device, dtype=model.dtype)
    rows, width = (4, 24) if smoke else (32, 272)
    n_image_tokens = model.hf.config.mm_tokens_per_image
    emb = torch.randn(rows, width, model.d_model, device=model.device, dtype=model.dtype)
    attn = torch.ones(rows, width, dtype=torch.long, device=model.device)
    attn[: rows // 2, :3] = 0  # left padding on half the rows
    types = torch.zeros(rows, width, dtype=torch.long, device=model.device)
    types[:, 8:8 + n_image_tokens] = 1

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def clock(fn, reps=5):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn()
        sync()
        return (time.perf_counter() - t0) / reps, out

    backends = {"default": None, "flash": [SDPBackend.FLASH_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION],
                "cudnn": [SDPBackend.CUDNN_ATTENTION], "math": [SDPBackend.MATH]}
    jobs = {"vision tower": lambda: body.get_image_features(pixel_values=px).pooler_output,
            "prefix pass, token types": lambda: body(inputs_embeds=emb, attention_mask=attn, token_type_ids=types,
                                                     use_cache=False).last_hidden_state,
            "prefix pass, causal only": lambda: body(inputs_embeds=emb, attention_mask=attn,
                                                     use_cache=False).last_hidden_state}
    with torch.inference_mode():
        for job, fn in jobs.items():
            ref = None
            for name, allowed in backends.items():
                try:
                    if allowed is None:
                        t, out = clock(fn)
                    else:
                        with sdpa_kernel(allowed):
                            t, out = clock(fn)
                except Exception as e:  # noqa: BLE001 - a backend that cannot take these inputs
                    print(f"{job:<28} {name:<10} unavailable: {type(e).__name__}: {str(e)[:100]}")
                    continue
                out = out.float()
                ref = out if ref is None else ref
                rel = ((out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).max().item()
                print(f"{job:<28} {name:<10} {t * 1000:8.2f} ms   max rel vs default {rel:.2e}", flush=True)
    if cuda:
        for name, allowed in backends.items():
            if allowed is None:
                continue
            with sdpa_kernel(allowed):
                try:
                    _profile(jobs["vision tower"], f"vision tower, {name}", rows=8)
                except Exception as e:  # noqa: BLE001
                    print(name, "unavailable", type(e).__name__)


def phases(model, fn) -> None:
    """Device seconds per phase of the fast scorer (each call synchronised, so the total exceeds the wall)."""
    from collections import defaultdict

    from interp import scoring

    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    timeline: list[tuple[str, float, float]] = []
    originals = {}
    for name in ("_image_features", "_prefix_pass", "_suffix_pass", "_full_pass", "_tokenise"):
        orig = getattr(scoring._FastScorer, name)
        originals[name] = orig

        def timed(self, *a, _orig=orig, _name=name, **k):
            if torch.cuda.is_available() and _name != "_tokenise":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = _orig(self, *a, **k)
            if torch.cuda.is_available() and _name != "_tokenise":
                torch.cuda.synchronize()
            spent[_name] += time.perf_counter() - t0
            calls[_name] += 1
            timeline.append((_name, t0, time.perf_counter()))
            return out

        setattr(scoring._FastScorer, name, timed)
    try:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    finally:
        for name, orig in originals.items():
            setattr(scoring._FastScorer, name, orig)
    print(f"phases (synchronised run, wall {wall:.3f} s):",
          ", ".join(f"{k} {v:.3f} s / {calls[k]} calls" for k, v in spent.items()))
    print("timeline (s from the start): " + ", ".join(f"{n.strip('_')} {a - t0:.3f}-{b - t0:.3f}"
                                                       for n, a, b in sorted(timeline, key=lambda x: x[1])))


def lora_target(smoke: bool, mode: str, checkpoint: bool) -> None:
    import numpy as np
    from lora import build_model, make_pairs

    from interp import lora as L

    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    model = build_model(smoke, device, torch.bfloat16 if device == "cuda" else torch.float32)
    layers = [1, 2, 3] if smoke else list(range(15, 20))
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_pairs(16, mode == "images", 24, Path(tmp) / mode)
        pm = L._peft_wrap(model, layers, r=16, alpha=32, dropout=0.05, target_modules=L.DEFAULT_TARGET_MODULES, seed=0)
        trainer = L._Trainer(pm, layers[0], dict(ce_weight=1.0, kl_weight=1.0, kl_space="yes_no"), fast=True,
                             cache="auto", fuse_tokens=8192, checkpoint=checkpoint and device == "cuda")
        items = [((i, side), p.prompt_a() if side == "a" else p.prompt_b()) for i, p in enumerate(pairs)
                 for side in ("a", "b")]
        trainer.runner.prefill(items, rows_per_pass=8)
        for i in range(layers[0], pm.n_layers):
            trainer.runner.layers[i].train()
        opt = torch.optim.AdamW(trainer.params, lr=2e-4)
        group = list(range(8))

        def step() -> None:
            for p in trainer.params:
                p.grad = None
            micro = [([pairs[i]], [i], [L._micro_seed(0, 1, i)]) for i in group]
            trainer.backward_group(micro, len(group))
            torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
            opt.step()

        fold_min = L._DroppedA.FOLD_MIN_TOKENS
        try:
            for fold in (True, False):  # the folded dropout on passes of >= FOLD_MIN_TOKENS, and never
                L._DroppedA.FOLD_MIN_TOKENS = fold_min if fold else 1 << 40
                with L._row_dropout(pm.hf, trainer.dropout_rows):
                    _profile(step, f"lora {mode} group of 8 pairs, checkpoint={checkpoint}, fold={fold}")
                    ts = []
                    for _ in range(5):
                        if device == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        step()
                        if device == "cuda":
                            torch.cuda.synchronize()
                        ts.append(time.perf_counter() - t0)
                    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
                    print(f"lora {mode} step seconds (checkpoint={checkpoint}, fold={fold}):",
                          np.round(ts, 4).tolist(), f"peak so far {peak:.2f} GiB")
        finally:
            L._DroppedA.FOLD_MIN_TOKENS = fold_min


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=["evaluate", "lora", "capture", "vision", "ragged", "syncs"])
    ap.add_argument("--sweep", action="store_true", help="ragged: also time capture's batching constants")
    ap.add_argument("--no-timeline", action="store_true", help="ragged: skip the device timelines")
    ap.add_argument("--variants", help="ragged: comma-separated timeline variants to run (default: all)")
    ap.add_argument("--no-profile", action="store_true", help="ragged: skip the profiler traces")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--mode", default="text", choices=["text", "images"])
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--out", help="ignored (bench/gpu.sh passes it)")
    args = ap.parse_args()
    if args.target == "evaluate":
        evaluate_target(args.smoke, 8 if args.smoke else args.pairs)
    elif args.target == "capture":
        capture_target(args.smoke)
    elif args.target == "vision":
        vision_target(args.smoke)
    elif args.target == "syncs":
        syncs_target(args.smoke)
    elif args.target == "ragged":
        ragged_target(args.smoke, args.sweep, not args.no_timeline, args.variants, not args.no_profile)
    else:
        lora_target(args.smoke, args.mode, not args.no_checkpointing)
    print("STATUS hotspots: PASS (diagnosis only: no values to check)")


if __name__ == "__main__":
    main()
