"""Benchmark: residual-stream capture vs plain and stopped forwards and TransformerLens, values checked.

    python bench/capture.py --out capture.json            # on a GPU: MedGemma-4B-shaped model, bf16, ragged prompts
    python bench/capture.py --no-ragged --out fixed.json  # 16 x 512-token prompts per batch instead
    python bench/capture.py --smoke                       # tiny shapes on the CPU (seconds)

Inputs: by default (``--ragged``) 160 prompts of 40-900 tokens drawn uniformly, in the order drawn (not
sorted), batch 16, so about 45% of each padded batch is padding; ``--no-ragged`` gives 16 x ~512 tokens per
batch. Tokens/s count real (non-padding) tokens. Every interp.capture run (warm-up and timed runs) is
compared row by row with two references: the same batches through a plain forward with hooks on every
decoder layer, and each prompt run alone. A row is wrong when ||row - ref|| / ||ref|| exceeds the tolerance
(bf16: 0.05; float32: 1e-3) or its (prompt, position) is not the one expected; any wrong row is a FAIL.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import medgemma_shape  # noqa: E402
from common import Checks, finish, recorded_warnings, timed, tolerance  # noqa: E402

import interp  # noqa: E402
from interp.capture import StopForward, layer_output  # noqa: E402

TARGETS = {"one_layer_vs_stopped": 0.9, "all_layers_cached_vs_plain": 0.95}  # issue 10


class Reference:
    """Hidden states of the decoder layers from plain forwards with hooks: every position of ``keep`` layers,
    and the last position of every layer, per prompt (host memory, the model's dtype)."""

    def __init__(self, model: interp.Model, batches, keep: list[int]):
        n_layers = model.n_layers
        per_prompt: dict[int, list[torch.Tensor]] = {i: [] for i in keep}
        last, lengths = [], []
        with torch.inference_mode():
            for b in batches:
                outs: dict[int, torch.Tensor] = {}
                hooks = [model.layer(i).register_forward_hook(
                    lambda _m, _a, o, i=i, outs=outs: outs.__setitem__(i, layer_output(o))) for i in range(n_layers)]
                try:
                    model.hf(**b.inputs, use_cache=False, logits_to_keep=1)
                finally:
                    for h in hooks:
                        h.remove()
                lens = b.lengths.tolist()
                rows = torch.arange(len(lens), device=model.device)
                at = b.last_index.to(model.device)
                last.append(torch.stack([outs[i][rows, at] for i in range(n_layers)], 1).cpu())
                for i in keep:
                    h = outs[i].cpu()
                    per_prompt[i] += [h[j, :n] for j, n in enumerate(lens)]
                lengths += lens
        self.lengths = torch.tensor(lengths)
        self.last = torch.cat(last)  # [prompts, layers, d_model]
        self.flat = {i: torch.cat(v) for i, v in per_prompt.items()}  # [real tokens, d_model]
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)[:-1]])
        self.all_prompt = torch.repeat_interleave(torch.arange(len(lengths)), self.lengths)
        self.all_position = torch.arange(int(self.lengths.sum())) - self.offsets[self.all_prompt]


def check_capture(checks: Checks, name: str, acts: interp.Activations, layers: list[int], positions: str,
                  ref: Reference, tol: float) -> None:
    """Compare ``acts`` (captured ``layers`` at ``positions``) with ``ref``; rows at an unexpected (prompt,
    position) count as wrong too."""
    pi, pos = acts.prompt_index.long(), acts.position.long()
    if positions == "all":
        want_pi, want_pos = ref.all_prompt, ref.all_position
        layers = [i for i in layers if i in ref.flat]
    else:
        want_pi, want_pos = torch.arange(len(ref.lengths)), ref.lengths - 1
    if pi.shape != want_pi.shape:
        checks.fail(name, f"{pi.numel()} rows captured, {want_pi.numel()} expected")
        return
    misplaced = int(((pi != want_pi) | (pos != want_pos)).sum())
    outs, refs = [], []
    for i in layers:
        outs.append(acts[i])
        refs.append(ref.flat[i][ref.offsets[want_pi] + want_pos] if positions == "all" else ref.last[:, i])
    n = want_pi.numel()
    checks.rows(name, torch.cat(outs), torch.cat(refs), tol, extra_wrong=misplaced * len(layers),
                labels=lambda r: f"prompt {int(want_pi[r % n])} pos {int(want_pos[r % n])} layer {layers[r // n]}",
                note=f"{misplaced} rows at an unexpected (prompt, position)" if misplaced else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--out", default=None, help="write the JSON record here")
    ap.add_argument("--ragged", action=argparse.BooleanOptionalAction, default=True,
                    help="prompts of uniformly spread lengths (default); --no-ragged: fixed-length prompts")
    ap.add_argument("--prompts", type=int, default=160, help="ragged: number of prompts")
    ap.add_argument("--min-tokens", type=int, default=40, help="ragged: shortest prompt")
    ap.add_argument("--max-tokens", type=int, default=900, help="ragged: longest prompt")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512, help="fixed: tokens per prompt")
    ap.add_argument("--batches", type=int, default=8, help="fixed: number of batches")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", type=int, default=17)
    ap.add_argument("--tol", type=float, default=None, help="relative error per row (default: by dtype)")
    ap.add_argument("--no-alone", action="store_true", help="skip the reference of each prompt run alone")
    ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.tokens, args.batches, args.repeats, args.layer = 4, 48, 2, 1, 3
        args.prompts, args.min_tokens, args.max_tokens = 10, 14, 70
    model = medgemma_shape.build(smoke=args.smoke, device="cpu" if args.smoke else None)
    if args.ragged:
        lengths = medgemma_shape.ragged_lengths(args.prompts, args.min_tokens, args.max_tokens)
        prompts = medgemma_shape.prompts_of_lengths(model, lengths)
    else:
        prompts = medgemma_shape.long_prompts(model, args.batch * args.batches, args.tokens)
    n, bs = len(prompts), args.batch
    batches = [model.encode(prompts[i:i + bs]) for i in range(0, n, bs)]
    n_tokens = sum(int(b.lengths.sum()) for b in batches)
    padded = sum(int(b.input_ids.numel()) for b in batches)
    L, all_layers = args.layer, list(range(model.n_layers))
    tol = args.tol if args.tol is not None else tolerance("rows", model.dtype)
    rows: dict[str, dict] = {}
    checks, warned = Checks(), []

    def record(name: str, t, note: str = "", checked: bool = False) -> None:
        rows[name] = {**t.to_dict(), "tokens_per_s": n_tokens / t.median_s, "note": note, "value_checked": checked}
        print(f"{name:<46} {n_tokens / t.median_s:>10,.0f} tok/s  {note}", flush=True)

    print(f"{model!r}\nbatch={bs} prompts={n} real tokens={n_tokens} padded positions={padded} "
          f"({1 - n_tokens / padded:.0%} padding) ragged={args.ragged} tolerance={tol:g}", flush=True)

    keep = sorted({L, model.n_layers - 1})
    t = time.perf_counter()
    refs = {"batch": Reference(model, batches, keep)}
    if not args.no_alone:
        refs["alone"] = Reference(model, (model.encode([p]) for p in prompts), keep)
    print(f"references ({', '.join(refs)}) in {time.perf_counter() - t:.1f} s", flush=True)

    def checker(name: str, layers: list[int], positions: str):
        def check(acts: interp.Activations) -> None:
            for kind, ref in refs.items():
                check_capture(checks, f"{name} vs {kind}", acts, layers, positions, ref, tol)
        return check

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
        hs = [model.layer(i).register_forward_hook(lambda m, a, o: kept.append(layer_output(o))) for i in all_layers]
        try:
            for b in batches:
                kept.clear()
                model.hf(**b.inputs, use_cache=False, logits_to_keep=1)
        finally:
            for h in hs:
                h.remove()

    def cap(layers, positions, **kw):
        return lambda: interp.capture(model, prompts, layers=layers, positions=positions, batch_size=bs,
                                      progress=False, **kw)

    one_all = f"interp.capture layer {L}, all positions"
    one_last = f"interp.capture layer {L}, last position"
    cached = "interp.capture all layers, last pos, +cache"
    every = "interp.capture all layers, all positions"
    with recorded_warnings(warned):
        record("plain forward (logits_to_keep=1)", timed(plain, args.repeats))
        record(f"forward stopped after layer {L}", timed(stopped, args.repeats))
        record("forward + hooks keeping all resid_post", timed(hooks_all, args.repeats), "on device")
        record(one_all, timed(cap([L], "all"), args.repeats, check=checker(one_all, [L], "all")),
               "to host memory", True)
        record(one_last, timed(cap([L], "last"), args.repeats, check=checker(one_last, [L], "last")), "", True)
        with tempfile.TemporaryDirectory() as tmp:
            record(cached, timed(cap(all_layers, "last", cache=tmp, recompute=True), args.repeats,
                                 check=checker(cached, all_layers, "last")), "written to safetensors shards", True)
            rows[cached]["cache_bytes"] = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
            t = time.perf_counter()
            back = cap(all_layers, "last", cache=tmp)()
            rows["cache read-back (rerun)"] = {"seconds": time.perf_counter() - t, "value_checked": True}
            checker("cache read-back", all_layers, "last")(back)
            print(f"{'cache read-back (rerun)':<46} {rows['cache read-back (rerun)']['seconds']:.3f} s")
            del back
        record(every, timed(cap(all_layers, "all"), 1, check=checker(every, all_layers, "all")),
               f"to host memory; layers {keep} checked", True)
    if not args.no_tl:
        tl_rows(model, batches, L, all_layers, args.repeats, record, rows)

    tps = {k: v.get("tokens_per_s") for k, v in rows.items()}
    plain_tps, stop_tps = tps["plain forward (logits_to_keep=1)"], tps[f"forward stopped after layer {L}"]
    ratios = {"one_layer_vs_stopped": tps[one_all] / stop_tps, "one_layer_last_vs_stopped": tps[one_last] / stop_tps,
              "one_layer_vs_plain": tps[one_all] / plain_tps, "all_layers_cached_vs_plain": tps[cached] / plain_tps,
              "all_layers_all_positions_vs_plain": tps[every] / plain_tps}
    targets = {k: {"value": ratios[k], "target": v, "met": ratios[k] >= v} for k, v in TARGETS.items()}
    print("\nratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("targets: " + ", ".join(f"{k} {v['value']:.3f} >= {v['target']}: {'met' if v['met'] else 'NOT met'}"
                                  for k, v in targets.items()))
    finish("capture", args, {"model": repr(model), "dtype": str(model.dtype), "n_prompts": n, "n_tokens": n_tokens,
                             "padded_positions": padded, "prompt_lengths": refs["batch"].lengths.tolist(),
                             "tolerance": tol, "references": list(refs), "rows": rows, "ratios": ratios,
                             "targets": targets, "warnings": warned}, checks, args.out)


def tl_rows(model, batches, L, all_layers, repeats, record, rows) -> None:
    """TransformerLens' TransformerBridge on the same batches (a speed baseline only: values not checked)."""
    try:
        os.environ.setdefault("PIP_NO_INDEX", "1")
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as folder:
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

        record("TransformerLens run_with_cache, all resid_post", timed(tl_all, repeats), "baseline, not checked")
        record(f"TransformerLens run_with_cache layer {L}, stop", timed(tl_one, repeats), "baseline, not checked")
    except Exception as e:  # a baseline that fails to boot loses its rows, not the run
        rows["transformer_lens_error"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print("TransformerLens failed:", rows["transformer_lens_error"]["error"])


if __name__ == "__main__":
    main()
