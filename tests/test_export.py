"""Notebooks execute headless, exports are complete and reproducible, and exported HTML renders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import interp
from interp.cli import main
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


# ---- parameters: names a notebook declares, literal values, checked before anything runs --------------
def test_a_code_injecting_parameter_name_is_refused_before_any_notebook_runs(tmp_path, capsys):
    marker, out = tmp_path / "pwned", tmp_path / "export"
    name = f"import pathlib;pathlib.Path({str(marker)!r}).touch();x"
    with pytest.raises(interp.InterpError, match="is not a Python identifier"):
        interp.export(out, notebooks=["04_find_layers"], parameters={name: 1}, progress=False)
    assert main(["export", "--out", str(out), "--notebooks", "04_find_layers", "--param",
                            f"{name}=1"]) == 2
    assert "is not a Python identifier" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()  # nothing ran, nothing was written


def test_a_parameter_value_that_is_not_a_literal_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    value = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert main(["export", "--out", str(tmp_path / "e"), "--param", f"n_pairs={value}"]) == 2
    assert "the value is not a Python literal" in capsys.readouterr().err
    with pytest.raises(interp.InterpError, match="values must be literals"):
        interp.export(tmp_path / "e", parameters={"n_pairs": object()}, progress=False)
    assert not marker.exists() and not (tmp_path / "e").exists()


def test_command_line_parameter_values_are_literals_or_bare_words():
    from interp.export import parse_parameter

    assert parse_parameter("n_pairs=20") == ("n_pairs", 20)
    assert parse_parameter("layers=[3, 9]") == ("layers", [3, 9])
    assert parse_parameter("ranges={'early': [0, 1]}") == ("ranges", {"early": [0, 1]})
    assert parse_parameter("sae_release=None") == ("sae_release", None)
    assert parse_parameter("device=true") == ("device", True)
    assert parse_parameter("model_name=tiny-medgemma") == ("model_name", "tiny-medgemma")
    assert parse_parameter("model_name=google/medgemma-4b-it") == ("model_name", "google/medgemma-4b-it")
    assert parse_parameter("layers=(1, 2)") == ("layers", [1, 2])
    for bad in ("n_pairs", "1x=2", "class=3", "lr=float('nan')", "x=a b"):
        with pytest.raises(interp.InterpError):
            parse_parameter(bad)


def test_an_undeclared_parameter_is_refused_naming_the_declared_ones(tmp_path):
    with pytest.raises(interp.InterpError) as err:
        interp.export(tmp_path / "e", notebooks=["04_find_layers"], parameters={"n_pair": 8}, progress=False)
    assert "no notebook among 04_find_layers declares a parameter 'n_pair'; did you mean 'n_pairs'?" in str(err.value)
    assert "declared: device, eval_fraction, methods, model_name, n_pairs, width" in str(err.value)
    with pytest.raises(interp.InterpError, match="set by export itself"):
        interp.export(tmp_path / "e", parameters={"output_dir": "/tmp/elsewhere"}, progress=False)
    assert not (tmp_path / "e").exists()


def test_each_notebook_gets_only_the_parameters_it_declares(tmp_path):
    from interp.export import _notebook_params, notebook_parameters

    assert notebook_parameters("04_find_layers")["methods"] == ["residual", "patching"]
    params = _notebook_params(["04_find_layers", "05_targeted_lora"], {"r": 4, "width": 2, "n_pairs": 10},
                              tmp_path, 3)
    assert params["04_find_layers"] == {"output_dir": str(tmp_path), "seed": 3, "width": 2, "n_pairs": 10}
    assert params["05_targeted_lora"] == {"output_dir": str(tmp_path), "seed": 3, "r": 4, "n_pairs": 10}


def test_an_unknown_model_is_one_line_before_any_notebook_runs(tmp_path, capsys):
    import time

    t0 = time.perf_counter()
    assert main(["export", "--out", str(tmp_path / "e"), "--param", "model_name=no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notebook parameter model_name='no-such-model': unknown model" in err
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "e").exists()


def test_export_refuses_a_folder_of_user_files_and_leaves_them(tmp_path):
    (tmp_path / "04_find_layers.ipynb").write_text("my own notebook")
    with pytest.raises(interp.InterpError, match="already holds files that interp did not write"):
        interp.export(tmp_path, notebooks=["04_find_layers"], progress=False)
    assert (tmp_path / "04_find_layers.ipynb").read_text() == "my own notebook"
    with pytest.raises(interp.InterpError, match="is a file, not a folder"):
        interp.export(tmp_path / "04_find_layers.ipynb", notebooks=["04_find_layers"], progress=False)
    with pytest.raises(interp.InterpError, match="inside a system folder"):
        interp.export("/proc/interp-export", notebooks=["04_find_layers"], progress=False)


def test_literal_parameters_reach_the_notebook_and_selection_uses_training_pairs(tmp_path):
    out = tmp_path / "e"
    assert main(["export", "--out", str(out), "--notebooks", "04_find_layers", "--param",
                            "model_name=tiny-medgemma", "n_pairs=12", "width=2", "methods=['residual']"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["layers.residual.selected"]) == 2
    train, _ = interp.data.split(interp.data.builtin("register")[:12], 0.3, seed=0)
    assert metrics["layers.selection.n"] == len(train) < 12
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["04_find_layers"]["methods"] == ["residual"]
    # a failing notebook is one line that names the notebook, the cell and the error
    with pytest.raises(interp.InterpError, match=r"notebook 04_find_layers failed in cell \[\d+\]: InterpError"):
        interp.export(out, notebooks=["04_find_layers"], parameters={"model_name": "tiny-medgemma", "n_pairs": 1},
                      progress=False)


def test_the_manifest_names_the_versions_it_ran_with():
    from interp.export import LOCK_FILE, locked_versions, run_manifest

    manifest = run_manifest(seed=0)
    for pkg in ("torch", "transformers", "peft", "sae-lens", "accelerate", "safetensors", "numpy", "scipy",
                "statsmodels"):
        assert manifest["versions"][pkg], pkg
    assert manifest["python"] and manifest["platform"] and manifest["device"]
    assert isinstance(manifest["differs_from_lock"], dict)
    locked = locked_versions()
    assert LOCK_FILE.is_file() and {"torch", "transformers", "peft", "sae-lens"} <= set(locked)


def test_missing_chromium_is_said_once_and_html_is_still_written(tmp_path, monkeypatch):
    import warnings

    import plotly.graph_objects as go

    ex = sys.modules["interp.export"]

    monkeypatch.delenv("INTERP_STATIC_WARNED", raising=False)
    monkeypatch.setattr(ex, "static_export_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = Recorder(tmp_path / "a")
        Recorder(tmp_path / "b")  # a second recorder in the same process stays quiet
        rec.figure("f", go.Figure(go.Bar(y=[1, 2])))
    said = [str(w.message) for w in caught if "PNG and SVG are skipped" in str(w.message)]
    assert len(said) == 1 and "apt-get install -y chromium" in said[0]
    assert (tmp_path / "a" / "figures" / "f.html").is_file() and not (tmp_path / "a" / "figures" / "f.png").exists()


def test_kaleido_failing_is_said_once_and_exports_go_on(tmp_path, monkeypatch):
    import warnings

    import plotly.graph_objects as go

    monkeypatch.delenv("INTERP_STATIC_WARNED", raising=False)

    def broken(*_a, **_k):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nmore")

    monkeypatch.setattr(go.Figure, "write_image", broken)
    rec = Recorder(tmp_path, static=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("a", "b"):
            rec.figure(name, go.Figure(go.Bar(y=[1, 2])))
    said = [str(w.message) for w in caught if "PNG and SVG are skipped" in str(w.message)]
    assert len(said) == 1 and "Kaleido requires Google Chrome" in said[0] and "chromium" in said[0]
    assert (tmp_path / "figures" / "b.html").is_file()


def test_export_bars_name_their_notebook(tmp_path, monkeypatch):
    import papermill

    seen = []

    def fake(src, dst, **kw):
        seen.append(kw["progress_bar"])
        shutil.copy(src, dst)

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    interp.export(tmp_path / "out", notebooks=["01_capture", "04_find_layers"],
                  parameters={"model_name": "tiny-medgemma"})
    assert seen == [{"desc": "01_capture"}, {"desc": "04_find_layers"}]
