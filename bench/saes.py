"""Benchmark: SAE transfer report (R^2, L0, dead features, CE/KL splice) vs sae-lens' own evaluation path.

    python bench/saes.py --out saes.json        # on a GPU: MedGemma-4B-shaped model, bf16, 16k-wide SAE at layer 17
    python bench/saes.py --smoke                # tiny shapes, runs anywhere (CPU)

Same model, same 100 medical + 100 general prompts (bundled corpora), same JumpReLU SAE (random Gemma Scope
2-format folder, d_in 2560, d_sae 16384, loaded with interp.load_sae). Timings are medians of --repeats runs
after a warm-up, device synchronised; memory is the peak allocated during a run above what was allocated
before it (model and SAE weights excluded):
  interp-r2          interp.transfer_report(ce=False), end to end (capture + R^2/CI/tests/L0/dead)
  sae-lens-r2        sae_lens.evals.get_sparsity_and_variance_metrics on the same prompts and tokens
  interp-full        interp.transfer_report(), end to end, with the CE-loss score and KL splice
  sae-lens-full      sae-lens-r2 + sae_lens.evals.get_downstream_reconstruction_metrics (CE and KL)
  interp-stats       R^2 statistics alone on activations captured before the timer (float64, per prompt)
  sae-lens-stats     sae-lens' ExplainedVarianceCalculator + L0 + density on the same tensors
sae-lens' evals expect a TransformerLens model and an ActivationsStore; a thin adapter gives them the same
Hugging Face model (hook on the decoder layer, padding passed as ignored tokens) and the same token batches.

Values: the report's pooled R^2, mean per-prompt R^2, each prompt's R^2, L0 and dead fraction are recomputed
in numpy float64 from the SAE's params.safetensors (not through load_sae) on the rows the report scores
(interp.capture, all positions, special and image tokens excluded: the report is called with
exclude_special=True explicitly). The report must score exactly that many tokens; R^2 may differ by at most
1e-3 (the SAE encodes in float32 on the device), L0 by 1e-2 relative, the dead fraction by 1e-3.
sae-lens' numbers are recorded beside them, not checked (its batches differ, and CE/KL differ by design).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import medgemma_shape  # noqa: E402
from common import Checks, finish, recorded_warnings, sync  # noqa: E402

import interp  # noqa: E402
import interp.prompts  # noqa: E402
from interp.capture import StopForward  # noqa: E402
from interp.saes import _corpus_result, _recon_stats, load_sae, transfer_report  # noqa: E402

EXCLUDE = ("special", "image")
TOL = {"r2": 1e-3, "r2_prompt": 1e-2, "l0_rel": 1e-2, "dead": 1e-3}


def measure(fn, repeats: int, device: str, check=None) -> dict[str, Any]:
    """Median wall seconds of ``fn`` after one warm-up run, and its peak memory above the starting point;
    ``check(result)`` after every run (outside the timer)."""
    out = fn()
    if check is not None:
        check(out)
    times, peaks = [], []
    for _ in range(repeats):
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
        if device == "cuda":
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        if check is not None:
            check(out)
    return {"median_s": statistics.median(times), "times_s": times,
            "peak_mib": max(peaks) if peaks else None, "result": out}


def random_gemma_scope_sae(model: interp.Model, prompts: list[str], layer: int, d_sae: int, folder: Path,
                           device: str) -> tuple[Any, dict[str, np.ndarray]]:
    """A random JumpReLU SAE in Gemma Scope 2's file format, centred on the model's activations, L0 ~ 64;
    returns the loaded SAE and the file's arrays (read back with safetensors' numpy loader)."""
    from safetensors.torch import save_file

    acts = interp.capture(model, prompts, layers=[layer], positions="all", exclude=EXCLUDE, progress=False)
    x = acts[layer].to(device, torch.float32)
    d_in = x.shape[1]
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(d_sae, d_in, generator=g).to(device)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    w_enc = w_dec.T.contiguous()
    b_dec = x.mean(0)
    centred = x[:2048] - b_dec
    pre = centred @ w_enc
    threshold = torch.quantile(pre.flatten()[::7].float(), 1 - min(64, d_sae // 8) / d_sae)
    recon = (pre * (pre > threshold)) @ w_dec
    w_dec *= (recon * centred).sum() / recon.pow(2).sum()  # least-squares decoder scale: R^2 > 0
    params = {"w_enc": w_enc, "w_dec": w_dec, "b_enc": -b_dec @ w_enc, "b_dec": b_dec,
              "threshold": torch.full((d_sae,), float(threshold))}
    params = {k: v.cpu().contiguous() for k, v in params.items()}
    folder = folder / "resid_post" / f"layer_{layer}_width_{d_sae // 1024}k_l0_medium"
    folder.mkdir(parents=True)
    save_file(params, str(folder / "params.safetensors"))
    from safetensors.numpy import load_file

    arrays = load_file(str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "width": d_sae, "model_name": "google/gemma-3-4b-it", "architecture": "jump_relu", "l0": 64,
        "affine_connection": False, "hf_hook_point_in": f"model.layers.{layer}.output",
        "hf_hook_point_out": f"model.layers.{layer}.output", "type": "sae"}))
    return load_sae(folder, device=device), arrays


def numpy_reference(params: dict[str, np.ndarray], rows: torch.Tensor, prompt_index: torch.Tensor,
                    n_prompts: int, chunk: int = 2048) -> dict[str, Any]:
    """JumpReLU encode/decode (Gemma Scope 2: pre = x W_enc + b_enc, f = relu(pre) * (pre > threshold),
    x_hat = f W_dec + b_dec) and R^2 = 1 - sum||x - x_hat||^2 / (sum||x||^2 - N ||mean x||^2), all float64."""
    w_enc, b_enc, thr, w_dec, b_dec = (params[k].astype(np.float64)
                                       for k in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec"))
    x_all = rows.float().cpu().numpy()  # bf16 and float32 are exact in float64
    pi = prompt_index.cpu().numpy().astype(np.int64)
    d = x_all.shape[1]
    n, sq_norm, sq_resid = np.zeros(n_prompts), np.zeros(n_prompts), np.zeros(n_prompts)
    sum_x, l0 = np.zeros((n_prompts, d)), 0.0
    fired = np.zeros(w_enc.shape[1], dtype=bool)
    for s in range(0, len(x_all), chunk):
        x, idx = x_all[s:s + chunk].astype(np.float64), pi[s:s + chunk]
        pre = x @ w_enc + b_enc
        f = np.maximum(pre, 0.0) * (pre > thr)
        x_hat = f @ w_dec + b_dec
        np.add.at(n, idx, 1.0)
        for i in np.unique(idx):  # rows come grouped by prompt: a few prompts per chunk (np.add.at is slow)
            sum_x[i] += x[idx == i].sum(0)
        np.add.at(sq_norm, idx, (x ** 2).sum(1))
        np.add.at(sq_resid, idx, ((x - x_hat) ** 2).sum(1))
        l0 += float((f != 0).sum())
        fired |= (f != 0).any(0)

    def r2(n_, sx, sq, sr):
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = sx / np.expand_dims(n_, -1)
            return 1.0 - (sr / n_) / (sq / n_ - (mean * mean).sum(-1))

    pooled = float(r2(n.sum(), sum_x.sum(0), sq_norm.sum(), sq_resid.sum()))
    per_prompt = np.where(n >= 2, r2(n, sum_x, sq_norm, sq_resid), np.nan)
    return {"n_tokens": int(n.sum()), "r2": pooled, "r2_prompt": per_prompt,
            "r2_prompt_mean": float(np.nanmean(per_prompt)), "l0": l0 / n.sum(),
            "dead_fraction": float(1.0 - fired.mean())}


def check_report(checks: Checks, report: Any, refs: dict[str, dict[str, Any]], label: str) -> None:
    for name, ref in refs.items():
        ours = report[name]
        if ours.n_tokens != ref["n_tokens"]:
            checks.fail(f"{label} {name}: scored tokens", f"the report scored {ours.n_tokens} tokens, the reference "
                        f"mask (all real tokens minus special and image tokens) gives {ref['n_tokens']}: the "
                        "report's token mask changed; update the reference in bench/saes.py")
            continue
        checks.scalar(f"{label} {name}: pooled R^2 vs numpy float64", ours.r2, ref["r2"], TOL["r2"], relative=False)
        checks.scalar(f"{label} {name}: mean per-prompt R^2 vs numpy", ours.r2_prompt_mean, ref["r2_prompt_mean"],
                      TOL["r2"], relative=False)
        got, want = np.asarray(ours.r2_prompt, dtype=np.float64), ref["r2_prompt"]
        both = np.isfinite(want)
        checks.values(f"{label} {name}: per-prompt R^2 vs numpy", np.where(both, got, 0), np.where(both, want, 0),
                      TOL["r2_prompt"], scale=1.0)
        checks.scalar(f"{label} {name}: L0 vs numpy", ours.l0, ref["l0"], TOL["l0_rel"])
        checks.scalar(f"{label} {name}: dead fraction vs numpy", ours.dead_fraction, ref["dead_fraction"],
                      TOL["dead"], relative=False)


# ---- sae-lens' evaluation path on the same Hugging Face model ------------------------------------
class HFForSaeLens:
    """What sae_lens.evals calls on a TransformerLens model, served by the Hugging Face model."""

    def __init__(self, model: interp.Model, layer: int, pad_id: int):
        self.model, self.layer, self.pad_id = model, layer, pad_id
        self.hook_name = f"blocks.{layer}.hook_resid_post"

    def _forward(self, tokens: torch.Tensor, hook_fn=None, stop: bool = False) -> Any:
        kept = {}

        def hook(_m, _i, out):
            resid = out[0] if isinstance(out, tuple) else out
            if stop:
                kept["resid"] = resid
                raise StopForward
            new = hook_fn(resid, hook=None)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = self.model.layers[self.layer].register_forward_hook(hook) if (hook_fn or stop) else None
        try:
            out = self.model.hf(input_ids=tokens, attention_mask=(tokens != self.pad_id).long(), use_cache=False)
        except StopForward:
            return kept["resid"]
        finally:
            if handle is not None:
                handle.remove()
        return out.logits

    def run_with_cache(self, tokens, prepend_bos=False, names_filter=None, stop_at_layer=None, **_kw):
        return None, {self.hook_name: self._forward(tokens, stop=True)}

    def _both(self, tokens, logits):
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        return logits.float(), ce.view(tokens.shape[0], -1)

    def __call__(self, tokens, return_type="both", loss_per_token=True, **_kw):
        return self._both(tokens, self._forward(tokens))

    def run_with_hooks(self, tokens, return_type="both", fwd_hooks=(), loss_per_token=True, **_kw):
        ((_name, fn),) = fwd_hooks
        return self._both(tokens, self._forward(tokens, hook_fn=fn))


class TokenBatches:
    """An ActivationsStore stand-in: right-padded token batches of the formatted prompts, in a fixed order."""

    def __init__(self, model: interp.Model, prompts: list[str], pad_id: int):
        encoded = [model.encode([p]).input_ids[0].cpu() for p in prompts]
        self.rows = sorted(encoded, key=len)  # as interp batches them: little padding
        self.pad_id, self.device, self.i = pad_id, model.device, 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        rows = self.rows[self.i:self.i + n]
        self.i += n
        out = torch.full((len(rows), max(len(r) for r in rows)), self.pad_id, dtype=torch.long)
        for j, r in enumerate(rows):
            out[j, :len(r)] = r
        return out.to(self.device)


def sae_lens_eval(model: interp.Model, sae: Any, layer: int, prompts: list[str], batch: int, ce: bool) -> dict:
    from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    pad = model.tokenizer.pad_token_id
    ignore = sorted(model.special_ids | {pad})  # the ids interp's special-token mask excludes
    adapter = HFForSaeLens(model, layer, pad)
    n_batches = -(-len(prompts) // batch)
    with torch.no_grad():
        metrics, feats = get_sparsity_and_variance_metrics(
            sae, adapter, TokenBatches(model, prompts, pad), ActivationScaler(), n_batches=n_batches,
            compute_l2_norms=False, compute_sparsity_metrics=True, compute_variance_metrics=True,
            compute_featurewise_density_statistics=True, eval_batch_size_prompts=batch, model_kwargs={},
            ignore_tokens=ignore)
        out = {"explained_variance": metrics["explained_variance"], "l0": metrics["l0"],
               "dead_fraction": float(np.mean(np.asarray(feats["feature_density"]) == 0))}
        if ce:
            out.update(get_downstream_reconstruction_metrics(
                sae, adapter, TokenBatches(model, prompts, pad), ActivationScaler(), compute_kl=True,
                compute_ce_loss=True, n_batches=n_batches, eval_batch_size_prompts=batch, ignore_tokens=ignore))
    return out


def sae_lens_stats(sae: Any, rows: torch.Tensor, chunk: int = 4096) -> dict:
    from sae_lens.evals import ExplainedVarianceCalculator

    calc = ExplainedVarianceCalculator()
    l0, fired = [], torch.zeros(sae.cfg.d_sae, device=sae.W_dec.device)
    with torch.no_grad():
        for s in range(0, rows.shape[0], chunk):
            x = rows[s:s + chunk].to(sae.W_dec.device, sae.W_dec.dtype)
            f = sae.encode(x)
            calc.add_batch(sae_output=sae.decode(f), hidden_acts=x)
            l0.append((f != 0).sum(-1).float())
            fired += (f != 0).float().sum(0)
    return {"explained_variance": calc.compute(), "l0": torch.cat(l0).mean().item(),
            "dead_fraction": (fired == 0).float().mean().item()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model and SAE, few prompts (CPU is fine)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per corpus (default 100; smoke 8)")
    ap.add_argument("--layer", type=int, default=None, help="decoder layer (default 17; smoke 3)")
    ap.add_argument("--d-sae", type=int, default=None, help="SAE width (default 16384; smoke 256)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per forward pass, both paths")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3; smoke 1)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    n = args.prompts or (8 if args.smoke else 100)
    layer = args.layer if args.layer is not None else (3 if args.smoke else 17)
    d_sae = args.d_sae or (256 if args.smoke else 16384)
    repeats = args.repeats or (1 if args.smoke else 3)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = medgemma_shape.build(smoke=args.smoke, device=device)
    build_s = time.perf_counter() - t0
    corpora = {"medical": interp.prompts.medical()[:n], "general": interp.prompts.general()[:n]}
    everything = corpora["medical"] + corpora["general"]
    with tempfile.TemporaryDirectory() as tmp:
        sae, params = random_gemma_scope_sae(model, everything[::4], layer, d_sae, Path(tmp), device)
    print(f"model: {model!r} (built in {build_s:.1f}s); SAE: {sae.cfg.d_in}->{sae.cfg.d_sae} at "
          f"{sae.cfg.metadata.hook_name}; {n} + {n} prompts; device {device}", flush=True)

    # explicit token mask: the report's default may change, the reference below must score the same rows
    report_kw = dict(layer=layer, batch_size=args.batch, progress=False, n_boot=1000, exclude_special=True)
    if "tokens" in inspect.signature(transfer_report).parameters:
        report_kw["tokens"] = "all"
    checks, warned = Checks(), []
    with recorded_warnings(warned):
        # the rows the report scores: the same capture call transfer_report makes
        acts = {k: interp.capture(model, v, layers=[layer], positions="all", exclude=EXCLUDE, batch_size=args.batch,
                                  progress=False) for k, v in corpora.items()}
        t0 = time.perf_counter()
        refs = {k: numpy_reference(params, a[layer], a.prompt_index, a.n_prompts) for k, a in acts.items()}
        print(f"numpy float64 reference in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{k} R^2 {r['r2']:.6f} on {r['n_tokens']} tokens" for k, r in refs.items()), flush=True)
        runs: dict[str, dict] = {}
        runs["interp-r2"] = measure(lambda: transfer_report(model, sae, corpora, ce=False, **report_kw), repeats,
                                    device, check=lambda r: check_report(checks, r, refs, "transfer_report(ce=False)"))
        runs["sae-lens-r2"] = measure(lambda: {k: sae_lens_eval(model, sae, layer, v, args.batch, ce=False)
                                               for k, v in corpora.items()}, repeats, device)
        runs["interp-full"] = measure(lambda: transfer_report(model, sae, corpora, **report_kw), repeats, device,
                                      check=lambda r: check_report(checks, r, refs, "transfer_report"))
        runs["sae-lens-full"] = measure(lambda: {k: sae_lens_eval(model, sae, layer, v, args.batch, ce=True)
                                                 for k, v in corpora.items()}, repeats, device)

        def interp_stats():
            return {k: _corpus_result(k, _recon_stats(sae, a[layer], a.prompt_index, a.n_prompts), None,
                                      0.95, 0.05, 1000, 0) for k, a in acts.items()}

        try:  # private helpers that may change shape: a timing row, not a check
            runs["interp-stats"] = measure(interp_stats, repeats, device)
        except Exception as e:  # noqa: BLE001
            print(f"interp-stats skipped: {type(e).__name__}: {e}")
        runs["sae-lens-stats"] = measure(lambda: {k: sae_lens_stats(sae, a[layer]) for k, a in acts.items()},
                                         repeats, device)

    report = runs["interp-full"]["result"]
    tokens = sum(c.n_tokens for c in report.corpora)
    agreement = {}
    for name in corpora:
        ours, theirs = report[name], runs["sae-lens-full"]["result"][name]
        agreement[name] = {
            "r2_numpy": refs[name]["r2"], "l0_numpy": refs[name]["l0"], "dead_numpy": refs[name]["dead_fraction"],
            "r2_interp": ours.r2, "r2_sae_lens": theirs["explained_variance"],
            "r2_stats_sae_lens": runs["sae-lens-stats"]["result"][name]["explained_variance"],
            "l0_interp": ours.l0, "l0_sae_lens": theirs["l0"],
            "dead_interp": ours.dead_fraction, "dead_sae_lens": theirs["dead_fraction"],
            "ce_score_interp": ours.ce_score, "ce_score_sae_lens": theirs.get("ce_loss_score"),
            "kl_interp": ours.kl, "kl_sae_lens": theirs.get("kl_div_with_sae")}

    print(f"\n{'path':<16}{'median s':>10}{'tokens/s':>12}{'peak MiB':>11}   runs")
    for name, r in runs.items():
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{name:<16}{r['median_s']:>10.3f}{tokens / r['median_s']:>12.0f}{peak:>11}   "
              + ", ".join(f"{t:.3f}" for t in r["times_s"]))
    print("\nagreement (interp vs numpy float64 vs sae-lens; CE/KL differ by design: interp zero-ablates only the "
          "scored positions and scores only real next tokens)")
    for name, a in agreement.items():
        print(f"  {name:<8} R^2 {a['r2_interp']:.6f} vs {a['r2_numpy']:.6f} vs {a['r2_sae_lens']:.6f}   L0 {a['l0_interp']:.2f} vs "
              f"{a['l0_sae_lens']:.2f}   dead {a['dead_interp']:.4f} vs {a['dead_sae_lens']:.4f}   CE score "
              f"{a['ce_score_interp']:.4f} vs {a['ce_score_sae_lens'] or float('nan'):.4f}")
    print()
    print(report)

    result = {
        "model": repr(model), "device": device,
        "sae": {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "hook": sae.cfg.metadata.hook_name},
        "prompts_per_corpus": n, "tokens_scored": tokens, "batch": args.batch, "repeats": repeats,
        "report_options": {k: v for k, v in report_kw.items() if k != "progress"}, "tolerances": TOL,
        "timings": {k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in runs.items()},
        "speedup_r2": runs["sae-lens-r2"]["median_s"] / runs["interp-r2"]["median_s"],
        "speedup_full": runs["sae-lens-full"]["median_s"] / runs["interp-full"]["median_s"],
        "agreement": agreement, "report": report.to_dict(), "warnings": warned,
    }
    result = json.loads(json.dumps(result, default=str, allow_nan=True))
    return finish("saes", args, result, checks, args.out)


if __name__ == "__main__":
    main()
