"""Benchmark: paraphrase-consistency evaluation, fast path vs naive per-phrasing forwards, same inputs.

    python bench/consistency.py --out consistency.json     # on a GPU: MedGemma-4B-shaped model, bf16, 896 px
    python bench/consistency.py --smoke                    # tiny shapes, runs anywhere (CPU)

Two workloads over the same images: pairs (one image, two phrasings) and groups of 6 phrasings of one
question (5 pairs each, every rewrite against the reference). Three timings per workload, each the median
of --repeats runs after a warm-up, device synchronised (about 6 minutes on an H100 with the defaults):
  fast           interp.evaluate(fast=True), end to end (image files read and processed inside the timer)
  naive          interp.evaluate(fast=False), end to end: one forward per phrasing of every pair
  naive-forward  the same forwards on inputs encoded before the timer starts (model compute only)
Speed-ups are reported against both naive timings; pairs/s counts evaluated pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import medgemma_shape  # noqa: E402

import interp  # noqa: E402
from interp.consistency import evaluate, last_hidden, project  # noqa: E402
from interp.data import ParaphraseGroup, ParaphrasePair, builtin  # noqa: E402

TARGETS = {"pairs": 2.5, "groups6": 4.0}  # issue 4: fast >= 2.5x naive for pairs, >= 4x for groups of 6
# Four more rewrites of each built-in question, so every question has six phrasings.
REWRITES = ("Based on this chest radiograph, {q}", "Looking at the image: {q}", "Quick question - {q}",
            "{q} Please answer yes or no.")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: bool = True) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn`` (after one warm-up run unless ``warmup=False``), and every timed run."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def make_images(folder: Path, n: int, size: int) -> list[str]:
    """``n`` synthetic chest-X-ray-like greyscale PNGs (gradient, two lung fields, noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for k in range(n):
        lungs = sum(np.exp(-(((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2)) for cx in (0.3, 0.7))
        blob = np.exp(-(((xx - rng.uniform(0.2, 0.8)) ** 2 + (yy - rng.uniform(0.3, 0.8)) ** 2) / 0.004))
        img = 200 - 120 * lungs + 60 * blob * rng.uniform(0, 1) + 30 * yy + rng.normal(0, 6, (size, size))
        path = folder / f"cxr_{k:03d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype("uint8"), mode="L").save(path)
        paths.append(str(path))
    return paths


def workloads(images: list[str]) -> dict[str, list[ParaphrasePair]]:
    """pairs: formal vs lay phrasing per image; groups6: six phrasings per image (5 pairs)."""
    base = builtin("register")
    pairs, groups = [], []
    for k, img in enumerate(images):
        p = base[k % len(base)]
        pairs.append(ParaphrasePair(id=f"p{k}", question_a=p.question_a, question_b=p.question_b, answer=p.answer,
                                    image=img, same_polarity=p.same_polarity, kind="register"))
        qs = (p.question_a, p.question_b, *[r.format(q=p.question_a) for r in REWRITES])
        groups.append(ParaphraseGroup(id=f"g{k}", questions=qs, polarities=(True, p.same_polarity, *[True] * 4),
                                      answer=p.answer, image=img, kind="mixed"))
    return {"pairs": pairs, "groups6": [q for g in groups for q in g.pairs()]}


def naive_forward(model: interp.Model, pairs: list[ParaphrasePair], batch_size: int):
    """The naive forwards (one per phrasing of every pair) on inputs encoded up front; returns a runner."""
    prompts = [p.prompt_a() for p in pairs] + [p.prompt_b() for p in pairs]
    batches = [model.encode(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    ids = list(model.answer_ids)

    def run() -> None:
        with torch.inference_mode():
            for b in batches:
                project(model, last_hidden(model, b), ids)

    return run


def components(model: interp.Model, image: str, repeats: int) -> dict[str, float]:
    """Milliseconds for one image through the vision tower, and one ~300-token prompt through the decoder."""
    enc = model.encode([interp.Prompt("Is there a pleural effusion?", image)])
    body = model.hf.model
    pv = enc.inputs["pixel_values"].repeat(8, 1, 1, 1)
    with torch.inference_mode():
        t_vis, _ = timed(lambda: body.get_image_features(pixel_values=pv), repeats)
        ids = enc.inputs["input_ids"].repeat(8, 1)
        t_dec, _ = timed(lambda: body.language_model(input_ids=ids, use_cache=False), repeats)
    return {"vision_ms_per_image": 1000 * t_vis / 8, "decoder_ms_per_prompt": 1000 * t_dec / 8,
            "prompt_tokens": int(enc.inputs["input_ids"].shape[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a quick check that it runs)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-px", type=int, default=1024, help="side of the synthetic PNGs on disk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-batch", type=int, default=16, help="sequences per naive forward")
    ap.add_argument("--workloads", default="pairs,groups6")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.image_px, args.repeats = 6, 96, 1
    device = "cpu" if args.smoke else ("cuda" if torch.cuda.is_available() else "cpu")
    model = medgemma_shape.build(smoke=args.smoke, device=device)
    info = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, dtype=str(model.dtype), smoke=args.smoke, images=args.images,
                image_px=args.image_px, repeats=args.repeats, naive_batch=args.naive_batch,
                vision_px=model.hf.config.vision_config.image_size,
                image_tokens=model.hf.config.mm_tokens_per_image,
                image_processor=type(model.processor.image_processor).__name__)
    print(f"model: {model}\n{json.dumps(info)}", flush=True)
    results: dict = {"info": info, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp), args.images, args.image_px)
        info["components"] = components(model, images[0], args.repeats)
        print(f"components: {info['components']}", flush=True)
        for name, pairs in workloads(images).items():
            if name not in args.workloads.split(","):
                continue
            n = len(pairs)
            # These two runs check agreement and warm both paths up (kernels, allocator), so the timed
            # runs below need no further warm-up.
            fast_report = evaluate(model, pairs, fast=True, progress=False, n_boot=0)
            naive_report = evaluate(model, pairs, fast=False, progress=False, n_boot=0,
                                    batch_size=args.naive_batch)
            diff = np.abs(np.r_[fast_report.table["margin_a"] - naive_report.table["margin_a"],
                                fast_report.table["margin_b"] - naive_report.table["margin_b"]])
            row = {"pairs": n, "distinct_phrasings": len({(p.image, q) for p in pairs
                                                         for q in (p.question_a, p.question_b)}),
                   "max_abs_margin_diff_fast_vs_naive": float(diff.max()),
                   "margin_scale": float(np.abs(naive_report.table["margin_a"]).mean()),
                   "fast_method": fast_report.method}
            for label, fn in (
                    ("fast", lambda pairs=pairs: evaluate(model, pairs, fast=True, progress=False, n_boot=0)),
                    ("naive", lambda pairs=pairs: evaluate(model, pairs, fast=False, progress=False, n_boot=0,
                                                           batch_size=args.naive_batch)),
                    ("naive-forward", naive_forward(model, pairs, args.naive_batch))):
                median, times = timed(fn, args.repeats, warmup=False)
                row[label] = {"seconds": median, "runs": times, "pairs_per_s": n / median}
                print(f"  {name:8s} {label:14s} {median:8.3f} s  {n / median:9.2f} pairs/s", flush=True)
            row["speedup_vs_naive"] = row["naive"]["seconds"] / row["fast"]["seconds"]
            row["speedup_vs_naive_forward"] = row["naive-forward"]["seconds"] / row["fast"]["seconds"]
            row["target"] = TARGETS[name]
            row["meets_target"] = row["speedup_vs_naive"] >= TARGETS[name]
            results["workloads"][name] = row
            if device == "cuda":
                torch.cuda.empty_cache()

    print(f"\n{'workload':9s} {'pairs':>6s} {'fast p/s':>10s} {'naive p/s':>10s} {'fwd-only p/s':>12s} "
          f"{'x naive':>8s} {'x fwd-only':>10s} {'target':>7s}  max|dm|")
    for name, r in results["workloads"].items():
        print(f"{name:9s} {r['pairs']:6d} {r['fast']['pairs_per_s']:10.2f} {r['naive']['pairs_per_s']:10.2f} "
              f"{r['naive-forward']['pairs_per_s']:12.2f} {r['speedup_vs_naive']:8.2f} "
              f"{r['speedup_vs_naive_forward']:10.2f} {r['target']:6.1f}x  {r['max_abs_margin_diff_fast_vs_naive']:.2g}")
    if args.out:
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
