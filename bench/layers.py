"""Benchmark: activation patching over every decoder layer at MedGemma-4B size, against one patch per forward.

A Gemma3ForConditionalGeneration with MedGemma-4B's text configuration (random weights, bf16) scores 200
built-in register pairs (text with the report as context). Three ways to get the same [pairs, layers] margins:
the naive loop (one forward per patch), `layer_profile(strategy="full")` (many patches per batched forward)
and `layer_profile(strategy="cache")` (b's prefix once into a KV cache, then only the patched token).
Pairs of opposite polarity are left out of a patching profile, so patches count the same-polarity pairs only.

    python bench/layers.py --out bench_layers.json           # on a GPU: naive loop on the first 50 pairs
    python bench/layers.py --naive-pairs 0 --out b.json      # the naive loop on every pair (H100: ~5 min more)
    python bench/layers.py --smoke                           # tiny shapes on the CPU, to check it runs

Values: on the pairs the naive loop ran, every run of each strategy is compared with it: the patched
margins [pairs, layers], the clean margins of both phrasings, and the per-layer profile values (the
least-squares slope, recomputed from each side's margins on those pairs). |diff| / rms(reference) must
stay <= 0.2 in bf16 (1e-3 in float32); beyond that the run FAILs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Checks, device_name, finish, recorded_warnings, timed, tolerance  # noqa: E402

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


def naive(model: Model, pairs) -> dict[str, np.ndarray]:
    """One forward per (pair, layer): b's prompt with a's last-token residual written at that layer.
    Returns the margins of a and of b (clean) ``[pairs]`` and the patched margins ``[pairs, layers]``."""
    yes, no = model.answer_ids
    m_a, m_b = np.zeros(len(pairs)), np.zeros(len(pairs))
    out = np.zeros((len(pairs), model.n_layers))

    def margin(inputs) -> float:
        logits = model.hf(**inputs, logits_to_keep=1).logits[0, -1].float()
        return float(logits[yes] - logits[no])

    with torch.inference_mode():
        for i, pair in enumerate(pairs):
            saved: dict[int, torch.Tensor] = {}
            hooks = [layer.register_forward_hook(
                lambda _m, _i, o, j=j, saved=saved: saved.__setitem__(j, _resid(o)[0, -1].clone()))
                for j, layer in enumerate(model.layers)]
            try:
                m_a[i] = margin(model.inputs(pair.question_a, context=pair.context))
            finally:
                for h in hooks:
                    h.remove()
            inputs = model.inputs(pair.question_b, context=pair.context)
            m_b[i] = margin(inputs)
            for layer in range(model.n_layers):
                def patch(_m, _i, o, src=saved[layer]):
                    _resid(o)[0, -1] = src

                h = model.layers[layer].register_forward_hook(patch)
                try:
                    out[i, layer] = margin(inputs)
                finally:
                    h.remove()
    return {"margin_a": m_a, "margin_b": m_b, "margin_patched": out}


def profile_values(m: dict[str, np.ndarray]) -> np.ndarray:
    """`layer_profile`'s patching value per layer: the least-squares slope of (patched - b) on (a - b)."""
    gap = m["margin_a"] - m["margin_b"]
    return ((m["margin_patched"] - m["margin_b"][:, None]) * gap[:, None]).sum(0) / (gap ** 2).sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per batch for layer_profile")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each batched method (median reported)")
    ap.add_argument("--naive-repeats", type=int, default=1, help="timed runs of the naive loop")
    ap.add_argument("--naive-pairs", type=int, default=50, help="run the naive loop on the first N profiled pairs "
                    "(0: all); its per-patch time is scaled to all pairs, and values are checked on these")
    ap.add_argument("--tol", type=float, default=None, help="|diff| / rms(reference) (default: by dtype)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    args = ap.parse_args()

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.smoke:
        args.pairs, args.repeats, args.batch_size, args.naive_pairs = min(args.pairs, 8), 1, 4, 0
    text = SMOKE_TEXT if args.smoke else MEDGEMMA_4B_TEXT
    model = build(text, device, dtype)
    tol = args.tol if args.tol is not None else tolerance("margins", dtype)
    pairs = pairs_for(args.pairs)
    profiled = [p for p in pairs if p.same_polarity]  # layer_profile leaves opposite-polarity pairs out
    naive_pairs = profiled[:args.naive_pairs] if args.naive_pairs else profiled
    n_patches = len(profiled) * model.n_layers
    tokens = [int(model.encode([p.prompt_b()]).lengths[0]) for p in pairs[:32]]
    print(f"{model!r}\n{len(pairs)} pairs ({len(profiled)} of the same polarity) x {model.n_layers} layers = "
          f"{n_patches} patches; b prompts ~{np.mean(tokens):.0f} tokens; device {device_name(device)}; "
          f"values checked on {len(naive_pairs)} pairs, tolerance {tol:g}", flush=True)

    checks, warned = Checks(), []
    rows = {}
    with recorded_warnings(warned):
        # Warm-up: kernels, allocator, cuBLAS handles.
        warm = pairs[:min(4, len(pairs))]
        naive(model, warm[:1])
        for strategy in ("full", "cache"):
            layer_profile(model, warm, method="patching", strategy=strategy, batch_size=args.batch_size,
                          progress=False)
        t = timed(lambda: naive(model, naive_pairs), args.naive_repeats, warmup=False)
        ref = t.result
        ref_values = profile_values(ref)
        scale = len(profiled) / len(naive_pairs)
        rows["naive: one patch per forward"] = {"times_s": [x * scale for x in t.times_s], "timed_pairs": len(naive_pairs)}
        patch_labels = [f"{p.id}/layer {j}" for p in naive_pairs for j in range(model.n_layers)]
        pair_labels = [p.id for p in naive_pairs]

        for strategy, label in (("full", "layer_profile strategy='full'"), ("cache", "layer_profile strategy='cache'")):
            def check(prof, label=label, strategy=strategy):
                meta = prof.meta
                checks.require(f"{label}: strategy ran", meta.get("strategy") == strategy,
                               f"meta says strategy={meta.get('strategy')!r}")
                where = {pid: k for k, pid in enumerate(meta["pair_ids"])}
                missing = [p.id for p in naive_pairs if p.id not in where]
                if missing:
                    checks.fail(f"{label}: pairs", f"pairs {missing[:3]} missing from the profile")
                    return
                idx = [where[p.id] for p in naive_pairs]
                got = {k: np.asarray(meta[k], dtype=np.float64)[idx] for k in ref}
                checks.values(f"{label}: patched margins", got["margin_patched"], ref["margin_patched"], tol,
                              labels=patch_labels)
                for k in ("margin_a", "margin_b"):
                    checks.values(f"{label}: clean {k}", got[k], ref[k], tol, labels=pair_labels)
                checks.values(f"{label}: profile values", profile_values(got), ref_values, tol,
                              labels=[f"layer {j}" for j in range(model.n_layers)])
                if len(naive_pairs) == len(profiled):  # the report's own values, when every pair was checked
                    checks.values(f"{label}: reported profile values", np.asarray(prof.values), ref_values, tol,
                                  labels=[f"layer {j}" for j in range(model.n_layers)])

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = timed(lambda s=strategy: layer_profile(model, pairs, method="patching", strategy=s,
                                                       batch_size=args.batch_size, progress=False),
                      args.repeats, warmup=False, check=check)
            rows[label] = {"times_s": t.times_s, "timed_pairs": len(pairs),
                           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                           else None}

    base = statistics.median(rows["naive: one patch per forward"]["times_s"])
    margin_scale = float(np.abs(ref["margin_patched"]).mean())
    print(f"\n{'method':34} {'median s':>10} {'patches/s':>11} {'speedup':>8}")
    for label, r in rows.items():
        med = statistics.median(r["times_s"])
        r.update(median_s=med, patches_per_s=n_patches / med, speedup=base / med)
        print(f"{label:34} {med:10.2f} {n_patches / med:11.0f} {base / med:7.1f}x")
    print(f"(patched margins are ~{margin_scale:.3g} logits on average; bf16 differences between batchings are "
          "expected)")
    finish("layers", args, {"model": repr(model), "text_config": text, "dtype": str(dtype),
                            "pairs": len(pairs), "profiled_pairs": len(profiled), "checked_pairs": len(naive_pairs),
                            "layers": model.n_layers, "patches": n_patches, "batch_size": args.batch_size,
                            "mean_b_tokens": float(np.mean(tokens)), "mean_abs_patched_margin": margin_scale,
                            "tolerance": tol, "methods": rows, "warnings": warned}, checks, args.out)


if __name__ == "__main__":
    main()
