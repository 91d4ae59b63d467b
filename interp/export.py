"""Reproducible exports for a paper: figures (HTML, PNG, SVG), tables (CSV, LaTeX), metrics and a manifest.

`Recorder` is what notebooks and `interp run` write through; `export()` executes the notebooks headless
(papermill, fixed seeds and parameters) and renders each to HTML next to what they recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp._errors import InterpError
from interp._io import atomic_write_text
from interp._results import Result, jsonable

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK_ORDER = ("01_capture", "02_sae_transfer", "03_register_features", "04_find_layers",
                  "05_targeted_lora", "06_layer_ablation")


def static_export_available() -> bool:
    """Whether plotly can write PNG/SVG here (kaleido needs a Chrome or Chromium on the machine)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome"))


class Recorder:
    """Writes a run's figures, tables and metrics into ``folder`` (``figures/``, ``tables/``, ``metrics.json``)."""

    def __init__(self, folder: str | os.PathLike, *, static: bool | None = None):
        self.folder = Path(folder)
        (self.folder / "figures").mkdir(parents=True, exist_ok=True)
        (self.folder / "tables").mkdir(parents=True, exist_ok=True)
        self.static = static_export_available() if static is None else static
        path = self.folder / "metrics.json"
        self.metrics: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def figure(self, name: str, fig: Any) -> Path:
        """Save a plotly figure as interactive HTML and, where possible, static PNG and SVG."""
        html = self.folder / "figures" / f"{name}.html"
        # "directory": one shared plotly.min.js beside the figures, so pages open offline
        fig.write_html(str(html), include_plotlyjs="directory", full_html=True)
        if self.static:
            for ext in ("png", "svg"):
                fig.write_image(str(self.folder / "figures" / f"{name}.{ext}"), width=900, height=560, scale=2 if ext == "png" else 1)
        return html

    def table(self, name: str, df: Any, *, caption: str = "") -> Path:
        """Save a pandas table as CSV and as a LaTeX tabular."""
        csv = self.folder / "tables" / f"{name}.csv"
        atomic_write_text(csv, df.to_csv(index=False))
        latex = df.to_latex(index=False, float_format=lambda v: f"{v:.4g}", caption=caption or None,
                            label=f"tab:{name}", escape=True)
        atomic_write_text(self.folder / "tables" / f"{name}.tex", latex)
        return csv

    def metric(self, key: str, value: Any) -> None:
        """Record one metric (a number, or a JSON-able value) under a dotted key."""
        self.metrics[key] = jsonable(value)
        atomic_write_text(self.folder / "metrics.json", json.dumps(self.metrics, indent=1, sort_keys=True))

    def metrics_from(self, prefix: str, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float, bool, str)) or v is None:
                self.metric(f"{prefix}.{k}", v)


def notebook_setup(model_name: str, *, output_dir: str | os.PathLike, seed: int = 0, device: Any = None,
                   dtype: Any = None) -> tuple[Any, Recorder]:
    """The first cell of every notebook: seed everything, render figures for JupyterLab and HTML, open a
    `Recorder` on ``output_dir`` and load the model. Returns ``(model, recorder)``."""
    import random

    import numpy as np
    import torch

    from interp import viz
    from interp.models import load

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    viz.use_notebook_renderer()
    return load(model_name, device=device, dtype=dtype), Recorder(output_dir)


def run_manifest(*, model: Any = None, sae: Any = None, data: Any = None, seed: int | None = None,
                 extra: dict | None = None) -> dict[str, Any]:
    """Everything needed to regenerate a run: package versions, model/SAE ids and weight hashes,
    data hash, seeds and device."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("interp", "torch", "transformers", "sae-lens", "transformer-lens", "peft", "plotly", "numpy",
                "scipy", "statsmodels", "safetensors", "papermill"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    out: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions,
                           "python": platform.python_version(), "platform": platform.platform(),
                           "device": (torch.cuda.get_device_name() if torch.cuda.is_available() else
                                      f"cpu ({os.cpu_count()} cores)"), "seed": seed}
    if model is not None:
        out["model"] = {"name": model.name, "source": model.source, "weights": model.fingerprint,
                        "dtype": str(model.dtype)}
    if sae is not None:
        cfg = getattr(sae, "cfg", None)
        meta = getattr(cfg, "metadata", None)
        out["sae"] = {"hook": getattr(meta, "hook_name", None), "d_in": getattr(cfg, "d_in", None),
                      "d_sae": getattr(cfg, "d_sae", None), "release": getattr(meta, "release", None),
                      "sae_id": getattr(meta, "sae_id", None), "weights": _tensor_digest(sae)}
    if data is not None:
        out["data"] = {"n": len(data), "sha256": hashlib.sha256(json.dumps(jsonable(data), sort_keys=True)
                                                               .encode()).hexdigest()}
    if extra:
        out.update(jsonable(extra))
    return out


def _tensor_digest(module: Any) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ExportResult(Result):
    """What `export()` wrote: the run folder, executed notebooks, HTML pages and the metrics."""

    folder: Path
    notebooks: tuple[Path, ...]
    html: tuple[Path, ...]
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __repr__(self) -> str:
        return (f"ExportResult('{self.folder}', {len(self.notebooks)} notebooks, {len(self.metrics)} metrics, "
                f"{self.seconds:.0f} s)")


def export(out: str | os.PathLike = "exports/run", *, parameters: dict[str, Any] | None = None,
           notebooks: tuple[str, ...] | list[str] | None = None, seed: int = 0, kernel: str = "python3",
           progress: bool = True) -> ExportResult:
    """Execute the notebooks headless with fixed ``parameters`` and seed; write them, their HTML, and
    every figure/table/metric they record into ``out``."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    names = list(notebooks or NOTEBOOK_ORDER)
    unknown = [n for n in names if not (NOTEBOOKS / f"{n}.ipynb").is_file()]
    if unknown:
        raise InterpError(f"notebook {unknown[0]!r} not found in {NOTEBOOKS}; available: "
                          f"{', '.join(sorted(p.stem for p in NOTEBOOKS.glob('*.ipynb')))}")
    folder = Path(out).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    params = {"output_dir": str(folder), "seed": seed, **(parameters or {})}
    t0 = time.perf_counter()
    executed, pages = [], []
    env_before = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        for name in names:
            target = folder / f"{name}.ipynb"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(target), parameters=params,
                                           kernel_name=kernel, cwd=str(NOTEBOOKS.parent), progress_bar=progress)
            executed.append(target)
            body, _ = HTMLExporter().from_notebook_node(nbformat.read(target, as_version=4))
            page = folder / f"{name}.html"
            atomic_write_text(page, body)
            pages.append(page)
    finally:
        if env_before is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = env_before
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    manifest = run_manifest(seed=seed, extra={"parameters": params, "notebooks": names})
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))
    return ExportResult(folder, tuple(executed), tuple(pages), metrics, time.perf_counter() - t0)
