"""Benchmark: interp's LoRA training step against a plain PEFT + transformers loop, same loss, same batches.

A MedGemma-4B-shaped Gemma3ForConditionalGeneration (random weights, bf16) with adapters on layers 15-19:
training pairs/s and peak GPU memory, with images (one 896 px image per pair) and text only.
``--smoke`` shrinks everything so it runs on a CPU in seconds. Usage on a GPU machine:

    python bench/lora.py --out bench_lora.json

Values, before any timing, per mode and on a mixed group of image and text pairs: one accumulation group
through interp's fast path exactly as the timed runs do it (cache filled, fused passes, checkpointing on the
GPU) against the plain PEFT forward with all-position logits, same adapter (LoRA B randomised so that every
LoRA matrix has a gradient, dropout off). Checked: each pair's loss (relative difference; bf16 <= 1e-2,
float32 <= 1e-4), and per LoRA parameter the gradient's relative difference ||g - g_ref|| / ||g_ref||
(bf16 <= 0.3, float32 <= 1e-3) and 1 - cosine (bf16 <= 0.05, float32 <= 1e-5). bf16 gradients through 20
layers of a random-weight model differ by ~0.1 between two correct paths; a wrong path is off by ~1. The
fast path must run (not fall back to the plain forward).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Checks, finish, recorded_warnings  # noqa: E402

import interp  # noqa: E402
from interp import lora as L  # noqa: E402
from interp.data import ParaphrasePair  # noqa: E402
from interp.layers import layers_pattern_of, lora_config  # noqa: E402
from interp.models import GEMMA_CHAT_TEMPLATE, tiny_tokenizer  # noqa: E402

REPORT = ("Findings: Moderate right pleural effusion with adjacent basilar atelectasis; heart size normal and no "
          "pneumothorax. Impression: Moderate right pleural effusion. ")
TARGET_STEADY = 4.0  # issue 10: >= 4x plain PEFT in steady state, at no more peak memory
TOL = {"loss": {"bf16": 1e-2, "fp32": 1e-4}, "grad_rel": {"bf16": 0.3, "fp32": 1e-3},
       "grad_1_minus_cos": {"bf16": 0.05, "fp32": 1e-5}}
QUESTIONS = [("Is there a pleural effusion?", "is there fluid around the lung?"),
             ("Is the cardiac silhouette enlarged?", "is the heart too big?"),
             ("Is there a pneumothorax?", "can a collapsed lung be ruled out?"),
             ("Is there focal consolidation?", "are there signs of pneumonia?")]


def build_model(smoke: bool, device: str, dtype: torch.dtype) -> interp.Model:
    """MedGemma-4B's shapes (or toy ones with ``smoke``), random weights, wrapped as an interp Model."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tok = tiny_tokenizer(GEMMA_CHAT_TEMPLATE)
    tid = tok.convert_tokens_to_ids
    if smoke:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, sliding_window=16, vocab_size=2048)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=56, patch_size=14)
        mm_tokens = 4
    else:  # google/medgemma-4b-it
        text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=256, sliding_window=1024, vocab_size=262208,
                    rope_scaling={"rope_type": "linear", "factor": 8.0})
        vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=896, patch_size=14)
        mm_tokens = 256
    text.update(max_position_embeddings=131072, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens,
                       boi_token_index=tid("<start_of_image>"), eoi_token_index=tid("<end_of_image>"),
                       image_token_index=tid("<image_soft_token>"), pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        hf = Gemma3ForConditionalGeneration._from_config(cfg, dtype=dtype)
    size = vision["image_size"]
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": size, "width": size}),
                           tokenizer=tok, image_seq_length=mm_tokens, chat_template=GEMMA_CHAT_TEMPLATE)
    return interp.Model(hf=hf.eval(), tokenizer=tok, processor=proc, name="medgemma-4b-shaped" if not smoke
                        else "smoke", chat=True, answer_words=("Yes", "No"), source="bench")


FOLD = [False]  # interp's runs: `_row_dropout(fold=...)`, set from --fold-dropout


def make_pairs(n: int, images: bool, context_tokens: int, folder: Path) -> list[ParaphrasePair]:
    """``n`` pairs: a chest-X-ray-like image each (or none) and a report padded to about ``context_tokens``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    if images:
        folder.mkdir(parents=True, exist_ok=True)
    context = (REPORT * max(1, context_tokens // 30))[: max(1, context_tokens) * 4]
    pairs = []
    for i in range(n):
        image = None
        if images:
            yy = np.mgrid[0:224, 0:224][0]
            arr = np.clip(60 + 0.6 * yy + rng.normal(0, 20, (224, 224)), 0, 255).astype("uint8")
            image = str(folder / f"cxr_{i}.png")
            Image.fromarray(np.stack([arr] * 3, -1)).save(image)
        a, b = QUESTIONS[i % len(QUESTIONS)]
        pairs.append(ParaphrasePair(f"b{i}", f"{a} (case {i})", f"{b} (case {i})", answer=("yes", "no")[i % 2],
                                    image=image, same_polarity="ruled out" not in b, context=context))
    return pairs


def _sync(model: interp.Model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _peak_reset(model: interp.Model) -> None:
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(model.device)


def _peak(model: interp.Model) -> float:
    return torch.cuda.max_memory_allocated(model.device) / 2**30 if model.device.type == "cuda" else float("nan")


def _train_loop(model: interp.Model, params: list[torch.Tensor], n: int, group_backward, *, epochs: int,
                grad_accum: int, lr: float, seed: int = 0) -> dict[str, Any]:
    """The optimisation `train_lora` runs: shuffled pairs, groups of ``grad_accum``, clipping, AdamW."""
    opt = torch.optim.AdamW(params, lr=lr)
    losses, epoch_s = [], []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
        _sync(model)
        t0 = time.perf_counter()
        for s in range(0, n, grad_accum):
            for p in params:
                p.grad = None
            losses += group_backward(order[s:s + grad_accum], epoch)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        _sync(model)
        epoch_s.append(time.perf_counter() - t0)
    return {"epoch_seconds": epoch_s, "losses": losses}


def run_interp(model: interp.Model, pairs: list[ParaphrasePair], layers: list[int], *, fuse_tokens: int,
               checkpoint: bool, **kw) -> dict[str, Any]:
    """interp's path (what `train_lora` runs): the residual stream entering layer lo cached once per example,
    layers lo..end only, answer-position logits, an accumulation group fused into passes of ``fuse_tokens``."""
    pm = L._peft_wrap(model, layers, r=16, alpha=32, dropout=0.05, target_modules=L.DEFAULT_TARGET_MODULES, seed=0)
    try:
        trainer = L._Trainer(pm, layers[0], dict(ce_weight=1.0, kl_weight=1.0, kl_space="yes_no"), fast=True,
                             cache="auto", fuse_tokens=fuse_tokens, checkpoint=checkpoint)
        _peak_reset(model)
        _sync(model)
        t0 = time.perf_counter()
        items = [((i, side), p.prompt_a() if side == "a" else p.prompt_b()) for i, p in enumerate(pairs)
                 for side in ("a", "b")]
        trainer.runner.prefill(items, rows_per_pass=8)
        _sync(model)
        prefill_s = time.perf_counter() - t0
        for i in range(layers[0], pm.n_layers):
            trainer.runner.layers[i].train()

        def group_backward(group: list[int], epoch: int) -> list[float]:
            micro = [([pairs[i]], [i], [L._micro_seed(0, epoch, i)]) for i in group]
            parts = trainer.backward_group(micro, len(group))
            return torch.stack([q.total.detach() for q in parts]).tolist()

        with L._row_dropout(pm.hf, trainer.dropout_rows, fold=FOLD[0]):
            out = _train_loop(model, trainer.params, len(pairs), group_backward, **kw)
        out["epoch_seconds"][0] += prefill_s  # the first epoch pays for filling the cache
        out.update(peak_gib=_peak(model), cache_gib=trainer.runner.cache_bytes / 2**30, path=trainer.runner.kind,
                   prefill_seconds=prefill_s)
        return out
    finally:
        pm.hf.eval()
        pm.hf.unload()


def run_plain(model: interp.Model, pairs: list[ParaphrasePair], layers: list[int], **kw) -> dict[str, Any]:
    """The plain loop: PEFT model, full forward with all-position logits, the answer position gathered,
    one pair per forward and backward (batch 1 x accumulation, as the study trained)."""
    from peft import get_peft_model

    cfg = lora_config(layers, layers_pattern=layers_pattern_of(model.layers_path), r=16, alpha=32, dropout=0.05)
    with torch.random.fork_rng(devices=[model.device.index or 0] if model.device.type == "cuda" else []):
        torch.manual_seed(0)
        peft = get_peft_model(model.hf, cfg)
    try:
        peft.train()
        # encoded once up front: tokenising and image preprocessing are left out of the plain loop's time
        batches = [model.encode([p.prompt_a(), p.prompt_b()]) for p in pairs]
        batches = [(b.inputs, b.last_index) for b in batches]
        yes_no = model.answer_ids
        params = [p for p in peft.parameters() if p.requires_grad]

        def group_backward(group: list[int], epoch: int) -> list[float]:
            losses = []
            for i in group:
                torch.manual_seed(L._micro_seed(0, epoch, i))
                inputs, last = batches[i]
                logits = peft(**inputs, use_cache=False).logits  # [2, pos, vocab]
                at = logits[torch.arange(2, device=logits.device), last.to(logits.device)].float()
                ta, tb, inv = L._targets([pairs[i]], yes_no)
                loss = L.pair_loss(at[:1], at[1:], ta, tb, inv, yes_no).total
                (loss / len(group)).backward()
                losses.append(loss.detach())
            return torch.stack(losses).tolist()

        _peak_reset(model)
        out = _train_loop(model, params, len(pairs), group_backward, **kw)
        out.update(peak_gib=_peak(model), cache_gib=0.0, path="plain")
        return out
    finally:
        peft.eval()
        peft.unload()


def check_loss_and_grads(model: interp.Model, pairs: list[ParaphrasePair], layers: list[int], checks: Checks,
                         label: str, *, group: int, fuse_tokens: int, checkpoint: bool) -> dict[str, Any]:
    """One accumulation group, fast path vs plain PEFT forward: per-pair loss and every LoRA gradient."""
    tol = {k: v["fp32" if model.dtype == torch.float32 else "bf16"] for k, v in TOL.items()}
    pm = L._peft_wrap(model, layers, r=16, alpha=32, dropout=0.0, target_modules=L.DEFAULT_TARGET_MODULES, seed=0)
    try:
        with torch.no_grad():
            torch.manual_seed(1)
            for n, p in pm.hf.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        names = {id(p): n for n, p in pm.hf.named_parameters()}
        cfg = dict(ce_weight=1.0, kl_weight=1.0, kl_space="yes_no")
        trainer = L._Trainer(pm, layers[0], cfg, fast=True, cache=True, fuse_tokens=fuse_tokens,
                             checkpoint=checkpoint)
        checks.require(f"{label}: fast path ran", trainer.runner.kind != "generic",
                       f"runner kind {trainer.runner.kind!r}")
        chosen = pairs[:group]
        items = [((i, side), p.prompt_a() if side == "a" else p.prompt_b()) for i, p in enumerate(chosen)
                 for side in ("a", "b")]
        trainer.runner.prefill(items, rows_per_pass=8)  # as the timed run: the second step reads the cache
        for i in range(layers[0], pm.n_layers):
            trainer.runner.layers[i].train()
        micro = [([p], [i], [L._micro_seed(0, 0, i)]) for i, p in enumerate(chosen)]
        with L._row_dropout(pm.hf, trainer.dropout_rows, fold=FOLD[0]):
            fast_loss = torch.stack([q.total.detach() for q in trainer.backward_group(micro, len(chosen))])
        fast_grads = [p.grad.detach().float().clone() for p in trainer.params]
        for p in trainer.params:
            p.grad = None
        plain_loss = []
        for p in chosen:  # the plain loop: one pair per PEFT forward, all-position logits
            batch = model.encode([p.prompt_a(), p.prompt_b()])
            logits = pm.hf(**batch.inputs, use_cache=False).logits
            at = logits[torch.arange(2, device=logits.device), batch.last_index.to(logits.device)].float()
            ta, tb, inv = L._targets([p], model.answer_ids)
            loss = L.pair_loss(at[:1], at[1:], ta, tb, inv, model.answer_ids).total
            (loss / len(chosen)).backward()
            plain_loss.append(loss.detach())
        plain_grads = [p.grad.detach().float() for p in trainer.params]
        labels = [names[id(p)].removeprefix("base_model.model.") for p in trainer.params]
        plain_loss = torch.stack(plain_loss)
        checks.rows(f"{label}: loss per pair (fast vs plain PEFT)", fast_loss[:, None], plain_loss[:, None],
                    tol["loss"], labels=[p.id for p in chosen])
        rel, cos, max_abs = [], [], 0.0
        for a, b in zip(fast_grads, plain_grads, strict=True):
            d = a - b
            max_abs = max(max_abs, float(d.abs().max()))
            rel.append(float(d.norm() / b.norm().clamp_min(1e-30)))
            cos.append(float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30)))
        checks.cases(f"{label}: LoRA gradient rel diff", rel, tol["grad_rel"], max_abs=max_abs, labels=labels)
        checks.cases(f"{label}: LoRA gradient 1 - cosine", 1 - np.asarray(cos), tol["grad_1_minus_cos"],
                     labels=labels)
        zero = [n for n, g in zip(labels, plain_grads, strict=True) if not g.abs().max() > 0]
        checks.require(f"{label}: every LoRA gradient nonzero", not zero, f"zero gradients: {zero[:3]}")
        out = {"fast_path": trainer.runner.kind, "pairs": len(chosen), "loss_fast": fast_loss.tolist(),
               "loss_plain": plain_loss.tolist(), "grad_max_rel": max(rel), "grad_min_cosine": min(cos),
               "first_loss_rel_diff": float((fast_loss[0] - plain_loss[0]).abs() / plain_loss[0].abs())}
        print(f"[{label}] check ({out['fast_path']} path): loss rel diff {out['first_loss_rel_diff']:.1e}, "
              f"gradient max rel diff {out['grad_max_rel']:.2e}, min cosine {out['grad_min_cosine']:.5f}",
              flush=True)
        return out
    finally:
        for p in pm.hf.parameters():
            p.grad = None
        pm.hf.eval()
        pm.hf.unload()


def steady(run: dict[str, Any], n: int) -> float:
    """Pairs/s after the first epoch (interp's cache is full by then)."""
    return n / float(np.mean(run["epoch_seconds"][1:] or run["epoch_seconds"]))


def overall(run: dict[str, Any], n: int) -> float:
    """Pairs/s over all epochs, the first one (which fills interp's cache) included."""
    return n * len(run["epoch_seconds"]) / sum(run["epoch_seconds"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (a few seconds)")
    ap.add_argument("--pairs", type=int, default=48, help="training pairs (micro-batches of one pair)")
    ap.add_argument("--epochs", type=int, default=2, help="epoch 1 fills interp's cache; later ones are steady")
    ap.add_argument("--grad-accum", type=int, default=8)
    ap.add_argument("--layers", default="15-19", help="adapted layers, e.g. 15-19")
    ap.add_argument("--context-tokens", type=int, default=24, help="report length before each question")
    ap.add_argument("--modes", default="images,text", help="comma list of: images, text, mixed")
    ap.add_argument("--fuse-tokens", type=int, default=8192, help="interp: tokens per fused forward pass")
    ap.add_argument("--no-checkpointing", action="store_true", help="interp: keep all upper-layer activations")
    ap.add_argument("--unfused", action="store_true", help="also time interp with one pair per forward pass")
    ap.add_argument("--fold-dropout", choices=["default", "on", "off"], default="default",
                    help="interp: fold the LoRA dropout into lora_A (default: as train_lora does in bf16: off)")
    ap.add_argument("--fold-min-tokens", type=int, default=None,
                    help="interp: fold the LoRA dropout into lora_A on passes of at least this many tokens "
                         "(default: interp's own threshold; a huge value: never)")
    ap.add_argument("--out", help="write the JSON record here")
    args = ap.parse_args(argv)
    FOLD[0] = {"default": L._fold_default(qlora=False), "on": True, "off": False}[args.fold_dropout]
    if args.fold_min_tokens is not None:
        from interp import lora as interp_lora

        interp_lora._DroppedA.FOLD_MIN_TOKENS = args.fold_min_tokens
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lo, hi = (1, 3) if args.smoke else map(int, args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    if args.smoke:
        args.pairs, args.grad_accum = min(args.pairs, 8), min(args.grad_accum, 4)
    t0 = time.perf_counter()
    model = build_model(args.smoke, device, dtype)
    print(f"model: {model} built in {time.perf_counter() - t0:.1f}s; "
          f"{sum(p.numel() for p in model.hf.parameters()) / 1e9:.2f}B params; adapted layers {lo}-{hi}")
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")
    checks, warned = Checks(), []
    rows, results = [], {"model": repr(model), "dtype": str(dtype), "layers": layers, "weights_gib": weights_gib,
                         "tolerances": TOL, "checks_detail": {}, "modes": {}, "warnings": warned,
                         "fold_dropout": FOLD[0]}
    checkpoint = not args.no_checkpointing and device == "cuda"
    with tempfile.TemporaryDirectory() as tmp, recorded_warnings(warned):
        all_pairs = {mode: make_pairs(args.pairs, mode == "images", args.context_tokens, Path(tmp) / mode)
                     for mode in ("images", "text")}
        all_pairs["mixed"] = [dataclasses.replace(p, id=f"{p.id}-{'image' if p.image else 'text'}")
                              for ab in zip(all_pairs["images"], all_pairs["text"], strict=True) for p in ab][:args.pairs]
        modes = args.modes.split(",")
        for mode in [*modes, *(["mixed"] if "mixed" not in modes else [])]:  # a mixed group is always checked
            results["checks_detail"][mode] = check_loss_and_grads(
                model, all_pairs[mode], layers, checks, mode, group=args.grad_accum, fuse_tokens=args.fuse_tokens,
                checkpoint=checkpoint)
        for mode in modes:
            pairs = all_pairs[mode]
            tokens = [model.encode([p.prompt_a()]).lengths.item() for p in pairs[:2]]
            kw = dict(epochs=args.epochs, grad_accum=args.grad_accum, lr=2e-4)
            fast = run_interp(model, pairs, layers, fuse_tokens=args.fuse_tokens, checkpoint=checkpoint, **kw)
            checks.require(f"{mode}: timed run took the fast path", fast["path"] != "generic",
                           f"runner kind {fast['path']!r}")
            unfused = run_interp(model, pairs, layers, fuse_tokens=0, checkpoint=False, **kw) if args.unfused \
                else None
            plain = run_plain(model, pairs, layers, **kw)
            n = len(pairs)
            res = {"tokens_per_sequence": tokens[0], "interp": fast, "plain": plain,
                   "speedup_steady": steady(fast, n) / steady(plain, n),
                   "speedup_overall": overall(fast, n) / overall(plain, n),
                   "first_loss": {"interp": fast["losses"][0], "plain": plain["losses"][0]}}
            res["targets"] = {"steady_speedup": {"value": res["speedup_steady"], "target": TARGET_STEADY,
                                                 "met": res["speedup_steady"] >= TARGET_STEADY},
                              "peak_memory": {"value": fast["peak_gib"], "target": plain["peak_gib"],
                                              "met": not fast["peak_gib"] > plain["peak_gib"]}}
            results["modes"][mode] = res
            if unfused:
                res["interp_unfused"] = unfused
            for name, r in (("plain PEFT loop", plain), ("interp 1 pair/pass", unfused), ("interp", fast)):
                if r is None:
                    continue
                rows.append((mode, name, tokens[0], overall(r, n), steady(r, n), r["peak_gib"], r["cache_gib"]))
            print(f"[{mode}] interp ({fast['path']} path) vs plain: {res['speedup_steady']:.2f}x steady "
                  f"(target {TARGET_STEADY}x: {'met' if res['targets']['steady_speedup']['met'] else 'NOT met'}), "
                  f"{res['speedup_overall']:.2f}x overall; peak {fast['peak_gib']:.2f} vs {plain['peak_gib']:.2f} "
                  f"GiB", flush=True)
    print(f"\n{'mode':<7}{'loop':<20}{'tok/seq':>8}{'pairs/s all':>13}{'pairs/s steady':>16}{'peak GiB':>10}"
          f"{'cache GiB':>11}")
    for mode, name, tok, o, s, peak, cache in rows:
        print(f"{mode:<7}{name:<20}{tok:>8}{o:>13.2f}{s:>16.2f}{peak:>10.2f}{cache:>11.3f}")
    print(f"(weights: {weights_gib:.2f} GiB; a pair = 2 phrasings; epoch 1 of interp also fills its cache)")
    results = {k: _finite(v) for k, v in results.items()}
    return finish("lora", args, results, checks, args.out)


def _finite(v: Any) -> Any:
    """NaN/inf (no GPU memory on the CPU) as null, so that the JSON stays strict."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
