"""Benchmark: activation patching over every decoder layer at MedGemma-4B size, against one patch per forward.

A Gemma3ForConditionalGeneration with MedGemma-4B's text configuration (random weights, bf16) scores 200
built-in register pairs (text with the report as context). Three ways to get the same [pairs, layers] margins:
the naive loop (one forward per patch), `layer_profile(strategy="full")` (many patches per batched forward)
and `layer_profile(strategy="cache")` (b's prefix once into a KV cache, then only the patched token).

    python bench/layers.py --out bench_layers.json           # on a GPU (H100: a few minutes, mostly the naive loop)
    python bench/layers.py --naive-pairs 50 --out b.json     # time the naive loop on 50 pairs, scaled to 200
    python bench/layers.py --smoke                           # tiny shapes on the CPU, to check it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import interp
from interp.data import builtin
from interp.layers import layer_profile
from interp.models import GEMMA_CHAT_TEMPLATE, Model, tiny_tokenizer

# MedGemma-4B's text decoder (FACTS.md): 34 layers, 5 local : 1 global attention.
MEDGEMMA_4B_TEXT = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                        max_position_embeddings=131072, query_pre_attn_scalar=256)
SMOKE_TEXT = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=16, max_position_embeddings=1024)
# The vision tower is not on the measured (text) path; a small one keeps the module layout and saves memory.
SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                    patch_size=14)


def build(text: dict, device: torch.device, dtype: torch.dtype) -> Model:
    """A MedGemma-shaped model with random weights, initialised directly on ``device``."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tok = tiny_tokenizer(GEMMA_CHAT_TEMPLATE)
    tid = tok.convert_tokens_to_ids
    cfg = Gemma3Config(text_config=dict(text, pad_token_id=0, bos_token_id=2, eos_token_id=1),
                       vision_config=SMALL_VISION, mm_tokens_per_image=4, boi_token_index=tid("<start_of_image>"),
                       eoi_token_index=tid("<end_of_image>"), image_token_index=tid("<image_soft_token>"),
                       pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        hf = Gemma3ForConditionalGeneration._from_config(cfg, dtype=dtype)
    hf.eval()
    return Model(hf=hf, tokenizer=tok, name="medgemma-4b-shaped (random)", chat=True, answer_words=("Yes", "No"))


def pairs_for(n: int):
    """``n`` built-in register pairs (cycled past the 166 bundled ones, with unique ids), text and report only."""
    base = builtin("register")
    return [dataclasses.replace(base[i % len(base)], id=f"{base[i % len(base)].id}#{i // len(base)}", image=None)
            for i in range(n)]


def _resid(output):
    return output[0] if isinstance(output, tuple) else output


def naive(model: Model, pairs) -> np.ndarray:
    """One forward per (pair, layer): b's prompt with a's last-token residual written at that layer."""
    yes, no = model.answer_ids
    out = np.zeros((len(pairs), model.n_layers))
    with torch.inference_mode():
        for i, pair in enumerate(pairs):
            saved: dict[int, torch.Tensor] = {}
            hooks = [layer.register_forward_hook(
                lambda _m, _i, o, j=j, saved=saved: saved.__setitem__(j, _resid(o)[0, -1].clone()))
                for j, layer in enumerate(model.layers)]
            model.hf(**model.inputs(pair.question_a, context=pair.context), logits_to_keep=1)
            for h in hooks:
                h.remove()
            inputs = model.inputs(pair.question_b, context=pair.context)
            for layer in range(model.n_layers):
                def patch(_m, _i, o, src=saved[layer]):
                    _resid(o)[0, -1] = src

                h = model.layers[layer].register_forward_hook(patch)
                logits = model.hf(**inputs, logits_to_keep=1).logits[0, -1].float()
                h.remove()
                out[i, layer] = float(logits[yes] - logits[no])
    return out


def timed(fn, device: torch.device, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per batch for layer_profile")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each batched method (median reported)")
    ap.add_argument("--naive-repeats", type=int, default=1, help="timed runs of the naive loop")
    ap.add_argument("--naive-pairs", type=int, default=None, help="time the naive loop on the first N pairs only "
                    "(its per-patch time is then scaled to all pairs)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    args = ap.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.smoke:
        args.pairs, args.repeats, args.batch_size = min(args.pairs, 8), 1, 4
    text = SMOKE_TEXT if args.smoke else MEDGEMMA_4B_TEXT
    model = build(text, device, dtype)
    pairs = pairs_for(args.pairs)
    naive_pairs = pairs[:args.naive_pairs] if args.naive_pairs else pairs
    n_patches = len(pairs) * model.n_layers
    tokens = [int(model.encode([p.prompt_b()]).lengths[0]) for p in pairs[:32]]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{model!r}\n{len(pairs)} pairs x {model.n_layers} layers = {n_patches} patches; "
          f"b prompts ~{np.mean(tokens):.0f} tokens; device {device_name}")

    # Warm-up: kernels, allocator, cuBLAS handles.
    warm = pairs[:min(4, len(pairs))]
    naive(model, warm[:1])
    for strategy in ("full", "cache"):
        layer_profile(model, warm, method="patching", strategy=strategy, batch_size=args.batch_size, progress=False)

    rows = {}
    t_naive, ref = timed(lambda: naive(model, naive_pairs), device, args.naive_repeats)
    scale = len(pairs) / len(naive_pairs)
    rows["naive: one patch per forward"] = {"times_s": [t * scale for t in t_naive], "max_abs_diff": 0.0,
                                           "timed_pairs": len(naive_pairs)}
    for strategy, label in (("full", "layer_profile strategy='full'"), ("cache", "layer_profile strategy='cache'")):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, prof = timed(lambda s=strategy: layer_profile(model, pairs, method="patching", strategy=s,
                                                             batch_size=args.batch_size, progress=False),
                            device, args.repeats)
        got = np.array(prof.meta["margin_patched"])[:len(naive_pairs)]
        rows[label] = {"times_s": times, "max_abs_diff": float(np.abs(got - ref).max()), "timed_pairs": len(pairs),
                       "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}

    base = statistics.median(rows["naive: one patch per forward"]["times_s"])
    margin_scale = float(np.abs(ref).mean())
    print(f"\n{'method':34} {'median s':>10} {'patches/s':>11} {'speedup':>8} {'max |diff| vs naive':>20}")
    for label, r in rows.items():
        med = statistics.median(r["times_s"])
        r.update(median_s=med, patches_per_s=n_patches / med, speedup=base / med)
        print(f"{label:34} {med:10.2f} {n_patches / med:11.0f} {base / med:7.1f}x {r['max_abs_diff']:20.2e}")
    print(f"(margins are ~{margin_scale:.3g} logits on average; bf16 differences between batchings are expected)")

    if args.out is not None:
        import transformers

        result = {"benchmark": "layer_profile(method='patching')", "model": repr(model), "text_config": text,
                  "dtype": str(dtype), "device": device_name,
                  "pairs": len(pairs), "layers": model.n_layers, "patches": n_patches, "batch_size": args.batch_size,
                  "mean_b_tokens": float(np.mean(tokens)), "mean_abs_margin": margin_scale, "methods": rows,
                  "smoke": args.smoke,
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "interp": interp.__version__, "python": platform.python_version()}}
        tmp = args.out.with_name(f".{args.out.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
