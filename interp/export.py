"""Reproducible exports for a paper: figures (HTML, PNG, SVG), tables (CSV, LaTeX), metrics and a manifest.

`Recorder` is what notebooks and `interp run` write through; `export()` executes the notebooks headless
(papermill, fixed seeds and parameters) and renders each to HTML next to what they recorded. Parameters are
checked first: names a notebook declares, literal values, a model that resolves; output folders are refused
when they hold files the workbench did not write.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import keyword
import math
import os
import platform
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp._errors import ForeignFilesError, InterpError
from interp._io import (
    _path,
    atomic_write,
    atomic_write_text,
    has_marker,
    mark_folder,
    read_json_object,
    usable_folder,
)
from interp._results import Result, jsonable


def notebook_folder() -> Path:
    """The bundled notebooks: ``interp/notebooks`` in the installed package (a wheel carries the files; in a
    checkout it is a link to the repository's ``notebooks/``, the one copy that is edited)."""
    from importlib.resources import files

    return Path(str(files("interp") / "notebooks"))


NOTEBOOKS = notebook_folder()
NOTEBOOK_ORDER = ("01_capture", "02_sae_transfer", "03_register_features", "04_find_layers",
                  "05_targeted_lora", "06_layer_ablation")


def prepare_output(folder: str | os.PathLike, *, create: bool = True, what: str = "output folder") -> Path:
    """Check that ``folder`` can take the workbench's output and (``create``) make it, marked as ours.

    Refused, with the reason: a file, a path inside /proc, /sys or /dev, a place that cannot be written, a
    non-empty folder without the workbench's marker (`ForeignFilesError`: a user's files are never
    overwritten), and an activation cache (its manifest.json and shards are capture's, not a run's).
    ``create=False`` only checks, writing nothing."""
    path = usable_folder(folder, what=what)
    if path.is_dir():
        if _is_activation_cache(path):
            raise ForeignFilesError(f"{what} '{folder}' is an activation cache written by interp.capture (its "
                                    "manifest.json lists the cached shards); writing a run there would overwrite "
                                    "it. Choose a new or empty folder")
        entries = sorted(p.name for p in path.iterdir())
        if entries and not has_marker(path):  # is_workbench_folder, its cache half checked just above
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ForeignFilesError(f"{what} '{folder}' already holds files that interp did not write ({shown}); "
                                    "choose a new or empty folder so that nothing of yours is overwritten")
    return mark_folder(path, what=what) if create else path


def is_workbench_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is one the workbench writes runs into: it carries our marker (``.interp-output.json``,
    written by `prepare_output` and the other writers when they make a folder) and is not an activation cache.
    A manifest.json alone proves nothing: every capture cache has one that names interp's version."""
    folder = Path(folder)
    return has_marker(folder) and not _is_activation_cache(folder)


def _is_activation_cache(folder: Path) -> bool:
    """Whether ``folder``'s manifest.json is a capture cache's (``format``: `interp.activations.FORMAT`)."""
    from interp.activations import FORMAT

    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def static_export_available() -> bool:
    """Whether plotly can write PNG/SVG here (kaleido needs a Chrome or Chromium on the machine)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome"))


STATIC_FIX = ("install Debian's Chromium (apt-get install -y chromium) or Google Chrome; kaleido.get_chrome() "
              "would download one, but needs the network")
_QUIET_ENV = "INTERP_STATIC_WARNED"  # set for the notebooks `export` runs, so that their kernels do not repeat it


def warn_no_static(reason: str = "no Chrome or Chromium was found for kaleido") -> None:
    """Say once per process (and not again inside the notebooks an export runs) that PNG/SVG are skipped."""
    if os.environ.get(_QUIET_ENV):
        return
    os.environ[_QUIET_ENV] = "1"
    warnings.warn(f"figures are written as HTML only, PNG and SVG are skipped: {reason}. To get them, {STATIC_FIX}.",
                  RuntimeWarning, stacklevel=3)


class Recorder:
    """Writes a run's figures, tables and metrics into ``folder`` (``figures/``, ``tables/``, ``metrics.json``).

    The folder goes through `prepare_output`: a new or empty folder is made and marked as the workbench's, one
    already marked (an earlier run, a notebook re-run) is written into again, and anything else is refused
    before a file is touched. Every file is written to a temporary name and renamed into place."""

    def __init__(self, folder: str | os.PathLike, *, static: bool | None = None, what: str = "folder"):
        self.folder = prepare_output(folder, what=what)
        try:
            for sub in ("figures", "tables"):
                (self.folder / sub).mkdir(exist_ok=True)
        except OSError as e:
            raise InterpError(f"{what} '{folder}' cannot be written ({e.strerror or e}); choose another "
                              "folder") from None
        self.static = static_export_available() if static is None else static
        if static is None and not self.static:
            warn_no_static()
        self.metrics: dict[str, Any] = _read_metrics(self.folder / "metrics.json")

    def figure(self, name: str, fig: Any) -> Path:
        """Save a plotly figure as interactive HTML and, where possible, static PNG and SVG."""
        html = self.folder / "figures" / f"{name}.html"
        # "directory": one shared plotly.min.js beside the figures, so pages open offline
        write_figure_html(fig, html)
        if self.static:
            # the figure's own size where it sets one (wide multi-panel figures), else 900 x 560
            width, height = fig.layout.width or 900, fig.layout.height or 560
            try:
                for ext in ("png", "svg"):
                    atomic_write(self.folder / "figures" / f"{name}.{ext}",
                                 lambda tmp, ext=ext: fig.write_image(str(tmp), format=ext, width=width,
                                                                      height=height, scale=2 if ext == "png" else 1))
            except Exception as e:  # kaleido without a working browser: HTML is still written, said once
                self.static = False
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                warn_no_static(f"kaleido failed ({type(e).__name__}: {first[:200]})")
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

    def pairs(self, prefix: str, pairs: Any) -> None:
        """Record which pairs a step used: ``{prefix}.n`` and ``{prefix}.ids_sha256``."""
        for k, v in pairs_digest(pairs).items():
            self.metric(f"{prefix}.{k}", v)

    def metrics_from(self, prefix: str, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float, bool, str)) or v is None:
                self.metric(f"{prefix}.{k}", v)


def write_figure_html(fig: Any, path: str | os.PathLike) -> Path:
    """A plotly figure as an HTML page at ``path``, written atomically, with one shared ``plotly.min.js`` beside
    it (``include_plotlyjs="directory"``) so that pages open offline."""
    return atomic_write(path, lambda tmp: fig.write_html(str(tmp), include_plotlyjs="directory", full_html=True))


def _read_metrics(path: Path) -> dict[str, Any]:
    """The metrics an earlier run recorded in ``path`` (none when it is not there); an `InterpError` naming the
    file when it is not a JSON object, rather than overwriting it or failing inside json."""
    if not path.exists():
        return {}
    return read_json_object(path, what="the metrics JSON interp writes", writer="of metrics interp",
                            fix="move it out of the folder (or delete it, if it is an interp file you no longer "
                                "need) and run again")


def pairs_digest(pairs: Any) -> dict[str, Any]:
    """Which pairs a step used: their number and the sha256 of their sorted ids (for reports and manifests)."""
    ids = sorted(str(p.id) for p in pairs)
    return {"n": len(ids), "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


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
    recorder = Recorder(output_dir, what="output_dir")  # before the model: a folder it may not write fails at once
    return load(model_name, device=device, dtype=dtype), recorder


def run_manifest(*, model: Any = None, sae: Any = None, data: Any = None, seed: int | None = None,
                 extra: dict | None = None) -> dict[str, Any]:
    """Everything needed to regenerate a run: package versions, model/SAE ids and weight hashes,
    data hash, seeds and device."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in MANIFEST_PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    locked = locked_versions()
    out: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions,
                           "python": platform.python_version(), "platform": platform.platform(),
                           "device": (torch.cuda.get_device_name() if torch.cuda.is_available() else
                                      f"cpu ({os.cpu_count()} cores)"),
                           "cuda": torch.version.cuda, "seed": seed,
                           # packages whose installed version is not the one in requirements/lock.txt
                           "differs_from_lock": ({k: {"installed": v, "locked": locked[k]} for k, v in versions.items()
                                                  if k in locked and v is not None and
                                                  v.split("+")[0] != locked[k].split("+")[0]} if locked else None)}
    if model is not None:
        out["model"] = {"name": model.name, "source": model.source, "weights": model.fingerprint,
                        "dtype": str(model.dtype), "device": str(model.device)}
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


MANIFEST_PACKAGES = ("interp", "torch", "transformers", "peft", "sae-lens", "transformer-lens", "accelerate",
                     "safetensors", "tokenizers", "numpy", "scipy", "statsmodels", "pandas", "plotly", "papermill")
LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"


def locked_versions(path: str | os.PathLike = LOCK_FILE) -> dict[str, str]:
    """``{package: version}`` pinned in the lock file (empty when it is not there, e.g. a wheel install)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    pins = (ln.split("#")[0].split(";")[0].strip().partition("==") for ln in lines)
    return {name.strip().lower().replace("_", "-"): version.strip() for name, sep, version in pins if sep}


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


def notebook_parameters(name: str) -> dict[str, Any]:
    """The parameters one notebook declares: ``{name: default}`` from its cell tagged ``parameters``
    (defaults that are not literals read as None)."""
    import nbformat

    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return {}
    declared: dict[str, Any] = {}
    for node in ast.parse(cell.source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    declared[target.id] = ast.literal_eval(node.value) if node.value is not None else None
                except ValueError:
                    declared[target.id] = None
    return declared


def parse_parameter(text: str) -> tuple[str, Any]:
    """``name=value`` from the command line: a Python literal (``20``, ``[3, 9]``, ``'text'``, ``None``), JSON
    (``true``), or a bare word such as a model name or path (``tiny-medgemma``, ``data/x.jsonl``) read as text.
    Anything else is an `InterpError`: nothing typed here is ever run as code."""
    import re

    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep:
        raise InterpError(f"--param {text!r}: write name=value, e.g. n_pairs=20")
    _check_name(name)
    raw = raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            if not re.fullmatch(r"[\w.\-/:@+~]*", raw):
                raise InterpError(f"--param {name}={raw!r}: the value is not a Python literal; quote text "
                                  f"({name}=\"'...'\"), or give a number, list, dict, True/False or None") from None
            value = raw
    return name, _check_literal(name, value)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise InterpError(f"notebook parameter name {name!r} is not a Python identifier; parameters are the "
                          "variables of a notebook's parameters cell, e.g. n_pairs or model_name")


def _check_literal(name: str, value: Any) -> Any:
    """``value`` as papermill can write it back as a literal: None, bool, int, finite float, str, lists and
    dicts of those (tuples become lists)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InterpError(f"notebook parameter {name}={value!r}: give a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [_check_literal(name, v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return {k: _check_literal(name, v) for k, v in value.items()}
    raise InterpError(f"notebook parameter {name}={value!r} is a {type(value).__name__}; values must be literals "
                      "(numbers, text, True/False/None, and lists or dicts of them)")


def _notebook_params(names: list[str], parameters: dict[str, Any], out: Path, seed: int) -> dict[str, dict]:
    """Per notebook, the parameters it declares (plus output_dir and seed); every name and value checked."""
    declared = {n: notebook_parameters(n) for n in names}
    known = sorted(set().union(*declared.values()) - {"output_dir", "seed"})
    clean: dict[str, Any] = {}
    for key, value in parameters.items():
        _check_name(key)
        if key in ("output_dir", "seed"):
            raise InterpError(f"notebook parameter {key!r} is set by export itself: use "
                              f"{'out= (interp export --out)' if key == 'output_dir' else 'seed= (--seed)'}")
        if not any(key in d for d in declared.values()):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise InterpError(f"no notebook among {', '.join(names)} declares a parameter {key!r}; {hint}"
                              f"declared: {', '.join(known)}")
        clean[key] = _check_literal(key, value)
    return {n: {"output_dir": str(out), "seed": seed, **{k: v for k, v in clean.items() if k in d}}
            for n, d in declared.items()}


def _check_sources(per_notebook: dict[str, dict]) -> None:
    """The model, device and SAE each notebook will open resolve, before any notebook runs."""
    from interp.loop import check_device, check_model_source, check_sae_source

    seen: set[tuple] = set()
    for name, params in per_notebook.items():
        values = {**notebook_parameters(name), **params}
        for key, check in (("model_name", check_model_source), ("device", check_device)):
            value = values.get(key)
            if value is not None and (key, value) not in seen:
                seen.add((key, value))
                check(value, what=f"notebook parameter {key}={value!r}")
        release, sae_id = values.get("sae_release"), values.get("sae_id")
        if release is not None and ("sae", release, sae_id) not in seen:
            seen.add(("sae", release, sae_id))
            check_sae_source(release, sae_id, what=f"notebook parameter sae_release={release!r}")


def _notebook_names(notebooks: Any) -> list[str]:
    """``notebooks=`` as a list of names: None or empty (all, in order), one name, or a list or tuple of names."""
    if notebooks is None or (isinstance(notebooks, (list, tuple)) and not notebooks):
        return list(NOTEBOOK_ORDER)
    if isinstance(notebooks, str):
        return [notebooks]  # one name, not its characters
    if not isinstance(notebooks, (list, tuple)) or not all(isinstance(n, str) for n in notebooks):
        raise InterpError(f"notebooks={notebooks!r}: pass a notebook name or a list of them, e.g. "
                          f"notebooks=['01_capture'] (available: {', '.join(NOTEBOOK_ORDER)})")
    bad = [n for n in notebooks if not n or Path(n).name != n or n in (".", "..")]
    if bad:
        raise InterpError(f"notebook {bad[0]!r} is not a notebook name; pass names such as '01_capture' "
                          f"(available: {', '.join(NOTEBOOK_ORDER)})")
    return list(notebooks)


def export(out: str | os.PathLike = "exports/run", *, parameters: dict[str, Any] | None = None,
           notebooks: str | tuple[str, ...] | list[str] | None = None, seed: int = 0, kernel: str = "python3",
           progress: bool = True) -> ExportResult:
    """Execute the notebooks headless with fixed ``parameters`` and seed; write them, their HTML, and
    every figure/table/metric they record into ``out``.

    ``notebooks``: one name, a list of names, or None for all six in order. Each notebook gets the
    ``parameters`` (a dict) its parameters cell declares; a name that no chosen notebook
    declares, or a value that is not a literal, is an `InterpError` before anything runs, as is a model
    that does not resolve or an ``out`` that holds files the workbench did not write."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    names = _notebook_names(notebooks)
    unknown = [n for n in names if not (NOTEBOOKS / f"{n}.ipynb").is_file()]
    if unknown:
        raise InterpError(f"notebook {unknown[0]!r} not found in {NOTEBOOKS}; available: "
                          f"{', '.join(sorted(p.stem for p in NOTEBOOKS.glob('*.ipynb')))}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InterpError(f"seed={seed!r}: give an integer >= 0")
    folder = _path(out, "out").expanduser().resolve()
    if parameters is not None and not isinstance(parameters, Mapping):
        raise InterpError(f"parameters={parameters!r} is of type {type(parameters).__name__}; pass a dict of notebook "
                          "parameters, e.g. parameters={'n_pairs': 20} (text such as 'n_pairs=20' is read with "
                          "interp.export.parse_parameter)")
    per_notebook = _notebook_params(names, dict(parameters or {}), folder, seed)
    _check_sources(per_notebook)
    prepare_output(folder, what="export folder")
    t0 = time.perf_counter()
    executed, pages = [], []
    env_before = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = str(seed)
    quiet_before = os.environ.get(_QUIET_ENV)
    if not static_export_available():
        warn_no_static()  # once, here, rather than in every notebook
    os.environ[_QUIET_ENV] = "1"
    try:
        for name in names:
            target = folder / f"{name}.ipynb"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    # cwd: the caller's folder (an installed package's folder may not be writable)
                    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(target),
                                               parameters=per_notebook[name], kernel_name=kernel,
                                               cwd=os.getcwd(), progress_bar={"desc": name} if progress else False)
                except papermill.PapermillExecutionError as e:
                    first = (str(e.evalue).strip().splitlines() or [""])[0]
                    raise InterpError(f"notebook {name} failed in cell [{e.exec_count}]: {e.ename}: {first} "
                                      f"(the executed notebook, with the traceback, is {target})") from None
            executed.append(target)
            body, _ = HTMLExporter().from_notebook_node(nbformat.read(target, as_version=4))
            page = folder / f"{name}.html"
            atomic_write_text(page, body)
            pages.append(page)
    finally:
        for key, before in (("PYTHONHASHSEED", env_before), (_QUIET_ENV, quiet_before)):
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before
    metrics_path = folder / "metrics.json"
    metrics = _read_metrics(metrics_path)
    manifest = run_manifest(seed=seed, extra={"parameters": per_notebook, "notebooks": names})
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))
    return ExportResult(folder, tuple(executed), tuple(pages), metrics, time.perf_counter() - t0)
