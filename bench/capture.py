"""Benchmark: residual-stream capture vs plain and stopped forwards and TransformerLens, side by side.

    python bench/capture.py --out capture.json            # on a GPU, MedGemma-4B-shaped model, bf16
    python bench/capture.py --smoke                       # tiny shapes, runs anywhere

Tokens/s for: the plain forward (logits_to_keep=1), the forward stopped after layer 17, interp.capture
of layer 17 (all positions), of all 34 layers (last position, written to the on-disk cache, and all
positions, kept in memory), and TransformerLens' TransformerBridge.run_with_cache on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import medgemma_shape  # noqa: E402

import interp  # noqa: E402
from interp.capture import StopForward  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn`` after one warm-up (device synchronised around each run)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", type=int, default=17)
    ap.add_argument("--no-tl", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.tokens, args.batches, args.repeats, args.layer = 2, 48, 2, 1, 3
    model = medgemma_shape.build(smoke=args.smoke)
    n = args.batch * args.batches
    prompts = medgemma_shape.long_prompts(model, n, args.tokens)
    batches = [model.encode(prompts[i:i + args.batch]) for i in range(0, n, args.batch)]
    n_tokens = sum(int(b.lengths.sum()) for b in batches)
    L, all_layers = args.layer, list(range(model.n_layers))
    rows: dict[str, dict] = {}

    def record(name: str, seconds: float, note: str = "") -> None:
        rows[name] = {"seconds": seconds, "tokens_per_s": n_tokens / seconds, "note": note}
        print(f"{name:<44} {n_tokens / seconds:>10,.0f} tok/s  {note}", flush=True)

    print(f"device={torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} "
          f"batch={args.batch} tokens~{args.tokens} prompts={n} total_tokens={n_tokens}")

    @torch.inference_mode()
    def plain():
        for b in batches:
            model.hf(**b.inputs, use_cache=False, logits_to_keep=1)

    @torch.inference_mode()
    def stopped():
        def stop(*_):
            raise StopForward

        h = model.layer(L).register_forward_hook(stop)
        try:
            for b in batches:
                try:
                    model.hf(**b.inputs, use_cache=False)
                except StopForward:
                    pass
        finally:
            h.remove()

    @torch.inference_mode()
    def hooks_all():
        kept = []
        hs = [model.layer(i).register_forward_hook(lambda m, a, o: kept.append(o[0] if isinstance(o, tuple) else o))
              for i in all_layers]
        try:
            for b in batches:
                kept.clear()
                model.hf(**b.inputs, use_cache=False, logits_to_keep=1)
        finally:
            for h in hs:
                h.remove()

    record("plain forward (logits_to_keep=1)", timed(plain, args.repeats))
    record(f"forward stopped after layer {L}", timed(stopped, args.repeats))
    record("forward + hooks keeping all resid_post", timed(hooks_all, args.repeats), "reference, on device")
    bs = args.batch
    record(f"interp.capture layer {L}, all positions",
           timed(lambda: interp.capture(model, prompts, layers=[L], positions="all", batch_size=bs,
                                        progress=False), args.repeats), "to host memory")
    record(f"interp.capture layer {L}, last position",
           timed(lambda: interp.capture(model, prompts, layers=[L], positions="last", batch_size=bs,
                                        progress=False), args.repeats))
    with tempfile.TemporaryDirectory() as tmp:
        def cached_all():
            interp.capture(model, prompts, layers=all_layers, positions="last", batch_size=bs, progress=False,
                           cache=tmp, recompute=True)
        record("interp.capture all layers, last pos, +cache", timed(cached_all, args.repeats),
               "written to safetensors shards")
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
        rows["interp.capture all layers, last pos, +cache"]["cache_bytes"] = size
        t = time.perf_counter()
        interp.capture(model, prompts, layers=all_layers, positions="last", batch_size=bs, progress=False, cache=tmp)
        rows["cache read-back (rerun)"] = {"seconds": time.perf_counter() - t}
        print(f"{'cache read-back (rerun)':<44} {rows['cache read-back (rerun)']['seconds']:.3f} s")
    record("interp.capture all layers, all positions",
           timed(lambda: interp.capture(model, prompts, layers=all_layers, positions="all", batch_size=bs,
                                        progress=False), 1), "to host memory")
    if not args.no_tl:
        try:
            os.environ.setdefault("PIP_NO_INDEX", "1")
            from transformer_lens.model_bridge import TransformerBridge

            with tempfile.TemporaryDirectory() as folder:
                from transformers import AutoTokenizer

                # the bridge picks its adapter from config.architectures and needs a saved tokenizer
                model.hf.config.architectures = [type(model.hf).__name__]
                model.hf.config.save_pretrained(folder)
                model.processor.save_pretrained(folder)
                bridge = TransformerBridge.boot_transformers(folder, hf_model=model.hf,
                                                             tokenizer=AutoTokenizer.from_pretrained(folder),
                                                             device=str(model.device), dtype=model.dtype)
            names = [f"blocks.{i}.hook_resid_post" for i in all_layers]

            @torch.inference_mode()
            def tl_all():
                for b in batches:
                    bridge.run_with_cache(b.input_ids, names_filter=lambda n: n in names)

            @torch.inference_mode()
            def tl_one():
                for b in batches:
                    bridge.run_with_cache(b.input_ids, names_filter=lambda n: n == f"blocks.{L}.hook_resid_post",
                                          stop_at_layer=L + 1)

            record("TransformerLens run_with_cache, all resid_post", timed(tl_all, args.repeats))
            record(f"TransformerLens run_with_cache layer {L}, stop", timed(tl_one, args.repeats))
        except Exception as e:  # report, don't lose the other numbers
            rows["transformer_lens_error"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print("TransformerLens failed:", rows["transformer_lens_error"]["error"])
    plain_tps = rows["plain forward (logits_to_keep=1)"]["tokens_per_s"]
    stop_tps = rows[f"forward stopped after layer {L}"]["tokens_per_s"]
    one = rows[f"interp.capture layer {L}, all positions"]["tokens_per_s"]
    allc = rows["interp.capture all layers, last pos, +cache"]["tokens_per_s"]
    ratios = {"one_layer_vs_stopped": one / stop_tps, "one_layer_vs_plain": one / plain_tps,
              "all_layers_cached_vs_plain": allc / plain_tps,
              "all_layers_all_positions_vs_plain": rows["interp.capture all layers, all positions"]["tokens_per_s"] / plain_tps}
    print("ratios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "ratios": ratios, "n_tokens": n_tokens,
                                              "args": vars(args), "torch": torch.__version__,
                                              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
                                             indent=1))


if __name__ == "__main__":
    main()
