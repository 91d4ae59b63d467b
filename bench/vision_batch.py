"""Benchmark: the vision tower + projector at batch 1 (how capture runs each distinct image, `_ImageFeatures`)
against several images per pass, at MedGemma-4B shape: does batching images make the shared vision work of a
capture cheaper? (Issue 14's image corpus spends ~200 ms of ~1 s on it, in both orders.)

    python bench/vision_batch.py --out vision_batch.json   # on a GPU (about a minute)
    python bench/vision_batch.py --quick                   # toy shapes on the CPU

Eager passes (the model's own ``get_image_features``), ``--images`` distinct generated 768-px 'chest X-rays'
preprocessed once; per batch size, the median over ``--repeats`` timed rounds (CUDA events around the whole
round) of ms per image. Values: every image's features from each batch size against its batch-1 features, per
row (common.tolerance: bf16 0.05); a row beyond it is a FAIL.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import medgemma_shape  # noqa: E402
from common import Checks, finish, tolerance  # noqa: E402
from ragged import images  # noqa: E402

from interp import hf  # noqa: E402
from interp.models import Prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", "--smoke", action="store_true", help="toy shapes on the CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.quick:
        args.images, args.batches, args.repeats = 4, "1,2,4", 2
    model = medgemma_shape.build(smoke=args.quick, device="cpu" if args.quick else None)
    cuda = model.device.type == "cuda"
    body = model.hf.model
    pixels = torch.cat([model.encode([Prompt("Is there an effusion?", im)]).inputs["pixel_values"]
                        for im in images(args.images, 56 if args.quick else 768)])
    sizes = [int(b) for b in args.batches.split(",") if b.strip()]

    def run(b: int) -> torch.Tensor:
        out = [hf.image_features(body, pixels[s:s + b]) for s in range(0, len(pixels), b)]
        return torch.cat([o if isinstance(o, torch.Tensor) else torch.stack(list(o)) for o in out])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    checks, rows = Checks(), {}
    tol = tolerance("rows", model.dtype)
    with torch.inference_mode():
        ref = run(1)  # warm-up too
        for b in sizes:
            got = run(b)  # warm-up of this size, and its values
            checks.rows(f"batch {b} vs batch 1", got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1]), tol)
            times = []
            for _ in range(args.repeats):
                sync()
                t = time.perf_counter()
                run(b)
                sync()
                times.append(time.perf_counter() - t)
            ms = statistics.median(times) * 1e3 / len(pixels)
            rows[b] = {"ms_per_image": ms, "times_s": times}
            print(f"batch {b:>3}: {ms:7.2f} ms per image (median of {args.repeats} rounds of {len(pixels)} images)",
                  flush=True)
    base = rows[sizes[0]]["ms_per_image"]
    print("per image vs batch 1: " + ", ".join(f"batch {b} {base / r['ms_per_image']:.2f}x" for b, r in rows.items()))
    finish("vision_batch", args, {"model": repr(model), "dtype": str(model.dtype), "images": len(pixels),
                                  "rows": rows}, checks, args.out)


if __name__ == "__main__":
    main()
