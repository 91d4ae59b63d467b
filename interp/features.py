"""Stage 4 of the loop: SAE features that tell the formal and the lay phrasing of a question apart.

`register_features` ranks every feature of a sae-lens SAE by how differently it fires on the two phrasings
of each pair (paired tests, Benjamini-Hochberg FDR); `feature_card` shows what one feature reads;
`ablate_feature` splices the SAE into the forward pass, zeroes or clamps one feature, and reports the answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interp._errors import InterpError
from interp._results import Result
from interp.capture import Activations, capture, layer_output, position_mask
from interp.consistency import ConsistencyReport
from interp.data import ParaphrasePair, check_pairs
from interp.models import Model, Prompt, _as_prompt
from interp.scoring import last_hidden, project

Pool = Literal["question", "last"]
PairedTest = Literal["wilcoxon", "ttest"]
REGISTERS = ("formal", "lay")  # what question_a / question_b are in the built-in register pairs

_HOOK_LAYER = re.compile(r"(?:blocks|layers)\.(\d+)")
_NOT_RESIDUAL = ("hook_z", "attn", "mlp", "resid_mid")


# ---- checks shared with layers.py ----------------------------------------------------------------
def sae_layer(model: Model, sae: Any, layer: int | None = None) -> int:
    """The decoder layer whose residual stream (resid_post) ``sae`` reads, checked against the model.

    ``layer`` defaults to the layer named in ``sae.cfg.metadata.hook_name``; a contradiction, an SAE of
    another width or a non-residual hook site is an `InterpError`.
    """
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not hasattr(sae, "encode") or not hasattr(sae, "decode"):
        raise InterpError(f"sae must be a sae-lens SAE (with .cfg, .encode, .decode), got {type(sae).__name__}; "
                          "load one with interp.load_sae(...)")
    hook = str(getattr(getattr(cfg, "metadata", None), "hook_name", None) or "")
    if any(site in hook for site in _NOT_RESIDUAL):
        raise InterpError(f"the SAE reads '{hook}', not the residual stream; layer profiles and splicing need a "
                          "residual-stream SAE (e.g. Gemma Scope '-res' releases)")
    found = _HOOK_LAYER.search(hook)
    hooked = None if found is None else int(found.group(1)) - (1 if "resid_pre" in hook else 0)
    if layer is None:
        if hooked is None:
            raise InterpError(f"cannot tell which layer the SAE reads (hook_name={hook!r}); pass layer=")
        layer = hooked
    elif hooked is not None and hooked != int(layer):
        raise InterpError(f"the SAE was trained on '{hook}' (layer {hooked}) but layer={layer}; pass "
                          f"layer={hooked} or the SAE for layer {layer}")
    layer = model.check_layers([int(layer)])[0]
    if int(cfg.d_in) != model.d_model:
        raise InterpError(f"SAE d_in={cfg.d_in} but layer {layer} of '{model.name}' has d_model={model.d_model}: "
                          "this SAE belongs to another model; load the SAE trained on this model's residual stream")
    return layer


def _pair_prompts(pairs: Sequence[ParaphrasePair]) -> list[Prompt]:
    """Phrasing a of every pair, then phrasing b of every pair."""
    return [p.prompt_a() for p in pairs] + [p.prompt_b() for p in pairs]


# ---- SAE activations per prompt --------------------------------------------------------------------
def _sae_encode(sae: Any, resid: Tensor, chunk: int = 4096) -> Tensor:
    """``sae.encode`` in row chunks, on the SAE's device and dtype: ``[rows, d_sae]`` float32 on the CPU."""
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    if resid.shape[0] == 0:
        return torch.zeros(0, int(sae.cfg.d_sae))
    with torch.inference_mode():
        return torch.cat([sae.encode(resid[s:s + chunk].to(dev, dt)).float().cpu()
                          for s in range(0, resid.shape[0], chunk)])


def _question_and_last(info: Any) -> Tensor:
    sel = info.question_mask.clone()
    sel[-1] = True
    return sel


def pooled_features(sae: Any, acts: Activations, layer: int, pools: Sequence[str]) -> dict[str, Tensor]:
    """Per-prompt SAE activations ``{pool: [n_prompts, d_sae]}``: mean over question tokens and/or the last token.

    ``acts`` holds question tokens and each prompt's last token (the answer position); the encoding is per
    token, pooling comes after it (JumpReLU is not linear).
    """
    n = acts.n_prompts
    prompt, pos = acts.prompt_index, acts.position
    last_pos = torch.full((n,), -1, dtype=pos.dtype).scatter_reduce(0, prompt, pos, "amax")
    is_last = pos == last_pos[prompt]
    feats = _sae_encode(sae, acts[layer])  # [rows, d_sae]
    out: dict[str, Tensor] = {}
    if "last" in pools:
        out["last"] = torch.zeros(n, feats.shape[1]).index_copy_(0, prompt[is_last], feats[is_last])
    if "question" in pools:
        q = ~is_last if acts.positions != "question" else torch.ones_like(is_last)
        counts = torch.bincount(prompt[q], minlength=n)
        if (counts == 0).any():
            i = int((counts == 0).nonzero()[0])
            raise InterpError(f"prompt {i} has no question tokens to pool over; check that its question text "
                              "appears in the formatted prompt, or use pool=('last',)")
        sums = torch.zeros(n, feats.shape[1]).index_add_(0, prompt[q], feats[q])
        out["question"] = sums / counts[:, None]
    return out


def paired_stats(xa: np.ndarray, xb: np.ndarray, test: str = "wilcoxon") -> pd.DataFrame:
    """Paired comparison of every column of ``xa`` [n_pairs, k] with ``xb``: means, d_z, p and BH q.

    Columns whose paired differences are all zero (never active on these prompts) are not tested:
    their p, q and d_z are NaN and they do not count towards the FDR correction. Wilcoxon p-values are exact
    for columns without ties or zero differences (n <= 50) and normal-approximation otherwise.
    """
    from scipy import stats
    from statsmodels.stats.multitest import multipletests

    diff = xa - xb
    n = diff.shape[0]
    tested = np.any(diff != 0, axis=0)
    p = np.full(diff.shape[1], np.nan)
    if tested.any():
        d = diff[:, tested]
        if test == "wilcoxon":
            # scipy's 'auto' would run a permutation test over *every* column as soon as one has a tie or a zero
            # (slow for thousands of features); decide per feature instead: the exact null distribution where it
            # holds (no ties, no zeros, n <= 50), the normal approximation with tie correction elsewhere.
            s = np.sort(np.abs(d), axis=0)
            exact = ~((s[0] == 0) | np.any(np.diff(s, axis=0) == 0, axis=0)) & (n <= 50)
            cols = np.flatnonzero(tested)
            for use, method in ((exact, "exact"), (~exact, "asymptotic")):
                if use.any():
                    p[cols[use]] = stats.wilcoxon(d[:, use], axis=0, method=method).pvalue
        elif test == "ttest":
            p[tested] = stats.ttest_rel(xa[:, tested], xb[:, tested], axis=0).pvalue
        else:
            raise InterpError(f"test={test!r}: use 'wilcoxon' (signed-rank) or 'ttest' (paired t)")
        p[tested & np.isnan(p)] = 1.0  # a t-test on constant differences: no evidence either way
    q = np.full_like(p, np.nan)
    if tested.any():
        q[tested] = multipletests(p[tested], method="fdr_bh")[1]
    mean_diff = diff.mean(0)
    sd = diff.std(0, ddof=1) if n > 1 else np.full(diff.shape[1], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_z = np.where(tested, mean_diff / sd, np.nan)  # Cohen's d_z: mean paired difference / its SD
    return pd.DataFrame({"mean_a": xa.mean(0), "mean_b": xb.mean(0), "diff": mean_diff, "d_z": d_z, "p": p, "q": q,
                         "active_a": (xa > 0).mean(0), "active_b": (xb > 0).mean(0)})


# ---- register features -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FeatureTable(Result):
    """SAE features compared across the two phrasings of each pair; one row per (feature, pool).

    Columns: feature, pool, mean_a, mean_b (mean pooled activation on each phrasing), diff (a - b),
    d_z (paired effect size), p, q (Benjamini-Hochberg within each pool), direction (``labels[0]`` when it
    fires more on phrasing a), active_a/active_b (fraction of prompts where it fires). Sorted by q, then |d_z|.
    """

    table: pd.DataFrame
    layer: int
    n_pairs: int
    test: str
    pools: tuple[str, ...]
    labels: tuple[str, str] = REGISTERS
    alpha: float = 0.05
    d_sae: int = 0
    model_name: str = ""
    sae_name: str = ""

    def significant(self, pool: str | None = None) -> pd.DataFrame:
        """Rows with q < alpha (of one pool, by default the first)."""
        t = self._pool(pool)
        return t[t["q"] < self.alpha]

    def top(self, n: int = 10, *, pool: str | None = None, direction: str | None = None) -> pd.DataFrame:
        """The ``n`` most significant features (of one pool, optionally one direction)."""
        t = self._pool(pool)
        if direction is not None:
            if direction not in self.labels:
                raise InterpError(f"direction={direction!r}: use one of {self.labels}")
            t = t[t["direction"] == direction]
        return t.head(n)

    def _pool(self, pool: str | None) -> pd.DataFrame:
        pool = pool or self.pools[0]
        if pool not in self.pools:
            raise InterpError(f"pool={pool!r} was not computed; this table has {self.pools}")
        return self.table[self.table["pool"] == pool]

    def figure(self, pool: str | None = None):
        """Volcano plot: paired effect size d_z against -log10 p, significant features coloured by direction."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        pools = [pool] if pool else list(self.pools)
        fig = make_subplots(rows=1, cols=len(pools), subplot_titles=[f"{p} pooling" for p in pools])
        colours = {self.labels[0]: "#1f77b4", self.labels[1]: "#d62728", "n.s.": "#bbbbbb"}
        for col, pl in enumerate(pools, start=1):
            t = self._pool(pl).dropna(subset=["p"])
            group = np.where(t["q"] < self.alpha, t["direction"], "n.s.")
            for name, colour in colours.items():
                s = t[group == name]
                fig.add_trace(go.Scattergl(
                    x=s["d_z"].clip(-20, 20), y=-np.log10(s["p"].clip(lower=1e-300)), mode="markers",
                    name=name if name == "n.s." else f"more on {name}", legendgroup=name, showlegend=col == 1,
                    marker=dict(color=colour, size=6 if name != "n.s." else 4),
                    customdata=np.stack([s["feature"], s["q"], s["mean_a"], s["mean_b"]], -1),
                    hovertemplate=("feature %{customdata[0]}<br>d_z %{x:.2f}<br>q %{customdata[1]:.2g}<br>"
                                   f"mean {self.labels[0]} %{{customdata[2]:.3g}}<br>"
                                   f"mean {self.labels[1]} %{{customdata[3]:.3g}}<extra></extra>")), row=1, col=col)
            fig.update_xaxes(title_text=f"d_z ({self.labels[0]} - {self.labels[1]})", row=1, col=col)
        fig.update_yaxes(title_text="-log10 p", row=1, col=1)
        fig.update_layout(title=f"Register features at layer {self.layer} ({self.n_pairs} pairs, {self.test}, "
                                f"q < {self.alpha} coloured)", template="plotly_white")
        return fig

    def __repr__(self) -> str:
        t = self._pool(None)
        sig = t[t["q"] < self.alpha]
        top = ", ".join(f"{int(r.feature)} ({r.direction}, d_z={r.d_z:+.2f})" for r in sig.head(3).itertuples())
        return (f"FeatureTable(layer {self.layer}, {self.d_sae} features x {len(self.pools)} pool(s), {self.n_pairs} "
                f"pairs, {self.test}: {len(sig)} significant at q<{self.alpha} ({self.pools[0]} pooling)"
                f"{'; top ' + top if top else ''})")


def register_features(model: Model, sae: Any, pairs: Sequence[ParaphrasePair], *, layer: int | None = None,
                      pool: Sequence[str] | str = ("question", "last"), test: PairedTest = "wilcoxon",
                      alpha: float = 0.05, labels: tuple[str, str] = REGISTERS, batch_size: int | None = None,
                      progress: bool = True) -> FeatureTable:
    """Every SAE feature's activation on both phrasings of every pair, with paired tests and FDR q-values.

    ``pool``: ``"question"`` (mean over the question's tokens) and/or ``"last"`` (the answer position).
    ``layer`` defaults to the one in the SAE's ``hook_name``.
    """
    items = check_pairs(pairs, minimum=2)
    layer = sae_layer(model, sae, layer)
    pools = (pool,) if isinstance(pool, str) else tuple(pool)
    if not pools or set(pools) - {"question", "last"}:
        raise InterpError(f"pool={pool!r}: use 'question', 'last' or both")
    if test not in ("wilcoxon", "ttest"):
        raise InterpError(f"test={test!r}: use 'wilcoxon' (signed-rank) or 'ttest' (paired t)")
    acts = capture(model, _pair_prompts(items), layers=[layer], positions=_question_and_last,
                   batch_size=batch_size, progress=progress)
    pooled = pooled_features(sae, acts, layer, pools)
    n = len(items)
    frames = []
    for pl in pools:
        x = pooled[pl].numpy().astype(np.float64)
        stats = paired_stats(x[:n], x[n:], test)
        stats.insert(0, "pool", pl)
        stats.insert(0, "feature", np.arange(x.shape[1]))
        stats["direction"] = np.where(~stats["p"].isna(), np.where(stats["diff"] > 0, labels[0], labels[1]), "")
        frames.append(stats.assign(_abs=stats["d_z"].abs())
                      .sort_values(["q", "_abs"], ascending=[True, False], na_position="last").drop(columns="_abs"))
    table = pd.concat(frames, ignore_index=True)
    meta = getattr(sae.cfg, "metadata", None)
    name = str(getattr(meta, "sae_id", None) or getattr(meta, "hook_name", None) or type(sae).__name__)
    return FeatureTable(table=table, layer=layer, n_pairs=n, test=test, pools=pools, labels=tuple(labels),
                        alpha=alpha, d_sae=int(sae.cfg.d_sae), model_name=model.name, sae_name=name)


# ---- one feature -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FeatureCard(Result):
    """What one SAE feature reads: its top prompts and tokens, and how it fires on each register."""

    feature: int
    layer: int
    top_prompts: pd.DataFrame  # prompt, register, question, max_act, token, position, context
    top_tokens: pd.DataFrame  # token, token_id, max_act, mean_act (where active), count, n_active
    by_register: dict[str, dict[str, float]]  # register -> n, mean_max, mean_act, frac_active
    per_prompt: pd.DataFrame  # prompt, register, max_act, mean_act, question
    model_name: str = ""

    def figure(self):
        """Per-prompt peak activation by register (left) and the top-activating prompts (right)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65],
                            subplot_titles=["peak activation per prompt", f"top {len(self.top_prompts)} prompts"])
        for reg, grp in self.per_prompt.groupby("register", sort=False):
            fig.add_trace(go.Box(y=grp["max_act"], name=str(reg), boxpoints="all", jitter=0.4,
                                 text=grp["question"], hovertemplate="%{text}<br>%{y:.3g}<extra></extra>"),
                          row=1, col=1)
        tp = self.top_prompts.iloc[::-1]
        labels = [f"#{p} {c}" for p, c in zip(tp["prompt"], tp["context"], strict=True)]
        fig.add_trace(go.Bar(x=tp["max_act"], y=labels,
                             orientation="h", marker_color="#444", text=tp["register"], showlegend=False,
                             hovertemplate="%{y}<br>%{x:.3g}<extra></extra>"), row=1, col=2)
        fig.update_layout(title=f"Feature {self.feature} at layer {self.layer} ({self.model_name})",
                          template="plotly_white", showlegend=False, height=max(400, 30 * len(tp) + 150))
        return fig

    def __repr__(self) -> str:
        regs = ", ".join(f"{r}: fires on {v['frac_active']:.0%}, mean peak {v['mean_max']:.3g}"
                         for r, v in self.by_register.items())
        toks = ", ".join(repr(t) for t in self.top_tokens["token"].head(5))
        return f"FeatureCard(feature {self.feature} at layer {self.layer}; {regs}; top tokens {toks})"


def feature_card(model: Model, sae: Any, feature: int, prompts_or_pairs: Sequence[Any], *,
                 layer: int | None = None, top_k: int = 10, window: int = 6, batch_size: int | None = None,
                 progress: bool = True) -> FeatureCard:
    """One feature's card: top-activating prompts (with the peak token in context), top tokens, per-register stats.

    ``prompts_or_pairs``: paraphrase pairs (both phrasings, labelled formal/lay) or plain prompts.
    Special and image tokens are left out.
    """
    layer = sae_layer(model, sae, layer)
    if not 0 <= int(feature) < int(sae.cfg.d_sae):
        raise InterpError(f"feature={feature} is outside the SAE's {sae.cfg.d_sae} features")
    items = list(prompts_or_pairs)
    if not items:
        raise InterpError("prompts_or_pairs is empty: pass paraphrase pairs or prompts")
    if all(isinstance(p, ParaphrasePair) for p in items):
        prompts = _pair_prompts(items)
        registers = [REGISTERS[0]] * len(items) + [REGISTERS[1]] * len(items)
    else:
        prompts = [_as_prompt(p) for p in items]
        registers = ["prompt"] * len(prompts)
    acts = capture(model, prompts, layers=[layer], positions="all", exclude=("special", "image"),
                   batch_size=batch_size, progress=progress)
    act = _sae_encode(sae, acts[layer])[:, int(feature)]  # [rows]; only this column is kept
    prompt, pos, tok = acts.prompt_index, acts.position, acts.token_id
    n = len(prompts)
    peak = torch.full((n,), -float("inf")).scatter_reduce(0, prompt, act, "amax")
    mean = torch.zeros(n).index_add_(0, prompt, act) / torch.bincount(prompt, minlength=n).clamp(min=1)
    per_prompt = pd.DataFrame({"prompt": np.arange(n), "register": registers, "max_act": peak.numpy(),
                               "mean_act": mean.numpy(), "question": [p.question for p in prompts]})

    decode = model.tokenizer.decode
    counts = torch.bincount(prompt, minlength=n)
    starts = torch.cumsum(counts, 0) - counts  # capture() returns rows grouped by prompt, in prompt order
    rows = []
    for i in per_prompt.sort_values("max_act", ascending=False).head(top_k)["prompt"]:
        lo, hi = int(starts[i]), int(starts[i] + counts[i])
        j = lo + int(torch.argmax(act[lo:hi]))
        a, b = max(lo, j - window), min(hi, j + window + 1)
        context = (decode(tok[a:j].tolist()) + "[[" + decode([int(tok[j])]) + "]]" + decode(tok[j + 1:b].tolist()))
        rows.append({"prompt": int(i), "register": registers[i], "question": prompts[i].question,
                     "max_act": float(act[j]), "token": decode([int(tok[j])]), "position": int(pos[j]),
                     "context": context.replace("\n", " ")})
    top_prompts = pd.DataFrame(rows, columns=["prompt", "register", "question", "max_act", "token", "position",
                                              "context"])

    tokens = pd.DataFrame({"token_id": tok.numpy(), "act": act.numpy()})
    grouped = tokens.groupby("token_id")["act"]
    top_tokens = pd.DataFrame({"max_act": grouped.max(), "count": grouped.size(),
                               "n_active": grouped.agg(lambda a: int((a > 0).sum())),
                               "mean_act": grouped.agg(lambda a: float(a[a > 0].mean()) if (a > 0).any() else 0.0)})
    top_tokens = top_tokens[top_tokens["max_act"] > 0].sort_values("max_act", ascending=False).head(top_k)
    top_tokens = top_tokens.reset_index()
    top_tokens.insert(0, "token", [decode([int(t)]) for t in top_tokens["token_id"]])

    by_register = {}
    for reg, grp in per_prompt.groupby("register", sort=False):
        by_register[str(reg)] = {"n": int(len(grp)), "mean_max": float(grp["max_act"].mean()),
                                 "mean_act": float(grp["mean_act"].mean()),
                                 "frac_active": float((grp["max_act"] > 0).mean())}
    return FeatureCard(feature=int(feature), layer=layer, top_prompts=top_prompts, top_tokens=top_tokens,
                       by_register=by_register, per_prompt=per_prompt, model_name=model.name)


# ---- causal check: the SAE spliced into the forward pass -------------------------------------------
def _splice_hook(sae: Any, feature: int, sel: Tensor, target: float | None):
    """Forward hook replacing the resid with (edited SAE reconstruction + SAE error) at the selected positions.

    Written as ``x + decode(f_edit) - decode(f)``, which is the reconstruction-plus-error splice rearranged:
    without an edit it adds exactly zero, so the forward pass is bit-for-bit unchanged.
    """
    dev, dt = sae.W_dec.device, sae.W_dec.dtype

    def hook(_module, _inputs, output):
        resid = layer_output(output)  # [batch, pos, d_model]
        mask = sel.to(resid.device)
        x = resid[mask].to(dev, dt)
        f = sae.encode(x)
        edited = f.clone()
        edited[:, feature] = 0.0 if target is None else target
        delta = sae.decode(edited) - sae.decode(f)
        resid[mask] = resid[mask] + delta.to(resid.device, resid.dtype)
        return output

    return hook


def _margin(model: Model, hidden: Tensor) -> Tensor:
    """logit(yes) - logit(no) of final-norm hidden states ``[rows, d_model]``: ``[rows]`` float32 on the CPU."""
    logits = project(model, hidden, list(model.answer_ids)).float()
    return (logits[:, 0] - logits[:, 1]).cpu()


def _answer_margins(model: Model, prompts: Sequence[Prompt], *, layer: int, hook_for: Any, positions: str,
                    batch_size: int, bar: tqdm) -> Tensor:
    """Margins of ``prompts`` with an optional per-batch hook on ``layer`` (``hook_for(sel) -> hook`` or None)."""
    exclude = ("special", "image") if positions == "all" else ()
    out = torch.empty(len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].question) + len(prompts[i].context or ""))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = model.encode([prompts[i] for i in idx])
        handle = None
        if hook_for is not None:
            sel = position_mask(model, batch, positions, exclude)
            handle = model.layers[layer].register_forward_hook(hook_for(sel))
        try:
            out[idx] = _margin(model, last_hidden(model, batch))
        finally:
            if handle is not None:
                handle.remove()
        bar.update(len(idx))
    return out


@dataclass(frozen=True, eq=False)
class FeatureAblation(Result):
    """Margins, flips and accuracy of every pair before and after editing one SAE feature inside the forward."""

    feature: int
    layer: int
    mode: str
    positions: str
    n_pairs: int
    flip_rate_before: float
    flip_rate_after: float
    margin_diff_before: float  # mean |margin_a - corrected margin_b|
    margin_diff_after: float
    accuracy_before: float | None
    accuracy_after: float | None
    p_flip: float  # exact McNemar test on the paired flips
    p_margin_diff: float  # Wilcoxon signed-rank on the paired |margin differences|
    pairs: pd.DataFrame  # id, margin_a/b before/after (b polarity-corrected), flip and diff before/after
    clamp_values: dict[str, float] = field(default_factory=dict)  # mode="clamp": value set on each register
    model_name: str = ""

    def figure(self):
        """Per-pair |margin difference| before vs after (left); flip rate and mean difference (right)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        t = self.pairs
        fig = make_subplots(rows=1, cols=2, subplot_titles=["|margin difference| per pair", "summary"])
        top = float(max(t["diff_before"].max(), t["diff_after"].max(), 1e-6))
        fig.add_trace(go.Scatter(x=t["diff_before"], y=t["diff_after"], mode="markers", text=t["id"],
                                 marker=dict(color=np.where(t["flip_before"] != t["flip_after"], "#d62728",
                                                            "#1f77b4")),
                                 hovertemplate="%{text}<br>before %{x:.3g}<br>after %{y:.3g}<extra></extra>",
                                 name="pairs"), row=1, col=1)
        fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", line=dict(dash="dot", color="#999"),
                                 showlegend=False), row=1, col=1)
        labels = ["flip rate", "mean |margin diff|"]
        for when, flip, diff in (("before", self.flip_rate_before, self.margin_diff_before),
                                 ("after", self.flip_rate_after, self.margin_diff_after)):
            fig.add_trace(go.Bar(x=labels, y=[flip, diff], name=when), row=1, col=2)
        fig.update_xaxes(title_text="before", row=1, col=1)
        fig.update_yaxes(title_text="after", row=1, col=1)
        fig.update_layout(title=f"{self.mode} feature {self.feature} at layer {self.layer}: flip rate "
                                f"{self.flip_rate_before:.1%} -> {self.flip_rate_after:.1%} "
                                f"(McNemar p={self.p_flip:.2g})",
                          template="plotly_white", barmode="group")
        return fig

    def __repr__(self) -> str:
        return (f"FeatureAblation({self.mode} feature {self.feature} at layer {self.layer}, {self.n_pairs} pairs: "
                f"flip rate {self.flip_rate_before:.1%} -> {self.flip_rate_after:.1%} (p={self.p_flip:.2g}), "
                f"mean |margin diff| {self.margin_diff_before:.3f} -> {self.margin_diff_after:.3f} "
                f"(p={self.p_margin_diff:.2g}))")


def ablate_feature(model: Model, sae: Any, pairs: Sequence[ParaphrasePair], *, feature: int,
                   layer: int | None = None, mode: Literal["zero", "clamp"] = "zero",
                   positions: Literal["all", "question", "last"] = "all", batch_size: int | None = None,
                   progress: bool = True) -> FeatureAblation:
    """Zero one SAE feature (or clamp it to the other register's mean) inside the forward pass; report answers.

    The SAE is spliced in at ``layer`` as reconstruction + error term, so only the edited feature changes the
    residual stream. ``positions``: where to edit ("all" real tokens except special/image ones, the
    "question" tokens, or the "last" token). ``clamp`` sets phrasing a's feature to its mean on phrasing b
    (over the same positions) and vice versa.
    """
    from scipy import stats
    from statsmodels.stats.contingency_tables import mcnemar

    items = check_pairs(pairs)
    layer = sae_layer(model, sae, layer)
    feature = int(feature)
    if not 0 <= feature < int(sae.cfg.d_sae):
        raise InterpError(f"feature={feature} is outside the SAE's {sae.cfg.d_sae} features")
    if mode not in ("zero", "clamp"):
        raise InterpError(f"mode={mode!r}: use 'zero' or 'clamp' (to the other register's mean)")
    if positions not in ("all", "question", "last"):
        raise InterpError(f"positions={positions!r}: use 'all', 'question' or 'last'")
    batch_size = batch_size or (16 if model.device.type == "cuda" else 8)
    prompts_a = [p.prompt_a() for p in items]
    prompts_b = [p.prompt_b() for p in items]

    clamp: dict[str, float] = {}
    if mode == "clamp":
        exclude = ("special", "image") if positions == "all" else ()
        acts = capture(model, prompts_a + prompts_b, layers=[layer], positions=positions, exclude=exclude,
                       batch_size=batch_size, progress=progress)
        act = _sae_encode(sae, acts[layer])[:, feature]
        is_a = acts.prompt_index < len(items)
        clamp = {"a": float(act[~is_a].mean()), "b": float(act[is_a].mean())}

    n = len(items)
    bar = tqdm(total=4 * n, desc=f"ablate feature {feature}", unit="prompt", disable=not progress, leave=False)
    with torch.inference_mode():
        kw = dict(layer=layer, positions=positions, batch_size=batch_size, bar=bar)
        before_a = _answer_margins(model, prompts_a, hook_for=None, **kw)
        before_b = _answer_margins(model, prompts_b, hook_for=None, **kw)
        after_a = _answer_margins(model, prompts_a, hook_for=lambda sel: _splice_hook(sae, feature, sel,
                                                                                      clamp.get("a")), **kw)
        after_b = _answer_margins(model, prompts_b, hook_for=lambda sel: _splice_hook(sae, feature, sel,
                                                                                      clamp.get("b")), **kw)
    bar.close()

    sign = torch.tensor([1.0 if p.same_polarity else -1.0 for p in items])
    t = pd.DataFrame({"id": [p.id for p in items],
                      "margin_a_before": before_a.numpy(), "margin_b_before": (before_b * sign).numpy(),
                      "margin_a_after": after_a.numpy(), "margin_b_after": (after_b * sign).numpy()})
    acc = {}
    for when, (ma, mb) in (("before", (before_a, before_b)), ("after", (after_a, after_b))):
        rep = ConsistencyReport.from_margins(items, ma.numpy(), mb.numpy(), n_boot=0)  # the study's definitions
        t[f"flip_{when}"] = rep.table["flip"].to_numpy()
        t[f"diff_{when}"] = rep.table["margin_diff"].to_numpy()
        acc[when] = rep.accuracy
    table = pd.crosstab(t["flip_before"], t["flip_after"]).reindex(index=[False, True], columns=[False, True],
                                                                  fill_value=0)
    p_flip = float(mcnemar(table.to_numpy(), exact=True).pvalue)
    change = t["diff_after"] - t["diff_before"]
    p_diff = float(stats.wilcoxon(change).pvalue) if (change != 0).any() else 1.0
    return FeatureAblation(feature=feature, layer=layer, mode=mode, positions=positions, n_pairs=n,
                           flip_rate_before=float(t["flip_before"].mean()),
                           flip_rate_after=float(t["flip_after"].mean()),
                           margin_diff_before=float(t["diff_before"].mean()),
                           margin_diff_after=float(t["diff_after"].mean()),
                           accuracy_before=acc["before"], accuracy_after=acc["after"], p_flip=p_flip,
                           p_margin_diff=p_diff, pairs=t, clamp_values=clamp, model_name=model.name)
