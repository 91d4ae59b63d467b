"""Adapters and run folders under hostile input: a user's files survive, bad settings and bad files are named
before any work, corrupt checkpoints fall back, adapter keys must fit, and the base model stays the base."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import interp
from interp import consistency
from interp import lora as L
from interp._errors import AdapterMismatchError, ForeignFilesError
from interp._io import OUTPUT_MARKER
from interp.data import ParaphrasePair, builtin
from interp.layers import DEFAULT_TARGET_MODULES

QUIET = dict(progress=False)
QUICK = dict(eval_pairs=None, max_steps=1, grad_accum=2, batch_size=1, **QUIET)


@pytest.fixture(scope="module")
def pairs() -> list[ParaphrasePair]:
    return [p for p in builtin("register") if p.answer is not None][:6]


def fresh(name: str = "tiny-medgemma") -> interp.Model:
    return interp.load(name)


def logits(model: interp.Model, prompts=("Is there a pleural effusion?", "is the heart too big?")) -> torch.Tensor:
    return consistency.answer_logits(model, list(prompts), full_vocab=True)


def saved_adapter(folder, name: str = "tiny-medgemma", layers=(1, 2), seed: int = 1) -> interp.Model:
    """A non-zero adapter saved by PEFT itself; returns the adapted model it came from."""
    pm = L._peft_wrap(fresh(name), list(layers), r=4, alpha=8, dropout=0.0, target_modules=DEFAULT_TARGET_MODULES,
                      seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.hf.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.hf.save_pretrained(folder)
    return pm


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---- a user's files survive every call ---------------------------------------------------------------
def test_a_folder_of_user_files_is_refused_and_left_untouched(tiny_medgemma, pairs, tmp_path):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "checkpoints" / "draft.ckpt").write_bytes(b"\x00" * 10)
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"a user's own adapter")
    before = snapshot(out)
    with pytest.raises(ForeignFilesError, match="notes.txt") as err:
        L.train_lora(tiny_medgemma, pairs, layers=[1], output_dir=out, **QUICK)
    assert "new or empty folder" in str(err.value)
    assert snapshot(out) == before and not (out / OUTPUT_MARKER).exists()
    for resume in (True, False):  # the marker alone does not let train_lora into its subfolders' foreign files
        (out / OUTPUT_MARKER).write_text("{}")
        (out / "notes.txt").unlink()
        with pytest.raises(ForeignFilesError, match="draft.ckpt"):
            L.train_lora(tiny_medgemma, pairs, layers=[1], output_dir=out, resume=resume, **QUICK)
        (out / "notes.txt").write_text("my notes")
        (out / OUTPUT_MARKER).unlink()
        assert snapshot(out) == before


def test_our_runs_and_marked_folders_are_written_and_other_files_there_survive(tiny_medgemma, pairs, tmp_path):
    run = tmp_path / "run"
    L.train_lora(tiny_medgemma, pairs, layers=[1], output_dir=run, **QUICK)
    assert (run / OUTPUT_MARKER).is_file() and (run / "checkpoints" / "step-000001").is_dir()
    (run / "my_plot.png").write_bytes(b"png")  # a user's file beside our run, in a folder we marked
    for resume in (False, True):
        res = L.train_lora(tiny_medgemma, pairs, layers=[1], output_dir=run, resume=resume, **QUICK)
        assert res.steps == 1 and (run / "my_plot.png").read_bytes() == b"png"
    # run_loop's layout: out/ carries the marker (and other outputs), train_lora writes out/adapter
    out = tmp_path / "loop"
    out.mkdir()
    (out / OUTPUT_MARKER).write_text(json.dumps({"written_by": "interp"}))
    (out / "report.md").write_text("report")
    res = L.train_lora(tiny_medgemma, pairs, layers=[1], output_dir=out / "adapter", **QUICK)
    assert (res.adapter_path / "adapter_model.safetensors").is_file() and (out / "report.md").read_text() == "report"
    # an earlier run written before the marker existed is still ours
    (run / OUTPUT_MARKER).unlink()
    (run / "my_plot.png").unlink()
    assert L.check_output_dir(run) == run
    with pytest.raises(interp.InterpError, match="is a file"):
        L.train_lora(tiny_medgemma, pairs, layers=[1], output_dir=tmp_path / "run" / "result.json", **QUICK)


# ---- settings: a clear error before any work ---------------------------------------------------------
@pytest.mark.parametrize("kw,name", [
    (dict(lr=0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=-1e-3), "lr"), (dict(r=0), "r"), (dict(r=2.5), "r"),
    (dict(alpha=0), "alpha"), (dict(alpha=float("inf")), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"), (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"),
    (dict(grad_accum=0), "grad_accum"), (dict(kl_weight=-1), "kl_weight"), (dict(ce_weight=-0.5), "ce_weight"),
    (dict(ce_weight=0, kl_weight=0), "both"), (dict(max_steps=0), "max_steps"), (dict(lr="2e-4"), "lr"),
    (dict(target_modules="qproj"), "q_proj"), (dict(target_modules=["q_proj", "attn_out"]), "attn_out"),
    (dict(target_modules=[]), "non-empty"), (dict(target_modules="(unclosed"), "regular expression"),
    (dict(target_modules=r".*\.nothing_here"), "matches no module")])
def test_invalid_lora_settings_are_named_before_any_work(tiny_medgemma, pairs, tmp_path, kw, name):
    with pytest.raises(interp.InterpError, match=name):
        L.train_lora(tiny_medgemma, pairs, layers=[1, 2], output_dir=tmp_path / "out", **{**QUICK, **kw})
    assert not (tmp_path / "out").exists()  # nothing was written, nothing was wrapped
    assert not hasattr(tiny_medgemma.hf, "peft_config")


def test_target_modules_as_one_name_or_a_regex(pairs, tmp_path):
    model = fresh()
    prefix = model.layers_path
    res = L.train_lora(model, pairs, layers=[1, 2], target_modules="q_proj", output_dir=tmp_path / "a", **QUICK)
    report = L.adapter_report(L.load_adapter(model, res.adapter_path))
    assert set(report.modules) == {f"{prefix}.{i}.self_attn.q_proj" for i in (1, 2)}  # not 'q', '_', 'p', ...
    # a regex (PEFT's rule for a string) that also matches SigLIP's attention: only the adapted layers get it
    assert any("vision" in n and n.endswith("self_attn.v_proj") for n, _ in model.hf.named_modules())
    res = L.train_lora(model, pairs, layers=[3], target_modules=r".*\.self_attn\.(q|v)_proj",
                       output_dir=tmp_path / "b", **QUICK)
    report = L.adapter_report(L.load_adapter(model, res.adapter_path))
    assert set(report.modules) == {f"{prefix}.3.self_attn.q_proj", f"{prefix}.3.self_attn.v_proj"}
    assert not report.touches_vision and res.config["target_modules"] == r".*\.self_attn\.(q|v)_proj"


# ---- checkpoints: a corrupt one falls back to the one before it --------------------------------------
@pytest.fixture(scope="module")
def two_epoch_run(pairs, tmp_path_factory):
    kw = dict(layers=[2, 3], lr=5e-3, epochs=2, batch_size=2, grad_accum=2, eval_pairs=None, **QUIET)
    folder = tmp_path_factory.mktemp("straight")
    res = L.train_lora(fresh(), pairs, output_dir=folder, **kw)
    return kw, res, load_file(str(res.adapter_path / "adapter_model.safetensors"))


@pytest.mark.parametrize("damage", ["truncated optimizer", "truncated adapter", "malformed state.json",
                                    "state.json wrong type", "missing rng"])
def test_resume_skips_a_corrupt_checkpoint_and_continues_from_the_previous_one(two_epoch_run, pairs, tmp_path,
                                                                               damage):
    kw, straight, want = two_epoch_run
    out = tmp_path / "run"
    L.train_lora(fresh(), pairs, output_dir=out, **kw)
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002", "step-000004"]
    last = ck / "step-000004"
    if damage == "truncated optimizer":
        f = last / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "truncated adapter":
        f = last / "adapter" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif damage == "malformed state.json":
        (last / "state.json").write_text('{"format": "interp.lora-checkpoint/1", "glob')
    elif damage == "state.json wrong type":
        state = json.loads((last / "state.json").read_text())
        (last / "state.json").write_text(json.dumps({**state, "global_step": "four"}))
    else:
        (last / "rng.safetensors").unlink()
    (out / "adapter").rename(tmp_path / "adapter_moved")  # so the adapter must come from the resumed run
    with pytest.warns(UserWarning, match="step-000004"):
        res = L.train_lora(fresh(), pairs, output_dir=out, **kw)
    got = load_file(str(res.adapter_path / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # bit for bit
    assert res.steps == straight.steps == 4
    assert [h.to_dict() for h in res.history] == [h.to_dict() for h in straight.history]


def test_every_checkpoint_corrupt_starts_over_with_a_warning(two_epoch_run, pairs, tmp_path):
    kw, straight, want = two_epoch_run
    out = tmp_path / "run"
    L.train_lora(fresh(), pairs, output_dir=out, **kw)
    for d in (out / "checkpoints").iterdir():
        (d / "state.json").write_bytes(b"\xff\xfe not json")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        res = L.train_lora(fresh(), pairs, output_dir=out, **kw)
    got = load_file(str(res.adapter_path / "adapter_model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---- load_adapter: keys must fit; known renamings are mapped ------------------------------------------
def rewrite(src, dst, *, keys=None, config=None) -> None:
    """Copy an adapter folder, passing its weights through ``keys(dict) -> dict`` and config through ``config``."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file(keys(tensors) if keys else tensors, str(dst / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(config(cfg) if config else cfg))


def test_keys_that_match_no_module_are_refused(tmp_path):
    saved_adapter(tmp_path / "a")
    rewrite(tmp_path / "a", tmp_path / "foreign",
            keys=lambda t: {k.replace("model.language_model.layers", "decoder.blocks"): v for k, v in t.items()})
    with pytest.raises(AdapterMismatchError, match="none of the 28 weights.*decoder.blocks"):
        L.load_adapter(fresh(), tmp_path / "foreign")
    rewrite(tmp_path / "a", tmp_path / "missing", keys=lambda t: {k: v for k, v in t.items() if "q_proj" not in k})
    with pytest.raises(AdapterMismatchError, match="4 adapted module weight.*q_proj") as err:
        L.load_adapter(fresh(), tmp_path / "missing")
    assert "stay zero" in str(err.value)
    extra = "base_model.model.model.language_model.layers.1.mlp.extra_proj.lora_A.weight"
    rewrite(tmp_path / "a", tmp_path / "extra", keys=lambda t: {**t, extra: torch.zeros(4, 8)})
    with pytest.raises(AdapterMismatchError, match="extra_proj"):
        L.load_adapter(fresh(), tmp_path / "extra")
    key = next(k for k in load_file(str(tmp_path / "a" / "adapter_model.safetensors")) if "lora_A" in k)
    rewrite(tmp_path / "a", tmp_path / "shape", keys=lambda t: {**t, key: torch.zeros(3, t[key].shape[1])})
    with pytest.raises(AdapterMismatchError, match="shape"):
        L.load_adapter(fresh(), tmp_path / "shape")


@pytest.mark.parametrize("arch,old,new,pattern", [
    # transformers 4.x Gemma 3 VLM naming, as older MedGemma adapters were saved
    ("tiny-medgemma", "model.language_model.layers.", "language_model.model.layers.", "model.layers"),
    # the original LLaVA code base (LLaVA-Rad): the decoder at model.layers
    ("tiny-llava", "model.language_model.layers.", "model.layers.", "model.layers"),
    # ... saved with layers_pattern "layers", which on this model also matches SigLIP's encoder layers
    ("tiny-llava", "model.language_model.layers.", "model.layers.", "layers")])
def test_an_adapter_saved_in_another_layout_is_mapped_and_gives_the_same_logits(tmp_path, arch, old, new, pattern):
    src = saved_adapter(tmp_path / "a", name=arch)
    want = logits(src)
    rewrite(tmp_path / "a", tmp_path / "old", keys=lambda t: {k.replace(old, new): v for k, v in t.items()},
            config=lambda c: {**c, "layers_pattern": pattern})
    assert all(new in k for k in load_file(str(tmp_path / "old" / "adapter_model.safetensors")))
    with pytest.warns(UserWarning, match="another module layout"):
        model = L.load_adapter(fresh(arch), tmp_path / "old")
    assert torch.equal(logits(model), want)
    report = L.adapter_report(model)
    assert report.language_layers == (1, 2) and not report.touches_vision
    assert set(report.modules) == set(L.adapter_report(src).modules)


def test_bad_adapter_files_get_clear_errors(tmp_path):
    saved_adapter(tmp_path / "a")
    cases = {
        "not valid JSON": lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": '),
        "peft_type": lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"})),
        "holds a list": lambda d: (d / "adapter_config.json").write_text("[1, 2]"),
        "r=0": lambda d: (d / "adapter_config.json").write_text(json.dumps(
            {**json.loads((tmp_path / "a" / "adapter_config.json").read_text()), "r": 0})),
        "corrupt or truncated": lambda d: (d / "adapter_model.safetensors").write_bytes(
            (tmp_path / "a" / "adapter_model.safetensors").read_bytes()[:200]),
    }
    for i, (message, damage) in enumerate(cases.items()):
        d = tmp_path / f"bad{i}"
        rewrite(tmp_path / "a", d)
        damage(d)
        with pytest.raises(interp.InterpError, match=message):
            L.load_adapter(fresh(), d)


def test_another_base_model_name_warns(tmp_path):
    saved_adapter(tmp_path / "a")
    rewrite(tmp_path / "a", tmp_path / "b", config=lambda c: {**c, "base_model_name_or_path": "google/medgemma-27b"})
    with pytest.warns(UserWarning, match="medgemma-27b"):
        L.load_adapter(fresh(), tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own adapter on its own base: no warning
        L.load_adapter(fresh(), tmp_path / "a")


# ---- the base model stays the base --------------------------------------------------------------------
def test_the_base_model_is_unchanged_after_load_adapter_and_merge(pairs, tmp_path):
    model = fresh()
    src = saved_adapter(tmp_path / "a")
    base_logits = logits(model)
    base_report = interp.evaluate(model, pairs, progress=False)
    params = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    adapted = L.load_adapter(model, tmp_path / "a")
    assert torch.equal(logits(adapted), logits(src)) and not torch.equal(logits(adapted), base_logits)
    assert torch.equal(logits(model), base_logits)  # evaluate(model) scores the base, not the adapter
    again = interp.evaluate(model, pairs, progress=False)
    assert np.array_equal(again.table["margin_a"], base_report.table["margin_a"])
    assert not hasattr(model.hf, "peft_config") and not any("lora" in n for n, _ in model.hf.named_modules())
    # a plain PEFT load onto a fresh base gives exactly what load_adapter gave
    other = fresh()
    plain = PeftModel.from_pretrained(other.hf, str(tmp_path / "a")).eval()
    assert torch.equal(logits(L._rewrap(other, plain)), logits(adapted))
    # a second adapter, and a second training run, on the same base
    second = L.load_adapter(model, tmp_path / "a")
    assert torch.equal(logits(second), logits(adapted))
    res = L.train_lora(model, pairs, layers=[3], output_dir=tmp_path / "run", **QUICK)
    assert res.steps == 1 and torch.equal(logits(model), base_logits)
    merged = L.merge(adapted)
    torch.testing.assert_close(logits(merged), logits(src), rtol=1e-4, atol=1e-4)
    assert torch.equal(logits(model), base_logits)
    assert all(torch.equal(p, params[n]) for n, p in model.hf.named_parameters())
    assert all(p.requires_grad for p in model.hf.parameters())  # PEFT's freezing did not leak into the base


def test_our_adapters_load_with_plain_peft(pairs, tmp_path):
    model = fresh()
    res = L.train_lora(model, pairs, layers=[1, 2], lr=5e-2, output_dir=tmp_path, **QUICK)
    ours = L.load_adapter(model, res.adapter_path)
    other = fresh()
    plain = PeftModel.from_pretrained(other.hf, str(res.adapter_path)).eval()
    assert torch.equal(logits(L._rewrap(other, plain)), logits(ours))
    assert not torch.equal(logits(ours), logits(model))  # one step moved the adapter off zero
