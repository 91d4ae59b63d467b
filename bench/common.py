"""What every benchmark shares: timing, checking the fast path's values against its reference in the same
run, and one JSON record per run (environment, args, speeds, checks, PASS/FAIL).

A benchmark whose values disagree beyond tolerance prints ``STATUS <name>: FAIL`` and exits 1: a speed that
comes with wrong values is not a result. Tolerances (`tolerance`):
  rows     a vector per case (a residual-stream row, a gradient): ||out - ref|| / ||ref|| per case.
           bf16 on a GPU: 0.05 (batching/padding noise is ~1e-2; a wrong row, e.g. another batch's, is ~1).
           float32 on the CPU: 1e-3 (differences there are ~1e-5).
  margins  scalars (logit margins, profile values): |out - ref| / rms(ref), the scale of the quantity
           (a margin is a difference of two logits, so its own size says little). bf16: 0.2; float32: 1e-3.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOLERANCE = {"rows": {"bf16": 0.05, "fp32": 1e-3}, "margins": {"bf16": 0.2, "fp32": 1e-3}}


def tolerance(kind: str, dtype: torch.dtype) -> float:
    """The documented tolerance for ``kind`` ('rows' or 'margins') at the model's ``dtype``."""
    return TOLERANCE[kind]["fp32" if dtype == torch.float32 else "bf16"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Timing:
    median_s: float
    times_s: list[float]
    result: Any = None  # the last run's return value

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "times_s": self.times_s}


def timed(fn: Callable[[], Any], repeats: int, *, warmup: bool = True,
          check: Callable[[Any], None] | None = None) -> Timing:
    """Median wall seconds of ``fn`` over ``repeats`` runs (after one warm-up run unless ``warmup=False``),
    the device synchronised around each. ``check(result)`` runs after every run, warm-up included, outside
    the timer: a race shows up in any run, not only the first."""
    result = None
    if warmup:
        result = fn()
        if check is not None:
            check(result)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t)
        if check is not None:
            check(result)
    return Timing(statistics.median(times), times, result)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, *,
                checks: dict[str, Callable[[Any], None]] | None = None,
                first: Callable[[str, Any], None] | None = None, sequential: bool = False) -> dict[str, Timing]:
    """`timed` for several variants at once, their runs interleaved: one warm-up run of each (in the given order;
    ``first(name, result)`` sees it, after its check), then ``repeats`` rounds that run every variant once, each
    round starting one variant later than the one before. A drift of the machine during the benchmark (clocks,
    another tenant, the allocator's state) then lands on every variant alike instead of on whichever ran last.
    ``sequential``: each variant's warm-up and timed runs back to back, one variant after another (as `timed`).
    ``checks[name]`` runs after every run of that variant, warm-up included, outside the timer."""
    checks = checks or {}
    names = list(fns)
    if sequential:
        schedule = [(name, k > 0) for name in names for k in range(repeats + 1)]
    else:
        schedule = [(name, False) for name in names]
        schedule += [(name, True) for r in range(repeats) for name in names[r % len(names):] + names[:r % len(names)]]
    times: dict[str, list[float]] = {name: [] for name in names}
    for name, counted in schedule:
        sync()
        t = time.perf_counter()
        result = fns[name]()
        sync()
        if counted:
            times[name].append(time.perf_counter() - t)
        if name in checks:
            checks[name](result)
        if not counted and first is not None:
            first(name, result)
        del result
    return {name: Timing(statistics.median(ts), ts, None) for name, ts in times.items()}


# ---- value checks ------------------------------------------------------------------------------------
@dataclass
class Checks:
    """The value checks of one benchmark run; a check seen again (another timed run) keeps the worst."""

    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _merge(self, name: str, new: dict[str, Any]) -> dict[str, Any]:
        old = self.items.get(name)
        if old is None:
            new["runs"] = 1
            self.items[name] = new
            return new
        old["runs"] += 1
        for key in ("max_abs", "max_rel"):
            old[key] = _nanmax(old[key], new[key])
        if new["n_wrong"] > old["n_wrong"]:
            old.update(n_wrong=new["n_wrong"], wrong=new.get("wrong", []))
        old["runs_wrong"] = old.get("runs_wrong", int(old["n_wrong"] > 0)) + int(new["n_wrong"] > 0)
        old["status"] = "FAIL" if old["status"] == "FAIL" or new["status"] == "FAIL" else "PASS"
        if new.get("note"):
            old["note"] = new["note"]
        return old

    def rows(self, name: str, out: torch.Tensor, ref: torch.Tensor, tol: float, *, labels: Any = (),
             extra_wrong: int = 0, note: str = "") -> dict[str, Any]:
        """Vectors per case: ``out``/``ref`` are ``[n, ...]``; relative error ||out_i - ref_i|| / ||ref_i||.

        ``extra_wrong`` counts cases that are wrong for another reason (a row missing or misplaced)."""
        if out.shape != ref.shape:
            return self.fail(name, f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}", tol)
        n = out.shape[0]
        rel = torch.empty(n, dtype=torch.float64)
        max_abs = 0.0
        for s in range(0, n, 4096):  # float32 chunks: all-position captures are hundreds of MB
            o = out[s:s + 4096].reshape(min(4096, n - s), -1).float().cpu()
            r = ref[s:s + 4096].reshape(min(4096, n - s), -1).float().cpu()
            d = o - r
            if d.numel():
                max_abs = max(max_abs, float(d.abs().max()))
            rel[s:s + 4096] = (d.norm(dim=1) / r.norm(dim=1).clamp_min(1e-30)).double()
        rel = torch.where(torch.isfinite(rel), rel, torch.full_like(rel, math.inf))
        return self._record(name, rel.numpy(), max_abs, tol, labels, extra_wrong, note)

    def values(self, name: str, out: Any, ref: Any, tol: float, *, scale: float | None = None,
               labels: Sequence[Any] = (), note: str = "") -> dict[str, Any]:
        """Scalars per case: relative error |out_i - ref_i| / ``scale`` (default rms(ref))."""
        out, ref = np.asarray(out, dtype=np.float64).ravel(), np.asarray(ref, dtype=np.float64).ravel()
        if out.shape != ref.shape:
            return self.fail(name, f"{out.size} values vs {ref.size} in the reference", tol)
        scale = float(np.sqrt(np.mean(ref ** 2))) if scale is None else float(scale)
        diff = np.abs(out - ref)
        diff = np.where(np.isfinite(diff), diff, np.inf)
        rel = diff / max(scale, 1e-30)
        rec = self._record(name, rel, float(diff.max()) if diff.size else 0.0, tol, labels, 0, note)
        rec["scale"] = scale
        return rec

    def scalar(self, name: str, out: float, ref: float, tol: float, *, relative: bool = True,
               note: str = "") -> dict[str, Any]:
        """One number: |out - ref| (/ |ref| when ``relative``) must be <= ``tol``."""
        d = abs(float(out) - float(ref))
        rel = d / max(abs(float(ref)), 1e-30) if relative else d
        rec = self._record(name, np.array([rel if math.isfinite(rel) else math.inf]), d, tol, (), 0, note)
        rec.update(value=float(out), reference=float(ref), relative=relative)
        return rec

    def cases(self, name: str, rel: Any, tol: float, *, max_abs: float = math.nan, labels: Any = (),
              note: str = "") -> dict[str, Any]:
        """Relative errors computed by the caller, one per case."""
        rel = np.asarray(rel, dtype=np.float64).ravel()
        return self._record(name, np.where(np.isfinite(rel), rel, np.inf), max_abs, tol, labels, 0, note)

    def require(self, name: str, ok: bool, note: str) -> dict[str, Any]:
        """A condition the run needs (e.g. the fast path actually ran); FAIL with ``note`` when not met."""
        rec = {"n": 1, "max_abs": math.nan, "max_rel": math.nan, "n_wrong": int(not ok), "tol": None,
               "status": "PASS" if ok else "FAIL", "note": note}
        return self._merge(name, rec)

    def fail(self, name: str, why: str, tol: float | None = None) -> dict[str, Any]:
        return self._merge(name, {"n": 0, "max_abs": math.inf, "max_rel": math.inf, "n_wrong": 1, "tol": tol,
                                  "status": "FAIL", "note": why})

    def _record(self, name: str, rel: np.ndarray, max_abs: float, tol: float, labels: Any,
                extra_wrong: int, note: str) -> dict[str, Any]:
        bad = np.flatnonzero(~(rel <= tol))
        n_wrong = int(bad.size) + int(extra_wrong)
        rec = {"n": int(rel.size), "max_abs": float(max_abs), "max_rel": float(rel.max()) if rel.size else 0.0,
               "n_wrong": n_wrong, "tol": tol, "status": "PASS" if n_wrong == 0 else "FAIL"}
        if bad.size:
            rec["wrong"] = [_label(labels, i) for i in bad[:20].tolist()]
        if note:
            rec["note"] = note
        return self._merge(name, rec)

    @property
    def status(self) -> str:
        if not self.items:
            return "FAIL"  # a benchmark that checked nothing has not shown its values are right
        return "PASS" if all(c["status"] == "PASS" for c in self.items.values()) else "FAIL"

    def print(self) -> None:
        print(f"\n{'value check':<58}{'n':>8}{'max abs':>11}{'max rel':>11}{'tol':>9}{'wrong':>7}  status")
        for name, c in self.items.items():
            tol = "-" if c["tol"] is None else f"{c['tol']:.0e}"
            print(f"{name:<58}{c['n']:>8}{c['max_abs']:>11.3g}{c['max_rel']:>11.3g}{tol:>9}{c['n_wrong']:>7}  "
                  f"{c['status']}" + (f"  ({c['note']})" if c.get("note") and c["status"] == "FAIL" else ""))


def _label(labels: Sequence[Any] | Callable[[int], Any], i: int) -> Any:
    if callable(labels):
        return labels(i)
    return labels[i] if len(labels) else i


def _nanmax(a: float, b: float) -> float:
    vals = [v for v in (a, b) if not (isinstance(v, float) and math.isnan(v))]
    return max(vals) if vals else math.nan


@contextlib.contextmanager
def recorded_warnings(into: list[str]) -> Iterator[None]:
    """Collect the messages of warnings raised inside (a fast path that falls back says so by warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        msg = f"{w.category.__name__}: {w.message}"
        if msg not in into:
            into.append(msg)
            print(f"warning: {msg}"[:400], file=sys.stderr)


# ---- record ------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Date, machine and the versions that matter."""
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "peft", "sae-lens", "transformer-lens", "accelerate", "interp"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    try:  # a carried wheel on PYTHONPATH may shadow the installed metadata
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    cuda = torch.cuda.is_available()
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name() if cuda else None, "gpu_count": torch.cuda.device_count() if cuda else 0,
            "cuda": torch.version.cuda, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "versions": versions}


def finish(bench: str, args: Any, result: dict[str, Any], checks: Checks, out: str | os.PathLike | None,
           *, exit: bool = True) -> dict[str, Any]:
    """Print the checks and the status line, write the JSON record, exit 1 on FAIL."""
    checks.print()
    worst = max((c["max_rel"] for c in checks.items.values() if not math.isnan(c["max_rel"])), default=math.nan)
    wrong = sum(c["n_wrong"] for c in checks.items.values())
    record = {"benchmark": bench, "status": checks.status, **environment(),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              **result, "checks": checks.items}
    if out:
        target = Path(out)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1, default=_json_default))
        os.replace(tmp, target)
        print(f"wrote {target}")
    print(f"STATUS {bench}: {checks.status} ({len(checks.items)} checks, {wrong} wrong, "
          f"largest relative difference {worst:.2e})", flush=True)
    if exit and checks.status != "PASS":
        sys.exit(1)
    return record


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, torch.dtype | torch.device | Path):
        return str(v)
    return str(v)


def device_name(device: Any) -> str:
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
