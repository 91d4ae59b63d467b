"""Shared base for result objects: frozen dataclasses that print well and turn into JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """Turn tensors, arrays, dataframes, paths and dataclasses into JSON-ready Python values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else {
            f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # pandas DataFrame
        return [jsonable(r) for r in value.to_dict(orient="records")]
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy array or scalar
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class Result:
    """Mixin for frozen result dataclasses: ``to_dict()`` (JSON-ready) and ``to_json(path)``."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if not f.name.startswith("_")}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            from interp._io import atomic_write_text

            atomic_write_text(path, text)
        return text

    def _repr_html_(self) -> str:
        """JupyterLab's view: the headline numbers with their 95% intervals and tests, then the figure."""
        return to_html(self)


# ---- HTML for JupyterLab ---------------------------------------------------------------------------------
# One renderer for every result, driven by what the result already offers: tables from ``measures()``,
# ``changes()``, ``tests()``, ``calibration()``, ``table``/``table()``, else its numeric fields, each with the
# interval and test found beside it (``x_ci``, ``ci[x]``, ``tests[x]``). A subclass may override `_repr_html_`.
PLOTLY_CDN = "https://cdn.plot.ly/plotly-{version}.min.js"
HTML_MAX_ROWS = 12  # longer tables show their first rows and say how many there are
HTML_FIGURE_MAX_BYTES = 3_000_000  # larger figures (e.g. a 32k-point volcano) stay behind .figure()
_STYLE = ("<style>.interp-result table{border-collapse:collapse;font-size:12px;margin:4px 0 10px 0}"
          ".interp-result th,.interp-result td{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd;"
          "vertical-align:top}.interp-result th{background:#f5f5f5}.interp-result td.t{text-align:left}"
          ".interp-result caption{text-align:left;font-weight:bold;padding:2px 0}</style>")


def _esc(value: Any) -> str:
    import html

    return html.escape(str(value), quote=True)


def _num(value: Any, name: str = "") -> str:
    """A cell: p-values and q-values to 2 significant digits, other floats to 4, NaN as n/a."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "item") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        p_like = name in ("p", "q", "p_mid") or name.startswith("p_") or name.endswith("_p")
        return f"{value:.2g}" if p_like else f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return " → ".join(_num(v, name) for v in value)
    return str(value)


def _interval(ci: Any) -> str:
    try:
        lo, hi = (float(v) for v in ci)
    except (TypeError, ValueError):
        return ""
    return f"[{_num(lo)}, {_num(hi)}]" if math.isfinite(lo) and math.isfinite(hi) else ""


def _table(rows: list[dict[str, Any]], caption: str = "", total: int | None = None, *,
           max_rows: int | None = None) -> str:
    """An escaped HTML table of ``rows`` (dicts with the same keys); text columns align left."""
    if not rows:
        return ""
    max_rows = HTML_MAX_ROWS if max_rows is None else max_rows
    cols = list(rows[0])
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = []
    for r in rows[:max_rows]:
        cells = []
        for c in cols:
            v = r.get(c)
            text = _num(v, c)
            left = isinstance(v, str) and not re.match(r"[-+\d\[]", text)
            cells.append(f"<td class='t'>{_esc(text)}</td>" if left else f"<td>{_esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    n = len(rows) if total is None else total
    more = f" (first {max_rows} of {n} rows)" if n > min(len(rows), max_rows) else ""
    cap = f"<caption>{_esc(caption + more)}</caption>" if caption or more else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _frame_rows(df: Any) -> list[dict[str, Any]]:
    """DataFrame rows as dicts, ``ci_low``/``ci_high`` (or ``x_ci`` tuples) merged into a "95% CI" cell."""
    rows = []
    for rec in df.to_dict(orient="records"):
        out: dict[str, Any] = {}
        for k, v in rec.items():
            if k == "ci_low":
                out["95% CI"] = _interval((v, rec.get("ci_high"))) if v is not None and v == v else ""
            elif k == "ci_high":
                continue
            elif str(k).endswith("_ci") and isinstance(v, (list, tuple)):
                out[f"{str(k)[:-3]} 95% CI"] = _interval(v)
            elif isinstance(v, (dict, list, tuple)) and not (isinstance(v, tuple) and len(v) == 2):
                continue  # nested values (per-prompt lists, per-kind dicts) stay in to_dict()
            else:
                out[str(k)] = v
        rows.append(out)
    return rows


def _transposed(df: Any, key: str) -> list[dict[str, Any]]:
    """A short, wide table turned so that quantities are rows and ``key`` values (e.g. corpora) columns."""
    rows = _frame_rows(df)
    names = [str(r.pop(key, i)) for i, r in enumerate(rows)]
    quantities = [q for q in rows[0] if not any(isinstance(r.get(q), (dict, list)) for r in rows)] if rows else []
    out = []
    for q in quantities:
        if q.endswith(" 95% CI"):
            continue
        row: dict[str, Any] = {"quantity": q}
        for name, r in zip(names, rows, strict=True):
            ci = r.get(f"{q} 95% CI", "")
            row[name] = f"{_num(r.get(q), q)} {ci}".strip() if ci else r.get(q)
        if any(_num(v, q) not in ("", "n/a") for k, v in row.items() if k != "quantity"):  # not measured: left out
            out.append(row)
    return out


def _field_ci(result: Any, name: str) -> Any:
    """The interval stored beside field ``name``: ``name_ci``, ``a_ci_b`` for ``a_b``, or ``ci[name]``."""
    head, _, tail = name.rpartition("_")
    for cand in (f"{name}_ci", f"ci_{name}", f"{head}_ci_{tail}" if head else None):
        if cand and hasattr(result, cand):
            return getattr(result, cand)
    ci = getattr(result, "ci", None)
    return ci.get(name) if isinstance(ci, dict) else None


def _field_test(tests: Any, name: str) -> str:
    if not isinstance(tests, dict):
        return ""
    for cand in (name, f"p_{name}", f"{name}_ci"):
        if isinstance(tests.get(cand), str):
            return tests[cand]
    return ""


def _summary_rows(result: Any) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
    """(identity fields for the header, numeric fields with interval and test) of a dataclass result."""
    ident, numbers = [], []
    tests = getattr(result, "tests", None)
    for f in dataclasses.fields(result):
        if f.name.startswith("_") or not f.repr or "_ci" in f.name or f.name.startswith("ci"):
            continue
        v = getattr(result, f.name)
        if isinstance(v, (str, Path)) or (isinstance(v, int) and not isinstance(v, bool)):
            if "test" in f.name and isinstance(v, str) and v:  # the test's name, beside the numbers
                numbers.append({"quantity": f.name, "value": v, "95% CI": "", "test / interval": ""})
            elif 0 < len(str(v)) <= 80:  # long descriptions stay in repr() and to_dict()
                ident.append((f.name, v))
        elif isinstance(v, tuple) and v and all(isinstance(x, int) for x in v) and (len(v) != 2 or "layer" in f.name):
            contiguous = list(v) == list(range(v[0], v[0] + len(v)))
            ident.append((f.name, f"{v[0]}-{v[-1]}" if contiguous and len(v) > 2 else ", ".join(map(str, v))))
        elif isinstance(v, (float, bool)) or (isinstance(v, tuple) and len(v) == 2
                                               and all(isinstance(x, (int, float)) for x in v)):
            row = {"quantity": f.name, "value": v, "95% CI": _interval(_field_ci(result, f.name)),
                   "test / interval": _field_test(tests, f.name)}
            numbers.append(row)
    return ident, numbers


def _call(result: Any, name: str) -> Any:
    """``result.name()`` for a method, ``result.name`` for a field or property; None when it fails."""
    try:
        if callable(getattr(type(result), name, None)):
            return getattr(result, name)()
        return getattr(result, name, None)
    except Exception:  # a table the result cannot make (e.g. no scores) is simply left out
        return None


def _is_frame(value: Any) -> bool:
    return hasattr(value, "to_dict") and hasattr(value, "columns")


def result_tables(result: Any) -> str:
    """The HTML tables of ``result`` (no figure); used by `to_html`."""
    parts = []
    done = False
    for name, caption in (("measures", "measures (95% intervals)"), ("changes", "changes (paired 95% intervals)"),
                          ("tests", "tests")):
        df = _call(result, name)
        if _is_frame(df):
            # a test's clusters tell a clustered test from one that takes pairs as independent: kept there
            cols = [c for c in df.columns if c != "definition" and (c != "n_clusters" or name == "tests")]
            parts.append(_table(_frame_rows(df[cols]), caption))
            done = True
    if done:
        return "".join(parts)
    ident, numbers = _summary_rows(result) if dataclasses.is_dataclass(result) else ([], [])
    if numbers:
        keep = [k for k in ("95% CI", "test / interval") if any(r[k] for r in numbers)]
        parts.append(_table([{k: r[k] for k in ("quantity", "value", *keep)} for r in numbers], "key numbers"))
    cal = _call(result, "calibration")
    if isinstance(cal, dict):
        rows = [{"quantity": k, "value": v, "95% CI": _interval(cal.get(f"{k}_ci"))} for k, v in cal.items()
                if isinstance(v, (int, float)) and not k.endswith("_ci")]
        parts.append(_table(rows, f"calibration ({cal.get('interval', '')})"))
    if isinstance(getattr(result, "tests", None), dict) and not numbers:
        parts.append(_table([{"quantity": k, "test / interval": v} for k, v in result.tests.items()], "tests"))
    if isinstance(getattr(result, "tests", None), dict) and numbers:
        used = {r["test / interval"] for r in numbers}
        rest = [{"quantity": k, "test / interval": v} for k, v in result.tests.items() if v not in used]
        if rest:
            parts.append(_table(rest, "tests and intervals"))
    parts += _per_layer(result)
    top = _call(result, "top")
    df = top if _is_frame(top) else _call(result, "table")
    if _is_frame(df):
        full = _call(result, "table")
        total = len(full) if _is_frame(full) else len(df)
        wide = len(df.columns) > 10 and len(df) <= 6
        key = next((k for k in ("name", "arm", "corpus") if k in df.columns), None)
        if wide and key:
            parts.append(_table(_transposed(df, key), f"by {key}", max_rows=100))
        else:
            parts.append(_table(_frame_rows(df.head(HTML_MAX_ROWS)), f"top {len(df)} rows" if df is top else "table",
                                total=total))
    frames = 0
    for f in dataclasses.fields(result) if dataclasses.is_dataclass(result) else ():
        v = getattr(result, f.name)
        if f.repr and f.name != "table" and _is_frame(v) and not numbers and frames < 2:
            frames += 1  # per-row detail only where the result has no headline numbers (e.g. a feature card)
            parts.append(_table(_frame_rows(v.head(HTML_MAX_ROWS)), f.name, total=len(v)))
        elif f.repr and isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            rows = [{"": k, **{a: b for a, b in x.items() if isinstance(b, (int, float, str))}} for k, x in v.items()]
            parts.append(_table(rows, f.name))
    return "".join(parts)


def _per_layer(result: Any) -> list[str]:
    """Per-layer scores (and measured values) as one table, the selected window marked."""
    scores, n = getattr(result, "scores", None), getattr(result, "n_layers", None)
    if not isinstance(scores, tuple) or not scores or len(scores) != n:
        return []
    values = getattr(result, "values", None) or (getattr(result, "meta", {}) or {}).get("values", ())
    window = set(getattr(result, "layers", ()) or ())
    rows = []
    for i, s in enumerate(scores):
        row: dict[str, Any] = {"layer": i, "score": s}
        if values and len(values) == n:
            row["value"] = values[i]
        if window:
            row["selected"] = "●" if i in window else ""
        rows.append(row)
    if len(rows) > HTML_MAX_ROWS:  # the window and the best layers, in layer order
        best = sorted(range(n), key=lambda i: -(scores[i] if scores[i] == scores[i] else -math.inf))[:HTML_MAX_ROWS]
        keep = sorted(set(best[:HTML_MAX_ROWS - len(window)]) | window)[:HTML_MAX_ROWS]
        return [_table([rows[i] for i in keep], f"per-layer scores ({len(keep)} of {n} layers: the window and "
                       "the highest scores)", total=len(keep))]
    return [_table(rows, "per-layer scores")]


def figure_html(fig: Any, div_id: str | None = None) -> str:
    """A plotly figure as notebook-width HTML: plotly.js is taken from the page when it is there (JupyterLab
    with plotly's renderer, exported HTML) and from its CDN otherwise; offline, the div says so."""
    import uuid

    import plotly
    import plotly.io as pio

    fig = type(fig)(fig)  # a copy: the result's own figure keeps its size
    fig.update_layout(width=None, autosize=True)
    div_id = div_id or f"interp-{uuid.uuid4().hex}"
    payload = pio.to_json(fig, validate=False)  # plotly escapes <, > and / inside strings
    url = PLOTLY_CDN.format(version=plotly.offline.get_plotlyjs_version())
    height = int(fig.layout.height or 450)
    script = (f"(function(){{var id={json.dumps(div_id)},f={payload};function draw(){{var d=document."
              f"getElementById(id);if(d){{d.innerHTML='';window.Plotly.newPlot(d,f.data,f.layout,"
              f"{{responsive:true}});}}}}if(window.Plotly){{draw();return;}}var s=document.createElement("
              f"'script');s.src={json.dumps(url)};s.onload=draw;document.head.appendChild(s);}})();")
    return (f"<div id='{_esc(div_id)}' class='interp-figure' style='width:100%;height:{height}px'>"
            f"<small>figure: loading plotly.js from {_esc(url)}; offline, use .figure().show()</small></div>"
            f"<script type='text/javascript'>{script}</script>")


def to_html(result: Any, *, figure: bool = True) -> str:
    """``result`` as HTML for JupyterLab: a header, compact tables (numbers with 95% intervals and the test
    behind each p-value) and, with ``figure``, its plotly figure where it has one. All text is escaped."""
    name = type(result).__name__
    ident = _summary_rows(result)[0] if dataclasses.is_dataclass(result) else []
    head = ", ".join(f"{_esc(k)}: {_esc(v)}" for k, v in ident[:8])
    parts = [_STYLE, f"<div class='interp-result'><p><b>{_esc(name)}</b>" + (f" ({head})" if head else "") + "</p>",
             result_tables(result)]
    if figure and callable(getattr(result, "figure", None)):
        try:
            fig = result.figure()
            html = figure_html(fig) if fig is not None else ""
        except Exception:  # e.g. a hand-made LayerSelection has no scores: the tables are enough
            html = ""
        if len(html) <= HTML_FIGURE_MAX_BYTES:
            parts.append(html)
    parts.append("</div>")
    return "".join(parts)
