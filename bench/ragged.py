"""Benchmark: length-aware batching in interp.capture on a ragged corpus, against batches in the caller's order.

    python bench/ragged.py --out ragged.json   # on a GPU: MedGemma-4B-shaped model, bf16 (about 4 minutes)
    python bench/ragged.py --quick             # tiny shapes on the CPU (about a minute)

Corpora, in the order drawn (nobody sorted them): "text", ``--prompts`` prompts whose lengths are spread
uniformly over ``--min-tokens``-``--max-tokens`` (40-1000); "images", ``--image-prompts`` prompts of 40-600 text
tokens, every other one with a generated chest-X-ray-like image (256 image tokens each on MedGemma), each image
asked in ``--phrasings-per-image`` prompts (a paraphrase corpus asks several questions of one image); "distinct
images", half as many prompts, every image different (reported, no target: the vision tower's work then grows
with the corpus whatever the batching). Each corpus is captured at ``--layer`` with positions "all" and "last",
four ways:
  caller order   sort=False, batch_size=--batch (16 on a GPU), no token cap: the batches capture formed before
  sorted         sort=True, the same batch_size, the default batch_tokens: what sorting alone gives
  default        capture's defaults (sort=True, at most 64 prompts and 16384 padded tokens per batch on a GPU;
                 a text-only call packs short prompts end to end beside long ones where that costs less)
  packed/not packed   the defaults with pack=True / pack=False
Tokens/s count real (non-padding) tokens, medians of ``--repeats`` timed runs after a warm-up run of each config;
the configs' timed runs are interleaved, round by round (`common.interleaved`), so that a drift of the machine
lands on all of them alike (``--sequential``: each config's runs back to back, as rounds 2-7 ran). The
caller-order runs after its warm-up are also checked against it, bit for bit. Every run's values are checked: each path against the caller-order
one, row by row, and on a sample of prompts (``--alone``) against that prompt run alone through a plain forward
with a hook. A row beyond the tolerance (common.tolerance: bf16 0.05, float32 1e-3) or at an unexpected
(prompt, position) is a FAIL.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import medgemma_shape  # noqa: E402
from common import Checks, finish, interleaved, recorded_warnings, tolerance  # noqa: E402

import interp  # noqa: E402
from interp import _imageworkers  # noqa: E402
from interp.capture import layer_output  # noqa: E402
from interp.models import ImageCache, Prompt  # noqa: E402

capture_mod = importlib.import_module("interp.capture")  # the module; `interp.capture` is the function
TARGET = 1.5  # issue 14: real tokens/s of the default over caller-order batches


def images(n: int, size: int, seed: int = 0) -> list:
    """``n`` grey 'chest X-rays' (gradient plus a blob and noise) as PIL images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        cx, cy = rng.integers(size // 5, 4 * size // 5, size=2)
        img = 40 + 0.15 * yy * 768 / size + 90 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (size / 12) ** 2))
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype("uint8")
        out.append(Image.fromarray(np.stack([img] * 3, -1)))
    return out


def image_corpora(model: interp.Model, n: int, phrasings: int, lo: int, hi: int, side: int) -> dict[str, list]:
    """The two image corpora, in the order drawn: "images", ``n`` prompts of ``lo``-``hi`` text tokens, every
    other one with an image, each image shown in ``phrasings`` of them (shuffled); "distinct images", the first
    half of those prompts, every image different."""
    short = medgemma_shape.prompts_of_lengths(model, medgemma_shape.ragged_lengths(n, lo, hi, seed=1), seed=1)
    n_img = len(short) // 2  # prompts with an image: the odd ones
    pictures = images(max(1, n_img // phrasings), side)
    order = np.random.default_rng(2).permutation(np.arange(n_img) % len(pictures))  # image of the k-th image prompt
    distinct = short[: len(short) // 2]
    own = images(len(distinct) // 2, side, seed=3)
    return {"images": [Prompt(q, pictures[order[k // 2]] if k % 2 else None) for k, q in enumerate(short)],
            "distinct images": [Prompt(q, own[k // 2] if k % 2 else None) for k, q in enumerate(distinct)]}


class Padding:
    """Counts the prompts, padded positions and forward passes of every batch capture runs."""

    def __init__(self):
        self.real = capture_mod._run_hooked
        self.batches = self.padded = 0
        capture_mod._run_hooked = self

    def __call__(self, model, batch, *a, **k):
        self.batches += 1
        self.padded += int(batch.input_ids.numel())
        return self.real(model, batch, *a, **k)

    def reset(self) -> tuple[int, int]:
        out = (self.batches, self.padded)
        self.batches = self.padded = 0
        return out


def alone(model: interp.Model, prompts: list, index: list[int], layer: int) -> dict[int, torch.Tensor]:
    """Per sampled prompt, ``[pos, d_model]`` of ``layer`` from a plain forward of that prompt alone."""
    out = {}
    with torch.inference_mode():
        for k in index:
            kept: dict[int, torch.Tensor] = {}
            h = model.layer(layer).register_forward_hook(
                lambda _m, _a, o, kept=kept: kept.__setitem__(0, layer_output(o)[0]))
            try:
                model.hf(**model.encode([prompts[k]]).inputs, use_cache=False, logits_to_keep=1)
            finally:
                h.remove()
            out[k] = kept[0].float().cpu()
    return out


def check(checks: Checks, name: str, acts: interp.Activations, ref: interp.Activations | None,
          alone_ref: dict[int, torch.Tensor], layer: int, positions: str, tol: float) -> None:
    if ref is not None:
        same = all(torch.equal(getattr(acts, k), getattr(ref, k)) for k in ("prompt_index", "position", "token_id"))
        checks.require(f"{name}: rows where caller order has them", same,
                       "prompt_index/position/token_id differ from the caller-order capture")
        if same:
            checks.rows(f"{name} vs caller order", acts[layer], ref[layer], tol,
                        labels=lambda r: f"prompt {int(ref.prompt_index[r])} pos {int(ref.position[r])}")
    got, want, labels = [], [], []
    for k, rows in alone_ref.items():
        m = acts.prompt_index == k
        pos = acts.position[m]
        expected = torch.arange(rows.shape[0]) if positions == "all" else torch.tensor([rows.shape[0] - 1])
        if not torch.equal(pos, expected):
            checks.fail(f"{name} vs alone", f"prompt {k}: positions {pos.tolist()[:8]} ... expected "
                                            f"{expected.tolist()[:8]} ...", tol)
            return
        got.append(acts[layer][m])
        want.append(rows[expected])
        labels += [f"prompt {k} pos {int(p)}" for p in pos]
    checks.rows(f"{name} vs alone", torch.cat(got), torch.cat(want), tol, labels=labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", "--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--out", default=None, help="write the JSON record here")
    ap.add_argument("--prompts", type=int, default=512, help="text corpus: number of prompts")
    ap.add_argument("--image-prompts", type=int, default=128, help="image corpus: number of prompts (half with one)")
    ap.add_argument("--phrasings-per-image", type=int, default=4, help="image corpus: prompts that show each image")
    ap.add_argument("--min-tokens", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=None, help="caller order's batch_size (default: the old default, "
                                                            "16 on a GPU, 8 on the CPU)")
    ap.add_argument("--layer", type=int, default=17)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--alone", type=int, default=16, help="prompts per corpus checked against a forward alone")
    ap.add_argument("--tol", type=float, default=None, help="relative error per row (default: by dtype)")
    ap.add_argument("--corpora", default="text,images,distinct images",
                    help="which corpora to run, comma-separated")
    ap.add_argument("--without-sorted", action="store_true", help="skip the 'sorted' runs (a sweep's time)")
    ap.add_argument("--without-packed", action="store_true",
                    help="skip the 'packed / not packed' runs (the default's other choice of pack=)")
    ap.add_argument("--sequential", action="store_true",
                    help="time each config's runs back to back (as rounds 2-7 did) instead of interleaving the "
                         "configs' runs round by round")
    ap.add_argument("--overheads", default="",
                    help="a sweep: also run the default with these values of capture.BATCH_OVERHEAD_TOKENS (the fixed "
                         "cost per forward pass the planner weighs against padding), comma-separated; OxT also sets "
                         "batch_tokens=T")
    ap.add_argument("--image-threads", action="store_true",
                    help="preprocess images on threads, not in worker processes (the default on a GPU)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.image_prompts, args.min_tokens, args.max_tokens = 96, 24, 20, 400
        args.layer, args.repeats, args.alone = 3, 1, 6
    model = medgemma_shape.build(smoke=args.quick, device="cpu" if args.quick else None)
    cuda = model.device.type == "cuda"
    bs = args.batch or (16 if cuda else 8)
    # image worker processes start in the background on first use, and the first images of a session go to
    # threads meanwhile: wait for them here, so that every timed run preprocesses alike (both orders)
    if args.image_threads:
        ImageCache.workers = False
    workers = (_imageworkers.workers() if not args.image_threads and ImageCache(model)._use_workers()
               and _imageworkers.pool(wait=True) is not None else 0)
    print(f"image preprocessing: {f'{workers} worker processes' if workers else 'threads'}", flush=True)
    L = args.layer
    tol = args.tol if args.tol is not None else tolerance("rows", model.dtype)
    text = medgemma_shape.prompts_of_lengths(model, medgemma_shape.ragged_lengths(args.prompts, args.min_tokens,
                                                                                  args.max_tokens))
    corpora = {"text": text, **image_corpora(model, args.image_prompts, args.phrasings_per_image, args.min_tokens,
                                             min(600, args.max_tokens), 56 if args.quick else 768)}
    wanted = [c.strip() for c in args.corpora.split(",") if c.strip()]
    if unknown := [c for c in wanted if c not in corpora]:
        ap.error(f"--corpora: unknown {unknown}; choose from {list(corpora)}")
    corpora = {c: corpora[c] for c in wanted}
    device_kind = "cuda" if cuda else "cpu"
    planner_overhead = capture_mod.BATCH_OVERHEAD_TOKENS[device_kind]
    configs = {"caller order": dict(sort=False, batch_size=bs, batch_tokens=10**9),
               "sorted": dict(batch_size=bs, pack=False), "default": {}}
    if not args.without_packed:  # the other choice of the default's, per corpus: packed with images, not for text
        configs["packed / not packed"] = "other"
    if args.without_sorted:
        del configs["sorted"]

    for v in (v.strip() for v in args.overheads.split(",") if v.strip()):
        o, _, t = v.partition("x")
        configs[f"default, overhead {o}" + (f", batch_tokens {t}" if t else "")] = \
            {"_overhead": int(o), **({"batch_tokens": int(t)} if t else {})}
    print(f"planner overhead per forward pass: {planner_overhead} tokens", flush=True)
    print(f"{model!r}\ncaller-order batch_size={bs}; corpora: " + ", ".join(f"{k} {len(v)} prompts"
                                                                          for k, v in corpora.items()), flush=True)
    checks, warned, rows = Checks(), [], {}
    counter = Padding()
    rng = np.random.default_rng(0)
    with recorded_warnings(warned):
        for cname, prompts in corpora.items():
            t = time.perf_counter()
            sample = sorted(set(rng.choice(len(prompts), size=min(args.alone, len(prompts)), replace=False).tolist()))
            ref_alone = alone(model, prompts, sample, L)
            print(f"{cname}: reference of {len(sample)} prompts alone in {time.perf_counter() - t:.1f} s", flush=True)
            n_tokens = None
            for positions in ("all", "last"):
                held: dict[str, interp.Activations] = {}  # the caller-order result (its warm-up run)
                plans: dict[str, tuple[int, int]] = {}  # batches and padded positions of each config's runs
                runs, checkers = {}, {}
                with_images = any(getattr(q, "image", None) is not None for q in prompts)
                corpus_configs = {c: {"pack": with_images} if kw == "other" else kw for c, kw in configs.items()}
                for config, kw in corpus_configs.items():
                    name = f"{cname}, positions={positions}, {config}"

                    def run(kw=kw, positions=positions, prompts=prompts, name=name, plans=plans):
                        kw = dict(kw)
                        capture_mod.BATCH_OVERHEAD_TOKENS[device_kind] = kw.pop("_overhead", planner_overhead)
                        counter.reset()
                        try:
                            return interp.capture(model, prompts, layers=[L], positions=positions, progress=False,
                                                  **kw)
                        finally:
                            capture_mod.BATCH_OVERHEAD_TOKENS[device_kind] = planner_overhead
                            plans[name] = counter.reset()  # the plan is fixed: every run counts the same

                    def checked(acts, name=name, positions=positions, held=held, ref_alone=ref_alone):
                        check(checks, name, acts, held.get("ref"), ref_alone, L, positions, tol)

                    runs[name], checkers[name] = run, checked

                def first(name, acts, held=held):
                    if not held:  # caller order comes first: its warm-up run is the reference
                        held["ref"] = acts

                timings = interleaved(runs, args.repeats, checks=checkers, first=first, sequential=args.sequential)
                if n_tokens is None:  # with positions "all" every real token is a row
                    n_tokens = len(held["ref"])
                for (name, timing), kw in zip(timings.items(), corpus_configs.values(), strict=True):
                    batches, padded = plans[name]
                    rows[name] = {**timing.to_dict(), "tokens_per_s": n_tokens / timing.median_s,
                                  "batches": batches, "padded_positions": padded,
                                  "padding": 1 - n_tokens / padded, "kwargs": kw}
                    print(f"{name:<44} {n_tokens / timing.median_s:>11,.0f} tok/s  {batches:>4} batches  "
                          f"{rows[name]['padding']:.0%} padding", flush=True)
                del held, timings
            rows[f"{cname} real tokens"] = n_tokens
    ratios, targets = {}, {}
    for cname in corpora:
        for positions in ("all", "last"):
            base = rows[f"{cname}, positions={positions}, caller order"]["tokens_per_s"]
            for config in [c for c in configs if c != "caller order"]:
                ratios[f"{cname} {positions}: {config} / caller order"] = \
                    rows[f"{cname}, positions={positions}, {config}"]["tokens_per_s"] / base
            key = f"{cname} {positions}: default / caller order"
            if cname != "distinct images":
                targets[key] = {"value": ratios[key], "target": TARGET, "met": ratios[key] >= TARGET}
    print("\nratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print("targets: " + ", ".join(f"{k} {v['value']:.2f} >= {v['target']}: {'met' if v['met'] else 'NOT met'}"
                                  for k, v in targets.items()))
    finish("ragged", args, {"model": repr(model), "dtype": str(model.dtype), "tolerance": tol,
                            "timing": "sequential" if args.sequential else "interleaved",
                            "caller_order_batch_size": bs, "planner_overhead_tokens": planner_overhead,
                            "image_worker_processes": workers, "rows": rows, "ratios": ratios, "targets": targets,
                            "warnings": warned}, checks, args.out)


if __name__ == "__main__":
    main()
