"""Where the time goes: torch.profiler over interp's fast paths at MedGemma-4B shape (diagnosis, not a benchmark).

    python bench/hotspots.py evaluate          # evaluate(fast=True) on 48 image pairs (bench/consistency.py's)
    python bench/hotspots.py lora --mode text  # one steady accumulation group of the LoRA fast path
    python bench/hotspots.py capture           # capture on bench/ragged.py's image corpus: host vs device time
    python bench/hotspots.py vision            # vision tower and an image-prefix pass under each SDPA backend

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

        with L._row_dropout(pm.hf, trainer.dropout_rows):
            _profile(step, f"lora {mode} group of 8 pairs, checkpoint={checkpoint}")
            ts = []
            for _ in range(5):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            print(f"lora {mode} step seconds (checkpoint={checkpoint}):", np.round(ts, 4).tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=["evaluate", "lora", "capture", "vision"])
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
    else:
        lora_target(args.smoke, args.mode, not args.no_checkpointing)
    print("STATUS hotspots: PASS (diagnosis only: no values to check)")


if __name__ == "__main__":
    main()
