"""Every fast path equals its plain reference on the GPU (MedGemma-4B shape, bf16, many batches).

References are computed independently of the code under test: each prompt run alone through the plain
Hugging Face forward with hooks on the decoder layers; `evaluate(fast=False)`; a one-patch-per-forward
loop; a plain PEFT forward; numpy. Where bf16 rounding alone separates two orders of summation (the margins
of `evaluate` and patching), both paths are also run in float32 and judged against the float32 reference. The capture cases run several times each, to stress stream ordering.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

import interp
from interp import lora as L
from interp.data import ParaphraseGroup, ParaphrasePair
from interp.layers import DEFAULT_TARGET_MODULES

REL_TOL = 0.05  # per-row ||capture - alone|| / ||alone|| in bf16; a wrong row is ~1 (and fails the identity check)
REPEATS = 3


@contextlib.contextmanager
def _ieee_fp32():
    """float32 matmuls and convolutions in full float32 (cuDNN runs float32 convolutions as TF32 by default:
    the SigLIP patch embedding would then be a 10-bit-mantissa truth)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _mid(model) -> int:
    """Layer 17 of MedGemma's 34 (the study's layer); the middle layer of the toy model on the CPU."""
    return 17 if model.n_layers == 34 else model.n_layers // 2


def _alone(model, prompts, layers) -> list[dict[int, torch.Tensor]]:
    """Per prompt, ``{layer: [pos, d]}`` from the plain forward of that prompt alone (no early stop)."""
    out = []
    with torch.inference_mode():
        for p in prompts:
            batch = model.encode([p])
            kept: dict[int, torch.Tensor] = {}
            hooks = [model.layer(i).register_forward_hook(
                lambda _m, _a, o, i=i, kept=kept: kept.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0].clone()))
                for i in layers]
            try:
                model.hf(**batch.inputs, use_cache=False, logits_to_keep=1)
            finally:
                for h in hooks:
                    h.remove()
            out.append(kept)
    return out


def _compare(acts, ref, layers) -> dict:
    """Worst per-row relative error, rows beyond tolerance, and rows closer to another prompt's reference
    row at the same position than to their own (the signature of a race that returns the wrong batch)."""
    worst, wrong, misplaced, n_rows = 0.0, set(), 0, 0
    pidx, pos = acts.prompt_index.tolist(), acts.position.tolist()
    for layer in layers:
        rows = acts[layer].to(ref[0][layer].device, torch.float32)
        want = torch.stack([ref[i][layer][p] for i, p in zip(pidx, pos, strict=True)]).float()
        err = (rows - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)
        worst = max(worst, float(err.max()))
        wrong |= {pidx[j] for j in torch.nonzero(err > REL_TOL).flatten().tolist()}
        n_rows += len(pidx)
        # identity: among reference rows at the same position of every prompt long enough, its own is nearest
        for j in range(0, len(pidx), max(1, len(pidx) * len(layers) // 64)):
            cands = [i for i in range(len(ref)) if layer in ref[i] and ref[i][layer].shape[0] > pos[j]]
            d = torch.stack([(ref[i][layer][pos[j]].float() - rows[j]).norm() for i in cands])
            own = d[cands.index(pidx[j])]
            # ties are fine: prompts share their first tokens (BOS, the turn header), so their rows agree there
            misplaced += int(own > d.min() * 1.001 + 1e-6 * float(rows[j].norm()))
    return {"max_rel_err": worst, "wrong_prompts": sorted(wrong), "n_wrong_prompts": len(wrong),
            "misplaced_rows": misplaced, "rows": n_rows}


@pytest.fixture(scope="module")
def ref17(medgemma, ragged_prompts):
    return _alone(medgemma, ragged_prompts, [_mid(medgemma)])


@pytest.mark.parametrize("positions,batch_size,cache", [
    ("last", 16, False), ("last", 16, True), ("all", 16, False), ("all", 16, True), ("question", 16, False),
    ("last", 1, False), ("last", 4, False), ("all", 4, True), ("last", 32, False), ("all", 32, False)])
def test_capture_one_layer_equals_each_prompt_alone(medgemma, ragged_prompts, ref17, record, tmp_path,
                                                    positions, batch_size, cache):
    for k in range(REPEATS):
        acts = interp.capture(medgemma, ragged_prompts, layers=[_mid(medgemma)], positions=positions,
                              batch_size=batch_size, cache=tmp_path if cache else None, recompute=True,
                              progress=False)
        res = _compare(acts, ref17, [_mid(medgemma)])
        record(f"capture layer {_mid(medgemma)} positions={positions} batch={batch_size} cache={cache} run={k}", **res)
        assert res["n_wrong_prompts"] == 0 and res["misplaced_rows"] == 0, res
        if positions == "last":
            assert acts.prompt_index.tolist() == list(range(len(ragged_prompts)))


def test_capture_all_layers_equals_each_prompt_alone(medgemma, ragged_prompts, record, tmp_path):
    layers = list(range(medgemma.n_layers))
    short = [p for p in ragged_prompts if len(p) < 1500][:48]
    ref = _alone(medgemma, short, layers)
    for positions, cache in (("last", True), ("all", False), ("last", False)):
        for k in range(REPEATS):
            acts = interp.capture(medgemma, short, layers=layers, positions=positions, batch_size=16,
                                  cache=tmp_path if cache else None, recompute=True, progress=False)
            res = _compare(acts, ref, layers)
            record(f"capture all {len(layers)} layers positions={positions} cache={cache} run={k}", **res)
            assert res["n_wrong_prompts"] == 0 and res["misplaced_rows"] == 0, res


def test_capture_with_images_equals_each_prompt_alone(medgemma, cxr_images, record):
    from interp.models import Prompt

    questions = ["Is there a pleural effusion?", "Is the cardiac silhouette enlarged on this radiograph?",
                 "Any pneumothorax?", "Is there evidence of consolidation in the right lower lobe?"]
    prompts = [Prompt(questions[k % 4], image=img) for k, img in enumerate(cxr_images)]
    layers = [5, 17] if medgemma.n_layers == 34 else [1, _mid(medgemma)]
    ref = _alone(medgemma, prompts, layers)
    for positions, bs in (("question", 4), ("all", 16), ("last", 8)):
        for k in range(REPEATS):
            acts = interp.capture(medgemma, prompts, layers=layers, positions=positions, batch_size=bs,
                                  progress=False)
            res = _compare(acts, ref, layers)
            record(f"capture with images layers {layers} positions={positions} batch={bs} run={k}", **res)
            assert res["n_wrong_prompts"] == 0 and res["misplaced_rows"] == 0, res


def test_packed_capture_equals_each_prompt_alone(medgemma, ragged_prompts, cxr_images, record, monkeypatch):
    """Packed rows (``pack=True``: several prompts end to end in a row where that costs less): text and image prompts
    mixed, each prompt's rows against that prompt alone; the packed forwards are counted, so that the case fails
    if nothing was packed."""
    import importlib

    from interp.models import Prompt

    capture_mod = importlib.import_module("interp.capture")
    counts = {"packed": 0, "prepared": 0}
    real = capture_mod._run_hooked

    def counted(*args, masks="prepared", **kwargs):
        counts[masks] = counts.get(masks, 0) + 1
        return real(*args, masks=masks, **kwargs)

    monkeypatch.setattr(capture_mod, "_run_hooked", counted)
    text = [p for p in ragged_prompts if len(p) < 2000][:40]
    prompts = [Prompt(q, image=cxr_images[k % len(cxr_images)] if k % 2 else None) for k, q in enumerate(text)]
    layers = [5, 17] if medgemma.n_layers == 34 else [1, _mid(medgemma)]
    ref = _alone(medgemma, prompts, layers)
    for positions in ("all", "last"):
        for k in range(REPEATS):
            before = counts["packed"]
            acts = interp.capture(medgemma, prompts, layers=layers, positions=positions, pack=True, progress=False)
            res = _compare(acts, ref, layers)
            res["packed_forwards"] = counts["packed"] - before
            record(f"capture packed, text and images, layers {layers} positions={positions} run={k}", **res)
            assert res["n_wrong_prompts"] == 0 and res["misplaced_rows"] == 0, res
            assert res["packed_forwards"] >= 1, res


def test_prepared_masks_equal_the_forwards_own_on_the_device(medgemma, cxr_images, ragged_prompts, record,
                                                             monkeypatch):
    """Capture builds image and text batches' attention masks itself (`hf.prepared_masks`, no vmap and no read-back):
    each kind is checked once against the forward's own masks on this device, then used; the activations equal a
    capture on the forward's own masks bit for bit."""
    from interp import hf
    from interp.models import Prompt

    prompts = [Prompt("Is there a pleural effusion?", image=img) for img in cxr_images[:8]] + ragged_prompts[:24]
    layers = [17] if medgemma.n_layers == 34 else [_mid(medgemma)]
    hf._MASKS_CHECKED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        first = interp.capture(medgemma, prompts, layers=layers, positions="all", progress=False,
                                   pack=False)
        checked = dict(hf._MASKS_CHECKED.get(medgemma.hf.model, {}))
        second = interp.capture(medgemma, prompts, layers=layers, positions="all", progress=False,
                                   pack=False)
    monkeypatch.setattr(hf, "_mask_plan", lambda body: None)
    own = interp.capture(medgemma, prompts, layers=layers, positions="all", progress=False,
                                   pack=False)
    diff = max((first[layer].float() - own[layer].float()).abs().max().item() for layer in layers)
    diff2 = max((second[layer].float() - own[layer].float()).abs().max().item() for layer in layers)
    record("prepared masks vs the forward's own", kinds_checked=sorted({k[0] for k in checked}),
           all_equal=all(checked.values()), max_abs_diff_first=diff, max_abs_diff_second=diff2, rows=len(own))
    assert {k[0] for k, ok in checked.items() if ok} == {False, True} and all(checked.values()), checked
    assert diff == 0.0 and diff2 == 0.0


def _image_pairs(images: list[str], n: int) -> list[ParaphrasePair]:
    qs = [("Is there a pleural effusion?", "Is fluid collecting around the lungs?"),
          ("Is the heart enlarged?", "Does the cardiac silhouette appear enlarged?"),
          ("Is there a pneumothorax?", "Can a collapsed lung be seen?")]
    return [ParaphrasePair(f"p{k}", *qs[k % 3], answer="yes" if k % 2 else "no", image=images[k % len(images)])
            for k in range(n)]


def _margins(result) -> np.ndarray:
    return result.table[["margin_a", "margin_b"]].to_numpy()


def _against_truth(fast_low, plain_low, fast_high, plain_high) -> dict:
    """How a fast path compares with its plain reference, judged against a float32 truth.

    In float32 the two must agree to rounding (a defect, such as a misplaced image or a wrong mask, shows up
    as a difference of the margins' own size). In bf16 they cannot: on this random-weight model the margins
    are ~1 logit and differ by several bf16 steps between any two summation orders, so the fast path must be
    no less accurate than the plain one, each measured against the plain float32 result (``plain_high``)."""
    truth = np.asarray(plain_high, dtype=np.float64)
    scale = float(np.abs(truth).max())
    err_fast, err_plain = np.abs(fast_low - truth), np.abs(plain_low - truth)
    big = np.abs(truth) > 0.05 * scale
    return {"fp32_max_abs_diff": float(np.abs(fast_high - truth).max()),
            "fp32_rel": float(np.abs(fast_high - truth).max()) / max(scale, 1e-9), "margin_scale": scale,
            "bf16_fast_max_err": float(err_fast.max()), "bf16_plain_max_err": float(err_plain.max()),
            "bf16_fast_mean_err": float(err_fast.mean()), "bf16_plain_mean_err": float(err_plain.mean()),
            "bf16_fast_vs_plain_max_abs": float(np.abs(fast_low - plain_low).max()),
            "sign_flips_fast": int((np.sign(fast_low) != np.sign(truth))[big].sum()),
            "sign_flips_plain": int((np.sign(plain_low) != np.sign(truth))[big].sum()), "n": int(truth.size)}


def _assert_as_accurate(res: dict) -> None:
    """float32: equal to rounding. bf16: within 2x the plain path's error, largest and mean (two summation
    orders land 0.6-1.7x apart at MedGemma's depth, `INTERP_GPU_SUITE_ON_CPU=deep`; a value computed in a
    lower precision than the plain path's, such as a bf16 softmax, is several times worse)."""
    assert res["fp32_rel"] < 1e-3, res
    assert res["bf16_fast_max_err"] <= 2 * res["bf16_plain_max_err"] + 1e-3 * res["margin_scale"], res
    assert res["bf16_fast_mean_err"] <= 2 * res["bf16_plain_mean_err"] + 1e-3 * res["margin_scale"], res
    assert res["sign_flips_fast"] <= res["sign_flips_plain"] + 1, res


def test_evaluate_fast_equals_naive_on_image_pairs_and_groups(bf16_and_fp32, cxr_images, record):
    low, high = bf16_and_fp32
    base = ("Is there a pleural effusion?", "Is fluid collecting around the lungs?", "Any effusion?")
    groups = [ParaphraseGroup(f"g{k}", base + ("Is a pleural effusion present?",) * (k % 2), answer="yes",
                              image=cxr_images[k % len(cxr_images)]) for k in range(16)]
    for label, items in (("48 image pairs", _image_pairs(cxr_images, 48)),
                         ("16 image groups of 3-4 phrasings", groups)):
        runs = {}
        for name, model in (("low", low), ("high", high)):
            with _ieee_fp32():
                fast = interp.evaluate(model, items, n_boot=0, progress=False)
                plain = interp.evaluate(model, items, fast=False, n_boot=0, progress=False)
            assert "KV cache" in fast.method, fast.method
            runs[name] = (_margins(fast), _margins(plain))
        res = _against_truth(*runs["low"], *runs["high"])
        record(f"evaluate {label}: fast vs fast=False, bf16 and float32, against float32 fast=False", **res)
        _assert_as_accurate(res)


def _patched_by_hand(model, pairs) -> np.ndarray:
    """[pairs, layers] margins of prompt b with prompt a's last-token residual patched in at one layer, one
    plain forward per (pair, layer)."""
    ids = list(model.answer_ids)
    out = np.zeros((len(pairs), model.n_layers))
    with torch.inference_mode():
        for r, p in enumerate(pairs):
            a, b = model.encode([p.prompt_a()]), model.encode([p.prompt_b()])
            hidden = model.hf(**a.inputs, output_hidden_states=True, use_cache=False).hidden_states
            # resid_post of each layer at the last token (hidden_states[-1] is after the final norm, so the
            # last layer is left out of the comparison)
            src = [h[0, -1].clone() for h in hidden[1:]]
            for layer in range(model.n_layers - 1):
                def patch(_m, _a, o, layer=layer, src=src):
                    (o[0] if isinstance(o, tuple) else o)[:, -1] = src[layer]
                    return o

                hook = model.layer(layer).register_forward_hook(patch)
                try:
                    logits = model.hf(**b.inputs, use_cache=False).logits[0, -1].float()
                finally:
                    hook.remove()
                out[r, layer] = float(logits[ids[0]] - logits[ids[1]])
    return out[:, :-1]


def test_patching_strategies_equal_the_one_patch_per_forward_loop(bf16_and_fp32, cxr_images, record):
    low, high = bf16_and_fp32
    pairs = _image_pairs(cxr_images, 6)
    with _ieee_fp32():
        plain = {"low": _patched_by_hand(low, pairs), "high": _patched_by_hand(high, pairs)}
    for strategy in ("cache", "full"):
        got = {}
        for name, model in (("low", low), ("high", high)):
            with _ieee_fp32():
                prof = interp.layer_profile(model, pairs, method="patching", strategy=strategy, progress=False)
            got[name] = np.asarray(prof.meta["margin_patched"])[:, :-1]
        res = _against_truth(got["low"], plain["low"], got["high"], plain["high"])
        record(f"layer_profile patching strategy={strategy} vs one patch per forward (6 image pairs x "
               f"{low.n_layers - 1} layers), bf16 and float32, against the float32 loop", **res)
        _assert_as_accurate(res)


def test_lora_fast_path_gives_the_plain_peft_loss_and_gradients(medgemma, cxr_images, record):
    pairs = _image_pairs(cxr_images, 4) + [
        ParaphrasePair(f"t{k}", "Is there cardiomegaly?", "Is the heart big?", answer="no") for k in range(4)]
    lo = _mid(medgemma) - 2
    pm = L._peft_wrap(medgemma, list(range(lo, lo + 5 if medgemma.n_layers == 34 else lo + 3)), r=16, alpha=32, dropout=0.0,
                      target_modules=DEFAULT_TARGET_MODULES, seed=0)
    try:
        torch.manual_seed(0)
        for name, prm in pm.hf.named_parameters():
            if "lora_B" in name:
                prm.data.normal_(0, 0.02)
        cfg = dict(ce_weight=1.0, kl_weight=1.0, kl_space="yes_no")
        results = []
        for fast in (True, False):
            # as train_lora runs on a GPU: activation checkpointing on, the lower-layer cache filled first
            trainer = L._Trainer(pm, lo, cfg, fast=fast, cache=fast, checkpoint=fast)
            keys = [f"k{i}" for i in range(len(pairs))]
            if fast:
                trainer.loss(pairs, keys)  # fills the cache; the measured pass reads it
                trainer.model.hf.zero_grad(set_to_none=True)
            assert trainer.runner.kind == ("gemma3" if fast else "generic")
            loss = trainer.loss(pairs, keys)
            loss.total.backward()
            results.append((float(loss.total.detach()), [p.grad.float().clone() for p in trainer.params]))
            for p in trainer.params:
                p.grad = None
        (lf, gf), (lp, gp) = results
        cos = [float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
               for a, b in zip(gf, gp, strict=True) if b.abs().max() > 0]
        res = {"loss_fast": lf, "loss_plain": lp, "loss_rel_diff": abs(lf - lp) / abs(lp),
               "min_grad_cosine": min(cos), "n_grads": len(cos)}
        record("train_lora first step: fast path vs plain PEFT (4 image + 4 text pairs, layers 15-19)", **res)
        assert res["loss_rel_diff"] < 1e-2 and res["min_grad_cosine"] > 0.97, res
    finally:
        pm.hf.unload()
