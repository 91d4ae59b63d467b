"""JupyterLab and the command line: results render as HTML, notebooks ship in the wheel, `interp lab` passes
its arguments through and stops its JupyterLab child, and a missing Chromium is said once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import interp
from interp._results import Result, to_html
from interp.consistency import ConsistencyReport
from interp.data import ParaphrasePair
from interp.features import FeatureAblation, FeatureCard, FeatureTable
from interp.layers import LayerProfile, LayerSelection
from interp.lora import AblationReport, EpochStats, TrainResult
from interp.saes import CorpusTransfer, TransferReport

ROOT = Path(__file__).resolve().parent.parent
EVIL = "<script>alert('x')</script>"


# ---- results, built by hand (no model needed) ------------------------------------------------------------
def _pairs(n: int = 12) -> list[ParaphrasePair]:
    ids = [EVIL] + [f"p{i}" for i in range(1, n)]
    return [ParaphrasePair(ids[i], f"Is there effusion {i}?", f"any fluid {i}?", answer="yes" if i % 2 else "no")
            for i in range(n)]


def _reports(model: str = "base") -> tuple[ConsistencyReport, ConsistencyReport]:
    rng = np.random.default_rng(0)
    pairs = _pairs()
    a, b = rng.normal(size=12), rng.normal(size=12)
    before = ConsistencyReport.from_margins(pairs, a, b, model=model, n_boot=200)
    after = ConsistencyReport.from_margins(pairs, a, a + 0.1 * b, model="adapted", n_boot=200)
    return before, after


def _transfer(model: str = "gemma3-270m") -> TransferReport:
    def corpus(name: str, r2: float) -> CorpusTransfer:
        return CorpusTransfer(name=name, n_prompts=20, n_tokens=300, r2=r2, r2_ci=(r2 - 0.01, r2 + 0.01),
                              r2_prompt_mean=r2 - 0.02, r2_prompt=(r2, r2 - 0.04), p_bootstrap=0.004, p_ttest=0.01,
                              threshold=0.9, alpha=0.05, l0=41.5, dead_fraction=0.125, cosine=0.97,
                              r2_prompt_mean_ci=(r2 - 0.03, r2 - 0.01), ce_score=0.876, ce_score_ci=(0.85, 0.9))

    return TransferReport(model=model, sae="sae-x", layer=9, hook_name="blocks.9.hook_resid_post",
                          module_path="model.language_model.layers.9", threshold=0.9, alpha=0.05,
                          token_mask="corpus text tokens only: the chat template, BOS, image and padding tokens are left out (positions where the attention mask is 1 and the token is part of the prompt text)",
                          corpora=(corpus("medical", 0.9312), corpus("general", 0.9547)),
                          test="one-sided bootstrap and t-test", tests={"r2_ci": "percentile bootstrap over prompts"})


def _feature_table(model: str = "gemma3-270m") -> FeatureTable:
    n = 40
    rng = np.random.default_rng(1)
    t = pd.DataFrame({"feature": np.arange(n), "pool": "question", "mean_a": rng.random(n), "mean_b": rng.random(n),
                      "diff": rng.normal(size=n), "d_z": rng.normal(size=n), "p": np.linspace(1e-5, 1, n),
                      "q": np.linspace(1e-4, 1, n), "n_nonzero": 10, "p_random": 0.5, "direction": "formal",
                      "active_a": 0.5, "active_b": 0.4})
    t.loc[0, "feature"] = 3818
    return FeatureTable(table=t, layer=9, n_pairs=12, test="wilcoxon", pools=("question",), d_sae=n,
                        model_name=model, sae_name="sae-x", test_name="Wilcoxon signed-rank, two-sided")


def _profile() -> LayerProfile:
    scores = tuple(float(s) for s in np.sin(np.arange(18) / 3))
    return LayerProfile(method="residual", scores=scores, values=tuple(np.cumsum(scores)), n_layers=18,
                        n_pairs=12, positions="last", model_name="gemma3-270m")


def _train_result(tmp: Path) -> TrainResult:
    hist = tuple(EpochStats(epoch=e, step=4 * e, loss=None if e == 0 else 1.0 / e, ce=None, kl=None,
                            flip_rate=0.25 - 0.05 * e, accuracy=0.5 + 0.1 * e, mean_margin_diff=0.7 - 0.1 * e,
                            n_eval=8, lr=1e-3) for e in range(3))
    return TrainResult(adapter_path=tmp / "adapter", layers=(7, 8, 9, 10, 11), history=hist, n_train=20, n_eval=8,
                       trainable_params=123456, steps=8, fast_path="gemma3", cache_bytes=0, output_dir=tmp)


def _feature_card() -> FeatureCard:
    top = pd.DataFrame({"prompt": [0, 3], "register": ["formal", "lay"], "question": [EVIL, "q"],
                        "max_act": [4.25, 3.5], "token": [" effusion", " fluid"], "position": [4, 5],
                        "context": [f"...{EVIL} effusion", "... any fluid"]})
    tokens = pd.DataFrame({"token": [" effusion"], "token_id": [7], "max_act": [4.25], "mean_act": [2.0],
                           "count": [3], "n_active": [3]})
    per = pd.DataFrame({"prompt": [0, 1, 2, 3], "register": ["formal", "formal", "lay", "lay"],
                        "max_act": [4.25, 1.0, 0.0, 3.5], "mean_act": [1, 0.5, 0, 1.2], "question": list("abcd")})
    return FeatureCard(feature=3818, layer=9, top_prompts=top, top_tokens=tokens,
                       by_register={"formal": {"n": 2, "mean_max": 2.625, "mean_act": 0.75, "frac_active": 1.0},
                                    "lay": {"n": 2, "mean_max": 1.75, "mean_act": 0.6, "frac_active": 0.5}},
                       per_prompt=per, model_name="gemma3-270m")


def _feature_ablation() -> FeatureAblation:
    pairs = pd.DataFrame({"id": [EVIL, "p1", "p2"], "diff_before": [1.0, 0.5, 0.2], "diff_after": [0.4, 0.5, 0.1],
                          "flip_before": [True, False, False], "flip_after": [False, False, False]})
    return FeatureAblation(feature=3818, layer=9, mode="zero", positions="question", n_pairs=3,
                           flip_rate_before=1 / 3, flip_rate_after=0.0, margin_diff_before=0.5667,
                           margin_diff_after=0.3333, accuracy_before=0.5, accuracy_after=0.5, p_flip=1.0,
                           p_margin_diff=0.25, pairs=pairs, flip_rate_ci_before=(0.0084, 0.9057),
                           margin_diff_change=-0.2333, margin_diff_change_ci=(-0.6, 0.0),
                           tests={"p_flip": "exact McNemar test on the paired flips",
                                  "margin_diff_change_ci": "95% percentile bootstrap over pairs"})


def _ablation_report() -> AblationReport:
    t = pd.DataFrame([{"arm": "baseline", "layers": "", "flip_rate": 0.25, "mean_margin_diff": 0.7, "accuracy": 0.5},
                      {"arm": EVIL, "layers": "0-4", "flip_rate": 0.125, "mean_margin_diff": 0.4, "accuracy": 0.625,
                       "p_flip": 0.031}])
    return AblationReport(table=t)


# ---- _repr_html_ -------------------------------------------------------------------------------------------
def _results(tmp: Path) -> dict[str, tuple[object, list[str]]]:
    """name -> (result, strings its HTML must show: key numbers, interval ends, test names)."""
    before, after = _reports()
    cmp = before.compare(after)
    lo, hi = before.ci["flip_rate"]
    d_lo, d_hi = cmp.ci["flip_rate_delta"]
    profile = _profile()
    return {
        "ConsistencyReport": (before, ["flip_rate", f"{before.flip_rate:.4g}", f"{lo:.4g}", f"{hi:.4g}",
                                       "accuracy"]),
        "ConsistencyComparison": (cmp, [f"{cmp.flip_rate_delta:.4g}", f"{d_lo:.4g}", f"{d_hi:.4g}",
                                        "Wilcoxon signed-rank", "accuracy"]),
        "TransferReport": (_transfer(), ["medical", "general", "0.9312", "[0.9212, 0.9412]", "0.876",
                                         "percentile bootstrap over prompts"]),
        "FeatureTable": (_feature_table(), ["3818", "Wilcoxon signed-rank, two-sided", "n_significant"]),
        "LayerProfile": (profile, ["residual", "per-layer scores", f"{profile.scores[5]:.4g}"]),
        "LayerSelection": (profile.select(5), ["3-7", "per-layer scores", "●"]),
        "TrainResult": (_train_result(tmp), ["123456", "7-11", "flip_rate", "0.15", "0.7"]),
        "FeatureCard": (_feature_card(), ["3818", "effusion", "4.25", "frac_active"]),
        "FeatureAblation": (_feature_ablation(), ["-0.2333", "[-0.6, 0]", "exact McNemar test on the paired flips",
                                                  "[0.0084, 0.9057]"]),
        "AblationReport": (_ablation_report(), ["baseline", "0.125", "0.031"]),
    }


def _html(result: object) -> str:
    method = getattr(type(result), "_repr_html_", None)
    # LayerSelection is not (yet) a Result subclass; the shared renderer takes any result dataclass
    return method(result) if method is not None else Result._repr_html_(result)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["ConsistencyReport", "ConsistencyComparison", "TransferReport", "FeatureTable",
                                  "LayerProfile", "LayerSelection", "TrainResult", "FeatureCard",
                                  "FeatureAblation", "AblationReport"])
def test_result_html_shows_key_numbers_and_escapes_text(name, tmp_path):
    result, expected = _results(tmp_path)[name]
    html = _html(result)
    assert html.lstrip().startswith("<") and "<table" in html
    for text in expected:
        assert text in html, f"{name}: {text!r} missing from its HTML"
    assert "<script>alert" not in html and "alert('x')</script>" not in html


@pytest.mark.parametrize("make", [lambda: _transfer(EVIL), lambda: _feature_table(EVIL), _feature_card])
def test_result_html_escapes_names(make):
    html = to_html(make())
    assert "<script>alert" not in html and ("&lt;script&gt;" in html or "\\u003cscript" in html)


def test_result_html_embeds_the_figure_at_notebook_width(tmp_path):
    html = to_html(_train_result(tmp_path))  # its figure sets width=1200
    assert "class='interp-figure'" in html and "cdn.plot.ly/plotly-" in html and "window.Plotly" in html
    assert '"width":1200' not in html and "responsive:true" in html
    # the figure's data is JSON with <, > and / escaped, so no text ends the script early
    script = html[html.index("<script type='text/javascript'>"):]
    assert script.count("</script>") == 1


def test_result_html_without_a_figure_still_renders(tmp_path):
    manual = LayerSelection((3, 4, 5), 18)  # made by hand: .figure() raises, no per-layer scores
    with pytest.raises(interp.InterpError):
        manual.figure()
    html = Result._repr_html_(manual)  # type: ignore[arg-type]
    assert "LayerSelection" in html and "layers: 3-5" in html and "interp-figure" not in html
    nofig = EpochStats(epoch=1, step=4, loss=0.5, ce=None, kl=None, flip_rate=0.125, accuracy=0.5,
                       mean_margin_diff=0.3, n_eval=8, lr=1e-3)  # no figure() at all
    assert "0.125" in nofig._repr_html_() and "interp-figure" not in nofig._repr_html_()


def test_result_html_keeps_large_figures_out(tmp_path, monkeypatch):
    import interp._results as r

    monkeypatch.setattr(r, "HTML_FIGURE_MAX_BYTES", 100)
    html = to_html(_train_result(tmp_path))
    assert "interp-figure" not in html and "123456" in html


# ---- ipywidgets ----------------------------------------------------------------------------------------------
def test_tqdm_finds_ipywidgets_for_notebook_bars():
    import warnings

    from tqdm.notebook import IProgress

    assert IProgress is not None, "ipywidgets is missing: tqdm shows 'IProgress not found' in notebooks"
    from importlib.metadata import requires

    assert any(r.startswith("ipywidgets") for r in requires("interp") or [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from tqdm.notebook import tqdm

        bar = tqdm(total=2, desc="01_capture", display=False)
        bar.update(2)
        bar.close()


# ---- notebooks in the wheel ----------------------------------------------------------------------------------
def test_notebooks_ship_in_the_wheel_and_are_found_from_it(tmp_path):
    from interp.export import NOTEBOOK_ORDER

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "w")], check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "w").glob("interp-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in NOTEBOOK_ORDER:
            assert {f"interp/notebooks/{name}.ipynb", f"interp/notebooks/{name}.py"} <= names, name
        z.extractall(tmp_path / "site")
    # the installed files, not the checkout: the package and its notebooks from the unpacked wheel
    code = textwrap.dedent("""
        import json, interp
        from interp.export import NOTEBOOKS, notebook_parameters
        print(json.dumps({"package": interp.__file__, "notebooks": str(NOTEBOOKS),
                          "files": sorted(p.name for p in NOTEBOOKS.iterdir()),
                          "params": sorted(notebook_parameters("05_targeted_lora"))}))
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    import json

    found = json.loads(out.strip().splitlines()[-1])
    assert found["package"].startswith(str(tmp_path / "site")), found["package"]
    assert found["notebooks"].startswith(str(tmp_path / "site"))
    assert {f"{n}.ipynb" for n in NOTEBOOK_ORDER} <= set(found["files"])
    assert "layers" in found["params"] and "output_dir" in found["params"]
    # `interp lab` from the installed package opens copies of the notebooks in the current folder
    env, record = _fake_jupyter(tmp_path, serve=False)
    env["PYTHONPATH"] = str(tmp_path / "site")
    subprocess.run([sys.executable, "-m", "interp.cli", "lab", "--no-browser"], env=env, cwd=tmp_path, check=True,
                   capture_output=True)
    argv = json.loads(record.read_text())["argv"]
    assert argv == ["lab", str(tmp_path / "interp-notebooks"), "--no-browser"]
    assert (tmp_path / "interp-notebooks" / "06_layer_ablation.ipynb").is_file()


# ---- interp lab ----------------------------------------------------------------------------------------------
def _fake_jupyter(tmp_path: Path, serve: bool = True) -> tuple[dict, Path]:
    """A `jupyter` on PATH that records its argv and pid, then serves (sleeps) until stopped."""
    bin_dir, record = tmp_path / "bin", tmp_path / "jupyter.json"
    bin_dir.mkdir()
    exe = bin_dir / "jupyter"
    exe.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n"
                   f"open({str(record)!r} + '.tmp', 'w').write(json.dumps({{'argv': sys.argv[1:], 'pid': os.getpid()}}))\n"
                   f"os.replace({str(record)!r} + '.tmp', {str(record)!r})\ntime.sleep({300 if serve else 0})\n")
    exe.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_lab_passes_arguments_through_and_stops_its_child(tmp_path, sig):
    import json

    env, record = _fake_jupyter(tmp_path)
    args = ["--port", "8899", "--no-browser", "--ip", "127.0.0.1"]
    lab = subprocess.Popen([sys.executable, "-m", "interp.cli", "lab", *args], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not record.exists():
        assert lab.poll() is None, lab.communicate()
        assert time.monotonic() < deadline, "the fake jupyter never started"
        time.sleep(0.1)
    seen = json.loads(record.read_text())
    assert seen["argv"][0] == "lab" and seen["argv"][2:] == args  # unchanged, in order
    assert (Path(seen["argv"][1]) / "01_capture.ipynb").is_file()
    lab.send_signal(sig)
    lab.wait(timeout=30)
    assert lab.returncode == 128 + sig
    deadline = time.monotonic() + 10
    while _alive(seen["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(seen["pid"]), "JupyterLab kept serving after interp lab stopped"


def test_lab_help_is_ours():
    out = subprocess.run([sys.executable, "-m", "interp.cli", "lab", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "passed on to jupyter lab unchanged" in out.stdout
