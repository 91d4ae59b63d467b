"""Stage 5 of the loop: choose the decoder layers a LoRA should touch.

`layer_profile` scores every decoder layer by one of three kinds of evidence (activation patching, residual
distance between phrasings, register-sensitive SAE features); `find_layers` picks the best contiguous window
as a `LayerSelection`: the hand-off to training, mapped to other depths by relative position and turned into a
`peft.LoraConfig` that can never reach the vision tower. Under ``accelerate launch`` / torchrun the forwards of
`layer_profile` are split between the processes, and every process returns the one-process profile bitwise.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp import dist, hf
from interp import stats as stats_mod
from interp._errors import InterpError
from interp._results import Result, jsonable
from interp.capture import capture, layer_output, position_mask, run_hooked
from interp.data import ParaphrasePair, check_pairs
from interp.data import clusters as pair_clusters
from interp.features import _margin, _pair_prompts, paired_stats, pooled_features, sae_layer
from interp.models import Batch, Model, Prompt, exclusive
from interp.scoring import body_and_head, last_hidden

# The study's modules: attention q/k/v/o and MLP gate/up/down projections.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layers_pattern_of(layers_path: str) -> str:
    """PEFT ``layers_pattern`` for a decoder layer list: its last two path parts
    (``model.language_model.layers`` -> ``language_model.layers``), so a vision tower's
    ``encoder.layers`` never matches."""
    parts = layers_path.split(".")
    return ".".join(parts[-2:]) if len(parts) >= 2 else layers_path


def lora_config(layers: Any, *, layers_pattern: str = "language_model.layers", r: int = 16, alpha: int = 32,
                dropout: float = 0.05, target_modules: Any = DEFAULT_TARGET_MODULES, **peft_kwargs: Any):
    """A `peft.LoraConfig` adapting only the given language-decoder layers (the study's defaults)."""
    from peft import LoraConfig

    layer_list = sorted({int(i) for i in layers})
    if not layer_list:
        raise InterpError("lora_config needs at least one layer")
    if isinstance(target_modules, str):  # one module name (PEFT would read a bare string as a full-match regex)
        target_modules = [target_modules] if target_modules.isidentifier() else target_modules
    modules = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                      layers_to_transform=layer_list, layers_pattern=layers_pattern, bias="none",
                      task_type="CAUSAL_LM", **peft_kwargs)


@dataclass(frozen=True)
class LayerSelection(Result):
    """A contiguous window of decoder layers, with the per-layer scores that chose it."""

    layers: tuple[int, ...]
    n_layers: int
    scores: tuple[float, ...] = ()  # one score per layer of the model (empty when chosen by hand)
    method: str = "manual"
    peak: int | None = None  # the layer with the highest score
    layers_pattern: str = "language_model.layers"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    # the pairs whose profile chose the window (empty when chosen by hand): `train_lora` and `ablate_feature`
    # check against them that evaluation pairs are held out (by cluster: interp.data.clusters)
    selection_pairs: tuple[ParaphrasePair, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise InterpError("a LayerSelection needs at least one layer")
        bad = [i for i in self.layers if not 0 <= i < self.n_layers]
        if bad:
            raise InterpError(f"layer {bad[0]} is outside a {self.n_layers}-layer model")

    @property
    def relative_depth(self) -> tuple[float, float]:
        """(first, last) layer as a fraction of depth: 15-19 of 34 -> (0.44, 0.56)."""
        return self.layers[0] / self.n_layers, self.layers[-1] / self.n_layers

    def to_depth(self, n_layers: int | Model) -> LayerSelection:
        """The same relative window in a model with ``n_layers`` layers (15-19 of 34 -> 14-18 of 32).

        Given a `Model`, it also takes that model's module layout, so that `lora_config` matches its decoder
        (LLaVA-Rad's ``model.layers`` rather than MedGemma's ``language_model.layers``); given a number, the
        layout stays this selection's."""
        pattern = self.layers_pattern
        if isinstance(n_layers, Model):
            pattern, n_layers = layers_pattern_of(n_layers.layers_path), n_layers.n_layers
        if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
            raise InterpError(f"to_depth({n_layers!r}): pass a positive number of layers or an interp.Model")
        n_layers = int(n_layers)
        width = len(self.layers)
        if width > n_layers:
            raise InterpError(f"a {width}-layer window does not fit in {n_layers} layers")
        center = (self.layers[0] + self.layers[-1] + 1) / 2 / self.n_layers  # window centre, relative
        start = int(round(center * n_layers - width / 2))
        start = min(max(start, 0), n_layers - width)
        peak = None if self.peak is None else min(int(self.peak / self.n_layers * n_layers), n_layers - 1)
        return LayerSelection(tuple(range(start, start + width)), n_layers, (), f"{self.method}->depth", peak,
                              pattern, {"from": {"layers": list(self.layers), "n_layers": self.n_layers,
                                                 "layers_pattern": self.layers_pattern}}, self.selection_pairs)

    def lora_config(self, **peft_kwargs: Any):
        """A `peft.LoraConfig` on exactly these language-decoder layers (never the vision tower)."""
        peft_kwargs.setdefault("layers_pattern", self.layers_pattern)
        return lora_config(self.layers, **peft_kwargs)

    def figure(self):
        """The per-layer scores that chose this window, with the window shaded (needs scores)."""
        if not self.scores:
            raise InterpError("this LayerSelection was made by hand and has no per-layer scores to plot; "
                              "use interp.find_layers(...) or a LayerProfile")
        labels = _LABELS.get(self.method, ("score", ""))
        return _layers_figure(self.scores, self.meta.get("values", ()), score_label=labels[0],
                              value_label=labels[1], window=self.layers, missing=self.meta.get("missing", ()),
                              title=f"{self.method}: layers {self.layers[0]}-{self.layers[-1]} of {self.n_layers}"
                                    f" (peak {self.peak})")

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "n_layers": self.n_layers, "scores": jsonable(list(self.scores)),
                "method": self.method, "peak": self.peak, "relative_depth": list(self.relative_depth),
                "layers_pattern": self.layers_pattern}

    def __repr__(self) -> str:
        lo, hi = self.relative_depth
        return (f"LayerSelection(layers {self.layers[0]}-{self.layers[-1]} of {self.n_layers} "
                f"({lo:.0%}-{hi:.0%} depth), method={self.method!r}, peak={self.peak})")


# ---- layer profiles ---------------------------------------------------------------------------------
Method = Literal["patching", "residual", "sae"]
METHODS = ("patching", "residual", "sae")
_POSITIONS = {"patching": ("last", "suffix"), "residual": ("last", "question"), "sae": ("question", "last")}
# (what a bar is, what the line is) for each method's figure
_LABELS = {
    "patching": ("gain in fraction carried over layer L-1", "fraction of the margin difference carried"),
    "residual": ("gain in normalised distance over layer L-1", "phrasing distance / between-question distance"),
    "sae": ("register-sensitive share of SAE activation mass", ""),
}


@dataclass(frozen=True, eq=False)
class LayerProfile(Result):
    """One score per decoder layer from one kind of evidence; `select` turns it into a `LayerSelection`.

    ``values`` is the measured curve (patching: fraction of the margin difference carried when layer L is
    patched; residual: distance between the phrasings over the distance between questions; sae: the
    register-sensitive share of SAE activation mass). ``scores`` is what each layer adds: for the two
    cumulative curves the gain over layer L-1 (before layer 0: the token embeddings), for "sae" the values
    themselves. NaN marks layers that were not measured (``missing``: no SAE).
    """

    method: str
    scores: tuple[float, ...]
    values: tuple[float, ...]
    n_layers: int
    n_pairs: int
    positions: str
    model_name: str = ""
    layers_pattern: str = "language_model.layers"
    missing: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    selection_pairs: tuple[ParaphrasePair, ...] = field(default=(), repr=False, compare=False)  # the pairs measured

    @property
    def peak(self) -> int | None:
        """The layer with the highest score (None when no layer was measured)."""
        s = np.asarray(self.scores, dtype=float)
        return int(np.nanargmax(s)) if np.isfinite(s).any() else None

    def select(self, width: int = 5) -> LayerSelection:
        """The contiguous ``width``-layer window with the highest total score.

        Ties (e.g. several windows around the only layer with an SAE) go to the window centred nearest the peak.
        """
        _check_width(width, self.n_layers, self.model_name)
        s = np.asarray(self.scores, dtype=float)
        sums = np.array([np.nansum(s[i:i + width]) if np.isfinite(s[i:i + width]).any() else -np.inf
                         for i in range(self.n_layers - width + 1)])
        if not np.isfinite(sums).any():
            raise InterpError(f"no layer of this {self.method} profile has a score; nothing to select")
        best = np.flatnonzero(np.isclose(sums, sums.max(), rtol=1e-9, atol=1e-12))
        peak = self.peak
        start = int(min(best, key=lambda i: (abs(i + (width - 1) / 2 - peak), i)))
        if sums[start] <= 0:
            warnings.warn(f"no layer of this {self.method} profile shows a positive score (best window: "
                          f"{sums[start]:.3g}); the selected window is arbitrary. Try more pairs or another method.",
                          stacklevel=2)
        meta = {"window_score": float(sums[start]), "values": list(self.values), "missing": list(self.missing),
                "positions": self.positions, "n_pairs": self.n_pairs, "model": self.model_name}
        return LayerSelection(tuple(range(start, start + width)), self.n_layers, tuple(self.scores), self.method,
                              peak, self.layers_pattern, meta, self.selection_pairs)

    def figure(self, window: Sequence[int] | None = None):
        """Bars: each layer's score; line: the measured curve; ``window`` (e.g. ``sel.layers``) shaded."""
        score_label, value_label = _LABELS[self.method]
        return _layers_figure(self.scores, self.values if self.method != "sae" else (), score_label=score_label,
                              value_label=value_label, window=window, missing=self.missing,
                              title=f"{self.method} profile of {self.model_name} ({self.n_pairs} pairs, "
                                    f"{self.positions} positions): peak layer {self.peak}")

    def __repr__(self) -> str:
        measured = self.n_layers - len(self.missing)
        top = np.argsort(-np.nan_to_num(np.asarray(self.scores, dtype=float), nan=-np.inf))[:3]
        tops = ", ".join(f"{int(i)} ({self.scores[int(i)]:+.3g})" for i in top if np.isfinite(self.scores[int(i)]))
        return (f"LayerProfile({self.method!r}, {self.model_name!r}, {measured}/{self.n_layers} layers measured, "
                f"{self.n_pairs} pairs, positions={self.positions!r}; top layers {tops})")


def _layers_figure(scores: Sequence[float], values: Sequence[float], *, score_label: str, value_label: str,
                   title: str, window: Sequence[int] | None = None, missing: Sequence[int] = ()):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    x = list(range(len(scores)))
    inside = set(window or ())
    fig = make_subplots(specs=[[{"secondary_y": bool(values)}]])
    fig.add_trace(go.Bar(x=x, y=[None if not np.isfinite(v) else v for v in scores], name=score_label,
                         marker_color=["#d62728" if i in inside else "#1f77b4" for i in x]), secondary_y=False)
    if values:
        fig.add_trace(go.Scatter(x=x, y=[None if not np.isfinite(v) else v for v in values], mode="lines+markers",
                                 name=value_label, line=dict(color="#444")), secondary_y=True)
        fig.update_yaxes(title_text=value_label, secondary_y=True, tickformat=".3~g", showgrid=False)
    if window:
        fig.add_vrect(x0=min(window) - 0.5, x1=max(window) + 0.5, fillcolor="#d62728", opacity=0.08, line_width=0)
    for layer in missing:
        fig.add_annotation(x=layer, y=0, text="no SAE", showarrow=False, textangle=-90, font=dict(color="#999"))
    fig.update_yaxes(title_text=score_label, secondary_y=False)
    fig.update_layout(title=title, xaxis_title="decoder layer", template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig


def _check_width(width: Any, n_layers: int, name: str) -> None:
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= n_layers:
        raise InterpError(f"width={width!r}: '{name}' has {n_layers} decoder layers; pass an int from 1 to {n_layers}")


@exclusive
def layer_profile(model: Model, pairs: Sequence[ParaphrasePair], *, method: Method = "patching",
                  saes: dict[int, Any] | None = None, positions: str | None = None, batch_size: int | None = None,
                  strategy: Literal["cache", "full"] = "cache", test: str = "wilcoxon", alpha: float = 0.05,
                  progress: bool = True) -> LayerProfile:
    """Score every decoder layer for how much of the register difference between two phrasings it carries.

    ``method``:
    - ``"patching"``: phrasing a's residual stream at the answer position (``positions="last"``) or at the
      template tokens after the question that both phrasings share (``"suffix"``) replaces phrasing b's at
      the output of layer L (the question tokens cannot be patched: the phrasings differ in length).
      Value: how far that moves b's margin towards a's, as a fraction of margin_a - margin_b (raw margins;
      least squares over pairs, so pairs with a large difference count most; 1 at the last layer).
      Everything before the patched tokens is identical to b's clean run (attention is causal), so b's
      prefix runs once into a KV cache and all (pair, layer) patches then run as one batched step over the
      patched tokens only (``strategy="full"`` reruns whole prompts, batched, for models that take no cache).
    - ``"residual"``: mean distance between the two phrasings' residual streams (at the last token, or
      mean over question tokens), divided by the mean distance between different questions' (same
      phrasing side); works for any wrapped decoder, no SAE needed.
    - ``"sae"``: with ``saes={layer: SAE}`` (a key of None: the layer in the SAE's hook_name), the share of
      SAE activation mass (weighted by decoder norm) in features with q < ``alpha`` in a paired ``test``
      between phrasings; layers without an SAE are NaN.

    The scores used to pick layers are each layer's gain on the patching and residual curves (where the
    difference arises, not where it persists) and the SAE share itself; see `LayerProfile`.

    Prompts are batched by token length (less padding); results come back in the caller's pair order. Under
    several processes (``accelerate launch`` / torchrun) every process makes the same list of batches and runs
    its share of them; the per-pair results are gathered and aggregated identically everywhere, so each
    process returns exactly the one-process profile ("sae" splits through `interp.capture`).
    """
    items = check_pairs(pairs, minimum=2)
    if method not in METHODS:
        raise InterpError(f"method={method!r}: use one of {', '.join(METHODS)}")
    positions = positions or _POSITIONS[method][0]
    if positions not in _POSITIONS[method]:
        raise InterpError(f"positions={positions!r} does not work with method={method!r}; use one of "
                          f"{_POSITIONS[method]}")
    if saes is not None and method != "sae":
        raise InterpError(f"saes= is only used by method='sae' (got method={method!r})")
    if strategy not in ("cache", "full"):
        raise InterpError(f"strategy={strategy!r}: use 'cache' (default) or 'full'")
    if batch_size is None:
        batch_size = 16 if model.device.type == "cuda" else 8
    if batch_size < 1:
        raise InterpError(f"batch_size={batch_size} must be >= 1")
    missing: tuple[int, ...] = ()
    meta: dict[str, Any]
    if method == "patching":
        values, scores, meta = _patching_profile(model, items, positions, batch_size, strategy, progress)
    elif method == "residual":
        values, scores, meta = _residual_profile(model, items, positions, batch_size, progress)
    else:
        values, meta = _sae_profile(model, items, saes, positions, batch_size, test, alpha, progress)
        scores = values
        missing = tuple(i for i in range(model.n_layers) if not np.isfinite(values[i]))
    meta["processes"] = dist.world()
    return LayerProfile(method=method, scores=tuple(float(v) for v in scores), values=tuple(float(v) for v in values),
                        n_layers=model.n_layers, n_pairs=len(meta.get("pair_ids", items)), positions=positions,
                        model_name=model.name, layers_pattern=layers_pattern_of(model.layers_path), missing=missing,
                        meta=meta, selection_pairs=tuple(items))


@exclusive
def find_layers(model: Model, pairs: Sequence[ParaphrasePair], *, width: int = 5, method: Method = "patching",
                **kw: Any) -> LayerSelection:
    """The contiguous ``width``-layer window with the most evidence (see `layer_profile` for ``method`` and ``kw``)."""
    _check_width(width, model.n_layers, model.name)
    return layer_profile(model, pairs, method=method, **kw).select(width)


def _gains(values: np.ndarray, before: float = 0.0) -> np.ndarray:
    """What each layer adds to a cumulative curve: values[L] - values[L-1] (``before`` for layer -1)."""
    return np.diff(np.concatenate([[before], values]))


# ---- batching and splitting between processes --------------------------------------------------------
_BY_LENGTH = True  # batch prompts of similar token length together (False: the caller's order, for tests)


def _length_keys(model: Model, *sides: Sequence[Prompt]) -> list[tuple[int, ...]]:
    """A sort key per prompt (per pair with several ``sides``): has an image, then token counts of each side.

    Counted on the formatted text with image placeholders unexpanded: every image of one model expands to
    the same number of tokens, so image prompts sort among themselves by the rest of their length."""
    counts = []
    for prompts in sides:
        texts = [model.format(p.question, context=p.context, image=p.image is not None) for p in prompts]
        counts.append([len(ids) for ids in model.tokenizer(texts, add_special_tokens=False)["input_ids"]])
    return [(int(sides[0][i].image is not None), *(c[i] for c in counts)) for i in range(len(sides[0]))]


def _batches(keys: Sequence[tuple[int, ...]], batch_size: int) -> list[list[int]]:
    """Index batches of at most ``batch_size``, formed after a stable sort by ``keys``."""
    order = sorted(range(len(keys)), key=keys.__getitem__) if _BY_LENGTH else list(range(len(keys)))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _deal(batches: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """This process's batches and the item order in which `_gather` receives every process's rows.

    Batches are dealt in turn (process r runs batches r, r + world, ...) rather than cut into contiguous
    runs: the batches are sorted by length, and dealing spreads short and long ones evenly. Every process
    computes the same list, so each forward sees exactly the batch it would in a one-process run."""
    rank, world = dist.rank_and_world()
    return batches[rank::world], [i for r in range(world) for b in batches[r::world] for i in b]


def _gather(rows: list[Tensor], order: list[int], trailing: tuple[int, ...]) -> Tensor:
    """Every process's ``rows`` (one ``[batch, *trailing]`` float32 tensor per batch it ran) as one tensor
    ``[items, *trailing]`` in item order; bitwise what each process computed."""
    local = torch.cat(rows) if rows else torch.empty(0, *trailing)
    out = torch.empty(len(order), *trailing)
    out[torch.tensor(order, dtype=torch.long)] = dist.gather_rows(local)
    return out


def _agreed_min(value: int) -> int:
    """The smallest of every process's ``value``: settings that shape a forward must agree across processes."""
    if dist.world() == 1:
        return value
    return int(dist.gather_rows(torch.tensor([value], dtype=torch.int64)).min())


# ---- method "residual" ------------------------------------------------------------------------------
def _pooled_resid(model: Model, prompts: Sequence[Prompt], positions: str, batch_size: int,
                  progress: bool) -> Tensor:
    """Residual stream of every prompt, pooled over ``positions``: ``[n_layers + 1, n_prompts, d_model]``.

    Row 0 is the token embeddings (what layer 0 reads), row L + 1 the output of decoder layer L.
    """
    layers = list(range(model.n_layers))
    mine, order = _deal(_batches(_length_keys(model, prompts), batch_size))
    embed = model.hf.get_input_embeddings()
    rows_out: list[Tensor] = []  # per batch run here: [batch, n_layers + 1, d_model]
    with torch.inference_mode():
        for idx in tqdm(mine, desc=f"residual {model.name}", disable=not progress or not dist.is_main(),
                        leave=False):
            batch = model.encode([prompts[i] for i in idx])
            sel = position_mask(model, batch, positions, ())
            counts = sel.sum(1)
            if (counts == 0).any():
                raise InterpError(f"prompt {idx[int((counts == 0).nonzero()[0])]} has no {positions} tokens; "
                                  "check that its question appears in the formatted prompt, or use positions='last'")
            kept = run_hooked(model, batch, layers, sel, torch.float32)
            row = sel.nonzero()[:, 0].to(model.device)
            sel_dev = sel.to(model.device)
            per_site = [embed(batch.input_ids[sel_dev]).float()] + [kept[i] for i in layers]
            pooled = [torch.zeros(len(idx), model.d_model, device=model.device).index_add_(0, row, rows)
                      / counts[:, None].to(model.device) for rows in per_site]
            rows_out.append(torch.stack(pooled, 1).cpu())
    return _gather(rows_out, order, (model.n_layers + 1, model.d_model)).transpose(0, 1).contiguous()


def _residual_profile(model: Model, items: list[ParaphrasePair], positions: str, batch_size: int,
                      progress: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    n = len(items)
    pooled = _pooled_resid(model, _pair_prompts(items), positions, batch_size, progress)
    groups = [p.group if p.group is not None else f"\0{i}" for i, p in enumerate(items)]
    other = torch.tensor([[a != b for b in groups] for a in groups])  # pairs of *different* questions
    if not other.any():
        raise InterpError("every pair belongs to the same question group; the residual method needs at least two "
                          "different questions to normalise by")
    within, between = [], []
    for site in pooled:  # [2n, d]: the embeddings, then each layer's output
        a, b = site[:n], site[n:]
        within.append(float((a - b).norm(dim=-1).mean()))
        between.append(float((torch.cdist(a, a)[other].mean() + torch.cdist(b, b)[other].mean()) / 2))
    within_, between_ = np.array(within), np.array(between)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(between_ > 0, within_ / between_, 0.0)
    values = ratio[1:]
    meta = {"within": within_[1:].tolist(), "between": between_[1:].tolist(), "embedding_ratio": float(ratio[0])}
    return values, _gains(values, float(ratio[0])), meta


# ---- method "sae" -----------------------------------------------------------------------------------
def _sae_profile(model: Model, items: list[ParaphrasePair], saes: dict[int, Any] | None, positions: str,
                 batch_size: int, test: str, alpha: float, progress: bool) -> tuple[np.ndarray, dict[str, Any]]:
    if not saes:
        raise InterpError("method='sae' needs saes={layer: SAE}; load them with interp.load_sae(...) (e.g. Gemma "
                          "Scope 2) or train one with interp.train_sae(...)")
    # a key of None means "the layer in the SAE's hook_name"
    checked = {sae_layer(model, sae, None if layer is None else int(layer)): sae for layer, sae in saes.items()}
    n = len(items)
    acts = capture(model, _pair_prompts(items), layers=sorted(checked), positions=positions, batch_size=batch_size,
                   progress=progress)
    values = np.full(model.n_layers, np.nan)
    n_significant: dict[int, int] = {}
    labels = pair_clusters(items)
    for layer, sae in checked.items():
        x = pooled_features(sae, acts, layer, (positions,))[positions].numpy().astype(np.float64)
        stats = paired_stats(x[:n], x[n:], test, labels)  # clusters of dependent pairs are the test's units
        dec = sae.W_dec.detach().float().norm(dim=1).cpu().numpy()  # a feature's size in the residual stream
        sig = (stats["q"] < alpha).to_numpy()
        total = float((((stats["mean_a"] + stats["mean_b"]) / 2).to_numpy() * dec).sum())
        values[layer] = float((stats["diff"].abs().to_numpy()[sig] * dec[sig]).sum() / total) if total > 0 else 0.0
        n_significant[layer] = int(sig.sum())
    return values, {"n_significant": n_significant, "test": test, "alpha": alpha,
                    "n_clusters": stats_mod.n_clusters(labels, n)}


# ---- method "patching" ------------------------------------------------------------------------------
def _tail_index(batch: Batch, k: int) -> Tensor:
    """Positions of each row's last ``k`` real tokens: ``[rows, k]``."""
    return batch.last_index[:, None] - (k - 1) + torch.arange(k)


def _shared_tail(model: Model, items: list[ParaphrasePair], batch_size: int) -> int:
    """How many trailing tokens after the question every pair's two phrasings share (the template tail)."""
    k = None
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        texts = [Prompt(p.question_a, None, p.context) for p in chunk] + [Prompt(p.question_b, None, p.context)
                                                                        for p in chunk]
        batch = model.encode(texts)
        ids, q = batch.input_ids.cpu(), batch.question_mask
        for i, pair in enumerate(chunk):
            a, b = i, i + len(chunk)
            la, lb, run = int(batch.lengths[a]), int(batch.lengths[b]), 0
            while (run < min(la, lb) and ids[a, la - 1 - run] == ids[b, lb - 1 - run]
                   and not q[a, la - 1 - run] and not q[b, lb - 1 - run]):
                run += 1
            if run == 0:
                raise InterpError(f"pair {pair.id!r}: the two phrasings share no tokens after the question; use "
                                  "positions='last'")
            k = run if k is None else min(k, run)
    return int(k)


def _capture_source(model: Model, batch: Batch, k: int) -> tuple[Tensor, Tensor]:
    """Phrasing a's forward: each layer's output at the last ``k`` tokens ``[n_layers, rows, k, d]``, and margins."""
    pos = _tail_index(batch, k).to(model.device)
    rows = torch.arange(pos.shape[0], device=model.device)[:, None]
    src: list[Tensor] = [None] * model.n_layers  # type: ignore[list-item]

    def make_hook(i: int):
        def hook(_module, _inputs, output):
            src[i] = layer_output(output)[rows, pos].clone()

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(model.layers)]
    try:
        margins = _margin(model, last_hidden(model, batch))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(src), margins


def _patch_hooks(model: Model, groups: Sequence[int | None], rows: int, src: Tensor, pos: Tensor | None) -> list:
    """One hook per patched layer; copy j of the batch (rows j*rows ... (j+1)*rows) is patched at groups[j]."""

    def make_hook(lo: int, value: Tensor):
        def hook(_module, _inputs, output):
            resid = layer_output(output)  # [copies * rows, pos, d_model]
            if pos is None:  # a cached step: the batch holds exactly the patched tokens
                resid[lo:lo + rows] = value.to(resid.dtype)
            else:
                resid[lo:lo + rows][torch.arange(rows, device=resid.device)[:, None], pos] = value.to(resid.dtype)

        return hook

    return [model.layers[layer].register_forward_hook(make_hook(j * rows, src[layer]))
            for j, layer in enumerate(groups) if layer is not None]


_FULL_TOKENS_PER_FORWARD = {"cuda": 16384, "cpu": 4096}  # strategy="full": batch copies up to this many tokens


def _memory_budget(device: torch.device) -> int:
    """Bytes the copies of a prefix KV cache may take in one patched step."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.3)
    return 1 << 30


def _patch_cached(model: Model, body: Any, batch: Batch, src: Tensor, k: int,
                  budget: int) -> tuple[Tensor, Tensor]:
    """Clean and patched margins of phrasing b: ``[rows]`` and ``[rows, n_layers]``, reusing one prefix cache
    (its copies for one step take at most ``budget`` bytes)."""
    dev, rows = model.device, batch.input_ids.shape[0]
    prefix_len = batch.lengths - k
    if (prefix_len < 1).any():
        raise InterpError("a prompt is no longer than the patched tokens; use positions='last'")
    width = int(prefix_len.max())
    # Left-align every prefix so that each row's patched tokens come right after the cache, as in generate().
    col = torch.arange(width)[None, :] - (width - prefix_len[:, None])  # [rows, width]; < 0 = padding
    real = (col >= 0).to(dev)
    take = col.clamp(min=0).to(dev)
    pad_id = model.tokenizer.pad_token_id or 0
    prefix: dict[str, Tensor] = {"input_ids": torch.where(real, batch.input_ids.gather(1, take), pad_id),
                                 "attention_mask": real.long(), "position_ids": take}
    for key, value in batch.inputs.items():
        if key == "token_type_ids":
            prefix[key] = torch.where(real, value.gather(1, take), 0)
        elif key not in prefix:
            prefix[key] = value  # pixel values: one per image, in row order
    try:
        hf.check_forward(body, "position_ids", "cache")
    except hf.Unsupported as e:
        raise InterpError(f"{e}: KV-cached patching cannot run; pass strategy='full'") from e
    cache = hf.output_cache(body(**prefix, use_cache=True))
    tail_pos = (prefix_len[:, None] + torch.arange(k)).to(dev)  # [rows, k] true positions of the patched tokens
    tail_ids = batch.input_ids.gather(1, tail_pos)
    mask = torch.cat([prefix["attention_mask"], torch.ones(rows, k, dtype=torch.long, device=dev)], 1)
    groups: list[int | None] = [None, *range(model.n_layers)]  # None: b's clean run
    per_row = max(1, hf.cache_nbytes(cache) // rows)
    per_forward = max(1, min(len(groups), budget // (rows * per_row)))
    margins = []
    for g in range(0, len(groups), per_forward):
        chunk = groups[g:g + per_forward]
        copies = len(chunk)
        step = hf.tile_cache(cache, copies)  # copy j = rows j*rows...
        handles = _patch_hooks(model, chunk, rows, src, None)
        try:
            out = body(input_ids=tail_ids.repeat(copies, 1), attention_mask=mask.repeat(copies, 1),
                       position_ids=tail_pos.repeat(copies, 1), use_cache=True, **hf.cache_kwargs(body, step))
        finally:
            for h in handles:
                h.remove()
        margins.append(_margin(model, out.last_hidden_state[:, -1]).view(copies, rows))
        del step
    m = torch.cat(margins)  # [1 + n_layers, rows]
    return m[0], m[1:].T


def _patch_full(model: Model, _body: Any, batch: Batch, src: Tensor, k: int,
                _budget: int) -> tuple[Tensor, Tensor]:
    """As `_patch_cached`, but every copy reruns the whole prompt (for models that take no KV cache)."""
    rows, tokens = batch.input_ids.shape
    pos = _tail_index(batch, k).to(model.device)
    groups: list[int | None] = [None, *range(model.n_layers)]
    budget = _FULL_TOKENS_PER_FORWARD["cuda" if model.device.type == "cuda" else "cpu"]
    per_forward = max(1, min(len(groups), budget // (rows * tokens)))
    margins = []
    for g in range(0, len(groups), per_forward):
        chunk = groups[g:g + per_forward]
        copies = len(chunk)

        def tile(t: Tensor, n: int = copies) -> Tensor:
            return t.repeat(n, *([1] * (t.dim() - 1)))  # pixel values tile in the same row order

        tiled = dataclasses.replace(batch, inputs={key: tile(v) for key, v in batch.inputs.items()},
                                    lengths=tile(batch.lengths), question_mask=tile(batch.question_mask),
                                    special_mask=tile(batch.special_mask), image_mask=tile(batch.image_mask))
        handles = _patch_hooks(model, chunk, rows, src, pos)
        try:
            margins.append(_margin(model, last_hidden(model, tiled)).view(copies, rows))
        finally:
            for h in handles:
                h.remove()
    m = torch.cat(margins)
    return m[0], m[1:].T


def _patching_profile(model: Model, items: list[ParaphrasePair], positions: str, batch_size: int, strategy: str,
                      progress: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    body, _ = body_and_head(model)
    # Patching copies phrasing a's state into b, so a full transfer moves b to a's *raw* margin. For a pair
    # of opposite polarity that is the inconsistent answer, not the consistent one: such pairs carry no
    # "restored consistency" signal and are left out (the profile says how many).
    inverted = [p.id for p in items if not p.same_polarity]
    items = [p for p in items if p.same_polarity]
    if not items:
        raise InterpError(f"all {len(inverted)} pairs have opposite polarity; the patching profile needs pairs "
                          "whose two phrasings ask the same thing (same_polarity=True)")
    k = 1 if positions == "last" else _shared_tail(model, items, batch_size)
    n_layers = model.n_layers
    # b's prompt is the one patched (n_layers + 1 copies), so its length decides the batches
    keys = _length_keys(model, [p.prompt_b() for p in items], [p.prompt_a() for p in items])
    mine, order = _deal(_batches(keys, batch_size))
    run = _patch_cached if strategy == "cache" else _patch_full
    # The cache copies' budget shapes the forwards: measured once, the same on every process.
    budget = _agreed_min(_memory_budget(model.device)) if strategy == "cache" else 0
    rows: list[Tensor] = []  # per batch run here: [batch, 2 + n_layers] = margin a, margin b, patched margins
    bar = tqdm(total=sum(map(len, mine)) * n_layers, desc=f"patching {model.name}", unit="patch",
               disable=not progress or not dist.is_main(), leave=False)
    with torch.inference_mode():
        for idx in mine:
            src, m_a = _capture_source(model, model.encode([items[i].prompt_a() for i in idx]), k)
            m_b, m_patched = run(model, body, model.encode([items[i].prompt_b() for i in idx]), src, k, budget)
            rows.append(torch.cat([m_a[:, None], m_b[:, None], m_patched], 1).float().cpu())
            bar.update(len(idx) * n_layers)
    bar.close()
    margins = _gather(rows, order, (2 + n_layers,))
    m_a, m_b, m_patched = margins[:, 0], margins[:, 1], margins[:, 2:]
    gap = (m_a - m_b).double()
    denom = float((gap ** 2).sum())
    if denom == 0:
        raise InterpError("both phrasings of every pair give the same margin; there is no difference to patch")
    # Least-squares slope of (patched - b) on (a - b): pairs with a large margin difference count most.
    values = ((m_patched.double() - m_b[:, None].double()) * gap[:, None]).sum(0).numpy() / denom
    meta = {"patched_tokens": k, "strategy": strategy, "margin_a": m_a.tolist(), "margin_b": m_b.tolist(),
            "margin_patched": m_patched.tolist(), "mean_abs_gap": float(gap.abs().mean()),
            "pair_ids": [p.id for p in items], "excluded_opposite_polarity": inverted}
    # Before layer 0 the patched tokens are the same token ids in both phrasings: nothing is carried.
    return values, _gains(values), meta
