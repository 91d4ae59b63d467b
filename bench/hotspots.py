"""Where the time goes: torch.profiler over interp's fast paths at MedGemma-4B shape (diagnosis, not a benchmark).

    python bench/hotspots.py evaluate          # evaluate(fast=True) on 48 image pairs (bench/consistency.py's)
    python bench/hotspots.py lora --mode text  # one steady accumulation group of the LoRA fast path

Prints GPU-busy time against wall time (the share of the run the device is idle) and the top operators by
self device time and by self CPU time. ``--smoke`` runs on the CPU with toy shapes.
"""

from __future__ import annotations

import argparse
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


def phases(model, fn) -> None:
    """Device seconds per phase of the fast scorer (each call synchronised, so the total exceeds the wall)."""
    from collections import defaultdict

    from interp import scoring

    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
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
    ap.add_argument("target", choices=["evaluate", "lora"])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--mode", default="text", choices=["text", "images"])
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--out", help="ignored (bench/gpu.sh passes it)")
    args = ap.parse_args()
    if args.target == "evaluate":
        evaluate_target(args.smoke, 8 if args.smoke else args.pairs)
    else:
        lora_target(args.smoke, args.mode, not args.no_checkpointing)
    print("STATUS hotspots: PASS (diagnosis only: no values to check)")


if __name__ == "__main__":
    main()
