"""``interp demo``: the loop end to end on the embedded Gemma 3 270M, with progress, ending in a report.

Each step calls the public library function a notebook would call; the report folder gets a JSON summary,
a Markdown summary and the figures (interactive HTML).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from interp._results import jsonable

console = Console()


def _save_figure(fig: Any, folder: Path, name: str) -> str:
    path = folder / f"{name}.html"
    fig.write_html(str(path), include_plotlyjs="cdn")
    return path.name


def run_demo(out: Path = Path("reports/demo"), *, quick: bool = False, model_name: str = "gemma3-270m") -> dict:
    """Run the loop on ``model_name`` and write a report folder; returns the summary dict."""
    import interp
    from interp.models import RESOURCES

    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"model": model_name, "quick": quick}
    t0 = time.perf_counter()

    console.rule(f"[bold]interp demo[/bold] on {model_name}")
    with console.status("loading the model (the first run converts the GGUF once, ~1 min)"):
        model = interp.load(model_name)
    console.print(f"[green]loaded[/green] {model}")

    medical = (RESOURCES / "prompts_medical.txt").read_text().splitlines()
    general = (RESOURCES / "prompts_general.txt").read_text().splitlines()
    n = 16 if quick else 60
    layers = sorted({model.n_layers // 4, model.n_layers // 2, (3 * model.n_layers) // 4, model.n_layers - 1})
    acts = interp.capture(model, medical[:n] + general[:n], layers=layers, positions="last", cache=True)
    table = Table(title=f"residual stream at the last token, {n} medical + {n} general prompts")
    for col in ("layer", "mean norm (medical)", "mean norm (general)", "cosine(mean medical, mean general)"):
        table.add_column(col, justify="right")
    stats = {}
    for layer in layers:
        x = acts[layer].float()
        med, gen = x[:n], x[n:]
        cos = float(med.mean(0) @ gen.mean(0) / (med.mean(0).norm() * gen.mean(0).norm()))
        stats[layer] = {"norm_medical": float(med.norm(dim=-1).mean()), "norm_general": float(gen.norm(dim=-1).mean()),
                        "cosine_of_means": cos}
        table.add_row(str(layer), f"{stats[layer]['norm_medical']:.1f}", f"{stats[layer]['norm_general']:.1f}",
                      f"{cos:.3f}")
    console.print(table)
    summary["capture"] = {"layers": layers, "cache": str(acts.path), "per_layer": stats}

    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1))
    console.print(f"[bold green]done[/bold green] in {summary['seconds']:.0f} s; report in [bold]{out}[/bold]")
    return summary
