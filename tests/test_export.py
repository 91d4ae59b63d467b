"""Notebooks execute headless, exports are complete and reproducible, and exported HTML renders."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

import interp
from interp.export import NOTEBOOK_ORDER, NOTEBOOKS, Recorder, static_export_available

# Small settings so that every notebook runs in CI: tiny-medgemma (real MedGemma layout) for the
# training-heavy notebooks, the real 270M for capture.
TINY = {"model_name": "tiny-medgemma", "layer": 3, "d_sae": 128, "sae_steps": 60, "n_prompts": 24,
        "n_pairs": 24, "ranges": {"early": [0, 1], "late": [4, 5]}, "width": 2, "epochs": 1, "grad_accum": 2}
PER_NOTEBOOK = {
    "01_capture": {"model_name": "gemma3-270m", "n_prompts": 6, "layers": [3, 9, 17]},
    "02_sae_transfer": {k: TINY[k] for k in ("model_name", "layer", "d_sae", "sae_steps", "n_prompts")},
    "03_register_features": {k: TINY[k] for k in ("model_name", "layer", "d_sae", "sae_steps", "n_pairs")},
    "04_find_layers": {k: TINY[k] for k in ("model_name", "n_pairs", "width")},
    "05_targeted_lora": {"model_name": "tiny-medgemma", "n_pairs": 24, "layers": [2, 3], "epochs": 1, "grad_accum": 2},
    "06_layer_ablation": {k: TINY[k] for k in ("model_name", "n_pairs", "ranges", "epochs", "grad_accum")},
}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_notebooks_are_stored_without_outputs_and_paired():
    import nbformat

    for name in NOTEBOOK_ORDER:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.get("outputs") for c in code), f"{name}.ipynb has outputs"
        assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first code cell must be parameters"
        assert (NOTEBOOKS / f"{name}.py").is_file(), f"{name}.py (jupytext pair) missing"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every notebook executed once, each with its own small parameters, into one export folder."""
    folder = tmp_path_factory.mktemp("export")
    results = {name: interp.export(folder, notebooks=[name], parameters=params, progress=False)
               for name, params in PER_NOTEBOOK.items()}
    return folder, results


@pytest.mark.slow
def test_every_notebook_executes_and_exports_its_artefacts(exported):
    folder, _ = exported
    for name in NOTEBOOK_ORDER:
        assert (folder / f"{name}.ipynb").is_file() and (folder / f"{name}.html").is_file()
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("capture.n_rows", "transfer.medical.r2", "transfer.general.r2", "features.n_significant",
                "consistency.before.flip_rate", "consistency.after.flip_rate"):
        assert key in metrics, key
    assert -1 <= metrics["transfer.medical.r2"] <= 1
    figures = {p.name for p in (folder / "figures").iterdir()}
    for fig in ("capture_norms", "transfer_r2", "register_features", "layer_profile_residual", "lora_history",
                "ablation"):
        assert f"{fig}.html" in figures, fig
        if static_export_available():
            assert {f"{fig}.png", f"{fig}.svg"} <= figures, fig
    tables = {p.name for p in (folder / "tables").iterdir()}
    assert {"transfer.csv", "transfer.tex", "consistency.csv", "ablation.tex"} <= tables
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["versions"]["torch"]


@pytest.mark.slow
def test_export_twice_gives_the_same_metrics(tmp_path):
    params = {"model_name": "tiny-medgemma", "n_pairs": 16, "width": 2}
    first = interp.export(tmp_path / "a", notebooks=["04_find_layers"], parameters=params, progress=False)
    second = interp.export(tmp_path / "b", notebooks=["04_find_layers"], parameters=params, progress=False)
    assert first.metrics and first.metrics == second.metrics


def _screenshot(url: str, out) -> np.ndarray:
    from PIL import Image

    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={out.parent / 'chromium-profile'}", "--window-size=1000,700",
                    "--virtual-time-budget=8000", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out).convert("L"))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_exported_figure_html_renders_in_headless_chromium(tmp_path):
    import plotly.graph_objects as go

    rec = Recorder(tmp_path, static=False)
    fig = go.Figure(go.Bar(x=["formal", "lay"], y=[0.146, 0.044], marker_color=["#1f77b4", "#ff7f0e"]))
    fig.update_layout(template="plotly_white", width=900, height=600)
    page = rec.figure("flip_rates", fig)
    pixels = _screenshot(page.as_uri(), tmp_path / "shot.png")
    plot_area = pixels[100:550, 100:800]
    # plotly drew the bars: a good share of the plot area is dark, not the blank white page
    assert (plot_area < 200).mean() > 0.05


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_exported_notebook_html_renders_its_figure(exported, tmp_path):
    folder, _ = exported
    pixels = _screenshot((folder / "02_sae_transfer.html").as_uri(), tmp_path / "nb.png")
    assert pixels.std() > 20  # text, code and the plotted figure, not a blank page


def test_unknown_notebook_is_named(tmp_path):
    with pytest.raises(interp.InterpError, match="notebook '07_nothing' not found"):
        interp.export(tmp_path, notebooks=["07_nothing"])


def test_recorder_writes_tables_as_csv_and_latex(tmp_path):
    import pandas as pd

    rec = Recorder(tmp_path, static=False)
    rec.table("t", pd.DataFrame({"arm": ["baseline", "LoRA 15-19"], "flip rate": [0.146, 0.044]}))
    assert (tmp_path / "tables" / "t.csv").read_text().splitlines()[1] == "baseline,0.146"
    assert "\\begin{tabular}" in (tmp_path / "tables" / "t.tex").read_text()
    rec.metric("a.b", 1.5)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a.b": 1.5}
