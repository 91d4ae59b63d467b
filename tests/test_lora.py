"""Targeted LoRA: adapter placement, PEFT round trips, the loss, the fast path, checkpoints, merging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from scipy.special import log_softmax as np_log_softmax
from scipy.stats import binomtest, entropy, wilcoxon
from statsmodels.stats.proportion import proportion_confint

import interp
from interp import consistency
from interp import lora as L
from interp.data import ParaphrasePair, builtin
from interp.layers import DEFAULT_TARGET_MODULES, LayerSelection

QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def text_pairs() -> list[ParaphrasePair]:
    """Register pairs with gold answers (some with inverted polarity), short enough for fast tests."""
    pairs = [p for p in builtin("register") if p.answer is not None]
    return pairs[:12] + [p for p in pairs if not p.same_polarity][:4]


@pytest.fixture(scope="module")
def image_pairs(xray_images) -> list[ParaphrasePair]:
    qs = [("Is there a pleural effusion?", "any fluid around the lung?"),
          ("Is the heart enlarged?", "is the heart too big?"),
          ("Is there a pneumothorax?", "can a collapsed lung be ruled out?"),
          ("Are there rib fractures?", "any broken ribs?")]
    return [ParaphrasePair(f"img-{i}", a, b, answer=("yes", "no")[i % 2], image=xray_images[i % 3],
                           same_polarity=i != 2) for i, (a, b) in enumerate(qs)]


def fresh(name: str = "tiny-medgemma") -> interp.Model:
    """A model of our own (PEFT injects adapters in place, so shared fixtures stay untouched)."""
    return interp.load(name)


def randomize_lora(hf, std: float = 0.2, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def logits_of(model, prompts) -> torch.Tensor:
    return consistency.answer_logits(model, prompts, full_vocab=True)


def expected_modules(model: interp.Model, layers) -> set[str]:
    """Independent listing: Linear modules named like the targets, under the language decoder's layers."""
    prefix = model.layers_path + "."
    return {n for n, m in model.hf.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)
            and int(n[len(prefix):].split(".")[0]) in layers and n.rsplit(".", 1)[-1] in DEFAULT_TARGET_MODULES}


# ---- placement and reports -------------------------------------------------------------------------
def test_adapters_land_on_exactly_the_chosen_language_layers(tiny_medgemma, text_pairs, tmp_path):
    sel = LayerSelection((1, 2, 3), tiny_medgemma.n_layers, method="manual")
    res = L.train_lora(tiny_medgemma, text_pairs[:4], layers=sel, eval_pairs=None, max_steps=1, grad_accum=2,
                       output_dir=tmp_path, **QUIET)
    assert res.layers == (1, 2, 3) and res.steps == 1
    loaded = L.load_adapter(fresh(), res.adapter_path)
    report = L.adapter_report(loaded)
    wanted = expected_modules(tiny_medgemma, {1, 2, 3})
    assert set(report.modules) == wanted and len(report.modules) == 21
    linears = dict(tiny_medgemma.hf.named_modules())
    assert res.trainable_params == sum(16 * (linears[n].in_features + linears[n].out_features) for n in wanted)
    assert report.language_layers == (1, 2, 3) and not report.touches_vision and not report.other_modules
    assert not any("vision" in n for n, _ in loaded.hf.named_modules() if "lora_A" in n)
    cfg = json.loads((res.adapter_path / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1, 2, 3] and cfg["layers_pattern"] == "language_model.layers"
    # training leaves the caller's model without adapters
    assert not any("lora" in n for n, _ in tiny_medgemma.hf.named_modules())


def test_adapter_report_flags_the_vision_tower():
    model = fresh()
    n_vision = sum(1 for n, m in model.hf.named_modules() if "vision_tower" in n and isinstance(m, torch.nn.Linear)
                   and n.rsplit(".", 1)[-1] in DEFAULT_TARGET_MODULES)
    # the cxr-auditor adapter: target modules matched by name only, so SigLIP's q/k/v projections match too
    get_peft_model(model.hf, LoraConfig(r=4, lora_alpha=4, target_modules=list(DEFAULT_TARGET_MODULES)))
    report = L.adapter_report(model)
    assert n_vision > 0 and len(report.vision_modules) == n_vision and report.touches_vision
    assert all("vision_tower" in n for n in report.vision_modules)
    assert report.language_layers == tuple(range(model.n_layers)) and "WARNING" in repr(report)
    assert set(report.table["part"]) == {"language", "vision"}


def test_layer_choices_are_checked(tiny_medgemma, text_pairs, tmp_path):
    with pytest.raises(interp.InterpError, match="out of range"):
        L.train_lora(tiny_medgemma, text_pairs, layers=[4, 9], output_dir=tmp_path, **QUIET)
    with pytest.raises(interp.InterpError, match="to_depth"):
        L.train_lora(tiny_medgemma, text_pairs, layers=LayerSelection((15, 16), 34), output_dir=tmp_path, **QUIET)
    with pytest.raises(interp.InterpError, match="empty"):
        L.train_lora(tiny_medgemma, [], layers=[1], output_dir=tmp_path, **QUIET)
    with pytest.raises(interp.InterpError, match="kl_space"):
        L.train_lora(tiny_medgemma, text_pairs, layers=[1], kl_space="full", output_dir=tmp_path, **QUIET)


# ---- PEFT format ----------------------------------------------------------------------------------
def test_saved_adapter_round_trips_through_peft_with_identical_logits(image_pairs, tmp_path):
    model = fresh()
    pm = L._peft_wrap(model, [2, 3, 4], r=4, alpha=8, dropout=0.05, target_modules=DEFAULT_TARGET_MODULES, seed=0)
    randomize_lora(pm.hf)
    prompts = [p.prompt_a() for p in image_pairs] + [image_pairs[0].prompt_b()]
    before = logits_of(pm, prompts)
    pm.hf.save_pretrained(tmp_path / "adapter")
    other = fresh()
    base_logits = logits_of(other, prompts)
    reloaded = PeftModel.from_pretrained(other.hf, tmp_path / "adapter").eval()
    after = logits_of(L._rewrap(other, reloaded), prompts)
    assert torch.equal(before, after)
    assert (after - base_logits).abs().max() > 1e-3  # the adapter matters, so equality is not vacuous


def test_load_adapter_reads_the_published_layout(tmp_path):
    # the study's targeted adapter, scaled down: layers 1-3 by layers_pattern, r=16 / alpha=32 / dropout 0.05
    src = fresh()
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(DEFAULT_TARGET_MODULES),
                     layers_to_transform=[1, 2, 3], layers_pattern="language_model.layers", task_type="CAUSAL_LM")
    peft = get_peft_model(src.hf, cfg)
    randomize_lora(peft)
    peft.save_pretrained(tmp_path / "targeted")
    prompts = ["Is there a pleural effusion?", "is the heart too big?"]
    want = logits_of(L._rewrap(src, peft.eval()), prompts)
    model = L.load_adapter(fresh(), tmp_path / "targeted")
    assert torch.equal(logits_of(model, prompts), want)
    report = L.adapter_report(model)
    assert report.language_layers == (1, 2, 3) and not report.touches_vision
    assert report.configs["default"]["r"] == 16 and report.adapter_params == sum(
        p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    # an older adapter whose layers_pattern is just "layers" also hits layer 1 of the SigLIP encoder
    old = fresh()
    get_peft_model(old.hf, LoraConfig(r=2, target_modules=list(DEFAULT_TARGET_MODULES), layers_to_transform=[1],
                                      layers_pattern="layers")).save_pretrained(tmp_path / "old")
    flagged = L.adapter_report(L.load_adapter(fresh(), tmp_path / "old"))
    assert flagged.language_layers == (1,) and flagged.vision_modules
    assert all(".layers.1." in n for n in flagged.vision_modules)


def test_load_adapter_errors_are_clear(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(interp.InterpError, match="hub"):
        L.load_adapter(fresh(), "saillab/medgemma-4b-targeted-lora-mimic-mt-12k")
    with pytest.raises(interp.InterpError, match="adapter_config.json"):
        L.load_adapter(fresh(), tmp_path)
    big = fresh("tiny-llava")  # 4 layers: an adapter for layer 5 belongs to another model
    get_peft_model(fresh().hf, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[5],
                                          layers_pattern="language_model.layers")).save_pretrained(tmp_path / "a")
    with pytest.raises(interp.InterpError, match="layer 5"):
        L.load_adapter(big, tmp_path / "a")


# ---- the loss -------------------------------------------------------------------------------------
def test_symmetric_kl_matches_scipy_is_symmetric_and_zero_on_identical_inputs():
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(5, 7, generator=gen) * 3, torch.randn(5, 7, generator=gen) * 3
    kl = L.symmetric_kl(p, q)
    pp, qq = np.exp(np_log_softmax(p.double().numpy(), -1)), np.exp(np_log_softmax(q.double().numpy(), -1))
    ref = 0.5 * (entropy(pp, qq, axis=-1) + entropy(qq, pp, axis=-1))
    np.testing.assert_allclose(kl.numpy(), ref, rtol=1e-5)
    assert torch.equal(kl, L.symmetric_kl(q, p))
    assert torch.all(L.symmetric_kl(p, p) == 0)
    assert torch.all(kl > 0)


def test_pair_loss_terms_against_a_direct_computation():
    gen = torch.Generator().manual_seed(1)
    yes, no = 3, 5
    la, lb = torch.randn(4, 11, generator=gen), torch.randn(4, 11, generator=gen)
    ta, tb = torch.tensor([yes, no, -100, yes]), torch.tensor([yes, yes, -100, no])
    inverted = torch.tensor([False, True, False, True])
    out = L.pair_loss(la, lb, ta, tb, inverted, (yes, no), ce_weight=0.7, kl_weight=2.0)
    logp_a, logp_b = np_log_softmax(la.double().numpy(), -1), np_log_softmax(lb.double().numpy(), -1)
    ce = -np.mean([logp_a[0, yes], logp_a[1, no], logp_a[3, yes], logp_b[0, yes], logp_b[1, yes], logp_b[3, no]])
    kls = []
    for i in range(4):
        two_a, two_b = la[i, [yes, no]].double().numpy(), lb[i, [yes, no]].double().numpy()
        if inverted[i]:
            two_b = two_b[::-1]
        pa, pb = np.exp(np_log_softmax(two_a)), np.exp(np_log_softmax(two_b))
        kls.append(0.5 * (entropy(pa, pb) + entropy(pb, pa)))
    assert float(out.ce) == pytest.approx(ce, rel=1e-5) and float(out.kl) == pytest.approx(np.mean(kls), rel=1e-5)
    assert float(out.total) == pytest.approx(0.7 * ce + 2.0 * np.mean(kls), rel=1e-5)
    # an inverted pair whose b answers exactly the opposite way is perfectly consistent
    swapped = la.clone()
    swapped[:, [yes, no]] = la[:, [no, yes]]
    for space in ("yes_no", "vocab"):
        zero = L.pair_loss(la, swapped, ta, tb, torch.ones(4, dtype=torch.bool), (yes, no), ce_weight=0,
                           kl_space=space)
        assert float(zero.kl) == pytest.approx(0.0, abs=1e-6)


# ---- the fast path --------------------------------------------------------------------------------
def _tiny_text_model(kind: str) -> interp.Model:
    """Text-only decoders (the architecture of Gemma 3 270M; a LLaMA) at toy widths."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from interp.models import tiny_tokenizer

    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    if kind == "gemma3-text":
        hf = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=16, sliding_window=8, **common))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common))
    return interp.Model.wrap(hf.eval(), tok, name=kind)


@pytest.mark.parametrize("arch,images", [("tiny-medgemma", True), ("tiny-medgemma", False), ("tiny-llava", True),
                                         ("gemma3-text", False), ("llama-text", False)])
def test_fast_path_gives_the_plain_peft_loss_and_gradients(arch, images, image_pairs, text_pairs):
    model = fresh(arch) if arch.startswith("tiny") else _tiny_text_model(arch)
    pairs = image_pairs if images else text_pairs[10:14]  # includes inverted-polarity pairs
    lo = 2
    pm = L._peft_wrap(model, [2, 3], r=4, alpha=8, dropout=0.0, target_modules=DEFAULT_TARGET_MODULES, seed=0)
    randomize_lora(pm.hf, std=0.1)
    cfg = dict(ce_weight=1.0, kl_weight=1.0, kl_space="yes_no")
    fast, plain = L._Trainer(pm, lo, cfg, fast=True, cache=True), L._Trainer(pm, lo, cfg, fast=False, cache=False)
    assert fast.runner.kind == ("llama" if "ll" in arch else "gemma3") and plain.runner.kind == "generic"
    results = []
    for trainer in (fast, plain, fast):  # the second fast pass reads the cached residual stream
        calls = dict.fromkeys(range(model.n_layers), 0)

        def count(_module, _args, _out, i, calls=calls):
            calls[i] += 1

        # count each layer's MLP: a skipped layer is still called (as the identity) but computes nothing
        hooks = [pm.layers[i].mlp.register_forward_hook(lambda *a, i=i: count(*a, i)) for i in range(model.n_layers)]
        loss = trainer.loss(pairs[:3], ["x", "y", "z"])
        loss.total.backward()
        for h in hooks:
            h.remove()
        results.append((loss, [p.grad.clone() for p in trainer.params], calls))
        for p in trainer.params:
            p.grad = None
    (f, fg, _), (p, pg, _), (c, cg, cached_calls) = results
    assert float(f.total.detach()) == pytest.approx(float(p.total.detach()), rel=1e-5)
    assert float(c.total.detach()) == float(f.total.detach())
    scale = max(float(g.abs().max()) for g in pg)
    assert scale > 0
    for a, b, d in zip(fg, pg, cg, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(d, a, rtol=1e-5, atol=1e-7 * scale)
    # once cached, nothing below the lowest adapted layer runs; the upper layers run once per micro-batch
    assert all(cached_calls[i] == 0 for i in range(lo)) and all(cached_calls[i] == 1 for i in range(lo, model.n_layers))
    resid, _ = next(iter(fast.runner.store.values()))
    assert not resid.requires_grad and fast.runner.cache_bytes > 0


def test_fused_micro_batches_and_checkpointing_give_the_accumulated_gradient(image_pairs, text_pairs):
    """Fusing an accumulation group into one pass (dropout on, drawn per example) and recomputing layers in
    the backward pass change no gradient: the reference runs every micro-batch on its own."""
    model = fresh()
    pm = L._peft_wrap(model, [2, 3, 4], r=4, alpha=8, dropout=0.3, target_modules=DEFAULT_TARGET_MODULES, seed=0)
    randomize_lora(pm.hf, std=0.1)
    pairs = text_pairs[:3] + image_pairs[:2]
    micro = [([pairs[0]], [0], [11]), ([pairs[1], pairs[2]], [1, 2], [12, 13]), ([pairs[3]], [3], [14]),
             ([pairs[4]], [4], [15])]
    items = [((i, side), p.prompt_a() if side == "a" else p.prompt_b()) for i, p in enumerate(pairs)
             for side in ("a", "b")]
    cfg = dict(ce_weight=1.0, kl_weight=0.5, kl_space="yes_no")
    runs = {}
    for name, fuse, ckpt in (("alone", 0, False), ("fused", 10**6, False), ("fused+ckpt", 10**6, True)):
        trainer = L._Trainer(pm, 2, cfg, fast=True, cache=True, fuse_tokens=fuse, checkpoint=ckpt)
        trainer.runner.prefill(items, rows_per_pass=4)
        calls = []
        # counted inside the layer: the recomputation in the backward pass runs the layer's forward itself
        hook = pm.layers[2].self_attn.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        for i in range(2, model.n_layers):
            pm.layers[i].train()
        with L._row_dropout(pm.hf, trainer.dropout_rows):
            parts = trainer.backward_group(micro, group_size=len(micro))
        hook.remove()
        pm.hf.eval()
        runs[name] = ([float(q.total.detach()) for q in parts], [p.grad.clone() for p in trainer.params], len(calls))
        for p in trainer.params:
            p.grad = None
    (l0, g0, c0), (l1, g1, c1), (l2, g2, c2) = runs["alone"], runs["fused"], runs["fused+ckpt"]
    assert (c0, c1, c2) == (4, 1, 2)  # four passes; one fused pass; one more to recompute in the backward
    assert l1 == pytest.approx(l0, rel=1e-5) and l2 == pytest.approx(l0, rel=1e-5)
    scale = max(float(g.abs().max()) for g in g0)
    for a, b, c in zip(g0, g1, g2, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5 * scale)
    # dropout really was on: the same step in eval mode gives another loss
    trainer = L._Trainer(pm, 2, cfg, fast=True, cache=True)
    with torch.no_grad():
        no_drop = float(trainer.loss([pairs[0]], [0]).total)
    assert abs(no_drop - l0[0]) > 1e-4


# ---- training, checkpoints, resume ----------------------------------------------------------------
def full_loss(model, pairs) -> float:
    """The training objective over all pairs with the plain forward (independent of the fast path)."""
    la, lb = logits_of(model, [p.prompt_a() for p in pairs]), logits_of(model, [p.prompt_b() for p in pairs])
    ta, tb, inv = L._targets(pairs, model.answer_ids)
    return float(L.pair_loss(la, lb, ta, tb, inv, model.answer_ids).total)


def test_a_few_steps_lower_the_training_loss(text_pairs, tmp_path):
    model = fresh()
    train = text_pairs[:8]
    before = full_loss(model, train)
    res = L.train_lora(model, train, layers=[2, 3, 4, 5], lr=1e-2, epochs=3, batch_size=2, grad_accum=2,
                       eval_pairs=text_pairs[8:], output_dir=tmp_path, **QUIET)
    after = full_loss(L.load_adapter(model, res.adapter_path), train)
    assert after < before - 0.05
    assert res.history[-1].loss < res.history[1].loss
    assert [h.epoch for h in res.history] == [0, 1, 2, 3] and res.steps == 6 and res.fast_path == "gemma3"
    assert res.n_eval == len(text_pairs) - 8 and 0 <= res.final.flip_rate <= 1
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == 6
    fig = res.figure()
    flip = next(tr for tr in fig.data if tr.name == "flip rate")
    assert fig.layout[flip.yaxis.replace("y", "yaxis")].range == (0, 1.02)  # rates on 0..100%, never below 0
    assert flip.error_y.array is not None and len(fig.data) == 7


def test_held_out_epoch_metrics_carry_exact_intervals_and_the_scale_free_measure():
    # distinct questions, no images: every pair is its own cluster, so Clopper-Pearson applies as is
    pairs = [ParaphrasePair(f"p{i}", f"Is there finding {i}?", f"any finding {i} at all?", answer="yes")
             for i in range(36)]
    rng = np.random.default_rng(0)
    ma = torch.tensor(rng.normal(1.0, 1.0, 36))
    mb = torch.tensor(rng.normal(1.0, 1.0, 36))
    m = L.pair_metrics(ma, mb, pairs)
    k = int(((ma > 0) != (mb > 0)).sum())
    assert m["flip_rate"] == k / 36
    assert m["flip_rate_ci"] == pytest.approx(proportion_confint(k, 36, method="beta"))
    n_ok = int((ma > 0).sum() + (mb > 0).sum())
    naive = proportion_confint(n_ok, 72, method="beta")  # a pair's two phrasings share a cluster: never narrower
    lo, hi = m["accuracy_ci"]
    assert lo <= n_ok / 72 <= hi and hi - lo >= naive[1] - naive[0] - 1e-12
    d = (ma - mb).abs().numpy()
    assert m["relative_margin_diff"] == pytest.approx(d.mean() / ((ma.abs() + mb.abs()).numpy() / 2).mean())
    lo, hi = m["mean_margin_diff_ci"]
    assert lo < d.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * d.std(ddof=1) / 6, rel=0.25)  # ~ a t interval
    # halving every margin changes no decision: the scale-free measure does not move
    half = L.pair_metrics(ma / 2, mb / 2, pairs)
    assert half["relative_margin_diff"] == pytest.approx(m["relative_margin_diff"])
    assert half["mean_margin_diff"] == pytest.approx(m["mean_margin_diff"] / 2)
    none = L.pair_metrics(torch.ones(36), torch.ones(36), pairs)  # 0/36 flips: the exact interval, not [0, 0]
    assert none["flip_rate_ci"][0] == 0 and none["flip_rate_ci"][1] == pytest.approx(0.0974, abs=1e-4)


def test_resume_from_a_checkpoint_continues_identically(text_pairs, tmp_path):
    kw = dict(layers=[3, 4], lr=5e-3, epochs=2, batch_size=2, grad_accum=2, eval_pairs=text_pairs[12:14], **QUIET)
    train = text_pairs[:8]  # 4 micro-batches: 2 optimizer steps per epoch
    straight = L.train_lora(fresh(), train, output_dir=tmp_path / "a", **kw)
    # stop in the middle of epoch 1, then rerun: it resumes from that checkpoint
    first = L.train_lora(fresh(), train, output_dir=tmp_path / "b", max_steps=1, **kw)
    assert first.steps == 1 and first.history[-1].epoch == 0.5
    resumed = L.train_lora(fresh(), train, output_dir=tmp_path / "b", **kw)
    a = load_file(str(straight.adapter_path / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_path / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.steps == straight.steps == 4
    assert [h.to_dict() for h in straight.history] == [h.to_dict() for h in resumed.history if h.epoch != 0.5]
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002", "step-000004"]
    files = {p.name for p in (tmp_path / "b" / "checkpoints" / "step-000002").iterdir()}
    assert files == {"adapter", "optimizer.safetensors", "rng.safetensors", "state.json"}  # no pickles
    with pytest.raises(interp.InterpError, match="other settings"):
        L.train_lora(fresh(), train, output_dir=tmp_path / "b", **{**kw, "lr": 1e-3})


def test_qlora_is_refused_on_the_cpu(tiny_medgemma, text_pairs, tmp_path):
    with pytest.raises(interp.InterpError, match="CUDA"):
        L.train_lora(tiny_medgemma, text_pairs, layers=[1], qlora=True, output_dir=tmp_path, **QUIET)


def test_pure_consistency_training_collapses_to_a_constant_answer(tmp_path):
    pairs = [p for p in builtin("register") if p.answer is not None and p.same_polarity][:16]
    kw = dict(layers="all", eval_pairs=pairs, lr=5e-3, epochs=8, batch_size=4, grad_accum=1, dropout=0.0, **QUIET)
    out = {}
    for ce_weight in (0.0, 1.0):
        model = fresh()
        res = L.train_lora(model, pairs, ce_weight=ce_weight, output_dir=tmp_path / str(ce_weight), **kw)
        adapted = L.load_adapter(model, res.adapter_path)
        m = torch.cat([consistency.margins(adapted, [p.prompt_a() for p in pairs]),
                       consistency.margins(adapted, [p.prompt_b() for p in pairs])])
        out[ce_weight] = (res, m)
    gold = np.array([p.answer == "yes" for p in pairs] * 2)
    res, m = out[0.0]
    assert torch.all(m > 0) or torch.all(m < 0)  # one answer for every question: perfectly "consistent"
    constant = bool(m[0] > 0)
    assert res.final.flip_rate == 0 and res.final.accuracy == pytest.approx(np.mean(gold == constant))
    res, m = out[1.0]  # the CE term keeps the answers tied to the gold labels
    assert (m > 0).any() and (m < 0).any()
    assert res.final.accuracy >= 0.8 > max(gold.mean(), 1 - gold.mean())
    assert np.mean((m.numpy() > 0) == gold) == pytest.approx(res.final.accuracy)


def test_distributed_training_matches_one_process(tmp_path):
    """Two CPU processes (gloo, as under accelerate launch) give the adapter one process gives."""
    settings = dict(layers=[2, 3], epochs=1, batch_size=1, grad_accum=4, lr=1e-2, dropout=0.1, progress=False)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, warnings
        warnings.filterwarnings("ignore")
        import interp
        from interp import lora as L
        from interp.dist import rank_and_world
        from interp.data import builtin
        pairs = [p for p in builtin("register") if p.answer is not None][:8]
        L.train_lora(interp.load("tiny-medgemma"), pairs, eval_pairs=pairs[:2], output_dir=sys.argv[1], **{settings!r})
        rank, world = rank_and_world()
        open(sys.argv[1] + f"/world-{{rank}}.txt", "w").write(str(world))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(tmp_path / "two")], check=True, env=env, capture_output=True, timeout=120)
    pairs = [p for p in builtin("register") if p.answer is not None][:8]
    L.train_lora(fresh(), pairs, eval_pairs=pairs[:2], output_dir=tmp_path / "one", **settings)
    assert [(tmp_path / "two" / f"world-{r}.txt").read_text() for r in (0, 1)] == ["2", "2"]
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    for k in one:
        # Adam moves each weight by about lr per step, so reduction-order noise in a near-zero gradient
        # shows as a small fraction of lr; anything real would be of order lr
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=2e-3 * settings["lr"])
    assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora_B" in k)
    hist = [json.loads((tmp_path / d / "result.json").read_text())["history"] for d in ("one", "two")]
    assert hist[0][-1]["loss"] == pytest.approx(hist[1][-1]["loss"], rel=1e-6)


# ---- merging --------------------------------------------------------------------------------------
def test_merge_bakes_in_the_adapter_and_verifies_it(image_pairs):
    model = fresh()
    pm = L._peft_wrap(model, [1, 2], r=4, alpha=8, dropout=0.0, target_modules=DEFAULT_TARGET_MODULES, seed=0)
    randomize_lora(pm.hf)
    prompts = [p.prompt_a() for p in image_pairs[:2]]
    want = logits_of(pm, prompts)
    embed_before = model.hf.get_input_embeddings().weight.clone()
    merged = L.merge(pm)
    torch.testing.assert_close(logits_of(merged, prompts), want, rtol=1e-4, atol=1e-4)
    rep = merged.merge_report
    assert rep.passed and rep.unchanged_elsewhere and len(rep.relative_delta) == 14
    assert all(v > 1e-4 for v in rep.relative_delta.values())
    assert all(v == pytest.approx(1.0, rel=1e-3) for v in rep.agreement.values())
    assert not any("lora" in n for n, _ in merged.hf.named_modules())
    assert torch.equal(merged.hf.get_input_embeddings().weight, embed_before)


def test_merge_verification_catches_a_zero_adapter_and_stray_changes():
    pm = L._peft_wrap(fresh(), [1, 2], r=4, alpha=8, dropout=0.0, target_modules=DEFAULT_TARGET_MODULES, seed=0)
    with pytest.raises(interp.InterpError, match="zero"):  # lora_B starts at zero: an untrained adapter
        L.merge(pm)
    randomize_lora(pm.hf)
    original = pm.hf.merge_and_unload

    def sloppy_merge():
        out = original()
        with torch.no_grad():
            out.get_input_embeddings().weight[0, 0] += 1.0  # something outside the adapted modules moves
        return out

    pm.hf.merge_and_unload = sloppy_merge
    with pytest.raises(interp.InterpError, match="outside the adapted modules"):
        L.merge(pm)


def test_merge_refuses_a_4bit_base_and_a_model_without_adapter():
    pm = L._peft_wrap(fresh(), [1], r=2, alpha=2, dropout=0.0, target_modules=["q_proj"], seed=0)
    pm.hf.get_base_model().is_loaded_in_4bit = True
    with pytest.raises(interp.InterpError, match="bf16"):
        L.merge(pm)
    with pytest.raises(interp.InterpError, match="no adapter"):
        L.merge(fresh())


# ---- ablation -------------------------------------------------------------------------------------
def test_ablate_layers_trains_one_adapter_per_range_from_the_same_base(text_pairs, tmp_path):
    model = fresh()
    before = {n: p.clone() for n, p in model.hf.named_parameters()}
    ranges = {"early": range(0, 2), "selected": LayerSelection((2, 3), 6), "all": "all"}
    rep = L.ablate_layers(model, text_pairs[:10], ranges, eval_pairs=text_pairs[10:], epochs=1, grad_accum=2,
                          batch_size=2, lr=5e-3, output_dir=tmp_path, **QUIET)
    t = rep.table
    assert list(t["arm"]) == ["baseline", "early", "selected", "all"]
    assert list(t["layers"]) == ["", "0-1", "2-3", "0-5"]
    assert t["trainable_params"].iloc[3] == 3 * t["trainable_params"].iloc[1]
    for arm in ("early", "selected", "all"):
        res = rep.results[arm]
        assert res.config["train_digest"] == rep.results["early"].config["train_digest"]
        # the arm's own evaluation agrees with the held-out metrics recorded at the end of its training
        row = t[t["arm"] == arm].iloc[0]
        assert row["flip_rate"] == pytest.approx(res.final.flip_rate, abs=1e-9)
        assert row["accuracy"] == pytest.approx(res.final.accuracy, abs=1e-9)
        assert row["mean_margin_diff"] == pytest.approx(res.final.mean_margin_diff, rel=1e-4)
    assert t["flip_rate"].iloc[0] == pytest.approx(rep.results["early"].history[0].flip_rate)
    # the statistics are the consistency module's comparison of each arm with the baseline
    cmp = rep.reports["baseline"].compare(rep.reports["all"])
    assert t["p_flip"].iloc[3] == cmp.p_flip and t["p_flip_z_unpaired"].iloc[3] == cmp.p_z
    assert t["p_margin"].iloc[3] == cmp.p_wilcoxon and t["p_accuracy"].iloc[3] == cmp.p_accuracy_paired
    assert np.isnan(t["p_flip"].iloc[0])
    for col in ("relative_margin_diff", "mean_abs_margin", "yes_rate", "flip_rate_ci", "flip_rate_delta_ci"):
        assert col in t.columns
    # arms against the reference arm ('selected'), paired on the same held-out pairs, checked independently
    assert rep.reference == "selected" and list(rep.between["arm"]) == ["early", "all"]
    early, sel = rep.reports["early"].table.set_index("id"), rep.reports["selected"].table.set_index("id")
    early = early.loc[sel.index]
    row = rep.between.set_index("arm").loc["early"]
    assert row["flip_rate_delta"] == pytest.approx(early["flip"].mean() - sel["flip"].mean())
    b, c = int((sel["flip"] & ~early["flip"]).sum()), int((~sel["flip"] & early["flip"]).sum())
    if rep.comparisons["early vs selected"].n_clusters == len(sel):  # no clusters: exact McNemar = binomial test
        assert row["p_flip"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue if b + c else 1.0)
    diff = early["margin_diff"].to_numpy() - sel["margin_diff"].to_numpy()
    assert row["p_margin"] == pytest.approx(wilcoxon(early["margin_diff"], sel["margin_diff"]).pvalue
                                            if np.any(diff) else 1.0)
    assert row["margin_diff_relative"] == pytest.approx(early["margin_diff"].mean() / sel["margin_diff"].mean() - 1)
    lo, hi = row["margin_diff_relative_ci"]
    assert lo <= row["margin_diff_relative"] <= hi
    assert "against 'selected'" in repr(rep) and rep.to_dict()["between"][0]["vs"] == "selected"
    assert all(torch.equal(p, before[n]) for n, p in model.hf.named_parameters())  # the base is untouched
    assert len(rep.figure().data) == 3 and "baseline" in repr(rep)


# ---- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_few_steps_on_gemma3_270m_layers_5_to_9(gemma270m, tmp_path):
    pairs = [p for p in builtin("register") if p.answer is not None][:6]
    pm = L._peft_wrap(gemma270m, list(range(5, 10)), r=16, alpha=32, dropout=0.0,
                      target_modules=DEFAULT_TARGET_MODULES, seed=0)
    try:
        randomize_lora(pm.hf, std=0.01)
        cfg = dict(ce_weight=1.0, kl_weight=1.0, kl_space="yes_no")
        fast, plain = L._Trainer(pm, 5, cfg, fast=True, cache=True), L._Trainer(pm, 5, cfg, fast=False, cache=False)
        assert fast.runner.kind == "gemma3"
        lf, lp = fast.loss(pairs[:1], ["a"]), plain.loss(pairs[:1], ["a"])
        assert float(lf.total.detach()) == pytest.approx(float(lp.total.detach()), rel=1e-4)
    finally:
        pm.hf.unload()
    res = L.train_lora(gemma270m, pairs[:4], layers=range(5, 10), eval_pairs=pairs[4:], max_steps=2, grad_accum=2,
                       lr=1e-3, output_dir=tmp_path, **QUIET)
    assert res.steps == 2 and res.fast_path == "gemma3" and math_isfinite(res.final.loss)
    wanted = expected_modules(gemma270m, set(range(5, 10)))
    linears = dict(gemma270m.hf.named_modules())
    assert res.trainable_params == sum(16 * (linears[n].in_features + linears[n].out_features) for n in wanted)
    report = L.adapter_report(L.load_adapter(interp.load("gemma3-270m"), res.adapter_path))
    assert report.language_layers == (5, 6, 7, 8, 9) and set(report.modules) == wanted and len(wanted) == 35


def math_isfinite(x) -> bool:
    return x is not None and bool(np.isfinite(x))


def test_row_dropout_masks_depend_on_the_example_not_on_the_batch_or_padding():
    """The per-example dropout hash: same mask for an example alone or fused with others, zero on padding,
    the requested rate, and no correlation between examples."""
    from interp.lora import _DropoutRows, _RowDropout

    ctx = _DropoutRows()
    drop = _RowDropout(0.1, salt=7, ctx=ctx).train()
    x = torch.ones(4, 50, 96)
    with ctx.rows([11, 12, 13, 14]):
        ctx.lengths = [50, 30, 50, 10]
        fused = drop(x)
    with ctx.rows([12]):
        ctx.lengths = [30]
        alone = drop(torch.ones(1, 30, 96))
    assert torch.equal(fused[1, :30], alone[0])
    assert (fused[1, 30:] == 0).all() and (fused[3, 10:] == 0).all()
    kept = fused[[0, 2]] != 0
    rate = 1 - kept.float().mean().item()
    assert abs(rate - 0.1) < 0.01, rate
    assert torch.allclose(fused[fused != 0], torch.tensor(1 / 0.9))
    both = (~kept[0] & ~kept[1]).float().mean().item()
    assert abs(both - 0.01) < 0.004, both  # independent rows: P(both dropped) = p^2
    other = _RowDropout(0.1, salt=8, ctx=ctx).train()  # another module: another mask
    with ctx.rows([11]):
        ctx.lengths = [50]
        assert not torch.equal(other(torch.ones(1, 50, 96)) != 0, kept[0:1])


def test_layers_chosen_on_the_evaluation_pairs_are_said_not_held_out(tiny_medgemma, text_pairs, tmp_path):
    """A LayerSelection keeps the pairs whose profile chose it; train_lora checks its held-out pairs against
    them by cluster (a renamed copy of a selecting pair is still in-sample)."""
    import dataclasses

    from interp.data import split

    chooser, held = split(text_pairs, 0.25, seed=0)
    sel = interp.find_layers(tiny_medgemma, chooser, width=2, method="residual", progress=False)
    assert sel.selection_pairs == tuple(chooser) and sel.to_depth(12).selection_pairs == tuple(chooser)
    kw = dict(layers=sel, max_steps=1, grad_accum=2, **QUIET)
    res = L.train_lora(tiny_medgemma, chooser[:4], eval_pairs=held, output_dir=tmp_path / "held", **kw)
    assert res.config["eval_held_out_from_layer_selection"] is True
    renamed = [dataclasses.replace(p, id=f"eval-{p.id}") for p in chooser[:3]]
    with pytest.warns(UserWarning, match=r"not held out from the layer selection: IN-SAMPLE: 3 of the 3 evaluation"
                                         r" pairs .* selected the layers"):
        res = L.train_lora(tiny_medgemma, chooser[:4], eval_pairs=renamed, output_dir=tmp_path / "in", **kw)
    assert res.config["eval_held_out_from_layer_selection"] is False
    manual = LayerSelection((1, 2), tiny_medgemma.n_layers)
    res = L.train_lora(tiny_medgemma, chooser[:4], eval_pairs=held, output_dir=tmp_path / "manual",
                       **{**kw, "layers": manual})
    assert res.config["eval_held_out_from_layer_selection"] is None  # chosen by hand: unknown, said so
