"""LoRA training memory: `_DroppedA` (dropout folded into ``lora_A``) against PEFT's own dropout-then-``lora_A``.

Each test runs the same work through ``_row_dropout(..., fold=False)`` (PEFT's cast, `_RowDropout`, ``lora_A``)
and the default folded path, and compares values, gradients, saved activations, checkpoints and training runs.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import interp
from interp import hf as H
from interp import lora as L
from interp.data import ParaphrasePair, builtin
from interp.layers import DEFAULT_TARGET_MODULES

LO = 2  # lowest adapted layer of the tiny model (6 layers, d_model 64, MLP 128)


@pytest.fixture(scope="module")
def text_pairs() -> list[ParaphrasePair]:
    return [p for p in builtin("register") if p.answer is not None][:10]


@pytest.fixture(autouse=True)
def fold_every_pass(monkeypatch):
    """These tests' passes are a few dozen tokens: fold them all (the threshold has its own test)."""
    monkeypatch.setattr(L._DroppedA, "FOLD_MIN_TOKENS", 0)


def wrapped(dtype: torch.dtype, dropout: float, layers=(LO, LO + 1), r: int = 4) -> interp.Model:
    """Tiny MedGemma with adapters on ``layers`` and non-zero B matrices (else every A gradient is zero)."""
    pm = L._peft_wrap(interp.load("tiny-medgemma", dtype=dtype), list(layers), r=r, alpha=2 * r, dropout=dropout,
                      target_modules=DEFAULT_TARGET_MODULES, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.hf.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.hf.eval()
    for i in range(LO, pm.n_layers):
        pm.layers[i].train()
    return pm


def lora_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if "lora_" in n}


def upper_pass(pm: interp.Model, dtype: torch.dtype, *, fold: bool, checkpoint: bool = False, saved=None):
    """Layers LO.. on a padded batch (rows of 9, 5 and 7 real tokens): output, input grad, LoRA grads.
    ``saved``: a list that collects every tensor autograd saves during the forward pass."""
    gen = torch.Generator().manual_seed(3)
    lengths = [9, 5, 7]
    resid = torch.randn(3, 9, 64, generator=gen).to(dtype).requires_grad_()
    weights = torch.randn(3, 9, 64, generator=gen)
    attn = (torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]).long()
    runner = L._Runner(pm, LO, cache=False)
    ctx = runner.dropout_rows
    for p in pm.hf.parameters():
        p.grad = None

    def pack(t):
        saved.append(t)
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if saved is not None else nullcontext()
    with L._row_dropout(pm.hf, ctx, fold=fold), ctx.rows([5, 6, 7]):
        ctx.lengths = lengths
        with hooks:
            out = H.run_from_layer(runner.body, runner.layers, LO, resid, attn, checkpoint=checkpoint)
        (out.float() * weights).sum().backward()
    return out.detach(), resid.grad, {n: p.grad for n, p in lora_params(pm.hf).items()}


def assert_grads_close(new: dict, old: dict) -> None:
    assert new.keys() == old.keys() and all(g is not None for g in old.values())
    for name, g in old.items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(new[name], g, rtol=1e-6, atol=1e-6 * float(g.abs().max()), msg=name)


# ---- same values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_folded_dropout_gives_peft_outputs_bitwise_and_its_gradients(dtype, p):
    pm = wrapped(dtype, p)
    old_out, old_dx, old_g = upper_pass(pm, dtype, fold=False)
    new_out, new_dx, new_g = upper_pass(pm, dtype, fold=True)
    ckpt_out, ckpt_dx, ckpt_g = upper_pass(pm, dtype, fold=True, checkpoint=True)
    assert torch.equal(new_out, old_out) and torch.equal(ckpt_out, old_out)
    assert_grads_close(new_g, old_g)
    assert_grads_close(ckpt_g, old_g)
    assert new_dx.dtype == dtype
    torch.testing.assert_close(new_dx.float(), old_dx.float(), rtol=1e-6, atol=1e-6 * float(old_dx.abs().max()))
    torch.testing.assert_close(ckpt_dx.float(), old_dx.float(), rtol=1e-6, atol=1e-6 * float(old_dx.abs().max()))
    pm.hf.eval()  # dropout was on: without it (eval mode) the same pass gives other values
    assert not torch.equal(upper_pass(pm, dtype, fold=True)[0], old_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_dropout_a_row_at_a_time_gives_the_same_values(dtype, monkeypatch):
    """`_DroppedLinear` goes through its input in spans of rows: one row per span changes no value beyond
    float rounding of the weight gradient's sum."""
    pm = wrapped(dtype, 0.3)
    whole_out, whole_dx, whole_g = upper_pass(pm, dtype, fold=True)
    monkeypatch.setattr(L._DroppedLinear, "ROWS_ELEMENTS", 1)
    rows_out, rows_dx, rows_g = upper_pass(pm, dtype, fold=True)
    torch.testing.assert_close(rows_out.float(), whole_out.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows_dx.float(), whole_dx.float(), rtol=1e-6, atol=1e-6 * float(whole_dx.abs().max()))
    assert_grads_close(rows_g, whole_g)


@pytest.mark.parametrize("shape", [(3, 5, 13), (2, 7, 3), (4, 1, 8), (1, 3, 24), (2, 1, 1)])
def test_packed_masks_round_trip_whatever_the_row_width(shape):
    """`_pack_mask` keeps 8 values a byte, a row starting on a byte (a span of rows is a slice); rows of a
    width not divisible by 8 end in zero bits, which `_unpack_mask` leaves out."""
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) < 0.5
    n = shape[1] * shape[2]
    packed = torch.full((shape[0], -(-n // 8)), 255, dtype=torch.uint8)  # every byte written over
    L._pack_mask(keep, packed)
    assert torch.equal(L._unpack_mask(packed, keep.shape), keep)
    bits = ((packed[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).view(shape[0], -1)
    assert torch.equal(bits[:, :n].bool(), keep.view(shape[0], -1)) and not bits[:, n:].any()
    assert torch.equal(L._unpack_mask(packed[1:], keep[1:].shape), keep[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_elements", [None, 1])
def test_padding_positions_give_zero_output_and_gradient_at_odd_widths(dtype, rows_elements, monkeypatch):
    """A folded ``lora_A`` of 13 features on rows of 5 positions (65 values: packed rows end mid-byte), padded
    rows included: PEFT's outputs (bitwise when whole; one row per span may round the matmul differently) and
    its gradients, and nothing at the padding positions."""
    if rows_elements is not None:
        monkeypatch.setattr(L._DroppedLinear, "ROWS_ELEMENTS", rows_elements)
    torch.manual_seed(0)
    lin = nn.Linear(13, 4, bias=False)
    x = torch.randn(3, 5, 13, generator=torch.Generator().manual_seed(2)).to(dtype)
    weights = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(3))
    ctx = L._DropoutRows()
    got = {}
    for name, module in (("peft", L._RowDropout(0.4, 7, ctx)), ("folded", L._DroppedA(lin, 0.4, 7, ctx))):
        xi, lin.weight.grad = x.clone().requires_grad_(), None
        with ctx.rows([11, 12, 13]):
            ctx.lengths = [5, 2, 4]
            out = module(xi) if name == "folded" else lin(module(xi.float()))
        (out * weights).sum().backward()
        got[name] = out.detach(), xi.grad, lin.weight.grad
    (out, dx, dw), (old_out, old_dx, old_dw) = got["folded"], got["peft"]
    assert dx.dtype == dtype
    if rows_elements is None:
        assert torch.equal(out, old_out)
    torch.testing.assert_close(out, old_out, rtol=1e-6, atol=1e-6 * float(old_out.abs().max()))
    torch.testing.assert_close(dx.float(), old_dx.float(), rtol=1e-6, atol=1e-6 * float(old_dx.abs().max()))
    torch.testing.assert_close(dw, old_dw, rtol=1e-6, atol=1e-6 * float(old_dw.abs().max()))
    for r, n in enumerate([5, 2, 4]):
        assert not out[r, n:].any() and not dx[r, n:].any()
        assert out[r, :n].abs().sum() > 0 and dx[r, :n].abs().sum() > 0


def test_the_mask_is_hashed_once_per_module_in_the_forward_pass_and_not_in_the_backward(monkeypatch):
    """The backward pass unpacks the masks the forward pass kept; it hashes nothing (on an H200 the recomputed
    hash made folded steps host-bound). With checkpointing, the layer's recomputed forward hashes them again."""
    model = toy_peft(torch.float32)
    calls: list[str] = []
    phase = ["forward"]
    real = L._row_mask
    monkeypatch.setattr(L, "_row_mask", lambda *args: calls.append(phase[0]) or real(*args))
    ctx = L._DropoutRows()
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with L._row_dropout(model, ctx), ctx.rows([1, 2]):
        ctx.lengths = [5, 3]
        folded = [m for m in model.modules() if isinstance(m, L._DroppedA)]
        out = model(x)
        phase[0] = "backward"
        out.pow(2).sum().backward()
    assert len(folded) == 4 and calls == ["forward"] * 4  # q, k, v, o: one hash each, none in the backward
    assert float(x.grad.abs().max()) > 0


class Toy(nn.Module):
    """q/k/v reading one normed input, as in attention: the case the folding saves most on."""

    def __init__(self, d: int = 24):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        return self.o(torch.tanh(self.q(h)) * self.k(h) + self.v(h))


def toy_peft(dtype: torch.dtype, *, dora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(Toy().to(dtype), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                      target_modules=["q", "k", "v", "o"]))
    if dora:  # a second, DoRA adapter on q and v, active together with the first
        model.add_adapter("dora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, use_dora=True,
                                             target_modules=["q", "v"]))
        model.base_model.set_adapter(["default", "dora"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model.train()


def toy_pass(model: nn.Module, x: torch.Tensor, *, fold: bool, seeds: list[int] | None):
    ctx = L._DropoutRows()
    x = x.clone().requires_grad_()
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(9)  # for the plain F.dropout that both paths fall back to without per-row seeds
    with L._row_dropout(model, ctx, fold=fold):
        if seeds is None:
            out = model(x)
        else:
            with ctx.rows(seeds):
                ctx.lengths = [x.shape[1]] * len(seeds)
                out = model(x)
        out.float().pow(2).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in lora_params(model).items() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora,seeds,shape", [(False, [1, 2], (2, 5, 24)), (False, None, (2, 5, 24)),
                                              (False, None, (6, 24)), (True, [1, 2], (2, 5, 24))])
def test_a_direct_peft_model_with_fallbacks_and_a_dora_adapter_is_unchanged(dtype, dora, seeds, shape):
    """Without per-row seeds (or on 2-d inputs) both paths draw plain ``F.dropout`` from the same generator;
    a DoRA adapter keeps PEFT's own path (and its layer keeps casting) while a plain one beside it is folded."""
    model = toy_peft(dtype, dora=dora)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    old, new = toy_pass(model, x, fold=False, seeds=seeds), toy_pass(model, x, fold=True, seeds=seeds)
    assert torch.equal(new[0], old[0])
    torch.testing.assert_close(new[1].float(), old[1].float(), rtol=1e-6, atol=1e-6 * float(old[1].abs().max()))
    assert_grads_close(new[2], old[2])
    if dora:
        seen = {}
        with L._row_dropout(model, L._DropoutRows()):
            for name in ("q", "k"):
                layer = getattr(model.base_model.model, name)
                seen[name] = (type(layer.lora_A["default"]), layer.cast_input_dtype_enabled,
                              type(layer.lora_A["dora"]) if "dora" in layer.lora_A else None)
        assert seen["q"] == (L._DroppedA, True, nn.Linear)  # DoRA beside it: the layer keeps casting
        assert seen["k"] == (L._DroppedA, False, None)


# ---- less memory -------------------------------------------------------------------------------
def activation_bytes(tensors, model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the distinct storages among ``tensors`` (of ``dtype``, if given) that are not the model's
    parameters (all tensors are kept alive until counted, so no address was reused)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if dtype is None or t.dtype == dtype}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pass_below_the_fold_threshold_takes_peft_ops_and_saves_what_they_save(dtype, monkeypatch):
    """Short passes (fewer than `_DroppedA.FOLD_MIN_TOKENS` tokens) skip the mask recomputation: the same bytes
    saved as PEFT's own path, the same values."""
    monkeypatch.setattr(L._DroppedA, "FOLD_MIN_TOKENS", 3 * 9 + 1)  # this pass: 3 rows x 9 positions
    pm = wrapped(dtype, 0.05, layers=(LO,))
    got = {}
    for name, fold in (("old", False), ("new", True)):
        saved: list[torch.Tensor] = []
        got[name] = upper_pass(pm, dtype, fold=fold, saved=saved), activation_bytes(saved, pm.hf)
    (old_out, old_dx, old_g), old_bytes = got["old"]
    (new_out, new_dx, new_g), new_bytes = got["new"]
    assert new_bytes == old_bytes
    assert torch.equal(new_out, old_out) and torch.equal(new_dx, old_dx)
    assert_grads_close(new_g, old_g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_folded_path_saves_far_fewer_activation_bytes_for_the_adapters(dtype):
    """One adapted decoder layer (r=4 on all seven projections): what autograd keeps for its adapters,
    i.e. the activation bytes saved with adapters minus those saved with adapters disabled, is under half of
    PEFT's (0.45 in float32, 0.26 in bf16 at these widths). The masks are kept packed, 8 values a byte: an
    eighth of PEFT's bool masks, and no hash inputs (int32) are kept to recompute them."""
    pm = wrapped(dtype, 0.05, layers=(LO,))
    bytes_of, mask_bytes = {}, {}
    for name, fold in (("old", False), ("new", True)):
        saved: list[torch.Tensor] = []
        upper_pass(pm, dtype, fold=fold, saved=saved)
        bytes_of[name] = activation_bytes(saved, pm.hf)
        mask_bytes[name] = {d: activation_bytes(saved, pm.hf, d) for d in (torch.bool, torch.uint8, torch.int32)}
    assert mask_bytes["old"][torch.uint8] == 0 and mask_bytes["new"][torch.bool] == 0
    assert mask_bytes["new"][torch.uint8] * 8 == mask_bytes["old"][torch.bool] > 0
    assert mask_bytes["new"][torch.int32] == 0
    saved = []
    with pm.hf.disable_adapter():
        upper_pass(pm, dtype, fold=True, saved=saved)
    base = activation_bytes(saved, pm.hf)
    old, new = bytes_of["old"] - base, bytes_of["new"] - base
    tokens = 3 * 9
    print(f"\n{dtype}: LoRA part of one layer's saved activations: old {old} B ({old / tokens:.0f} B/token), "
          f"new {new} B ({new / tokens:.0f} B/token), ratio {new / old:.3f}; base layers {base} B")
    assert 0 < new < 0.5 * old


# ---- put back exactly; checkpoints keep PEFT's keys ------------------------------------------------
def test_the_context_restores_every_module_and_checkpoints_inside_it_are_plain_peft(tmp_path):
    pm = wrapped(torch.float32, 0.05)
    base = L._base_of(pm.hf)
    layers = {n: m for n, m in base.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    before = {n: (dict(m.lora_A), dict(m.lora_dropout), m.cast_input_dtype_enabled) for n, m in layers.items()}
    keys, names = list(pm.hf.state_dict()), [n for n, _ in pm.hf.named_modules()]
    params = list(pm.hf.parameters())
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    pm.hf.save_pretrained(tmp_path / "outside")
    with L._row_dropout(pm.hf, L._DropoutRows()):
        m = layers[next(iter(layers))]
        assert isinstance(m.lora_A["default"], L._DroppedA) and not m.cast_input_dtype_enabled
        assert list(pm.hf.state_dict()) == keys and [n for n, _ in pm.hf.named_modules()] == names
        assert all(a is b for a, b in zip(pm.hf.parameters(), params, strict=True))
        L._save_checkpoint(tmp_path / "ckpt", pm.hf, opt, sched, {"step": 1})
    after = {n: (dict(m.lora_A), dict(m.lora_dropout), m.cast_input_dtype_enabled) for n, m in layers.items()}
    for n, (a, d, cast) in before.items():
        a2, d2, cast2 = after[n]
        assert all(a[k] is a2[k] for k in a) and all(d[k] is d2[k] for k in d) and cast2 is cast is True
    saved = load_file(str(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(load_file(str(tmp_path / "outside" / "adapter_model.safetensors")))
    reloaded = PeftModel.from_pretrained(interp.load("tiny-medgemma").hf, tmp_path / "ckpt" / "adapter")
    mine, theirs = lora_params(pm.hf), lora_params(reloaded)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_swap_that_fails_halfway_puts_back_what_it_swapped(monkeypatch):
    pm = wrapped(torch.float32, 0.05)
    layers = [m for m in L._base_of(pm.hf).modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    before = [(m.lora_A["default"], m.lora_dropout["default"], m.cast_input_dtype_enabled) for m in layers]
    real, made = L._DroppedA.__init__, []

    def failing(self, *a, **k):
        if len(made) == 3:
            raise RuntimeError("simulated")
        made.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(L._DroppedA, "__init__", failing)
    with pytest.raises(RuntimeError, match="simulated"), L._row_dropout(pm.hf, L._DropoutRows()):
        pass
    after = [(m.lora_A["default"], m.lora_dropout["default"], m.cast_input_dtype_enabled) for m in layers]
    assert all(a is b for x, y in zip(before, after, strict=True) for a, b in zip(x, y, strict=True))


# ---- a whole training run ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,checkpointing", [(torch.float32, True), (torch.bfloat16, False)])
def test_train_lora_gives_the_same_run_as_peft_dropout(text_pairs, tmp_path, dtype, checkpointing):
    model = interp.load("tiny-medgemma", dtype=dtype)
    runs = {}
    for fold in (False, True):
        res = L.train_lora(model, text_pairs[:6], layers=[2, 3], dropout=0.3, lr=1e-2, epochs=2, batch_size=2,
                           grad_accum=2, eval_pairs=text_pairs[6:], checkpointing=checkpointing,
                           fold_dropout=fold, output_dir=tmp_path / str(fold), progress=False)
        runs[fold] = (res, load_file(str(res.adapter_path / "adapter_model.safetensors")))
    (old, old_w), (new, new_w) = runs[False], runs[True]
    assert len(old.history) == len(new.history) == 3
    for a, b in zip(old.history, new.history, strict=True):
        if a.loss is not None:  # history[0]: before training
            assert (b.loss, b.ce, b.kl) == pytest.approx((a.loss, a.ce, a.kl), rel=1e-5)
        assert b.mean_margin_diff == pytest.approx(a.mean_margin_diff, rel=1e-4, abs=1e-6)
    assert old.history[-1].loss != old.history[1].loss  # it trained
    assert old_w.keys() == new_w.keys()
    for k, w in old_w.items():
        torch.testing.assert_close(new_w[k], w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))


def test_train_lora_checks_fold_dropout_and_without_folding_trains_through_peft_modules(text_pairs, tmp_path,
                                                                                        monkeypatch):
    """``fold_dropout`` is True, False or None (`lora._fold_default`: folded under QLoRA only); False, and None
    without QLoRA, keep PEFT's ``lora_A`` linears and dropouts (as `_RowDropout`) for the whole run."""
    model = interp.load("tiny-medgemma")
    for bad in ("yes", 1, 0.0):
        with pytest.raises(interp.InterpError, match="fold_dropout"):
            L.train_lora(model, text_pairs[:4], layers=[2, 3], fold_dropout=bad, output_dir=tmp_path / "bad",
                         progress=False)
    assert not (tmp_path / "bad").exists()  # refused before any work
    seen: dict[str, set[type]] = {}
    real = L._row_dropout

    @contextmanager
    def watched(hf, ctx, *, fold):
        with real(hf, ctx, fold=fold):
            kinds = {type(m) for m in hf.modules()}
            yield
        seen[name] = kinds

    monkeypatch.setattr(L, "_row_dropout", watched)
    assert L._fold_default(qlora=True) and not L._fold_default(qlora=False)  # None: folded under QLoRA only
    for name, fold in (("off", False), ("default", None), ("on", True)):
        L.train_lora(model, text_pairs[:4], layers=[2, 3], dropout=0.3, epochs=1, batch_size=2, grad_accum=1,
                     eval_pairs=None, fold_dropout=fold, output_dir=tmp_path / name, progress=False)
    for name in ("off", "default"):
        assert L._DroppedA not in seen[name] and L._RowDropout in seen[name], name
    assert L._DroppedA in seen["on"]
