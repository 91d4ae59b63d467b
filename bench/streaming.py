"""Benchmark: a capture 20x larger than the host memory it may use, a streamed pass over it, an SAE trained on it.

    python bench/streaming.py --out streaming.json    # CPU, about a minute
    python bench/streaming.py --quick                 # a smaller corpus (seconds)

A small random-init decoder (LLaMA layout, d_model 512, 4 layers: cheap on two CPU cores, 8 KiB of float32
activations per token over its 4 layers) captures every position of every layer of a corpus of 60-200-token
prompts into a cache folder with ``max_memory`` (32 MB) and the defaults otherwise, so the result comes back
lazy. Prompts are drawn until the activations reach ``--ratio`` (20) times ``max_memory``.

The process's RSS is sampled every 2 ms from a thread (psutil). The baseline is taken after two warm-up
captures of the longest batch; the second one's peak over the RSS before it is the forward pass's working
set. Checks:
  - the result is lazy and holds >= ratio x max_memory of activations;
  - the capture's peak RSS increase <= max_memory (finished shards are kept until that is crossed)
    + 3 shards (one filling, one being written, one being dropped) + the row metadata kept in memory
    (24 bytes a row) + the forward working set + 32 MB slack (allocator, tokenised look-ahead, threads);
  - one pass of ``Activations.batches`` yields every row once: the sorted exact hashes of its rows equal
    those of ``Activations.chunks``' rows;
  - that pass's peak RSS increase <= 2 x shards_in_memory shards (the group yielded and the next one being
    read) + a batch + 32 MB slack;
  - a TopK SAE (d_sae 2 x d_model, k 32) trained with `train_sae` streams from the lazy capture (its metadata
    says so), its peak RSS increase stays within twice the batch reader's bound + 4 x its parameters (weights,
    gradients, Adam's two moments) + two batches + 32 MB, and it reconstructs the last 8 shards with R^2 > 0.5.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import medgemma_shape  # noqa: E402
from common import Checks, finish, recorded_warnings  # noqa: E402

import interp  # noqa: E402
from interp.models import tiny_tokenizer  # noqa: E402

MB = 10**6
SLACK = 32 * MB


class PeakRSS:
    """The largest RSS seen between ``start()`` and ``stop()``, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002):
        self.proc, self.interval = psutil.Process(), interval
        self.peak, self._run, self._thread = 0, False, None

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def start(self) -> int:
        self.peak, self._run = self.rss(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self.peak

    def _sample(self) -> None:
        while self._run:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._run = False
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        return self.peak


def build(d_model: int, n_layers: int) -> interp.Model:
    """A random-init LLaMA-layout decoder with the workbench's tiny tokenizer (chat-formatted prompts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=d_model // 2,
                      num_hidden_layers=n_layers, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    return interp.Model.wrap(hf, tok, name="stream-bench-llama")


def row_keys(rows: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """An exact hash per row: its float32 bit patterns as integers, mixed with fixed odd coefficients (int64
    arithmetic wraps, so the sum does not depend on the order it is taken in)."""
    return (rows.contiguous().view(torch.int32).long() * coeffs).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", "--smoke", action="store_true", help="max_memory 8 MB: a corpus of ~160 MB")
    ap.add_argument("--out", default=None, help="write the JSON record here")
    ap.add_argument("--max-memory", type=int, default=32 * MB, help="bytes the capture may keep (default 32 MB)")
    ap.add_argument("--ratio", type=float, default=20.0, help="corpus size over max_memory")
    ap.add_argument("--shard-size", type=int, default=8, help="prompts per shard")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4096, help="rows per batch of the streamed pass")
    ap.add_argument("--shards-in-memory", type=int, default=4)
    ap.add_argument("--sae-steps", type=int, default=300, help="steps of the SAE trained by streaming")
    ap.add_argument("--cache", default=None, help="cache root (default: a temporary folder, removed after)")
    args = ap.parse_args()
    if args.quick:
        args.max_memory = 8 * MB
    model = build(args.d_model, args.layers)
    layers = list(range(args.layers))
    row_bytes = args.layers * args.d_model * 4
    # prompts until the activations reach ratio x max_memory
    want_tokens = math.ceil(args.ratio * args.max_memory / row_bytes * 1.02)
    lengths, seed = [], 0
    while sum(lengths) < want_tokens:
        lengths += medgemma_shape.ragged_lengths(64, 60, 200, seed=seed)
        seed += 1
    prompts = medgemma_shape.prompts_of_lengths(model, lengths)
    print(f"{model!r}\n{len(prompts)} prompts, ~{sum(lengths):,} tokens, {row_bytes} bytes a token "
          f"(~{sum(lengths) * row_bytes / MB:.0f} MB); max_memory {args.max_memory / MB:.0f} MB", flush=True)

    checks, warned, sampler = Checks(), [], PeakRSS()
    with recorded_warnings(warned), tempfile.TemporaryDirectory() as tmp:
        root = Path(args.cache or tmp)
        longest = [prompts[k] for k in sorted(range(len(prompts)), key=lambda k: -lengths[k])[:16]]
        # the first run pays one-time costs (threads, allocator arenas) that stay; the second shows the
        # forward's working set: one batch of the longest prompts, nothing kept
        interp.capture(model, longest, layers=layers, positions="all", progress=False)
        before = sampler.start()
        interp.capture(model, longest, layers=layers, positions="all", progress=False)
        forward_ws = sampler.stop() - before

        base = sampler.start()
        t = time.perf_counter()
        acts = interp.capture(model, prompts, layers=layers, positions="all", cache=root,
                              shard_size=args.shard_size, max_memory=args.max_memory, progress=False)
        capture_s = time.perf_counter() - t
        peak = sampler.stop()
        size = len(acts) * row_bytes
        shard = max(acts.meta["shard_rows"]) * row_bytes
        meta = len(acts) * 3 * 8
        bound = args.max_memory + 3 * shard + meta + forward_ws + SLACK
        grew = peak - base
        print(f"capture: {len(acts):,} rows, {size / MB:.0f} MB in {capture_s:.1f} s ({len(acts) / capture_s:,.0f} "
              f"tokens/s); RSS +{grew / MB:.1f} MB at peak (bound {bound / MB:.1f} MB)", flush=True)
        checks.require("the result is lazy", acts.lazy, f"{acts!r} is in memory")
        checks.require(f"activations >= {args.ratio:g} x max_memory", size >= args.ratio * args.max_memory,
                       f"only {size / args.max_memory:.1f} x max_memory")
        checks.require("capture peak RSS increase within the bound", grew <= bound,
                       f"+{grew / MB:.1f} MB > {bound / MB:.1f} MB")

        coeffs = torch.randint(1, 2**31, (args.d_model,), generator=torch.Generator().manual_seed(0)) * 2 + 1
        layer = layers[-1]
        t = time.perf_counter()
        want = torch.cat([row_keys(c.acts[layer], coeffs) for c in acts.chunks([layer])]).sort().values
        chunks_s = time.perf_counter() - t

        base = sampler.start()
        t = time.perf_counter()
        keys, n = [], 0
        for batch in acts.batches(layer, args.batch, drop_last=False, shards_in_memory=args.shards_in_memory):
            keys.append(row_keys(batch, coeffs))
            n += batch.shape[0]
        stream_s = time.perf_counter() - t
        stream_peak = sampler.stop()
        got = torch.cat(keys).sort().values
        stream_bound = 2 * args.shards_in_memory * shard + args.batch * args.d_model * 4 + len(acts) * 8 + SLACK
        stream_grew = stream_peak - base
        print(f"batches: {n:,} rows in {stream_s:.1f} s ({n * args.d_model * 4 / MB / stream_s:.0f} MB/s of layer "
              f"{layer}); RSS +{stream_grew / MB:.1f} MB at peak (bound {stream_bound / MB:.1f} MB); chunks pass "
              f"{chunks_s:.1f} s", flush=True)
        checks.require("one pass of batches yields every row once", n == len(acts) and torch.equal(got, want),
                       f"{n} rows yielded of {len(acts)}, multisets {'equal' if torch.equal(got, want) else 'differ'}")
        checks.require("batches peak RSS increase within the bound", stream_grew <= stream_bound,
                       f"+{stream_grew / MB:.1f} MB > {stream_bound / MB:.1f} MB")

        # an SAE trained by streaming from the lazy capture (sae-lens' trainer; shards shuffled, seeded)
        base = sampler.start()
        t = time.perf_counter()
        sae = interp.train_sae(acts, layer=layer, d_sae=2 * args.d_model, architecture="topk", k=32,
                               steps=args.sae_steps, batch_size=1024, progress=False,
                               shards_in_memory=args.shards_in_memory)
        sae_s = time.perf_counter() - t
        sae_peak = sampler.stop()
        params = sum(p.numel() for p in sae.parameters()) * 4
        sae_bound = 2 * 2 * args.shards_in_memory * shard + 4 * params + 2 * 1024 * args.d_model * 4 \
            + len(acts) * 8 + SLACK
        sae_grew = sae_peak - base
        # its R^2 on the capture's last shards, streamed (sum of squared errors over total sum of squares)
        sse = sst = 0.0
        tail = list(acts.chunks([layer]))[-8:]
        mean = torch.cat([c.acts[layer] for c in tail]).double().mean(0)
        with torch.no_grad():
            for c in tail:
                x = c.acts[layer].float()
                sse += float(((sae(x) - x).double() ** 2).sum())
                sst += float(((x.double() - mean) ** 2).sum())
        r2 = 1 - sse / sst
        streamed = sae.cfg.metadata.interp_training.get("streamed") if hasattr(sae.cfg.metadata, "interp_training") \
            else None
        print(f"train_sae (streamed={streamed}): {args.sae_steps} steps of 1024 rows in {sae_s:.1f} s; RSS "
              f"+{sae_grew / MB:.1f} MB at peak (bound {sae_bound / MB:.1f} MB); R^2 on the last 8 shards {r2:.3f}",
              flush=True)
        checks.require("train_sae streamed from the lazy capture", bool(streamed), f"metadata streamed={streamed}")
        checks.require("train_sae peak RSS increase within the bound", sae_grew <= sae_bound,
                       f"+{sae_grew / MB:.1f} MB > {sae_bound / MB:.1f} MB")
        checks.require("the streamed SAE reconstructs (R^2 > 0.5)", r2 > 0.5, f"R^2 = {r2:.3f}")
        cache_bytes = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    finish("streaming", args, {
        "model": repr(model), "n_prompts": len(prompts), "rows": len(acts), "bytes_per_row": row_bytes,
        "activations_bytes": size, "ratio_to_max_memory": size / args.max_memory, "cache_bytes": cache_bytes,
        "shards": len(acts.meta["shard_rows"]), "largest_shard_bytes": shard,
        "capture": {"seconds": capture_s, "tokens_per_s": len(acts) / capture_s, "rss_increase_peak": grew,
                    "bound": bound, "bound_terms": {"max_memory": args.max_memory, "three_shards": 3 * shard,
                                                    "row_metadata": meta, "forward_working_set": forward_ws,
                                                    "slack": SLACK}},
        "batches": {"seconds": stream_s, "rows": n, "rss_increase_peak": stream_grew, "bound": stream_bound,
                    "shards_in_memory": args.shards_in_memory, "batch": args.batch},
        "train_sae": {"seconds": sae_s, "steps": args.sae_steps, "rss_increase_peak": sae_grew, "bound": sae_bound,
                      "r2_last_shards": r2},
        "ru_maxrss_bytes": maxrss, "warnings": warned}, checks, args.out)


if __name__ == "__main__":
    main()
