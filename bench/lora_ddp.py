"""Benchmark: `train_lora` on one or several GPUs of one machine (data parallel through accelerate).

Every process builds the same MedGemma-4B-shaped model (random weights, bf16) on its own GPU and trains
the same adapter (layers 15-19); each optimizer step's accumulation group is split across the processes and
the LoRA gradients are summed, so the adapter equals the one-GPU adapter up to reduction order.
Checked on rank 0: the fast path ran, every logged loss is finite, and with ``--compare`` the largest
adapter weight difference to the other run, relative to the largest weight, is within tolerance
(bf16: 0.05; float32: 1e-3); the run ends with a STATUS line and exits 1 on FAIL.

    accelerate launch --num_processes 1 bench/lora_ddp.py --workdir /tmp/one --out one.json
    accelerate launch --num_processes 2 --multi_gpu bench/lora_ddp.py --workdir /tmp/two --out two.json \\
        --compare /tmp/one
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Checks, finish, tolerance  # noqa: E402
from lora import build_model, make_pairs  # noqa: E402  (bench/lora.py)

from interp import lora as L  # noqa: E402
from interp.dist import rank_and_world  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=8)
    ap.add_argument("--layers", default="15-19")
    ap.add_argument("--images", action="store_true", help="one 896 px image per pair (default: text only)")
    ap.add_argument("--workdir", default="/tmp/interp_lora_ddp", help="output_dir of the run (shared by ranks)")
    ap.add_argument("--compare", help="workdir of another run: report the largest adapter weight difference")
    ap.add_argument("--out", help="JSON results (rank 0)")
    args = ap.parse_args(argv)

    rank, world = rank_and_world()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = "cpu" if args.smoke or not torch.cuda.is_available() else f"cuda:{local}"
    if device != "cpu":
        torch.cuda.set_device(local)
    lo, hi = (1, 3) if args.smoke else map(int, args.layers.split("-"))
    model = build_model(args.smoke, device, torch.float32 if device == "cpu" else torch.bfloat16)
    folder = Path(args.workdir) / f"images-rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(min(args.pairs, 16) if args.smoke else args.pairs, args.images, 24, folder)
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = L.train_lora(model, pairs, layers=list(range(lo, hi + 1)), eval_pairs=None, epochs=args.epochs,
                       grad_accum=args.grad_accum, output_dir=Path(args.workdir) / "run", resume=False,
                       progress=rank == 0)
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"world_size": world, "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
           "pairs": len(pairs), "epochs": args.epochs, "images": args.images, "seconds": seconds,
           "pairs_per_s": len(pairs) * args.epochs / seconds, "steps": res.steps,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None,
           "losses": [h.loss for h in res.history[1:]], "fast_path": res.fast_path}
    if rank == 0:
        checks = Checks()
        checks.require("fast path ran", res.fast_path != "generic", f"fast_path={res.fast_path!r}")
        checks.require("losses finite", all(math.isfinite(x) for x in out["losses"] if x is not None),
                       f"losses {out['losses'][:4]}")
        if args.compare:
            from safetensors.torch import load_file

            mine = load_file(str(res.adapter_path / "adapter_model.safetensors"))
            other = load_file(str(Path(args.compare) / "run" / "adapter" / "adapter_model.safetensors"))
            out["max_abs_diff_vs_compare"] = max(float((mine[k].float() - other[k].float()).abs().max())
                                                 for k in mine)
            out["max_abs_weight"] = max(float(v.float().abs().max()) for v in mine.values())
            checks.scalar("adapter weights vs --compare run (max |diff| / max |weight|)",
                          out["max_abs_diff_vs_compare"] / out["max_abs_weight"], 0.0,
                          tolerance("rows", model.dtype), relative=False)
        out = finish("lora_ddp", args, out, checks, args.out)
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
