"""The whole loop from one config: capture, SAE, transfer, register features, layer choice, targeted LoRA,
before/after consistency and (optionally) a layer-range ablation. ``interp demo`` and ``interp run`` use it.

A `LoopConfig` is a tree of small dataclasses, one per stage, read from YAML with every key, type and range
checked; `LoopConfig.check()` also resolves the model, SAE, data and output paths, so a bad setting fails in
seconds, before any model is loaded. Layers and features are chosen on the training pairs only; the held-out
pairs are used for nothing but the before/after evaluation.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from interp import models
from interp._errors import InterpError
from interp._results import Result, jsonable
from interp.export import pairs_digest

console = Console()


@dataclass
class ModelSection:
    source: str = "gemma3-270m"  # hub id, local folder, .gguf file or built-in name
    device: str | None = None  # "cuda", "cpu", ... (default: cuda if available)
    dtype: str | None = None  # "bfloat16", "float32", ... (default: bf16 on GPU, fp32 on CPU)


@dataclass
class DataSection:
    pairs: str = "register"  # built-in set name, or a JSONL/CSV file of paraphrase pairs
    mapping: dict[str, str] | None = None  # column renames for load_pairs, {our_field: their_column}
    image_root: str | None = None  # folder that relative image paths are resolved against
    limit: int | None = None  # use only the first N pairs (after shuffling with the seed); >= 1
    eval_fraction: float = 0.3  # held out for before/after evaluation, never used for selection or training


@dataclass
class SAESection:
    release: str | None = None  # sae-lens release or local SAE folder; None: train one on the model
    sae_id: str | None = None  # e.g. "layer_17_width_16k_l0_medium" (with a registry release)
    layer: int | None = None  # decoder layer; default: the middle layer
    d_sae: int = 2048  # width of an SAE trained here
    k: int = 32  # active features per token (topk)
    steps: int = 600  # training steps for an SAE trained here
    train_prompts: int = 80  # general prompts that train it; the rest of the general corpus is held out for transfer


@dataclass
class TransferSection:
    threshold: float = 0.95  # R^2 the SAE must exceed on every corpus
    n_prompts: int = 100  # prompts per corpus
    n_boot: int = 1000  # bootstrap resamples for the R^2 interval
    ce: bool = True  # splice the SAE into the forward pass for CE-loss score and KL


@dataclass
class FeaturesSection:
    top: int = 15  # rows of the register-feature table shown and exported
    test: Literal["wilcoxon", "ttest"] = "wilcoxon"  # paired test per feature (then Benjamini-Hochberg)


@dataclass
class LayersSection:
    method: Literal["residual", "patching", "sae"] = "residual"  # evidence used to pick the window
    width: int = 5  # number of contiguous decoder layers to adapt
    layers: list[int] | None = None  # set to override the choice by hand


@dataclass
class LoraSection:
    r: int = 16  # adapter rank, >= 1
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # LoRA dropout, in [0, 1)
    lr: float = 2e-4  # learning rate, > 0
    epochs: int = 3
    batch_size: int = 1  # pairs per micro-batch
    grad_accum: int = 8  # micro-batches per optimiser step
    ce_weight: float = 1.0  # cross-entropy on the first answer token
    kl_weight: float = 1.0  # symmetric KL between the two phrasings' answer distributions
    max_steps: int | None = None  # stop after this many optimiser steps (a short demo run)
    train_pairs: int | None = None  # train on at most this many pairs


@dataclass
class AblationSection:
    enabled: bool = False
    # arm name -> "0-4", "3,5,9", "all", "auto" (the selected window) or a list of layers
    ranges: dict[str, str | list[int]] = field(default_factory=lambda: {"early": "0-4", "selected": "auto", "all": "all"})


@dataclass
class LoopConfig:
    """Every setting of one run of the loop; ``LoopConfig.from_yaml(path)`` checks every key."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    sae: SAESection = field(default_factory=SAESection)
    transfer: TransferSection = field(default_factory=TransferSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    layers: LayersSection = field(default_factory=LayersSection)
    lora: LoraSection = field(default_factory=LoraSection)
    ablation: AblationSection = field(default_factory=AblationSection)
    output: str = "runs/run"  # report folder
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> LoopConfig:
        """Build a config from nested dicts; every key, type and range is checked (nothing is loaded)."""
        config = _build(cls, data or {}, where, "")
        config.check(resources=False, where=where)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> LoopConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise InterpError(f"config file not found: '{path}'")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise InterpError(f"'{path}' is not valid YAML: {e}") from e
        if data is not None and not isinstance(data, dict):
            raise InterpError(f"'{path}' must hold a mapping of settings at the top level")
        return cls.from_dict(data or {}, where=path.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, *, resources: bool = True, where: str = "config") -> None:
        """Raise `InterpError` naming the first bad setting. Values and ranges always; with ``resources``
        also what the run will open or write: the model source (resolved, not loaded), device and dtype,
        the SAE release, the pairs file and image folder, the layers against the model's depth, and the
        output folder (usable, and not a folder of someone else's files). Takes seconds, loads no weights."""
        for dotted, (ok, want) in _RULES.items():
            value = self
            for part in dotted.split("."):
                value = getattr(value, part)
            try:
                good = bool(ok(value))
            except TypeError:  # a wrong type set in Python rather than read from YAML
                good = False
            if not good:
                raise InterpError(f"'{dotted}' in {where} is {value!r}; it must be {want}")
        if self.sae.k > self.sae.d_sae:
            raise InterpError(f"'sae.k' in {where} is {self.sae.k}, more than sae.d_sae={self.sae.d_sae}")
        if self.lora.ce_weight + self.lora.kl_weight == 0:
            raise InterpError(f"'lora.ce_weight' and 'lora.kl_weight' in {where} are both 0: nothing to train on")
        for name, spec in self.ablation.ranges.items():
            if spec != "auto":
                parse_layers(spec, what=f"'ablation.ranges.{name}' in {where}")
        if self.sae.release is None:
            from interp import prompts

            if self.sae.train_prompts >= len(prompts.general()):
                raise InterpError(f"'sae.train_prompts' in {where} is {self.sae.train_prompts}, which uses all "
                                  f"{len(prompts.general())} general prompts; lower it so that some general text "
                                  "is held out for the transfer test")
        if not resources:
            return
        n_layers = check_model_source(self.model.source, what=f"'model.source' in {where}")
        check_device(self.model.device, what=f"'model.device' in {where}")
        if self.model.dtype is not None:
            from interp.models import as_dtype

            try:
                floating = as_dtype(self.model.dtype).is_floating_point
            except InterpError as e:
                raise InterpError(f"'model.dtype' in {where}: {e}") from None
            if not floating:
                raise InterpError(f"'model.dtype' in {where} is {self.model.dtype!r}; models run in a floating-point "
                                  "dtype ('float32', 'bfloat16', 'float16')")
        if self.data.pairs != "register" and not Path(self.data.pairs).expanduser().is_file():
            raise InterpError(f"'data.pairs' in {where} is '{self.data.pairs}': no such file; give a JSONL/CSV file "
                              "of paraphrase pairs or 'register' for the built-in set")
        if self.data.image_root is not None and not Path(self.data.image_root).expanduser().is_dir():
            raise InterpError(f"'data.image_root' in {where} is '{self.data.image_root}': no such folder")
        if self.sae.release is not None:
            check_sae_source(self.sae.release, self.sae.sae_id, what=f"'sae.release' in {where}")
        if n_layers is not None:
            self.check_layers(n_layers, where=where)
        from interp.export import prepare_output

        prepare_output(self.output, create=False, what=f"'output' in {where}")

    def check_layers(self, n_layers: int, *, where: str = "config") -> None:
        """Every layer setting against a model of ``n_layers`` decoder layers."""
        top = n_layers - 1
        if self.sae.layer is not None and self.sae.layer > top:
            raise InterpError(f"'sae.layer' in {where} is {self.sae.layer}, but the model has layers 0-{top}")
        if self.layers.layers and max(self.layers.layers) > top:
            raise InterpError(f"'layers.layers' in {where} reaches layer {max(self.layers.layers)}, but the model "
                              f"has layers 0-{top}")
        if not self.layers.layers and self.layers.width > n_layers:
            raise InterpError(f"'layers.width' in {where} is {self.layers.width}, wider than the model's "
                              f"{n_layers} layers")
        if self.ablation.enabled:
            for name, spec in self.ablation.ranges.items():
                if spec != "auto":
                    parse_range(spec, n_layers, what=f"'ablation.ranges.{name}' in {where}")

    @classmethod
    def demo(cls, quick: bool = False) -> LoopConfig:
        """The embedded-default run (`interp demo`): its settings live in `interp.demo`."""
        from interp.demo import demo_config

        return demo_config(quick)


def _finite(lo: float, *, strict: bool) -> tuple[Callable[[Any], bool], str]:
    return ((lambda v: math.isfinite(v) and (v > lo if strict else v >= lo)),
            f"a finite number {'>' if strict else '>='} {lo:g}")


_AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
_UNSET_OR_AT_LEAST_1 = (lambda v: v is None or v >= 1, "unset (null) or an integer >= 1")
# dotted key -> (test, what a good value is); types are checked before, when the YAML is read
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.source": (lambda v: bool(str(v).strip()), "a model name, hub id, folder or .gguf file"),
    "data.limit": _UNSET_OR_AT_LEAST_1,
    "data.eval_fraction": (lambda v: 0 < v < 1, "strictly between 0 and 1"),
    "sae.layer": (lambda v: v is None or v >= 0, "unset (null: the middle layer) or a layer number >= 0"),
    "sae.d_sae": _AT_LEAST_1,
    "sae.k": _AT_LEAST_1,
    "sae.steps": _AT_LEAST_1,
    "sae.train_prompts": _AT_LEAST_1,
    "transfer.threshold": (lambda v: 0 < v < 1, "strictly between 0 and 1"),
    "transfer.n_prompts": _AT_LEAST_1,
    "transfer.n_boot": _AT_LEAST_1,
    "features.top": _AT_LEAST_1,
    "layers.width": _AT_LEAST_1,
    "layers.layers": (lambda v: v is None or (len(v) > 0 and min(v) >= 0 and len(set(v)) == len(v)),
                      "unset (null: chosen from evidence) or a non-empty list of distinct layer numbers >= 0"),
    "lora.r": _AT_LEAST_1,
    "lora.alpha": _finite(0, strict=True),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora.lr": _finite(0, strict=True),
    "lora.epochs": _AT_LEAST_1,
    "lora.batch_size": _AT_LEAST_1,
    "lora.grad_accum": _AT_LEAST_1,
    "lora.ce_weight": _finite(0, strict=False),
    "lora.kl_weight": _finite(0, strict=False),
    "lora.max_steps": _UNSET_OR_AT_LEAST_1,
    "lora.train_pairs": _UNSET_OR_AT_LEAST_1,
    "output": (lambda v: bool(str(v).strip()), "a folder path"),
    "seed": (lambda v: v >= 0, "an integer >= 0"),
}

# decoder depth of the built-in models, so that layer settings are checked before anything is loaded
# (tests/test_loop.py checks these against the loaded models)
BUILTIN_DEPTH = {"gemma3-270m": 18, "tiny-medgemma": 6, "tiny-llava": 4}


def check_model_source(source: Any, *, what: str = "model") -> int | None:
    """Raise `InterpError` unless ``source`` names a model `interp.load` can open (a built-in name, a ``.gguf``
    file, a folder with ``config.json``, or a hub id whose config resolves); reads no weights. Returns the
    decoder depth where the config tells it, else None."""
    from interp.models import BUILTINS

    src = str(source)
    if src in BUILTINS:
        return BUILTIN_DEPTH.get(src)
    path = Path(src).expanduser()
    if src.endswith(".gguf"):
        if not path.is_file():
            raise InterpError(f"{what}: GGUF file not found: '{src}'")
        return None
    looks_local = path.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise InterpError(f"{what}: model folder not found: '{src}'. Built-in names are {', '.join(BUILTINS)}.")
        if not (path / "config.json").is_file():
            raise InterpError(f"{what}: model folder '{src}' has no config.json; point it at a folder saved by "
                              "transformers (save_pretrained) or downloaded from the hub")
        return _depth(json.loads((path / "config.json").read_text()))
    if "/" not in src:
        close = difflib.get_close_matches(src, BUILTINS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InterpError(f"{what}: unknown model {src!r}{hint}. Use a built-in name ({', '.join(BUILTINS)}), a hub "
                          "id such as 'google/medgemma-4b-it', a local folder or a .gguf file")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InterpError(f"{what}: could not resolve '{src}' ({first}). If it is a hub id, this machine may have "
                          "no hub access or the model is gated: download it elsewhere and pass its local folder.") from None
    return _depth(config.to_dict())


def _depth(config: dict[str, Any]) -> int | None:
    text = config.get("text_config") or {}
    n = text.get("num_hidden_layers") if isinstance(text, dict) else None
    n = n or config.get("num_hidden_layers")
    return int(n) if isinstance(n, int) else None


def check_device(device: Any, *, what: str = "device") -> None:
    """Raise `InterpError` if ``device`` is not a torch device this machine has (None: the default)."""
    if device is not None:
        models.check_device(device, what=what)


def check_sae_source(release: Any, sae_id: str | None, *, what: str = "sae") -> None:
    """Raise `InterpError` unless ``release`` is a local SAE folder or a sae-lens registry release with
    ``sae_id`` in it (reads the registry, no weights)."""
    src = str(release)
    path = Path(src).expanduser()
    if path.exists() or src.startswith((".", "/", "~")) or ("/" in src and sae_id is None):
        if not path.exists():
            raise InterpError(f"{what}: SAE folder not found: '{src}'")
        return
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    registry = get_pretrained_saes_directory()
    if src not in registry:
        close = difflib.get_close_matches(src, list(registry), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; give a local SAE folder or a sae-lens release name"
        raise InterpError(f"{what}: {src!r} is neither a folder nor a sae-lens release{hint}")
    ids = list(registry[src].saes_map)
    if sae_id not in ids:
        close = difflib.get_close_matches(str(sae_id), ids, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"e.g. {', '.join(ids[:3])}"
        raise InterpError(f"{what}: release {src!r} has no sae_id {sae_id!r}; {hint}")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, key_tp) and _type_ok(v, value_tp) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls: type, data: dict[str, Any], where: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys here: {', '.join(names)}"
            raise InterpError(f"unknown key '{dotted}' in {where}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise InterpError(f"'{dotted}' in {where} must be a mapping of settings, got {value!r}")
            kwargs[key] = _build(tp, value, where, f"{dotted}.")
        elif not _type_ok(value, tp):
            want = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            raise InterpError(f"'{dotted}' in {where} is {value!r}, which is not a valid {want}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def parse_layers(text: Any, *, what: str = "layers") -> list[int] | str:
    """'17', '3-7', '3,5,9', 'all' or a list of ints -> a sorted layer list (or 'all'); a clear error otherwise."""
    if isinstance(text, (list, tuple)):
        if not text or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in text):
            raise InterpError(f"{what} is {list(text)!r}; give a non-empty list of layer numbers >= 0")
        return sorted(set(text))
    text = str(text).strip()
    if text == "all":
        return "all"
    out: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise InterpError(f"{what} is {text!r}; use a layer number ('17'), a range ('15-19'), a list ('3,5,9') "
                              "or 'all', with layers numbered from 0")
        out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    return sorted(set(out))


def parse_range(text: Any, n_layers: int, *, what: str = "layer range") -> list[int] | str:
    """'3-7', '3,5,9', 'all' or a list -> layer list (or 'all'), each layer checked against ``n_layers``."""
    out = parse_layers(text, what=what)
    if out != "all" and max(out) >= n_layers:
        raise InterpError(f"{what} is {text!r}, which reaches layer {max(out)}, outside 0-{n_layers - 1}")
    return out


@dataclass(frozen=True)
class LoopReport(Result):
    """What one run of the loop produced: the headline numbers and where the report lives."""

    output: Path
    summary: dict[str, Any]
    seconds: float

    def __repr__(self) -> str:
        s = self.summary
        before, after = s.get("consistency_before", {}), s.get("consistency_after", {})
        return (f"LoopReport('{self.output}', layers={s.get('selected_layers')}, flip rate "
                f"{before.get('flip_rate', float('nan')):.3f} -> {after.get('flip_rate', float('nan')):.3f}, "
                f"{self.seconds:.0f} s)")


def run_loop(config: LoopConfig, *, progress: bool = True) -> LoopReport:
    """Run every stage of the loop and write figures, tables, metrics and a summary to ``config.output``."""
    import torch

    import interp
    from interp.export import Recorder, prepare_output, run_manifest

    t0 = time.perf_counter()
    config.check()  # every setting and path, before anything is loaded
    pairs, train_pairs, eval_pairs = loop_pairs(config)
    out = prepare_output(config.output, what="'output'")
    rec = Recorder(out)
    torch.manual_seed(config.seed)
    summary: dict[str, Any] = {"config": config.to_dict()}
    # selection (features, layers) and training see only train_pairs; eval_pairs are for evaluation alone
    summary["data"] = {"n_pairs": len(pairs), "n_train": len(train_pairs), "n_eval": len(eval_pairs),
                       "selection": {"pairs": "train", **pairs_digest(train_pairs)},
                       "evaluation": {"pairs": "held-out", **pairs_digest(eval_pairs)}}

    def step(title: str) -> None:
        console.rule(f"[bold]{title}[/bold]  [dim]{time.perf_counter() - t0:.0f} s[/dim]")

    step("1 · model")
    model = interp.load(config.model.source, device=config.model.device, dtype=config.model.dtype)
    config.check_layers(model.n_layers)
    console.print(model)
    console.print(f"{len(pairs)} pairs: {len(train_pairs)} choose features and layers and train the adapter, "
                  f"{len(eval_pairs)} are held out for evaluation only")

    layer = config.sae.layer if config.sae.layer is not None else model.n_layers // 2
    step(f"2 · capture and SAE at layer {layer}")
    medical, general = interp.prompts.medical(), interp.prompts.general()
    n = config.transfer.n_prompts
    # an SAE trained here learns from general text only; transfer is then tested on held-out general
    # text and on medical text
    train_text = general[: config.sae.train_prompts]
    held_general = general[config.sae.train_prompts:][:n] if not config.sae.release else general[:n]
    sae = interp.sae_for(model, config.sae.release, config.sae.sae_id, layer=layer, train_prompts=train_text,
                         d_sae=config.sae.d_sae, k=config.sae.k, steps=config.sae.steps, seed=config.seed,
                         progress=progress)

    summary["sae_source"] = getattr(sae.cfg.metadata, "interp_source", None) or "given"
    console.print(f"SAE: {summary['sae_source']}")

    step("3 · SAE transfer: medical vs general text")
    transfer = interp.transfer_report(model, sae, {"medical": medical[:n], "general": held_general}, layer=layer,
                                      threshold=config.transfer.threshold, n_boot=config.transfer.n_boot,
                                      seed=config.seed, ce=config.transfer.ce, progress=progress)
    console.print(transfer)
    rec.figure("transfer_r2", transfer.figure())
    rec.table("transfer", transfer.table(), caption="SAE transfer: explained variance by corpus")
    for c in transfer.corpora:
        rec.metrics_from(f"transfer.{c.name}", {"r2": c.r2, "r2_ci_low": c.r2_ci[0],
                                                "r2_prompt_mean": c.r2_prompt_mean,
                                                "r2_prompt_mean_ci_low": c.r2_prompt_mean_ci[0],
                                                "passed": c.passed, "p_bootstrap": c.p_bootstrap, "l0": c.l0,
                                                "dead_fraction": c.dead_fraction, "ce_score": c.ce_score, "kl": c.kl})
    summary["transfer"] = {"passed": transfer.passed, "r2": {c.name: c.r2 for c in transfer.corpora},
                           "formula": transfer.r2_formula, "token_mask": transfer.token_mask}

    step("4 · register-sensitive features (formal vs lay phrasing, training pairs)")
    features = interp.register_features(model, sae, train_pairs, layer=layer, test=config.features.test,
                                        progress=progress)
    console.print(features)
    rec.figure("register_features", features.figure())
    top = features.top(config.features.top)
    rec.table("register_features", top, caption=f"Top register-sensitive SAE features at layer {layer}")
    summary["features"] = {"n_significant": int(len(features.significant())),
                           "n_beating_random": int(len(features.significant(beats_random=True))),
                           "n_tested": int(len(features.table)),
                           "calibration": jsonable(features.calibration()),
                           "top": jsonable(top.head(5))}

    step(f"5 · find_layers (method={config.layers.method}, training pairs)")
    if config.layers.layers:
        selection = interp.LayerSelection(tuple(sorted(config.layers.layers)), model.n_layers, method="manual",
                                          layers_pattern=interp.layers.layers_pattern_of(model.layers_path))
        profile = None
    else:
        kw = {"saes": {layer: sae}} if config.layers.method == "sae" else {}
        profile = interp.layer_profile(model, train_pairs, method=config.layers.method, progress=progress, **kw)
        selection = profile.select(config.layers.width)
        rec.figure("layer_profile", profile.figure())
    console.print(selection)
    summary["selected_layers"] = list(selection.layers)
    rec.metric("layers.selected", list(selection.layers))
    rec.metric("layers.relative_depth", list(selection.relative_depth))

    step("6 · consistency before training (held-out pairs)")
    before = interp.evaluate(model, eval_pairs, seed=config.seed, progress=progress)
    console.print(before)

    step(f"7 · targeted LoRA on layers {selection.layers[0]}-{selection.layers[-1]}")
    lora_train = train_pairs[: config.lora.train_pairs or len(train_pairs)]
    lc = config.lora
    result = interp.train_lora(model, lora_train, layers=selection, r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                               lr=lc.lr, epochs=lc.epochs, batch_size=lc.batch_size, grad_accum=lc.grad_accum,
                               ce_weight=lc.ce_weight, kl_weight=lc.kl_weight, max_steps=lc.max_steps,
                               eval_pairs=eval_pairs, seed=config.seed, output_dir=out / "adapter", resume=False,
                               progress=progress)
    console.print(result)
    rec.figure("lora_history", result.figure())
    rec.table("lora_history", result.table, caption="Targeted LoRA: per-epoch history")

    step("8 · consistency after training (held-out pairs)")
    tuned = result.load(model) if hasattr(result, "load") else interp.load_adapter(model, result.adapter_path)
    after = interp.evaluate(tuned, eval_pairs, seed=config.seed, progress=progress)
    comparison = before.compare(after)
    console.print(after)
    console.print(comparison)
    rec.figure("consistency_before", before.figure())
    rec.figure("consistency_after", after.figure())
    rec.figure("consistency_compare", comparison.figure())
    rec.table("consistency", comparison.table, caption="Paraphrase consistency before and after targeted LoRA")
    for name, rep in (("before", before), ("after", after)):
        rec.metrics_from(f"consistency.{name}", _consistency_summary(rep))
    rec.metrics_from("consistency.compare", _comparison_summary(comparison))
    summary["consistency_before"] = _consistency_summary(before)
    summary["consistency_after"] = _consistency_summary(after)

    if config.ablation.enabled:
        step("9 · layer-range ablation")
        ranges = {name: (selection if spec == "auto" else parse_range(spec, model.n_layers))
                  for name, spec in config.ablation.ranges.items()}
        ablation = interp.ablate_layers(model, lora_train, ranges, eval_pairs=eval_pairs, seed=config.seed,
                                        output_dir=out / "ablation", r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                                        lr=lc.lr, epochs=lc.epochs, batch_size=lc.batch_size,
                                        grad_accum=lc.grad_accum, max_steps=lc.max_steps, progress=progress)
        console.print(ablation)
        rec.figure("ablation", ablation.figure())
        rec.table("ablation", ablation.table, caption="Layer-range ablation")
        summary["ablation"] = jsonable(ablation.table)

    seconds = time.perf_counter() - t0
    summary["seconds"] = seconds
    summary["transfer_detail"] = {c.name: {"r2": c.r2, "ci": list(c.r2_ci), "passed": c.passed}
                                  for c in transfer.corpora}
    summary["compare"] = _comparison_summary(comparison)
    manifest = run_manifest(model=model, sae=sae, data=[p.to_dict() for p in pairs], seed=config.seed,
                            extra={"config": config.to_dict(), "selection": summary["data"]["selection"],
                                   "evaluation": summary["data"]["evaluation"]})
    from interp._io import atomic_write_text

    atomic_write_text(out / "manifest.json", json.dumps(jsonable(manifest), indent=1))
    atomic_write_text(out / "summary.json", json.dumps(jsonable(summary), indent=1))
    report = _report_markdown(model.name, layer, summary, sorted(p.name for p in (out / "figures").glob("*.html")))
    atomic_write_text(out / "report.md", report)
    console.print(_summary_table(summary, layer))
    console.rule(f"[bold green]done in {seconds:.0f} s[/bold green]: report in {out / 'report.md'}")
    return LoopReport(out, summary, seconds)


def loop_pairs(config: LoopConfig) -> tuple[list[Any], list[Any], list[Any]]:
    """The run's pairs (shuffled with the seed, then limited) and their (train, held-out) split."""
    import interp

    if config.data.pairs == "register":
        pairs = interp.data.builtin("register")
    else:
        pairs = interp.data.load_pairs(config.data.pairs, mapping=config.data.mapping,
                                       image_root=config.data.image_root)
    pairs = interp.data.take(pairs, config.data.limit, seed=config.seed)
    train_pairs, eval_pairs = interp.data.split(pairs, config.data.eval_fraction, seed=config.seed)
    return pairs, train_pairs, eval_pairs


def _consistency_summary(rep: Any) -> dict[str, Any]:
    """The numbers of one ConsistencyReport the summary and metrics carry, each with its 95% interval."""
    return {"n": rep.n, "n_clusters": rep.n_clusters, "flip_rate": rep.flip_rate,
            "mean_margin_diff": rep.mean_margin_diff, "relative_margin_diff": rep.relative_margin_diff,
            "mean_abs_margin": rep.mean_abs_margin, "yes_rate": rep.yes_rate, "accuracy": rep.accuracy,
            "ci": jsonable(rep.ci), "ci_method": jsonable(rep.ci_method)}


def _comparison_summary(c: Any) -> dict[str, Any]:
    """Paired tests first; the study's unpaired z-tests kept under names that say so."""
    return {"p_flip": c.p_flip, "flip_test": c.flip_test, "p_mcnemar": c.p_mcnemar,
            "p_accuracy_paired": c.p_accuracy_paired, "accuracy_test": c.accuracy_test,
            "p_z_unpaired": c.p_z, "p_accuracy_z_unpaired": c.p_accuracy, "p_wilcoxon": c.p_wilcoxon,
            "p_margin": c.p_margin, "margin_test": c.margin_test, "margin_diff_relative": c.margin_diff_relative,
            "relative_margin_diff_delta": c.relative_margin_diff_delta,
            "mean_abs_margin_relative": c.mean_abs_margin_relative, "yes_rate": list(c.yes_rate),
            "yes_rate_delta": c.yes_rate_delta, "ci": jsonable(c.ci)}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:.3g}"


def _ci(d: dict[str, Any], key: str, pct: bool = False) -> str:
    ci = (d.get("ci") or {}).get(key)
    if not ci or ci[0] is None:
        return ""
    return f" [{_fmt(ci[0], pct)}, {_fmt(ci[1], pct)}]"


def _summary_rows(summary: dict[str, Any], layer: int) -> list[tuple[str, str]]:
    b, a, c = summary["consistency_before"], summary["consistency_after"], summary["compare"]
    rows = [("SAE", summary.get("sae_source") or "n/a")]
    rows += [(f"SAE R² at layer {layer}, {name}", f"{d['r2']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}] "
             f"{'pass' if d['passed'] else 'FAIL'}") for name, d in summary["transfer_detail"].items()]
    f = summary["features"]
    cal = f.get("calibration") or {}
    rows += [
        ("register-sensitive features (q < 0.05)",
         f"{f['n_significant']} of {f['n_tested']} tested; {f['n_beating_random']} also beat random directions"
         + (" (WARNING: random directions pass too often: lexical/length confound)" if cal.get("confounded") else "")),
        ("selected layers", f"{summary['selected_layers'][0]}-{summary['selected_layers'][-1]}"),
        ("pairs that chose features and layers", f"{summary['data']['selection']['n']} training pairs "
                                                 f"(ids sha256 {summary['data']['selection']['ids_sha256'][:12]})"),
        ("pairs evaluated (held out)", f"{summary['data']['evaluation']['n']} "
                                       f"(ids sha256 {summary['data']['evaluation']['ids_sha256'][:12]})"),
        ("flip rate, before -> after (held-out pairs)",
         f"{_fmt(b['flip_rate'], True)}{_ci(b, 'flip_rate', True)} -> {_fmt(a['flip_rate'], True)}"
         f"{_ci(a, 'flip_rate', True)} ({c['flip_test']} p={_fmt(c['p_flip'])}; unpaired z-test as in the study "
         f"p={_fmt(c['p_z_unpaired'])})"),
        ("mean |margin diff| (logits), before -> after",
         f"{_fmt(b['mean_margin_diff'])}{_ci(b, 'mean_margin_diff')} -> {_fmt(a['mean_margin_diff'])}"
         f"{_ci(a, 'mean_margin_diff')} ({_fmt(c['margin_diff_relative'], True)}{_ci(c, 'margin_diff_relative', True)}, "
         f"{c.get('margin_test') or 'Wilcoxon signed-rank'} p={_fmt(c.get('p_margin', c['p_wilcoxon']))})"),
        ("scale-free |margin diff| / mean |margin|, before -> after",
         f"{_fmt(b['relative_margin_diff'])} -> {_fmt(a['relative_margin_diff'])} (change "
         f"{_fmt(c['relative_margin_diff_delta'])}{_ci(c, 'relative_margin_diff_delta')})"),
        ("mean |margin| (logits), before -> after",
         f"{_fmt(b['mean_abs_margin'])} -> {_fmt(a['mean_abs_margin'])} ({_fmt(c['mean_abs_margin_relative'], True)}: "
         "margins shrinking makes |margin diff| smaller without any change in decisions)"),
        ("yes rate (share of phrasings answered yes), before -> after",
         f"{_fmt(b['yes_rate'], True)} -> {_fmt(a['yes_rate'], True)}"),
        ("accuracy, before -> after",
         f"{_fmt(b['accuracy'], True)}{_ci(b, 'accuracy', True)} -> {_fmt(a['accuracy'], True)}{_ci(a, 'accuracy', True)}"
         f" ({c['accuracy_test']} p={_fmt(c['p_accuracy_paired'])}; unpaired z-test p={_fmt(c['p_accuracy_z_unpaired'])})"),
    ]
    return rows


def _summary_table(summary: dict[str, Any], layer: int):
    from rich.table import Table

    table = Table(title="interp: summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in _summary_rows(summary, layer):
        table.add_row(k, v)
    return table


def _reading(summary: dict[str, Any]) -> list[str]:
    """Plain statements of what the before/after numbers do and do not show (shrinkage, collapse, power)."""
    b, a, c = summary["consistency_before"], summary["consistency_after"], summary["compare"]
    out = []
    rel_ci = (c.get("ci") or {}).get("relative_margin_diff_delta")
    diff_ci = (c.get("ci") or {}).get("margin_diff_relative")
    diff_down = diff_ci is not None and diff_ci[1] is not None and diff_ci[1] < 0
    rel_down = rel_ci is not None and rel_ci[1] is not None and rel_ci[1] < 0
    rel_up = rel_ci is not None and rel_ci[0] is not None and rel_ci[0] > 0
    if rel_up:
        out.append("The scale-free measure (|margin diff| / mean |margin|) rose beyond its 95% interval: the two "
                   "phrasings agree less after training, relative to how decided the answers are.")
    elif diff_down and not rel_down:
        out.append(f"Mean |margin diff| fell ({_fmt(c['margin_diff_relative'], True)}), but the scale-free measure "
                   f"(|margin diff| / mean |margin|) did not fall beyond its 95% interval, and mean |margin| changed "
                   f"by {_fmt(c['mean_abs_margin_relative'], True)}: the drop is mostly margins shrinking, not the two "
                   "phrasings agreeing more.")
    elif rel_down:
        out.append("The scale-free measure (|margin diff| / mean |margin|) fell beyond its 95% interval: the two "
                   "phrasings agree more, not only on a smaller logit scale.")
    else:
        out.append("Neither mean |margin diff| nor the scale-free measure changed beyond its 95% interval.")
    for name, rep in (("before", b), ("after", a)):
        y = rep.get("yes_rate")
        if y is not None and (y < 0.1 or y > 0.9):
            out.append(f"{name.capitalize()} training the model answers yes to {_fmt(y, True)} of phrasings: "
                       "agreement near a constant answer says little about consistency.")
    if c.get("p_flip") is not None and c["p_flip"] >= 0.05:
        out.append(f"The flip rate did not change significantly ({c['flip_test']} p={_fmt(c['p_flip'])}, "
                   f"n={a['n']} held-out pairs).")
    return out


def _report_markdown(model_name: str, layer: int, summary: dict[str, Any], figures: list[str]) -> str:
    n = summary["data"]
    sel, ev = n["selection"], n["evaluation"]
    lines = [f"# interp report: {model_name}", "",
             f"{n['n_pairs']} paraphrase pairs ({n['n_train']} for training, {n['n_eval']} held out for "
             f"evaluation); {summary['seconds']:.0f} s.", "",
             f"Register features and the layer window were chosen on the {sel['n']} training pairs (ids sha256 "
             f"`{sel['ids_sha256'][:16]}`), which also trained the adapter; consistency before and after is "
             f"measured on the {ev['n']} held-out pairs (ids sha256 `{ev['ids_sha256'][:16]}`), which no "
             "selection or training step saw.", "", "| result | value |", "| --- | --- |"]
    lines += [f"| {k.replace('|', chr(92) + '|')} | {v.replace('|', chr(92) + '|')} |"
              for k, v in _summary_rows(summary, layer)]
    lines += ["", "## What the numbers say", ""] + [f"- {r}" for r in _reading(summary)]
    lines += ["", f"R² formula: {summary['transfer']['formula']}; token mask: "
              f"{summary['transfer'].get('token_mask', '')}. Every test and interval is defined in "
              "docs/STATISTICS.md.", "", "## Figures", ""]
    lines += [f"- [{f[:-5]}](figures/{f})" for f in figures]
    lines += ["", "Tables (CSV and LaTeX) are in `tables/`, every number in `metrics.json`, and what is needed to "
              "regenerate the run in `manifest.json`.", ""]
    return "\n".join(lines)
